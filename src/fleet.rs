//! The devices the bridge serves, as they change while it runs: building a device from its
//! settings (the configuration file's `[[devices]]` and the admin API's alike), adding a batch
//! all or nothing, changing one in place, and removing one — its tasks stopped, its queue
//! purged, its NIDD configuration and subscription deleted at the SCEF, its UDP address kept
//! closed for a grace period before the socket pool hands it out again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;

use crate::clock;
use crate::config::{
    BufferOwner, ConfigError, DeviceConfig, GroupConfig, Lwm2mServerConfig, OnboardingConfig,
    PsmConfig, ServerRole, SettingsDigest,
};
use crate::delivery::{MtSettings, MtState};
use crate::devices::groups::{Group, GroupTable};
use crate::devices::tokens::mint_capability_token;
use crate::devices::{Device, DeviceState, DeviceTable, NiddState, lock};
use crate::identity::{DeviceId, ExternalId};
use crate::metrics::Metrics;
use crate::mt::Downlinks;
use crate::mt::flusher::Flusher;
use crate::mt::scheduler::Scheduler;
use crate::onboarding::{OnboardingPolicy, OnboardingRefusal};
use crate::queue::DeviceQueue;
use crate::reachability::Reachability;
use crate::routing::{KidRoute, Router};
use crate::socket::anyip::AnyIpSocket;
use crate::socket::{DeviceSocket, RelayError, SocketPool};
use crate::store::{DeviceRecord, StoreError};
use crate::t8::T8Client;

/// A device as the admin API takes it: the fields of a `[[devices]]` entry, in camelCase.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DeviceSpec {
    #[serde(default, deserialize_with = "present")]
    external_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    msisdn: Option<String>,
    #[serde(default, deserialize_with = "present")]
    endpoint_name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    lwm2m_server: Option<String>,
    #[serde(default, deserialize_with = "present")]
    buffer_owner: Option<BufferOwner>,
    #[serde(default, deserialize_with = "present")]
    active_window_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    monitoring: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    trigger_after_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    wake_period_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    group: Option<String>,
}

/// A field that may be left out but not set to `null` (which would say nothing either way).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

impl From<DeviceSpec> for DeviceConfig {
    fn from(spec: DeviceSpec) -> Self {
        Self {
            external_id: spec.external_id,
            msisdn: spec.msisdn,
            endpoint_name: spec.endpoint_name,
            lwm2m_server: spec.lwm2m_server,
            buffer_owner: spec.buffer_owner,
            active_window_s: spec.active_window_s,
            monitoring: spec.monitoring,
            trigger_after_s: spec.trigger_after_s,
            wake_period_s: spec.wake_period_s,
            group: spec.group,
        }
    }
}

/// A group as the admin API takes it: the fields of a `[[groups]]` entry, in camelCase.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct GroupSpec {
    external_group_id: String,
    #[serde(default, deserialize_with = "present")]
    lwm2m_server: Option<String>,
    #[serde(default, deserialize_with = "present")]
    buffer_owner: Option<BufferOwner>,
    #[serde(default, deserialize_with = "present")]
    active_window_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    monitoring: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    trigger_after_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    wake_period_s: Option<u64>,
}

impl From<GroupSpec> for GroupConfig {
    fn from(spec: GroupSpec) -> Self {
        Self {
            external_group_id: spec.external_group_id,
            lwm2m_server: spec.lwm2m_server,
            buffer_owner: spec.buffer_owner,
            active_window_s: spec.active_window_s,
            monitoring: spec.monitoring,
            trigger_after_s: spec.trigger_after_s,
            wake_period_s: spec.wake_period_s,
        }
    }
}

/// A change to an API device's settings; what is absent stays as it is. The identity cannot
/// change: that is another device.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DevicePatch {
    #[serde(default, deserialize_with = "present")]
    endpoint_name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    lwm2m_server: Option<String>,
    #[serde(default, deserialize_with = "present")]
    buffer_owner: Option<BufferOwner>,
    #[serde(default, deserialize_with = "present")]
    active_window_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    monitoring: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    trigger_after_s: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    wake_period_s: Option<u64>,
}

impl DevicePatch {
    fn applied_to(self, settings: &DeviceConfig) -> DeviceConfig {
        let mut next = settings.clone();
        next.endpoint_name = self.endpoint_name.or(next.endpoint_name);
        next.lwm2m_server = self.lwm2m_server.or(next.lwm2m_server);
        next.buffer_owner = self.buffer_owner.or(next.buffer_owner);
        next.active_window_s = self.active_window_s.or(next.active_window_s);
        next.monitoring = self.monitoring.or(next.monitoring);
        next.trigger_after_s = self.trigger_after_s.or(next.trigger_after_s);
        next.wake_period_s = self.wake_period_s.or(next.wake_period_s);
        next
    }
}

/// Why a change to the fleet was refused; nothing of it took effect.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    #[error("entry {index}: {source}")]
    Invalid {
        index: usize,
        #[source]
        source: ConfigError,
    },
    #[error("{0}")]
    Server(String),
    #[error("entry {index}: device {id} is listed twice in the request")]
    Repeated { index: usize, id: DeviceId },
    #[error("entry {index}: device {id} exists with other settings; change it with PATCH")]
    Differs { index: usize, id: DeviceId },
    #[error("device {id} is declared in the configuration file; change or remove it there")]
    FileDevice { id: DeviceId },
    #[error("entry {index}: device {id} is still being removed; add it again once it is gone")]
    BeingRemoved { index: usize, id: DeviceId },
    #[error("{0}")]
    InvalidChange(#[source] ConfigError),
    #[error("device {0} is not configured")]
    Unknown(DeviceId),
    #[error("{wanted} new devices but the socket pool has room for {bound} more ([sockets] ports)")]
    PoolExhausted { wanted: usize, bound: usize },
    #[error("cannot bind a device socket: {0}")]
    Socket(#[source] RelayError),
    #[error("the store refused the change: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    NotOnboarded(#[from] OnboardingRefusal),
    #[error("group {0} is not configured")]
    UnknownGroup(ExternalId),
    #[error("group {0} is declared in the configuration file; change or remove it there")]
    FileGroup(ExternalId),
    #[error("group {0} exists with other settings")]
    GroupDiffers(ExternalId),
    #[error("group {0} is still being removed; add it again once it is gone")]
    GroupBeingRemoved(ExternalId),
}

/// What became of an added group.
#[derive(Clone)]
pub(crate) enum GroupAdded {
    Created(Arc<Group>),
    /// It existed with exactly these settings.
    Unchanged(Arc<Group>),
}

/// What became of one entry of an accepted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Added {
    Created,
    /// The device existed with exactly these settings.
    Unchanged,
}

/// Where a device comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Source {
    File,
    Api,
    /// Created on demand (`[onboarding]`): the NEF's NIDD Configuration Trigger.
    Onboarded,
}

impl Source {
    pub(crate) fn of(device: &Device) -> Self {
        if device.is_onboarded_on_demand() {
            Self::Onboarded
        } else if device.is_from_api() {
            Self::Api
        } else {
            Self::File
        }
    }
}

/// What an on-demand request found or made.
#[derive(Clone)]
pub(crate) enum Onboarded {
    Created(Arc<Device>),
    /// The bridge serves the device already (from any source).
    Existing(Arc<Device>),
}

/// How often every device's exchange log is swept of what is older than EXCHANGE_LIFETIME.
const EXCHANGE_SWEEP: Duration = Duration::from_secs(60);

/// Sweeps the exchange logs every [`EXCHANGE_SWEEP`]: a device that went quiet then holds none,
/// instead of keeping its last exchanges until its next datagram.
async fn sweep_exchanges(devices: Arc<DeviceTable>, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(EXCHANGE_SWEEP);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        forget_old_exchanges(&devices, crate::clock::now());
    }
}

fn forget_old_exchanges(devices: &DeviceTable, now: std::time::Instant) {
    for device in devices.iter() {
        device.state().exchanges.forget_old(now);
    }
}

/// Builds devices from their settings and the defaults of the configuration file.
pub(crate) struct DeviceFactory {
    psm: PsmConfig,
    servers: Vec<Lwm2mServerConfig>,
    bootstrap: Option<usize>,
    kid_routes: Arc<[KidRoute]>,
    groups: Arc<GroupTable>,
    /// `[psm]`'s MT settings, shared by every device this factory builds.
    mt_settings: Arc<MtSettings>,
}

impl DeviceFactory {
    pub(crate) fn new(
        psm: PsmConfig,
        servers: Vec<Lwm2mServerConfig>,
        kid_routes: Arc<[KidRoute]>,
        groups: Arc<GroupTable>,
    ) -> Self {
        let bootstrap = servers.iter().position(|s| s.role == ServerRole::Bootstrap);
        let mt_settings = MtSettings::new(
            psm.device_rate_per_s,
            (
                Duration::from_millis(psm.retry_initial_ms),
                Duration::from_millis(psm.retry_max_ms),
            ),
            Duration::from_secs(psm.guess_hold_s),
        );
        Self {
            psm,
            servers,
            bootstrap,
            kid_routes,
            groups,
            mt_settings,
        }
    }

    /// The device's identity, if its settings hold (the configuration file's rules).
    pub(crate) fn check(&self, settings: &DeviceConfig) -> Result<DeviceId, ConfigError> {
        let id = settings.check(&self.servers)?;
        self.check_group(&id, settings)?;
        Ok(id)
    }

    /// As [`check`](Self::check), leaving the named server to
    /// [`server_mismatch`](Self::server_mismatch).
    fn check_shape(&self, settings: &DeviceConfig) -> Result<DeviceId, ConfigError> {
        let shape = DeviceConfig {
            lwm2m_server: None,
            ..settings.clone()
        };
        let id = shape.check(&self.servers)?;
        self.check_group(&id, settings)?;
        Ok(id)
    }

    fn check_group(&self, id: &DeviceId, settings: &DeviceConfig) -> Result<(), ConfigError> {
        match settings.group_problem(&self.groups.ids()) {
            Some(problem) => Err(ConfigError::Invalid(format!("device {id}: {problem}"))),
            None => Ok(()),
        }
    }

    /// The group `settings` names, if it is one of the bridge's.
    fn group_of(&self, settings: &DeviceConfig) -> Option<Arc<Group>> {
        let id = settings.group.as_ref()?.parse().ok()?;
        self.groups.get(&id)
    }

    /// What is wrong with the server the settings name, if anything: not a shape error of
    /// the request but a mismatch with this bridge's configuration.
    fn server_mismatch(&self, settings: &DeviceConfig) -> Option<String> {
        let name = settings.lwm2m_server.as_ref()?;
        match self.servers.iter().find(|s| &s.name == name) {
            None => Some(format!(
                "no LwM2M server is named {name:?} in this bridge's configuration"
            )),
            Some(server) if server.role != ServerRole::Dm => {
                Some(format!("LwM2M server {name:?} is not a dm server"))
            }
            Some(_) => None,
        }
    }

    /// A device with `settings`, continuing from its stored `record` (callback token, NIDD
    /// configuration, queue mode) when it has one; the configuration to insert it with.
    pub(crate) fn build(
        &self,
        settings: &DeviceConfig,
        id: DeviceId,
        record: Option<DeviceRecord>,
        socket: Arc<DeviceSocket>,
        queue: DeviceQueue,
    ) -> (Device, Option<NiddState>) {
        let psm = &self.psm;
        let callback_token = record
            .as_ref()
            .map(|r| r.callback_token.clone())
            .unwrap_or_else(mint_capability_token);
        let pending_callback_token = record
            .as_ref()
            .and_then(|r| r.pending_callback_token.clone());
        let queue_mode = record.as_ref().map(|r| r.queue_mode).unwrap_or_default();
        let group = self.group_of(settings);
        let nidd = record.and_then(|r| r.nidd).and_then(NiddState::from_stored);
        // A member's configuration is its group's, whatever its record remembers.
        let nidd = match &group {
            Some(group) => group.nidd().map(|configuration| NiddState {
                monitoring_subscription: nidd.and_then(|n| n.monitoring_subscription),
                ..configuration
            }),
            None => nidd,
        };
        let endpoint_name = settings
            .endpoint_name
            .clone()
            .or_else(|| id.default_endpoint_name());
        let state = DeviceState {
            router: Router::new(
                settings.default_server(&self.servers),
                self.bootstrap,
                self.kid_routes.clone(),
            ),
            nidd: None,
            superseded: Vec::new(),
            checking_termination: false,
            mt: MtState::with_settings(
                Reachability::with_queue_mode(self.active_window(settings), queue_mode)
                    .with_wake_period(self.wake_period(settings)),
                queue,
                settings.buffer_owner.unwrap_or(psm.buffer_owner),
                self.mt_settings.clone(),
                self.trigger_after(settings),
            ),
            exchanges: crate::exchange::Exchanges::new(Duration::from_secs(
                psm.expected_round_trip_s,
            )),
        };
        let device = Device::new(
            id,
            endpoint_name,
            callback_token,
            socket,
            settings.monitoring.unwrap_or(psm.monitoring),
            state,
        )
        .with_pending_callback_token(pending_callback_token)
        .in_group(group);
        (device, nidd)
    }

    fn active_window(&self, settings: &DeviceConfig) -> Duration {
        Duration::from_secs(settings.active_window_s.unwrap_or(self.psm.active_window_s))
    }

    fn wake_period(&self, settings: &DeviceConfig) -> Option<Duration> {
        settings
            .wake_period_s
            .or(self.psm.wake_period_s)
            .map(Duration::from_secs)
    }

    fn trigger_after(&self, settings: &DeviceConfig) -> Option<Duration> {
        settings
            .trigger_after_s
            .or(self.psm.trigger_after_s)
            .map(Duration::from_secs)
    }

    /// Brings a running device to `settings` (its identity unchanged).
    fn apply(&self, device: &Device, settings: &DeviceConfig) {
        device.set_endpoint_name(
            settings
                .endpoint_name
                .clone()
                .or_else(|| device.id.default_endpoint_name()),
        );
        device.set_monitoring(settings.monitoring.unwrap_or(self.psm.monitoring));
        let mut state = device.state();
        state
            .router
            .set_default_server(settings.default_server(&self.servers));
        state.mt.owner = settings.buffer_owner.unwrap_or(self.psm.buffer_owner);
        state
            .mt
            .reachability
            .set_active_window(self.active_window(settings));
        state.mt.set_trigger_after(self.trigger_after(settings));
        state
            .mt
            .reachability
            .set_wake_period(self.wake_period(settings));
    }
}

/// How many devices there are, by where they come from and how far they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FleetCounts {
    pub(crate) configured: usize,
    pub(crate) from_file: usize,
    pub(crate) from_api: usize,
    /// Created on demand (`[onboarding]`).
    pub(crate) onboarded: usize,
    pub(crate) provisioned: usize,
    /// Added while running and waiting for their first NIDD configuration.
    pub(crate) onboarding: usize,
    /// Removed, with their side at the SCEF still being deleted.
    pub(crate) removing: usize,
}

/// On-demand onboarding as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OnboardingView {
    /// Whether the NEF's NIDD Configuration Trigger is accepted.
    pub(crate) trigger: bool,
    /// The URL to give the NEF as this bridge's trigger API root (a capability URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) trigger_url: Option<String>,
    pub(crate) external_id_domains: Vec<String>,
    pub(crate) msisdn_prefixes: Vec<String>,
    pub(crate) max_devices: usize,
    /// Devices created on demand that the bridge serves now.
    pub(crate) onboarded: usize,
}

/// What a re-read of the configuration file's `[[devices]]` did, in devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedReconciled {
    pub added: usize,
    pub changed: usize,
    /// Added through the admin API before, the file's from now on.
    pub adopted: usize,
    /// Declared before, no longer listed: removed as `DELETE` removes one.
    pub removed: usize,
    pub unchanged: usize,
}

/// What the fleet needs besides the device table.
pub(crate) struct FleetParts {
    pub(crate) factory: DeviceFactory,
    pub(crate) devices: Arc<DeviceTable>,
    pub(crate) downlinks: Arc<Downlinks>,
    pub(crate) flusher: Arc<Flusher>,
    pub(crate) t8: Arc<T8Client>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) provisioner: Arc<Notify>,
    /// How long a removed device's address stays closed to new devices.
    pub(crate) release_grace: Duration,
    /// Backoff bounds for deleting a removed device's side at the SCEF.
    pub(crate) retry: (Duration, Duration),
    /// Who may be created on demand, and with which settings.
    pub(crate) onboarding: OnboardingConfig,
}

/// The running bridge's devices and the tasks they run.
pub(crate) struct Fleet {
    parts: FleetParts,
    pool: Mutex<SocketPool>,
    /// One add, change or removal at a time: a batch is checked and applied as one.
    changes: tokio::sync::Mutex<()>,
    runner: OnceLock<Runner>,
    removing: AtomicUsize,
    /// Devices created on demand that the bridge serves (bounded by the policy).
    on_demand: AtomicUsize,
    /// Groups removed whose configuration at the SCEF is still being deleted.
    removing_groups: Mutex<std::collections::HashSet<ExternalId>>,
    policy: OnboardingPolicy,
    /// The settings of every device the configuration file declares now, as last read.
    file_devices: Mutex<HashMap<DeviceId, SettingsDigest>>,
}

struct Runner {
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Runs devices' MT work when they have some.
    scheduler: Arc<Scheduler>,
    /// The receive loops of devices with a socket of their own, by device.
    receive_loops: Mutex<HashMap<DeviceId, CancellationToken>>,
}

impl Fleet {
    /// `pool` holds the addresses of the devices in the table already; `file_devices` are
    /// the settings of the table's devices that the configuration file declares.
    pub(crate) fn new(
        parts: FleetParts,
        pool: SocketPool,
        file_devices: HashMap<DeviceId, SettingsDigest>,
    ) -> Self {
        let on_demand = parts
            .devices
            .iter()
            .filter(|d| d.is_onboarded_on_demand())
            .count();
        let policy = OnboardingPolicy::from_config(&parts.onboarding);
        Self {
            parts,
            pool: Mutex::new(pool),
            changes: tokio::sync::Mutex::new(()),
            runner: OnceLock::new(),
            removing: AtomicUsize::new(0),
            on_demand: AtomicUsize::new(on_demand),
            removing_groups: Mutex::new(std::collections::HashSet::new()),
            policy,
            file_devices: Mutex::new(file_devices),
        }
    }

    /// Starts every device's tasks, and those of devices added from now on, under `cancel`.
    pub(crate) fn start(self: &Arc<Self>, cancel: CancellationToken) {
        let tasks = TaskTracker::new();
        let runner = Runner {
            scheduler: Scheduler::start(self.parts.flusher.clone(), &tasks, cancel.clone()),
            cancel,
            tasks,
            receive_loops: Mutex::new(HashMap::new()),
        };
        if self.runner.set(runner).is_err() {
            return;
        }
        for device in self.parts.devices.iter() {
            self.spawn_device(device);
        }
        let Some(runner) = self.runner.get() else {
            return;
        };
        runner.tasks.spawn(sweep_exchanges(
            self.parts.devices.clone(),
            runner.cancel.clone(),
        ));
        for socket in lock(&self.pool).shared_sockets() {
            runner.tasks.spawn(dispatch_shared(
                socket,
                self.parts.devices.clone(),
                self.parts.downlinks.clone(),
                self.parts.metrics.clone(),
                runner.cancel.child_token(),
            ));
        }
    }

    /// Waits for every task started by [`start`](Self::start) to end (after its cancel).
    pub(crate) async fn stopped(&self) {
        if let Some(runner) = self.runner.get() {
            runner.tasks.close();
            runner.tasks.wait().await;
        }
    }

    /// Attaches the device to the MT scheduler and, for a device with a socket of its own,
    /// starts its receive loop (a device on the shared sockets is received for by their
    /// dispatchers): nothing else runs per device.
    fn spawn_device(&self, device: Arc<Device>) {
        let Some(runner) = self.runner.get() else {
            return;
        };
        runner.scheduler.attach(&device);
        if device.socket.is_shared() {
            return;
        }
        let cancel = runner.cancel.child_token();
        lock(&runner.receive_loops).insert(device.id.clone(), cancel.clone());
        let kernel_drops = self
            .parts
            .metrics
            .dropped_datagrams
            .with_label_values(&["mt", "receive_buffer"]);
        let downlinks = self.parts.downlinks.clone();
        runner.tasks.spawn(device.socket.clone().receive_loop(
            cancel,
            kernel_drops,
            move |datagram, from| {
                let (downlinks, device) = (downlinks.clone(), device.clone());
                async move { receive_one(&downlinks, &device, datagram, from).await }
            },
        ));
    }

    fn stop_device(&self, device: &Device) {
        device.wake.stop();
        if let Some(runner) = self.runner.get()
            && let Some(cancel) = lock(&runner.receive_loops).remove(&device.id)
        {
            cancel.cancel();
        }
    }

    pub(crate) fn counts(&self) -> FleetCounts {
        let devices = &self.parts.devices;
        let added = devices.iter().filter(|d| d.is_from_api()).count();
        let onboarded = self.on_demand.load(Ordering::Relaxed).min(added);
        let configured = devices.len();
        FleetCounts {
            configured,
            from_file: configured - added,
            from_api: added - onboarded,
            onboarded,
            provisioned: devices.provisioned_count(),
            onboarding: devices.onboarding_count(),
            removing: self.removing.load(Ordering::Relaxed),
        }
    }

    /// Adds a batch of API devices, all or none. An entry equal to an existing API device is
    /// `Unchanged`; one that differs from it, or names a file device, refuses the batch.
    pub(crate) async fn add(
        &self,
        batch: Vec<DeviceConfig>,
    ) -> Result<Vec<(DeviceId, Added)>, FleetError> {
        let _change = self.changes.lock().await;
        let devices = &self.parts.devices;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut new = Vec::new();
        // Every entry's shape first, so a malformed batch is refused as such (400) before
        // any entry's conflict with the bridge (409) is looked at.
        let mut seen = HashMap::new();
        let mut checked = Vec::with_capacity(batch.len());
        for (index, settings) in batch.into_iter().enumerate() {
            let id = self
                .parts
                .factory
                .check_shape(&settings)
                .map_err(|source| FleetError::Invalid { index, source })?;
            if seen.insert(id.clone(), index).is_some() {
                return Err(FleetError::Repeated { index, id });
            }
            checked.push((index, id, settings));
        }
        for (index, id, settings) in checked {
            if let Some(detail) = self.parts.factory.server_mismatch(&settings) {
                return Err(FleetError::Server(format!("entry {index}: {detail}")));
            }
            if let Some(existing) = devices.get(&id) {
                match existing.added_settings() {
                    None => return Err(FleetError::FileDevice { id }),
                    Some(current) if current == settings => {
                        outcomes.push((id, Added::Unchanged));
                        continue;
                    }
                    Some(_) => return Err(FleetError::Differs { index, id }),
                }
            }
            let record = devices.store().load_device(&id)?;
            if record.as_ref().is_some_and(|r| r.removing) {
                return Err(FleetError::BeingRemoved { index, id });
            }
            outcomes.push((id.clone(), Added::Created));
            new.push((id, settings, record));
        }
        self.insert_new(new, Source::Api)?;
        Ok(outcomes)
    }

    /// Binds, builds, stores and starts new devices, all or none.
    fn insert_new(
        &self,
        new: Vec<(DeviceId, DeviceConfig, Option<DeviceRecord>)>,
        source: Source,
    ) -> Result<(), FleetError> {
        let devices = &self.parts.devices;
        let sockets = self.bind_sockets(&new)?;
        let mut inserted: Vec<Arc<Device>> = Vec::with_capacity(new.len());
        for ((id, settings, record), socket) in new.into_iter().zip(sockets) {
            let (device, nidd) = self.parts.factory.build(
                &settings,
                id,
                record,
                socket,
                DeviceQueue::from_entries(Vec::new()),
            );
            let onboarding = nidd.is_none();
            let device = Arc::new(match source {
                Source::Api => device.added_with(settings, onboarding),
                Source::Onboarded => device.added_with(settings, onboarding).created_on_demand(),
                Source::File => device.with_onboarding(onboarding),
            });
            if let Err(error) = devices.insert(device.clone(), nidd) {
                tracing::error!(device = %device.id, %error, "cannot store an added device; the batch is undone");
                for added in inserted {
                    self.undo_add(added);
                }
                self.release_socket(device.socket.clone());
                return Err(error.into());
            }
            inserted.push(device);
        }
        self.publish_configured();
        if source == Source::Onboarded {
            self.on_demand.fetch_add(inserted.len(), Ordering::Relaxed);
        }
        for device in inserted {
            tracing::info!(device = %device.id, address = %device.socket.local_addr(), ?source, "device added");
            self.parts
                .metrics
                .device_changes
                .with_label_values(&["added"])
                .inc();
            self.spawn_device(device);
        }
        self.parts.provisioner.notify_one();
        Ok(())
    }

    /// A socket for every new device: its stored address when it has one and that is free,
    /// the pool's next otherwise; none at all when the pool cannot hold them all.
    fn bind_sockets(
        &self,
        new: &[(DeviceId, DeviceConfig, Option<DeviceRecord>)],
    ) -> Result<Vec<Arc<DeviceSocket>>, FleetError> {
        let mut sockets = Vec::with_capacity(new.len());
        let failure = {
            let mut pool = lock(&self.pool);
            new.iter().find_map(|(_, _, record)| {
                let stored = record
                    .as_ref()
                    .and_then(|r| r.udp_address)
                    .and_then(|address| pool.bind_exact(address).ok());
                let bound = stored.map_or_else(|| pool.bind_next(), Ok);
                match bound {
                    Ok(socket) => {
                        sockets.push(Arc::new(socket));
                        None
                    }
                    Err(error) => Some(error),
                }
            })
        };
        let Some(error) = failure else {
            return Ok(sockets);
        };
        let bound = sockets.len();
        for socket in sockets {
            self.release_socket(socket);
        }
        Err(match error {
            RelayError::PoolExhausted => FleetError::PoolExhausted {
                wanted: new.len(),
                bound,
            },
            error => FleetError::Socket(error),
        })
    }

    pub(crate) fn onboarding_view(&self, trigger_url: Option<String>) -> OnboardingView {
        let config = &self.parts.onboarding;
        OnboardingView {
            trigger: config.trigger,
            trigger_url,
            external_id_domains: config.external_id_domains.clone(),
            msisdn_prefixes: config.msisdn_prefixes.clone(),
            max_devices: config.max_devices,
            onboarded: self.on_demand.load(Ordering::Relaxed),
        }
    }

    /// Creates the device `id` names on demand, if the `[onboarding]` policy allows it and
    /// the bridge does not serve it yet; its NIDD configuration is created in the background.
    pub(crate) async fn onboard(&self, id: &DeviceId) -> Result<Onboarded, FleetError> {
        self.create_on_demand(id, self.parts.onboarding.settings_for(id))
            .await
    }

    /// Creates a member of `group` on its first uplink, with the group's member settings,
    /// under the same policy. A device the bridge serves already is returned as it is (the
    /// caller checks it is this group's).
    pub(crate) async fn onboard_member(
        &self,
        group: &Group,
        id: &DeviceId,
    ) -> Result<Onboarded, FleetError> {
        self.create_on_demand(id, group.settings().member_settings(id))
            .await
    }

    async fn create_on_demand(
        &self,
        id: &DeviceId,
        settings: DeviceConfig,
    ) -> Result<Onboarded, FleetError> {
        let _change = self.changes.lock().await;
        let devices = &self.parts.devices;
        if let Some(device) = devices.get(id) {
            return Ok(Onboarded::Existing(device));
        }
        self.policy
            .judge(id, self.on_demand.load(Ordering::Relaxed))?;
        let record = devices.store().load_device(id)?;
        if record.as_ref().is_some_and(|r| r.removing) {
            return Err(FleetError::BeingRemoved {
                index: 0,
                id: id.clone(),
            });
        }
        self.insert_new(vec![(id.clone(), settings, record)], Source::Onboarded)?;
        devices
            .get(id)
            .map(Onboarded::Created)
            .ok_or_else(|| FleetError::Unknown(id.clone()))
    }

    /// Adds a group through the admin API; its configuration is created in the background.
    /// The same group again is `Unchanged`; one the file declares, or with other settings,
    /// is refused.
    pub(crate) async fn add_group(&self, settings: GroupConfig) -> Result<GroupAdded, FleetError> {
        let _change = self.changes.lock().await;
        let groups = &self.parts.factory.groups;
        let id = settings
            .check(&self.parts.factory.servers)
            .map_err(FleetError::InvalidChange)?;
        if let Some(existing) = groups.get(&id) {
            return match (existing.is_from_api(), existing.settings() == &settings) {
                (false, _) => Err(FleetError::FileGroup(id)),
                (true, true) => Ok(GroupAdded::Unchanged(existing)),
                (true, false) => Err(FleetError::GroupDiffers(id)),
            };
        }
        if lock(&self.removing_groups).contains(&id) {
            return Err(FleetError::GroupBeingRemoved(id));
        }
        let group = groups.add(id, settings)?;
        tracing::info!(group = %group.id, "group added");
        self.parts.provisioner.notify_one();
        Ok(GroupAdded::Created(group))
    }

    /// Removes a group the admin API added, with its members (each as `DELETE` removes a
    /// device); its configuration is deleted at the SCEF in the background. How many members
    /// went with it.
    pub(crate) async fn remove_group(
        self: &Arc<Self>,
        id: &ExternalId,
    ) -> Result<usize, FleetError> {
        let _change = self.changes.lock().await;
        let groups = &self.parts.factory.groups;
        let group = groups
            .get(id)
            .ok_or_else(|| FleetError::UnknownGroup(id.clone()))?;
        if !group.is_from_api() {
            return Err(FleetError::FileGroup(id.clone()));
        }
        groups.remove(&group)?;
        lock(&self.removing_groups).insert(id.clone());
        let members: Vec<Arc<Device>> = group
            .members()
            .iter()
            .filter_map(|member| self.parts.devices.get(member))
            .collect();
        let count = members.len();
        for member in members {
            self.remove_now(member).await?;
        }
        tracing::info!(group = %id, members = count, "group removed; deleting its configuration at the SCEF");
        let fleet = self.clone();
        let finish = async move { fleet.finish_group_removal(group).await };
        match self.runner.get() {
            Some(runner) => {
                runner.tasks.spawn(finish);
            }
            None => {
                tokio::spawn(finish);
            }
        }
        Ok(count)
    }

    async fn finish_group_removal(&self, group: Arc<Group>) {
        let cancel = self
            .runner
            .get()
            .map(|r| r.cancel.clone())
            .unwrap_or_default();
        // Waits for a creation under way: what it creates is deleted too.
        let creating = group.provisioning.lock().await;
        let (mut backoff, retry_max) = self.parts.retry;
        if let Some(nidd) = group.nidd() {
            while let Err(error) = self
                .parts
                .t8
                .delete_nidd_configuration(&nidd.location)
                .await
            {
                tracing::warn!(group = %group.id, %error, retry_in_ms = backoff.as_millis() as u64, "cannot delete a removed group's NIDD configuration");
                tokio::select! {
                    // The record stays marked: the next start deletes it.
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(retry_max);
            }
        }
        drop(creating);
        if let Err(error) = self.parts.factory.groups.forget_removed(&group) {
            tracing::error!(group = %group.id, %error, "cannot delete a removed group's record; the next start does");
        }
        lock(&self.removing_groups).remove(&group.id);
        tracing::info!(group = %group.id, "removed group deleted at the SCEF");
    }

    /// Changes an API device in place.
    pub(crate) async fn change(
        &self,
        id: &DeviceId,
        patch: DevicePatch,
    ) -> Result<Arc<Device>, FleetError> {
        let _change = self.changes.lock().await;
        let device = self
            .parts
            .devices
            .get(id)
            .ok_or_else(|| FleetError::Unknown(id.clone()))?;
        // The change itself first: a malformed one is refused as such whatever the device.
        let current = device.added_settings();
        let base = current.clone().unwrap_or_else(|| DeviceConfig {
            external_id: device.id.external_id().map(ToString::to_string),
            msisdn: device.id.msisdn().map(ToString::to_string),
            ..DeviceConfig::default()
        });
        let next = patch.applied_to(&base);
        self.parts
            .factory
            .check_shape(&next)
            .map_err(FleetError::InvalidChange)?;
        let Some(current) = current else {
            return Err(FleetError::FileDevice { id: id.clone() });
        };
        if let Some(detail) = self.parts.factory.server_mismatch(&next) {
            return Err(FleetError::Server(detail));
        }
        if next == current {
            return Ok(device);
        }
        device.set_added_settings(next.clone());
        if let Err(error) = self.parts.devices.rewrite_record(&device) {
            device.set_added_settings(current);
            return Err(error.into());
        }
        self.parts.factory.apply(&device, &next);
        self.parts
            .metrics
            .device_changes
            .with_label_values(&["changed"])
            .inc();
        tracing::info!(device = %id, "device changed");
        // Monitoring may have been switched; MT may go under the new settings.
        self.parts.provisioner.notify_one();
        device.wake.ring();
        Ok(device)
    }

    /// Brings the devices of the configuration file to `seed`, its `[[devices]]` as read
    /// again (SIGHUP): an entry not served yet is added, one whose settings changed is
    /// changed in place, one the admin API added becomes the file's (the file wins, as at
    /// start-up), and a file device no longer listed is removed as `DELETE` removes one.
    /// Devices the admin API added are left alone. Every entry is checked first; a seed
    /// with any bad entry changes nothing.
    pub(crate) async fn reconcile_file(
        self: &Arc<Self>,
        seed: &[DeviceConfig],
    ) -> Result<SeedReconciled, FleetError> {
        let _change = self.changes.lock().await;
        let devices = &self.parts.devices;
        let mut wanted = Vec::with_capacity(seed.len());
        let mut seen = HashMap::with_capacity(seed.len());
        for (index, settings) in seed.iter().enumerate() {
            let id = self
                .parts
                .factory
                .check(settings)
                .map_err(|source| FleetError::Invalid { index, source })?;
            if seen.insert(id.clone(), index).is_some() {
                return Err(FleetError::Repeated { index, id });
            }
            wanted.push((index, id, settings.clone()));
        }
        let previous = lock(&self.file_devices).clone();
        let mut outcome = SeedReconciled::default();
        let (mut new, mut changed, mut adopted) = (Vec::new(), Vec::new(), Vec::new());
        for (index, id, settings) in wanted {
            match devices.get(&id) {
                Some(device) if device.is_from_api() => adopted.push((device, settings)),
                Some(_) if previous.get(&id) == Some(&settings.digest()) => outcome.unchanged += 1,
                Some(device) => changed.push((device, settings)),
                None => {
                    let record = devices.store().load_device(&id)?;
                    if record.as_ref().is_some_and(|r| r.removing) {
                        return Err(FleetError::BeingRemoved { index, id });
                    }
                    new.push((id, settings, record));
                }
            }
        }
        let departed: Vec<Arc<Device>> = previous
            .keys()
            .filter(|id| !seen.contains_key(*id))
            .filter_map(|id| devices.get(id))
            .filter(|device| !device.is_from_api())
            .collect();
        let mut file_devices: HashMap<DeviceId, SettingsDigest> = previous
            .into_iter()
            .filter(|(id, _)| seen.contains_key(id))
            .collect();
        outcome.added = new.len();
        let added: Vec<(DeviceId, SettingsDigest)> = new
            .iter()
            .map(|(id, settings, _)| (id.clone(), settings.digest()))
            .collect();
        self.insert_new(new, Source::File)?;
        file_devices.extend(added);
        for (device, settings) in adopted {
            let api_settings = device.added_settings();
            device.clear_added_settings();
            let was_on_demand = device.set_on_demand(false);
            if let Err(error) = devices.rewrite_record(&device) {
                if let Some(api_settings) = api_settings {
                    device.set_added_settings(api_settings);
                }
                device.set_on_demand(was_on_demand);
                *lock(&self.file_devices) = file_devices;
                return Err(error.into());
            }
            if was_on_demand {
                self.on_demand.fetch_sub(1, Ordering::Relaxed);
            }
            warn_if_group_differs(&device, &settings);
            self.parts.factory.apply(&device, &settings);
            tracing::info!(device = %device.id, "device added through the admin API (or on demand) is now the configuration file's");
            file_devices.insert(device.id.clone(), settings.digest());
            outcome.adopted += 1;
        }
        for (device, settings) in changed {
            warn_if_group_differs(&device, &settings);
            self.parts.factory.apply(&device, &settings);
            device.wake.ring();
            tracing::info!(device = %device.id, "device changed in the configuration file");
            self.parts
                .metrics
                .device_changes
                .with_label_values(&["changed"])
                .inc();
            file_devices.insert(device.id.clone(), settings.digest());
            outcome.changed += 1;
        }
        *lock(&self.file_devices) = file_devices;
        for device in departed {
            self.remove_now(device).await?;
            outcome.removed += 1;
        }
        self.parts.provisioner.notify_one();
        Ok(outcome)
    }

    /// Removes an API device: from now on its callback URLs are refused and it is no longer
    /// listed; its queue is purged. Its NIDD configuration and subscription are deleted at
    /// the SCEF in the background (retried until they are, or until the next start does it).
    pub(crate) async fn remove(self: &Arc<Self>, id: &DeviceId) -> Result<(), FleetError> {
        let _change = self.changes.lock().await;
        let device = self
            .parts
            .devices
            .get(id)
            .ok_or_else(|| FleetError::Unknown(id.clone()))?;
        if !device.is_from_api() {
            return Err(FleetError::FileDevice { id: id.clone() });
        }
        self.remove_now(device).await
    }

    /// Takes a device out (under the change lock) and deletes its side at the SCEF in the
    /// background.
    async fn remove_now(self: &Arc<Self>, device: Arc<Device>) -> Result<(), FleetError> {
        let id = device.id.clone();
        self.parts.devices.remove(&id)?;
        if device.is_onboarded_on_demand() {
            self.on_demand.fetch_sub(1, Ordering::Relaxed);
        }
        self.stop_device(&device);
        self.publish_configured();
        let purged = self.parts.downlinks.purge(&device).await;
        self.parts
            .metrics
            .device_changes
            .with_label_values(&["removed"])
            .inc();
        tracing::info!(device = %id, purged, "device removed; deleting its side at the SCEF");
        self.removing.fetch_add(1, Ordering::Relaxed);
        let fleet = self.clone();
        let finish = async move {
            fleet.finish_removal(device).await;
            fleet.removing.fetch_sub(1, Ordering::Relaxed);
        };
        match self.runner.get() {
            Some(runner) => {
                runner.tasks.spawn(finish);
            }
            None => {
                tokio::spawn(finish);
            }
        }
        Ok(())
    }

    async fn finish_removal(&self, device: Arc<Device>) {
        let cancel = self
            .runner
            .get()
            .map(|r| r.cancel.clone())
            .unwrap_or_default();
        // Waits for a creation under way: what it creates is deleted too.
        let creating = device.provisioning.lock().await;
        let nidd = device.state().nidd.clone();
        let member = device.is_group_member();
        let (mut backoff, retry_max) = self.parts.retry;
        loop {
            match self.delete_at_scef(nidd.as_ref(), member).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(device = %device.id, %error, retry_in_ms = backoff.as_millis() as u64, "cannot delete a removed device's NIDD configuration");
                    tokio::select! {
                        // The record stays marked: the next start deletes it.
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(retry_max);
                }
            }
        }
        drop(creating);
        if let Err(error) = self.parts.devices.forget(&device) {
            tracing::error!(device = %device.id, %error, "cannot delete a removed device's record; the next start does");
        }
        self.parts
            .metrics
            .device_changes
            .with_label_values(&["removal_finished"])
            .inc();
        tracing::info!(device = %device.id, "removed device deleted at the SCEF");
        let socket = device.socket.clone();
        drop(device);
        self.hold_then_release(socket, cancel).await;
    }

    /// Deletes a removed device's subscription and NIDD configuration; a group member's
    /// configuration is its group's and stays.
    async fn delete_at_scef(
        &self,
        nidd: Option<&NiddState>,
        group_member: bool,
    ) -> Result<(), crate::t8::T8Error> {
        let Some(nidd) = nidd else { return Ok(()) };
        if let Some(subscription) = nidd
            .monitoring_subscription
            .as_ref()
            .and_then(|s| Url::parse(&s.location).ok())
        {
            self.parts
                .t8
                .delete_monitoring_subscription(&subscription)
                .await?;
        }
        if group_member {
            return Ok(());
        }
        self.parts
            .t8
            .delete_nidd_configuration(&nidd.location)
            .await
    }

    /// Keeps a removed device's address bound for the grace period, counting what servers
    /// still send to it, then gives it back to the pool.
    async fn hold_then_release(&self, socket: Arc<DeviceSocket>, cancel: CancellationToken) {
        let grace = cancel.child_token();
        let drops = self
            .parts
            .metrics
            .dropped_datagrams
            .with_label_values(&["mt", "device_removed"]);
        let kernel_drops = self
            .parts
            .metrics
            .dropped_datagrams
            .with_label_values(&["mt", "receive_buffer"]);
        let drain = socket
            .clone()
            .receive_loop(grace.clone(), kernel_drops, move |_, _| {
                drops.inc();
                std::future::ready(())
            });
        tokio::select! {
            _ = drain => {}
            _ = tokio::time::sleep(self.parts.release_grace) => grace.cancel(),
        }
        self.release_socket(socket);
    }

    /// Gives a socket's address back to the pool once nothing else holds the socket.
    fn release_socket(&self, socket: Arc<DeviceSocket>) {
        let address: SocketAddr = socket.local_addr();
        if Arc::strong_count(&socket) == 1 {
            drop(socket);
            lock(&self.pool).release(address);
        } else {
            tracing::debug!(%address, "a removed device's socket is still held; its address is not reused");
        }
    }

    /// Takes a device of a failed batch out again (its tasks are not started, and it has
    /// nothing at the SCEF yet).
    fn undo_add(&self, device: Arc<Device>) {
        if let Err(error) = self
            .parts
            .devices
            .remove(&device.id)
            .and_then(|_| self.parts.devices.forget(&device))
        {
            tracing::error!(device = %device.id, %error, "cannot undo an added device's record");
        }
        let socket = device.socket.clone();
        drop(device);
        self.release_socket(socket);
    }

    fn publish_configured(&self) {
        self.parts
            .metrics
            .devices_configured
            .set(i64::try_from(self.parts.devices.len()).unwrap_or(i64::MAX));
    }
}

/// A device's group is fixed while it runs (its traffic's configuration follows it); a
/// re-read file that moves it takes effect at the next start.
fn warn_if_group_differs(device: &Device, settings: &DeviceConfig) {
    let current = device.group().map(|g| g.id.to_string());
    if current.as_deref() != settings.group.as_deref() {
        tracing::warn!(device = %device.id, from = ?current, to = ?settings.group, "a device's group changes at the next start, not on a reload");
    }
}

/// One MT datagram for `device`: through admission, and the empty ACK it may call for sent
/// back to the server from the device's address.
async fn receive_one(
    downlinks: &Downlinks,
    device: &Arc<Device>,
    datagram: Vec<u8>,
    from: SocketAddr,
) {
    let ack = downlinks.receive(device, datagram, from, clock::unix_ms());
    if let Some(ack) = ack
        && let Err(error) = device.socket.send_to(&ack, from).await
    {
        tracing::warn!(device = %device.id, %error, "cannot send the empty ACK to the server");
    }
}

/// Receives on one shared (`anyip`) socket until cancelled and hands each datagram to the
/// device it was sent to, in the order received; the kernel keeps a device on one socket of
/// the group, so its datagrams keep their order. A datagram for an address no device holds
/// (a removed one, or a stranger's guess) is counted as `no_device`.
async fn dispatch_shared(
    socket: Arc<AnyIpSocket>,
    devices: Arc<DeviceTable>,
    downlinks: Arc<Downlinks>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let kernel_drops = metrics
        .dropped_datagrams
        .with_label_values(&["mt", "receive_buffer"]);
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return,
            batch = socket.recv_batch() => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                // ICMP errors of earlier sends surface here; nothing is lost by going on.
                tracing::debug!(%error, socket = %socket.local_addr(), "anyip receive error");
                continue;
            }
        };
        if batch.kernel_drops > 0 {
            kernel_drops.inc_by(u64::from(batch.kernel_drops));
            tracing::warn!(socket = %socket.local_addr(), dropped = batch.kernel_drops, "the kernel dropped MT datagrams from a full receive buffer");
        }
        for received in batch.datagrams {
            let Some(device) = devices.by_address(&received.device) else {
                metrics.drop_datagram("mt", "no_device");
                continue;
            };
            match received.data {
                Ok(datagram) => receive_one(&downlinks, &device, datagram, received.from).await,
                Err(oversized) => {
                    metrics.drop_datagram("mt", "oversized");
                    tracing::warn!(device = %device.id, bytes = oversized.bytes, "dropped MT datagram larger than the receive buffer");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::DeviceConfig;
    use crate::http::test_support::{DEVICE_A, DEVICE_B, Harness};

    use super::*;

    fn declared(external_id: &str) -> DeviceConfig {
        DeviceConfig {
            external_id: Some(external_id.into()),
            ..DeviceConfig::default()
        }
    }

    fn file_a() -> DeviceConfig {
        declared(DEVICE_A)
    }

    fn file_b() -> DeviceConfig {
        DeviceConfig {
            msisdn: Some(DEVICE_B.into()),
            ..DeviceConfig::default()
        }
    }

    #[tokio::test]
    async fn the_sweep_drops_the_exchange_log_of_a_device_gone_quiet() {
        let harness = Harness::new().await;
        let device = harness.device(DEVICE_B);
        let t0 = crate::clock::now();
        // A server's CON GET carried to the device: remembered.
        let read = [0x40, 0x01, 0x12, 0x34];
        device.state().exchanges.carried(
            "127.0.0.1:5683".parse().unwrap(),
            &read,
            crate::exchange::Handover::Sent,
            t0,
        );
        assert!(device.state().exchanges.remembers_any());
        forget_old_exchanges(&harness.fleet().parts.devices, t0 + Duration::from_secs(60));
        assert!(
            device.state().exchanges.remembers_any(),
            "still within its lifetime"
        );
        forget_old_exchanges(
            &harness.fleet().parts.devices,
            t0 + Duration::from_secs(300),
        );
        assert!(!device.state().exchanges.remembers_any());
    }

    #[tokio::test]
    async fn a_reread_seed_adds_changes_adopts_and_removes_only_file_devices() {
        let harness = Harness::new().await;
        let fleet = harness.fleet();
        let b_renamed = DeviceConfig {
            endpoint_name: Some("urn:dev:b".into()),
            ..file_b()
        };
        let outcome = fleet
            .reconcile_file(&[file_a(), b_renamed, declared("c@iot.example")])
            .await
            .unwrap();
        assert_eq!(
            outcome,
            SeedReconciled {
                added: 1,
                changed: 1,
                unchanged: 1,
                ..SeedReconciled::default()
            }
        );
        let c = harness.device("c@iot.example");
        assert!(!c.is_from_api());
        assert_eq!(
            harness.device(DEVICE_B).endpoint_name().as_deref(),
            Some("urn:dev:b")
        );

        // One device through the API that the file then declares, one it never does.
        fleet
            .add(vec![declared("d@iot.example"), declared("e@iot.example")])
            .await
            .unwrap();
        let outcome = fleet
            .reconcile_file(&[
                file_a(),
                declared("c@iot.example"),
                declared("d@iot.example"),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcome,
            SeedReconciled {
                adopted: 1,
                removed: 1,
                unchanged: 2,
                ..SeedReconciled::default()
            }
        );
        assert!(harness.devices.get(&DEVICE_B.parse().unwrap()).is_none());
        assert!(!harness.device("d@iot.example").is_from_api());
        let d_record = harness
            .devices
            .store()
            .device(&"d@iot.example".parse().unwrap())
            .unwrap()
            .unwrap();
        assert!(
            d_record.settings.is_none(),
            "adopted: the file's from now on"
        );
        assert!(harness.device("e@iot.example").is_from_api());
        assert!(matches!(
            fleet.remove(&"d@iot.example".parse().unwrap()).await,
            Err(FleetError::FileDevice { .. })
        ));
    }

    #[tokio::test]
    async fn a_device_created_on_demand_that_the_file_declares_becomes_the_files() {
        let harness = Harness::new().await;
        let fleet = harness.fleet();
        fleet
            .onboard(&"x@fleet.example".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(fleet.counts().onboarded, 1);
        let outcome = fleet
            .reconcile_file(&[file_a(), file_b(), declared("x@fleet.example")])
            .await
            .unwrap();
        assert_eq!(outcome.adopted, 1);
        let device = harness.device("x@fleet.example");
        assert_eq!(Source::of(&device), Source::File);
        assert_eq!(
            fleet.counts().onboarded,
            0,
            "its place under max_devices is free again"
        );
        let record = harness.devices.store().device(&device.id).unwrap().unwrap();
        assert!(!record.onboarded && record.settings.is_none());
    }

    #[tokio::test]
    async fn a_seed_with_a_bad_entry_changes_nothing() {
        let harness = Harness::new().await;
        let fleet = harness.fleet();
        let refused = fleet
            .reconcile_file(&[declared("c@iot.example"), declared("not an identity")])
            .await;
        assert!(
            matches!(refused, Err(FleetError::Invalid { index: 1, .. })),
            "{refused:?}"
        );
        let repeated = fleet
            .reconcile_file(&[file_a(), declared("c@iot.example"), file_a()])
            .await;
        assert!(
            matches!(repeated, Err(FleetError::Repeated { index: 2, .. })),
            "{repeated:?}"
        );
        assert_eq!(harness.devices.len(), 2);
        assert!(
            harness
                .devices
                .get(&"c@iot.example".parse().unwrap())
                .is_none()
        );
        // A and B are still the file's: a good seed without B removes it.
        let outcome = fleet.reconcile_file(&[file_a()]).await.unwrap();
        assert_eq!(outcome.removed, 1);
    }
}
