//! The minimal relay: the ceiling the bridge is measured against. One UDP socket per device;
//! MT: each datagram received → base64 → `POST .../downlink-data-deliveries` at once (no
//! queue, no store, no screening, no per-device order; at most `max_in_flight` requests in
//! flight over all devices, beyond that the socket's kernel buffer waits); MO: a T8 uplink
//! callback → base64 decode → sent from the device's socket to the server. It creates one NIDD
//! configuration per device at start-up. Same HTTP client crate (reqwest) as the bridge.
//!
//! The `nidd-bench` binary runs it in a process of its own (`nidd-bench relay`), as the bridge
//! runs in its own, so both share the machine with the load generator alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use nidd_bridge::DeviceId;
use nidd_bridge::t8::{NiddConfiguration, NiddDownlinkDataTransfer, NiddUplinkDataNotification};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("relay socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("relay HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the SCEF did not create a configuration for {device}: {detail}")]
    Configuration { device: String, detail: String },
}

/// What the relay counts.
#[derive(Debug, Default)]
pub struct RelayCounters {
    pub mt_received: AtomicU64,
    pub mt_delivered: AtomicU64,
    pub mt_failed: AtomicU64,
    pub mo_forwarded: AtomicU64,
    pub mo_failed: AtomicU64,
}

struct RelayDevice {
    id: DeviceId,
    socket: Arc<UdpSocket>,
    deliveries: Url,
}

/// A running minimal relay; stopped when dropped.
pub struct MinimalRelay {
    /// Each device's UDP address, in the order the devices were given.
    pub device_addresses: Vec<SocketAddr>,
    pub callback_address: SocketAddr,
    pub counters: Arc<RelayCounters>,
    tasks: tokio::task::JoinSet<()>,
}

impl MinimalRelay {
    /// Binds a socket per device and the callback listener, creates each device's NIDD
    /// configuration at `api_root` under `scs_as_id`, and starts relaying to and from `server`.
    pub async fn start(
        api_root: &Url,
        scs_as_id: &str,
        devices: &[DeviceId],
        server: SocketAddr,
        max_in_flight: usize,
    ) -> Result<Self, RelayError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let callback_address = listener.local_addr()?;
        let configurations = format!(
            "{}/3gpp-nidd/v1/{scs_as_id}/configurations",
            api_root.as_str().trim_end_matches('/')
        );
        let mut relayed = Vec::with_capacity(devices.len());
        let mut device_addresses = Vec::with_capacity(devices.len());
        for (index, id) in devices.iter().enumerate() {
            let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
            device_addresses.push(socket.local_addr()?);
            let request = NiddConfiguration {
                external_id: id.external_id().cloned(),
                msisdn: id.msisdn().cloned(),
                notification_destination: format!("http://{callback_address}/relay/{index}"),
                ..Default::default()
            };
            let answer = http.post(&configurations).json(&request).send().await?;
            let failed = |detail: String| RelayError::Configuration {
                device: id.to_string(),
                detail,
            };
            if answer.status() != StatusCode::CREATED {
                return Err(failed(format!("answered {}", answer.status())));
            }
            let location = answer
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| Url::parse(l).ok())
                .ok_or_else(|| failed("no Location".into()))?;
            let deliveries = Url::parse(&format!(
                "{}/downlink-data-deliveries",
                location.as_str().trim_end_matches('/')
            ))
            .map_err(|e| failed(e.to_string()))?;
            relayed.push(Arc::new(RelayDevice {
                id: id.clone(),
                socket,
                deliveries,
            }));
        }
        let counters = Arc::new(RelayCounters::default());
        let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for device in &relayed {
            tasks.spawn(relay_mt(
                device.clone(),
                http.clone(),
                permits.clone(),
                counters.clone(),
            ));
        }
        let app = Router::new()
            .route("/relay/{index}", post(relay_mo))
            .with_state(MoState {
                devices: relayed.into(),
                server,
                counters: counters.clone(),
            });
        tasks.spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "relay callback listener stopped");
            }
        });
        Ok(Self {
            device_addresses,
            callback_address,
            counters,
            tasks,
        })
    }

    /// Stops every task.
    pub fn stop(mut self) {
        self.tasks.abort_all();
    }
}

/// One device's MT: receive, encode, POST without waiting for the answer before the next.
async fn relay_mt(
    device: Arc<RelayDevice>,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    counters: Arc<RelayCounters>,
) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((length, _)) = device.socket.recv_from(&mut buffer).await else {
            return;
        };
        counters.mt_received.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let body = NiddDownlinkDataTransfer {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            data: BASE64.encode(&buffer[..length]),
            ..Default::default()
        };
        let request = http.post(device.deliveries.clone()).json(&body);
        let counters = counters.clone();
        tokio::spawn(async move {
            let delivered = match request.send().await {
                Ok(answer) => answer.status().is_success() && answer.bytes().await.is_ok(),
                Err(_) => false,
            };
            let counter = if delivered {
                &counters.mt_delivered
            } else {
                &counters.mt_failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[derive(Clone)]
struct MoState {
    devices: Arc<[Arc<RelayDevice>]>,
    server: SocketAddr,
    counters: Arc<RelayCounters>,
}

async fn relay_mo(
    State(state): State<MoState>,
    Path(index): Path<usize>,
    body: Bytes,
) -> StatusCode {
    let forwarded = async {
        let device = state.devices.get(index)?;
        let notification: NiddUplinkDataNotification = serde_json::from_slice(&body).ok()?;
        let datagram = BASE64.decode(notification.data.as_bytes()).ok()?;
        device.socket.send_to(&datagram, state.server).await.ok()
    }
    .await;
    match forwarded {
        Some(_) => {
            state.counters.mo_forwarded.fetch_add(1, Ordering::Relaxed);
            StatusCode::NO_CONTENT
        }
        None => {
            state.counters.mo_failed.fetch_add(1, Ordering::Relaxed);
            StatusCode::BAD_REQUEST
        }
    }
}
