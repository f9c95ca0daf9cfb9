//! The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz` and a read-only device API
//! (`/api/v1/devices`) for operators.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use crate::bridge::{Device, Shared};
use crate::callback::problem_response;
use crate::device::DeviceId;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{device}", get(show_device))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
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

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let body = Readiness {
        ready: shared.is_ready(),
        devices: shared.devices.len(),
        devices_with_configuration: shared.provisioned_count(),
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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationView {
    #[serde(rename = "self")]
    self_link: String,
    status: String,
    maximum_packet_size_bytes: Option<u64>,
}

fn view(device: &Device) -> DeviceView {
    let nidd = device.state().nidd.clone();
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
    }
}

async fn list_devices(State(shared): State<Arc<Shared>>) -> Json<Vec<DeviceView>> {
    let mut devices: Vec<DeviceView> = shared.devices.iter().map(|d| view(d)).collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    Json(devices)
}

async fn show_device(State(shared): State<Arc<Shared>>, Path(device): Path<String>) -> Response {
    let id: DeviceId = match device.parse() {
        Ok(id) => id,
        Err(error) => {
            return problem_response(StatusCode::BAD_REQUEST, "BAD_DEVICE_ID", error.to_string());
        }
    };
    match shared.device(&id) {
        Some(device) => Json(view(device)).into_response(),
        None => problem_response(
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
            format!("device {id} is not configured"),
        ),
    }
}
