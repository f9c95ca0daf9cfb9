//! The T8 notification endpoint the SCEF calls: one capability URL per NIDD configuration
//! (`/t8/v1/nidd/{token}`), bodies dispatched on their distinguishing field, uplink datagrams
//! handed to the MO path, and every refusal answered as RFC 7807 `application/problem+json`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::clock;
use crate::delivery::instant_of;
use crate::devices::groups::{Group, GroupTable};
use crate::devices::{Device, DeviceTable, NiddState, WakeSource};
use crate::fleet::{Fleet, FleetError, Onboarded};
use crate::http::Lifecycle;
use crate::http::problem::{method_not_allowed, problem_response};
use crate::http::trigger::{TRIGGER_PATH, TriggerState, configuration_trigger};
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mo::{Forwarded, UplinkError, UplinkRefusal, Uplinks};
use crate::mt::Downlinks;
use crate::onboarding::OnboardingRefusal;
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
    /// The NEF's NIDD Configuration Trigger endpoint, served beside the notifications.
    pub(crate) trigger: TriggerState,
    /// Groups, whose configurations' callback URLs carry their members' uplinks.
    pub(crate) groups: Arc<GroupTable>,
    /// Creates a group's member on its first uplink.
    pub(crate) fleet: Arc<Fleet>,
}

/// Why a notification was refused. Each maps to one HTTP status and one `cause`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallbackError {
    #[error("no NIDD configuration has this callback URL")]
    UnknownCallback,
    /// The token segment cannot be read (e.g. percent-encoded bytes that are not UTF-8).
    #[error("the callback URL cannot be read: {0}")]
    BadPath(String),
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
    #[error("the notification names configuration {named}, which is not this device's")]
    ForeignConfiguration { named: String },
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("the bridge is shutting down")]
    ShuttingDown,
    /// A group member the `[onboarding]` policy does not let the bridge create.
    #[error("{0}")]
    MemberNotOnboarded(OnboardingRefusal),
    /// A group member that cannot be created now (no UDP address free, store refused).
    #[error("the group member cannot be created now: {0}")]
    MemberUnavailable(String),
}

impl CallbackError {
    pub(crate) fn status_and_cause(&self) -> (StatusCode, &'static str) {
        match self {
            Self::UnknownCallback => (StatusCode::NOT_FOUND, "UNKNOWN_CALLBACK"),
            Self::BadPath(_) => (StatusCode::BAD_REQUEST, "BAD_PATH"),
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
            Self::ForeignConfiguration { .. } => (StatusCode::FORBIDDEN, "FOREIGN_CONFIGURATION"),
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
            // 500: the T8 NIDD callback lists 500 and 503 only.
            Self::Uplink(UplinkError::Send(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "FORWARD_FAILED")
            }
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN"),
            Self::MemberNotOnboarded(_) => (StatusCode::FORBIDDEN, "ONBOARDING_NOT_ALLOWED"),
            Self::MemberUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "MEMBER_UNAVAILABLE"),
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
        .route(
            &format!("{TRIGGER_PATH}/{{token}}"),
            post(configuration_trigger).with_state(state.trigger.clone()),
        )
        .route(
            &format!("{TRIGGER_PATH}/{{token}}/"),
            post(configuration_trigger).with_state(state.trigger.clone()),
        )
        // After the routes: it applies to the routes already added. axum keeps the `Allow`
        // header; the body becomes a problem document like every other refusal here.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async {
            problem_response(
                StatusCode::NOT_FOUND,
                "UNKNOWN_CALLBACK",
                "no such callback".into(),
            )
        })
        .with_state(state)
}

/// The token of a callback URL. axum's own rejection (plain text) is replaced by a problem
/// document: every error answer of this listener is `application/problem+json`.
fn token_of(path: Result<Path<String>, PathRejection>) -> Result<String, CallbackError> {
    path.map(|Path(token)| token)
        .map_err(|rejection| CallbackError::BadPath(rejection.body_text()))
}

async fn nidd_notification(
    State(shared): State<CallbackState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut kind = "unknown";
    let result = match token_of(path) {
        Ok(token) => handle(&shared, &token, &headers, body, &mut kind).await,
        Err(error) => Err(error),
    };
    answer(&shared, kind, result)
}

/// Checks shared by every notification endpoint: the token names a device, the body is JSON
/// within the size limit.
async fn read_notification(
    shared: &CallbackState,
    token: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Arc<Device>, axum::body::Bytes), CallbackError> {
    if shared.lifecycle.is_shutting_down() {
        return Err(CallbackError::ShuttingDown);
    }
    let Some(device) = shared.devices.by_token(token) else {
        // A retired URL (callback URL rotation) is refused like any unknown one, and counted.
        if shared.devices.is_retired(token) {
            shared.metrics.retired_callback_refusals.inc();
        }
        return Err(CallbackError::UnknownCallback);
    };
    let bytes = read_body(&shared.lifecycle, shared.max_body_bytes, headers, body).await?;
    Ok((device, bytes))
}

/// A body posted to the callback listener: refused while the bridge stops, JSON by its
/// media type (when it names one), within `max_body_bytes`. The trigger endpoint reads its
/// bodies with it too.
pub(crate) async fn read_body(
    lifecycle: &Lifecycle,
    max_body_bytes: usize,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, CallbackError> {
    if lifecycle.is_shutting_down() {
        return Err(CallbackError::ShuttingDown);
    }
    if headers.contains_key(header::CONTENT_TYPE) {
        let media = crate::http::media_type(headers).unwrap_or_default();
        if !(media == "application/json" || media.ends_with("+json")) {
            return Err(CallbackError::UnsupportedMediaType);
        }
    }
    let limit = max_body_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| CallbackError::BodyTooLarge { limit })
}

/// A body as JSON (any value; the caller checks its shape).
pub(crate) fn json_of(bytes: &[u8]) -> Result<serde_json::Value, CallbackError> {
    serde_json::from_slice(bytes).map_err(|e| CallbackError::MalformedJson(e.to_string()))
}

/// The sans-IO front of the NIDD callback: body bytes to a classified notification, or the
/// refusal the handler answers with. The fuzz targets drive exactly this.
pub(crate) fn parse_nidd_body(bytes: &[u8]) -> Result<NiddNotification, CallbackError> {
    NiddNotification::from_json(json_of(bytes)?)
        .map_err(|e| CallbackError::InvalidNotification(e.to_string()))
}

/// The datagram an uplink notification carries: standard base64 with canonical padding,
/// surrounding whitespace ignored.
pub(crate) fn uplink_datagram(
    uplink: &crate::t8::NiddUplinkDataNotification,
) -> Result<Vec<u8>, CallbackError> {
    BASE64
        .decode(uplink.data.trim())
        .map_err(|e| CallbackError::BadBase64(e.to_string()))
}

async fn handle(
    shared: &CallbackState,
    token: &str,
    headers: &HeaderMap,
    body: Body,
    kind: &mut &'static str,
) -> Result<&'static str, CallbackError> {
    if let Some(group) = shared.groups.by_token(token) {
        return handle_group(shared, &group, headers, body, kind).await;
    }
    let (device, bytes) = read_notification(shared, token, headers, body).await?;
    let notification = parse_nidd_body(&bytes)?;
    *kind = notification.kind();
    match notification {
        NiddNotification::Uplink(uplink) => {
            let named = named_device(&uplink)?;
            let datagram = uplink_datagram(&uplink)?;
            let forwarded = shared
                .uplinks
                .forward(&device, &named, &datagram, clock::now())
                .await?;
            resend_answer(shared, &device, forwarded);
        }
        NiddNotification::ConfigurationStatus(notification) => {
            check_identity(&device, &notification)?;
            return configuration_status(
                shared,
                &device,
                &notification.nidd_configuration,
                notification.status,
            );
        }
        NiddNotification::DeliveryStatus(notification) => {
            count_delivery_status(shared, &notification.delivery_status);
            settle_delivery(
                shared,
                &device,
                &notification.nidd_downlink_data_transfer,
                &notification.delivery_status,
                notification.requested_retransmission_time.as_deref(),
            )
            .await;
        }
        NiddNotification::GroupDelivery(notification) => {
            for result in &notification.gmd_results {
                count_delivery_status(shared, &result.delivery_status);
            }
        }
        NiddNotification::ManagePort(_) | NiddNotification::Test(_) => {}
    }
    Ok(ACCEPTED)
}

/// A notification on a group's callback URL: members' uplinks (a member the bridge does not
/// serve yet is created under `[onboarding]`), the group configuration's status, and the
/// outcomes of members' pending deliveries (one by one, or per member in a GMD notification).
async fn handle_group(
    shared: &CallbackState,
    group: &Arc<Group>,
    headers: &HeaderMap,
    body: Body,
    kind: &mut &'static str,
) -> Result<&'static str, CallbackError> {
    let bytes = read_body(&shared.lifecycle, shared.max_body_bytes, headers, body).await?;
    let notification = parse_nidd_body(&bytes)?;
    *kind = notification.kind();
    match notification {
        NiddNotification::Uplink(uplink) => {
            let named = named_device(&uplink)?;
            let datagram = uplink_datagram(&uplink)?;
            let member = group_member(shared, group, &named).await?;
            let forwarded = shared
                .uplinks
                .forward(&member, &named, &datagram, clock::now())
                .await?;
            resend_answer(shared, &member, forwarded);
        }
        NiddNotification::ConfigurationStatus(notification) => {
            return group_configuration_status(
                shared,
                group,
                &notification.nidd_configuration,
                notification.status,
            );
        }
        NiddNotification::DeliveryStatus(notification) => {
            count_delivery_status(shared, &notification.delivery_status);
            let link = &notification.nidd_downlink_data_transfer;
            let Some(member) = pending_member(shared, group, link) else {
                tracing::info!(group = %group.id, delivery = %link, "delivery status for no pending delivery of the group's members; ignored");
                return Ok("ignored_unknown_delivery");
            };
            settle_delivery(
                shared,
                &member,
                link,
                &notification.delivery_status,
                notification.requested_retransmission_time.as_deref(),
            )
            .await;
        }
        NiddNotification::GroupDelivery(notification) => {
            for result in &notification.gmd_results {
                count_delivery_status(shared, &result.delivery_status);
                let member = named_device(result)
                    .ok()
                    .filter(|id| group.has_member(id))
                    .and_then(|id| shared.devices.get(&id));
                let Some(member) = member else {
                    tracing::info!(group = %group.id, "a group delivery result for a UE that is not a member the bridge serves; ignored");
                    continue;
                };
                settle_delivery(
                    shared,
                    &member,
                    &notification.nidd_downlink_data_transfer,
                    &result.delivery_status,
                    result.requested_retransmission_time.as_deref(),
                )
                .await;
            }
        }
        NiddNotification::ManagePort(_) | NiddNotification::Test(_) => {}
    }
    Ok(ACCEPTED)
}

/// A device retransmitted a request whose answer was carried long ago: the answer goes to it
/// again, as if its server had sent it once more.
fn resend_answer(shared: &CallbackState, device: &Arc<Device>, forwarded: Forwarded) {
    if let Forwarded::ResendAnswer { server, data } = forwarded {
        shared
            .downlinks
            .receive(device, data, server, clock::unix_ms());
    }
}

/// The member of `group` an uplink names: one the bridge serves, or one created now.
async fn group_member(
    shared: &CallbackState,
    group: &Arc<Group>,
    named: &DeviceId,
) -> Result<Arc<Device>, CallbackError> {
    let not_member = || CallbackError::DeviceNotInConfiguration {
        named: named.to_string(),
    };
    if let Some(device) = shared.devices.get(named) {
        return if group.has_member(named) {
            Ok(device)
        } else {
            Err(not_member())
        };
    }
    let outcome = shared.fleet.onboard_member(group, named).await;
    let label = match &outcome {
        Ok(Onboarded::Created(_)) => "created",
        Ok(Onboarded::Existing(_)) => "existing",
        Err(FleetError::NotOnboarded(OnboardingRefusal::NotAllowed(_))) => "not_allowed",
        Err(FleetError::NotOnboarded(OnboardingRefusal::Limit { .. })) => "limit",
        Err(FleetError::PoolExhausted { .. }) => "pool_exhausted",
        Err(_) => "failed",
    };
    shared
        .metrics
        .onboarding_requests
        .with_label_values(&["group_uplink", label])
        .inc();
    match outcome {
        Ok(Onboarded::Created(device)) => {
            tracing::info!(group = %group.id, device = %device.id, address = %device.socket.local_addr(), "group member created on its first uplink");
            Ok(device)
        }
        // Created by a concurrent uplink meanwhile.
        Ok(Onboarded::Existing(device)) if group.has_member(named) => Ok(device),
        Ok(Onboarded::Existing(_)) => Err(not_member()),
        Err(FleetError::NotOnboarded(refusal)) => {
            tracing::warn!(group = %group.id, device = %named, %refusal, "uplink of a group member the bridge may not create; refused");
            Err(CallbackError::MemberNotOnboarded(refusal))
        }
        Err(error) => Err(CallbackError::MemberUnavailable(error.to_string())),
    }
}

/// The member of `group` with a delivery pending at `link`.
fn pending_member(shared: &CallbackState, group: &Group, link: &str) -> Option<Arc<Device>> {
    group
        .members()
        .into_iter()
        .filter_map(|id| shared.devices.get(&id))
        .find(|member| member.state().mt.queue.pending_at(link).is_some())
}

fn count_delivery_status(shared: &CallbackState, status: &crate::t8::DeliveryStatus) {
    shared
        .metrics
        .mt_deliveries
        .with_label_values(&[status.label()])
        .inc();
}

async fn settle_delivery(
    shared: &CallbackState,
    device: &Device,
    link: &str,
    status: &crate::t8::DeliveryStatus,
    requested_retransmission_time: Option<&str>,
) {
    tracing::debug!(device = %device.id, delivery = %link, %status, "MT delivery status");
    let now = clock::now();
    let retry_at = instant_of(
        requested_retransmission_time,
        now,
        clock::system_now(),
        shared.downlinks.scef_times.retry_wait,
    );
    shared
        .downlinks
        .settle(device, link, status, retry_at, now)
        .await;
}

/// A status notification on a group's URL: applied to the group's configuration (a
/// termination only once the SCEF confirms it); one naming another configuration is refused.
fn group_configuration_status(
    shared: &CallbackState,
    group: &Arc<Group>,
    link: &str,
    status: NiddStatus,
) -> Result<&'static str, CallbackError> {
    let (change, link) = judge_status(shared, link, &status, group.nidd().as_ref(), &[])?;
    match change {
        StatusChange::Terminated => {
            tracing::info!(group = %group.id, %link, "termination of the group's configuration notified; asking the SCEF");
            shared
                .reprovision
                .group_termination_reported(group.clone(), link);
            Ok(ACCEPTED)
        }
        StatusChange::Update(nidd) => {
            shared.reprovision.group_configuration_changed(group, nidd);
            Ok(ACCEPTED)
        }
        StatusChange::Superseded => Ok("ignored_superseded"),
        StatusChange::NoConfiguration => Ok("ignored_no_configuration"),
        StatusChange::Foreign => {
            tracing::warn!(group = %group.id, %link, "status notification for a configuration that is not the group's refused");
            Err(CallbackError::ForeignConfiguration {
                named: link.to_string(),
            })
        }
    }
}

/// What a status notification naming `link` does to `current` (the configuration held now,
/// replacing `superseded`); counted unless it names a foreign configuration.
fn judge_status(
    shared: &CallbackState,
    link: &str,
    status: &NiddStatus,
    current: Option<&NiddState>,
    superseded: &[url::Url],
) -> Result<(StatusChange, url::Url), CallbackError> {
    let link = url::Url::parse(link).map_err(|_| CallbackError::ForeignConfiguration {
        named: link.to_string(),
    })?;
    let change = status_change(current, superseded, &link, status.clone());
    if !matches!(change, StatusChange::Foreign) {
        shared
            .metrics
            .configuration_statuses
            .with_label_values(&[status_label(status)])
            .inc();
    }
    Ok((change, link))
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

/// The outcome label of a notification that was taken.
const ACCEPTED: &str = "accepted";

/// What a configuration status notification does to the device's configuration.
#[derive(Debug, Clone, PartialEq)]
enum StatusChange {
    /// The SCEF ended the configuration: forget it and create a new one.
    Terminated,
    /// Keep the configuration with the new status.
    Update(NiddState),
    /// It names a configuration this device had before: too late to matter.
    Superseded,
    /// The device has no configuration now (one is being created): the location only ever
    /// comes from the SCEF's answer to the bridge's own request, never from a notification.
    NoConfiguration,
    /// It names a configuration that was never this device's.
    Foreign,
}

/// Decides what a status notification for `link` does, given the configuration held now and
/// the ones it replaced. Links are compared as parsed URLs (scheme and host case, default
/// port, dot segments normalised).
fn status_change(
    current: Option<&NiddState>,
    superseded: &[url::Url],
    link: &url::Url,
    status: NiddStatus,
) -> StatusChange {
    if superseded.contains(link) {
        return StatusChange::Superseded;
    }
    let Some(current) = current else {
        return StatusChange::NoConfiguration;
    };
    if current.location != *link {
        return StatusChange::Foreign;
    }
    if status.is_terminated() {
        return StatusChange::Terminated;
    }
    StatusChange::Update(NiddState {
        status: Some(status),
        ..current.clone()
    })
}

fn configuration_status(
    shared: &CallbackState,
    device: &Arc<Device>,
    link: &str,
    status: NiddStatus,
) -> Result<&'static str, CallbackError> {
    let (current, superseded) = {
        let state = device.state();
        (state.nidd.clone(), state.superseded.clone())
    };
    let (change, link) = judge_status(shared, link, &status, current.as_ref(), &superseded)?;
    match change {
        StatusChange::Terminated => {
            tracing::info!(device = %device.id, %link, "termination notified; asking the SCEF");
            shared
                .reprovision
                .termination_reported(device.clone(), link);
            Ok(ACCEPTED)
        }
        StatusChange::Update(nidd) => {
            tracing::info!(device = %device.id, status = ?nidd.status, "NIDD configuration status");
            shared.devices.update_nidd(device, Some(nidd));
            Ok(ACCEPTED)
        }
        StatusChange::Superseded => {
            tracing::info!(device = %device.id, %link, status = %status_label(&status), "status of a superseded NIDD configuration ignored");
            Ok("ignored_superseded")
        }
        StatusChange::NoConfiguration => {
            tracing::info!(device = %device.id, %link, status = %status_label(&status), "status notification while the device has no NIDD configuration ignored");
            Ok("ignored_no_configuration")
        }
        StatusChange::Foreign => {
            tracing::warn!(device = %device.id, %link, "status notification for a configuration that is not the device's refused");
            Err(CallbackError::ForeignConfiguration {
                named: link.to_string(),
            })
        }
    }
}

/// Counts a notification's outcome and turns it into the HTTP answer.
fn answer(
    shared: &CallbackState,
    kind: &str,
    result: Result<&'static str, CallbackError>,
) -> Response {
    let outcome = match &result {
        Ok(outcome) => (*outcome).to_string(),
        Err(error) => error.outcome(),
    };
    shared
        .metrics
        .callbacks
        .with_label_values(&[kind, &outcome])
        .inc();
    match result {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => {
            // A 403 names another device or configuration than the URL's: worth an
            // operator's look (a misrouted SCEF, or someone holding a callback URL).
            if error.status_and_cause().0 == StatusCode::FORBIDDEN {
                tracing::warn!(%error, kind, "notification refused");
            } else {
                tracing::debug!(%error, kind, "notification refused");
            }
            error.into_response()
        }
    }
}

/// MonitoringEvent notifications: reachability reports wake the device's MT queue.
async fn monitoring_notification(
    State(shared): State<CallbackState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let token = token_of(path)?;
        let (device, bytes) = read_notification(&shared, &token, &headers, body).await?;
        let json = json_of(&bytes)?;
        let notification: MonitoringNotification =
            serde_json::from_value(json).map_err(|e| CallbackError::InvalidNotification(e.to_string()))?;
        for report in &notification.monitoring_event_reports {
            if report.external_id().is_some() || report.msisdn().is_some() {
                check_identity(&device, report)?;
            }
        }
        let now = clock::now();
        let reported_period = notification
            .applied_param
            .as_ref()
            .and_then(|applied| applied.maximum_latency)
            .into_iter()
            .chain(notification.monitoring_event_reports.iter().filter_map(|report| {
                report.idle_status_info.as_ref().and_then(|idle| idle.periodic_au_timer)
            }))
            .filter(|seconds| *seconds > 0)
            .min();
        if let Some(seconds) = reported_period {
            device
                .state()
                .mt
                .reachability
                .set_reported_wake_period(std::time::Duration::from_secs(seconds));
        }
        for report in notification.monitoring_event_reports {
            match report.monitoring_type {
                MonitoringType::UeReachability | MonitoringType::AvailabilityAfterDdnFailure => {
                    let until = instant_of(
                        report.max_ue_availability_time.as_deref(),
                        now,
                        clock::system_now(),
                        shared.downlinks.scef_times.ue_availability,
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
        Ok(ACCEPTED)
    }
    .await;
    answer(&shared, "monitoring", result)
}

/// DeviceTriggering delivery reports.
async fn triggering_notification(
    State(shared): State<CallbackState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let token = token_of(path)?;
        let (device, bytes) = read_notification(&shared, &token, &headers, body).await?;
        let json = json_of(&bytes)?;
        let report: DeviceTriggeringDeliveryReportNotification =
            serde_json::from_value(json).map_err(|e| CallbackError::InvalidNotification(e.to_string()))?;
        let label = match &report.result {
            DeliveryResult::Other(_) => "report_other".to_string(),
            known => format!("report_{}", known.as_str().to_ascii_lowercase()),
        };
        shared.metrics.device_triggers.with_label_values(&[&label]).inc();
        tracing::info!(device = %device.id, result = %report.result, "device trigger delivery report");
        Ok(ACCEPTED)
    }
    .await;
    answer(&shared, "trigger_report", result)
}

#[cfg(test)]
mod tests {
    //! The callback router driven in process against the golden bodies in `fixtures/t8`, for
    //! the fixtures' devices A (External Identifier) and B (MSISDN); see `test_support`.

    use std::time::Duration;

    use axum::http::{Method, StatusCode};
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde_json::json;

    use super::*;
    use crate::delivery::{Decision, Outcome};
    use crate::http::test_support::{
        CONFIGURATION_A, DEADLINE, DEVICE_A, DEVICE_B, GROUP, GROUP_CONFIGURATION, Harness,
        MAX_BODY_BYTES, MAX_PACKET_BITS_A, TOKEN_A, TOKEN_B, active_configuration,
        assert_no_content, assert_problem, fixture, fixture_datagram, fixture_json,
    };
    use crate::reachability::State as Reachable;
    use crate::store::StoredSubscription;
    use crate::t8::{NiddConfigurationStatusNotification, NiddUplinkDataNotification};

    const REGISTER: &str = "NiddUplinkDataNotification.register.json";
    const UPDATE_BY_MSISDN: &str = "NiddUplinkDataNotification.msisdn.json";
    const READ: &str = "NiddDownlinkDataTransfer.request-read.json";
    const PENDING_DELIVERY: &str = "http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/7c4e2a91/downlink-data-deliveries/0d41b8e2";

    fn nidd_url(token: &str) -> String {
        format!("/t8/v1/nidd/{token}")
    }

    fn monitoring_url(token: &str) -> String {
        format!("/t8/v1/monitoring/{token}")
    }

    fn triggering_url(token: &str) -> String {
        format!("/t8/v1/triggering/{token}")
    }

    /// An uplink notification for device A carrying `datagram`.
    fn uplink_body(datagram: &[u8]) -> Vec<u8> {
        let mut body = fixture_json(REGISTER);
        body["data"] = json!(BASE64.encode(datagram));
        body.to_string().into_bytes()
    }

    /// A valid CoAP NON POST without options of exactly `length` bytes (payload filler).
    fn coap_of_length(length: usize) -> Vec<u8> {
        let mut datagram = vec![0x50, 0x02, 0x3b, 0x10, 0xff];
        datagram.resize(length, b'x');
        datagram
    }

    fn nidd_of(harness: &Harness, id: &str) -> Option<NiddState> {
        harness.device(id).state().nidd.clone()
    }

    fn stored_nidd_status(harness: &Harness, id: &str) -> Option<Option<String>> {
        let id: DeviceId = id.parse().unwrap();
        let record = harness.devices.store().device(&id).unwrap().unwrap();
        record.nidd.map(|n| n.status)
    }

    /// Waits for the wake-up the device's flusher would get.
    async fn woken(device: &Device) {
        tokio::time::timeout(DEADLINE, device.wake.rung())
            .await
            .expect("the device's flusher was not woken");
    }

    /// Queues the Read of the fixtures for device A as the LwM2M server stand-in sent it, and
    /// hands it to the SCEF, which accepts it as pending at `PENDING_DELIVERY` (201): what the
    /// flusher does.
    async fn pending_read(harness: &Harness) -> u64 {
        let device = harness.device(DEVICE_A);
        let from = harness.server.local_addr().unwrap();
        harness
            .downlinks
            .receive(&device, fixture_datagram(READ), from, clock::unix_ms());
        harness.downlinks.commit().await.expect("committed");
        woken(&device).await;
        let now = clock::now();
        let mut state = device.state();
        let (decision, _) = state.mt.decide(now, clock::unix_ms(), true);
        let Decision::Send(item) = decision else {
            panic!("the queued Read is not sent: {decision:?}");
        };
        let effect = state
            .mt
            .on_outcome(item.seq, Outcome::Pending(PENDING_DELIVERY.into()), now);
        harness.downlinks.apply(&device, &effect);
        assert_eq!(state.mt.queue.pending_count(), 1);
        item.seq
    }

    fn stored_queue(harness: &Harness, id: &str) -> Vec<crate::queue::QueuedDatagram> {
        harness
            .mt_store
            .load()
            .unwrap()
            .remove(id)
            .unwrap_or_default()
    }

    // --- pure helpers ---

    #[test]
    fn named_device_takes_exactly_one_identity() {
        let by_external_id: NiddUplinkDataNotification =
            serde_json::from_slice(&fixture(REGISTER)).unwrap();
        assert_eq!(
            named_device(&by_external_id).unwrap(),
            DEVICE_A.parse::<DeviceId>().unwrap()
        );
        let by_msisdn: NiddUplinkDataNotification =
            serde_json::from_slice(&fixture(UPDATE_BY_MSISDN)).unwrap();
        assert_eq!(
            named_device(&by_msisdn).unwrap(),
            DEVICE_B.parse::<DeviceId>().unwrap()
        );
        for broken in [
            "invalid/NiddUplinkDataNotification.both-externalId-and-msisdn.json",
            "invalid/NiddUplinkDataNotification.no-device-id.json",
        ] {
            let notification: NiddUplinkDataNotification =
                serde_json::from_slice(&fixture(broken)).unwrap();
            assert!(
                matches!(
                    named_device(&notification),
                    Err(CallbackError::InvalidNotification(_))
                ),
                "{broken}"
            );
        }
    }

    #[tokio::test]
    async fn check_identity_accepts_only_the_device_of_the_url() {
        let harness = Harness::new().await;
        let active: NiddConfigurationStatusNotification =
            serde_json::from_slice(&fixture("NiddConfigurationStatusNotification.active.json"))
                .unwrap();
        assert!(check_identity(&harness.device(DEVICE_A), &active).is_ok());
        let refused = check_identity(&harness.device(DEVICE_B), &active).unwrap_err();
        assert!(
            matches!(&refused, CallbackError::DeviceNotInConfiguration { named } if named == DEVICE_A)
        );
        assert_eq!(
            refused.status_and_cause(),
            (StatusCode::FORBIDDEN, "DEVICE_NOT_IN_CONFIGURATION")
        );
        // The `urn:nai:` spelling names the same device.
        let mut urn = fixture_json("NiddConfigurationStatusNotification.active.json");
        urn["externalId"] = json!(format!("urn:nai:{DEVICE_A}"));
        let urn: NiddConfigurationStatusNotification = serde_json::from_value(urn).unwrap();
        assert!(check_identity(&harness.device(DEVICE_A), &urn).is_ok());
    }

    #[test]
    fn status_change_applies_only_to_the_configuration_it_names() {
        let mut current = active_configuration(CONFIGURATION_A, Some(MAX_PACKET_BITS_A));
        current.notification_destination =
            Some(format!("http://127.0.0.1:8081/t8/v1/nidd/{TOKEN_A}"));
        current.monitoring_subscription = Some(StoredSubscription {
            location:
                "http://127.0.0.1:8080/3gpp-monitoring-event/v1/bridge-1/subscriptions/e5a2917c"
                    .into(),
            expires_at_ms: 1,
        });
        let this = url::Url::parse(CONFIGURATION_A).unwrap();
        let old = url::Url::parse("http://127.0.0.1:8080/3gpp-nidd/v1/bridge-1/configurations/0ld")
            .unwrap();
        let foreign =
            url::Url::parse("http://attacker.example/3gpp-nidd/v1/x/configurations/1").unwrap();
        let superseded = [old.clone()];

        // A new status keeps everything else the bridge knows of the configuration.
        let suspended = NiddStatus::from("SUSPENDED");
        let StatusChange::Update(updated) =
            status_change(Some(&current), &superseded, &this, suspended.clone())
        else {
            panic!("an unknown status is an update");
        };
        assert_eq!(
            updated,
            NiddState {
                status: Some(suspended),
                ..current.clone()
            }
        );
        assert_eq!(
            status_change(Some(&current), &superseded, &this, NiddStatus::Active),
            StatusChange::Update(current.clone())
        );
        // Links are compared normalised: scheme case and dot segments do not matter.
        let spelled_otherwise = url::Url::parse(
            &CONFIGURATION_A.replace("http://127.0.0.1:8080/", "HTTP://127.0.0.1:8080/./"),
        )
        .unwrap();
        assert_eq!(
            status_change(Some(&current), &[], &spelled_otherwise, NiddStatus::Active),
            StatusChange::Update(current.clone())
        );

        // Both terminations end it, when they name it.
        for terminated in [
            NiddStatus::Terminated,
            NiddStatus::TerminatedUeNotAuthorized,
        ] {
            assert_eq!(
                status_change(Some(&current), &superseded, &this, terminated.clone()),
                StatusChange::Terminated
            );
            // A late one for the configuration this one replaced changes nothing.
            assert_eq!(
                status_change(Some(&current), &superseded, &old, terminated.clone()),
                StatusChange::Superseded
            );
            assert_eq!(
                status_change(Some(&current), &superseded, &foreign, terminated),
                StatusChange::Foreign
            );
        }
        // A notification never names the location: not another one ...
        assert_eq!(
            status_change(Some(&current), &superseded, &foreign, NiddStatus::Active),
            StatusChange::Foreign
        );
        // ... and not one for a device that has none (it comes from the SCEF's 201).
        assert_eq!(
            status_change(None, &superseded, &foreign, NiddStatus::Active),
            StatusChange::NoConfiguration
        );
        assert_eq!(
            status_change(None, &superseded, &old, NiddStatus::Active),
            StatusChange::Superseded
        );
    }

    #[test]
    fn every_error_has_its_status_and_cause() {
        let cases = [
            (CallbackError::UnknownCallback, 404, "UNKNOWN_CALLBACK"),
            (CallbackError::BadPath(String::new()), 400, "BAD_PATH"),
            (
                CallbackError::BodyTooLarge { limit: 1 },
                413,
                "BODY_TOO_LARGE",
            ),
            (
                CallbackError::UnsupportedMediaType,
                415,
                "UNSUPPORTED_MEDIA_TYPE",
            ),
            (
                CallbackError::MalformedJson(String::new()),
                400,
                "MALFORMED_JSON",
            ),
            (
                CallbackError::InvalidNotification(String::new()),
                400,
                "INVALID_NOTIFICATION",
            ),
            (CallbackError::BadBase64(String::new()), 400, "BAD_BASE64"),
            (
                CallbackError::DeviceNotInConfiguration {
                    named: String::new(),
                },
                403,
                "DEVICE_NOT_IN_CONFIGURATION",
            ),
            (
                CallbackError::Uplink(UplinkError::Send(std::io::Error::other("down"))),
                500,
                "FORWARD_FAILED",
            ),
            (CallbackError::ShuttingDown, 503, "SHUTTING_DOWN"),
        ];
        for (error, status, cause) in cases {
            assert_eq!(
                error.status_and_cause(),
                (StatusCode::from_u16(status).unwrap(), cause)
            );
            assert_eq!(error.outcome(), cause.to_ascii_lowercase());
        }
    }

    // --- NIDD notifications that are accepted ---

    #[tokio::test]
    async fn uplink_by_external_id_reaches_the_server_byte_for_byte() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        assert_no_content(harness.notify(&nidd_url(TOKEN_A), fixture(REGISTER)).await).await;

        let (datagram, from) = harness.server_receives().await;
        assert_eq!(datagram, fixture_datagram(REGISTER));
        assert_eq!(
            from,
            device.socket.local_addr(),
            "sent from the device's own socket"
        );
        assert_eq!(harness.callbacks("uplink", "accepted"), 1);
        assert_eq!(harness.metrics.mo_datagrams.get(), 1);
        assert_eq!(harness.metrics.mo_bytes.get(), datagram.len() as u64);
        let now = clock::now();
        assert_eq!(device.state().mt.reachability.state(now), Reachable::Awake);
        woken(&device).await;
    }

    #[tokio::test]
    async fn uplink_by_msisdn_reaches_the_server_byte_for_byte() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_B);
        assert_no_content(
            harness
                .notify(&nidd_url(TOKEN_B), fixture(UPDATE_BY_MSISDN))
                .await,
        )
        .await;

        let (datagram, from) = harness.server_receives().await;
        assert_eq!(datagram, fixture_datagram(UPDATE_BY_MSISDN));
        assert_eq!(from, device.socket.local_addr());
        assert_eq!(harness.callbacks("uplink", "accepted"), 1);
        assert_eq!(
            device.state().mt.reachability.state(clock::now()),
            Reachable::Awake
        );
    }

    #[tokio::test]
    async fn an_uplink_of_exactly_the_maximum_packet_size_is_forwarded() {
        let harness = Harness::new().await;
        let datagram = coap_of_length((MAX_PACKET_BITS_A / 8) as usize);
        assert_no_content(
            harness
                .notify(&nidd_url(TOKEN_A), uplink_body(&datagram))
                .await,
        )
        .await;
        assert_eq!(harness.server_receives().await.0, datagram);
    }

    #[tokio::test]
    async fn configuration_status_active_keeps_the_configuration() {
        let harness = Harness::new().await;
        let before = nidd_of(&harness, DEVICE_A);
        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddConfigurationStatusNotification.active.json"),
                )
                .await,
        )
        .await;
        assert_eq!(nidd_of(&harness, DEVICE_A), before);
        assert_eq!(
            stored_nidd_status(&harness, DEVICE_A),
            Some(Some("ACTIVE".into()))
        );
        assert!(harness.devices.all_provisioned());
        assert_eq!(harness.callbacks("configuration_status", "accepted"), 1);
        assert_eq!(
            harness
                .metrics
                .configuration_statuses
                .with_label_values(&["ACTIVE"])
                .get(),
            1
        );
    }

    /// Whoever holds a callback URL can send a TERMINATED: it is only believed once the SCEF
    /// confirms it, and the harness's SCEF cannot be reached, so the configuration is kept.
    /// (tests/integration/provisioning.rs shows a confirmed one re-created.)
    #[tokio::test(start_paused = true)]
    async fn configuration_status_terminated_is_checked_with_the_scef_first() {
        let harness = Harness::new().await;
        let before = nidd_of(&harness, DEVICE_A);
        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddConfigurationStatusNotification.terminated.json"),
                )
                .await,
        )
        .await;
        assert_eq!(harness.callbacks("configuration_status", "accepted"), 1);
        assert_eq!(
            harness
                .metrics
                .configuration_statuses
                .with_label_values(&["TERMINATED"])
                .get(),
            1
        );
        let unverified = harness
            .metrics
            .reported_terminations
            .with_label_values(&["unverified"]);
        while unverified.get() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(nidd_of(&harness, DEVICE_A), before, "kept");
        assert_eq!(harness.devices.provisioned_count(), 2);
        assert!(harness.devices.all_provisioned());
    }

    /// A flood of TERMINATED notifications costs the SCEF one check at a time.
    #[tokio::test(start_paused = true)]
    async fn reported_terminations_are_checked_one_at_a_time() {
        let harness = Harness::new().await;
        for _ in 0..3 {
            assert_no_content(
                harness
                    .notify(
                        &nidd_url(TOKEN_A),
                        fixture("NiddConfigurationStatusNotification.terminated.json"),
                    )
                    .await,
            )
            .await;
        }
        let outcome = |label: &str| {
            harness
                .metrics
                .reported_terminations
                .with_label_values(&[label])
                .get()
        };
        assert_eq!(outcome("already_checking"), 2);
        while outcome("unverified") == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(outcome("unverified"), 1, "one check for the three");
        assert!(!harness.device(DEVICE_A).state().checking_termination);
    }

    /// The pipelined take-over: a TERMINATED naming the device's configuration, then an ACTIVE
    /// naming a URL of the attacker's; the first is checked with the SCEF, the second refused,
    /// and the configuration stays the SCEF's.
    #[tokio::test(start_paused = true)]
    async fn a_notification_never_replaces_the_configuration_location() {
        let harness = Harness::new().await;
        let before = nidd_of(&harness, DEVICE_A).expect("configured");
        let terminated = fixture("NiddConfigurationStatusNotification.terminated.json");
        assert_no_content(harness.notify(&nidd_url(TOKEN_A), terminated).await).await;
        let mut active: serde_json::Value =
            serde_json::from_slice(&fixture("NiddConfigurationStatusNotification.active.json"))
                .unwrap();
        active["niddConfiguration"] =
            "http://attacker.example/3gpp-nidd/v1/x/configurations/1".into();
        let response = harness.notify(&nidd_url(TOKEN_A), active.to_string()).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            harness.callbacks("configuration_status", "foreign_configuration"),
            1
        );
        let answered = harness
            .metrics
            .reported_terminations
            .with_label_values(&["unverified"]);
        while answered.get() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(nidd_of(&harness, DEVICE_A), Some(before));
    }

    #[tokio::test]
    async fn configuration_status_unknown_is_kept_as_the_status() {
        let harness = Harness::new().await;
        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddConfigurationStatusNotification.unknown-status.json"),
                )
                .await,
        )
        .await;
        let nidd = nidd_of(&harness, DEVICE_A).unwrap();
        assert_eq!(nidd.status, Some(NiddStatus::Other("SUSPENDED".into())));
        assert_eq!(nidd.location.as_str(), CONFIGURATION_A);
        assert_eq!(nidd.maximum_packet_size_bits, Some(MAX_PACKET_BITS_A));
        assert_eq!(
            stored_nidd_status(&harness, DEVICE_A),
            Some(Some("SUSPENDED".into()))
        );
        // Not a termination: the configuration stays usable.
        assert!(harness.devices.all_provisioned());
        assert_eq!(
            harness
                .metrics
                .configuration_statuses
                .with_label_values(&["OTHER"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn delivery_status_success_settles_the_pending_delivery() {
        let harness = Harness::new().await;
        pending_read(&harness).await;
        assert_eq!(stored_queue(&harness, DEVICE_A).len(), 1);
        let device = harness.device(DEVICE_A);

        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddDownlinkDataDeliveryStatusNotification.success.json"),
                )
                .await,
        )
        .await;
        {
            let state = device.state();
            assert_eq!(state.mt.queue.pending_count(), 0);
            assert_eq!(state.mt.queue.waiting().count(), 0);
        }
        assert!(
            stored_queue(&harness, DEVICE_A).is_empty(),
            "removed from sled too"
        );
        woken(&device).await;
        assert_eq!(harness.callbacks("delivery_status", "accepted"), 1);
        assert_eq!(
            harness
                .metrics
                .mt_deliveries
                .with_label_values(&["SUCCESS"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn delivery_status_failure_returns_the_datagram_to_the_queue() {
        let harness = Harness::new().await;
        let seq = pending_read(&harness).await;
        let device = harness.device(DEVICE_A);

        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddDownlinkDataDeliveryStatusNotification.failure.json"),
                )
                .await,
        )
        .await;
        {
            let state = device.state();
            assert_eq!(state.mt.queue.pending_count(), 0);
            let waiting: Vec<_> = state.mt.queue.waiting().map(|e| e.seq).collect();
            assert_eq!(waiting, vec![seq], "back in the queue for another attempt");
            assert!(
                state.mt.retry_at.is_some(),
                "waits for requestedRetransmissionTime"
            );
            assert_eq!(state.mt.reachability.state(clock::now()), Reachable::Asleep);
        }
        let stored = stored_queue(&harness, DEVICE_A);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].pending, None);
        woken(&device).await;
        assert_eq!(
            harness
                .metrics
                .mt_deliveries
                .with_label_values(&["FAILURE_TEMPORARILY_NOT_REACHABLE"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn delivery_status_for_no_pending_delivery_changes_nothing() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let from = harness.server.local_addr().unwrap();
        harness
            .downlinks
            .receive(&device, fixture_datagram(READ), from, clock::unix_ms());
        harness.downlinks.commit().await.expect("committed");
        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("NiddDownlinkDataDeliveryStatusNotification.success.json"),
                )
                .await,
        )
        .await;
        assert_eq!(device.state().mt.queue.waiting().count(), 1);
        assert_eq!(stored_queue(&harness, DEVICE_A).len(), 1);
        assert_eq!(harness.callbacks("delivery_status", "accepted"), 1);
    }

    #[tokio::test]
    async fn group_delivery_results_are_counted() {
        let harness = Harness::new().await;
        assert_no_content(
            harness
                .notify(
                    &nidd_url(TOKEN_A),
                    fixture("GmdNiddDownlinkDataDeliveryNotification.example.json"),
                )
                .await,
        )
        .await;
        let deliveries = |status: &str| {
            harness
                .metrics
                .mt_deliveries
                .with_label_values(&[status])
                .get()
        };
        assert_eq!(deliveries("SUCCESS"), 1);
        assert_eq!(deliveries("FAILURE_TEMPORARILY_NOT_REACHABLE"), 1);
        assert_eq!(harness.callbacks("group_delivery", "accepted"), 1);
    }

    #[tokio::test]
    async fn manage_port_and_test_notifications_are_accepted_and_ignored() {
        let harness = Harness::new().await;
        let before = nidd_of(&harness, DEVICE_A);
        for (name, kind, count) in [
            ("ManagePortNotification.example.json", "manage_port", 1),
            // TS 29.122 requires only niddConfiguration and the UE: managedPorts is optional.
            (
                "ManagePortNotification.no-managed-ports.json",
                "manage_port",
                2,
            ),
            ("TestNotification.example.json", "test", 1),
        ] {
            assert_no_content(harness.notify(&nidd_url(TOKEN_A), fixture(name)).await).await;
            assert_eq!(harness.callbacks(kind, "accepted"), count, "{name}");
        }
        assert_eq!(nidd_of(&harness, DEVICE_A), before);
    }

    #[tokio::test]
    async fn an_unreadable_token_is_a_problem_document() {
        let harness = Harness::new().await;
        // `%FF` decodes to a byte that is not UTF-8: axum's own rejection would be text/plain.
        for path in [
            "/t8/v1/nidd/%FF",
            "/t8/v1/monitoring/%FF%FE",
            "/t8/v1/triggering/a%C3",
        ] {
            assert_problem(
                harness.notify(path, fixture(REGISTER)).await,
                StatusCode::BAD_REQUEST,
                "BAD_PATH",
            )
            .await;
        }
        assert_eq!(harness.callbacks("unknown", "bad_path"), 1);
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    #[tokio::test]
    async fn a_wrong_method_is_a_problem_document_with_allow() {
        let harness = Harness::new().await;
        for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
            let response = harness
                .callback_request(method.clone(), &nidd_url(TOKEN_A))
                .await;
            assert_eq!(
                response.headers().get(header::ALLOW).map(|v| v.as_bytes()),
                Some(&b"POST"[..]),
                "{method}"
            );
            assert_problem(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
            )
            .await;
        }
        // An unknown path is UNKNOWN_CALLBACK whatever the method.
        assert_problem(
            harness.callback_request(Method::GET, "/").await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_CALLBACK",
        )
        .await;
    }

    #[tokio::test]
    async fn json_content_types_and_a_missing_one_are_accepted() {
        let harness = Harness::new().await;
        let body = fixture("TestNotification.example.json");
        for content_type in [
            Some("application/json; charset=utf-8"),
            Some("Application/JSON"),
            Some("application/merge-patch+json"),
            None,
        ] {
            assert_no_content(
                harness
                    .post(&nidd_url(TOKEN_A), content_type, body.clone())
                    .await,
            )
            .await;
        }
        assert_eq!(harness.callbacks("test", "accepted"), 4);
    }

    #[tokio::test]
    async fn a_body_of_exactly_the_limit_is_read() {
        let harness = Harness::new().await;
        let mut body = fixture("TestNotification.example.json");
        body.resize(MAX_BODY_BYTES, b' ');
        assert_no_content(harness.notify(&nidd_url(TOKEN_A), body).await).await;
    }

    // --- NIDD notifications that are refused ---

    #[tokio::test]
    async fn an_unknown_token_is_refused() {
        let harness = Harness::new().await;
        assert_problem(
            harness
                .notify(
                    &nidd_url("00000000000000000000000000000000"),
                    fixture(REGISTER),
                )
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_CALLBACK",
        )
        .await;
        assert_eq!(harness.callbacks("unknown", "unknown_callback"), 1);
        // A path that is no callback URL at all.
        assert_problem(
            harness.notify("/t8/v1/other/x", fixture(REGISTER)).await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_CALLBACK",
        )
        .await;
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    #[tokio::test]
    async fn a_content_type_other_than_json_is_refused() {
        let harness = Harness::new().await;
        assert_problem(
            harness
                .post(&nidd_url(TOKEN_A), Some("text/plain"), fixture(REGISTER))
                .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        )
        .await;
        assert_eq!(harness.callbacks("unknown", "unsupported_media_type"), 1);
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let harness = Harness::new().await;
        let mut body = fixture("TestNotification.example.json");
        body.resize(MAX_BODY_BYTES + 1, b' ');
        assert_problem(
            harness.notify(&nidd_url(TOKEN_A), body).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "BODY_TOO_LARGE",
        )
        .await;
        assert_eq!(harness.callbacks("unknown", "body_too_large"), 1);
    }

    #[tokio::test]
    async fn malformed_json_is_refused() {
        let harness = Harness::new().await;
        let mut truncated = fixture(REGISTER);
        truncated.truncate(truncated.len() / 2);
        assert_problem(
            harness.notify(&nidd_url(TOKEN_A), truncated).await,
            StatusCode::BAD_REQUEST,
            "MALFORMED_JSON",
        )
        .await;
        assert_eq!(harness.callbacks("unknown", "malformed_json"), 1);
    }

    #[tokio::test]
    async fn every_invalid_notification_fixture_is_refused() {
        let harness = Harness::new().await;
        let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/t8/invalid");
        let mut names: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            // `<Schema>.<what-is-wrong>.json`: the notifications are the schemas named so.
            .filter(|name| {
                name.split('.')
                    .next()
                    .is_some_and(|schema| schema.ends_with("Notification"))
            })
            .collect();
        names.sort();
        assert_eq!(names.len(), 7, "{names:?}");
        for name in &names {
            assert_problem(
                harness
                    .notify(&nidd_url(TOKEN_A), fixture(&format!("invalid/{name}")))
                    .await,
                StatusCode::BAD_REQUEST,
                "INVALID_NOTIFICATION",
            )
            .await;
        }
        assert_eq!(
            harness.callbacks("unknown", "invalid_notification"),
            names.len() as u64
        );
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
        assert!(harness.devices.all_provisioned());
    }

    #[tokio::test]
    async fn bad_base64_is_refused() {
        let harness = Harness::new().await;
        // Not base64 at all, and base64 without its canonical padding.
        for data in ["not base64!", "QQ"] {
            let mut body = fixture_json(REGISTER);
            body["data"] = json!(data);
            assert_problem(
                harness.notify(&nidd_url(TOKEN_A), body.to_string()).await,
                StatusCode::BAD_REQUEST,
                "BAD_BASE64",
            )
            .await;
        }
        assert_eq!(harness.callbacks("uplink", "bad_base64"), 2);
    }

    #[tokio::test]
    async fn a_datagram_over_the_maximum_packet_size_is_refused() {
        let harness = Harness::new().await;
        let datagram = coap_of_length((MAX_PACKET_BITS_A / 8) as usize + 1);
        assert_problem(
            harness
                .notify(&nidd_url(TOKEN_A), uplink_body(&datagram))
                .await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        )
        .await;
        assert_eq!(harness.callbacks("uplink", "payload_too_large"), 1);
        assert_eq!(harness.dropped("mo", "oversized"), 1);
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    #[tokio::test]
    async fn a_notification_naming_another_device_is_refused() {
        let harness = Harness::new().await;
        // B's uplink on A's URL.
        assert_problem(
            harness
                .notify(&nidd_url(TOKEN_A), fixture(UPDATE_BY_MSISDN))
                .await,
            StatusCode::FORBIDDEN,
            "DEVICE_NOT_IN_CONFIGURATION",
        )
        .await;
        assert_eq!(
            harness.callbacks("uplink", "device_not_in_configuration"),
            1
        );
        // A's termination on B's URL ends nothing.
        assert_problem(
            harness
                .notify(
                    &nidd_url(TOKEN_B),
                    fixture("NiddConfigurationStatusNotification.terminated.json"),
                )
                .await,
            StatusCode::FORBIDDEN,
            "DEVICE_NOT_IN_CONFIGURATION",
        )
        .await;
        assert_eq!(
            harness.callbacks("configuration_status", "device_not_in_configuration"),
            1
        );
        assert!(harness.devices.all_provisioned());
        // Not a refusal of the datagram itself: no drop is counted.
        for reason in ["oversized", "not_coap", "endpoint_mismatch"] {
            assert_eq!(harness.dropped("mo", reason), 0, "{reason}");
        }
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    #[tokio::test]
    async fn a_datagram_that_is_not_coap_is_refused() {
        let harness = Harness::new().await;
        assert_problem(
            harness
                .notify(&nidd_url(TOKEN_A), uplink_body(&[0x00, 0x01]))
                .await,
            StatusCode::BAD_REQUEST,
            "NOT_COAP",
        )
        .await;
        assert_eq!(harness.callbacks("uplink", "not_coap"), 1);
        assert_eq!(harness.dropped("mo", "not_coap"), 1);
    }

    #[tokio::test]
    async fn a_register_for_another_endpoint_is_refused() {
        let harness = Harness::new().await;
        // The fixture's Register with `ep=urn:nai:987654321@iot.example` (same length).
        let register = fixture_datagram(REGISTER);
        let at = register.windows(9).position(|w| w == b"123456789").unwrap();
        let mut foreign = register.clone();
        foreign[at..at + 9].copy_from_slice(b"987654321");
        assert_problem(
            harness
                .notify(&nidd_url(TOKEN_A), uplink_body(&foreign))
                .await,
            StatusCode::FORBIDDEN,
            "ENDPOINT_MISMATCH",
        )
        .await;
        assert_eq!(harness.callbacks("uplink", "endpoint_mismatch"), 1);
        assert_eq!(harness.dropped("mo", "endpoint_mismatch"), 1);

        // Nothing was forwarded: the next datagram at the server is the genuine Register.
        assert_no_content(harness.notify(&nidd_url(TOKEN_A), fixture(REGISTER)).await).await;
        assert_eq!(harness.server_receives().await.0, register);
        assert_eq!(harness.metrics.mo_datagrams.get(), 1);
    }

    #[tokio::test]
    async fn every_callback_is_refused_while_shutting_down() {
        let harness = Harness::new().await;
        harness.lifecycle.begin_shutdown();
        for (url, body, kind) in [
            (nidd_url(TOKEN_A), fixture(REGISTER), "unknown"),
            (
                monitoring_url(TOKEN_A),
                fixture("MonitoringNotification.ue-reachability.json"),
                "monitoring",
            ),
            (
                triggering_url(TOKEN_A),
                fixture("DeviceTriggeringDeliveryReportNotification.success.json"),
                "trigger_report",
            ),
            // Checked before the token.
            (nidd_url("unknown"), fixture(REGISTER), "unknown"),
        ] {
            assert_problem(
                harness.notify(&url, body).await,
                StatusCode::SERVICE_UNAVAILABLE,
                "SHUTTING_DOWN",
            )
            .await;
            assert!(harness.callbacks(kind, "shutting_down") >= 1, "{url}");
        }
        assert_eq!(harness.callbacks("unknown", "shutting_down"), 2);
        assert_eq!(harness.metrics.mo_datagrams.get(), 0);
    }

    // --- monitoring and triggering ---

    #[tokio::test]
    async fn a_reachability_report_wakes_the_device() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let now = clock::now();
        {
            let mut state = device.state();
            state.mt.reachability.on_not_reachable(now);
            state.mt.retry_at = Some(now + Duration::from_secs(600));
            assert_eq!(state.mt.reachability.state(now), Reachable::Asleep);
        }
        assert_no_content(
            harness
                .notify(
                    &monitoring_url(TOKEN_A),
                    fixture("MonitoringNotification.ue-reachability.json"),
                )
                .await,
        )
        .await;
        {
            let state = device.state();
            assert_eq!(state.mt.reachability.state(clock::now()), Reachable::Awake);
            assert_eq!(state.mt.retry_at, None, "the retry wait ends");
        }
        woken(&device).await;
        assert_eq!(
            harness
                .metrics
                .reachability_events
                .with_label_values(&["report"])
                .get(),
            1
        );
        assert_eq!(harness.callbacks("monitoring", "accepted"), 1);
    }

    #[tokio::test]
    async fn a_reachability_report_keeps_the_device_awake_until_max_ue_availability_time() {
        let in_an_hour = clock::system_now() + Duration::from_secs(3600);
        let utc = humantime::format_rfc3339_seconds(in_an_hour).to_string();
        let utc = utc.trim_end_matches('Z');
        // The same moment two hours east of UTC.
        let east =
            humantime::format_rfc3339_seconds(in_an_hour + Duration::from_secs(7200)).to_string();
        let east = east.trim_end_matches('Z');
        for spelling in [
            format!("{utc}Z"),
            format!("{utc}+00:00"),
            format!("{east}+02:00"),
        ] {
            let harness = Harness::new().await;
            let device = harness.device(DEVICE_A);
            let mut body = fixture_json("MonitoringNotification.ue-reachability.json");
            body["monitoringEventReports"][0]["maxUEAvailabilityTime"] = json!(spelling);
            assert_no_content(
                harness
                    .notify(&monitoring_url(TOKEN_A), body.to_string())
                    .await,
            )
            .await;
            let now = clock::now();
            let until = device.state().mt.reachability.awake_until(now).unwrap();
            assert!(
                until > now + Duration::from_secs(3000),
                "{spelling}: awake for the hour, not the 20 s active window"
            );
        }
    }

    #[tokio::test]
    async fn the_networks_timers_say_when_a_sleeping_device_is_back() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let mut body = fixture_json("MonitoringNotification.ue-reachability.json");
        body["monitoringEventReports"][0]["monitoringType"] = json!("LOSS_OF_CONNECTIVITY");
        body["monitoringEventReports"][0]["idleStatusInfo"] =
            json!({"activeTime": 6, "periodicAUTimer": 300});
        body["appliedParam"] = json!({"maximumLatency": 600});
        // A schema-valid integer far beyond u64 is no reason to refuse the report.
        let mut unreadable = body["monitoringEventReports"][0].clone();
        unreadable["idleStatusInfo"] = json!({"periodicAUTimer": 1e30});
        body["monitoringEventReports"]
            .as_array_mut()
            .unwrap()
            .push(unreadable);
        assert_no_content(
            harness
                .notify(&monitoring_url(TOKEN_A), body.to_string())
                .await,
        )
        .await;
        let now = clock::now();
        let back = device.state().mt.reachability.expected_wake(now).unwrap();
        // The shorter of the two, from when it went to sleep (just now).
        assert!(
            back > now + Duration::from_secs(290) && back <= now + Duration::from_secs(300),
            "{:?}",
            back - now
        );
    }

    #[tokio::test]
    async fn loss_of_connectivity_marks_the_device_lost() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let mut body = fixture_json("MonitoringNotification.ue-reachability.json");
        body["monitoringEventReports"][0]["monitoringType"] = json!("LOSS_OF_CONNECTIVITY");
        assert_no_content(
            harness
                .notify(&monitoring_url(TOKEN_A), body.to_string())
                .await,
        )
        .await;
        assert_eq!(
            device.state().mt.reachability.state(clock::now()),
            Reachable::Lost
        );
        assert_eq!(
            harness
                .metrics
                .reachability_events
                .with_label_values(&["loss_of_connectivity"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn cancel_ind_drops_the_monitoring_subscription() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let subscription =
            fixture_json("MonitoringNotification.ue-reachability.json")["subscription"]
                .as_str()
                .unwrap()
                .to_string();
        let mut nidd = nidd_of(&harness, DEVICE_A).unwrap();
        nidd.monitoring_subscription = Some(StoredSubscription {
            location: subscription.clone(),
            expires_at_ms: clock::unix_ms() + 86_400_000,
        });
        harness.devices.set_nidd(&device, Some(nidd)).unwrap();

        let body = json!({"subscription": subscription, "cancelInd": true});
        assert_no_content(
            harness
                .notify(&monitoring_url(TOKEN_A), body.to_string())
                .await,
        )
        .await;
        let nidd = nidd_of(&harness, DEVICE_A).unwrap();
        assert_eq!(nidd.monitoring_subscription, None);
        assert_eq!(
            nidd.location.as_str(),
            CONFIGURATION_A,
            "the configuration stays"
        );
        let id: DeviceId = DEVICE_A.parse().unwrap();
        let stored = harness.devices.store().device(&id).unwrap().unwrap();
        assert_eq!(stored.nidd.unwrap().monitoring_subscription, None);
        assert!(harness.devices.all_provisioned());
    }

    #[tokio::test]
    async fn a_monitoring_report_for_another_device_changes_nothing() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_B);
        // A's report on B's URL.
        assert_problem(
            harness
                .notify(
                    &monitoring_url(TOKEN_B),
                    fixture("MonitoringNotification.ue-reachability.json"),
                )
                .await,
            StatusCode::FORBIDDEN,
            "DEVICE_NOT_IN_CONFIGURATION",
        )
        .await;
        assert_eq!(
            device.state().mt.reachability.state(clock::now()),
            Reachable::Unknown
        );
        assert_eq!(
            harness.callbacks("monitoring", "device_not_in_configuration"),
            1
        );
        // A report naming no device is about the device of the URL.
        let mut body = fixture_json("MonitoringNotification.ue-reachability.json");
        body["monitoringEventReports"][0]
            .as_object_mut()
            .unwrap()
            .remove("externalId");
        assert_no_content(
            harness
                .notify(&monitoring_url(TOKEN_B), body.to_string())
                .await,
        )
        .await;
        assert_eq!(
            device.state().mt.reachability.state(clock::now()),
            Reachable::Awake
        );
    }

    #[tokio::test]
    async fn a_broken_monitoring_notification_is_refused() {
        let harness = Harness::new().await;
        let mut both = fixture_json("MonitoringNotification.ue-reachability.json");
        both["monitoringEventReports"][0]["msisdn"] = json!(DEVICE_B);
        for body in [json!({"monitoringEventReports": []}), both] {
            assert_problem(
                harness
                    .notify(&monitoring_url(TOKEN_A), body.to_string())
                    .await,
                StatusCode::BAD_REQUEST,
                "INVALID_NOTIFICATION",
            )
            .await;
        }
        assert_eq!(harness.callbacks("monitoring", "invalid_notification"), 2);
    }

    #[tokio::test]
    async fn a_trigger_delivery_report_is_counted() {
        let harness = Harness::new().await;
        assert_no_content(
            harness
                .notify(
                    &triggering_url(TOKEN_A),
                    fixture("DeviceTriggeringDeliveryReportNotification.success.json"),
                )
                .await,
        )
        .await;
        let triggers = |outcome: &str| {
            harness
                .metrics
                .device_triggers
                .with_label_values(&[outcome])
                .get()
        };
        assert_eq!(triggers("report_success"), 1);
        assert_eq!(harness.callbacks("trigger_report", "accepted"), 1);

        let mut unknown = fixture_json("DeviceTriggeringDeliveryReportNotification.success.json");
        unknown["result"] = json!("SOMETHING_NEW");
        assert_no_content(
            harness
                .notify(&triggering_url(TOKEN_A), unknown.to_string())
                .await,
        )
        .await;
        assert_eq!(triggers("report_other"), 1);

        assert_problem(
            harness
                .notify(
                    &triggering_url(TOKEN_A),
                    json!({"transaction": "t"}).to_string(),
                )
                .await,
            StatusCode::BAD_REQUEST,
            "INVALID_NOTIFICATION",
        )
        .await;
        assert_eq!(
            harness.callbacks("trigger_report", "invalid_notification"),
            1
        );
    }

    /// An uplink of `member` (an Update) as the SCEF sends it on the group's URL.
    fn member_uplink(member: &str) -> String {
        json!({
            "niddConfiguration": GROUP_CONFIGURATION,
            "externalId": member,
            "data": BASE64.encode(fixture_datagram(UPDATE_BY_MSISDN)),
        })
        .to_string()
    }

    /// A Read queued for `device` and pending at the SCEF at `link`.
    async fn pending_read_at(harness: &Harness, device: &Arc<Device>, link: &str) {
        // Each call another Read (message ID from the link), not a retransmission.
        let mut read = fixture_datagram(READ);
        let message_id = u16::from(link.as_bytes().last().copied().unwrap_or_default());
        read[2..4].copy_from_slice(&message_id.to_be_bytes());
        let from = harness.server.local_addr().unwrap();
        harness
            .downlinks
            .receive(device, read, from, clock::unix_ms());
        harness.downlinks.commit().await.expect("committed");
        // Pacing may hold it for a moment after the device's previous delivery.
        for _ in 0..3 {
            let wait = {
                let now = clock::now();
                let mut state = device.state();
                let (decision, _) = state.mt.decide(now, clock::unix_ms(), true);
                match decision {
                    Decision::Send(item) => {
                        let effect =
                            state
                                .mt
                                .on_outcome(item.seq, Outcome::Pending(link.into()), now);
                        harness.downlinks.apply(device, &effect);
                        return;
                    }
                    Decision::Wait(Some(until)) => until,
                    other => panic!("the queued Read is not sent: {other:?}"),
                }
            };
            tokio::time::sleep_until(wait.into()).await;
        }
        panic!("the queued Read is never sent");
    }

    #[tokio::test]
    async fn a_group_members_first_uplink_creates_it_on_the_groups_configuration() {
        let harness = Harness::new().await;
        let member = "meter-1@fleet.example";
        assert_no_content(
            harness
                .notify(&harness.group_path(), member_uplink(member))
                .await,
        )
        .await;
        let device = harness.device(member);
        let (datagram, from) = harness.server_receives().await;
        assert_eq!(datagram, fixture_datagram(UPDATE_BY_MSISDN));
        assert_eq!(
            from,
            device.socket.local_addr(),
            "from the member's own socket"
        );
        assert_eq!(
            device.group().map(|g| g.id.to_string()).as_deref(),
            Some(GROUP)
        );
        assert_eq!(
            device
                .state()
                .nidd
                .as_ref()
                .map(|n| n.location.to_string())
                .as_deref(),
            Some(GROUP_CONFIGURATION),
            "MT goes through the group's configuration"
        );
        assert!(harness.group.has_member(&device.id));
        let record = harness.devices.store().device(&device.id).unwrap().unwrap();
        assert_eq!(record.group.as_deref(), Some(GROUP));
        assert!(record.onboarded);
        // Its retransmission creates nothing more, and is not forwarded while the server's
        // answer to the first copy is awaited.
        assert_no_content(
            harness
                .notify(&harness.group_path(), member_uplink(member))
                .await,
        )
        .await;
        assert_eq!(
            harness
                .metrics
                .exchange_decisions
                .with_label_values(&["mo", "awaiting_server_answer"])
                .get(),
            1
        );
        let created = harness
            .metrics
            .onboarding_requests
            .with_label_values(&["group_uplink", "created"])
            .get();
        assert_eq!(created, 1);
        assert_eq!(harness.devices.len(), 3);
    }

    #[tokio::test]
    async fn a_group_uplink_outside_the_policy_or_from_a_non_member_is_refused() {
        let harness = Harness::new().await;
        assert_problem(
            harness
                .notify(
                    &harness.group_path(),
                    member_uplink("meter-1@other.example"),
                )
                .await,
            StatusCode::FORBIDDEN,
            "ONBOARDING_NOT_ALLOWED",
        )
        .await;
        // A device the bridge serves on its own configuration is not the group's.
        assert_problem(
            harness
                .notify(&harness.group_path(), member_uplink(DEVICE_A))
                .await,
            StatusCode::FORBIDDEN,
            "DEVICE_NOT_IN_CONFIGURATION",
        )
        .await;
        assert_eq!(harness.devices.len(), 2, "nobody was created");
    }

    #[tokio::test]
    async fn group_delivery_results_settle_each_members_pending_delivery() {
        let harness = Harness::new().await;
        for member in ["meter-1@fleet.example", "meter-2@fleet.example"] {
            assert_no_content(
                harness
                    .notify(&harness.group_path(), member_uplink(member))
                    .await,
            )
            .await;
            harness.server_receives().await;
        }
        let (one, two) = (
            harness.device("meter-1@fleet.example"),
            harness.device("meter-2@fleet.example"),
        );
        let link = format!("{GROUP_CONFIGURATION}/downlink-data-deliveries/d1");
        pending_read_at(&harness, &one, &link).await;
        pending_read_at(&harness, &two, &link).await;
        let gmd = json!({
            "niddDownlinkDataTransfer": link,
            "gmdResults": [
                {"externalId": "meter-1@fleet.example", "deliveryStatus": "SUCCESS"},
                {"externalId": "meter-2@fleet.example", "deliveryStatus": "FAILURE_TEMPORARILY_NOT_REACHABLE"},
                {"externalId": "stranger@fleet.example", "deliveryStatus": "SUCCESS"},
            ],
        });
        assert_no_content(harness.notify(&harness.group_path(), gmd.to_string()).await).await;
        {
            let state = one.state();
            assert_eq!(state.mt.queue.pending_count(), 0);
            assert_eq!(state.mt.queue.waiting().count(), 0, "delivered");
        }
        {
            let state = two.state();
            assert_eq!(state.mt.queue.pending_count(), 0);
            assert_eq!(state.mt.queue.waiting().count(), 1, "taken back to retry");
        }

        // One member's delivery settled by a plain status notification on the group's URL.
        let single = format!("{GROUP_CONFIGURATION}/downlink-data-deliveries/d2");
        pending_read_at(&harness, &one, &single).await;
        let status = json!({"niddDownlinkDataTransfer": single, "deliveryStatus": "SUCCESS"});
        assert_no_content(
            harness
                .notify(&harness.group_path(), status.to_string())
                .await,
        )
        .await;
        assert_eq!(one.state().mt.queue.pending_count(), 0);
        assert_eq!(harness.callbacks("group_delivery", "accepted"), 1);
        assert_eq!(harness.callbacks("delivery_status", "accepted"), 1);
    }

    #[tokio::test]
    async fn a_status_on_the_groups_url_changes_the_group_and_its_members() {
        let harness = Harness::new().await;
        assert_no_content(
            harness
                .notify(
                    &harness.group_path(),
                    member_uplink("meter-1@fleet.example"),
                )
                .await,
        )
        .await;
        harness.server_receives().await;
        let status = json!({
            "niddConfiguration": GROUP_CONFIGURATION,
            "externalId": "meter-1@fleet.example",
            "status": "SUSPENDED",
        });
        assert_no_content(
            harness
                .notify(&harness.group_path(), status.to_string())
                .await,
        )
        .await;
        assert_eq!(
            harness.group.nidd().unwrap().status,
            Some(NiddStatus::Other("SUSPENDED".into()))
        );
        assert_eq!(
            harness
                .device("meter-1@fleet.example")
                .state()
                .nidd
                .as_ref()
                .unwrap()
                .status,
            Some(NiddStatus::Other("SUSPENDED".into()))
        );
        let foreign = json!({
            "niddConfiguration": CONFIGURATION_A,
            "externalId": "meter-1@fleet.example",
            "status": "ACTIVE",
        });
        assert_problem(
            harness
                .notify(&harness.group_path(), foreign.to_string())
                .await,
            StatusCode::FORBIDDEN,
            "FOREIGN_CONFIGURATION",
        )
        .await;
    }
}
