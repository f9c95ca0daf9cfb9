//! The T8 notification endpoint the SCEF calls: one capability URL per NIDD configuration
//! (`/t8/v1/nidd/{token}`), bodies dispatched on their distinguishing field, uplink datagrams
//! handed to the MO path, and every refusal answered as RFC 7807 `application/problem+json`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::bridge::{Device, NiddState, Shared, UplinkError};
use crate::device::DeviceId;
use crate::provision::status_label;
use std::time::Instant;

use crate::delivery::{QueueEffect, instant_of};
use crate::t8::{
    DeliveryResult, DeviceTriggeringDeliveryReportNotification, ExternalIdOrMsisdn,
    MonitoringNotification, MonitoringType, NiddNotification, ProblemDetails,
};

/// Why a notification was refused. Each maps to one HTTP status and one `cause`.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
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
    #[error("datagram of {bytes} bytes exceeds the maximum packet size of {limit} bytes")]
    PayloadTooLarge { bytes: usize, limit: usize },
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
            Self::PayloadTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            Self::DeviceNotInConfiguration { .. } => {
                (StatusCode::FORBIDDEN, "DEVICE_NOT_IN_CONFIGURATION")
            }
            Self::Uplink(UplinkError::NotCoap(_)) => (StatusCode::BAD_REQUEST, "NOT_COAP"),
            Self::Uplink(UplinkError::EndpointMismatch(_)) => {
                (StatusCode::FORBIDDEN, "ENDPOINT_MISMATCH")
            }
            Self::Uplink(UplinkError::Send(_)) => (StatusCode::BAD_GATEWAY, "FORWARD_FAILED"),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN"),
        }
    }

    /// The metric outcome label.
    pub fn outcome(&self) -> String {
        self.status_and_cause().1.to_ascii_lowercase()
    }
}

/// An RFC 7807 answer.
pub fn problem_response(status: StatusCode, cause: &str, detail: String) -> Response {
    let body = ProblemDetails {
        problem_type: Some("about:blank".into()),
        title: status.canonical_reason().map(str::to_string),
        status: Some(status.as_u16()),
        detail: Some(detail),
        cause: Some(cause.to_string()),
        ..Default::default()
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        json,
    )
        .into_response()
}

impl IntoResponse for CallbackError {
    fn into_response(self) -> Response {
        let (status, cause) = self.status_and_cause();
        problem_response(status, cause, self.to_string())
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
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
        .with_state(shared)
}

async fn nidd_notification(
    State(shared): State<Arc<Shared>>,
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
    shared: &Shared,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Device>, serde_json::Value), CallbackError> {
    if shared.shutting_down.load(Ordering::Relaxed) {
        return Err(CallbackError::ShuttingDown);
    }
    let device = shared
        .by_token
        .get(token)
        .map(|i| shared.devices[*i].clone())
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
    let limit = shared.config.callback.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| CallbackError::BodyTooLarge { limit })?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| CallbackError::MalformedJson(e.to_string()))?;
    Ok((device, json))
}

async fn handle(
    shared: &Arc<Shared>,
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
            check_identity(&device, &uplink)?;
            let datagram = BASE64
                .decode(uplink.data.trim())
                .map_err(|e| CallbackError::BadBase64(e.to_string()))?;
            let limit = device.max_packet_bytes(shared.config.nidd.max_packet_bytes);
            if datagram.len() > limit {
                shared.metrics.drop_datagram("mo", "oversized");
                return Err(CallbackError::PayloadTooLarge {
                    bytes: datagram.len(),
                    limit,
                });
            }
            shared.forward_uplink(&device, &datagram).await?;
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
            let now = Instant::now();
            let retry_at = instant_of(notification.requested_retransmission_time.as_deref(), now);
            let effect = {
                let mut state = device.state();
                let effect = state.mt.on_delivery_status(
                    &notification.nidd_downlink_data_transfer,
                    &notification.delivery_status,
                    retry_at,
                    now,
                );
                shared.apply_queue_effect(&device, &effect);
                effect
            };
            if effect != QueueEffect::Keep {
                device.wake.notify_one();
            }
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

/// The notification must name the device whose configuration this callback URL belongs to.
fn check_identity(
    device: &Device,
    notification: &impl ExternalIdOrMsisdn,
) -> Result<(), CallbackError> {
    let named = match (notification.external_id(), notification.msisdn()) {
        (Some(ext), None) => DeviceId::External(ext.clone()),
        (None, Some(msisdn)) => DeviceId::Msisdn(msisdn.clone()),
        _ => {
            return Err(CallbackError::InvalidNotification(
                "exactly one of externalId and msisdn is required".into(),
            ));
        }
    };
    if named != device.id {
        return Err(CallbackError::DeviceNotInConfiguration {
            named: named.to_string(),
        });
    }
    Ok(())
}

fn configuration_status(
    shared: &Arc<Shared>,
    device: &Device,
    link: &str,
    status: crate::t8::NiddStatus,
) {
    shared
        .metrics
        .configuration_statuses
        .with_label_values(&[status_label(&status)])
        .inc();
    let current = device.state().nidd.clone();
    let location = match (&current, url::Url::parse(link)) {
        (Some(current), _) => current.location.clone(),
        (None, Ok(location)) => location,
        (None, Err(_)) => return,
    };
    if status.is_terminated() {
        tracing::warn!(device = %device.id, %status, "the SCEF terminated the NIDD configuration; creating a new one");
        // The new configuration gets a new subscription; the old one is deleted, not leaked.
        let old = current
            .as_ref()
            .and_then(|c| c.monitoring_subscription.as_ref());
        if let Some(old) = old.and_then(|s| url::Url::parse(&s.location).ok()) {
            let shared = shared.clone();
            let id = device.id.clone();
            tokio::spawn(async move {
                if let Err(error) = shared.t8.delete_monitoring_subscription(&old).await {
                    tracing::warn!(device = %id, %error, "cannot delete the monitoring subscription of a terminated configuration");
                }
            });
        }
        if let Err(error) = shared.set_nidd(device, None) {
            tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
        }
        shared.reprovision.notify_one();
        return;
    }
    tracing::info!(device = %device.id, %status, "NIDD configuration status");
    let nidd = NiddState {
        location,
        status: Some(status),
        maximum_packet_size_bits: current.as_ref().and_then(|c| c.maximum_packet_size_bits),
        notification_destination: current
            .as_ref()
            .and_then(|c| c.notification_destination.clone()),
        monitoring_subscription: current.and_then(|c| c.monitoring_subscription),
    };
    if let Err(error) = shared.set_nidd(device, Some(nidd)) {
        tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
    }
}

/// Counts a notification's outcome and turns it into the HTTP answer.
fn answer(shared: &Shared, kind: &str, result: Result<(), CallbackError>) -> Response {
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
    State(shared): State<Arc<Shared>>,
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
        let now = Instant::now();
        for report in notification.monitoring_event_reports {
            match report.monitoring_type {
                MonitoringType::UeReachability | MonitoringType::AvailabilityAfterDdnFailure => {
                    let until = instant_of(report.max_ue_availability_time.as_deref(), now);
                    shared.device_woke(&device, until, "report");
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
            shared.forget_subscription(&device);
        }
        Ok(())
    }
    .await;
    answer(&shared, "monitoring", result)
}

/// DeviceTriggering delivery reports.
async fn triggering_notification(
    State(shared): State<Arc<Shared>>,
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
