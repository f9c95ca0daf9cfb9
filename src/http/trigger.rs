//! The NEF's NIDD Configuration Trigger (TS 29.522) on the callback listener: the NEF asks the
//! bridge, as the AF, to create a NIDD configuration for a UE that has none. One capability URL
//! per bridge (`/t8/v1/nidd-configuration-trigger/{token}`, the token made once and kept in the
//! store); the UE named by `gpsi` is created under the `[onboarding]` policy and provisioned in
//! the background, and the answer is `NiddConfigurationTriggerReply`.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::fleet::{Fleet, FleetError, Onboarded};
use crate::http::Lifecycle;
use crate::http::callback::{CallbackError, json_of, read_body};
use crate::http::problem::problem_response;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::onboarding::{OnboardingRefusal, device_of_gpsi};
use crate::provision::Reprovision;
use crate::t8::{NiddConfigurationTrigger, NiddConfigurationTriggerReply};

/// The path of the trigger endpoint below the callback listener's root, without its token.
pub(crate) const TRIGGER_PATH: &str = "/t8/v1/nidd-configuration-trigger";

/// The URL the NEF is given as this bridge's NIDD Configuration Trigger API root.
pub(crate) fn trigger_url(public_url: &url::Url, token: &str) -> String {
    format!(
        "{}{}/{token}",
        public_url.as_str().trim_end_matches('/'),
        TRIGGER_PATH
    )
}

/// The features of TS 29.522's NIDD Configuration Trigger API the bridge supports: none.
const SUPPORTED_FEATURES: &str = "0";

/// What the trigger endpoint needs of the rest of the bridge.
#[derive(Clone)]
pub(crate) struct TriggerState {
    /// `None`: `onboarding.trigger` is off and the endpoint answers 404.
    pub(crate) token: Option<Arc<str>>,
    /// The `afId` a trigger must name.
    pub(crate) af_id: Arc<str>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) reprovision: Reprovision,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) max_body_bytes: usize,
}

/// Why a trigger was refused; each maps to one status and one `cause`.
#[derive(Debug, thiserror::Error)]
enum TriggerError {
    #[error("no NIDD Configuration Trigger endpoint has this URL")]
    UnknownUrl,
    /// Refused as a notification body would be (shutting down, media type, size, not JSON).
    #[error(transparent)]
    Body(#[from] CallbackError),
    #[error("body is not a NiddConfigurationTrigger: {0}")]
    InvalidTrigger(String),
    #[error("afId {named:?} does not name this bridge")]
    ForeignAf { named: String },
    #[error("{0}")]
    InvalidGpsi(String),
    #[error(transparent)]
    Refused(OnboardingRefusal),
    #[error("no UDP address is free for a new device ([sockets] ports)")]
    PoolExhausted,
    #[error("device {0} is still being removed")]
    BeingRemoved(DeviceId),
    #[error("the device cannot be created now: {0}")]
    Failed(String),
}

impl TriggerError {
    fn status_and_cause(&self) -> (StatusCode, &'static str) {
        match self {
            Self::UnknownUrl => (StatusCode::NOT_FOUND, "UNKNOWN_CALLBACK"),
            Self::Body(error) => error.status_and_cause(),
            Self::InvalidTrigger(_) => (StatusCode::BAD_REQUEST, "INVALID_TRIGGER"),
            Self::ForeignAf { .. } => (StatusCode::FORBIDDEN, "FOREIGN_AF"),
            Self::InvalidGpsi(_) => (StatusCode::BAD_REQUEST, "INVALID_GPSI"),
            Self::Refused(OnboardingRefusal::NotAllowed(_)) => {
                (StatusCode::FORBIDDEN, "ONBOARDING_NOT_ALLOWED")
            }
            Self::Refused(OnboardingRefusal::Limit { .. }) => {
                (StatusCode::FORBIDDEN, "ONBOARDING_LIMIT")
            }
            Self::PoolExhausted => (StatusCode::SERVICE_UNAVAILABLE, "SOCKET_POOL_EXHAUSTED"),
            Self::BeingRemoved(_) => (StatusCode::SERVICE_UNAVAILABLE, "DEVICE_BEING_REMOVED"),
            Self::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "ONBOARDING_FAILED"),
        }
    }
}

impl From<FleetError> for TriggerError {
    fn from(error: FleetError) -> Self {
        match error {
            FleetError::NotOnboarded(refusal) => Self::Refused(refusal),
            FleetError::PoolExhausted { .. } => Self::PoolExhausted,
            FleetError::BeingRemoved { id, .. } => Self::BeingRemoved(id),
            other => Self::Failed(other.to_string()),
        }
    }
}

/// `POST /t8/v1/nidd-configuration-trigger/{token}` (and the same with a trailing `/`: the
/// URL is the API root the NEF was given, and the API's one resource is `/` below it).
pub(crate) async fn configuration_trigger(
    State(shared): State<TriggerState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match path {
        Ok(Path(token)) => handle(&shared, &token, &headers, body).await,
        Err(_) => Err(TriggerError::UnknownUrl),
    };
    let outcome = match &result {
        Ok(outcome) => *outcome,
        Err(error) => outcome_label(error),
    };
    shared
        .metrics
        .onboarding_requests
        .with_label_values(&["trigger", outcome])
        .inc();
    match result {
        Ok(_) => Json(NiddConfigurationTriggerReply {
            supp_feat: SUPPORTED_FEATURES.into(),
        })
        .into_response(),
        Err(error) => {
            let (status, cause) = error.status_and_cause();
            if status == StatusCode::FORBIDDEN || status.is_server_error() {
                tracing::warn!(%error, "NIDD Configuration Trigger refused");
            }
            problem_response(status, cause, error.to_string())
        }
    }
}

fn outcome_label(error: &TriggerError) -> &'static str {
    match error {
        TriggerError::UnknownUrl => "unknown_url",
        TriggerError::Body(CallbackError::ShuttingDown) => "shutting_down",
        TriggerError::Body(_) | TriggerError::InvalidTrigger(_) | TriggerError::InvalidGpsi(_) => {
            "invalid"
        }
        TriggerError::ForeignAf { .. } => "foreign_af",
        TriggerError::Refused(OnboardingRefusal::NotAllowed(_)) => "not_allowed",
        TriggerError::Refused(OnboardingRefusal::Limit { .. }) => "limit",
        TriggerError::PoolExhausted => "pool_exhausted",
        TriggerError::BeingRemoved(_) | TriggerError::Failed(_) => "failed",
    }
}

async fn handle(
    shared: &TriggerState,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<&'static str, TriggerError> {
    let Some(expected) = &shared.token else {
        return Err(TriggerError::UnknownUrl);
    };
    if !bool::from(token.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(TriggerError::UnknownUrl);
    }
    let bytes = read_body(&shared.lifecycle, shared.max_body_bytes, headers, body).await?;
    let trigger = parse_trigger(&bytes)?;
    if trigger.af_id != *shared.af_id {
        return Err(TriggerError::ForeignAf {
            named: trigger.af_id,
        });
    }
    let id = device_of_gpsi(&trigger.gpsi).map_err(TriggerError::InvalidGpsi)?;
    match shared.fleet.onboard(&id).await? {
        Onboarded::Created(device) => {
            tracing::info!(device = %device.id, nef = %trigger.nef_id, "device created on the NEF's NIDD Configuration Trigger");
            Ok("created")
        }
        Onboarded::Existing(device) => {
            // The NEF says the UE has no configuration: if the bridge holds one, it is
            // checked with the SCEF (and created again if it is gone); one being created
            // already needs nothing more.
            let location = device.state().nidd.as_ref().map(|n| n.location.clone());
            if let Some(location) = location {
                tracing::info!(device = %device.id, %location, "NIDD Configuration Trigger for a device with a configuration; checking it with the SCEF");
                shared.reprovision.termination_reported(device, location);
            }
            Ok("existing")
        }
    }
}

/// The trigger body, every field TS 29.522 requires present and well formed.
fn parse_trigger(bytes: &[u8]) -> Result<NiddConfigurationTrigger, TriggerError> {
    let value = json_of(bytes)?;
    let trigger: NiddConfigurationTrigger =
        serde_json::from_value(value).map_err(|e| TriggerError::InvalidTrigger(e.to_string()))?;
    if !trigger.supp_feat.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TriggerError::InvalidTrigger(format!(
            "suppFeat: {:?} is not hexadecimal",
            trigger.supp_feat
        )));
    }
    Ok(trigger)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::fleet::Source;
    use crate::http::test_support::{Harness, TRIGGER_TOKEN, assert_problem, read};

    use super::*;

    fn trigger(gpsi: &str) -> String {
        json!({"afId": "bridge-1", "nefId": "nef-1", "gpsi": gpsi, "suppFeat": "0"}).to_string()
    }

    async fn send(harness: &Harness, body: String) -> Response {
        harness
            .notify(&format!("{TRIGGER_PATH}/{TRIGGER_TOKEN}"), body)
            .await
    }

    fn outcomes(harness: &Harness, outcome: &str) -> u64 {
        harness
            .metrics
            .onboarding_requests
            .with_label_values(&["trigger", outcome])
            .get()
    }

    #[tokio::test]
    async fn a_trigger_creates_the_device_once_and_keeps_it() {
        let harness = Harness::new().await;
        let (status, _, body) =
            read(send(&harness, trigger("extid-meter-1@Fleet.example")).await).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({"suppFeat": "0"}));
        let device = harness.device("meter-1@fleet.example");
        assert_eq!(Source::of(&device), Source::Onboarded);
        let record = harness.devices.store().device(&device.id).unwrap().unwrap();
        assert!(record.onboarded, "kept as created on demand");
        assert_eq!(
            record.settings.unwrap().external_id.as_deref(),
            Some("meter-1@fleet.example")
        );

        // The same UE again, and the trailing-slash form of the URL: nothing new.
        let again = harness
            .notify(
                &format!("{TRIGGER_PATH}/{TRIGGER_TOKEN}/"),
                trigger("extid-meter-1@fleet.example"),
            )
            .await;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(harness.devices.len(), 3);
        assert_eq!(outcomes(&harness, "created"), 1);
        assert_eq!(outcomes(&harness, "existing"), 1);
        let counts = harness.fleet().counts();
        assert_eq!(
            (counts.onboarded, counts.from_api, counts.from_file),
            (1, 0, 2)
        );
    }

    #[tokio::test]
    async fn triggers_outside_the_policy_or_the_url_are_refused() {
        let harness = Harness::new().await;
        let cases = [
            (trigger("extid-meter-1@other.example"), StatusCode::FORBIDDEN, "ONBOARDING_NOT_ALLOWED"),
            (trigger("msisdn-491711234567"), StatusCode::FORBIDDEN, "ONBOARDING_NOT_ALLOWED"),
            (trigger("imsi-001010000000001"), StatusCode::BAD_REQUEST, "INVALID_GPSI"),
            (
                json!({"afId": "someone-else", "nefId": "n", "gpsi": "msisdn-491501234567", "suppFeat": "0"}).to_string(),
                StatusCode::FORBIDDEN,
                "FOREIGN_AF",
            ),
            (json!({"afId": "bridge-1"}).to_string(), StatusCode::BAD_REQUEST, "INVALID_TRIGGER"),
            ("not json".to_string(), StatusCode::BAD_REQUEST, "MALFORMED_JSON"),
        ];
        for (body, status, cause) in cases {
            assert_problem(send(&harness, body).await, status, cause).await;
        }
        assert_problem(
            harness
                .notify(
                    &format!("{TRIGGER_PATH}/{}", "f".repeat(32)),
                    trigger("msisdn-491501234567"),
                )
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_CALLBACK",
        )
        .await;
        assert_problem(
            harness
                .post(
                    &format!("{TRIGGER_PATH}/{TRIGGER_TOKEN}"),
                    Some("text/plain"),
                    trigger("msisdn-491501234567"),
                )
                .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        )
        .await;
        assert_eq!(harness.devices.len(), 2, "nobody was created");
        assert_eq!(outcomes(&harness, "not_allowed"), 2);
        assert_eq!(outcomes(&harness, "invalid"), 4);
        assert_eq!(outcomes(&harness, "foreign_af"), 1);
        assert_eq!(outcomes(&harness, "unknown_url"), 1);
    }

    #[tokio::test]
    async fn no_more_than_max_devices_are_created_on_demand() {
        let harness = Harness::new().await;
        // The harness allows 3.
        for n in 1..=3 {
            let response = send(&harness, trigger(&format!("msisdn-4915000000{n}"))).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
        assert_problem(
            send(&harness, trigger("msisdn-49150000009")).await,
            StatusCode::FORBIDDEN,
            "ONBOARDING_LIMIT",
        )
        .await;
        // One removed makes room for one more.
        harness
            .fleet()
            .remove(&"49150000001".parse().unwrap())
            .await
            .unwrap();
        let response = send(&harness, trigger("msisdn-49150000009")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(harness.fleet().counts().onboarded, 3);
    }

    #[test]
    fn a_trigger_needs_every_field_and_hex_features() {
        let good =
            json!({"afId": "af", "nefId": "nef", "gpsi": "msisdn-491501234567", "suppFeat": "0"});
        assert!(parse_trigger(good.to_string().as_bytes()).is_ok());
        for field in ["afId", "nefId", "gpsi", "suppFeat"] {
            let mut body = good.clone();
            body.as_object_mut().unwrap().remove(field);
            let error = parse_trigger(body.to_string().as_bytes()).unwrap_err();
            assert!(
                matches!(&error, TriggerError::InvalidTrigger(detail) if detail.contains(field)),
                "{field}: {error}"
            );
        }
        let mut body = good.clone();
        body["suppFeat"] = json!("0x1");
        assert!(matches!(
            parse_trigger(body.to_string().as_bytes()),
            Err(TriggerError::InvalidTrigger(detail)) if detail.contains("suppFeat")
        ));
        assert!(matches!(
            parse_trigger(b"{"),
            Err(TriggerError::Body(CallbackError::MalformedJson(_)))
        ));
    }
}
