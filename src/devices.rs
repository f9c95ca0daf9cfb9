//! The device table: every configured device with its identity, its UDP socket, its callback
//! capability tokens (two during a rotation, see `tokens`) and its mutable state (uplink
//! router, NIDD configuration, MT engine), found by identity or by token; and the persisted
//! record of each device in step with memory.

pub(crate) mod doorbell;
pub(crate) mod groups;
pub(crate) mod tokens;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use prometheus::{IntCounterVec, IntGauge};
use url::Url;

use indexmap::IndexMap;

use crate::config::DeviceConfig;
use crate::delivery::MtState;
use crate::exchange::Exchanges;
use crate::identity::DeviceId;
use crate::reachability::QueueMode;
use crate::routing::Router;
use crate::socket::DeviceSocket;
use crate::store::{DeviceRecord, Store, StoreError, StoredConfiguration, StoredSubscription};
use crate::t8::NiddStatus;
use doorbell::Doorbell;
use groups::Group;
use tokens::CallbackTokens;

/// A NIDD configuration as the bridge holds it in memory.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NiddState {
    pub(crate) location: Url,
    pub(crate) status: Option<NiddStatus>,
    pub(crate) maximum_packet_size_bits: Option<u64>,
    /// The callback URL the SCEF calls for this configuration.
    pub(crate) notification_destination: Option<String>,
    /// The device's MonitoringEvent subscription, when monitoring is on.
    pub(crate) monitoring_subscription: Option<StoredSubscription>,
    /// When the configuration's `duration` runs out (Unix ms); `None` when it has none.
    pub(crate) expires_at_ms: Option<u64>,
}

impl NiddState {
    pub(crate) fn is_usable(&self) -> bool {
        !self.status.as_ref().is_some_and(NiddStatus::is_terminated)
    }

    fn stored(&self) -> StoredConfiguration {
        StoredConfiguration {
            location: self.location.to_string(),
            status: self.status.as_ref().map(|s| s.as_str().to_string()),
            maximum_packet_size_bits: self.maximum_packet_size_bits,
            notification_destination: self.notification_destination.clone(),
            monitoring_subscription: self.monitoring_subscription.clone(),
            expires_at_ms: self.expires_at_ms,
        }
    }

    /// The in-memory form of a persisted configuration; `None` if its location is unusable.
    pub(crate) fn from_stored(stored: StoredConfiguration) -> Option<Self> {
        Some(Self {
            location: Url::parse(&stored.location).ok()?,
            status: stored.status.as_deref().map(NiddStatus::from),
            maximum_packet_size_bits: stored.maximum_packet_size_bits,
            notification_destination: stored.notification_destination,
            monitoring_subscription: stored.monitoring_subscription,
            expires_at_ms: stored.expires_at_ms,
        })
    }
}

/// Mutable per-device state; held only for short, non-async sections.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) router: Router,
    pub(crate) nidd: Option<NiddState>,
    /// Locations of configurations this device had before (newest last, at most
    /// [`SUPERSEDED_KEPT`]): their late notifications are ignored, not refused.
    pub(crate) superseded: Vec<Url>,
    /// A reported termination is being checked with the SCEF: further reports wait for it,
    /// so a flood of notifications costs the SCEF one GET at a time.
    pub(crate) checking_termination: bool,
    pub(crate) mt: MtState,
    /// What the device's CoAP exchanges carried across NIDD, and its round trip.
    pub(crate) exchanges: Exchanges,
}

/// How many replaced configuration locations a device remembers (in memory only).
pub(crate) const SUPERSEDED_KEPT: usize = 4;

impl DeviceState {
    /// Largest datagram for this device: the SCEF's `maximumPacketSize` (bits) or `default`.
    pub(crate) fn max_packet_bytes(&self, default: usize) -> usize {
        self.nidd
            .as_ref()
            .and_then(|n| n.maximum_packet_size_bits)
            .map(|bits| usize::try_from(bits / 8).unwrap_or(usize::MAX))
            .filter(|bytes| *bytes > 0)
            .unwrap_or(default)
    }

    /// Whether MT may go to the SCEF: a configuration exists and is not terminated.
    pub(crate) fn is_configured(&self) -> bool {
        self.nidd.as_ref().is_some_and(NiddState::is_usable)
    }
}

/// A device in bridge mode with the default PSM settings, routed to server 0, for tests.
#[cfg(test)]
impl Default for DeviceState {
    fn default() -> Self {
        use crate::config::{BufferOwner, PsmConfig};
        use crate::queue::DeviceQueue;
        use crate::reachability::Reachability;
        use std::time::Duration;
        let psm = PsmConfig::default();
        Self {
            router: Router::new(0, None, Arc::from(Vec::new())),
            nidd: None,
            superseded: Vec::new(),
            checking_termination: false,
            mt: MtState::new(
                Reachability::new(Duration::from_secs(psm.active_window_s)),
                DeviceQueue::default(),
                BufferOwner::Bridge,
                psm.device_rate_per_s,
                (
                    Duration::from_millis(psm.retry_initial_ms),
                    Duration::from_millis(psm.retry_max_ms),
                ),
                None,
                Duration::from_secs(psm.guess_hold_s),
            ),
            exchanges: Exchanges::new(Duration::from_secs(psm.expected_round_trip_s)),
        }
    }
}

/// What the bridge was told about a device that makes it reachable now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WakeSource {
    /// It sent an uplink.
    Uplink,
    /// The network reported it reachable (MonitoringEvent), until the time given, if any.
    Report(Option<Instant>),
}

impl WakeSource {
    /// The `reachability_events_total` label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Uplink => "uplink",
            Self::Report(_) => "report",
        }
    }
}

/// One device, declared in the configuration file or added through the admin API.
pub(crate) struct Device {
    pub(crate) id: DeviceId,
    endpoint_name: RwLock<EndpointName>,
    /// Also the lock every write of the device's record is made under, so a record written
    /// from a stale view of the tokens cannot overwrite one with a pending token.
    callback_tokens: Mutex<CallbackTokens>,
    pub(crate) socket: Arc<DeviceSocket>,
    /// Runs the device's MT work (new MT, device awake, delivery outcome).
    pub(crate) wake: Doorbell,
    /// Subscribe to MonitoringEvent reachability reports for this device.
    monitoring: AtomicBool,
    /// The settings it was added with through the admin API; `None` for a file device.
    added_settings: Mutex<Option<Box<DeviceConfig>>>,
    /// Added while the bridge runs and never provisioned yet (see `DeviceTable::onboarding`).
    onboarding: AtomicBool,
    /// Created on demand (`[onboarding]`) rather than through the admin API.
    on_demand: AtomicBool,
    /// The group whose NIDD configuration carries this device's traffic, if it is a member.
    group: Option<Arc<Group>>,
    /// Taken out of the table: nothing is written for it and nothing new is asked for it.
    removed: AtomicBool,
    /// Held while a NIDD configuration is being created for the device, and by its removal,
    /// so a removal never misses a configuration created in the meantime.
    pub(crate) provisioning: tokio::sync::Mutex<()>,
    state: Mutex<DeviceState>,
}

/// A device's LwM2M endpoint name. The one derived from its identity (`urn:nai:...`, most
/// devices') is derived again when asked for, not kept.
enum EndpointName {
    Derived,
    Given(Box<str>),
    Unknown,
}

impl EndpointName {
    fn of(id: &DeviceId, name: Option<String>) -> Self {
        match name {
            None => Self::Unknown,
            Some(name) if Some(&name) == id.default_endpoint_name().as_ref() => Self::Derived,
            Some(name) => Self::Given(name.into_boxed_str()),
        }
    }
}

impl Device {
    pub(crate) fn new(
        id: DeviceId,
        endpoint_name: Option<String>,
        callback_token: String,
        socket: Arc<DeviceSocket>,
        monitoring: bool,
        state: DeviceState,
    ) -> Self {
        Self {
            endpoint_name: RwLock::new(EndpointName::of(&id, endpoint_name)),
            id,
            callback_tokens: Mutex::new(CallbackTokens::new(callback_token, None)),
            socket,
            wake: Doorbell::default(),
            monitoring: AtomicBool::new(monitoring),
            added_settings: Mutex::new(None),
            onboarding: AtomicBool::new(false),
            on_demand: AtomicBool::new(false),
            group: None,
            removed: AtomicBool::new(false),
            provisioning: tokio::sync::Mutex::new(()),
            state: Mutex::new(state),
        }
    }

    /// The device as it was mid-rotation: `pending` is accepted besides its active token.
    pub(crate) fn with_pending_callback_token(self, pending: Option<String>) -> Self {
        let active = self.tokens().active().to_string();
        *self.tokens() = CallbackTokens::new(active, pending);
        self
    }

    /// A device of the admin API, with the settings it was added with; `onboarding` when it
    /// is added now, while the bridge runs.
    pub(crate) fn added_with(self, settings: DeviceConfig, onboarding: bool) -> Self {
        *lock(&self.added_settings) = Some(Box::new(settings));
        self.with_onboarding(onboarding)
    }

    /// A device added while the bridge runs: `onboarding` until its first configuration.
    pub(crate) fn with_onboarding(self, onboarding: bool) -> Self {
        self.onboarding.store(onboarding, Ordering::Relaxed);
        self
    }

    /// A member of `group`: its traffic goes through the group's NIDD configuration.
    pub(crate) fn in_group(mut self, group: Option<Arc<Group>>) -> Self {
        self.group = group;
        self
    }

    /// The group the device is a member of.
    pub(crate) fn group(&self) -> Option<&Arc<Group>> {
        self.group.as_ref()
    }

    pub(crate) fn is_group_member(&self) -> bool {
        self.group.is_some()
    }

    /// A device the bridge created on demand (`[onboarding]`), with `settings`.
    pub(crate) fn created_on_demand(self) -> Self {
        self.on_demand.store(true, Ordering::Relaxed);
        self
    }

    /// Counts the device as created on demand or not (the configuration file declares it
    /// now); whether it was before.
    pub(crate) fn set_on_demand(&self, on_demand: bool) -> bool {
        self.on_demand.swap(on_demand, Ordering::Relaxed)
    }

    /// Created on demand (`[onboarding]`) rather than through the admin API.
    pub(crate) fn is_onboarded_on_demand(&self) -> bool {
        self.on_demand.load(Ordering::Relaxed)
    }

    /// The LwM2M endpoint name the device registers with, if one is known.
    pub(crate) fn endpoint_name(&self) -> Option<String> {
        match &*self
            .endpoint_name
            .read()
            .unwrap_or_else(PoisonError::into_inner)
        {
            EndpointName::Derived => self.id.default_endpoint_name(),
            EndpointName::Given(name) => Some(name.to_string()),
            EndpointName::Unknown => None,
        }
    }

    pub(crate) fn set_endpoint_name(&self, name: Option<String>) {
        *self
            .endpoint_name
            .write()
            .unwrap_or_else(PoisonError::into_inner) = EndpointName::of(&self.id, name);
    }

    /// Whether the device wants MonitoringEvent reachability reports.
    pub(crate) fn monitoring(&self) -> bool {
        self.monitoring.load(Ordering::Relaxed)
    }

    pub(crate) fn set_monitoring(&self, on: bool) {
        self.monitoring.store(on, Ordering::Relaxed);
    }

    /// The settings of a device added through the admin API; `None` for a file device.
    pub(crate) fn added_settings(&self) -> Option<DeviceConfig> {
        lock(&self.added_settings).as_deref().cloned()
    }

    /// Added through the admin API (not a `[[devices]]` entry of the file).
    pub(crate) fn is_from_api(&self) -> bool {
        lock(&self.added_settings).is_some()
    }

    pub(crate) fn set_added_settings(&self, settings: DeviceConfig) {
        *lock(&self.added_settings) = Some(Box::new(settings));
    }

    /// Makes an admin API device one of the configuration file's.
    pub(crate) fn clear_added_settings(&self) {
        *lock(&self.added_settings) = None;
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Relaxed)
    }

    fn is_onboarding(&self) -> bool {
        self.onboarding.load(Ordering::Relaxed)
    }

    /// Ends onboarding; whether the device was onboarding until now.
    fn onboarded(&self) -> bool {
        self.onboarding.swap(false, Ordering::Relaxed)
    }

    fn tokens(&self) -> MutexGuard<'_, CallbackTokens> {
        self.callback_tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The device's callback tokens now.
    pub(crate) fn callback_tokens(&self) -> CallbackTokens {
        self.tokens().clone()
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than stopping the device, so a poisoned lock is taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The callback URL of this device's NIDD configuration.
    pub(crate) fn callback_url(&self, public_url: &Url) -> String {
        self.capability_url(public_url, "nidd")
    }

    /// This device's callback URL for one T8 API (`nidd`, `monitoring`, `triggering`), with
    /// its newest token (the pending one during a rotation).
    pub(crate) fn capability_url(&self, public_url: &Url, api: &str) -> String {
        let token = self.tokens().newest().to_string();
        capability_url_with(public_url, api, &token)
    }

    /// The device is awake (uplink or reachability report): its queue may be flushed now.
    pub(crate) fn woke(&self, now: Instant, source: WakeSource) {
        {
            let mut state = self.state();
            match source {
                WakeSource::Uplink => state.mt.reachability.on_uplink(now),
                WakeSource::Report(until) => state.mt.reachability.on_reachable_report(now, until),
            }
            state.mt.on_wake(now);
        }
        self.wake.ring();
    }
}

/// A mutex's guard, poisoned or not: no holder leaves device state half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A callback URL for one T8 API with `token`.
pub(crate) fn capability_url_with(public_url: &Url, api: &str, token: &str) -> String {
    format!(
        "{}/t8/v1/{api}/{token}",
        public_url.as_str().trim_end_matches('/')
    )
}

/// How many retired callback tokens are remembered (in memory only), so notifications to a
/// retired URL can be counted apart from unknown ones.
const RETIRED_KEPT: usize = 1024;

/// Tokens rotations retired, oldest first.
#[derive(Default)]
struct RetiredTokens {
    order: VecDeque<String>,
    known: HashSet<String>,
}

impl RetiredTokens {
    fn insert(&mut self, token: String) {
        if self.known.insert(token.clone()) {
            self.order.push_back(token);
        }
        while self.order.len() > RETIRED_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.known.remove(&oldest);
            }
        }
    }
}

/// The devices present now, by identity (in the order they were added) and by every accepted
/// callback token (two per device during a rotation).
#[derive(Default)]
struct Members {
    by_id: IndexMap<DeviceId, Arc<Device>>,
    by_token: HashMap<Arc<str>, Arc<Device>>,
    /// By UDP address, for the sockets shared by many devices (`anyip`), which learn the
    /// device of a datagram from its destination.
    by_address: HashMap<SocketAddr, Arc<Device>>,
}

/// Every device, by identity and by callback token, with the count of devices whose NIDD
/// configuration is usable kept in step with the store. Devices come and go while the bridge
/// runs (see `fleet`); lookups take a read lock for a map access only.
pub(crate) struct DeviceTable {
    members: RwLock<Members>,
    retired: Mutex<RetiredTokens>,
    store: Store,
    provisioned: AtomicUsize,
    /// Devices added while the bridge runs that never had a usable configuration yet:
    /// readiness does not wait for them (an onboarding batch must not take the instance out
    /// of its load balancer), their counts show progress instead.
    onboarding: AtomicUsize,
    /// Persisted configurations were checked with the SCEF after start.
    verified: AtomicBool,
    provisioned_gauge: IntGauge,
    store_errors: IntCounterVec,
}

impl DeviceTable {
    pub(crate) fn new(
        store: Store,
        provisioned_gauge: IntGauge,
        store_errors: IntCounterVec,
    ) -> Self {
        Self {
            members: RwLock::new(Members::default()),
            retired: Mutex::new(RetiredTokens::default()),
            store,
            provisioned: AtomicUsize::new(0),
            onboarding: AtomicUsize::new(0),
            verified: AtomicBool::new(false),
            provisioned_gauge,
            store_errors,
        }
    }

    fn members(&self) -> std::sync::RwLockReadGuard<'_, Members> {
        self.members.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn members_mut(&self) -> std::sync::RwLockWriteGuard<'_, Members> {
        self.members.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a device with the configuration persisted for it (if any), writing its record.
    /// A device of the same identity is replaced; callers make sure there is none.
    pub(crate) fn insert(
        &self,
        device: Arc<Device>,
        nidd: Option<NiddState>,
    ) -> Result<(), StoreError> {
        self.insert_as_stored(device, nidd, None)
    }

    /// As [`insert`](Self::insert), for a device built from `stored`, the record the store
    /// holds for it: written only if the device differs from it (a restart of 100 000
    /// unchanged devices writes nothing).
    pub(crate) fn insert_as_stored(
        &self,
        device: Arc<Device>,
        nidd: Option<NiddState>,
        stored: Option<&DeviceRecord>,
    ) -> Result<(), StoreError> {
        if device.is_onboarding() {
            self.onboarding.fetch_add(1, Ordering::Relaxed);
        }
        let unchanged = stored.is_some_and(|stored| {
            let queue_mode = device.state().mt.reachability.queue_mode();
            *stored == record(&device, &device.tokens(), nidd.as_ref(), queue_mode)
        });
        let set = if unchanged {
            self.apply_nidd(&device, nidd);
            Ok(())
        } else {
            self.set_nidd(&device, nidd)
        };
        if let Err(error) = set {
            if device.onboarded() {
                self.onboarding.fetch_sub(1, Ordering::Relaxed);
            }
            if device.state().is_configured() {
                self.provisioned.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(error);
        }
        let mut members = self.members_mut();
        for token in device.tokens().accepted() {
            members.by_token.insert(token, device.clone());
        }
        members.by_id.insert(device.id.clone(), device.clone());
        if device.socket.is_shared() {
            members
                .by_address
                .insert(device.socket.local_addr(), device.clone());
        }
        drop(members);
        if let Some(group) = device.group() {
            group.join(device.id.clone());
        }
        self.publish_counts();
        Ok(())
    }

    /// Takes a device out of the table: its callback URLs are refused from now on and its
    /// record is no longer written. The record itself stays in the store, marked as being
    /// removed, until the caller has removed the device's side at the SCEF
    /// ([`forget`](Self::forget)), so a crash in between is finished at the next start.
    pub(crate) fn remove(&self, id: &DeviceId) -> Result<Option<Arc<Device>>, StoreError> {
        let Some(device) = self.get(id) else {
            return Ok(None);
        };
        {
            let tokens = device.tokens();
            let (nidd, queue_mode) = snapshot(&device);
            let mut record = record(&device, &tokens, nidd.as_ref(), queue_mode);
            record.removing = true;
            self.store
                .put_device(&device.id, &record)
                .inspect_err(|_| {
                    self.store_errors
                        .with_label_values(&["device_record"])
                        .inc()
                })?;
            let state = device.state();
            device.removed.store(true, Ordering::Relaxed);
            if state.is_configured() {
                self.provisioned.fetch_sub(1, Ordering::Relaxed);
            }
            if device.onboarded() {
                self.onboarding.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(group) = device.group() {
            group.leave(id);
        }
        {
            let mut members = self.members_mut();
            members.by_id.shift_remove(id);
            members
                .by_token
                .retain(|_, holder| !Arc::ptr_eq(holder, &device));
            let address = device.socket.local_addr();
            if members
                .by_address
                .get(&address)
                .is_some_and(|holder| Arc::ptr_eq(holder, &device))
            {
                members.by_address.remove(&address);
            }
        }
        self.publish_counts();
        Ok(Some(device))
    }

    /// Writes a device's record again, after its settings changed.
    pub(crate) fn rewrite_record(&self, device: &Device) -> Result<(), StoreError> {
        let (nidd, queue_mode) = snapshot(device);
        self.persist(device, nidd.as_ref(), queue_mode)
            .inspect_err(|_| {
                self.store_errors
                    .with_label_values(&["device_record"])
                    .inc()
            })
    }

    /// Deletes the record of a device [`remove`](Self::remove)d from the table.
    pub(crate) fn forget(&self, device: &Device) -> Result<(), StoreError> {
        let _record_writes = device.tokens();
        self.store.remove_device(&device.id).inspect_err(|_| {
            self.store_errors
                .with_label_values(&["device_remove"])
                .inc()
        })
    }

    fn publish_counts(&self) {
        self.provisioned_gauge
            .set(i64::try_from(self.provisioned_count()).unwrap_or(i64::MAX));
    }

    pub(crate) fn get(&self, id: &DeviceId) -> Option<Arc<Device>> {
        self.members().by_id.get(id).cloned()
    }

    /// The device whose callback URLs carry `token` (its active or its pending one).
    /// The device a shared socket's datagram was sent to.
    pub(crate) fn by_address(&self, address: &SocketAddr) -> Option<Arc<Device>> {
        self.members().by_address.get(address).cloned()
    }

    pub(crate) fn by_token(&self, token: &str) -> Option<Arc<Device>> {
        self.members().by_token.get(token).cloned()
    }

    /// Whether `token` was a device's until a rotation retired it.
    pub(crate) fn is_retired(&self, token: &str) -> bool {
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .known
            .contains(token)
    }

    /// Starts (or continues) a rotation of `device`'s callback token: the pending token is
    /// written to the store before it is accepted or handed out. The pending token, and
    /// whether it was minted now.
    pub(crate) fn begin_rotation(&self, device: &Device) -> Result<(String, bool), StoreError> {
        let (nidd, queue_mode) = snapshot(device);
        let mut tokens = device.tokens();
        let mut next = tokens.clone();
        let (pending, minted) = next.begin_rotation(tokens::mint_capability_token);
        if minted {
            self.put_record(device, &next, nidd.as_ref(), queue_mode)?;
            *tokens = next;
        }
        // The token itself, shared with the device's (the active one is indexed already).
        let accepted: Vec<Arc<str>> = tokens.accepted().collect();
        let mut members = self.members_mut();
        if let Some(holder) = members.by_id.get(&device.id).cloned() {
            for token in accepted {
                members.by_token.insert(token, holder.clone());
            }
        }
        Ok((pending, minted))
    }

    /// Ends `device`'s rotation: the pending token becomes the active one, in the store first;
    /// the old token is refused from now on. The retired token, if a rotation was under way.
    pub(crate) fn complete_rotation(&self, device: &Device) -> Result<Option<String>, StoreError> {
        let (nidd, queue_mode) = snapshot(device);
        let mut tokens = device.tokens();
        let mut next = tokens.clone();
        let Some(retired) = next.complete_rotation() else {
            return Ok(None);
        };
        self.put_record(device, &next, nidd.as_ref(), queue_mode)?;
        *tokens = next;
        drop(tokens);
        self.members_mut().by_token.remove(retired.as_str());
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(retired.clone());
        Ok(Some(retired))
    }

    /// Writes a device's record, under its token lock (see [`Device::callback_tokens`]).
    fn persist(
        &self,
        device: &Device,
        nidd: Option<&NiddState>,
        queue_mode: QueueMode,
    ) -> Result<(), StoreError> {
        let tokens = device.tokens();
        self.put_record(device, &tokens, nidd, queue_mode)
    }

    fn put_record(
        &self,
        device: &Device,
        tokens: &CallbackTokens,
        nidd: Option<&NiddState>,
        queue_mode: QueueMode,
    ) -> Result<(), StoreError> {
        // Checked under the token lock `remove` and `forget` write under: a removed device's
        // record is never written back.
        if device.is_removed() {
            return Ok(());
        }
        self.store
            .put_device(&device.id, &record(device, tokens, nidd, queue_mode))
    }

    pub(crate) fn contains(&self, id: &DeviceId) -> bool {
        self.members().by_id.contains_key(id)
    }

    /// The devices present now, in the order they were added.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Arc<Device>> + use<> {
        let devices: Vec<Arc<Device>> = self.members().by_id.values().cloned().collect();
        devices.into_iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.members().by_id.len()
    }

    /// Devices added while the bridge runs that are still waiting for their first usable
    /// configuration.
    pub(crate) fn onboarding_count(&self) -> usize {
        self.onboarding.load(Ordering::Relaxed)
    }

    /// Devices with a usable NIDD configuration.
    pub(crate) fn provisioned_count(&self) -> usize {
        self.provisioned.load(Ordering::Relaxed)
    }

    /// Whether every device has a usable NIDD configuration, and the configurations persisted
    /// from an earlier run were checked with the SCEF (and pointed at this run's callback URL).
    pub(crate) fn all_provisioned(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
            && self.provisioned_count() + self.onboarding_count() >= self.len()
    }

    /// The configurations persisted from an earlier run were checked with the SCEF.
    pub(crate) fn mark_verified(&self) {
        self.verified.store(true, Ordering::Relaxed);
    }

    /// The store the device records live in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Records a device's NIDD configuration in memory and in the store.
    pub(crate) fn set_nidd(
        &self,
        device: &Device,
        nidd: Option<NiddState>,
    ) -> Result<(), StoreError> {
        let queue_mode = device.state().mt.reachability.queue_mode();
        self.persist(device, nidd.as_ref(), queue_mode)
            .inspect_err(|_| {
                self.store_errors
                    .with_label_values(&["device_record"])
                    .inc()
            })?;
        self.apply_nidd(device, nidd);
        Ok(())
    }

    /// Records a device's NIDD configuration in memory (the store has it).
    fn apply_nidd(&self, device: &Device, nidd: Option<NiddState>) {
        let usable = nidd.as_ref().is_some_and(NiddState::is_usable);
        {
            // Counted under the state lock, where `remove` uncounts: the two cannot interleave.
            let mut state = device.state();
            let was_usable = state.is_configured();
            let replaced = match (&state.nidd, &nidd) {
                (Some(old), Some(new)) if old.location != new.location => {
                    Some(old.location.clone())
                }
                (Some(old), None) => Some(old.location.clone()),
                _ => None,
            };
            if let Some(replaced) = replaced {
                state.superseded.retain(|known| *known != replaced);
                state.superseded.push(replaced);
                let excess = state.superseded.len().saturating_sub(SUPERSEDED_KEPT);
                state.superseded.drain(..excess);
            }
            state.nidd = nidd;
            if !device.is_removed() {
                match (was_usable, usable) {
                    (false, true) => self.provisioned.fetch_add(1, Ordering::Relaxed),
                    (true, false) => self.provisioned.fetch_sub(1, Ordering::Relaxed),
                    _ => 0,
                };
                if usable && device.onboarded() {
                    self.onboarding.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
        self.publish_counts();
    }

    /// The device stated its LwM2M queue mode (Register, Update): remembered, and persisted
    /// when it changed.
    pub(crate) fn set_queue_mode(&self, device: &Device, mode: QueueMode) {
        let (changed, nidd) = {
            let mut state = device.state();
            let changed = state.mt.reachability.set_queue_mode(mode);
            (changed, state.nidd.clone())
        };
        if changed && let Err(error) = self.persist(device, nidd.as_ref(), mode) {
            self.store_errors
                .with_label_values(&["device_record"])
                .inc();
            tracing::error!(device = %device.id, %error, "cannot persist the queue mode");
        }
    }

    /// Writes every device's record, as it is in memory, into the store again (after the
    /// store reopened its database).
    pub(crate) fn rewrite(&self) -> Result<(), StoreError> {
        for device in self.iter() {
            let (nidd, queue_mode) = {
                let state = device.state();
                (state.nidd.clone(), state.mt.reachability.queue_mode())
            };
            self.persist(&device, nidd.as_ref(), queue_mode)?;
        }
        Ok(())
    }

    /// Records a change to a device's configuration, logging a store failure.
    /// Brings every member's copy of its group's configuration in step with the group's (each
    /// member keeps its own monitoring subscription), and wakes their flushers.
    pub(crate) fn mirror_group(&self, group: &Group) {
        let configuration = group.nidd();
        for id in group.members() {
            let Some(member) = self.get(&id) else {
                continue;
            };
            let nidd = configuration.clone().map(|nidd| NiddState {
                monitoring_subscription: member
                    .state()
                    .nidd
                    .as_ref()
                    .and_then(|n| n.monitoring_subscription.clone()),
                ..nidd
            });
            if member.state().nidd != nidd {
                self.update_nidd(&member, nidd);
                member.wake.ring();
            }
        }
    }

    pub(crate) fn update_nidd(&self, device: &Device, nidd: Option<NiddState>) {
        if let Err(error) = self.set_nidd(device, nidd) {
            tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
        }
    }
}

/// A device's configuration and queue mode as they are now.
fn snapshot(device: &Device) -> (Option<NiddState>, QueueMode) {
    let state = device.state();
    (state.nidd.clone(), state.mt.reachability.queue_mode())
}

/// The persisted record of a device.
fn record(
    device: &Device,
    tokens: &CallbackTokens,
    nidd: Option<&NiddState>,
    queue_mode: QueueMode,
) -> DeviceRecord {
    DeviceRecord {
        udp_address: Some(device.socket.local_addr()),
        callback_token: tokens.active().to_string(),
        pending_callback_token: tokens.pending().map(str::to_string),
        nidd: nidd.map(NiddState::stored),
        queue_mode,
        settings: device.added_settings(),
        removing: false,
        onboarded: device.is_onboarded_on_demand(),
        group: device.group().map(|g| g.id.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreFaults, StoreOptions};

    fn device(id: &DeviceId, token: &str) -> Arc<Device> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        Arc::new(Device::new(
            id.clone(),
            id.default_endpoint_name(),
            token.to_string(),
            Arc::new(DeviceSocket::from_std(socket).unwrap()),
            false,
            DeviceState::default(),
        ))
    }

    #[tokio::test]
    async fn a_device_loaded_unchanged_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let faults = StoreFaults::new();
        let store = Store::open_with(
            dir.path(),
            StoreOptions {
                metrics: None,
                faults: Some(faults.clone()),
            },
        )
        .unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap();
        let table = DeviceTable::new(
            store,
            metrics.devices_provisioned.clone(),
            metrics.store_errors.clone(),
        );
        let (a, b): (DeviceId, DeviceId) = ("a@x".parse().unwrap(), "b@x".parse().unwrap());
        let (device_a, device_b) = (device(&a, "token-a"), device(&b, "token-b"));
        let stored_a = record(&device_a, &device_a.tokens(), None, QueueMode::Unknown);
        let mut stored_b = record(&device_b, &device_b.tokens(), None, QueueMode::Unknown);
        stored_b.callback_token = "an older token".into();
        // Every write fails now: only a device that needs one sees it.
        faults.fail_writes(true);
        table
            .insert_as_stored(device_a, None, Some(&stored_a))
            .unwrap();
        assert!(table.get(&a).is_some());
        assert!(
            table
                .insert_as_stored(device_b, None, Some(&stored_b))
                .is_err()
        );
        assert!(table.get(&b).is_none());
    }
}
