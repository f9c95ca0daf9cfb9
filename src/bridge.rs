//! Wiring of one bridge instance: the shared device table, the MO path (T8 uplink → device
//! socket → LwM2M server), the MT path (device socket → T8 downlink delivery), start-up
//! (`Bridge::bind`) and the run loop with graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::coap::Datagram;
use crate::config::{Config, Lwm2mServerConfig, SecretSource, ServerRole};
use crate::delivery::{self, MtState, Pacer, QueueEffect, unix_ms};
use crate::device::DeviceId;
use crate::metrics::Metrics;
use crate::mt_queue::{DeviceQueue, DropReason, MtStore, QueueLimits, QueuedDatagram};
use crate::reachability::Reachability;
use crate::relay::{DeviceSocket, RECEIVE_BUFFER_BYTES, RelayError, SocketPool};
use crate::routing::Router;
use crate::store::{DeviceRecord, Store, StoreError, StoredConfiguration, StoredSubscription};
use crate::t8::{DeviceTriggering, NiddStatus, T8Client};
use crate::{admin, callback, provision};

/// How long shutdown waits for in-flight HTTP requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Descriptors kept free for listeners, the store and outgoing HTTP connections.
const SPARE_FILE_DESCRIPTORS: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{needed} file descriptors are needed ({devices} device sockets + spare) but the limit is {limit}; raise `ulimit -n` or shrink the device list"
    )]
    FileDescriptors {
        needed: u64,
        devices: usize,
        limit: u64,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("T8 client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
}

/// A NIDD configuration as the bridge holds it in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct NiddState {
    pub location: Url,
    pub status: Option<NiddStatus>,
    pub maximum_packet_size_bits: Option<u64>,
    /// The callback URL the SCEF calls for this configuration.
    pub notification_destination: Option<String>,
    /// The device's MonitoringEvent subscription, when monitoring is on.
    pub monitoring_subscription: Option<StoredSubscription>,
}

impl NiddState {
    pub fn is_usable(&self) -> bool {
        !self.status.as_ref().is_some_and(NiddStatus::is_terminated)
    }

    fn stored(&self) -> StoredConfiguration {
        StoredConfiguration {
            location: self.location.to_string(),
            status: self.status.as_ref().map(|s| s.as_str().to_string()),
            maximum_packet_size_bits: self.maximum_packet_size_bits,
            notification_destination: self.notification_destination.clone(),
            monitoring_subscription: self.monitoring_subscription.clone(),
        }
    }
}

/// Mutable per-device state; held only for short, non-async sections.
#[derive(Debug)]
pub struct DeviceState {
    pub router: Router,
    pub nidd: Option<NiddState>,
    pub mt: MtState,
}

pub struct Device {
    pub id: DeviceId,
    pub endpoint_name: Option<String>,
    pub callback_token: String,
    pub socket: Arc<DeviceSocket>,
    /// Wakes the device's MT flusher (new MT, device awake, delivery outcome).
    pub wake: Notify,
    /// Subscribe to MonitoringEvent reachability reports for this device.
    pub monitoring: bool,
    state: Mutex<DeviceState>,
}

impl Device {
    pub fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping the device, so a poisoned lock is taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Largest datagram for this device: the SCEF's `maximumPacketSize` (bits) or the default.
    pub fn max_packet_bytes(&self, default: usize) -> usize {
        self.state()
            .nidd
            .as_ref()
            .and_then(|n| n.maximum_packet_size_bits)
            .map(|bits| usize::try_from(bits / 8).unwrap_or(usize::MAX))
            .filter(|bytes| *bytes > 0)
            .unwrap_or(default)
    }

    /// The callback URL of this device's NIDD configuration.
    pub fn callback_url(&self, public_url: &Url) -> String {
        self.capability_url(public_url, "nidd")
    }

    /// This device's callback URL for one T8 API (`nidd`, `monitoring`, `triggering`).
    pub fn capability_url(&self, public_url: &Url, api: &str) -> String {
        format!(
            "{}/t8/v1/{api}/{}",
            public_url.as_str().trim_end_matches('/'),
            self.callback_token
        )
    }
}

/// State shared by the callback server, the admin server, the sockets and the provisioner.
pub struct Shared {
    pub config: Config,
    pub servers: Vec<Lwm2mServerConfig>,
    pub devices: Vec<Arc<Device>>,
    pub by_id: HashMap<DeviceId, usize>,
    pub by_token: HashMap<String, usize>,
    pub t8: T8Client,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub public_url: Url,
    pub shutting_down: AtomicBool,
    /// Count of devices whose NIDD configuration is usable (kept by `set_nidd`).
    provisioned: AtomicUsize,
    /// Wakes the provisioner when a configuration was terminated by the SCEF.
    pub reprovision: Notify,
    pub mt_store: MtStore,
    pub queue_limits: QueueLimits,
    /// Paces MT deliveries over all devices.
    pub global_pacer: Mutex<Pacer>,
}

impl Shared {
    pub fn device(&self, id: &DeviceId) -> Option<&Arc<Device>> {
        self.by_id.get(id).map(|i| &self.devices[*i])
    }

    /// Devices with a usable NIDD configuration.
    pub fn provisioned_count(&self) -> usize {
        self.provisioned.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
            && self.provisioned_count() == self.devices.len()
    }

    /// Records a device's NIDD configuration in memory and in the store.
    pub fn set_nidd(&self, device: &Device, nidd: Option<NiddState>) -> Result<(), StoreError> {
        let record = DeviceRecord {
            udp_address: Some(device.socket.local_addr()),
            callback_token: device.callback_token.clone(),
            nidd: nidd.as_ref().map(NiddState::stored),
        };
        self.store.put_device(&device.id, &record)?;
        let usable = nidd.as_ref().is_some_and(NiddState::is_usable);
        let was_usable = {
            let mut state = device.state();
            let was = state.nidd.as_ref().is_some_and(NiddState::is_usable);
            state.nidd = nidd;
            was
        };
        match (was_usable, usable) {
            (false, true) => self.provisioned.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.provisioned.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
        self.metrics
            .devices_provisioned
            .set(self.provisioned_count() as i64);
        Ok(())
    }

    /// MO: forwards one datagram the device sent, byte for byte, to the server it is for.
    pub async fn forward_uplink(
        &self,
        device: &Device,
        datagram: &[u8],
    ) -> Result<(), UplinkError> {
        let view = Datagram::parse(datagram).map_err(|e| {
            self.metrics.drop_datagram("mo", "not_coap");
            UplinkError::NotCoap(e)
        })?;
        if self.config.nidd.check_endpoint_name
            && let Some(endpoint) = view.registration_endpoint()
            && !endpoint_matches(device, endpoint)
        {
            self.metrics.drop_datagram("mo", "endpoint_mismatch");
            return Err(UplinkError::EndpointMismatch(endpoint.to_string()));
        }
        let server = device.state().router.route_uplink(&view);
        let destination = self.servers[server].address;
        device
            .socket
            .send_to(datagram, destination)
            .await
            .map_err(|e| {
                self.metrics.drop_datagram("mo", "udp_send_failed");
                UplinkError::Send(e)
            })?;
        self.metrics.mo_datagrams.inc();
        self.metrics.mo_bytes.inc_by(datagram.len() as u64);
        self.metrics.count_coap("mo", view.oscore);
        self.device_woke(device, None, "uplink");
        tracing::debug!(device = %device.id, server = %self.servers[server].name, code = %view.code_string(), mid = view.message_id, bytes = datagram.len(), "MO forwarded");
        Ok(())
    }

    /// MT: handles one datagram that arrived on a device's socket.
    pub async fn handle_downlink(&self, device: &Device, datagram: Vec<u8>, from: SocketAddr) {
        let Some(server) = self.servers.iter().position(|s| s.address == from) else {
            self.metrics.drop_datagram("mt", "unknown_source");
            tracing::debug!(device = %device.id, %from, "dropped datagram from a source that is not a configured LwM2M server");
            return;
        };
        let limit = device.max_packet_bytes(self.config.nidd.max_packet_bytes);
        if datagram.len() > limit || datagram.len() >= RECEIVE_BUFFER_BYTES {
            self.metrics.drop_datagram("mt", "oversized");
            tracing::warn!(device = %device.id, bytes = datagram.len(), limit, "dropped MT datagram larger than the NIDD maximum packet size");
            return;
        }
        let view = match Datagram::parse(&datagram) {
            Ok(view) => view,
            Err(error) => {
                self.metrics.drop_datagram("mt", "not_coap");
                tracing::debug!(device = %device.id, %error, "dropped MT datagram that is not CoAP");
                return;
            }
        };
        let now_ms = unix_ms();
        let confirmable = view.kind == crate::coap::Kind::Confirmable;
        let oscore = view.oscore;
        let item = QueuedDatagram {
            seq: self.mt_store.next_seq(),
            server,
            source: from,
            message_id: view.message_id,
            confirmable,
            enqueued_at_ms: now_ms,
            expires_at_ms: self.queue_limits.expiry(now_ms, confirmable),
            data: datagram,
            pending: None,
        };
        let length = item.data.len() as u64;
        let admission = {
            let mut state = device.state();
            state.router.note_downlink(server, &view);
            if state
                .mt
                .queue
                .is_retransmission(from, view.message_id, &item.data)
            {
                None
            } else {
                let admission = state
                    .mt
                    .queue
                    .admit(item.clone(), &self.queue_limits, now_ms);
                // Written under the device lock so the flusher can never remove it first.
                if admission.accepted
                    && let Err(error) = self.mt_store.put(&device.id, &item)
                {
                    tracing::error!(device = %device.id, %error, "cannot persist an MT datagram");
                }
                for (dropped, _) in &admission.dropped {
                    if let Err(error) = self.mt_store.remove(&device.id, dropped.seq) {
                        tracing::error!(device = %device.id, %error, "cannot remove a dropped MT datagram");
                    }
                }
                Some(admission)
            }
        };
        let Some(admission) = admission else {
            self.metrics.suppressed_retransmissions.inc();
            self.metrics.airtime_saved_bytes.inc_by(length);
            tracing::debug!(device = %device.id, mid = view.message_id, "server retransmission of queued MT suppressed");
            return;
        };
        self.count_drops(admission.dropped.iter().map(|(_, reason)| *reason));
        if !admission.accepted {
            return;
        }
        self.metrics.mt_datagrams.inc();
        self.metrics.mt_bytes.inc_by(length);
        self.metrics.count_coap("mt", oscore);
        self.metrics.mt_queue_accepted.inc();
        // Accepted means durable: flushed before the flusher is told.
        if let Err(error) = self.mt_store.flush().await {
            tracing::error!(device = %device.id, %error, "cannot flush the MT queue");
        }
        device.wake.notify_one();
    }

    fn count_drops(&self, reasons: impl Iterator<Item = DropReason>) {
        for reason in reasons {
            self.metrics
                .mt_queue_dropped
                .with_label_values(&[reason.label()])
                .inc();
        }
    }

    /// Removes dropped datagrams from the store and counts them.
    pub fn record_queue_drops(&self, device: &Device, dropped: Vec<(QueuedDatagram, DropReason)>) {
        for (item, reason) in &dropped {
            tracing::debug!(device = %device.id, seq = item.seq, reason = reason.label(), "MT datagram dropped from the queue");
            if let Err(error) = self.mt_store.remove(&device.id, item.seq) {
                tracing::error!(device = %device.id, %error, "cannot remove a dropped MT datagram");
            }
        }
        self.count_drops(dropped.into_iter().map(|(_, reason)| reason));
    }

    /// Mirrors a queue change in the store (called with the device lock held).
    pub fn apply_queue_effect(&self, device: &Device, effect: &QueueEffect) {
        let result = match effect {
            QueueEffect::Remove(seq) => self.mt_store.remove(&device.id, *seq),
            QueueEffect::Persist(item) => self.mt_store.put(&device.id, item),
            QueueEffect::Keep => Ok(()),
        };
        if let Err(error) = result {
            tracing::error!(device = %device.id, %error, "cannot update the MT queue in the store");
        }
    }

    /// The device is awake (uplink or reachability report): flush its queue.
    pub fn device_woke(&self, device: &Device, until: Option<std::time::Instant>, event: &str) {
        let now = std::time::Instant::now();
        {
            let mut state = device.state();
            match event {
                "uplink" => state.mt.reachability.on_uplink(now),
                _ => state.mt.reachability.on_reachable_report(now, until),
            }
            state.mt.on_wake();
        }
        self.metrics
            .reachability_events
            .with_label_values(&[event])
            .inc();
        device.wake.notify_one();
    }

    /// Drops a monitoring subscription the SCEF ended, so the provisioner subscribes again.
    pub fn forget_subscription(&self, device: &Device) {
        let nidd = device.state().nidd.clone();
        if let Some(mut nidd) = nidd {
            nidd.monitoring_subscription = None;
            if let Err(error) = self.set_nidd(device, Some(nidd)) {
                tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
            }
        }
        self.reprovision.notify_one();
    }

    /// Asks the SCEF to wake a sleeping device that has MT waiting (T8 device triggering).
    pub async fn send_trigger(&self, device: &Device) {
        let psm = &self.config.psm;
        let body = DeviceTriggering {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            validity_period: psm.trigger_validity_s,
            priority: "PRIORITY".into(),
            application_port_id: psm.trigger_application_port,
            trigger_payload: psm.trigger_payload_base64.clone(),
            notification_destination: device.capability_url(&self.public_url, "triggering"),
            ..Default::default()
        };
        match self.t8.create_trigger(&body).await {
            Ok((location, _)) => {
                self.metrics
                    .device_triggers
                    .with_label_values(&["sent"])
                    .inc();
                tracing::info!(device = %device.id, %location, "device trigger sent");
            }
            Err(error) => {
                self.metrics
                    .device_triggers
                    .with_label_values(&["failed"])
                    .inc();
                tracing::warn!(device = %device.id, %error, "device trigger not accepted");
            }
        }
    }

    /// Updates the queue and reachability gauges (called when metrics are scraped).
    pub fn refresh_gauges(&self) {
        let now = std::time::Instant::now();
        let now_ms = unix_ms();
        let (mut depth, mut pending, mut reachable, mut oldest) = (0i64, 0i64, 0i64, None::<u64>);
        for device in &self.devices {
            let state = device.state();
            depth += state.mt.queue.waiting().count() as i64;
            pending += state.mt.queue.pending_count() as i64;
            reachable += i64::from(state.mt.reachability.is_reachable(now));
            if let Some(enqueued) = state.mt.queue.oldest_enqueued_ms() {
                oldest = Some(oldest.map_or(enqueued, |o| o.min(enqueued)));
            }
        }
        self.metrics.mt_queue_depth.set(depth);
        self.metrics.mt_pending_deliveries.set(pending);
        self.metrics.devices_reachable.set(reachable);
        let age = oldest.map_or(0.0, |o| now_ms.saturating_sub(o) as f64 / 1000.0);
        self.metrics.mt_queue_oldest_age_seconds.set(age);
    }
}

/// Whether `endpoint` (from `ep=`) names this device, in either NAI spelling.
fn endpoint_matches(device: &Device, endpoint: &str) -> bool {
    match &device.endpoint_name {
        Some(expected) if expected == endpoint => true,
        _ => match (&device.id, endpoint.parse::<DeviceId>()) {
            (DeviceId::External(_), Ok(claimed)) => claimed == device.id,
            // An MSISDN device without a configured endpoint name has nothing to check against.
            (DeviceId::Msisdn(_), _) => device.endpoint_name.is_none(),
            _ => false,
        },
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("payload is not a CoAP message: {0}")]
    NotCoap(crate::coap::CoapError),
    #[error("Register names endpoint {0:?}, which is not this device")]
    EndpointMismatch(String),
    #[error("cannot send to the LwM2M server: {0}")]
    Send(std::io::Error),
}

/// A bridge whose listeners and sockets are bound; `run` serves until shutdown.
pub struct BoundBridge {
    shared: Arc<Shared>,
    callback_listener: TcpListener,
    admin_listener: TcpListener,
    pub callback_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub struct Bridge;

/// What a caller beside a running bridge may ask of it: where each device's traffic leaves
/// from and which callback URL the SCEF is given for it.
#[derive(Clone)]
pub struct BridgeHandle {
    shared: Arc<Shared>,
}

impl BridgeHandle {
    /// The UDP address a device's traffic leaves from.
    pub fn device_address(&self, id: &DeviceId) -> Option<SocketAddr> {
        self.shared.device(id).map(|d| d.socket.local_addr())
    }

    /// The NIDD callback URL of a device's configuration.
    pub fn callback_url(&self, id: &DeviceId) -> Option<String> {
        self.shared
            .device(id)
            .map(|d| d.callback_url(&self.shared.public_url))
    }
}

impl Bridge {
    /// Opens the store, binds every device socket (persisted addresses first) and both HTTP
    /// listeners. Nothing is sent to the SCEF before `run`.
    pub async fn bind(
        config: Config,
        secrets: &dyn SecretSource,
    ) -> Result<BoundBridge, BridgeError> {
        ensure_file_descriptors(config.devices.len())?;
        let metrics = Arc::new(Metrics::new()?);
        let bearer = config.bearer_token(secrets)?;
        let t8 = T8Client::new(
            config.scef.base_url.clone(),
            config.scef.scs_as_id.clone(),
            bearer,
            Duration::from_millis(config.scef.request_timeout_ms),
            metrics.clone(),
        )?;
        let store = Store::open(&config.store.path)?;
        let callback_listener = listen(config.callback.listen).await?;
        let admin_listener = listen(config.admin.listen).await?;
        let callback_addr = local_addr(&callback_listener, config.callback.listen)?;
        let admin_addr = local_addr(&admin_listener, config.admin.listen)?;
        let public_url = match &config.callback.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!("http://{callback_addr}"))
                .map_err(|e| crate::config::ConfigError::Invalid(format!("callback URL: {e}")))?,
        };

        let servers = config.lwm2m_servers.clone();
        let bootstrap = servers.iter().position(|s| s.role == ServerRole::Bootstrap);
        let ids: Vec<DeviceId> = config
            .devices
            .iter()
            .map(|d| d.device_id())
            .collect::<Result<_, _>>()?;
        let records: Vec<Option<DeviceRecord>> = ids
            .iter()
            .map(|id| store.device(id))
            .collect::<Result<_, _>>()?;

        let kid_routes: Arc<[crate::routing::KidRoute]> = Arc::from(config.kid_routes());
        let mt_store = store.mt_queue()?;
        let mut queued = mt_store.load()?;
        // Persisted addresses are bound before any new allocation, so no new device takes a
        // port an existing device's registration points at.
        let mut pool = SocketPool::new(&config.sockets);
        let mut sockets: Vec<Option<std::net::UdpSocket>> = Vec::with_capacity(ids.len());
        for (id, record) in ids.iter().zip(&records) {
            let persisted = record.as_ref().and_then(|r| r.udp_address);
            sockets.push(match persisted.map(|address| pool.bind_exact(address)) {
                Some(Ok(socket)) => Some(socket),
                Some(Err(error)) => {
                    metrics.socket_reallocations.inc();
                    tracing::warn!(device = %id, %error, "persisted UDP address unavailable; the device gets a new one and must register again");
                    None
                }
                None => None,
            });
        }
        let mut devices = Vec::with_capacity(ids.len());
        let mut by_id = HashMap::new();
        let mut by_token = HashMap::new();
        for (index, ((device_config, id), (record, socket))) in config
            .devices
            .iter()
            .zip(ids)
            .zip(records.into_iter().zip(sockets))
            .enumerate()
        {
            let socket = match socket {
                Some(socket) => socket,
                None => pool.bind_next()?,
            };
            let socket = Arc::new(DeviceSocket::from_std(socket)?);
            let callback_token = record
                .as_ref()
                .map(|r| r.callback_token.clone())
                .unwrap_or_else(mint_capability_token);
            let nidd = record.and_then(|r| r.nidd).and_then(|stored| {
                Some(NiddState {
                    location: Url::parse(&stored.location).ok()?,
                    status: stored.status.as_deref().map(NiddStatus::from),
                    maximum_packet_size_bits: stored.maximum_packet_size_bits,
                    notification_destination: stored.notification_destination,
                    monitoring_subscription: stored.monitoring_subscription,
                })
            });
            let endpoint_name = device_config
                .endpoint_name
                .clone()
                .or_else(|| id.default_endpoint_name());
            let device = Arc::new(Device {
                id: id.clone(),
                endpoint_name,
                callback_token: callback_token.clone(),
                socket,
                wake: Notify::new(),
                monitoring: device_config.monitoring.unwrap_or(config.psm.monitoring),
                state: Mutex::new(DeviceState {
                    router: Router::new(
                        config.default_server_for(device_config),
                        bootstrap,
                        kid_routes.clone(),
                    ),
                    nidd: None,
                    mt: MtState::new(
                        Reachability::new(Duration::from_secs(
                            device_config
                                .active_window_s
                                .unwrap_or(config.psm.active_window_s),
                        )),
                        DeviceQueue::from_entries(
                            queued.remove(id.canonical()).unwrap_or_default(),
                        ),
                        device_config
                            .buffer_owner
                            .unwrap_or(config.psm.buffer_owner),
                        config.psm.device_rate_per_s,
                        (
                            Duration::from_millis(config.psm.retry_initial_ms),
                            Duration::from_millis(config.psm.retry_max_ms),
                        ),
                        device_config
                            .trigger_after_s
                            .or(config.psm.trigger_after_s)
                            .map(Duration::from_secs),
                    ),
                }),
            });
            by_id.insert(id, index);
            by_token.insert(callback_token, index);
            devices.push((device, nidd));
        }
        metrics.devices_configured.set(devices.len() as i64);
        let shared = Arc::new(Shared {
            servers,
            devices: devices.iter().map(|(d, _)| d.clone()).collect(),
            by_id,
            by_token,
            t8,
            store,
            metrics,
            public_url,
            shutting_down: AtomicBool::new(false),
            provisioned: AtomicUsize::new(0),
            reprovision: Notify::new(),
            queue_limits: QueueLimits::from_config(&config.psm),
            global_pacer: Mutex::new(Pacer::new(config.psm.global_rate_per_s)),
            mt_store,
            config,
        });
        for (device, nidd) in devices {
            shared.set_nidd(&device, nidd)?;
        }
        tracing::info!(devices = shared.devices.len(), %callback_addr, %admin_addr, "bridge bound");
        Ok(BoundBridge {
            shared,
            callback_listener,
            admin_listener,
            callback_addr,
            admin_addr,
        })
    }
}

impl BoundBridge {
    /// The UDP address a device's traffic leaves from.
    pub fn device_address(&self, id: &DeviceId) -> Option<SocketAddr> {
        self.shared.device(id).map(|d| d.socket.local_addr())
    }

    /// A handle that stays valid while the bridge runs.
    pub fn handle(&self) -> BridgeHandle {
        BridgeHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops every task and flushes the store.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BridgeError> {
        let shared = self.shared;
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for device in shared.devices.iter().cloned() {
            let shared = shared.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let socket = device.socket.clone();
                socket
                    .receive_loop(cancel, |datagram, from| {
                        let shared = shared.clone();
                        let device = device.clone();
                        async move { shared.handle_downlink(&device, datagram, from).await }
                    })
                    .await;
            });
        }
        for device in shared.devices.iter().cloned() {
            tasks.spawn(delivery::run_flusher(
                shared.clone(),
                device,
                cancel.clone(),
            ));
        }
        tasks.spawn(provision::run(shared.clone(), cancel.clone()));
        let callback_app = callback::router(shared.clone());
        let admin_app = admin::router(shared.clone());
        let stop = cancel.clone();
        let callback_server = axum::serve(self.callback_listener, callback_app)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        let stop = cancel.clone();
        let admin_server = axum::serve(self.admin_listener, admin_app)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        let servers =
            async { tokio::try_join!(callback_server.into_future(), admin_server.into_future()) };
        tokio::pin!(servers);
        let finished_early = tokio::select! {
            result = &mut servers => Some(result),
            _ = shutdown => None,
        };
        tracing::info!("shutting down");
        shared.shutting_down.store(true, Ordering::Relaxed);
        cancel.cancel();
        // Let in-flight notifications finish (bounded), then stop the device sockets.
        let served = match finished_early {
            Some(result) => result,
            None => tokio::time::timeout(SHUTDOWN_GRACE, &mut servers)
                .await
                .unwrap_or(Ok(((), ()))),
        };
        let result = served.map(|_| ()).map_err(BridgeError::Serve);
        while tasks.join_next().await.is_some() {}
        shared.store.flush().await?;
        tracing::info!("store flushed; bridge stopped");
        result
    }
}

async fn listen(address: SocketAddr) -> Result<TcpListener, BridgeError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BridgeError::Listen { address, source })
}

fn local_addr(listener: &TcpListener, address: SocketAddr) -> Result<SocketAddr, BridgeError> {
    listener
        .local_addr()
        .map_err(|source| BridgeError::Listen { address, source })
}

/// A 128-bit random capability token, hex encoded.
fn mint_capability_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One descriptor per device socket: raise the soft limit or refuse to start.
fn ensure_file_descriptors(devices: usize) -> Result<(), BridgeError> {
    let needed = devices as u64 + SPARE_FILE_DESCRIPTORS;
    let limit = rlimit::increase_nofile_limit(needed).unwrap_or(0);
    if limit < needed {
        return Err(BridgeError::FileDescriptors {
            needed,
            devices,
            limit,
        });
    }
    Ok(())
}
