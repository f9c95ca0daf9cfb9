//! The admin API's device changes: `POST /api/v1/devices` (one device, a JSON array, or JSON
//! lines, all or nothing), `PATCH` and `DELETE /api/v1/devices/{device}`, and the fleet's
//! counts at `GET /api/v1/fleet`. Every refusal is a problem document naming the entry and
//! the field, and is counted in `device_changes_total{change="refused"}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{AdminState, bad_device_id, device_of, group_view, view};
use crate::clock;
use crate::config::DeviceConfig;
use crate::fleet::{Added, DevicePatch, DeviceSpec, FleetError, GroupAdded, GroupSpec};
use crate::http::media_type;
use crate::http::problem::problem_response;
use crate::identity::ExternalId;

/// How a request body lists devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One JSON object: answered with the device.
    One,
    /// A JSON array, or JSON lines: answered with each entry's outcome.
    Many,
}

/// Why a body lists no device: the problem to answer.
struct Unreadable {
    status: StatusCode,
    cause: &'static str,
    detail: String,
}

impl Unreadable {
    fn into_response(self) -> Response {
        problem_response(self.status, self.cause, self.detail)
    }
}

/// The devices a body lists, or why it lists none.
fn parse_batch(headers: &HeaderMap, body: &[u8]) -> Result<(Shape, Vec<DeviceConfig>), Unreadable> {
    let bad = |detail: String| Unreadable {
        status: StatusCode::BAD_REQUEST,
        cause: "INVALID_DEVICE",
        detail,
    };
    let media = media_type(headers);
    let entry = |index: usize, value: serde_json::Value| {
        if !value.is_object() {
            return Err(bad(format!("entry {index}: a device is a JSON object")));
        }
        serde_json::from_value::<DeviceSpec>(value)
            .map(DeviceConfig::from)
            .map_err(|e| bad(format!("entry {index}: {e}")))
    };
    let (shape, entries) = match media.as_deref() {
        Some("application/json") => {
            let value: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| bad(format!("the body is not JSON: {e}")))?;
            match value {
                serde_json::Value::Array(items) => (
                    Shape::Many,
                    items
                        .into_iter()
                        .enumerate()
                        .map(|(i, v)| entry(i, v))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                value => (Shape::One, vec![entry(0, value)?]),
            }
        }
        Some("application/x-ndjson" | "application/jsonl" | "application/jsonlines") => {
            let text = std::str::from_utf8(body)
                .map_err(|e| bad(format!("JSON lines must be UTF-8: {e}")))?;
            let mut entries = Vec::new();
            for (line_index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| bad(format!("line {}: not JSON: {e}", line_index + 1)))?;
                entries.push(entry(entries.len(), value)?);
            }
            (Shape::Many, entries)
        }
        other => {
            return Err(Unreadable {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                cause: "UNSUPPORTED_MEDIA_TYPE",
                detail: format!(
                    "content type {} is not served; send application/json (one device or an array) or application/x-ndjson (one device per line)",
                    other.unwrap_or("(none)")
                ),
            });
        }
    };
    if entries.is_empty() {
        return Err(bad("the request lists no device".into()));
    }
    Ok((shape, entries))
}

fn refusal(error: &FleetError) -> Response {
    let (status, cause) = match error {
        FleetError::Invalid { .. } | FleetError::Repeated { .. } | FleetError::InvalidChange(_) => {
            (StatusCode::BAD_REQUEST, "INVALID_DEVICE")
        }
        FleetError::Differs { .. } | FleetError::FileDevice { .. } => {
            (StatusCode::CONFLICT, "DEVICE_CONFLICT")
        }
        FleetError::BeingRemoved { .. } => (StatusCode::CONFLICT, "DEVICE_BEING_REMOVED"),
        FleetError::Server(_) => (StatusCode::CONFLICT, "UNKNOWN_SERVER"),
        FleetError::Unknown(_) => (StatusCode::NOT_FOUND, "UNKNOWN_DEVICE"),
        // Not a 5xx: asking again does not help, a larger `[sockets]` pool does.
        FleetError::PoolExhausted { .. } => (StatusCode::CONFLICT, "SOCKET_POOL_EXHAUSTED"),
        FleetError::Socket(_) => (StatusCode::SERVICE_UNAVAILABLE, "SOCKET_UNAVAILABLE"),
        FleetError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE"),
        // On-demand creation only; the admin API adds whom it is told to.
        FleetError::NotOnboarded(_) => (StatusCode::FORBIDDEN, "ONBOARDING_NOT_ALLOWED"),
        FleetError::UnknownGroup(_) => (StatusCode::NOT_FOUND, "UNKNOWN_GROUP"),
        FleetError::FileGroup(_) | FleetError::GroupDiffers(_) => {
            (StatusCode::CONFLICT, "GROUP_CONFLICT")
        }
        FleetError::GroupBeingRemoved(_) => (StatusCode::CONFLICT, "GROUP_BEING_REMOVED"),
    };
    problem_response(status, cause, error.to_string())
}

fn count_refusal(shared: &AdminState) {
    shared
        .metrics
        .device_changes
        .with_label_values(&["refused"])
        .inc();
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BatchOutcome {
    created: usize,
    unchanged: usize,
    devices: Vec<EntryOutcome>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryOutcome {
    id: String,
    outcome: Added,
    udp_address: Option<String>,
}

/// Adds devices (see the module docs): 201 when any was created, 200 when all existed with
/// these settings already.
pub(super) async fn add_devices(
    State(shared): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (shape, batch) = match parse_batch(&headers, &body) {
        Ok(parsed) => parsed,
        Err(unreadable) => {
            count_refusal(&shared);
            return unreadable.into_response();
        }
    };
    let outcomes = match shared.fleet.add(batch).await {
        Ok(outcomes) => outcomes,
        Err(error) => {
            count_refusal(&shared);
            tracing::info!(%error, "device batch refused");
            return refusal(&error);
        }
    };
    let created = outcomes
        .iter()
        .filter(|(_, o)| *o == Added::Created)
        .count();
    let status = if created > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    if shape == Shape::One
        && let Some((id, _)) = outcomes.first()
        && let Some(device) = shared.devices.get(id)
    {
        let location = format!("/api/v1/devices/{}", id.canonical());
        let body = Json(view(&device, clock::now(), clock::unix_ms()));
        return (status, [(header::LOCATION, location)], body).into_response();
    }
    let devices = outcomes
        .into_iter()
        .map(|(id, outcome)| EntryOutcome {
            udp_address: shared
                .devices
                .get(&id)
                .map(|d| d.socket.local_addr().to_string()),
            id: id.canonical().to_string(),
            outcome,
        })
        .collect::<Vec<_>>();
    let body = BatchOutcome {
        created,
        unchanged: devices.len() - created,
        devices,
    };
    (status, Json(body)).into_response()
}

/// Changes an API device's settings in place (JSON merge patch: what is absent stays).
pub(super) async fn change_device(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let id = match device_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_device_id(detail),
    };
    let media = media_type(&headers);
    if !matches!(
        media.as_deref(),
        Some("application/json" | "application/merge-patch+json")
    ) {
        count_refusal(&shared);
        return problem_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send application/merge-patch+json (or application/json)".into(),
        );
    }
    // An object only: serde would read a struct from an array too.
    let patch = serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| e.to_string())
        .and_then(|value| {
            if value.is_object() {
                serde_json::from_value::<DevicePatch>(value).map_err(|e| e.to_string())
            } else {
                Err("a change is a JSON object".into())
            }
        });
    let patch: DevicePatch = match patch {
        Ok(patch) => patch,
        Err(error) => {
            count_refusal(&shared);
            return problem_response(
                StatusCode::BAD_REQUEST,
                "INVALID_DEVICE",
                format!("the change is not valid: {error}"),
            );
        }
    };
    match shared.fleet.change(&id, patch).await {
        Ok(device) => Json(view(&device, clock::now(), clock::unix_ms())).into_response(),
        Err(error) => {
            count_refusal(&shared);
            refusal(&error)
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Removal {
    id: String,
    /// What is left to do: deleting the device's configuration at the SCEF.
    removal: &'static str,
}

/// Removes an API device: 202, gone from the API at once, deleted at the SCEF in the
/// background (`GET /api/v1/fleet` counts removals under way).
pub(super) async fn remove_device(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match device_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_device_id(detail),
    };
    match shared.fleet.remove(&id).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(Removal {
                id: id.canonical().to_string(),
                removal: "pending",
            }),
        )
            .into_response(),
        Err(error) => {
            count_refusal(&shared);
            refusal(&error)
        }
    }
}

/// Adds a group (a JSON object with the fields of a `[[groups]]` entry, in camelCase): 201
/// with its view, or 200 when it exists with these settings.
pub(super) async fn add_group(
    State(shared): State<AdminState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let media = media_type(&headers).unwrap_or_default();
    if media != "application/json" {
        count_refusal(&shared);
        return problem_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "a group is sent as application/json".into(),
        );
    }
    let spec: GroupSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(error) => {
            count_refusal(&shared);
            return problem_response(
                StatusCode::BAD_REQUEST,
                "INVALID_GROUP",
                format!("the group: {error}"),
            );
        }
    };
    let (status, group) = match shared.fleet.add_group(spec.into()).await {
        Ok(GroupAdded::Created(group)) => (StatusCode::CREATED, group),
        Ok(GroupAdded::Unchanged(group)) => (StatusCode::OK, group),
        Err(FleetError::InvalidChange(error)) => {
            count_refusal(&shared);
            return problem_response(StatusCode::BAD_REQUEST, "INVALID_GROUP", error.to_string());
        }
        Err(error) => {
            count_refusal(&shared);
            return refusal(&error);
        }
    };
    let location = format!("/api/v1/groups/{}", group.id);
    (
        status,
        [(header::LOCATION, location)],
        Json(group_view(&group)),
    )
        .into_response()
}

/// The group a path names, or why it names none (the `detail` of a 400 `BAD_GROUP_ID`).
fn group_of(path: Result<Path<String>, PathRejection>) -> Result<ExternalId, String> {
    let Path(group) = path.map_err(|rejection| rejection.body_text())?;
    group
        .parse()
        .map_err(|error: crate::identity::IdentityError| error.to_string())
}

fn bad_group_id(detail: String) -> Response {
    problem_response(StatusCode::BAD_REQUEST, "BAD_GROUP_ID", detail)
}

pub(super) async fn show_group(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match group_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_group_id(detail),
    };
    match shared.groups.get(&id) {
        Some(group) => Json(group_view(&group)).into_response(),
        None => refusal(&FleetError::UnknownGroup(id)),
    }
}

/// Removes an API group and its members: 202; its configuration is deleted at the SCEF in
/// the background.
pub(super) async fn remove_group(
    State(shared): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match group_of(path) {
        Ok(id) => id,
        Err(detail) => return bad_group_id(detail),
    };
    match shared.fleet.remove_group(&id).await {
        Ok(members) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({
                "externalGroupId": id.to_string(),
                "removal": "pending",
                "membersRemoved": members,
            })),
        )
            .into_response(),
        Err(error) => {
            count_refusal(&shared);
            refusal(&error)
        }
    }
}

/// How many devices there are, where from, and how far onboarding has come.
pub(super) async fn fleet_counts(State(shared): State<AdminState>) -> Response {
    Json(shared.fleet.counts()).into_response()
}

/// On-demand onboarding: the trigger URL to give the NEF, the rules, and how many devices
/// were created on demand.
pub(super) async fn onboarding(State(shared): State<AdminState>) -> Response {
    Json(shared.fleet.onboarding_view(shared.trigger_url.clone())).into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::Method;
    use serde_json::json;

    use crate::http::test_support::{DEVICE_A, Harness, assert_problem, read};

    use super::*;

    const JSON: &str = "application/json";
    const LINES: &str = "application/x-ndjson";

    async fn post(harness: &Harness, content_type: &str, body: String) -> Response {
        harness
            .admin_send(Method::POST, "/api/v1/devices", content_type, body)
            .await
    }

    async fn patch(harness: &Harness, path: &str, body: serde_json::Value) -> Response {
        harness
            .admin_send(
                Method::PATCH,
                path,
                "application/merge-patch+json",
                body.to_string(),
            )
            .await
    }

    fn changes(harness: &Harness, change: &str) -> u64 {
        harness
            .metrics
            .device_changes
            .with_label_values(&[change])
            .get()
    }

    #[tokio::test]
    async fn a_device_is_added_once_and_then_found() {
        let harness = Harness::new().await;
        let device = json!({"externalId": "new-1@iot.example", "endpointName": "urn:dev:new-1"});
        let response = post(&harness, JSON, device.to_string()).await;
        assert_eq!(
            response
                .headers()
                .get(header::LOCATION)
                .map(|v| v.as_bytes()),
            Some(&b"/api/v1/devices/new-1@iot.example"[..])
        );
        let (status, _, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["source"], "api");
        assert_eq!(body["endpointName"], "urn:dev:new-1");
        assert!(
            body["udpAddress"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );

        let (status, _, shown) = read(
            harness
                .admin(Method::GET, "/api/v1/devices/new-1@iot.example")
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["udpAddress"], body["udpAddress"]);
        let (_, _, file_device) = read(
            harness
                .admin(Method::GET, &format!("/api/v1/devices/{DEVICE_A}"))
                .await,
        )
        .await;
        assert_eq!(file_device["source"], "file");

        // The same again is no change; other settings for it are a conflict.
        let (status, _, _) = read(post(&harness, JSON, device.to_string()).await).await;
        assert_eq!(status, StatusCode::OK);
        let other = json!({"externalId": "new-1@iot.example", "endpointName": "urn:dev:other"});
        assert_problem(
            post(&harness, JSON, other.to_string()).await,
            StatusCode::CONFLICT,
            "DEVICE_CONFLICT",
        )
        .await;
        assert_problem(
            post(&harness, JSON, json!({"externalId": DEVICE_A}).to_string()).await,
            StatusCode::CONFLICT,
            "DEVICE_CONFLICT",
        )
        .await;
        assert_eq!(changes(&harness, "added"), 1);
        assert_eq!(changes(&harness, "refused"), 2);
        // Persisted with its settings: a restart brings it back as an API device.
        let stored = harness
            .devices
            .store()
            .device(&"new-1@iot.example".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            stored.settings.unwrap().endpoint_name.as_deref(),
            Some("urn:dev:new-1")
        );
    }

    #[tokio::test]
    async fn a_bad_entry_refuses_the_whole_batch_and_names_itself() {
        let harness = Harness::new().await;
        let lines = [
            json!({"externalId": "b-0@iot.example"}),
            json!({"msisdn": "491700000099"}),
            json!({"externalId": "b-2@iot.example", "activeWindowS": 1}),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let (status, _, body) = read(post(&harness, LINES, lines).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("entry 2") && detail.contains("active_window_s"),
            "{detail}"
        );

        let unknown_field = json!([{"externalId": "b-0@iot.example", "colour": "red"}]);
        let (status, _, body) = read(post(&harness, JSON, unknown_field.to_string()).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("entry 0") && detail.contains("colour"),
            "{detail}"
        );

        for body in [
            json!([{"externalId": "b-0@iot.example"}, {"externalId": "urn:nai:b-0@iot.example"}]),
            json!({"externalId": "b-0@iot.example", "msisdn": "4917000001"}),
            json!([]),
        ] {
            assert_problem(
                post(&harness, JSON, body.to_string()).await,
                StatusCode::BAD_REQUEST,
                "INVALID_DEVICE",
            )
            .await;
        }
        assert_problem(
            post(&harness, JSON, "{not json".into()).await,
            StatusCode::BAD_REQUEST,
            "INVALID_DEVICE",
        )
        .await;
        assert_problem(
            post(
                &harness,
                JSON,
                json!({"externalId": "b-0@iot.example", "lwm2mServer": "nowhere"}).to_string(),
            )
            .await,
            StatusCode::CONFLICT,
            "UNKNOWN_SERVER",
        )
        .await;
        assert_problem(
            post(&harness, "text/csv", "b-0@iot.example".into()).await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        )
        .await;
        assert_eq!(
            harness.devices.len(),
            2,
            "nothing of a refused batch was added"
        );
        assert_eq!(changes(&harness, "added"), 0);

        let valid = (0..3)
            .map(|i| json!({"externalId": format!("b-{i}@iot.example")}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let (status, _, body) = read(post(&harness, LINES, valid).await).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["created"], 3);
        assert_eq!(body["devices"][2]["outcome"], "created");
        assert_eq!(harness.devices.len(), 5);
        let (_, _, counts) = read(harness.admin(Method::GET, "/api/v1/fleet").await).await;
        assert_eq!(counts["configured"], 5);
        assert_eq!(counts["fromApi"], 3);
        assert_eq!(counts["onboarding"], 3, "{counts}");
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_socket_pool_adds_nothing() {
        let harness = Harness::new().await;
        let lines = (0..=crate::http::test_support::HARNESS_PORTS)
            .map(|i| json!({"externalId": format!("p-{i}@iot.example")}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let (status, _, body) = read(post(&harness, LINES, lines).await).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["cause"], "SOCKET_POOL_EXHAUSTED");
        assert_eq!(harness.devices.len(), 2);
        // The ports it took are free again.
        let (status, _, _) = read(
            post(
                &harness,
                JSON,
                json!({"externalId": "p-0@iot.example"}).to_string(),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED);
    }

    #[tokio::test]
    async fn an_api_device_changes_in_place_and_a_file_device_does_not() {
        let harness = Harness::new().await;
        post(
            &harness,
            JSON,
            json!({"externalId": "c@iot.example", "bufferOwner": "bridge"}).to_string(),
        )
        .await;
        let (status, _, body) = read(
            patch(
                &harness,
                "/api/v1/devices/c@iot.example",
                json!({"endpointName": "urn:dev:c", "bufferOwner": "scef"}),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["endpointName"], "urn:dev:c");
        assert_eq!(body["mt"]["bufferOwner"], "scef");
        assert_eq!(changes(&harness, "changed"), 1);
        let device = harness
            .devices
            .get(&"c@iot.example".parse().unwrap())
            .unwrap();
        assert_eq!(
            device.added_settings().unwrap().endpoint_name.as_deref(),
            Some("urn:dev:c")
        );

        assert_problem(
            patch(
                &harness,
                "/api/v1/devices/c@iot.example",
                json!({"externalId": "d@iot.example"}),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "INVALID_DEVICE",
        )
        .await;
        assert_problem(
            patch(
                &harness,
                "/api/v1/devices/c@iot.example",
                json!({"activeWindowS": 0}),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "INVALID_DEVICE",
        )
        .await;
        assert_problem(
            patch(
                &harness,
                &format!("/api/v1/devices/{DEVICE_A}"),
                json!({"endpointName": "x"}),
            )
            .await,
            StatusCode::CONFLICT,
            "DEVICE_CONFLICT",
        )
        .await;
        assert_problem(
            patch(&harness, "/api/v1/devices/nobody@iot.example", json!({})).await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
        )
        .await;
    }

    #[tokio::test]
    async fn a_removed_device_is_gone_and_its_record_deleted() {
        let harness = Harness::new().await;
        post(
            &harness,
            JSON,
            json!({"externalId": "r@iot.example"}).to_string(),
        )
        .await;
        let id: crate::DeviceId = "r@iot.example".parse().unwrap();
        let (status, _, body) = read(
            harness
                .admin(Method::DELETE, "/api/v1/devices/r@iot.example")
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_problem(
            harness
                .admin(Method::GET, "/api/v1/devices/r@iot.example")
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
        )
        .await;
        assert_problem(
            harness
                .admin(Method::DELETE, "/api/v1/devices/r@iot.example")
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_DEVICE",
        )
        .await;
        assert_problem(
            harness
                .admin(Method::DELETE, &format!("/api/v1/devices/{DEVICE_A}"))
                .await,
            StatusCode::CONFLICT,
            "DEVICE_CONFLICT",
        )
        .await;
        // It had nothing at the SCEF: the record goes as soon as the background step runs.
        let record_gone = async {
            while harness.devices.store().device(&id).unwrap().is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), record_gone)
            .await
            .expect("the removed device's record is deleted");
        assert_eq!(changes(&harness, "removed"), 1);
        assert_eq!(changes(&harness, "removal_finished"), 1);
        assert_eq!(harness.devices.len(), 2);
    }

    #[tokio::test]
    async fn groups_are_added_shown_and_removed_with_their_members() {
        let harness = Harness::new().await;
        let group = json!({"externalGroupId": "valves@fleet.example", "bufferOwner": "scef"});
        let send = |body: serde_json::Value| {
            harness.admin_send(Method::POST, "/api/v1/groups", JSON, body.to_string())
        };
        let (status, location, body) = read(send(group.clone()).await).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(location.is_some());
        assert_eq!(body["externalGroupId"], "valves@fleet.example");
        assert_eq!(body["source"], "api");
        assert_eq!(read(send(group.clone()).await).await.0, StatusCode::OK);
        assert_problem(
            send(json!({"externalGroupId": "valves@fleet.example"})).await,
            StatusCode::CONFLICT,
            "GROUP_CONFLICT",
        )
        .await;
        assert_problem(
            send(json!({"externalGroupId": crate::http::test_support::GROUP})).await,
            StatusCode::CONFLICT,
            "GROUP_CONFLICT",
        )
        .await;
        for bad in [
            json!({"externalGroupId": "no-domain"}),
            json!({"externalGroupId": "v@fleet.example", "activeWindowS": 0}),
            json!({"externalGroupId": "v@fleet.example", "colour": "red"}),
            json!({}),
        ] {
            assert_problem(send(bad).await, StatusCode::BAD_REQUEST, "INVALID_GROUP").await;
        }

        // A device added through the API as a member: its traffic goes through the group.
        let (status, _, member) = read(
            post(
                &harness,
                JSON,
                json!({"externalId": "v1@fleet.example", "group": "valves@fleet.example"})
                    .to_string(),
            )
            .await,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{member}");
        assert_eq!(member["group"], "valves@fleet.example");
        assert_problem(
            post(
                &harness,
                JSON,
                json!({"externalId": "v2@fleet.example", "group": "nobody@fleet.example"})
                    .to_string(),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "INVALID_DEVICE",
        )
        .await;
        let (status, _, shown) = read(
            harness
                .admin(Method::GET, "/api/v1/groups/valves@fleet.example")
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(shown["members"], 1, "{shown}");

        let (status, _, removal) = read(
            harness
                .admin(Method::DELETE, "/api/v1/groups/valves@fleet.example")
                .await,
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{removal}");
        assert_eq!(removal["membersRemoved"], 1);
        assert!(
            harness
                .devices
                .get(&"v1@fleet.example".parse().unwrap())
                .is_none()
        );
        assert_problem(
            harness
                .admin(Method::GET, "/api/v1/groups/valves@fleet.example")
                .await,
            StatusCode::NOT_FOUND,
            "UNKNOWN_GROUP",
        )
        .await;
        assert_problem(
            harness
                .admin(
                    Method::DELETE,
                    &format!("/api/v1/groups/{}", crate::http::test_support::GROUP),
                )
                .await,
            StatusCode::CONFLICT,
            "GROUP_CONFLICT",
        )
        .await;
    }
}
