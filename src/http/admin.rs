//! The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz` and the device API
//! (`/api/v1/devices`: inspect, add, change, remove (`changes`), purge a queue, rotate
//! callback URLs) for operators, behind the Host check and bearer token of `auth`.

pub(crate) mod auth;
mod changes;

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use crate::clock;
use crate::config::BufferOwner;
use crate::devices::groups::{Group, GroupTable};
use crate::devices::{Device, DeviceTable, NiddState};
use crate::fleet::{Fleet, Source};
use crate::http::Lifecycle;
use crate::http::problem::{method_not_allowed, problem_response};
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mt::Downlinks;
use crate::provision::CallbackRotation;
use crate::reachability::{QueueMode, State as Reachable};
use auth::AdminGuard;

/// Largest request body on the admin listener: a bulk add of some 50 000 devices.
pub(crate) const ADMIN_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// What the admin API needs of the rest of the bridge.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) devices: Arc<DeviceTable>,
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) downlinks: Arc<Downlinks>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Lifecycle,
    /// Host check and bearer token, in front of every route.
    pub(crate) guard: AdminGuard,
    pub(crate) rotation: CallbackRotation,
    /// The NIDD Configuration Trigger URL to give the NEF (a capability URL: admin only).
    pub(crate) trigger_url: Option<String>,
    pub(crate) groups: Arc<GroupTable>,
}

pub(crate) fn router(shared: AdminState) -> Router {
    let guard = shared.guard.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/api/v1/devices",
            get(list_devices).post(changes::add_devices),
        )
        .route("/api/v1/fleet", get(changes::fleet_counts))
        .route("/api/v1/onboarding", get(changes::onboarding))
        .route("/api/v1/groups", get(list_groups).post(changes::add_group))
        .route(
            "/api/v1/groups/{group}",
            get(changes::show_group).delete(changes::remove_group),
        )
        .route("/api/v1/store/quarantine", get(list_quarantine))
        .route(
            "/api/v1/devices/{device}",
            get(show_device)
                .patch(changes::change_device)
                .delete(changes::remove_device),
        )
        .route(
            "/api/v1/devices/{device}/queue",
            axum::routing::delete(purge_queue),
        )
        .route(
            "/api/v1/devices/{device}/callback-token/rotate",
            post(rotate_callback_token),
        )
        // Every error answer of this listener is a problem document, axum's own ones too
        // (after the routes: the 405 fallback applies to the routes already added).
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async {
            problem_response(StatusCode::NOT_FOUND, "NOT_FOUND", "no such path".into())
        })
        .with_state(shared)
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(guard, auth::check))
}

/// The device a path names, or why it names none (the `detail` of a 400 `BAD_DEVICE_ID`): a
/// segment that is not an identity, or one axum cannot read (percent-encoded bytes that are
/// not UTF-8).
fn device_of(path: Result<Path<String>, PathRejection>) -> Result<DeviceId, String> {
    let Path(device) = path.map_err(|rejection| rejection.body_text())?;
    device
        .parse()
        .map_err(|error: crate::identity::IdentityError| error.to_string())
}

fn bad_device_id(detail: String) -> Response {
    problem_response(StatusCode::BAD_REQUEST, "BAD_DEVICE_ID", detail)
}

async fn metrics(State(shared): State<AdminState>) -> Response {
    refresh_gauges(&shared, clock::now(), clock::unix_ms());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Readiness {
    ready: bool,
    devices: usize,
    devices_with_configuration: usize,
    /// Devices whose last MT delivery the SCEF refused with 403 (shown when there are any).
    #[serde(skip_serializing_if = "is_zero")]
    devices_forbidden: usize,
    /// Why the store cannot write (shown while it cannot).
    #[serde(skip_serializing_if = "Option::is_none")]
    store_unhealthy: Option<StoreUnhealthy>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StoreUnhealthy {
    /// The last failure of a write or flush.
    error: Option<String>,
    /// Seconds since the first failure of this spell.
    for_s: Option<f64>,
    /// The database was reopened and is being written again from memory.
    recovering: bool,
}

fn store_unhealthy(shared: &AdminState, now_ms: u64) -> Option<StoreUnhealthy> {
    let health = shared.devices.store().health();
    (!health.healthy).then(|| StoreUnhealthy {
        error: health.error,
        for_s: health
            .since_ms
            .map(|since| now_ms.saturating_sub(since) as f64 / 1000.0),
        recovering: health.recovering,
    })
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

/// Devices the SCEF forbids MT for (403 on the last delivery); also sets the gauge.
fn forbidden_count(shared: &AdminState) -> usize {
    let count = shared
        .devices
        .iter()
        .filter(|d| d.state().mt.forbidden)
        .count();
    shared
        .metrics
        .devices_forbidden
        .set(i64::try_from(count).unwrap_or(i64::MAX));
    count
}

/// Ready when not shutting down, every device has a usable NIDD configuration, the SCEF
/// forbids none of them and the store can write.
async fn readyz(State(shared): State<AdminState>) -> Response {
    let forbidden = forbidden_count(&shared);
    let store_unhealthy = store_unhealthy(&shared, clock::unix_ms());
    let body = Readiness {
        ready: !shared.lifecycle.is_shutting_down()
            && shared.devices.all_provisioned()
            && forbidden == 0
            && store_unhealthy.is_none(),
        devices: shared.devices.len(),
        devices_with_configuration: shared.devices.provisioned_count(),
        devices_forbidden: forbidden,
        store_unhealthy,
    };
    let status = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceView {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    msisdn: Option<String>,
    endpoint_name: Option<String>,
    /// `file` for a `[[devices]]` entry, `api` for a device added through this API,
    /// `onboarded` for one created on demand.
    source: Source,
    /// The group whose configuration carries the device's traffic, if it is a member.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    udp_address: String,
    nidd_configuration: Option<ConfigurationView>,
    /// A callback URL rotation was begun and not completed: both URLs are accepted.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    callback_rotation_pending: bool,
    mt: MtView,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MtView {
    buffer_owner: BufferOwner,
    reachability: Reachable,
    queue_mode: QueueMode,
    /// Seconds the current awake window still lasts.
    awake_for_s: Option<f64>,
    /// Seconds since the device went to sleep.
    asleep_for_s: Option<f64>,
    /// Seconds until the next wake-up expected from the device's rhythm.
    next_expected_wake_in_s: Option<f64>,
    queue_depth: usize,
    queue_bytes: usize,
    oldest_queued_age_s: Option<f64>,
    pending_deliveries: usize,
    retry_in_s: Option<f64>,
    monitoring_subscription: Option<String>,
    /// The device's NIDD round trip (a downlink to its answer), smoothed; the expected one
    /// until `round_trip_measured`.
    round_trip_s: f64,
    round_trip_measured: bool,
    /// How the queue went out in the last wake-up that had MT waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_wakeup: Option<WakeupView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WakeupView {
    waiting: usize,
    delivered: usize,
    left_for_later: usize,
    wake_to_last_delivery_s: Option<f64>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationView {
    #[serde(rename = "self")]
    self_link: String,
    status: String,
    maximum_packet_size_bytes: Option<u64>,
}

fn configuration_view(nidd: NiddState) -> ConfigurationView {
    ConfigurationView {
        self_link: nidd.location.to_string(),
        status: nidd
            .status
            .map_or_else(|| "UNKNOWN".to_string(), |s| s.as_str().to_string()),
        maximum_packet_size_bytes: nidd.maximum_packet_size_bits.map(|bits| bits / 8),
    }
}

/// One group as `GET /api/v1/groups` shows it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupView {
    external_group_id: String,
    /// `file` for a `[[groups]]` entry, `api` for one added through this API.
    source: Source,
    nidd_configuration: Option<ConfigurationView>,
    /// Members the bridge serves now.
    members: usize,
}

fn group_view(group: &Group) -> GroupView {
    GroupView {
        external_group_id: group.id.to_string(),
        source: if group.is_from_api() {
            Source::Api
        } else {
            Source::File
        },
        nidd_configuration: group.nidd().map(configuration_view),
        members: group.member_count(),
    }
}

async fn list_groups(State(shared): State<AdminState>) -> Response {
    let mut groups: Vec<GroupView> = shared.groups.iter().map(|g| group_view(&g)).collect();
    groups.sort_by(|a, b| a.external_group_id.cmp(&b.external_group_id));
    Json(groups).into_response()
}

fn view(device: &Device, now: Instant, now_ms: u64) -> DeviceView {
    let state = device.state();
    let nidd = state.nidd.clone();
    let mt = &state.mt;
    let seconds = |d: std::time::Duration| (d.as_millis() as f64) / 1000.0;
    let mt = MtView {
        buffer_owner: mt.owner,
        reachability: mt.reachability.state(now),
        queue_mode: mt.reachability.queue_mode(),
        awake_for_s: mt.reachability.awake_until(now).map(|t| seconds(t - now)),
        asleep_for_s: mt
            .reachability
            .asleep_since(now)
            .map(|t| seconds(now.saturating_duration_since(t))),
        next_expected_wake_in_s: mt
            .reachability
            .next_expected_wake(now)
            .map(|t| seconds(t.saturating_duration_since(now))),
        queue_depth: mt.queue.waiting().count(),
        queue_bytes: mt.queue.waiting_bytes(),
        oldest_queued_age_s: mt
            .queue
            .oldest_enqueued_ms()
            .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0),
        pending_deliveries: mt.queue.pending_count(),
        retry_in_s: mt.retry_at.filter(|t| *t > now).map(|t| seconds(t - now)),
        monitoring_subscription: nidd
            .as_ref()
            .and_then(|n| n.monitoring_subscription.as_ref())
            .map(|s| s.location.clone()),
        round_trip_s: seconds(state.exchanges.round_trip()),
        round_trip_measured: state.exchanges.round_trip_measured(),
        last_wakeup: mt.last_wakeup().map(|w| WakeupView {
            waiting: w.waiting,
            delivered: w.delivered,
            left_for_later: w.left_for_later,
            wake_to_last_delivery_s: w.wake_to_last_delivery.map(seconds),
        }),
    };
    drop(state);
    DeviceView {
        id: device.id.canonical().to_string(),
        external_id: device.id.external_id().map(ToString::to_string),
        msisdn: device.id.msisdn().map(ToString::to_string),
        endpoint_name: device.endpoint_name(),
        source: Source::of(device),
        group: device.group().map(|g| g.id.to_string()),
        udp_address: device.socket.local_addr().to_string(),
        nidd_configuration: nidd.map(configuration_view),
        callback_rotation_pending: device.callback_tokens().pending().is_some(),
        mt,
    }
}

async fn list_devices(State(shared): State<AdminState>) -> Json<Vec<DeviceView>> {
    let (now, now_ms) = (clock::now(), clock::unix_ms());
    let mut devices: Vec<DeviceView> = shared
        .devices
        .iter()
        .map(|d| view(&d, now, now_ms))
        .collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    Json(devices)
}

async fn show_device(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match device_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_device_id(detail),
    };
    match shared.devices.get(&id) {
        Some(device) => Json(view(&device, clock::now(), clock::unix_ms())).into_response(),
        None => problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
        ),
    }
}

/// The records that could not be decoded and were moved out of their trees.
async fn list_quarantine(State(shared): State<AdminState>) -> Response {
    match shared.devices.store().quarantined() {
        Ok(records) => Json(records).into_response(),
        Err(error) => problem_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "STORE_UNAVAILABLE",
            error.to_string(),
        ),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Purged {
    purged: usize,
}

/// Drops every datagram queued for a device (pending ones at the SCEF included), counted as
/// `purged`.
async fn purge_queue(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match device_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_device_id(detail),
    };
    let Some(device) = shared.devices.get(&id) else {
        return problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
        );
    };
    let count = shared.downlinks.purge(&device).await;
    tracing::info!(device = %id, purged = count, "MT queue purged by the operator");
    Json(Purged { purged: count }).into_response()
}

/// Gives the device new callback URLs (see `provision::rotate`): 200 with them once the SCEF
/// took the new one and the old one is retired; a problem (502/503/409) otherwise, with both
/// URLs still valid and the rotation continued by asking again.
async fn rotate_callback_token(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match device_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_device_id(detail),
    };
    let Some(device) = shared.devices.get(&id) else {
        return problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
        );
    };
    match shared.rotation.rotate(&device).await {
        // The answer carries the new capability URLs: never cached on the way.
        Ok(rotated) => ([(header::CACHE_CONTROL, "no-store")], Json(rotated)).into_response(),
        Err(error) => {
            let (status, cause) = error.status_and_cause();
            problem_response(status, cause, error.to_string())
        }
    }
}

/// Queue and reachability gauges over all devices (set when metrics are scraped).
#[derive(Debug, Default, PartialEq)]
struct Gauges {
    queue_depth: i64,
    pending_deliveries: i64,
    reachable: i64,
    oldest_queued_age_s: f64,
}

fn gauges(devices: impl Iterator<Item = Arc<Device>>, now: Instant, now_ms: u64) -> Gauges {
    let mut gauges = Gauges::default();
    let mut oldest = None::<u64>;
    for device in devices {
        let state = device.state();
        gauges.queue_depth += state.mt.queue.waiting().count() as i64;
        gauges.pending_deliveries += state.mt.queue.pending_count() as i64;
        gauges.reachable += i64::from(state.mt.reachability.is_reachable(now));
        if let Some(enqueued) = state.mt.queue.oldest_enqueued_ms() {
            oldest = Some(oldest.map_or(enqueued, |o| o.min(enqueued)));
        }
    }
    gauges.oldest_queued_age_s = oldest.map_or(0.0, |o| now_ms.saturating_sub(o) as f64 / 1000.0);
    gauges
}

fn refresh_gauges(shared: &AdminState, now: Instant, now_ms: u64) {
    forbidden_count(shared);
    let gauges = gauges(shared.devices.iter(), now, now_ms);
    let metrics = &shared.metrics;
    metrics.mt_queue_depth.set(gauges.queue_depth);
    metrics.mt_pending_deliveries.set(gauges.pending_deliveries);
    metrics.devices_reachable.set(gauges.reachable);
    metrics
        .mt_queue_oldest_age_seconds
        .set(gauges.oldest_queued_age_s);
    metrics
        .devices_onboarding
        .set(i64::try_from(shared.devices.onboarding_count()).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    //! The admin router driven in process over the fixtures' devices A (External Identifier)
    //! and B (MSISDN); see `test_support`.

    use axum::http::{Method, StatusCode};
    use serde_json::json;

    use super::*;
    use crate::delivery::{Decision, Outcome};
    use crate::devices::NiddState;
    use crate::http::test_support::{
        CONFIGURATION_A, CONFIGURATION_B, DEVICE_A, DEVICE_B, Harness, MAX_PACKET_BITS_A, TOKEN_A,
        active_configuration, assert_no_content, assert_problem, fixture_datagram, read,
        uplink_with_message_id,
    };
    use crate::t8::NiddStatus;

    const READ: &str = "NiddDownlinkDataTransfer.request-read.json";
    const REGISTER_ACK: &str = "NiddDownlinkDataTransfer.request.json";

    /// The LwM2M server stand-in sends `fixture`'s datagram to `device`'s socket at `now_ms`.
    /// The LwM2M server stand-in sends a datagram to the device, and the group commit that
    /// follows makes it durable.
    async fn server_sends(harness: &Harness, device: &Arc<Device>, fixture: &str, now_ms: u64) {
        let from = harness.server.local_addr().unwrap();
        harness
            .downlinks
            .receive(device, fixture_datagram(fixture), from, now_ms);
        harness.downlinks.commit().await.expect("committed");
    }

    async fn get(harness: &Harness, path: &str) -> (StatusCode, serde_json::Value) {
        let (status, _, body) = read(harness.admin(Method::GET, path).await).await;
        (status, body)
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let harness = Harness::new().await;
        let (status, _, body) = read(harness.admin(Method::GET, "/healthz").await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!("ok"));
    }

    #[tokio::test]
    async fn readyz_counts_devices_the_scef_forbids() {
        let harness = Harness::new().await;
        let a = harness.device(DEVICE_A);
        for (device, location) in [(DEVICE_A, CONFIGURATION_A), (DEVICE_B, CONFIGURATION_B)] {
            let device = harness.device(device);
            harness
                .devices
                .set_nidd(&device, Some(active_configuration(location, None)))
                .unwrap();
        }
        assert_eq!(get(&harness, "/readyz").await.0, StatusCode::OK);
        let now = clock::now();
        a.state().mt.on_outcome(1, Outcome::Forbidden, now);
        assert_eq!(
            get(&harness, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ready": false, "devices": 2, "devicesWithConfiguration": 2, "devicesForbidden": 1})
            )
        );
        let (_, _, text) = read(harness.admin(Method::GET, "/metrics").await).await;
        assert!(
            text.as_str()
                .is_some_and(|t| t.contains("nidd_bridge_devices_forbidden 1")),
            "{text}"
        );
        // The SCEF takes an MT again: ready.
        a.state().mt.on_outcome(1, Outcome::Delivered, now);
        assert_eq!(get(&harness, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn readyz_is_503_while_the_store_cannot_write_and_200_when_it_can() {
        let harness = Harness::new().await;
        let a = harness.device(DEVICE_A);
        assert_eq!(get(&harness, "/readyz").await.0, StatusCode::OK);
        harness.store_faults.disk_full(true);
        // Any write of the store fails: here the queue mode a Register stated.
        harness.devices.set_queue_mode(&a, QueueMode::On);
        let (status, body) = get(&harness, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["ready"], false);
        let unhealthy = &body["storeUnhealthy"];
        assert!(
            unhealthy["error"]
                .as_str()
                .is_some_and(|e| e.contains("No space left on device")),
            "{body}"
        );
        assert!(unhealthy["forS"].as_f64().is_some(), "{body}");
        assert_eq!(unhealthy["recovering"], false);
        let (_, _, text) = read(harness.admin(Method::GET, "/metrics").await).await;
        assert!(
            text.as_str()
                .is_some_and(|t| t.contains("nidd_bridge_store_healthy 0")),
            "{text}"
        );

        // Room again: the next write, once flushed, makes it ready.
        harness.store_faults.disk_full(false);
        harness.devices.set_queue_mode(&a, QueueMode::Off);
        harness.devices.store().flush().await.unwrap();
        let (status, body) = get(&harness, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.get("storeUnhealthy").is_none(), "{body}");
    }

    #[tokio::test]
    async fn the_quarantine_lists_records_that_could_not_be_decoded() {
        let harness = Harness::new().await;
        let (status, body) = get(&harness, "/api/v1/store/quarantine").await;
        assert_eq!((status, body), (StatusCode::OK, json!([])));
        let store = harness.devices.store();
        store
            .tree(crate::store::DEVICES_TREE)
            .unwrap()
            .insert(b"999@iot.example", b"not json".to_vec())
            .unwrap();
        assert_eq!(store.devices().unwrap().len(), 2);
        let (status, body) = get(&harness, "/api/v1/store/quarantine").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body[0]["tree"], "devices");
        assert_eq!(body[0]["key"], "999@iot.example");
        assert_eq!(body[0]["valueHex"], hex::encode(b"not json"));
        assert!(body[0]["reason"].is_string());
        assert!(body[0]["quarantinedAtMs"].is_u64());
    }

    #[tokio::test]
    async fn readyz_waits_for_every_usable_configuration_and_fails_when_shutting_down() {
        let harness = Harness::new().await;
        let (a, b) = (harness.device(DEVICE_A), harness.device(DEVICE_B));
        harness.devices.set_nidd(&a, None).unwrap();
        harness.devices.set_nidd(&b, None).unwrap();
        let readiness = |ready: bool, with: usize| json!({"ready": ready, "devices": 2, "devicesWithConfiguration": with});

        assert_eq!(
            get(&harness, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, readiness(false, 0))
        );
        let configuration_a = active_configuration(CONFIGURATION_A, None);
        harness
            .devices
            .set_nidd(&a, Some(configuration_a.clone()))
            .unwrap();
        assert_eq!(
            get(&harness, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, readiness(false, 1))
        );
        harness
            .devices
            .set_nidd(&b, Some(active_configuration(CONFIGURATION_B, None)))
            .unwrap();
        assert_eq!(
            get(&harness, "/readyz").await,
            (StatusCode::OK, readiness(true, 2))
        );

        // A terminated configuration is not usable.
        let terminated = NiddState {
            status: Some(NiddStatus::Terminated),
            ..configuration_a.clone()
        };
        harness.devices.set_nidd(&a, Some(terminated)).unwrap();
        assert_eq!(
            get(&harness, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, readiness(false, 1))
        );
        harness.devices.set_nidd(&a, Some(configuration_a)).unwrap();
        assert_eq!(get(&harness, "/readyz").await.0, StatusCode::OK);

        harness.lifecycle.begin_shutdown();
        assert_eq!(
            get(&harness, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, readiness(false, 2))
        );
    }

    #[tokio::test]
    async fn the_device_list_shows_every_device() {
        let harness = Harness::new().await;
        let (status, body) = get(&harness, "/api/v1/devices").await;
        assert_eq!(status, StatusCode::OK);
        let devices = body.as_array().unwrap();
        assert_eq!(devices.len(), 2);

        let a = &devices[0];
        assert_eq!(a["id"], DEVICE_A);
        assert_eq!(a["externalId"], DEVICE_A);
        assert!(a.get("msisdn").is_none());
        assert_eq!(a["endpointName"], format!("urn:nai:{DEVICE_A}"));
        assert_eq!(
            a["udpAddress"],
            harness.device(DEVICE_A).socket.local_addr().to_string()
        );
        assert_eq!(
            a["niddConfiguration"],
            json!({
                "self": CONFIGURATION_A,
                "status": "ACTIVE",
                "maximumPacketSizeBytes": MAX_PACKET_BITS_A / 8,
            })
        );
        assert_eq!(a["mt"]["bufferOwner"], "bridge");
        assert_eq!(a["mt"]["reachability"], "unknown");
        assert_eq!(a["mt"]["queueMode"], "unknown");
        assert_eq!(a["mt"]["queueDepth"], 0);
        assert_eq!(a["mt"]["pendingDeliveries"], 0);

        let b = &devices[1];
        assert_eq!(b["id"], DEVICE_B);
        assert_eq!(b["msisdn"], DEVICE_B);
        assert!(b.get("externalId").is_none());
        assert_eq!(b["endpointName"], serde_json::Value::Null);
        assert_eq!(b["niddConfiguration"]["self"], CONFIGURATION_B);
        assert_eq!(
            b["niddConfiguration"]["maximumPacketSizeBytes"],
            serde_json::Value::Null
        );
    }

    #[tokio::test]
    async fn one_device_is_found_by_any_spelling_of_its_identity() {
        let harness = Harness::new().await;
        let (status, by_urn) = get(&harness, &format!("/api/v1/devices/urn:nai:{DEVICE_A}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(by_urn["id"], DEVICE_A);
        let (status, bare) = get(&harness, &format!("/api/v1/devices/{DEVICE_A}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bare, by_urn);

        let (status, by_msisdn) = get(&harness, &format!("/api/v1/devices/{DEVICE_B}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(by_msisdn["id"], DEVICE_B);
        assert_eq!(by_msisdn["msisdn"], DEVICE_B);
        let (status, international) =
            get(&harness, &format!("/api/v1/devices/%2B{DEVICE_B}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(international["id"], DEVICE_B);
    }

    #[tokio::test]
    async fn bad_and_unknown_device_ids_are_problems() {
        let harness = Harness::new().await;
        for method in [Method::GET, Method::DELETE] {
            let suffix = if method == Method::DELETE {
                "/queue"
            } else {
                ""
            };
            assert_problem(
                harness
                    .admin(
                        method.clone(),
                        &format!("/api/v1/devices/not-a-device{suffix}"),
                    )
                    .await,
                StatusCode::BAD_REQUEST,
                "BAD_DEVICE_ID",
            )
            .await;
            assert_problem(
                harness
                    .admin(
                        method.clone(),
                        &format!("/api/v1/devices/987654321@iot.example{suffix}"),
                    )
                    .await,
                StatusCode::NOT_FOUND,
                "UNKNOWN_DEVICE",
            )
            .await;
            // A segment axum cannot decode (not UTF-8) is a bad identity too, as problem+json.
            assert_problem(
                harness
                    .admin(method.clone(), &format!("/api/v1/devices/%FF{suffix}"))
                    .await,
                StatusCode::BAD_REQUEST,
                "BAD_DEVICE_ID",
            )
            .await;
        }
    }

    #[tokio::test]
    async fn unknown_paths_and_wrong_methods_are_problems() {
        let harness = Harness::new().await;
        for path in ["/", "/api/v1", "/api/v1/devices/a@x/queue/1", "/metrics/"] {
            assert_problem(
                harness.admin(Method::GET, path).await,
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
            )
            .await;
        }
        for (method, path, allow) in [
            (Method::POST, "/readyz", "GET,HEAD"),
            (Method::DELETE, "/api/v1/devices", "GET,HEAD,POST"),
            (Method::GET, "/api/v1/devices/a@x/queue", "DELETE"),
        ] {
            let response = harness.admin(method, path).await;
            assert_eq!(
                response.headers().get(header::ALLOW).map(|v| v.as_bytes()),
                Some(allow.as_bytes()),
                "{path}"
            );
            assert_problem(
                response,
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
            )
            .await;
        }
    }

    #[tokio::test]
    async fn deleting_the_queue_purges_queued_datagrams() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_A);
        let now_ms = clock::unix_ms();
        server_sends(&harness, &device, READ, now_ms).await;
        server_sends(&harness, &device, REGISTER_ACK, now_ms).await;
        let path = format!("/api/v1/devices/{DEVICE_A}");
        let (_, view) = get(&harness, &path).await;
        assert_eq!(view["mt"]["queueDepth"], 2);
        assert_eq!(
            view["mt"]["queueBytes"],
            fixture_datagram(READ).len() + fixture_datagram(REGISTER_ACK).len()
        );
        assert_eq!(harness.mt_store.load().unwrap()[DEVICE_A].len(), 2);

        let (status, _, body) = read(
            harness
                .admin(Method::DELETE, &format!("{path}/queue"))
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, json!({"purged": 2}));
        assert_eq!(
            harness
                .metrics
                .mt_queue_dropped
                .with_label_values(&["purged"])
                .get(),
            2
        );
        assert!(!harness.mt_store.load().unwrap().contains_key(DEVICE_A));
        let (_, view) = get(&harness, &path).await;
        assert_eq!(view["mt"]["queueDepth"], 0);

        // Nothing left, nothing purged; device B's queue was never touched.
        let (_, _, body) = read(
            harness
                .admin(Method::DELETE, &format!("{path}/queue"))
                .await,
        )
        .await;
        assert_eq!(body, json!({"purged": 0}));
    }

    #[tokio::test]
    async fn metrics_render_the_gauges() {
        let harness = Harness::new().await;
        server_sends(&harness, &harness.device(DEVICE_A), READ, clock::unix_ms()).await;
        harness
            .device(DEVICE_B)
            .state()
            .mt
            .reachability
            .on_not_reachable(clock::now());

        let (status, content_type, body) = read(harness.admin(Method::GET, "/metrics").await).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some("text/plain; version=0.0.4"));
        let text = body.as_str().unwrap();
        for line in [
            "nidd_bridge_mt_queue_depth 1",
            "nidd_bridge_mt_pending_deliveries 0",
            "nidd_bridge_devices_reachable 1",
            "nidd_bridge_devices_provisioned 2",
            "nidd_bridge_mt_queue_accepted_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("nidd_bridge_mt_queue_oldest_age_seconds ")),
            "{text}"
        );
    }

    const UPLINK_A: &str = "NiddUplinkDataNotification.register.json";

    /// A guard that wants `token` (written to a file in `dir`).
    fn guard(
        dir: &tempfile::TempDir,
        token: &str,
        metrics_public: bool,
        harness: &Harness,
    ) -> AdminGuard {
        let path = dir.path().join("admin-token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let config = crate::config::AdminConfig {
            bearer_token_file: Some(path),
            metrics_public,
            allowed_hosts: vec!["nidd-bridge-0.nidd-bridge".into()],
            ..crate::config::AdminConfig::on("127.0.0.1:0".parse().unwrap())
        };
        AdminGuard::new(
            &config,
            &crate::config::ProcessSecrets,
            harness.metrics.admin_refusals.clone(),
        )
        .unwrap()
    }

    fn request(
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> axum::http::Request<axum::body::Body> {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(axum::body::Body::empty()).unwrap()
    }

    fn refusals(harness: &Harness, reason: &str) -> u64 {
        harness
            .metrics
            .admin_refusals
            .with_label_values(&[reason])
            .get()
    }

    #[tokio::test]
    async fn with_a_token_file_the_api_wants_the_bearer_token() {
        let harness = Harness::new().await;
        let dir = tempfile::tempdir().unwrap();
        let guard = guard(&dir, "admin-s3cret", false, &harness);
        let send = |path: &str, headers: &[(&str, &str)]| {
            harness.admin_behind(guard.clone(), request(Method::GET, path, headers))
        };

        for path in ["/api/v1/devices", "/metrics", "/api/v1/store/quarantine"] {
            let response = send(path, &[]).await;
            let challenge = response.headers().get(header::WWW_AUTHENTICATE).cloned();
            assert!(
                challenge.is_some_and(|c| c.to_str().unwrap().starts_with("Bearer")),
                "{path}"
            );
            assert_problem(response, StatusCode::UNAUTHORIZED, "MISSING_TOKEN").await;
            let wrong = send(path, &[("authorization", "Bearer admin-s3cres")]).await;
            assert!(wrong.headers().contains_key(header::WWW_AUTHENTICATE));
            assert_problem(wrong, StatusCode::UNAUTHORIZED, "INVALID_TOKEN").await;
            let basic = send(path, &[("authorization", "Basic YWRtaW4tczNjcmV0")]).await;
            assert_problem(basic, StatusCode::UNAUTHORIZED, "MISSING_TOKEN").await;
        }
        assert_eq!(refusals(&harness, "missing_token"), 6);
        assert_eq!(refusals(&harness, "wrong_token"), 3);

        let (status, _, body) = read(
            send(
                "/api/v1/devices",
                &[("authorization", "Bearer admin-s3cret")],
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_array().map(Vec::len), Some(2));
        let (status, _, _) =
            read(send("/metrics", &[("authorization", "bearer admin-s3cret")]).await).await;
        assert_eq!(status, StatusCode::OK);
        // A refused purge purges nothing.
        let purge = harness
            .admin_behind(
                guard.clone(),
                request(
                    Method::DELETE,
                    &format!("/api/v1/devices/{DEVICE_A}/queue"),
                    &[],
                ),
            )
            .await;
        assert_problem(purge, StatusCode::UNAUTHORIZED, "MISSING_TOKEN").await;

        // The probes need no token.
        for path in ["/healthz", "/readyz"] {
            assert_eq!(send(path, &[]).await.status(), StatusCode::OK, "{path}");
        }
        let (_, _, text) =
            read(send("/metrics", &[("authorization", "Bearer admin-s3cret")]).await).await;
        assert!(
            text.as_str().is_some_and(
                |t| t.contains("nidd_bridge_admin_refusals_total{reason=\"wrong_token\"} 3")
            ),
            "{text}"
        );
    }

    #[tokio::test]
    async fn public_metrics_open_metrics_only() {
        let harness = Harness::new().await;
        let dir = tempfile::tempdir().unwrap();
        let guard = guard(&dir, "admin-s3cret", true, &harness);
        let metrics = harness
            .admin_behind(guard.clone(), request(Method::GET, "/metrics", &[]))
            .await;
        assert_eq!(metrics.status(), StatusCode::OK);
        let devices = harness
            .admin_behind(guard, request(Method::GET, "/api/v1/devices", &[]))
            .await;
        assert_problem(devices, StatusCode::UNAUTHORIZED, "MISSING_TOKEN").await;
    }

    #[tokio::test]
    async fn a_rebound_host_is_refused_and_an_ip_literal_accepted() {
        let harness = Harness::new().await;
        let dir = tempfile::tempdir().unwrap();
        let guard = guard(&dir, "admin-s3cret", false, &harness);
        let token = ("authorization", "Bearer admin-s3cret");
        for path in ["/api/v1/devices", "/healthz"] {
            let rebound = harness
                .admin_behind(
                    guard.clone(),
                    request(
                        Method::GET,
                        path,
                        &[("host", "attacker.example:9100"), token],
                    ),
                )
                .await;
            assert_problem(rebound, StatusCode::MISDIRECTED_REQUEST, "HOST_NOT_ALLOWED").await;
        }
        assert_eq!(refusals(&harness, "host_not_allowed"), 2);
        for host in [
            "127.0.0.1:9100",
            "10.42.0.7:9100",
            "[::1]:9100",
            "localhost:9100",
            "nidd-bridge-0.nidd-bridge:9100",
        ] {
            let response = harness
                .admin_behind(
                    guard.clone(),
                    request(Method::GET, "/api/v1/devices", &[("host", host), token]),
                )
                .await;
            assert_eq!(response.status(), StatusCode::OK, "{host}");
        }
        // Without a token file (loopback), the Host is checked all the same.
        let open = harness.admin(Method::GET, "/api/v1/devices").await;
        assert_eq!(open.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_rotation_the_scef_does_not_confirm_keeps_both_urls_and_continues_when_asked_again() {
        let harness = Harness::new().await;
        let a = harness.device(DEVICE_A);
        let path = format!("/api/v1/devices/{DEVICE_A}/callback-token/rotate");
        // The harness's T8 client refuses the configuration's URL (not on the SCEF's
        // origin) unsent: the SCEF never confirms.
        assert_problem(
            harness.admin(Method::POST, &path).await,
            StatusCode::BAD_GATEWAY,
            "SCEF_REFUSED",
        )
        .await;
        let tokens = a.callback_tokens();
        assert_eq!(tokens.active(), TOKEN_A);
        let pending = tokens.pending().expect("a pending token").to_string();
        let stored = harness.devices.store().device(&a.id).unwrap().unwrap();
        assert_eq!(stored.callback_token, TOKEN_A);
        assert_eq!(
            stored.pending_callback_token.as_deref(),
            Some(pending.as_str())
        );
        let (_, view) = get(&harness, &format!("/api/v1/devices/{DEVICE_A}")).await;
        assert_eq!(view["callbackRotationPending"], true);

        // Both URLs reach the device meanwhile.
        for (message_id, token) in [TOKEN_A, pending.as_str()].into_iter().enumerate() {
            assert_no_content(
                harness
                    .notify(
                        &format!("/t8/v1/nidd/{token}"),
                        uplink_with_message_id(UPLINK_A, message_id as u16),
                    )
                    .await,
            )
            .await;
            harness.server_receives().await;
        }

        // Asking again continues the same rotation.
        assert_problem(
            harness.admin(Method::POST, &path).await,
            StatusCode::BAD_GATEWAY,
            "SCEF_REFUSED",
        )
        .await;
        assert_eq!(a.callback_tokens().pending(), Some(pending.as_str()));
        assert_eq!(
            harness
                .metrics
                .callback_token_rotations
                .with_label_values(&["scef_failed"])
                .get(),
            2
        );
        // B was never touched.
        assert_eq!(harness.device(DEVICE_B).callback_tokens().pending(), None);
    }

    #[tokio::test]
    async fn a_device_without_a_configuration_keeps_its_new_url_pending() {
        let harness = Harness::new().await;
        let b = harness.device(DEVICE_B);
        harness.devices.set_nidd(&b, None).unwrap();
        let path = format!("/api/v1/devices/{DEVICE_B}/callback-token/rotate");
        assert_problem(
            harness.admin(Method::POST, &path).await,
            StatusCode::CONFLICT,
            "NO_CONFIGURATION",
        )
        .await;
        let pending = b.callback_tokens().pending().unwrap().to_string();
        // The configuration the provisioner creates next is given the new URL.
        assert!(
            b.callback_url(&url::Url::parse("http://bridge.example").unwrap())
                .ends_with(&pending)
        );
        assert_problem(
            harness
                .admin(
                    Method::POST,
                    "/api/v1/devices/987654321@iot.example/callback-token/rotate",
                )
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
        )
        .await;
    }

    #[tokio::test]
    async fn gauges_sum_over_every_device() {
        let harness = Harness::new().await;
        let (a, b) = (harness.device(DEVICE_A), harness.device(DEVICE_B));
        let now = clock::now();
        assert_eq!(
            gauges(harness.devices.iter(), now, 0),
            Gauges {
                reachable: 2,
                ..Gauges::default()
            },
            "nothing heard yet: MT is tried"
        );

        server_sends(&harness, &a, READ, 1_000_000).await;
        server_sends(&harness, &a, REGISTER_ACK, 1_001_000).await;
        server_sends(&harness, &b, READ, 1_002_000).await;
        {
            // A's Read goes to the SCEF, which holds it (201).
            let mut state = a.state();
            let (Decision::Send(item), _) = state.mt.decide(now, 1_001_500, true) else {
                panic!("A's Read is not sent");
            };
            state
                .mt
                .on_outcome(item.seq, Outcome::Pending("http://scef/d/1".into()), now);
        }
        b.state().mt.reachability.on_not_reachable(now);

        assert_eq!(
            gauges(harness.devices.iter(), now, 1_010_000),
            Gauges {
                queue_depth: 2,
                pending_deliveries: 1,
                reachable: 1,
                // The oldest waiting datagram is A's ACK: the pending Read is the SCEF's.
                oldest_queued_age_s: 9.0,
            }
        );
        assert_eq!(
            gauges(std::iter::empty(), now, 1_010_000),
            Gauges::default()
        );
    }
}
