//! Wiring of one bridge instance: `Bridge::bind` opens the store, binds every device socket and
//! both listeners and builds each part's handle; `BoundBridge::run` starts the tasks (the
//! fleet's receive loops and MT scheduler, the provisioner, the two HTTP servers) and stops
//! them gracefully, flushing the store. Nothing else in the crate depends on this module.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::{
    Config, DeviceConfig, ListenerLimits, Lwm2mServerConfig, SecretSource, ServerWaits,
    SettingsDigest, SocketBackend, TokenRateLimit,
};
use crate::delivery::ScefTimeLimits;
use crate::devices::groups::GroupTable;
use crate::devices::tokens::mint_capability_token;
use crate::devices::{Device, DeviceTable};
use crate::fleet::{DeviceFactory, Fleet, FleetParts, SeedReconciled};
use crate::http::Lifecycle;
use crate::http::admin::auth::AdminGuard;
use crate::http::admin::{self, ADMIN_MAX_BODY_BYTES, AdminState};
use crate::http::callback::{self, CallbackState};
use crate::http::listener::{self, ListenerSettings};
use crate::http::rate_limit::{TokenClass, TokenRateLimiter};
use crate::http::tls::{ReloadableTls, TlsFiles};
use crate::http::trigger::{TriggerState, trigger_url};
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::mo::{ServerAddress, Uplinks};
use crate::mt::Downlinks;
use crate::mt::durable::MtStore;
use crate::mt::flusher::{Flusher, TriggerSettings};
use crate::provision::Provisioner;
use crate::queue::{DeviceQueue, QueueLimits};
use crate::socket::{DeviceSocket, RelayError, SocketPool};
use crate::store::{DeviceRecord, Store, StoreError, StoreOptions};
use crate::t8::T8Client;

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
    /// A re-read `[[devices]]` that was refused; the devices stay as they were.
    #[error("{0}")]
    DeviceSeed(String),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "{needed} file descriptors are needed ({devices} device sockets + the listeners' connection caps + spare) but the limit is {limit}; raise `ulimit -n`, lower callback.limits.max_connections or shrink the device list"
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
    #[error("TLS: {0}")]
    Tls(String),
}

/// A bridge whose listeners and sockets are bound; `run` serves until shutdown.
pub struct BoundBridge {
    parts: Parts,
    callback_listener: TcpListener,
    admin_listener: TcpListener,
    pub callback_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// Every part's handle, built once by `bind`.
struct Parts {
    listeners: ListenerParts,
    devices: Arc<DeviceTable>,
    groups: Arc<GroupTable>,
    fleet: Arc<Fleet>,
    uplinks: Uplinks,
    downlinks: Arc<Downlinks>,
    provisioner: Provisioner,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
    public_url: Url,
    max_body_bytes: usize,
    admin_guard: AdminGuard,
    /// The NIDD Configuration Trigger URL's token, when `onboarding.trigger` is on.
    trigger_token: Option<Arc<str>>,
    /// The `afId` a trigger must name.
    af_id: Arc<str>,
}

pub struct Bridge;

/// How each HTTP listener is served, from the configuration.
struct ListenerParts {
    callback_limits: ListenerLimits,
    admin_limits: ListenerLimits,
    rate_limit: TokenRateLimit,
    reload: Reload,
    callback_tls: Option<Arc<ReloadableTls>>,
    admin_tls: Option<Arc<ReloadableTls>>,
}

/// What SIGHUP reloads: the admin bearer token file, and the listeners' TLS certificates (and
/// client CA) from their files. New handshakes use the new files; open connections keep
/// theirs; a listener whose files do not load keeps its old certificates (logged at warn,
/// counted in `nidd_bridge_tls_reloads_total{outcome="failed"}`), and a token file that cannot
/// be read keeps the token read before.
#[derive(Clone)]
pub struct Reload {
    listeners: Arc<[Arc<ReloadableTls>]>,
    admin_guard: AdminGuard,
    /// Set once the devices are bound; `reload_devices` needs it.
    fleet: Option<Arc<Fleet>>,
    metrics: Arc<Metrics>,
}

impl Reload {
    /// Reloads the admin token and every TLS listener; the first TLS failure, if any (the
    /// others are still tried).
    pub fn reload(&self) -> Result<(), BridgeError> {
        self.admin_guard.reload();
        let mut first_failure = None;
        for listener in self.listeners.iter() {
            if let Err(error) = listener.reload() {
                first_failure.get_or_insert(BridgeError::Tls(error.to_string()));
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Brings the devices the configuration file declares to `seed`, its `[[devices]]` as
    /// read again: new entries are added, changed ones changed in place, one the admin API
    /// added becomes the file's, and a file device no longer listed is removed (its side at
    /// the SCEF deleted, as `DELETE /api/v1/devices/{device}` does). Devices added through
    /// the admin API are left alone. A seed with any bad entry changes nothing.
    pub async fn reload_devices(
        &self,
        seed: &[DeviceConfig],
    ) -> Result<SeedReconciled, BridgeError> {
        let Some(fleet) = &self.fleet else {
            return Err(BridgeError::DeviceSeed(
                "the bridge's devices are not bound yet".into(),
            ));
        };
        let outcome = fleet.reconcile_file(seed).await;
        let label = if outcome.is_ok() {
            "applied"
        } else {
            "invalid"
        };
        self.metrics
            .device_seed_reloads
            .with_label_values(&[label])
            .inc();
        outcome.map_err(|error| BridgeError::DeviceSeed(format!("[[devices]] {error}")))
    }

    /// Reads the configuration file at `path` again and applies its `[[devices]]`
    /// ([`reload_devices`](Self::reload_devices)); what else changed in the file takes effect
    /// at the next start.
    pub async fn reload_devices_from(&self, path: &Path) -> Result<SeedReconciled, BridgeError> {
        match Config::load(path) {
            Ok(config) => self.reload_devices(&config.devices).await,
            Err(error) => {
                self.metrics
                    .device_seed_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                Err(BridgeError::Config(error))
            }
        }
    }
}

/// What a caller beside a running bridge may ask of it: where each device's traffic leaves
/// from and which callback URL the SCEF is given for it.
#[derive(Clone)]
pub struct BridgeHandle {
    devices: Arc<DeviceTable>,
    public_url: Url,
    reload: Reload,
}

impl BridgeHandle {
    /// The UDP address a device's traffic leaves from.
    pub fn device_address(&self, id: &DeviceId) -> Option<SocketAddr> {
        self.devices.get(id).map(|d| d.socket.local_addr())
    }

    /// Reloads the admin token and the listeners' TLS certificates, as SIGHUP does.
    pub fn reload(&self) -> Result<(), BridgeError> {
        self.reload.reload()
    }

    /// Brings the configuration file's devices to `seed`, as SIGHUP does with the file's
    /// `[[devices]]` ([`Reload::reload_devices`]).
    pub async fn reload_devices(
        &self,
        seed: &[DeviceConfig],
    ) -> Result<SeedReconciled, BridgeError> {
        self.reload.reload_devices(seed).await
    }

    /// The NIDD callback URL of a device's configuration.
    pub fn callback_url(&self, id: &DeviceId) -> Option<String> {
        self.devices
            .get(id)
            .map(|d| d.callback_url(&self.public_url))
    }
}

impl Bridge {
    /// Opens the store, binds every device socket (persisted addresses first) and both HTTP
    /// listeners. Nothing is sent to the SCEF before `run`. `secrets` stays in use while the
    /// bridge runs: the T8 client reads its bearer token again when the SCEF answers 401.
    pub async fn bind(
        config: Config,
        secrets: &'static (dyn SecretSource + Send + Sync),
    ) -> Result<BoundBridge, BridgeError> {
        Self::bind_with(config, secrets, StoreOptions::default()).await
    }

    /// As [`bind`](Self::bind), with every write and flush of the store passing `faults`
    /// first, so tests can make them fail and succeed again (feature `store-faults`, which the
    /// test bed enables; the product build does not have it).
    #[cfg(feature = "store-faults")]
    pub async fn bind_with_store_faults(
        config: Config,
        secrets: &'static (dyn SecretSource + Send + Sync),
        faults: crate::store::StoreFaults,
    ) -> Result<BoundBridge, BridgeError> {
        let options = StoreOptions {
            faults: Some(faults),
            ..StoreOptions::default()
        };
        Self::bind_with(config, secrets, options).await
    }

    async fn bind_with(
        config: Config,
        secrets: &'static (dyn SecretSource + Send + Sync),
        store_options: StoreOptions,
    ) -> Result<BoundBridge, BridgeError> {
        let metrics = Arc::new(Metrics::new()?);
        let [callback_files, admin_files] = listener_tls_files(&config);
        let tls = |(listener, files): (&'static str, Option<TlsFiles>)| {
            files
                .map(|files| ReloadableTls::load(listener, files, metrics.tls_reloads.clone()))
                .transpose()
                .map(|tls| tls.map(Arc::new))
                .map_err(|e| BridgeError::Tls(e.to_string()))
        };
        let callback_tls = tls(callback_files)?;
        let admin_tls = tls(admin_files)?;
        let admin_guard = AdminGuard::new(&config.admin, secrets, metrics.admin_refusals.clone())?;
        let mut listener_parts = ListenerParts {
            callback_limits: config.callback.limits,
            admin_limits: config.admin.limits,
            rate_limit: config.callback.rate_limit,
            reload: Reload {
                listeners: callback_tls.iter().chain(&admin_tls).cloned().collect(),
                admin_guard: admin_guard.clone(),
                fleet: None,
                metrics: metrics.clone(),
            },
            callback_tls,
            admin_tls,
        };
        // TLS files and secrets are read now: a bad one stops the start with its key named.
        let t8 = Arc::new(T8Client::from_config(
            &config.scef,
            secrets,
            metrics.clone(),
        )?);
        let mut store_options = store_options;
        store_options.metrics = Some(metrics.clone());
        let store = Store::open_with(&config.store.path, store_options)?;
        let callback_listener = listen(config.callback.listen).await?;
        let admin_listener = listen(config.admin.listen).await?;
        let callback_addr = local_addr(&callback_listener, config.callback.listen)?;
        let admin_addr = local_addr(&admin_listener, config.admin.listen)?;
        let public_url = match &config.callback.public_url {
            Some(url) => url.clone(),
            None => Url::parse(&format!(
                "{}://{callback_addr}",
                if listener_parts.callback_tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            ))
            .map_err(|e| crate::config::ConfigError::Invalid(format!("callback URL: {e}")))?,
        };

        let kid_routes: Arc<[crate::routing::KidRoute]> = Arc::from(config.kid_routes());
        // Groups before devices: a member's configuration is its group's.
        let groups = Arc::new(GroupTable::load(&store, &config.groups)?);
        let factory = DeviceFactory::new(
            config.psm.clone(),
            config.lwm2m_servers.clone(),
            kid_routes,
            groups.clone(),
        );
        let seeds = device_seeds(&config, &factory, &store)?;
        // With `anyip` the devices share one socket per core: no descriptor per device.
        let device_sockets = match config.sockets.backend {
            SocketBackend::PerSocket => seeds.len(),
            SocketBackend::AnyIp => crate::socket::shared_socket_count(),
        };
        ensure_file_descriptors(
            device_sockets,
            config.callback.limits.max_connections + config.admin.limits.max_connections,
        )?;
        let trigger_token = if config.onboarding.trigger {
            Some(Arc::from(store.trigger_token(mint_capability_token)?))
        } else {
            None
        };
        let af_id: Arc<str> = Arc::from(
            config
                .onboarding
                .af_id
                .clone()
                .unwrap_or_else(|| config.scef.scs_as_id.clone()),
        );
        let mt_store = MtStore::open(&store)?;
        let mut queued = mt_store.load()?;
        // Persisted addresses are bound before any new allocation, so no new device takes a
        // port an existing device's registration points at.
        let mut pool = SocketPool::new(&config.sockets)?;
        let file_devices: std::collections::HashMap<DeviceId, SettingsDigest> = seeds
            .iter()
            .filter(|seed| !seed.from_api)
            .map(|seed| (seed.id.clone(), seed.settings.digest()))
            .collect();
        let mut sockets: Vec<Option<DeviceSocket>> = Vec::with_capacity(seeds.len());
        for seed in &seeds {
            let persisted = seed.record.as_ref().and_then(|r| r.udp_address);
            sockets.push(match persisted.map(|address| pool.bind_exact(address)) {
                Some(Ok(socket)) => Some(socket),
                Some(Err(error)) => {
                    metrics.socket_reallocations.inc();
                    tracing::warn!(device = %seed.id, %error, "persisted UDP address unavailable; the device gets a new one and must register again");
                    None
                }
                None => None,
            });
        }
        let psm = &config.psm;
        let devices = DeviceTable::new(
            store.clone(),
            metrics.devices_provisioned.clone(),
            metrics.store_errors.clone(),
        );
        for (seed, socket) in seeds.into_iter().zip(sockets) {
            let socket = Arc::new(match socket {
                Some(socket) => socket,
                None => pool.bind_next()?,
            });
            let queue =
                DeviceQueue::from_entries(queued.remove(seed.id.canonical()).unwrap_or_default());
            let on_demand = seed.record.as_ref().is_some_and(|r| r.onboarded);
            let stored = seed.record.clone();
            let (device, nidd) = factory.build(&seed.settings, seed.id, seed.record, socket, queue);
            let device = if seed.from_api {
                let onboarding = nidd.is_none();
                let device = device.added_with(seed.settings, onboarding);
                if on_demand {
                    device.created_on_demand()
                } else {
                    device
                }
            } else {
                device
            };
            devices.insert_as_stored(Arc::new(device), nidd, stored.as_ref())?;
        }
        metrics.devices_configured.set(devices.len() as i64);
        let devices = Arc::new(devices);

        let servers: Arc<[ServerAddress]> = config
            .lwm2m_servers
            .iter()
            .map(|s| ServerAddress {
                name: s.name.clone(),
                address: s.address,
                waits: s.waits(),
            })
            .collect();
        let server_addresses: Arc<[SocketAddr]> = servers.iter().map(|s| s.address).collect();
        let uplinks = Uplinks::new(
            devices.clone(),
            servers,
            config.nidd.check_endpoint_name,
            config.nidd.max_packet_bytes,
            metrics.clone(),
        );
        let waits: Arc<[ServerWaits]> = config
            .lwm2m_servers
            .iter()
            .map(Lwm2mServerConfig::waits)
            .collect();
        let downlinks = Arc::new(Downlinks::new(
            server_addresses,
            waits,
            config.nidd.max_packet_bytes,
            mt_store,
            QueueLimits::from_config(psm),
            ScefTimeLimits::from_config(psm),
            metrics.clone(),
        ));
        // Queues reloaded from the store keep to today's limits, which may be smaller.
        let limits = QueueLimits::from_config(psm);
        for device in devices.iter() {
            let dropped = device.state().mt.queue.enforce(&limits);
            if !dropped.is_empty() {
                tracing::warn!(device = %device.id, dropped = dropped.len(), "reloaded MT queue over the configured limits; dropped by the overflow policy");
                downlinks.record_drops(&device, dropped);
            }
        }
        let provisioner = Provisioner::new(
            devices.clone(),
            groups.clone(),
            t8.clone(),
            config.scef.clone(),
            config.nidd.clone(),
            Duration::from_secs(psm.monitoring_duration_s),
            public_url.clone(),
            metrics.clone(),
        );
        // A 404 on an MT delivery: the flusher hands the device to the provisioner.
        let reprovision = provisioner.reprovision();
        {
            let (t8, metrics) = (t8.clone(), metrics.clone());
            downlinks.set_pending_canceller(Arc::new(move |device: &Device, location: Url| {
                let (t8, metrics, id) = (t8.clone(), metrics.clone(), device.id.clone());
                tokio::spawn(async move {
                    let outcome = match t8.cancel_downlink_delivery(&location).await {
                        Ok(true) => "cancelled",
                        Ok(false) => "already_gone",
                        Err(error) => {
                            tracing::warn!(device = %id, %location, %error, "cannot cancel a pending delivery of a dropped MT datagram; the SCEF may still send it");
                            "failed"
                        }
                    };
                    metrics
                        .mt_pending_cancellations
                        .with_label_values(&[outcome])
                        .inc();
                });
            }));
        }
        let t8_for_fleet = t8.clone();
        let flusher = Arc::new(Flusher::new(
            downlinks.clone(),
            t8,
            psm.global_rate_per_s,
            TriggerSettings::from_config(psm),
            public_url.clone(),
            metrics.clone(),
            Arc::new(move |device: &Device| reprovision.configuration_terminated(device)),
        ));
        let fleet = Arc::new(Fleet::new(
            FleetParts {
                factory,
                devices: devices.clone(),
                downlinks: downlinks.clone(),
                flusher,
                t8: t8_for_fleet,
                metrics: metrics.clone(),
                provisioner: provisioner.waker(),
                release_grace: Duration::from_secs(config.sockets.release_grace_s),
                retry: (
                    Duration::from_millis(config.scef.retry_initial_ms),
                    Duration::from_millis(config.scef.retry_max_ms),
                ),
                onboarding: config.onboarding.clone(),
            },
            pool,
            file_devices,
        ));
        listener_parts.reload.fleet = Some(fleet.clone());
        tracing::info!(devices = devices.len(), %callback_addr, %admin_addr, "bridge bound");
        Ok(BoundBridge {
            parts: Parts {
                listeners: listener_parts,
                devices,
                groups,
                fleet,
                uplinks,
                downlinks,
                provisioner,
                metrics,
                lifecycle: Lifecycle::default(),
                public_url,
                max_body_bytes: config.callback.max_body_bytes,
                admin_guard,
                trigger_token,
                af_id,
            },
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
        self.handle().device_address(id)
    }

    /// Reloads the admin token and the listeners' TLS certificates; [`reload_on_sighup`]
    /// drives it from SIGHUP.
    pub fn reload(&self) -> Reload {
        self.parts.listeners.reload.clone()
    }

    /// A handle that stays valid while the bridge runs.
    pub fn handle(&self) -> BridgeHandle {
        BridgeHandle {
            devices: self.parts.devices.clone(),
            public_url: self.parts.public_url.clone(),
            reload: self.parts.listeners.reload.clone(),
        }
    }

    /// Serves until `shutdown` completes, then stops every task and flushes the store.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BridgeError> {
        let Parts {
            listeners: listener_parts,
            devices,
            groups,
            fleet,
            uplinks,
            downlinks,
            provisioner,
            metrics,
            lifecycle,
            public_url,
            max_body_bytes,
            admin_guard,
            trigger_token,
            af_id,
        } = self.parts;
        let reprovision = provisioner.reprovision();
        let rotation = provisioner.callback_rotation();
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        // Every device's socket receive loop and MT flusher, and those of devices added later.
        fleet.start(cancel.clone());
        tasks.spawn(downlinks.clone().run_commits(cancel.clone()));
        {
            // A reopened store gets every device record and queue written again from memory.
            let (devices, downlinks) = (devices.clone(), downlinks.clone());
            tasks.spawn(devices.store().clone().run_health(cancel.clone(), move || {
                devices.rewrite()?;
                downlinks.rewrite(devices.iter())
            }));
        }
        tasks.spawn(provisioner.run(cancel.clone()));
        let known_tokens = {
            let (devices, groups, trigger_token) =
                (devices.clone(), groups.clone(), trigger_token.clone());
            Arc::new(move |token: &str| {
                if groups.by_token(token).is_some() {
                    TokenClass::Unlimited
                } else if devices.by_token(token).is_some()
                    || trigger_token.as_deref() == Some(token)
                {
                    TokenClass::Limited
                } else {
                    TokenClass::Unknown
                }
            })
        };
        let callback_settings = ListenerSettings {
            name: "callback",
            limits: listener_parts.callback_limits,
            max_body_bytes,
            tls: listener_parts.callback_tls,
            rate_limit: Some(TokenRateLimiter::new(
                listener_parts.rate_limit,
                known_tokens,
            )),
            refusals: metrics.listener_refusals.clone(),
            connections: metrics.listener_connections.clone(),
        };
        let admin_settings = ListenerSettings {
            name: "admin",
            limits: listener_parts.admin_limits,
            max_body_bytes: ADMIN_MAX_BODY_BYTES,
            tls: listener_parts.admin_tls,
            rate_limit: None,
            refusals: metrics.listener_refusals.clone(),
            connections: metrics.listener_connections.clone(),
        };
        let trigger = TriggerState {
            token: trigger_token.clone(),
            af_id,
            fleet: fleet.clone(),
            reprovision: reprovision.clone(),
            metrics: metrics.clone(),
            lifecycle: lifecycle.clone(),
            max_body_bytes,
        };
        let callback_app = callback::router(CallbackState {
            devices: devices.clone(),
            uplinks,
            downlinks: downlinks.clone(),
            reprovision,
            metrics: metrics.clone(),
            max_body_bytes,
            lifecycle: lifecycle.clone(),
            trigger,
            groups: groups.clone(),
            fleet: fleet.clone(),
        });
        let admin_app = admin::router(AdminState {
            devices: devices.clone(),
            fleet: fleet.clone(),
            downlinks,
            metrics,
            lifecycle: lifecycle.clone(),
            guard: admin_guard,
            rotation,
            trigger_url: trigger_token.map(|token| trigger_url(&public_url, &token)),
            groups: groups.clone(),
        });
        let callback_server = listener::serve(
            self.callback_listener,
            callback_app,
            callback_settings,
            cancel.clone(),
        );
        let admin_server = listener::serve(
            self.admin_listener,
            admin_app,
            admin_settings,
            cancel.clone(),
        );
        let servers = async { tokio::try_join!(callback_server, admin_server) };
        tokio::pin!(servers);
        let finished_early = tokio::select! {
            result = &mut servers => Some(result),
            _ = shutdown => None,
        };
        tracing::info!("shutting down");
        lifecycle.begin_shutdown();
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
        fleet.stopped().await;
        devices.store().flush().await?;
        tracing::info!("store flushed; bridge stopped");
        result
    }
}

/// Resolves on SIGTERM or Ctrl-C: what a process running a bridge (or a test-bed peer) stops on.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}

/// Each listener's TLS files, when it serves TLS.
fn listener_tls_files(config: &Config) -> [(&'static str, Option<TlsFiles>); 2] {
    let files = |cert: &Option<std::path::PathBuf>,
                 key: &Option<std::path::PathBuf>,
                 client_ca: &Option<std::path::PathBuf>| {
        Some(TlsFiles {
            cert: cert.clone()?,
            key: key.clone()?,
            client_ca: client_ca.clone(),
        })
    };
    [
        (
            "callback",
            files(
                &config.callback.tls_cert_file,
                &config.callback.tls_key_file,
                &config.callback.client_ca_file,
            ),
        ),
        (
            "admin",
            files(
                &config.admin.tls_cert_file,
                &config.admin.tls_key_file,
                &None,
            ),
        ),
    ]
}

/// Reads every listener's certificate, key and client CA as `bind` would, so `check-config`
/// refuses files that would not start the bridge (not PEM, key not matching the certificate).
pub fn check_tls(config: &Config) -> Result<(), BridgeError> {
    for (listener, files) in listener_tls_files(config) {
        if let Some(files) = files {
            crate::http::tls::server_config(listener, &files)
                .map_err(|e| BridgeError::Tls(e.to_string()))?;
        }
    }
    Ok(())
}

/// Runs `reload` on every SIGHUP, for as long as the process runs: what `nidd-bridge run`
/// spawns beside the bridge. The handler is installed when this is called (within the
/// runtime), not when the future first runs, so a SIGHUP right after start-up is not fatal.
pub fn reload_on_sighup(
    reload: Reload,
    config_path: Option<PathBuf>,
) -> impl Future<Output = ()> + Send + 'static {
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        let Ok(mut hangups) = hangups else {
            tracing::warn!(
                "cannot listen for SIGHUP; TLS certificates are not reloaded, the admin token only on a mismatch"
            );
            return;
        };
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the admin token and TLS certificates");
            // A failure is logged and counted where it happens; the old certificates stay.
            let _ = reload.reload();
            let Some(path) = &config_path else { continue };
            match reload.reload_devices_from(path).await {
                Ok(outcome) => tracing::info!(
                    path = %path.display(),
                    added = outcome.added,
                    changed = outcome.changed,
                    adopted = outcome.adopted,
                    removed = outcome.removed,
                    unchanged = outcome.unchanged,
                    "SIGHUP: the configuration file's [[devices]] applied; other changes to the file take effect at the next start"
                ),
                Err(error) => tracing::error!(
                    path = %path.display(),
                    %error,
                    "SIGHUP: the configuration file's [[devices]] were not applied; the devices stay as they were"
                ),
            }
        }
    }
}

/// Connections the kernel may hold completed but not yet accepted (capped by
/// `net.core.somaxconn`). Deeper than tokio's 1024 so a burst of connections waits for the
/// accept loop, which sheds idle ones, instead of having its handshakes dropped.
const LISTEN_BACKLOG: u32 = 4096;

async fn listen(address: SocketAddr) -> Result<TcpListener, BridgeError> {
    let listen = || {
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restarted bridge binds its port again at once.
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| BridgeError::Listen { address, source })
}

fn local_addr(listener: &TcpListener, address: SocketAddr) -> Result<SocketAddr, BridgeError> {
    listener
        .local_addr()
        .map_err(|source| BridgeError::Listen { address, source })
}

/// A device to start with: one of the file's `[[devices]]`, or one the admin API added in an
/// earlier run (its settings kept in its record).
struct DeviceSeed {
    settings: DeviceConfig,
    id: DeviceId,
    record: Option<DeviceRecord>,
    from_api: bool,
}

/// The file's devices, then the admin API's kept in the store. The file wins for an identity
/// in both; a record marked as being removed is left to the provisioner, which finishes the
/// removal at the SCEF.
fn device_seeds(
    config: &Config,
    factory: &DeviceFactory,
    store: &Store,
) -> Result<Vec<DeviceSeed>, BridgeError> {
    let mut seeds = Vec::with_capacity(config.devices.len());
    // One pass over the store; a record that cannot be decoded is quarantined by it, and that
    // device starts as a new one.
    let mut stored: std::collections::HashMap<String, DeviceRecord> =
        store.devices()?.into_iter().collect();
    for settings in &config.devices {
        let id = settings.device_id()?;
        let record = stored.remove(id.canonical());
        seeds.push(DeviceSeed {
            settings: settings.clone(),
            id,
            record,
            from_api: false,
        });
    }
    for (key, record) in stored {
        let Some(settings) = record.settings.clone() else {
            continue;
        };
        if record.removing {
            continue;
        }
        let Ok(id) = key.parse::<DeviceId>() else {
            continue;
        };
        if let Err(error) = factory.check(&settings) {
            // Say, a server it named left the file: it falls back to the first dm server.
            tracing::warn!(device = %id, %error, "an API device's settings no longer hold; started with the defaults for what does not");
        }
        seeds.push(DeviceSeed {
            settings,
            id,
            record: Some(record),
            from_api: true,
        });
    }
    Ok(seeds)
}

/// One descriptor per device socket and per connection the listeners may hold, plus a spare
/// reserve, so a saturated callback listener cannot take the descriptors `/healthz`, the store
/// or the T8 client need: raise the soft limit or refuse to start.
fn ensure_file_descriptors(devices: usize, connections: usize) -> Result<(), BridgeError> {
    let needed = devices as u64 + connections as u64 + SPARE_FILE_DESCRIPTORS;
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
