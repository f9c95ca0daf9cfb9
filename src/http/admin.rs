//! The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz` and a read-only device API
//! (`/api/v1/devices`) for operators.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::clock;
use crate::config::BufferOwner;
use crate::devices::{Device, DeviceTable};
use crate::http::Lifecycle;
use crate::http::problem::problem_response;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mt::Downlinks;
use crate::reachability::State as Reachable;

/// What the admin API needs of the rest of the bridge.
#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) devices: Arc<DeviceTable>,
    pub(crate) downlinks: Arc<Downlinks>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) lifecycle: Lifecycle,
}

pub(crate) fn router(shared: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{device}", get(show_device))
        .route(
            "/api/v1/devices/{device}/queue",
            axum::routing::delete(purge_queue),
        )
        .with_state(shared)
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
}

async fn readyz(State(shared): State<AdminState>) -> Response {
    let body = Readiness {
        ready: !shared.lifecycle.is_shutting_down() && shared.devices.all_provisioned(),
        devices: shared.devices.len(),
        devices_with_configuration: shared.devices.provisioned_count(),
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
    udp_address: String,
    nidd_configuration: Option<ConfigurationView>,
    mt: MtView,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MtView {
    buffer_owner: BufferOwner,
    reachability: Reachable,
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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationView {
    #[serde(rename = "self")]
    self_link: String,
    status: String,
    maximum_packet_size_bytes: Option<u64>,
}

fn view(device: &Device, now: Instant, now_ms: u64) -> DeviceView {
    let state = device.state();
    let nidd = state.nidd.clone();
    let mt = &state.mt;
    let seconds = |d: std::time::Duration| (d.as_millis() as f64) / 1000.0;
    let mt = MtView {
        buffer_owner: mt.owner,
        reachability: mt.reachability.state(now),
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
    };
    drop(state);
    DeviceView {
        id: device.id.canonical().to_string(),
        external_id: device.id.external_id().map(ToString::to_string),
        msisdn: device.id.msisdn().map(ToString::to_string),
        endpoint_name: device.endpoint_name.clone(),
        udp_address: device.socket.local_addr().to_string(),
        nidd_configuration: nidd.map(|n| ConfigurationView {
            self_link: n.location.to_string(),
            status: n
                .status
                .map_or_else(|| "UNKNOWN".to_string(), |s| s.as_str().to_string()),
            maximum_packet_size_bytes: n.maximum_packet_size_bits.map(|bits| bits / 8),
        }),
        mt,
    }
}

async fn list_devices(State(shared): State<AdminState>) -> Json<Vec<DeviceView>> {
    let (now, now_ms) = (clock::now(), clock::unix_ms());
    let mut devices: Vec<DeviceView> = shared
        .devices
        .iter()
        .map(|d| view(d, now, now_ms))
        .collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    Json(devices)
}

async fn show_device(State(shared): State<AdminState>, Path(device): Path<String>) -> Response {
    let id: DeviceId = match device.parse() {
        Ok(id) => id,
        Err(error) => {
            return problem_response(StatusCode::BAD_REQUEST, "BAD_DEVICE_ID", error.to_string());
        }
    };
    match shared.devices.get(&id) {
        Some(device) => Json(view(device, clock::now(), clock::unix_ms())).into_response(),
        None => problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
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
async fn purge_queue(State(shared): State<AdminState>, Path(device): Path<String>) -> Response {
    let id: DeviceId = match device.parse() {
        Ok(id) => id,
        Err(error) => {
            return problem_response(StatusCode::BAD_REQUEST, "BAD_DEVICE_ID", error.to_string());
        }
    };
    let Some(device) = shared.devices.get(&id) else {
        return problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
        );
    };
    let count = shared.downlinks.purge(device).await;
    tracing::info!(device = %id, purged = count, "MT queue purged by the operator");
    Json(Purged { purged: count }).into_response()
}

/// Queue and reachability gauges over all devices (set when metrics are scraped).
#[derive(Debug, Default, PartialEq)]
struct Gauges {
    queue_depth: i64,
    pending_deliveries: i64,
    reachable: i64,
    oldest_queued_age_s: f64,
}

fn gauges<'a>(devices: impl Iterator<Item = &'a Arc<Device>>, now: Instant, now_ms: u64) -> Gauges {
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
    let gauges = gauges(shared.devices.iter(), now, now_ms);
    let metrics = &shared.metrics;
    metrics.mt_queue_depth.set(gauges.queue_depth);
    metrics.mt_pending_deliveries.set(gauges.pending_deliveries);
    metrics.devices_reachable.set(gauges.reachable);
    metrics
        .mt_queue_oldest_age_seconds
        .set(gauges.oldest_queued_age_s);
}
