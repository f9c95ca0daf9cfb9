//! Serde models of the T8 NIDD bodies the bridge sends and receives. Only the fields the bridge
//! reads or writes are modelled; unknown fields are ignored on input. Every T8 enum is open
//! (`anyOf [enum, string]`), so each has an `Other(String)` arm.

use serde::{Deserialize, Serialize};

use crate::identity::{ExternalId, Msisdn};

/// Declares an open T8 enumeration: known values plus any other string, serialised verbatim.
macro_rules! open_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant,)+
            /// A value this release of the bridge does not know.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Other(other) => other,
                }
            }
        }

        impl From<&str> for $name {
            fn from(text: &str) -> Self {
                match text {
                    $($text => Self::$variant,)+
                    other => Self::Other(other.to_string()),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Ok(Self::from(text.as_str()))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

open_enum!(
    /// `NiddStatus`: the state of a NIDD configuration.
    NiddStatus {
        Active = "ACTIVE",
        TerminatedUeNotAuthorized = "TERMINATED_UE_NOT_AUTHORIZED",
        Terminated = "TERMINATED",
        RdsPortUnknown = "RDS_PORT_UNKNOWN",
    }
);

impl NiddStatus {
    /// The configuration no longer exists at the SCEF.
    pub fn is_terminated(&self) -> bool {
        matches!(self, Self::Terminated | Self::TerminatedUeNotAuthorized)
    }
}

open_enum!(
    /// `DeliveryStatus` of a downlink (MT) delivery.
    DeliveryStatus {
        Success = "SUCCESS",
        SuccessNextHopAcknowledged = "SUCCESS_NEXT_HOP_ACKNOWLEDGED",
        SuccessNextHopUnacknowledged = "SUCCESS_NEXT_HOP_UNACKNOWLEDGED",
        SuccessAcknowledged = "SUCCESS_ACKNOWLEDGED",
        SuccessUnacknowledged = "SUCCESS_UNACKNOWLEDGED",
        Triggered = "TRIGGERED",
        Buffering = "BUFFERING",
        BufferingTemporarilyNotReachable = "BUFFERING_TEMPORARILY_NOT_REACHABLE",
        Sending = "SENDING",
        Failure = "FAILURE",
        FailureRdsDisabled = "FAILURE_RDS_DISABLED",
        FailureNextHop = "FAILURE_NEXT_HOP",
        FailureTimeout = "FAILURE_TIMEOUT",
        FailureTemporarilyNotReachable = "FAILURE_TEMPORARILY_NOT_REACHABLE",
    }
);

impl DeliveryStatus {
    /// Metric label: the known value, or `OTHER` so unknown strings cannot grow label sets.
    pub fn label(&self) -> &str {
        match self {
            Self::Other(_) => "OTHER",
            known => known.as_str(),
        }
    }
}

open_enum!(
    /// `PdnEstablishmentOptions`.
    PdnEstablishmentOption {
        WaitForUe = "WAIT_FOR_UE",
        IndicateError = "INDICATE_ERROR",
        SendTrigger = "SEND_TRIGGER",
    }
);

/// `NiddConfiguration`: the POST body creating a configuration, and the SCEF's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddConfiguration {
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub supported_features: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtc_provider_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<ExternalId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
    /// A group's configuration (TS 23.682 External Group Identifier, `local@domain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_group_id: Option<ExternalId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    pub notification_destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_test_notification: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reliable_data_service: Option<bool>,
    /// The static RDS port pairs, when `reliableDataService` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rds_ports: Option<Vec<RdsPort>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdn_establishment_option: Option<PdnEstablishmentOption>,
    /// Read-only, set by the SCEF. The 3GPP schema says its unit is bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_packet_size: Option<u64>,
    /// Read-only, set by the SCEF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NiddStatus>,
}

/// `NiddDownlinkDataTransfer`: one MT datagram, and the SCEF's answer about it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddDownlinkDataTransfer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<ExternalId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    /// Base64 of the CoAP datagram. Required by the schema in answers too, but a missing one
    /// in an SCEF's answer is tolerated.
    #[serde(default)]
    pub data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reliable_data_service: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_latency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdn_establishment_option: Option<PdnEstablishmentOption>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_status: Option<DeliveryStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_retransmission_time: Option<String>,
}

/// RFC 7807 problem details as T8 defines them (`ProblemDetails`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemDetails {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub problem_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// `NiddDownlinkDataDeliveryFailure`: the body of a 500 answer to an MT delivery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddDownlinkDataDeliveryFailure {
    pub problem_detail: ProblemDetails,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_retransmission_time: Option<String>,
}

/// `NiddUplinkDataNotification`: one MO datagram.
///
/// In this and the other notification bodies an optional field may be absent but not `null`:
/// the 3GPP schemas declare none of them nullable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddUplinkDataNotification {
    pub nidd_configuration: String,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_id: Option<ExternalId>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub msisdn: Option<Msisdn>,
    pub data: String,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub reliable_data_service: Option<bool>,
}

/// `NiddConfigurationStatusNotification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddConfigurationStatusNotification {
    pub nidd_configuration: String,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_id: Option<ExternalId>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub msisdn: Option<Msisdn>,
    pub status: NiddStatus,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub rds_cap_indication: Option<bool>,
}

/// `NiddDownlinkDataDeliveryStatusNotification`: the outcome of a pending (201) MT delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddDownlinkDataDeliveryStatusNotification {
    pub nidd_downlink_data_transfer: String,
    pub delivery_status: DeliveryStatus,
    /// RFC 3339 (T8 `DateTime`).
    #[serde(
        default,
        deserialize_with = "date_time",
        skip_serializing_if = "Option::is_none"
    )]
    pub requested_retransmission_time: Option<String>,
}

/// One entry of a group delivery result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GmdResult {
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_id: Option<ExternalId>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub msisdn: Option<Msisdn>,
    pub delivery_status: DeliveryStatus,
    /// RFC 3339 (T8 `DateTime`).
    #[serde(
        default,
        deserialize_with = "date_time",
        skip_serializing_if = "Option::is_none"
    )]
    pub requested_retransmission_time: Option<String>,
}

/// `GmdNiddDownlinkDataDeliveryNotification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GmdNiddDownlinkDataDeliveryNotification {
    pub nidd_downlink_data_transfer: String,
    pub gmd_results: Vec<GmdResult>,
}

/// `ManagePortNotification` (RDS ports); accepted and counted, RDS is not used yet.
/// `managedPorts` is optional in TS 29.122: only `niddConfiguration` and the UE are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagePortNotification {
    pub nidd_configuration: String,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_id: Option<ExternalId>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub msisdn: Option<Msisdn>,
    /// At least one entry when present.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub managed_ports: Option<Vec<ManagePort>>,
}

/// `ManagePort`: one reserved RDS port configuration. Read only to check its shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagePort {
    #[serde(
        rename = "self",
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub self_link: Option<String>,
    pub app_id: String,
    /// `ManageEntity` (`UE` or `AS`; open).
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub manage_entity: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub skip_ue_inquiry: Option<bool>,
    /// `SerializationFormat` values (open); at least one entry when present.
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub supported_formats: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub configured_format: Option<String>,
}

/// `RdsPort`: the ports of a reliable data service exchange (TS 24.250: 0–15 each); asked for
/// in configurations when `nidd.reliable_data_service` is on, and checked where a
/// notification may carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdsPort {
    #[serde(rename = "portUE")]
    pub port_ue: u16,
    #[serde(rename = "portSCEF")]
    pub port_scef: u16,
}

/// `TestNotification` (TS 29.122 CommonData).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestNotification {
    pub subscription: String,
}

/// Fields of a notification the bridge does not keep but whose shape the schema fixes.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UnusedFields {
    #[serde(default, deserialize_with = "non_null")]
    #[serde(rename = "rdsPort")]
    _rds_port: Option<RdsPort>,
}

/// An optional field: absent is `None`, `null` is refused (no T8 notification field is
/// nullable), anything else must be a `T`.
fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// An optional T8 `DurationSec` (an integer ≥ 0) the bridge only reads for a hint: one beyond
/// `u64` is schema-valid, and counts as absent rather than refusing its notification; a
/// negative, fractional or non-numeric value is refused, as the schema does.
fn lenient_seconds<'de, D>(deserializer: D) -> Result<Option<u64>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(seconds) = number.as_u64() {
        return Ok(Some(seconds));
    }
    match number.as_f64() {
        Some(huge) if huge >= 0.0 && huge.fract() == 0.0 => Ok(None),
        _ => Err(serde::de::Error::custom(format!(
            "{number} is not a whole number of seconds >= 0"
        ))),
    }
}

/// An optional T8 `DateTime`: an RFC 3339 date-time, kept as the string received.
fn date_time<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339).map_err(
        |e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 date-time: {e}")),
    )?;
    Ok(Some(text))
}

/// A NIDD notification, told apart by its distinguishing field: the 3GPP `oneOf` has no
/// discriminator, and a valid uplink or configuration status notification also matches
/// `ManagePortNotification` (which requires only `niddConfiguration` and the UE).
#[derive(Debug, Clone, PartialEq)]
pub enum NiddNotification {
    Uplink(NiddUplinkDataNotification),
    ConfigurationStatus(NiddConfigurationStatusNotification),
    DeliveryStatus(NiddDownlinkDataDeliveryStatusNotification),
    GroupDelivery(GmdNiddDownlinkDataDeliveryNotification),
    ManagePort(ManagePortNotification),
    Test(TestNotification),
}

/// The kinds of [`NiddNotification`], in dispatch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NiddNotificationKind {
    Uplink,
    ConfigurationStatus,
    DeliveryStatus,
    GroupDelivery,
    Test,
    ManagePort,
}

impl NiddNotificationKind {
    /// The kind a body claims to be, from the keys present (whatever their values, `null`
    /// included), first match wins: `data`, `status`, `deliveryStatus`, `gmdResults`,
    /// `subscription` without `niddConfiguration`, else `ManagePortNotification`. Each kind's
    /// distinguishing field is required by its schema and foreign to the kinds before it, so
    /// a body valid against one 3GPP schema and carrying no earlier kind's field lands on
    /// that schema; a body with an earlier kind's field is held to that kind.
    pub fn of(body: &serde_json::Value) -> Self {
        let has = |field: &str| body.get(field).is_some();
        if has("data") {
            Self::Uplink
        } else if has("status") {
            Self::ConfigurationStatus
        } else if has("deliveryStatus") {
            Self::DeliveryStatus
        } else if has("gmdResults") {
            Self::GroupDelivery
        } else if has("subscription") && !has("niddConfiguration") {
            Self::Test
        } else {
            Self::ManagePort
        }
    }

    /// Its 3GPP schema name.
    pub fn schema(self) -> &'static str {
        match self {
            Self::Uplink => "NiddUplinkDataNotification",
            Self::ConfigurationStatus => "NiddConfigurationStatusNotification",
            Self::DeliveryStatus => "NiddDownlinkDataDeliveryStatusNotification",
            Self::GroupDelivery => "GmdNiddDownlinkDataDeliveryNotification",
            Self::Test => "TestNotification",
            Self::ManagePort => "ManagePortNotification",
        }
    }
}

/// Why a body is not a NIDD notification.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    #[error("a notification is a JSON object")]
    NotAnObject,
    #[error("{schema}: exactly one of externalId and msisdn is required")]
    Identity { schema: &'static str },
    #[error("{schema}: {field} must have at least one entry")]
    Empty {
        schema: &'static str,
        field: &'static str,
    },
    #[error("{schema}: {source}")]
    Decode {
        schema: &'static str,
        source: serde_json::Error,
    },
}

impl NiddNotification {
    /// Classifies a parsed JSON body ([`NiddNotificationKind::of`]), then decodes it strictly
    /// as that kind: required fields, types, no `null` for optional fields, exactly one UE
    /// identity where the schema asks for one, non-empty arrays where it says `minItems: 1`.
    pub fn from_json(body: serde_json::Value) -> Result<Self, NotificationError> {
        if !body.is_object() {
            return Err(NotificationError::NotAnObject);
        }
        let kind = NiddNotificationKind::of(&body);
        let schema = kind.schema();
        let has = |field: &str| body.get(field).is_some();
        let names_one_ue = has("externalId") != has("msisdn");
        if matches!(
            kind,
            NiddNotificationKind::Uplink
                | NiddNotificationKind::ConfigurationStatus
                | NiddNotificationKind::ManagePort
        ) && !names_one_ue
        {
            return Err(NotificationError::Identity { schema });
        }
        let decode_error = |source| NotificationError::Decode { schema, source };
        if matches!(
            kind,
            NiddNotificationKind::Uplink | NiddNotificationKind::ConfigurationStatus
        ) {
            serde_json::from_value::<UnusedFields>(body.clone()).map_err(decode_error)?;
        }
        let empty = |field| NotificationError::Empty { schema, field };
        Ok(match kind {
            NiddNotificationKind::Uplink => {
                Self::Uplink(serde_json::from_value(body).map_err(decode_error)?)
            }
            NiddNotificationKind::ConfigurationStatus => {
                Self::ConfigurationStatus(serde_json::from_value(body).map_err(decode_error)?)
            }
            NiddNotificationKind::DeliveryStatus => {
                Self::DeliveryStatus(serde_json::from_value(body).map_err(decode_error)?)
            }
            NiddNotificationKind::GroupDelivery => {
                let group: GmdNiddDownlinkDataDeliveryNotification =
                    serde_json::from_value(body).map_err(decode_error)?;
                if group.gmd_results.is_empty() {
                    return Err(empty("gmdResults"));
                }
                if group
                    .gmd_results
                    .iter()
                    .any(|r| r.external_id.is_some() == r.msisdn.is_some())
                {
                    return Err(NotificationError::Identity {
                        schema: "GmdResult",
                    });
                }
                Self::GroupDelivery(group)
            }
            NiddNotificationKind::Test => {
                Self::Test(serde_json::from_value(body).map_err(decode_error)?)
            }
            NiddNotificationKind::ManagePort => {
                let ports: ManagePortNotification =
                    serde_json::from_value(body).map_err(decode_error)?;
                if let Some(managed) = &ports.managed_ports {
                    if managed.is_empty() {
                        return Err(empty("managedPorts"));
                    }
                    if managed
                        .iter()
                        .any(|p| p.supported_formats.as_ref().is_some_and(Vec::is_empty))
                    {
                        return Err(empty("supportedFormats"));
                    }
                }
                Self::ManagePort(ports)
            }
        })
    }

    /// Metric label of the notification kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Uplink(_) => "uplink",
            Self::ConfigurationStatus(_) => "configuration_status",
            Self::DeliveryStatus(_) => "delivery_status",
            Self::GroupDelivery(_) => "group_delivery",
            Self::ManagePort(_) => "manage_port",
            Self::Test(_) => "test",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_enums_keep_unknown_strings() {
        let status: NiddStatus = serde_json::from_str("\"SUSPENDED_BY_OPERATOR\"").unwrap();
        assert_eq!(status, NiddStatus::Other("SUSPENDED_BY_OPERATOR".into()));
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            "\"SUSPENDED_BY_OPERATOR\""
        );
        assert_eq!(DeliveryStatus::from("SUCCESS"), DeliveryStatus::Success);
        assert_eq!(DeliveryStatus::from("NEW").label(), "OTHER");
    }

    #[test]
    fn dispatch_uses_the_distinguishing_field() {
        let uplink = serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "data": "QAE="});
        assert!(matches!(
            NiddNotification::from_json(uplink),
            Ok(NiddNotification::Uplink(_))
        ));
        let status = serde_json::json!({"niddConfiguration": "http://s/c/1", "msisdn": "4912345", "status": "ACTIVE"});
        assert!(matches!(
            NiddNotification::from_json(status),
            Ok(NiddNotification::ConfigurationStatus(_))
        ));
        let test = serde_json::json!({"subscription": "http://s/c/1"});
        assert!(matches!(
            NiddNotification::from_json(test),
            Ok(NiddNotification::Test(_))
        ));
        let port = serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "managedPorts": [{"appId": "lwm2m"}]});
        assert!(matches!(
            NiddNotification::from_json(port),
            Ok(NiddNotification::ManagePort(_))
        ));
        // `managedPorts` is optional (TS 29.122 requires only `niddConfiguration` and the UE).
        let bare_port =
            serde_json::json!({"niddConfiguration": "http://s/c/1", "msisdn": "4912345"});
        assert!(matches!(
            NiddNotification::from_json(bare_port),
            Ok(NiddNotification::ManagePort(_))
        ));
        assert!(NiddNotification::from_json(serde_json::json!({"data": 5})).is_err());
        assert!(NiddNotification::from_json(serde_json::json!([1])).is_err());
    }

    #[test]
    fn dispatch_refuses_what_the_chosen_schema_forbids() {
        let refused = [
            // `null` is no value of any notification field.
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": null, "msisdn": "4912345", "data": "QAE="}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "data": "QAE=", "reliableDataService": null}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "status": "ACTIVE", "rdsCapIndication": null}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": null}),
            // rdsPort needs both ports, each 0..65535.
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "data": "QAE=", "rdsPort": {"portUE": 1}}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "status": "ACTIVE", "rdsPort": {"portUE": 1, "portSCEF": 65536}}),
            // minItems 1, and one UE per group result.
            serde_json::json!({"niddDownlinkDataTransfer": "http://s/d/1", "gmdResults": []}),
            serde_json::json!({"niddDownlinkDataTransfer": "http://s/d/1", "gmdResults": [{"deliveryStatus": "SUCCESS"}]}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "managedPorts": []}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "managedPorts": [{"manageEntity": "UE"}]}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "managedPorts": [{"appId": "x", "supportedFormats": []}]}),
            // DateTime is RFC 3339.
            serde_json::json!({"niddDownlinkDataTransfer": "http://s/d/1", "deliveryStatus": "FAILURE", "requestedRetransmissionTime": "soon"}),
            // The distinguishing field holds the body to its kind, even when a looser kind would match.
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "data": 5}),
            serde_json::json!({"niddConfiguration": "http://s/c/1", "externalId": "a@x", "status": null}),
        ];
        for body in refused {
            assert!(NiddNotification::from_json(body.clone()).is_err(), "{body}");
        }
        let accepted = serde_json::json!({"niddDownlinkDataTransfer": "http://s/d/1", "deliveryStatus": "FAILURE", "requestedRetransmissionTime": "2026-11-21T10:00:00+01:00"});
        assert!(NiddNotification::from_json(accepted).is_ok());
    }
}

open_enum!(
    /// `DeliveryResult` of a device trigger.
    DeliveryResult {
        Success = "SUCCESS",
        Unknown = "UNKNOWN",
        Failure = "FAILURE",
        Triggered = "TRIGGERED",
        Expired = "EXPIRED",
        Unconfirmed = "UNCONFIRMED",
        Replaced = "REPLACED",
        Terminate = "TERMINATE",
    }
);

/// `DeviceTriggering`: one trigger transaction (TS 29.122 DeviceTriggering API).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceTriggering {
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<ExternalId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
    pub validity_period: u64,
    /// `PRIORITY` or `NO_PRIORITY`.
    pub priority: String,
    pub application_port_id: u16,
    /// Base64 of the trigger payload.
    pub trigger_payload: String,
    pub notification_destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_result: Option<DeliveryResult>,
}

/// `DeviceTriggeringDeliveryReportNotification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTriggeringDeliveryReportNotification {
    pub transaction: String,
    pub result: DeliveryResult,
}

/// `NiddConfigurationTrigger` (TS 29.522): the NEF asks the AF to create a NIDD configuration
/// for the UE `gpsi` names, which has none. Every field is required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddConfigurationTrigger {
    pub af_id: String,
    pub nef_id: String,
    /// `msisdn-<digits>` or `extid-<local@domain>` (TS 29.571 `Gpsi`).
    pub gpsi: String,
    /// TS 29.571 `SupportedFeatures`: hexadecimal digits.
    pub supp_feat: String,
}

/// `NiddConfigurationTriggerReply` (TS 29.522).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NiddConfigurationTriggerReply {
    pub supp_feat: String,
}

open_enum!(
    /// `MonitoringType` (the ones the bridge uses are named; any other is kept verbatim).
    MonitoringType {
        UeReachability = "UE_REACHABILITY",
        LossOfConnectivity = "LOSS_OF_CONNECTIVITY",
        AvailabilityAfterDdnFailure = "AVAILABILITY_AFTER_DDN_FAILURE",
    }
);

/// `MonitoringEventSubscription`: the fields the bridge sends and reads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringEventSubscription {
    #[serde(rename = "self", skip_serializing_if = "Option::is_none")]
    pub self_link: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<ExternalId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msisdn: Option<Msisdn>,
    pub notification_destination: String,
    pub monitoring_type: Option<MonitoringType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_number_of_reports: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitor_expire_time: Option<String>,
    /// `DATA` for NIDD.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachability_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_detection_time: Option<u64>,
}

/// One `MonitoringEventReport`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringEventReport {
    pub monitoring_type: MonitoringType,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_id: Option<ExternalId>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub msisdn: Option<Msisdn>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub event_time: Option<String>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub reachability_type: Option<String>,
    #[serde(
        rename = "maxUEAvailabilityTime",
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ue_availability_time: Option<String>,
    /// What the UE applied when it went idle (with `idleStatusIndication`).
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_status_info: Option<IdleStatusInfo>,
}

/// `IdleStatusInfo`: the timers a UE going idle runs with (seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdleStatusInfo {
    #[serde(
        default,
        deserialize_with = "lenient_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub active_time: Option<u64>,
    /// The periodic TAU (T3412): the UE is back at the latest after it.
    #[serde(
        rename = "periodicAUTimer",
        default,
        deserialize_with = "lenient_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub periodic_au_timer: Option<u64>,
}

/// `AppliedParameterConfiguration`: what the network applied of a subscription's parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedParameterConfiguration {
    /// The longest the UE may be unreachable for downlink data (seconds).
    #[serde(
        default,
        deserialize_with = "lenient_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub maximum_latency: Option<u64>,
}

/// `MonitoringNotification`: reports for a subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringNotification {
    pub subscription: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitoring_event_reports: Vec<MonitoringEventReport>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub cancel_ind: Option<bool>,
    #[serde(
        default,
        deserialize_with = "non_null",
        skip_serializing_if = "Option::is_none"
    )]
    pub applied_param: Option<AppliedParameterConfiguration>,
}

/// Bodies that name one UE by `externalId` or `msisdn`.
pub trait ExternalIdOrMsisdn {
    fn external_id(&self) -> Option<&ExternalId>;
    fn msisdn(&self) -> Option<&Msisdn>;
}

macro_rules! names_one_ue {
    ($($body:ty),+) => {$(
        impl ExternalIdOrMsisdn for $body {
            fn external_id(&self) -> Option<&ExternalId> {
                self.external_id.as_ref()
            }
            fn msisdn(&self) -> Option<&Msisdn> {
                self.msisdn.as_ref()
            }
        }
    )+};
}

names_one_ue!(
    GmdResult,
    NiddUplinkDataNotification,
    NiddConfigurationStatusNotification,
    ManagePortNotification,
    NiddDownlinkDataTransfer,
    NiddConfiguration,
    DeviceTriggering,
    MonitoringEventSubscription,
    MonitoringEventReport
);
