//! The minimal SCEF of the benchmark: only what a bridge needs to run at full speed. It creates
//! NIDD configurations (201 with `Location`, status `ACTIVE`, kept per SCS/AS id so a restarted
//! bridge finds them in its list or with its GET), answers the merge-patch of a new callback URL and deletes,
//! answers every downlink-data-delivery 200 `SUCCESS` at once while recording when the
//! datagram's bench id arrived, and pushes MO uplink notifications to the configurations'
//! callback URLs at a given rate over a bounded number of concurrent HTTP connections. For the
//! bulk onboarding run it can shed every K-th configuration create with 429 and `Retry-After`
//! ([`MinimalScef::throttle_creations`]), counting those and timing each retry that follows one.
//! No schema checks, no PSM, no MonitoringEvent (run the bridge with `psm.monitoring = false`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nidd_bridge::t8::{
    DeliveryStatus, NiddConfiguration, NiddDownlinkDataTransfer, NiddStatus,
    NiddUplinkDataNotification,
};
use nidd_bridge::{DeviceId, ExternalId};
use url::Url;

use super::load::{bench_id, mo_datagram};
use super::{Arrival, Offer, Sent};

/// A configuration as the minimal SCEF keeps it.
#[derive(Debug, Clone)]
pub struct Configuration {
    pub scs_as_id: String,
    pub external_id: Option<ExternalId>,
    pub self_link: String,
    pub notification_destination: String,
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    fetched: AtomicU64,
    /// Lists of every configuration (`FetchAllNIDDConfigurations`).
    listed: AtomicU64,
    patched: AtomicU64,
    deleted: AtomicU64,
    deliveries: AtomicU64,
    /// Deliveries whose datagram carried no bench id.
    foreign: AtomicU64,
    /// Configuration create requests, answered 201 or not.
    create_requests: AtomicU64,
    /// Create requests answered 429 by [`MinimalScef::throttle_creations`].
    throttled: AtomicU64,
}

/// Every K-th configuration create is answered 429 (K = `every`, 0: none).
#[derive(Default)]
struct Throttle {
    every: AtomicU64,
    retry_after_s: AtomicU64,
    /// When each device's create was last answered 429, until its next create comes.
    answered_at: Mutex<HashMap<String, Instant>>,
    /// From a 429 to the same device's next create, for every retry so far.
    retry_gaps: Mutex<Vec<Duration>>,
}

struct ScefState {
    api_root: String,
    next_id: AtomicU64,
    configurations: Mutex<HashMap<String, Configuration>>,
    arrivals: Mutex<Vec<Arrival>>,
    counters: Counters,
    throttle: Throttle,
}

/// A running minimal SCEF on 127.0.0.1; stopped when dropped.
pub struct MinimalScef {
    address: SocketAddr,
    api_root: Url,
    state: Arc<ScefState>,
    server: tokio::task::JoinHandle<()>,
}

impl MinimalScef {
    /// Listens on `listen` (port 0 for a free one).
    pub async fn start(listen: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let api_root = Url::parse(&format!("http://{address}/")).map_err(std::io::Error::other)?;
        let state = Arc::new(ScefState {
            api_root: format!("http://{address}/"),
            next_id: AtomicU64::new(0),
            configurations: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(Vec::new()),
            counters: Counters::default(),
            throttle: Throttle::default(),
        });
        let app = Router::new()
            .route("/3gpp-nidd/v1/{scs}/configurations", post(create).get(list))
            .route(
                "/3gpp-nidd/v1/{scs}/configurations/{id}",
                get(fetch).patch(patch).delete(delete),
            )
            .route(
                "/3gpp-nidd/v1/{scs}/configurations/{id}/downlink-data-deliveries",
                post(deliver),
            )
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "minimal SCEF stopped");
            }
        });
        Ok(Self {
            address,
            api_root,
            state,
            server,
        })
    }

    /// Its T8 `{apiRoot}`.
    pub fn api_root(&self) -> Url {
        self.api_root.clone()
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The configurations created for `scs_as_id` and not deleted, in creation order.
    pub fn configurations(&self, scs_as_id: &str) -> Vec<Configuration> {
        let mut found: Vec<(u64, Configuration)> = self
            .state
            .configurations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, c)| c.scs_as_id == scs_as_id)
            .map(|(id, c)| (id.parse().unwrap_or(0), c.clone()))
            .collect();
        found.sort_by_key(|(id, _)| *id);
        found.into_iter().map(|(_, c)| c).collect()
    }

    /// Takes the MT deliveries recorded so far.
    pub fn take_deliveries(&self) -> Vec<Arrival> {
        std::mem::take(
            &mut *self
                .state
                .arrivals
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// MT deliveries recorded and not yet taken.
    pub fn deliveries(&self) -> usize {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Requests answered so far: (created, fetched, patched, deleted, deliveries, deliveries
    /// without a bench id, lists).
    pub fn counts(&self) -> [u64; 7] {
        let c = &self.state.counters;
        [
            &c.created,
            &c.fetched,
            &c.patched,
            &c.deleted,
            &c.deliveries,
            &c.foreign,
            &c.listed,
        ]
        .map(|n| n.load(Ordering::Relaxed))
    }

    /// From now on answers every `every`-th configuration create request (retries included;
    /// 0: none) 429 with `Retry-After: retry_after_s`, creating nothing.
    pub fn throttle_creations(&self, every: u64, retry_after_s: u64) {
        let throttle = &self.state.throttle;
        throttle
            .retry_after_s
            .store(retry_after_s, Ordering::Relaxed);
        throttle.every.store(every, Ordering::Relaxed);
    }

    /// Configuration create requests so far, and how many of them were answered 429.
    pub fn create_requests(&self) -> (u64, u64) {
        let c = &self.state.counters;
        (
            c.create_requests.load(Ordering::Relaxed),
            c.throttled.load(Ordering::Relaxed),
        )
    }

    /// Takes the time from each 429 to the same device's next create request, recorded since
    /// the last call.
    pub fn take_retry_gaps(&self) -> Vec<Duration> {
        std::mem::take(
            &mut *self
                .state
                .throttle
                .retry_gaps
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Pushes `offer` as MO uplink notifications, datagram `i` to `targets[i % len]`'s callback
    /// URL, with at most `connections` requests in flight. A datagram is sent at its due time
    /// or, when every connection is busy, as soon as one is free; the push ends after
    /// `offer.count()` datagrams or twice the offer's duration.
    pub async fn push_uplinks(
        &self,
        targets: &[Configuration],
        offer: &Offer,
        connections: usize,
    ) -> Result<PushReport, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .timeout(Duration::from_secs(10))
            .build()?;
        let count = offer.count();
        let started = Instant::now();
        let give_up = started + offer.duration * 2 + Duration::from_secs(1);
        let next = Arc::new(AtomicU64::new(0));
        let bodies: Arc<[(String, String)]> = targets
            .iter()
            .map(|c| (c.notification_destination.clone(), c.self_link.clone()))
            .collect();
        let ids: Arc<[Option<ExternalId>]> =
            targets.iter().map(|c| c.external_id.clone()).collect();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..connections.max(1) {
            let client = client.clone();
            let next = next.clone();
            let bodies = bodies.clone();
            let ids = ids.clone();
            let offer = *offer;
            workers.spawn(async move {
                let mut sent = Vec::new();
                let mut statuses: HashMap<u16, u64> = HashMap::new();
                let mut errors = 0u64;
                if bodies.is_empty() {
                    return (sent, statuses, errors);
                }
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as u32;
                    if index >= count || Instant::now() > give_up {
                        break;
                    }
                    let due = offer.due(started, index);
                    tokio::time::sleep_until(due.into()).await;
                    let id = offer.first_id + index;
                    let target = index as usize % bodies.len();
                    let (url, configuration) = &bodies[target];
                    let body = NiddUplinkDataNotification {
                        nidd_configuration: configuration.clone(),
                        external_id: ids[target].clone(),
                        msisdn: None,
                        data: BASE64.encode(mo_datagram(id)),
                        reliable_data_service: None,
                    };
                    let at = Instant::now();
                    sent.push((index, at));
                    match client.post(url).json(&body).send().await {
                        Ok(answer) => {
                            *statuses.entry(answer.status().as_u16()).or_default() += 1;
                        }
                        Err(_) => errors += 1,
                    }
                }
                (sent, statuses, errors)
            });
        }
        let mut at = vec![None; count as usize];
        let mut statuses: HashMap<u16, u64> = HashMap::new();
        let mut errors = 0;
        while let Some(joined) = workers.join_next().await {
            let Ok((sent, worker_statuses, worker_errors)) = joined else {
                continue;
            };
            for (index, instant) in sent {
                at[index as usize] = Some(instant);
            }
            for (status, n) in worker_statuses {
                *statuses.entry(status).or_default() += n;
            }
            errors += worker_errors;
        }
        Ok(PushReport {
            sent: Sent {
                first_id: offer.first_id,
                at,
                started,
                ended: Instant::now(),
            },
            statuses,
            errors,
        })
    }
}

impl Drop for MinimalScef {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What became of an MO push.
#[derive(Debug, Clone)]
pub struct PushReport {
    pub sent: Sent,
    /// HTTP answers by status.
    pub statuses: HashMap<u16, u64>,
    /// Requests that got no answer (connection errors, timeouts).
    pub errors: u64,
}

impl PushReport {
    /// Answers that were not 2xx, and requests without an answer.
    pub fn failed(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.errors
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize, location: Option<&str>) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response =
        (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response();
    if let Some(value) = location.and_then(|l| header::HeaderValue::from_str(l).ok()) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such configuration").into_response()
}

async fn create(
    State(state): State<Arc<ScefState>>,
    Path(scs): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(request) = serde_json::from_slice::<NiddConfiguration>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let request_number = state
        .counters
        .create_requests
        .fetch_add(1, Ordering::Relaxed)
        + 1;
    if let Some(answer) = throttled(&state, &request, request_number) {
        return answer;
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let self_link = format!("{}3gpp-nidd/v1/{scs}/configurations/{id}", state.api_root);
    let configuration = Configuration {
        scs_as_id: scs,
        external_id: request.external_id.clone(),
        self_link: self_link.clone(),
        notification_destination: request.notification_destination.clone(),
    };
    state
        .configurations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, configuration);
    state.counters.created.fetch_add(1, Ordering::Relaxed);
    let answer = NiddConfiguration {
        self_link: Some(self_link.clone()),
        status: Some(NiddStatus::Active),
        ..request
    };
    json(StatusCode::CREATED, &answer, Some(&self_link))
}

/// The 429 for create request number `request_number` when it is one to shed; times the
/// retry of a device shed before.
fn throttled(
    state: &ScefState,
    request: &NiddConfiguration,
    request_number: u64,
) -> Option<Response> {
    let throttle = &state.throttle;
    let every = throttle.every.load(Ordering::Relaxed);
    if every == 0 {
        return None;
    }
    let now = Instant::now();
    let device = request
        .external_id
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut answered_at = throttle
        .answered_at
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(at) = answered_at.remove(&device) {
        throttle
            .retry_gaps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(now.saturating_duration_since(at));
    }
    if request_number % every != 0 {
        return None;
    }
    answered_at.insert(device, now);
    drop(answered_at);
    state.counters.throttled.fetch_add(1, Ordering::Relaxed);
    let retry_after = throttle.retry_after_s.load(Ordering::Relaxed);
    Some(
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after.to_string())],
            "configuration creation throttled",
        )
            .into_response(),
    )
}

fn body_of(configuration: &Configuration) -> NiddConfiguration {
    NiddConfiguration {
        self_link: Some(configuration.self_link.clone()),
        external_id: configuration.external_id.clone(),
        notification_destination: configuration.notification_destination.clone(),
        status: Some(NiddStatus::Active),
        ..Default::default()
    }
}

async fn fetch(
    State(state): State<Arc<ScefState>>,
    Path((_scs, id)): Path<(String, String)>,
) -> Response {
    state.counters.fetched.fetch_add(1, Ordering::Relaxed);
    let found = state
        .configurations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .cloned();
    match found {
        Some(configuration) => json(StatusCode::OK, &body_of(&configuration), None),
        None => not_found(),
    }
}

/// `FetchAllNIDDConfigurations`: every configuration of the SCS/AS.
async fn list(State(state): State<Arc<ScefState>>, Path(scs): Path<String>) -> Response {
    state.counters.listed.fetch_add(1, Ordering::Relaxed);
    let all: Vec<NiddConfiguration> = state
        .configurations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
        .filter(|c| c.scs_as_id == scs)
        .map(body_of)
        .collect();
    json(StatusCode::OK, &all, None)
}

async fn patch(
    State(state): State<Arc<ScefState>>,
    Path((_scs, id)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    state.counters.patched.fetch_add(1, Ordering::Relaxed);
    let destination = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|patch| Some(patch.get("notificationDestination")?.as_str()?.to_string()));
    let updated = {
        let mut configurations = state
            .configurations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(configuration) = configurations.get_mut(&id) else {
            return not_found();
        };
        if let Some(destination) = destination {
            configuration.notification_destination = destination;
        }
        configuration.clone()
    };
    json(StatusCode::OK, &body_of(&updated), None)
}

async fn delete(
    State(state): State<Arc<ScefState>>,
    Path((_scs, id)): Path<(String, String)>,
) -> Response {
    state.counters.deleted.fetch_add(1, Ordering::Relaxed);
    let removed = state
        .configurations
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    match removed {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => not_found(),
    }
}

async fn deliver(State(state): State<Arc<ScefState>>, body: Bytes) -> Response {
    let Ok(request) = serde_json::from_slice::<NiddDownlinkDataTransfer>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let datagram = BASE64.decode(request.data.as_bytes()).unwrap_or_default();
    let at = Instant::now();
    state.counters.deliveries.fetch_add(1, Ordering::Relaxed);
    match bench_id(&datagram) {
        Some(id) => state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arrival { id, at }),
        None => {
            state.counters.foreign.fetch_add(1, Ordering::Relaxed);
        }
    }
    let answer = NiddDownlinkDataTransfer {
        delivery_status: Some(DeliveryStatus::Success),
        pdn_establishment_option: None,
        ..request
    };
    json(StatusCode::OK, &answer, None)
}

/// The External Identifier of bench device `index` (`71000000{index}@bench.example`).
pub fn device_id(index: usize) -> DeviceId {
    let text = format!("{:09}@bench.example", 710_000_000 + index);
    // Digits, '@' and a domain: always a valid External Identifier.
    text.parse()
        .unwrap_or_else(|_| unreachable!("{text} is an External Identifier"))
}
