//! The mock SCEF's groups: External Group Identifiers and their member UEs (as the HSS would
//! know them), NIDD configurations created for a group (`externalGroupId`), the routing of a
//! member's MO to its group's configuration, and group messages (MT for every member of the
//! group, reported by `GmdNiddDownlinkDataDeliveryNotification`).
//!
//! Where TS 29.122 leaves the details open, the mock does this:
//! - a configuration for a group the mock does not know is refused with 403 (the SCEF could
//!   not have the group authorised);
//! - the ACTIVE status notification after a group configuration is created is sent once per
//!   member (the notification names one UE);
//! - MT naming a UE that is not (or no longer) a member of the configuration's group is refused
//!   with 400, as MT naming another UE than a per-UE configuration's;
//! - a group message is answered 201 with a `Location` and no `deliveryStatus`; at once every
//!   awake member gets it (`SUCCESS`), every sleeping one has it buffered (`BUFFERING`, unless
//!   the SCEF does not buffer or the request says `INDICATE_ERROR`:
//!   `FAILURE_TEMPORARILY_NOT_REACHABLE`), and one GMD notification with a result per member
//!   follows; a buffered member's delivery on wake is reported by a GMD notification with its
//!   one result. A group without members gets no GMD notification (`gmdResults` needs one).
//!   Of the downlink modes, `FailNotReachable` refuses a group message too (500);
//!   `BufferThenDeliver` applies to deliveries for one UE only.
//! - with MT radio latency, the GMD notification of a group message follows once the awake
//!   members got the datagram.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Response;

use super::psm::{BufferedMt, PendingReport, gmd_result};
use super::{Inner, MockError, MockScef, MockState, json_response, with_group};
use nidd_bridge::DeviceId;
use nidd_bridge::t8::{
    DeliveryStatus, GmdNiddDownlinkDataDeliveryNotification, NiddConfiguration,
    NiddDownlinkDataTransfer, NiddStatus, PdnEstablishmentOption,
};

/// A NIDD configuration created for an External Group Identifier.
#[derive(Debug, Clone)]
pub struct MockGroupConfiguration {
    pub id: String,
    /// The `{scsAsId}` it was created under; the list answers only that SCS/AS's.
    pub scs_as_id: String,
    pub external_group_id: String,
    pub notification_destination: String,
    pub self_link: String,
    /// Its `duration` as last asked for (RFC 3339); once it has passed the configuration is
    /// gone.
    pub duration: Option<String>,
}

/// Where a UE's MO goes: the link of the configuration that covers it and its callback URL.
pub(super) struct Route {
    pub(super) self_link: String,
    pub(super) notification_destination: String,
}

/// `local@domain` with neither part empty nor holding another `@` (TS 23.682 §4.6.3), and no
/// white space.
pub(super) fn is_external_group_id(text: &str) -> bool {
    let part = |p: &str| !p.is_empty() && !p.contains('@') && !p.contains(char::is_whitespace);
    text.split_once('@')
        .is_some_and(|(local, domain)| part(local) && part(domain))
}

pub(super) fn is_member(inner: &Inner, group: &str, ue: &DeviceId) -> bool {
    inner
        .groups
        .get(group)
        .is_some_and(|members| members.contains(ue))
}

/// The configuration a UE's MO goes to: its own, else one of a group it is a member of.
pub(super) fn mo_route(state: &MockState, ue: &DeviceId) -> Option<Route> {
    let inner = state.inner();
    if let Some(own) = inner.configurations.values().rev().find(|c| &c.ue == ue) {
        return Some(Route {
            self_link: own.self_link.clone(),
            notification_destination: own.notification_destination.clone(),
        });
    }
    inner
        .group_configurations
        .values()
        .rev()
        .find(|c| is_member(&inner, &c.external_group_id, ue))
        .map(|c| Route {
            self_link: c.self_link.clone(),
            notification_destination: c.notification_destination.clone(),
        })
}

/// A group configuration as GET, PATCH and the list answer it.
pub(super) fn group_configuration_body(
    state: &MockState,
    c: &MockGroupConfiguration,
) -> serde_json::Value {
    let body = NiddConfiguration {
        self_link: Some(c.self_link.clone()),
        notification_destination: c.notification_destination.clone(),
        duration: c.duration.clone(),
        status: Some(NiddStatus::Active),
        maximum_packet_size: state.config.maximum_packet_size_bits,
        ..Default::default()
    };
    with_group(&body, Some(&c.external_group_id))
}

/// A group message: the datagram for every member of `configuration`'s group (see the module
/// documentation), answered 201.
pub(super) fn deliver_group_message(
    state: &Arc<MockState>,
    scs: &str,
    configuration: &MockGroupConfiguration,
    request: NiddDownlinkDataTransfer,
    datagram: Vec<u8>,
) -> Response {
    let group = configuration.external_group_id.clone();
    let destination = configuration.notification_destination.clone();
    let location = state.delivery_location(scs, &configuration.id);
    let members = state
        .inner()
        .groups
        .get(&group)
        .cloned()
        .unwrap_or_default();
    let may_buffer = state.config.scef_buffering
        && request.pdn_establishment_option != Some(PdnEstablishmentOption::IndicateError);
    let mut results = Vec::with_capacity(members.len());
    let mut arrivals = Vec::new();
    for ue in &members {
        let awake = MockState::ue_channels(&mut state.inner(), ue).awake;
        let status = if awake {
            arrivals.push(state.transmit(ue, datagram.clone()));
            DeliveryStatus::Success
        } else if may_buffer {
            MockState::ue_channels(&mut state.inner(), ue)
                .buffered
                .push(BufferedMt::new(
                    datagram.clone(),
                    location.clone(),
                    destination.clone(),
                    PendingReport::Gmd,
                ));
            DeliveryStatus::Buffering
        } else {
            DeliveryStatus::FailureTemporarilyNotReachable
        };
        results.push(gmd_result(ue, status));
    }
    if !results.is_empty() {
        let state = state.clone();
        let notification = GmdNiddDownlinkDataDeliveryNotification {
            nidd_downlink_data_transfer: location.clone(),
            gmd_results: results,
        };
        tokio::spawn(async move {
            // Once the awake members got it (after the MT radio latency).
            for arrival in arrivals {
                arrival.reached().await;
            }
            let json = serde_json::to_value(&notification).unwrap_or_default();
            if let Err(error) = state.callback(&destination, json).await {
                tracing::warn!(%error, "mock SCEF: group delivery notification refused");
            }
        });
    }
    let answer = NiddDownlinkDataTransfer {
        self_link: Some(location.clone()),
        ..request
    };
    json_response(
        StatusCode::CREATED,
        &with_group(&answer, Some(&group)),
        Some(&location),
    )
}

impl MockScef {
    /// Defines the members of External Group Identifier `external_group_id` (`local@domain`),
    /// as the HSS would know them, replacing any earlier definition. Only a defined group can
    /// have a NIDD configuration; membership is read whenever it matters (MO routing, MT to a
    /// member, a group message), so a change applies to existing group configurations at once.
    pub fn define_group(
        &self,
        external_group_id: &str,
        members: &[DeviceId],
    ) -> Result<(), MockError> {
        if !is_external_group_id(external_group_id) {
            return Err(MockError::InvalidGroupId(external_group_id.into()));
        }
        {
            let mut inner = self.state.inner();
            for ue in members {
                MockState::ue_channels(&mut inner, ue);
            }
            inner
                .groups
                .insert(external_group_id.to_string(), members.to_vec());
        }
        self.state.bump();
        Ok(())
    }

    /// The members of a group; `None` for a group the mock does not know.
    pub fn group_members(&self, external_group_id: &str) -> Option<Vec<DeviceId>> {
        self.state.inner().groups.get(external_group_id).cloned()
    }

    /// The configurations created for groups (with `externalGroupId`), as
    /// [`configurations`](Self::configurations) lists the per-UE ones.
    pub fn group_configurations(&self) -> Vec<MockGroupConfiguration> {
        self.state
            .inner()
            .group_configurations
            .values()
            .cloned()
            .collect()
    }

    /// Waits until `condition` holds over the group configurations, or the timeout passes.
    pub async fn wait_for_groups(
        &self,
        what: &'static str,
        timeout: Duration,
        condition: impl Fn(&[MockGroupConfiguration]) -> bool,
    ) -> Result<(), MockError> {
        let mut changes = self.state.changed.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if condition(&self.group_configurations()) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .map_err(|_| MockError::Timeout(what))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::test_receiver::{Receiver, STEP, Scs, start_mock};
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::{Value, json};

    const GROUP: &str = "meters-1@iot.example";

    fn ids() -> (DeviceId, DeviceId) {
        (
            "500000001@iot.example".parse().unwrap(),
            "491700000002".parse().unwrap(),
        )
    }

    /// A mock that knows GROUP = {external-id UE, MSISDN UE}, an AF stand-in, and the group's
    /// configuration created with its callbacks going to `/nidd`.
    async fn group_bed() -> (MockScef, Receiver, Scs, String) {
        let mock = start_mock(None).await;
        let (a, b) = ids();
        mock.define_group(GROUP, &[a, b]).unwrap();
        let af = Receiver::start().await;
        let scs = Scs::new(&mock);
        let (status, body, location) = scs
            .create(json!({"externalGroupId": GROUP, "notificationDestination": af.url("/nidd")}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (mock, af, scs, location.unwrap())
    }

    #[tokio::test]
    async fn a_group_configuration_is_created_listed_and_managed() {
        let (mock, af, scs, location) = group_bed().await;
        let (a, b) = ids();
        let groups = mock.group_configurations();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].external_group_id, GROUP);
        assert_eq!(groups[0].self_link, location);
        assert!(mock.configurations().is_empty(), "no per-UE configuration");
        assert_eq!(mock.configurations_created(), 1);

        // One ACTIVE notification per member, each naming its member and the group's link.
        let actives = af.wait_for("/nidd", 2).await;
        let mut named: Vec<Value> = actives
            .iter()
            .map(|n| {
                assert_eq!(n["status"], "ACTIVE");
                assert_eq!(n["niddConfiguration"], location.as_str());
                n.get("externalId").or(n.get("msisdn")).cloned().unwrap()
            })
            .collect();
        named.sort_by_key(Value::to_string);
        assert_eq!(named, [json!(b.to_string()), json!(a.to_string())]);

        let (status, list) = scs.get(&scs.collection()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(list[0]["externalGroupId"], GROUP);
        assert_eq!(list[0]["self"], location.as_str());
        let (status, one) = scs.get(&location).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(one["externalGroupId"], GROUP);
        assert!(one.get("externalId").is_none() && one.get("msisdn").is_none());

        let (status, patched) = scs
            .patch(
                &location,
                json!({"duration": "2099-01-01T00:00:00Z", "notificationDestination": af.url("/moved")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{patched}");
        assert_eq!(patched["externalGroupId"], GROUP);
        let group = &mock.group_configurations()[0];
        assert_eq!(group.notification_destination, af.url("/moved"));
        assert_eq!(group.duration.as_deref(), Some("2099-01-01T00:00:00Z"));

        // A group the SCEF does not know is refused; so is a malformed one.
        let (status, problem, _) = scs
            .create(json!({"externalGroupId": "nobody@iot.example", "notificationDestination": af.url("/nidd")}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
        assert_eq!(problem["status"], 403);
        let (status, _, _) = scs
            .create(
                json!({"externalGroupId": "no-domain", "notificationDestination": af.url("/nidd")}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(mock.define_group("a@b@c", &[]).is_err());

        assert_eq!(scs.delete(&location).await, StatusCode::NO_CONTENT);
        assert!(mock.group_configurations().is_empty());
        assert_eq!(scs.delete(&location).await, StatusCode::NOT_FOUND);
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_member_uplink_goes_to_the_group_configuration() {
        let (mock, af, scs, location) = group_bed().await;
        let (a, b) = ids();
        assert_eq!(
            mock.ue(&a).send_mo(b"from a").await.unwrap(),
            StatusCode::NO_CONTENT
        );
        mock.ue(&b).send_mo(b"from b").await.unwrap();
        let uplinks: Vec<Value> = af
            .wait_for_where("/nidd", 2, |n| n.get("data").is_some())
            .await;
        assert_eq!(uplinks[0]["niddConfiguration"], location.as_str());
        assert_eq!(uplinks[0]["externalId"], a.to_string());
        assert!(uplinks[0].get("msisdn").is_none());
        assert_eq!(uplinks[0]["data"], BASE64.encode(b"from a"));
        assert_eq!(uplinks[1]["niddConfiguration"], location.as_str());
        assert_eq!(uplinks[1]["msisdn"], b.to_string());
        assert!(uplinks[1].get("externalId").is_none());

        // A UE's own configuration comes first.
        let (status, own, own_location) = scs
            .create(json!({"externalId": a.to_string(), "notificationDestination": af.url("/own")}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{own}");
        mock.ue(&a).send_mo(b"own").await.unwrap();
        let mine = af
            .wait_for_where("/own", 1, |n| n.get("data").is_some())
            .await;
        assert_eq!(mine[0]["niddConfiguration"], own_location.unwrap().as_str());

        // Neither a member nor configured: nowhere to go.
        let stranger: DeviceId = "500000009@iot.example".parse().unwrap();
        assert!(matches!(
            mock.ue(&stranger).send_mo(b"?").await,
            Err(MockError::NotConfigured(_))
        ));
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn member_downlink_reaches_the_member_and_a_non_member_is_refused() {
        let (mock, af, scs, location) = group_bed().await;
        let (a, b) = ids();
        let (ue_a, ue_b) = (mock.ue(&a), mock.ue(&b));
        let (status, answer, created) = scs
            .downlink(
                &location,
                json!({"msisdn": b.to_string(), "data": BASE64.encode(b"for b")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["deliveryStatus"], "SUCCESS");
        assert!(created.is_none());
        assert_eq!(ue_b.recv_mt(STEP).await.unwrap(), b"for b");
        assert!(ue_a.mt_log().is_empty(), "only the member named gets it");

        let stranger: DeviceId = "500000009@iot.example".parse().unwrap();
        let (status, problem, _) = scs
            .downlink(
                &location,
                json!({"externalId": stranger.to_string(), "data": BASE64.encode(b"x")}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("not a member"),
            "{problem}"
        );
        assert!(mock.ue_control(&stranger).mt_log().is_empty());

        // A sleeping member: buffered, delivered on wake and reported by status notification.
        ue_a.sleep();
        let (status, answer, pending) = scs
            .downlink(
                &location,
                json!({"externalId": a.to_string(), "data": BASE64.encode(b"later")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        assert_eq!(answer["deliveryStatus"], "BUFFERING");
        let pending = pending.unwrap();
        ue_a.wake().await;
        assert_eq!(ue_a.recv_mt(STEP).await.unwrap(), b"later");
        let reports = af
            .wait_for_where("/nidd", 1, |n| n.get("deliveryStatus").is_some())
            .await;
        assert_eq!(reports[0]["niddDownlinkDataTransfer"], pending.as_str());
        assert_eq!(reports[0]["deliveryStatus"], "SUCCESS");
        assert_eq!(mock.violations(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_group_message_reaches_every_member_and_is_reported_by_gmd() {
        let (mock, af, scs, location) = group_bed().await;
        let (a, b) = ids();
        let (ue_a, ue_b) = (mock.ue(&a), mock.ue(&b));
        ue_b.sleep();
        let (status, answer, delivery) = scs
            .downlink(
                &location,
                json!({"externalGroupId": GROUP, "data": BASE64.encode(b"all")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        assert_eq!(answer["externalGroupId"], GROUP);
        let delivery = delivery.unwrap();
        assert_eq!(answer["self"], delivery.as_str());
        assert_eq!(ue_a.recv_mt(STEP).await.unwrap(), b"all");
        assert_eq!(ue_b.buffered(), 1);

        let gmd = af
            .wait_for_where("/nidd", 1, |n| n.get("gmdResults").is_some())
            .await;
        assert_eq!(gmd[0]["niddDownlinkDataTransfer"], delivery.as_str());
        assert_eq!(
            gmd[0]["gmdResults"],
            json!([
                {"externalId": a.to_string(), "deliveryStatus": "SUCCESS"},
                {"msisdn": b.to_string(), "deliveryStatus": "BUFFERING"},
            ])
        );

        // The sleeping member gets it on wake, and its result follows in a GMD of its own.
        ue_b.wake().await;
        assert_eq!(ue_b.recv_mt(STEP).await.unwrap(), b"all");
        let gmd = af
            .wait_for_where("/nidd", 2, |n| n.get("gmdResults").is_some())
            .await;
        assert_eq!(gmd[1]["niddDownlinkDataTransfer"], delivery.as_str());
        assert_eq!(
            gmd[1]["gmdResults"],
            json!([{"msisdn": b.to_string(), "deliveryStatus": "SUCCESS"}])
        );

        // A group message names the configuration's own group only.
        let (status, _, _) = scs
            .downlink(
                &location,
                json!({"externalGroupId": "other@iot.example", "data": BASE64.encode(b"x")}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, _) = scs
            .downlink(
                &location,
                json!({"externalGroupId": GROUP, "externalId": a.to_string(), "data": "eA=="}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // The last one breaks the schema's oneOf on purpose: only it is a violation.
        let violations = mock.violations();
        assert!(
            violations
                .iter()
                .all(|v| v.contains("downlink-data-deliveries request")),
            "{violations:?}"
        );
        if crate::schema::for_test("the group message checks").is_some() {
            assert!(!violations.is_empty(), "the mock validates MT bodies");
        }
    }

    #[tokio::test]
    async fn gmd_reporting_mode_reports_a_buffered_member_delivery_by_gmd() {
        let (mock, af, scs, location) = group_bed().await;
        let (_, b) = ids();
        let ue_b = mock.ue(&b);
        mock.faults().set_gmd_member_reports(true);
        ue_b.sleep();
        let (status, answer, pending) = scs
            .downlink(
                &location,
                json!({"msisdn": b.to_string(), "data": BASE64.encode(b"metered")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
        assert_eq!(answer["deliveryStatus"], "BUFFERING");
        let pending = pending.unwrap();
        ue_b.wake().await;
        assert_eq!(ue_b.recv_mt(STEP).await.unwrap(), b"metered");
        let gmd = af
            .wait_for_where("/nidd", 1, |n| n.get("gmdResults").is_some())
            .await;
        assert_eq!(
            gmd[0],
            json!({
                "niddDownlinkDataTransfer": pending,
                "gmdResults": [{"msisdn": b.to_string(), "deliveryStatus": "SUCCESS"}],
            })
        );
        assert!(
            af.received("/nidd")
                .iter()
                .all(|n| n.get("deliveryStatus").is_none()),
            "no delivery-status notification in GMD reporting mode"
        );
        assert_eq!(mock.violations(), Vec::<String>::new());
    }
}
