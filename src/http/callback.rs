//! The T8 notification endpoint the SCEF calls: one capability URL per NIDD configuration
//! (`/t8/v1/nidd/{token}`), bodies dispatched on their distinguishing field, uplink datagrams
//! handed to the MO path, and every refusal answered as RFC 7807 `application/problem+json`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::clock;
use crate::delivery::instant_of;
use crate::devices::{Device, DeviceTable, NiddState, WakeSource};
use crate::http::Lifecycle;
use crate::http::problem::problem_response;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mo::{UplinkError, UplinkRefusal, Uplinks};
use crate::mt::Downlinks;
use crate::provision::{Reprovision, status_label};
use crate::t8::{
    DeliveryResult, DeviceTriggeringDeliveryReportNotification, ExternalIdOrMsisdn,
    MonitoringNotification, MonitoringType, NiddNotification, NiddStatus,
};

/// What the callback server needs of the rest of the bridge.
#[derive(Clone)]
pub(crate) struct CallbackState {
    pub(crate) devices: Arc<DeviceTable>,
    pub(crate) uplinks: Uplinks,
    pub(crate) downlinks: Arc<Downlinks>,
    pub(crate) reprovision: Reprovision,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body_bytes: usize,
    pub(crate) lifecycle: Lifecycle,
}

/// Why a notification was refused. Each maps to one HTTP status and one `cause`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallbackError {
    #[error("no NIDD configuration has this callback URL")]
    UnknownCallback,
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("body is not JSON: {0}")]
    MalformedJson(String),
    #[error("body is not a valid NIDD notification: {0}")]
    InvalidNotification(String),
    #[error("data is not valid base64: {0}")]
    BadBase64(String),
    #[error("the notification names {named}, which does not belong to this NIDD configuration")]
    DeviceNotInConfiguration { named: String },
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("the bridge is shutting down")]
    ShuttingDown,
}

impl CallbackError {
    fn status_and_cause(&self) -> (StatusCode, &'static str) {
        match self {
            Self::UnknownCallback => (StatusCode::NOT_FOUND, "UNKNOWN_CALLBACK"),
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "BODY_TOO_LARGE"),
            Self::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE")
            }
            Self::MalformedJson(_) => (StatusCode::BAD_REQUEST, "MALFORMED_JSON"),
            Self::InvalidNotification(_) => (StatusCode::BAD_REQUEST, "INVALID_NOTIFICATION"),
            Self::BadBase64(_) => (StatusCode::BAD_REQUEST, "BAD_BASE64"),
            Self::DeviceNotInConfiguration { .. } => {
                (StatusCode::FORBIDDEN, "DEVICE_NOT_IN_CONFIGURATION")
            }
            Self::Uplink(UplinkError::Refused(refusal)) => match refusal {
                UplinkRefusal::NotThisDevice { .. } => {
                    (StatusCode::FORBIDDEN, "DEVICE_NOT_IN_CONFIGURATION")
                }
                UplinkRefusal::TooLarge { .. } => {
                    (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE")
                }
                UplinkRefusal::NotCoap(_) => (StatusCode::BAD_REQUEST, "NOT_COAP"),
                UplinkRefusal::EndpointMismatch(_) => (StatusCode::FORBIDDEN, "ENDPOINT_MISMATCH"),
            },
            Self::Uplink(UplinkError::Send(_)) => (StatusCode::BAD_GATEWAY, "FORWARD_FAILED"),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN"),
        }
    }

    /// The metric outcome label.
    pub(crate) fn outcome(&self) -> String {
        self.status_and_cause().1.to_ascii_lowercase()
    }
}

impl IntoResponse for CallbackError {
    fn into_response(self) -> Response {
        let (status, cause) = self.status_and_cause();
        problem_response(status, cause, self.to_string())
    }
}

pub(crate) fn router(state: CallbackState) -> Router {
    Router::new()
        .route("/t8/v1/nidd/{token}", post(nidd_notification))
        .route("/t8/v1/monitoring/{token}", post(monitoring_notification))
        .route("/t8/v1/triggering/{token}", post(triggering_notification))
        .fallback(|| async {
            problem_response(
                StatusCode::NOT_FOUND,
                "UNKNOWN_CALLBACK",
                "no such callback".into(),
            )
        })
        .with_state(state)
}

async fn nidd_notification(
    State(shared): State<CallbackState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut kind = "unknown";
    let result = handle(&shared, &token, &headers, body, &mut kind).await;
    answer(&shared, kind, result)
}

/// Checks shared by every notification endpoint: the token names a device, the body is JSON
/// within the size limit.
async fn read_notification(
    shared: &CallbackState,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Device>, serde_json::Value), CallbackError> {
    if shared.lifecycle.is_shutting_down() {
        return Err(CallbackError::ShuttingDown);
    }
    let device = shared
        .devices
        .by_token(token)
        .cloned()
        .ok_or(CallbackError::UnknownCallback)?;
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let content_type = content_type
            .to_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !(content_type.starts_with("application/json") || content_type.contains("+json")) {
            return Err(CallbackError::UnsupportedMediaType);
        }
    }
    let limit = shared.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| CallbackError::BodyTooLarge { limit })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CallbackError::MalformedJson(e.to_string()))?;
    Ok((device, json))
}

async fn handle(
    shared: &CallbackState,
    token: &str,
    headers: &HeaderMap,
    body: Body,
    kind: &mut &'static str,
) -> Result<(), CallbackError> {
    let (device, json) = read_notification(shared, token, headers, body).await?;
    let notification = NiddNotification::from_json(json)
        .map_err(|e| CallbackError::InvalidNotification(e.to_string()))?;
    *kind = notification.kind();
    match notification {
        NiddNotification::Uplink(uplink) => {
            let named = named_device(&uplink)?;
            let datagram = BASE64
                .decode(uplink.data.trim())
                .map_err(|e| CallbackError::BadBase64(e.to_string()))?;
            shared
                .uplinks
                .forward(&device, &named, &datagram, clock::now())
                .await?;
        }
        NiddNotification::ConfigurationStatus(notification) => {
            check_identity(&device, &notification)?;
            configuration_status(
                shared,
                &device,
                &notification.nidd_configuration,
                notification.status,
            );
        }
        NiddNotification::DeliveryStatus(notification) => {
            shared
                .metrics
                .mt_deliveries
                .with_label_values(&[notification.delivery_status.label()])
                .inc();
            tracing::debug!(device = %device.id, delivery = %notification.nidd_downlink_data_transfer, status = %notification.delivery_status, "MT delivery status");
            let now = clock::now();
            let retry_at = instant_of(
                notification.requested_retransmission_time.as_deref(),
                now,
                clock::system_now(),
            );
            shared.downlinks.settle(
                &device,
                &notification.nidd_downlink_data_transfer,
                &notification.delivery_status,
                retry_at,
                now,
            );
        }
        NiddNotification::GroupDelivery(notification) => {
            for result in &notification.gmd_results {
                shared
                    .metrics
                    .mt_deliveries
                    .with_label_values(&[result.delivery_status.label()])
                    .inc();
            }
        }
        NiddNotification::ManagePort(_) | NiddNotification::Test(_) => {}
    }
    Ok(())
}

/// The device a notification names: exactly one of `externalId` and `msisdn`.
fn named_device(notification: &impl ExternalIdOrMsisdn) -> Result<DeviceId, CallbackError> {
    match (notification.external_id(), notification.msisdn()) {
        (Some(ext), None) => Ok(DeviceId::External(ext.clone())),
        (None, Some(msisdn)) => Ok(DeviceId::Msisdn(msisdn.clone())),
        _ => Err(CallbackError::InvalidNotification(
            "exactly one of externalId and msisdn is required".into(),
        )),
    }
}

/// The notification must name the device whose configuration this callback URL belongs to.
fn check_identity(
    device: &Device,
    notification: &impl ExternalIdOrMsisdn,
) -> Result<(), CallbackError> {
    let named = named_device(notification)?;
    if named != device.id {
        return Err(CallbackError::DeviceNotInConfiguration {
            named: named.to_string(),
        });
    }
    Ok(())
}

/// What a configuration status notification does to the device's configuration.
#[derive(Debug, Clone, PartialEq)]
enum StatusChange {
    /// Nothing known to update (no configuration, and the link is not a URL).
    Ignore,
    /// The SCEF ended the configuration: forget it and create a new one.
    Terminated,
    /// Keep the configuration with the new status.
    Update(NiddState),
}

/// Decides what a status notification for `link` does, given the configuration held now.
fn status_change(current: Option<&NiddState>, link: &str, status: NiddStatus) -> StatusChange {
    let location = match (current, url::Url::parse(link)) {
        (Some(current), _) => current.location.clone(),
        (None, Ok(location)) => location,
        (None, Err(_)) => return StatusChange::Ignore,
    };
    if status.is_terminated() {
        return StatusChange::Terminated;
    }
    StatusChange::Update(NiddState {
        location,
        status: Some(status),
        maximum_packet_size_bits: current.and_then(|c| c.maximum_packet_size_bits),
        notification_destination: current.and_then(|c| c.notification_destination.clone()),
        monitoring_subscription: current.and_then(|c| c.monitoring_subscription.clone()),
    })
}

fn configuration_status(shared: &CallbackState, device: &Device, link: &str, status: NiddStatus) {
    shared
        .metrics
        .configuration_statuses
        .with_label_values(&[status_label(&status)])
        .inc();
    let current = device.state().nidd.clone();
    match status_change(current.as_ref(), link, status) {
        StatusChange::Ignore => {}
        StatusChange::Terminated => {
            tracing::warn!(device = %device.id, "the SCEF terminated the NIDD configuration; creating a new one");
            shared.reprovision.configuration_terminated(device);
        }
        StatusChange::Update(nidd) => {
            tracing::info!(device = %device.id, status = ?nidd.status, "NIDD configuration status");
            shared.devices.update_nidd(device, Some(nidd));
        }
    }
}

/// Counts a notification's outcome and turns it into the HTTP answer.
fn answer(shared: &CallbackState, kind: &str, result: Result<(), CallbackError>) -> Response {
    let outcome = match &result {
        Ok(()) => "accepted".to_string(),
        Err(error) => error.outcome(),
    };
    shared
        .metrics
        .callbacks
        .with_label_values(&[kind, &outcome])
        .inc();
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            tracing::debug!(%error, kind, "notification refused");
            error.into_response()
        }
    }
}

/// MonitoringEvent notifications: reachability reports wake the device's MT queue.
async fn monitoring_notification(
    State(shared): State<CallbackState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (device, json) = read_notification(&shared, &token, &headers, body).await?;
        let notification: MonitoringNotification =
            serde_json::from_value(json).map_err(|e| CallbackError::InvalidNotification(e.to_string()))?;
        for report in &notification.monitoring_event_reports {
            if report.external_id().is_some() || report.msisdn().is_some() {
                check_identity(&device, report)?;
            }
        }
        let now = clock::now();
        for report in notification.monitoring_event_reports {
            match report.monitoring_type {
                MonitoringType::UeReachability | MonitoringType::AvailabilityAfterDdnFailure => {
                    let until = instant_of(
                        report.max_ue_availability_time.as_deref(),
                        now,
                        clock::system_now(),
                    );
                    let source = WakeSource::Report(until);
                    device.woke(now, source);
                    shared.metrics.reachability_events.with_label_values(&[source.label()]).inc();
                }
                MonitoringType::LossOfConnectivity => {
                    device.state().mt.reachability.on_loss_of_connectivity(now);
                    shared.metrics.reachability_events.with_label_values(&["loss_of_connectivity"]).inc();
                    tracing::info!(device = %device.id, "network reports loss of connectivity");
                }
                MonitoringType::Other(other) => {
                    tracing::debug!(device = %device.id, monitoring_type = %other, "monitoring report ignored");
                }
            }
        }
        if notification.cancel_ind == Some(true) {
            tracing::warn!(device = %device.id, "the SCEF cancelled the monitoring subscription; subscribing again");
            shared.reprovision.subscription_ended(&device);
        }
        Ok(())
    }
    .await;
    answer(&shared, "monitoring", result)
}

/// DeviceTriggering delivery reports.
async fn triggering_notification(
    State(shared): State<CallbackState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (device, json) = read_notification(&shared, &token, &headers, body).await?;
        let report: DeviceTriggeringDeliveryReportNotification =
            serde_json::from_value(json).map_err(|e| CallbackError::InvalidNotification(e.to_string()))?;
        let label = match &report.result {
            DeliveryResult::Other(_) => "report_other".to_string(),
            known => format!("report_{}", known.as_str().to_ascii_lowercase()),
        };
        shared.metrics.device_triggers.with_label_values(&[&label]).inc();
        tracing::info!(device = %device.id, result = %report.result, "device trigger delivery report");
        Ok(())
    }
    .await;
    answer(&shared, "trigger_report", result)
}
