//! Keeps every configured device provisioned at the SCEF: makes every device's record (with its
//! callback capability token) durable before any configuration is asked for, checks persisted
//! NIDD configurations at start-up, reconciles the SCEF's list of this scsAsId's configurations
//! with the store (adopting the ones a crash orphaned, deleting the ones of ours nobody uses,
//! leaving others' alone; see `reconcile`), creates missing ones with exponential backoff
//! (honouring `Retry-After`, and never asking again while an earlier request may have created
//! one), deletes the ones of devices removed from the configuration, and re-creates a
//! configuration the SCEF terminated.

mod groups;
mod reconcile;
mod rotate;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock;
use crate::config::{NiddDefaults, ScefConfig};
use crate::devices::groups::{Group, GroupTable};
use crate::devices::{Device, DeviceTable, NiddState, lock};
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::store::StoredSubscription;
use crate::t8::client::ListedConfiguration;
use crate::t8::{
    MonitoringEventSubscription, MonitoringType, NiddConfiguration, NiddStatus,
    PdnEstablishmentOption, RdsPort, T8Client, T8Error,
};
pub(crate) use groups::GroupReprovision;
use reconcile::{Listed, Owner, Verdict};
pub(crate) use rotate::CallbackRotation;

/// What the SCEF said about a device's configuration that asks for provisioning again; the
/// callback server's handle on the provisioner.
#[derive(Clone)]
pub(crate) struct Reprovision {
    devices: Arc<DeviceTable>,
    t8: Arc<T8Client>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    groups: GroupReprovision,
}

/// When a device whose configuration could not be created is tried again, and how.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: std::time::Instant,
    /// The wait after the next failure (when the SCEF names none).
    backoff: Duration,
    /// A failed attempt may have created the configuration: look for it before creating.
    unsure: bool,
}

impl Retry {
    /// The retry after a failed creation that waited `backoff`: when the SCEF's `Retry-After`
    /// (else the backoff, with jitter) has passed, the next backoff doubled up to
    /// `retry_max` (at once for a refusal asking again will not fix, which the operator
    /// may).
    fn after(error: &T8Error, backoff: Duration, retry_max: Duration, unsure: bool) -> Self {
        let delay = error.retry_after().unwrap_or(backoff);
        let backoff = if !error.is_retryable() && !unsure {
            retry_max
        } else {
            (backoff * 2).min(retry_max)
        };
        Self {
            at: clock::now() + jitter(delay),
            backoff,
            unsure,
        }
    }
}

/// What failed to be provisioned (devices, groups), and when each is tried again.
struct RetrySchedule<K> {
    retries: HashMap<K, Retry>,
}

impl<K> Default for RetrySchedule<K> {
    fn default() -> Self {
        Self {
            retries: HashMap::new(),
        }
    }
}

impl<K: Eq + std::hash::Hash + Clone> RetrySchedule<K> {
    /// Of what is `missing`, what is due at `now`, each with its last retry (none for a
    /// first attempt); forgets what is no longer missing.
    fn due<T>(
        &mut self,
        missing: Vec<T>,
        key: impl Fn(&T) -> K,
        now: std::time::Instant,
    ) -> Vec<(T, Option<Retry>)> {
        let keys: HashSet<K> = missing.iter().map(&key).collect();
        self.retries.retain(|k, _| keys.contains(k));
        missing
            .into_iter()
            .filter_map(|item| match self.retries.get(&key(&item)) {
                Some(retry) if retry.at > now => None,
                retry => {
                    let retry = retry.copied();
                    Some((item, retry))
                }
            })
            .collect()
    }

    /// Keeps the retries of what failed, forgets what succeeded.
    fn record(&mut self, outcomes: Vec<(K, Option<Retry>)>) {
        for (key, next) in outcomes {
            match next {
                Some(retry) => {
                    self.retries.insert(key, retry);
                }
                None => {
                    self.retries.remove(&key);
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.retries.len()
    }

    /// How long until the first retry is due.
    fn next_wait(&self, now: std::time::Instant) -> Option<Duration> {
        self.retries
            .values()
            .map(|r| r.at.saturating_duration_since(now))
            .min()
    }
}

/// A configuration's `duration` is renewed when this fraction (1/N) of its lifetime is left.
const RENEW_WHEN_LEFT: u32 = 3;

/// How often a reported termination is checked with the SCEF before giving up on knowing.
const TERMINATION_CHECKS: u32 = 3;
const TERMINATION_CHECK_RETRY: Duration = Duration::from_secs(1);

impl Reprovision {
    /// A notification reported that the configuration at `location` ended. Whoever holds the
    /// device's callback URL can send one, so it is believed only when the SCEF confirms it (a
    /// GET answers 404 or a terminated status); until then, and when the SCEF cannot be asked,
    /// the configuration is kept (an MT delivery's 404, or the next start-up, still finds a
    /// configuration that really ended).
    pub(crate) fn termination_reported(&self, device: Arc<Device>, location: Url) {
        if let Some(group) = device.group() {
            self.groups.termination_reported(group.clone(), location);
            return;
        }
        let already = std::mem::replace(&mut device.state().checking_termination, true);
        if already {
            self.metrics
                .reported_terminations
                .with_label_values(&["already_checking"])
                .inc();
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.check_termination(&device, &location).await;
            device.state().checking_termination = false;
            this.metrics
                .reported_terminations
                .with_label_values(&[outcome])
                .inc();
        });
    }

    async fn check_termination(&self, device: &Device, location: &Url) -> &'static str {
        let mut delay = TERMINATION_CHECK_RETRY;
        for attempt in 1..=TERMINATION_CHECKS {
            let ended = match self.t8.fetch_nidd_configuration(location).await {
                Ok(None) => true,
                Ok(Some(body)) => body.status.as_ref().is_some_and(NiddStatus::is_terminated),
                Err(error) => {
                    tracing::warn!(device = %device.id, %error, attempt, "cannot confirm a reported termination with the SCEF");
                    if attempt < TERMINATION_CHECKS {
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    continue;
                }
            };
            // The configuration may have been replaced while the SCEF was asked.
            let still_current = device
                .state()
                .nidd
                .as_ref()
                .is_some_and(|nidd| nidd.location == *location);
            if !still_current {
                return "superseded";
            }
            if ended {
                tracing::warn!(device = %device.id, %location, "the SCEF terminated the NIDD configuration; creating a new one");
                self.configuration_terminated(device);
                return "confirmed";
            }
            tracing::warn!(device = %device.id, %location, "a termination notification the SCEF does not confirm; the configuration is kept");
            return "not_confirmed";
        }
        "unverified"
    }

    /// The SCEF terminated the device's configuration, or no longer knows it (404 on an MT
    /// delivery): forget it (deleting its monitoring subscription, so none is leaked) and
    /// create a new one at once.
    pub(crate) fn configuration_terminated(&self, device: &Device) {
        // A member's configuration is its group's: the group gets a new one.
        if let Some(group) = device.group() {
            self.groups.configuration_gone(group);
            return;
        }
        let old = device
            .state()
            .nidd
            .as_ref()
            .and_then(|c| c.monitoring_subscription.as_ref())
            .and_then(|s| Url::parse(&s.location).ok());
        if let Some(old) = old {
            let t8 = self.t8.clone();
            let id = device.id.clone();
            tokio::spawn(async move {
                if let Err(error) = t8.delete_monitoring_subscription(&old).await {
                    tracing::warn!(device = %id, %error, "cannot delete the monitoring subscription of a terminated configuration");
                }
            });
        }
        self.devices.update_nidd(device, None);
        self.wake.notify_one();
    }

    /// A notification reported the group's configuration ended (believed once the SCEF
    /// confirms it).
    pub(crate) fn group_termination_reported(&self, group: Arc<Group>, location: Url) {
        self.groups.termination_reported(group, location);
    }

    /// The SCEF notified a new status of the group's configuration.
    pub(crate) fn group_configuration_changed(&self, group: &Group, nidd: NiddState) {
        self.groups.configuration_changed(group, nidd);
    }

    /// Drops a monitoring subscription the SCEF ended, so the provisioner subscribes again.
    pub(crate) fn subscription_ended(&self, device: &Device) {
        let nidd = device.state().nidd.clone();
        if let Some(mut nidd) = nidd {
            nidd.monitoring_subscription = None;
            self.devices.update_nidd(device, Some(nidd));
        }
        self.wake.notify_one();
    }
}

/// Keeps every device's NIDD configuration and monitoring subscription in place at the SCEF.
pub(crate) struct Provisioner {
    devices: Arc<DeviceTable>,
    groups: Arc<GroupTable>,
    t8: Arc<T8Client>,
    scef: ScefConfig,
    nidd: NiddDefaults,
    monitoring_lifetime: Duration,
    public_url: Url,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Cleared when the SCEF refused to list configurations: no look-up is tried again.
    can_list: AtomicBool,
}

impl Provisioner {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        devices: Arc<DeviceTable>,
        groups: Arc<GroupTable>,
        t8: Arc<T8Client>,
        scef: ScefConfig,
        nidd: NiddDefaults,
        monitoring_lifetime: Duration,
        public_url: Url,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            devices,
            groups,
            t8,
            scef,
            nidd,
            monitoring_lifetime,
            public_url,
            wake: Arc::new(Notify::new()),
            metrics,
            can_list: AtomicBool::new(true),
        }
    }

    /// Notified when there is new work: a device added, a device's monitoring switched.
    pub(crate) fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// The callback server's handle.
    pub(crate) fn reprovision(&self) -> Reprovision {
        Reprovision {
            devices: self.devices.clone(),
            t8: self.t8.clone(),
            wake: self.wake.clone(),
            metrics: self.metrics.clone(),
            groups: self.group_reprovision(),
        }
    }

    /// The admin API's handle for rotating callback URLs.
    pub(crate) fn callback_rotation(&self) -> CallbackRotation {
        CallbackRotation::new(
            self.devices.clone(),
            self.t8.clone(),
            self.public_url.clone(),
            self.monitoring_lifetime,
            self.metrics.clone(),
        )
    }

    /// Provisions until cancelled; woken early by a terminated configuration or subscription.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let this = &self;
        // Every device's record (and so its callback token) was written when the bridge was
        // bound; once it is on disk, anything the SCEF creates from here on carries a token a
        // restarted bridge recognises.
        self.flush_store().await;
        this.remove_departed_devices().await;
        self.remove_departed_groups().await;
        // One list answers for every persisted configuration (100 000 GETs take seconds);
        // without it each is asked for on its own.
        let listed = self.list().await.ok().flatten();
        let dropped = self.verify_persisted(listed.as_deref()).await;
        self.check_groups().await;
        // Only now is this instance ready: until then the SCEF may still call an earlier run's
        // callback URL.
        self.devices.mark_verified();
        // Before anything is created: the SCEF may hold configurations of ours that no record
        // names (a crash between its 201 and the store's flush). What the check dropped (gone,
        // terminated, replaced) is out of the list it judges.
        let listed = listed.map(|listed| {
            listed
                .into_iter()
                .filter(|item| item.location.as_ref().is_none_or(|l| !dropped.contains(l)))
                .collect()
        });
        self.reconcile(&cancel, listed).await;
        if cancel.is_cancelled() {
            return;
        }
        tokio::join!(
            self.keep_provisioned(&cancel),
            self.check_configurations(&cancel)
        );
    }

    /// Creates missing configurations, renews durations and subscriptions, and waits for the
    /// next thing due, until cancelled.
    async fn keep_provisioned(&self, cancel: &CancellationToken) {
        // Devices whose last attempt failed, and when to try again: a device waiting out its
        // backoff or the SCEF's `Retry-After` holds no provisioning slot meanwhile.
        let mut retries: RetrySchedule<DeviceId> = RetrySchedule::default();
        let mut group_retries: RetrySchedule<crate::identity::ExternalId> =
            RetrySchedule::default();
        loop {
            // Groups first: their members' MT waits for them.
            self.provision_groups(&mut group_retries).await;
            let missing: Vec<Arc<Device>> = self
                .devices
                .iter()
                .filter(|d| !d.is_group_member() && d.state().nidd.is_none())
                .collect();
            let due = retries.due(missing, |d| d.id.clone(), clock::now());
            if !due.is_empty() {
                tracing::info!(
                    devices = due.len(),
                    waiting = retries.len(),
                    "creating NIDD configurations"
                );
            }
            let outcomes: Vec<(DeviceId, Option<Retry>)> = futures::stream::iter(due)
                .map(|(device, retry)| async move {
                    let next = self.provision_device(&device, retry).await;
                    (device.id.clone(), next)
                })
                .buffer_unordered(self.scef.provisioning_concurrency)
                .collect()
                .await;
            retries.record(outcomes);
            let now = clock::now();
            let next_retry = earliest(retries.next_wait(now), group_retries.next_wait(now));
            let next_subscription = self.ensure_subscriptions().await;
            let next_configuration = self.renew_configurations().await;
            let next_group = self.renew_groups().await;
            let next_due = earliest(
                next_retry,
                earliest(next_subscription, earliest(next_configuration, next_group)),
            );
            self.flush_store().await;
            let timer = async {
                match next_due {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = timer => {}
            }
        }
    }

    /// One attempt at the device's NIDD configuration; when and how to try again if it
    /// failed (`None`: it exists now, or the device is gone). After a failure that may have
    /// created it anyway (a timeout, say), the SCEF's list is searched for it before asking
    /// again.
    async fn provision_device(&self, device: &Device, previous: Option<Retry>) -> Option<Retry> {
        let scef = &self.scef;
        let retry_max = Duration::from_millis(scef.retry_max_ms);
        let backoff = previous.map_or(Duration::from_millis(scef.retry_initial_ms), |r| r.backoff);
        let mut unsure = previous.is_some_and(|r| r.unsure);
        if device.is_removed() {
            return None;
        }
        let body = self.configuration_request(device);
        let attempt = if unsure {
            let found = {
                // Adopting is creating too (see `create`).
                let _creating = device.provisioning.lock().await;
                if device.is_removed() {
                    return None;
                }
                self.look_for_own(device).await
            };
            match found {
                Ok(true) => return None,
                Ok(false) => {
                    unsure = false;
                    self.create(device, &body).await
                }
                Err(error) => Err(error),
            }
        } else {
            self.create(device, &body).await
        };
        let error = attempt.err()?;
        unsure = unsure || error.may_have_taken_effect();
        let retry = Retry::after(&error, backoff, retry_max, unsure);
        let retry_in_ms = retry.at.saturating_duration_since(clock::now()).as_millis() as u64;
        if error.status() == Some(reqwest::StatusCode::TOO_MANY_REQUESTS) {
            // Expected under bulk onboarding, one per throttled device: counted in
            // t8_requests_total{outcome="429"}, not worth a warning each.
            tracing::info!(device = %device.id, retry_in_ms, "the SCEF throttled a configuration create; trying again later");
        } else {
            tracing::warn!(device = %device.id, %error, retry_in_ms, may_exist = unsure, "NIDD configuration not created");
        }
        Some(retry)
    }

    /// POSTs the configuration and, on 201, stores and flushes its location at once.
    async fn create(&self, device: &Device, body: &NiddConfiguration) -> Result<(), T8Error> {
        // A removal waits for this lock before it deletes what the device has at the SCEF,
        // and nothing is created for a device once it is removed.
        let _creating = device.provisioning.lock().await;
        if device.is_removed() {
            return Ok(());
        }
        // The expiry is taken now, not when the body was first built: retries can take long.
        let asked = self.asked_duration();
        let mut body = body.clone();
        body.duration = asked.as_ref().map(|(text, _)| text.clone());
        let created = self.t8.create_nidd_configuration(&body).await?;
        // Not counted in `nidd_configuration_status_total`, which counts what the SCEF
        // notified: the status of a create's answer is the configuration's first state.
        let status = created.body.status.clone();
        let nidd = NiddState {
            location: created.location,
            status,
            maximum_packet_size_bits: created.body.maximum_packet_size,
            notification_destination: Some(body.notification_destination.clone()),
            monitoring_subscription: None,
            expires_at_ms: asked
                .map(|(_, asked_ms)| granted_expiry(created.body.duration.as_deref(), asked_ms)),
        };
        tracing::info!(device = %device.id, location = %nidd.location, status = ?nidd.status, "NIDD configuration created");
        self.keep(device, nidd).await;
        Ok(())
    }

    /// Records a configuration the device now has, flushes it, and lets held MT go.
    async fn keep(&self, device: &Device, nidd: NiddState) {
        if let Err(error) = self.devices.set_nidd(device, Some(nidd)) {
            tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
        }
        // Durable at once, not at the end of the round: a crash now must not orphan it.
        self.flush_store().await;
        // MT held for want of a configuration may go now.
        device.wake.ring();
    }

    async fn flush_store(&self) {
        if let Err(error) = self.devices.store().flush().await {
            self.metrics.store_error("flush");
            tracing::error!(%error, "cannot flush the store");
        }
    }

    fn configuration_request(&self, device: &Device) -> NiddConfiguration {
        NiddConfiguration {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            notification_destination: device.callback_url(&self.public_url),
            ..self.configuration_defaults()
        }
    }

    /// What every configuration asks for, devices' and groups' alike (no UE, no callback).
    fn configuration_defaults(&self) -> NiddConfiguration {
        let nidd = &self.nidd;
        NiddConfiguration {
            mtc_provider_id: self.scef.mtc_provider_id.clone(),
            pdn_establishment_option: Some(PdnEstablishmentOption::from(
                nidd.pdn_establishment_option.as_str(),
            )),
            reliable_data_service: Some(nidd.reliable_data_service),
            rds_ports: (nidd.reliable_data_service && !nidd.rds_ports.is_empty()).then(|| {
                nidd.rds_ports
                    .iter()
                    .map(|p| RdsPort {
                        port_ue: p.ue,
                        port_scef: p.scef,
                    })
                    .collect()
            }),
            request_test_notification: nidd.request_test_notification.then_some(true),
            ..Default::default()
        }
    }

    /// Asks the SCEF whether persisted configurations still exist, forgets the ones it lost, and
    /// points the others at this instance's callback URL if that changed. `listed` is the
    /// SCEF's list of configurations, when it gave one: one listed is checked against its
    /// entry, any other is fetched. Returns the locations it dropped.
    async fn verify_persisted(&self, listed: Option<&[ListedConfiguration]>) -> HashSet<Url> {
        let listed: Option<HashMap<&Url, &Result<NiddConfiguration, String>>> = listed.map(|l| {
            l.iter()
                .filter_map(|item| Some((item.location.as_ref()?, &item.body)))
                .collect()
        });
        let persisted: Vec<(Arc<Device>, NiddState)> = self
            .devices
            .iter()
            .filter(|d| !d.is_group_member())
            .filter_map(|d| {
                let nidd = d.state().nidd.clone()?;
                Some((d.clone(), nidd))
            })
            .collect();
        let dropped = Mutex::new(HashSet::new());
        let (listed, dropped_ref) = (&listed, &dropped);
        futures::stream::iter(persisted)
        .for_each_concurrent(self.scef.provisioning_concurrency, |(device, nidd)| {
            async move {
                let location = nidd.location.clone();
                // Listed and readable: judged from its entry. Anything else is asked for on
                // its own: an entry the list cannot give, or one it lacks (gone, most likely,
                // but an SCEF that spells its `self` links unlike its `Location`s must not
                // have every configuration created again).
                let entry = listed
                    .as_ref()
                    .and_then(|l| l.get(&location))
                    .and_then(|entry| entry.as_ref().ok());
                let (checked, _) = match entry {
                    Some(body) => {
                        let body = (*body).clone();
                        self.judge_checked(&device, nidd, Ok(Some(body))).await
                    }
                    None => self.check_one(&device, nidd).await,
                };
                // A termination confirmed while the SCEF was asked (or the list read) has
                // cleared or replaced the configuration: what was judged is out of date.
                let (still_current, unchanged) = {
                    let state = device.state();
                    let current = state.nidd.as_ref();
                    (
                        current.is_some_and(|current| current.location == location),
                        current == checked.as_ref(),
                    )
                };
                // Unchanged needs no write: at 100 000 devices the writes took longer than
                // the list.
                if !still_current || unchanged {
                    return;
                }
                if checked.as_ref().is_none_or(|n| n.location != location) {
                    lock(dropped_ref).insert(location);
                }
                if let Err(error) = self.devices.set_nidd(&device, checked) {
                    tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
                }
            }
        })
        .await;
        dropped.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the SCEF about the device's configuration: what to keep (`None`: create a new one)
    /// and what the check found (`configuration_checks_total{outcome}`).
    async fn check_one(
        &self,
        device: &Device,
        nidd: NiddState,
    ) -> (Option<NiddState>, &'static str) {
        let fetched = self.t8.fetch_nidd_configuration(&nidd.location).await;
        self.judge_checked(device, nidd, fetched).await
    }

    /// What to keep of the device's configuration given what the SCEF said of it (`Ok(None)`:
    /// it does not have it), and what the check found.
    async fn judge_checked(
        &self,
        device: &Device,
        mut nidd: NiddState,
        fetched: Result<Option<NiddConfiguration>, T8Error>,
    ) -> (Option<NiddState>, &'static str) {
        let body = match fetched {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::warn!(device = %device.id, location = %nidd.location, "the SCEF no longer has this NIDD configuration; creating a new one");
                return (None, "gone");
            }
            Err(error) => {
                tracing::warn!(device = %device.id, %error, "cannot check the NIDD configuration; keeping it");
                return (Some(nidd), "unchecked");
            }
        };
        let before = nidd.status.clone();
        nidd.status = body.status.or(nidd.status.take());
        nidd.maximum_packet_size_bits = body.maximum_packet_size.or(nidd.maximum_packet_size_bits);
        if let Some(expiry) = body.duration.as_deref().and_then(expiry_ms) {
            nidd.expires_at_ms = Some(nidd.expires_at_ms.map_or(expiry, |e| e.min(expiry)));
        }
        if !nidd.is_usable() {
            tracing::warn!(device = %device.id, location = %nidd.location, "the SCEF reports the NIDD configuration terminated; creating a new one");
            return (None, "terminated");
        }
        let changed = if nidd.status != before {
            tracing::info!(device = %device.id, status = ?nidd.status, "the NIDD configuration's status changed");
            "status_changed"
        } else {
            "kept"
        };
        let wanted = device.callback_url(&self.public_url);
        if body.notification_destination == wanted {
            nidd.notification_destination = Some(wanted);
            return (Some(nidd), changed);
        }
        match self
            .t8
            .update_notification_destination(&nidd.location, &wanted)
            .await
        {
            Ok(_) => {
                tracing::info!(device = %device.id, found = %body.notification_destination, "the NIDD configuration's callback URL was not ours; patched back");
                nidd.notification_destination = Some(wanted);
                (Some(nidd), "destination_restored")
            }
            Err(error) => {
                // An SCEF without Rel-17 PATCH support: replace the configuration instead.
                tracing::warn!(device = %device.id, %error, "cannot update the callback URL; replacing the NIDD configuration");
                if let Err(error) = self.t8.delete_nidd_configuration(&nidd.location).await {
                    tracing::warn!(device = %device.id, %error, "cannot delete the old NIDD configuration");
                }
                (None, "replaced")
            }
        }
    }

    /// Lists the SCEF's configurations for this scsAsId (retrying with backoff while it fails)
    /// and settles each that no device's record references: a configuration carrying a
    /// device's callback token and naming its UE is adopted by that device if it has none (and
    /// moved to this run's callback URL), deleted if it has one; one under this instance's
    /// callback URL that no device has the token of is deleted; every other one belongs to
    /// another instance or application under the same scsAsId and is left alone. An SCEF that
    /// does not list configurations is logged and counted, and provisioning goes on without.
    /// `listed`: a list taken already, else one is asked for.
    async fn reconcile(
        &self,
        cancel: &CancellationToken,
        listed: Option<Vec<ListedConfiguration>>,
    ) {
        let listed = match listed {
            Some(listed) => listed,
            None => match self.list_with_retry(cancel).await {
                Some(listed) => listed,
                None => return,
            },
        };
        let (entries, verdicts) = self.judge(&listed);
        let (mut adopted, mut deleted) = (0, 0);
        for ((entry, body), verdict) in entries.iter().zip(&listed).zip(verdicts) {
            match self.settle(entry, body, verdict).await {
                Some(Settled::Adopted) => adopted += 1,
                Some(Settled::Deleted) => deleted += 1,
                None => {}
            }
        }
        tracing::info!(
            listed = listed.len(),
            adopted,
            deleted,
            "NIDD configurations at the SCEF reconciled with the store"
        );
    }

    /// Judges the listed configurations against the devices as they are now.
    fn judge(&self, listed: &[ListedConfiguration]) -> (Vec<Listed>, Vec<Verdict>) {
        let referenced: HashSet<Url> = self
            .devices
            .iter()
            .filter_map(|d| d.state().nidd.as_ref().map(|n| n.location.clone()))
            .chain(
                self.groups
                    .iter()
                    .filter_map(|g| g.nidd().map(|n| n.location)),
            )
            .collect();
        let entries: Vec<Listed> = listed
            .iter()
            .map(|item| match &item.body {
                Ok(body) => Listed {
                    location: item.location.clone(),
                    ue: named_ue(body),
                    notification_destination: body.notification_destination.clone(),
                    terminated: body.status.as_ref().is_some_and(NiddStatus::is_terminated),
                },
                // Unreadable: judged as a foreign entry (and counted as unreadable).
                Err(_) => Listed {
                    location: None,
                    ue: None,
                    notification_destination: String::new(),
                    terminated: false,
                },
            })
            .collect();
        let verdicts = reconcile::plan(&entries, &referenced, &self.public_url, |token| {
            self.devices.by_token(token).map(|device| Owner {
                id: device.id.clone(),
                has_configuration: device.state().nidd.is_some(),
            })
        });
        (entries, verdicts)
    }

    /// Carries out one verdict; what became of the configuration, if it was ours to act on.
    async fn settle(
        &self,
        entry: &Listed,
        item: &ListedConfiguration,
        verdict: Verdict,
    ) -> Option<Settled> {
        let count = |action: &str| {
            self.metrics
                .configurations_reconciled
                .with_label_values(&[action])
                .inc();
        };
        let body = match &item.body {
            Ok(body) => body,
            Err(error) => {
                count("unreadable");
                tracing::warn!(%error, "the SCEF listed a NIDD configuration that cannot be read; left alone");
                return None;
            }
        };
        match (verdict, &entry.location) {
            (Verdict::Referenced, _) => None,
            (Verdict::Foreign, _) => {
                count("foreign");
                tracing::debug!(location = ?entry.location, "a NIDD configuration of another instance or application; left alone");
                None
            }
            (Verdict::Unaddressable, _) | (_, None) => {
                count("unaddressable");
                tracing::warn!(destination = %body.notification_destination, "the SCEF listed a NIDD configuration without a usable self link; left alone");
                None
            }
            (Verdict::Adopt(id), Some(location)) => {
                let device = self.devices.get(&id)?;
                match self.adopt(&device, location.clone(), body).await {
                    Adoption::Adopted => {
                        count("adopted");
                        Some(Settled::Adopted)
                    }
                    Adoption::Ended => {
                        count("ended");
                        None
                    }
                    Adoption::Failed => {
                        count("failed");
                        None
                    }
                }
            }
            (Verdict::Stray { reason, device }, Some(location)) => {
                let device = device.map(|d| d.to_string());
                match self.t8.delete_nidd_configuration(location).await {
                    Ok(()) => {
                        count("deleted");
                        tracing::info!(%location, reason = reason.as_str(), device = ?device, "deleted a NIDD configuration of ours that no device uses");
                        Some(Settled::Deleted)
                    }
                    Err(error) => {
                        count("failed");
                        tracing::warn!(%location, reason = reason.as_str(), device = ?device, %error, "cannot delete a NIDD configuration of ours that no device uses; will try at next start");
                        None
                    }
                }
            }
        }
    }

    /// Takes a listed configuration as the device's own, moved to this run's callback URL.
    /// When it cannot be moved it is deleted, and when it ended meanwhile it is left; either
    /// way a new one will be created.
    async fn adopt(&self, device: &Device, location: Url, body: &NiddConfiguration) -> Adoption {
        let wanted = device.callback_url(&self.public_url);
        let mut nidd = NiddState {
            location,
            status: body.status.clone(),
            maximum_packet_size_bits: body.maximum_packet_size,
            notification_destination: Some(body.notification_destination.clone()),
            monitoring_subscription: None,
            // Renewed at once when it has none and one is wanted.
            expires_at_ms: body.duration.as_deref().and_then(expiry_ms),
        };
        if body.notification_destination != wanted {
            match self
                .t8
                .update_notification_destination(&nidd.location, &wanted)
                .await
            {
                Ok(updated) => {
                    nidd.notification_destination = Some(wanted);
                    nidd.status = updated.status.or(nidd.status);
                    nidd.maximum_packet_size_bits = updated
                        .maximum_packet_size
                        .or(nidd.maximum_packet_size_bits);
                }
                Err(error) => {
                    tracing::warn!(device = %device.id, %error, "cannot move an orphaned NIDD configuration to this callback URL; replacing it");
                    if let Err(error) = self.t8.delete_nidd_configuration(&nidd.location).await {
                        tracing::warn!(device = %device.id, %error, "cannot delete the orphaned NIDD configuration");
                    }
                    return Adoption::Failed;
                }
            }
        } else {
            // The list may be older than what happened since it was read (a termination
            // confirmed meanwhile): the configuration is taken only if the SCEF still has it.
            // (An answer to the PATCH above proved that already.)
            match self.t8.fetch_nidd_configuration(&nidd.location).await {
                Ok(Some(current))
                    if !current
                        .status
                        .as_ref()
                        .is_some_and(NiddStatus::is_terminated) =>
                {
                    nidd.status = current.status.or(nidd.status);
                }
                Ok(_) => {
                    tracing::info!(device = %device.id, location = %nidd.location, "a listed NIDD configuration ended before it could be adopted; a new one will be created");
                    return Adoption::Ended;
                }
                // The list named it a moment ago; taking it risks less than a second one.
                Err(error) => {
                    tracing::warn!(device = %device.id, %error, "cannot confirm a listed NIDD configuration; adopting it as listed");
                }
            }
        }
        tracing::info!(device = %device.id, location = %nidd.location, "adopted a NIDD configuration the store did not know (created before a crash)");
        self.keep(device, nidd).await;
        Adoption::Adopted
    }

    /// Lists the SCEF's configurations, retrying with backoff while that fails and may work
    /// later; `None` when the SCEF does not list them (or the bridge stops).
    async fn list_with_retry(
        &self,
        cancel: &CancellationToken,
    ) -> Option<Vec<ListedConfiguration>> {
        let scef = &self.scef;
        let mut backoff = Duration::from_millis(scef.retry_initial_ms);
        loop {
            match self.list().await {
                Ok(listed) => return listed,
                Err(error) => {
                    let delay = error.retry_after().unwrap_or(backoff);
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot list the NIDD configurations at the SCEF; creating none until it answers");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(jitter(delay)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(scef.retry_max_ms));
                }
            }
        }
    }

    /// One list request: `Ok(None)` when the SCEF does not offer the list (it is then not asked
    /// again), `Err` for a failure worth retrying.
    async fn list(&self) -> Result<Option<Vec<ListedConfiguration>>, T8Error> {
        if !self.can_list.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let count = |outcome: &str| {
            self.metrics
                .configuration_listings
                .with_label_values(&[outcome])
                .inc();
        };
        match self.t8.list_nidd_configurations().await {
            Ok(listed) => {
                count("listed");
                Ok(Some(listed))
            }
            Err(error)
                if error.is_retryable()
                    && error.status() != Some(reqwest::StatusCode::NOT_IMPLEMENTED) =>
            {
                count("error");
                Err(error)
            }
            Err(error) => {
                count("unsupported");
                self.can_list.store(false, Ordering::Relaxed);
                tracing::warn!(%error, "the SCEF does not list NIDD configurations: configurations a crash orphaned cannot be found and are left to the SCEF");
                Ok(None)
            }
        }
    }

    /// After a creation that may have succeeded unseen: looks for the device's configuration
    /// in the SCEF's list and adopts it (deleting any second one). `Ok(false)` when there is
    /// none, or the SCEF cannot say.
    async fn look_for_own(&self, device: &Device) -> Result<bool, T8Error> {
        let Some(listed) = self.list().await? else {
            return Ok(false);
        };
        let (entries, verdicts) = self.judge(&listed);
        let mut found = false;
        for ((entry, item), verdict) in entries.iter().zip(&listed).zip(verdicts) {
            let concerns_device = match &verdict {
                Verdict::Adopt(id) => id == &device.id,
                Verdict::Stray {
                    device: Some(id), ..
                } => id == &device.id,
                _ => false,
            };
            if concerns_device
                && let Some(Settled::Adopted) = self.settle(entry, item, verdict).await
            {
                found = true;
            }
        }
        Ok(found)
    }

    /// Deletes the configurations of devices that were removed from the configuration file.
    async fn remove_departed_devices(&self) {
        let stored = match self.devices.store().devices() {
            Ok(stored) => stored,
            Err(error) => {
                self.metrics.store_error("device_list");
                tracing::error!(%error, "cannot list stored devices");
                return;
            }
        };
        for (key, record) in stored {
            let Ok(id) = key.parse::<DeviceId>() else {
                continue;
            };
            if self.devices.contains(&id) {
                continue;
            }
            let subscription = record
                .nidd
                .as_ref()
                .and_then(|n| n.monitoring_subscription.as_ref());
            if let Some(subscription) = subscription.and_then(|s| Url::parse(&s.location).ok())
                && let Err(error) = self.t8.delete_monitoring_subscription(&subscription).await
            {
                tracing::warn!(device = %id, %error, "cannot delete the monitoring subscription of a removed device");
            }
            if let Some(location) = record.nidd.and_then(|n| Url::parse(&n.location).ok()) {
                match self.t8.delete_nidd_configuration(&location).await {
                    Ok(()) => {
                        tracing::info!(device = %id, %location, "deleted the NIDD configuration of a removed device")
                    }
                    Err(error) => {
                        tracing::warn!(device = %id, %error, "cannot delete the NIDD configuration of a removed device; will retry at next start");
                        continue;
                    }
                }
            }
            if let Err(error) = self.devices.store().remove_device(&id) {
                self.metrics.store_error("device_remove");
                tracing::error!(device = %id, %error, "cannot remove the record of a removed device");
            }
        }
    }

    /// Every `nidd.check_interval_s`, GETs each device's configuration, one at a time spread
    /// over the interval: one the SCEF lost or terminated is created again, a callback URL
    /// changed behind the bridge's back is patched back, and status changes are kept. Off
    /// when the interval is 0.
    async fn check_configurations(&self, cancel: &CancellationToken) {
        let interval = Duration::from_secs(self.nidd.check_interval_s);
        if interval.is_zero() {
            return;
        }
        let reprovision = self.reprovision();
        loop {
            let configured: Vec<Arc<Device>> = self
                .devices
                .iter()
                .filter(|d| !d.is_group_member() && d.state().nidd.is_some())
                .collect();
            let gap = interval / u32::try_from(configured.len().max(1)).unwrap_or(u32::MAX);
            if configured.is_empty() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            for device in configured {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(gap) => {}
                }
                let Some(nidd) = device.state().nidd.clone() else {
                    continue;
                };
                let (checked, outcome) = self.check_one(&device, nidd.clone()).await;
                self.metrics
                    .configuration_checks
                    .with_label_values(&[outcome])
                    .inc();
                // Replaced or forgotten meanwhile: this check is about the old one.
                let current = device
                    .state()
                    .nidd
                    .as_ref()
                    .is_some_and(|n| n.location == nidd.location);
                if !current {
                    continue;
                }
                match checked {
                    Some(checked) if checked == nidd => {}
                    Some(checked) => {
                        if let Err(error) = self.devices.set_nidd(&device, Some(checked)) {
                            self.metrics.store_error("device_put");
                            tracing::error!(device = %device.id, %error, "cannot persist the checked NIDD configuration");
                        }
                    }
                    None => reprovision.configuration_terminated(&device),
                }
            }
            // At the end of each round: start-up checked them just before the first.
            self.check_groups().await;
        }
    }

    /// The `duration` to ask for now (RFC 3339, and as Unix ms), when configurations have one.
    fn asked_duration(&self) -> Option<(String, u64)> {
        let lifetime = Duration::from_secs(self.nidd.configuration_duration_s?);
        let expires = clock::system_now() + lifetime;
        // The text has whole seconds: the expiry kept is the one the SCEF reads.
        Some((
            humantime::format_rfc3339_seconds(expires).to_string(),
            clock::to_unix_ms(expires) / 1000 * 1000,
        ))
    }

    /// Renews (merge-patches) the `duration` of every configuration with a third of its
    /// lifetime or less left, or none at all while one is wanted; returns how long until the
    /// next renewal is due. A configuration the SCEF no longer knows (404) is forgotten and
    /// created again; a failure is retried at the provisioning pace.
    async fn renew_configurations(&self) -> Option<Duration> {
        let lifetime = Duration::from_secs(self.nidd.configuration_duration_s?);
        let margin_ms = (lifetime / RENEW_WHEN_LEFT).as_millis() as u64;
        let now_ms = clock::unix_ms();
        let due: Vec<(Arc<Device>, Url)> = self
            .devices
            .iter()
            .filter(|d| !d.is_group_member())
            .filter_map(|d| {
                let state = d.state();
                let nidd = state.nidd.as_ref()?;
                let due = nidd.is_usable()
                    && nidd
                        .expires_at_ms
                        .is_none_or(|expires| expires <= now_ms + margin_ms);
                due.then(|| (d.clone(), nidd.location.clone()))
            })
            .collect();
        let failed = AtomicBool::new(false);
        let reprovision = self.reprovision();
        futures::stream::iter(due)
            .for_each_concurrent(self.scef.provisioning_concurrency, |(device, location)| {
                let (failed, reprovision) = (&failed, &reprovision);
                async move {
                    let outcome = self.renew(&device, &location, reprovision).await;
                    if outcome == "failed" {
                        failed.store(true, Ordering::Relaxed);
                    }
                    self.metrics
                        .configuration_renewals
                        .with_label_values(&[outcome])
                        .inc();
                }
            })
            .await;
        let now_ms = clock::unix_ms();
        let next = self
            .devices
            .iter()
            .filter_map(|d| d.state().nidd.as_ref()?.expires_at_ms)
            .map(|expires| Duration::from_millis(expires.saturating_sub(now_ms + margin_ms)))
            .min();
        let retry = failed
            .load(Ordering::Relaxed)
            .then(|| Duration::from_millis(self.scef.retry_max_ms));
        earliest(next, retry)
    }

    /// One renewal; its outcome label (renewed, gone, failed, superseded).
    async fn renew(
        &self,
        device: &Device,
        location: &Url,
        reprovision: &Reprovision,
    ) -> &'static str {
        let Some((text, asked_ms)) = self.asked_duration() else {
            return "superseded";
        };
        match self.t8.renew_nidd_configuration(location, &text).await {
            Ok(answer) => {
                let Some(mut nidd) = device.state().nidd.clone() else {
                    return "superseded";
                };
                if nidd.location != *location {
                    return "superseded";
                }
                nidd.expires_at_ms = Some(granted_expiry(answer.duration.as_deref(), asked_ms));
                tracing::debug!(device = %device.id, %location, duration = %text, "NIDD configuration renewed");
                if let Err(error) = self.devices.set_nidd(device, Some(nidd)) {
                    self.metrics.store_error("device_put");
                    tracing::error!(device = %device.id, %error, "cannot persist a renewed NIDD configuration");
                }
                "renewed"
            }
            Err(error) if error.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
                let current = device
                    .state()
                    .nidd
                    .as_ref()
                    .is_some_and(|n| n.location == *location);
                if !current {
                    return "superseded";
                }
                tracing::warn!(device = %device.id, %location, "the SCEF no longer knows the NIDD configuration it was to renew; creating a new one");
                reprovision.configuration_terminated(device);
                "gone"
            }
            Err(error) => {
                tracing::warn!(device = %device.id, %location, %error, "cannot renew the NIDD configuration's duration; retrying");
                "failed"
            }
        }
    }

    /// Creates or renews the MonitoringEvent subscriptions of devices that want them; returns how
    /// long until the next one is due.
    async fn ensure_subscriptions(&self) -> Option<Duration> {
        let lifetime = self.monitoring_lifetime;
        // Renew when a tenth of the lifetime is left; retry failures at the provisioning pace.
        let margin_ms = (lifetime / 10).as_millis() as u64;
        let now_ms = clock::unix_ms();
        self.unsubscribe_unwanted().await;
        let due: Vec<Arc<Device>> = self
            .devices
            .iter()
            .filter(|d| d.monitoring())
            .filter(|d| {
                let state = d.state();
                state.nidd.as_ref().is_some_and(|n| {
                    n.is_usable()
                        && subscription_due(n.monitoring_subscription.as_ref(), now_ms, margin_ms)
                })
            })
            .collect();
        let failed = std::sync::atomic::AtomicBool::new(false);
        futures::stream::iter(due)
            .for_each_concurrent(self.scef.provisioning_concurrency, |device| {
                let failed = &failed;
                async move {
                    if !self.subscribe(&device, lifetime).await {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        let now_ms = clock::unix_ms();
        let next_renewal = self
            .devices
            .iter()
            .filter(|d| d.monitoring())
            .filter_map(|d| {
                let state = d.state();
                let expires = state
                    .nidd
                    .as_ref()?
                    .monitoring_subscription
                    .as_ref()?
                    .expires_at_ms;
                Some(Duration::from_millis(
                    expires.saturating_sub(now_ms + margin_ms),
                ))
            })
            .min();
        let retry = failed
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| Duration::from_millis(self.scef.retry_max_ms));
        earliest(next_renewal, retry)
    }

    /// Subscribes one device to UE_REACHABILITY (reachabilityType DATA); replaces an old one.
    async fn subscribe(&self, device: &Device, lifetime: Duration) -> bool {
        subscribe(&self.devices, &self.t8, &self.public_url, device, lifetime).await
    }

    /// Deletes the subscriptions of devices whose monitoring was switched off.
    async fn unsubscribe_unwanted(&self) {
        for device in self.devices.iter().filter(|d| !d.monitoring()) {
            let Some(mut nidd) = device.state().nidd.clone() else {
                continue;
            };
            let Some(subscription) = nidd.monitoring_subscription.take() else {
                continue;
            };
            if let Ok(location) = Url::parse(&subscription.location)
                && let Err(error) = self.t8.delete_monitoring_subscription(&location).await
            {
                tracing::warn!(device = %device.id, %error, "cannot delete a monitoring subscription no longer wanted");
                continue;
            }
            if let Err(error) = self.devices.set_nidd(&device, Some(nidd)) {
                tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
            }
        }
    }
}

/// What became of a listed configuration a device was to adopt.
enum Adoption {
    Adopted,
    /// The SCEF no longer has it (or ended it) now.
    Ended,
    /// It could not be moved to this run's callback URL (and was deleted).
    Failed,
}

/// What reconciliation did with a listed configuration of ours.
enum Settled {
    Adopted,
    Deleted,
}

/// Subscribes one device to UE_REACHABILITY (reachabilityType DATA) at its newest monitoring
/// callback URL, then deletes the subscription it replaces; whether the new one was created.
async fn subscribe(
    devices: &DeviceTable,
    t8: &T8Client,
    public_url: &Url,
    device: &Device,
    lifetime: Duration,
) -> bool {
    let expires = clock::system_now() + lifetime;
    let body = MonitoringEventSubscription {
        external_id: device.id.external_id().cloned(),
        msisdn: device.id.msisdn().cloned(),
        notification_destination: device.capability_url(public_url, "monitoring"),
        monitoring_type: Some(MonitoringType::UeReachability),
        reachability_type: Some("DATA".into()),
        monitor_expire_time: Some(humantime::format_rfc3339_seconds(expires).to_string()),
        ..Default::default()
    };
    let location = match t8.create_monitoring_subscription(&body).await {
        Ok(Some(location)) => location,
        Ok(None) => {
            tracing::warn!(device = %device.id, "the SCEF answered the monitoring subscription with a report only");
            return false;
        }
        Err(error) => {
            tracing::warn!(device = %device.id, %error, "monitoring subscription not created");
            return false;
        }
    };
    let Some(mut nidd) = device.state().nidd.clone() else {
        return false;
    };
    let old = nidd.monitoring_subscription.replace(StoredSubscription {
        location: location.to_string(),
        expires_at_ms: clock::to_unix_ms(expires),
    });
    tracing::info!(device = %device.id, %location, "subscribed to UE reachability");
    if let Err(error) = devices.set_nidd(device, Some(nidd)) {
        tracing::error!(device = %device.id, %error, "cannot persist the monitoring subscription");
    }
    if let Some(old) = old.and_then(|o| Url::parse(&o.location).ok())
        && let Err(error) = t8.delete_monitoring_subscription(&old).await
    {
        tracing::warn!(device = %device.id, %error, "cannot delete the replaced monitoring subscription");
    }
    true
}

/// The sooner of two optional waits (`None`: nothing due).
fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An RFC 3339 time (any offset) as Unix milliseconds.
fn expiry_ms(text: &str) -> Option<u64> {
    let time =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The expiry an SCEF granted for a `duration` asked for at `asked_ms`: its answer when it
/// names an earlier one (it may shorten a lifetime), else what was asked.
fn granted_expiry(answered: Option<&str>, asked_ms: u64) -> u64 {
    answered
        .and_then(expiry_ms)
        .map_or(asked_ms, |granted| granted.min(asked_ms))
}

/// The one UE a configuration names (`externalId` or `msisdn`), if it names exactly one.
fn named_ue(body: &NiddConfiguration) -> Option<DeviceId> {
    match (&body.external_id, &body.msisdn) {
        (Some(external_id), None) => Some(DeviceId::External(external_id.clone())),
        (None, Some(msisdn)) => Some(DeviceId::Msisdn(msisdn.clone())),
        _ => None,
    }
}

/// Metric label of a configuration status: known values, or OTHER.
pub(crate) fn status_label(status: &NiddStatus) -> &str {
    match status {
        NiddStatus::Other(_) => "OTHER",
        known => known.as_str(),
    }
}

fn jitter(delay: Duration) -> Duration {
    let spread = delay.as_millis() as u64 / 10;
    delay
        + Duration::from_millis(if spread > 0 {
            rand::random::<u64>() % spread
        } else {
            0
        })
}

/// Whether a device needs a (new) subscription: none yet, or the current one ends within the
/// renewal margin.
fn subscription_due(
    subscription: Option<&StoredSubscription>,
    now_ms: u64,
    margin_ms: u64,
) -> bool {
    subscription.is_none_or(|s| s.expires_at_ms <= now_ms + margin_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_renewed_within_the_margin() {
        let subscription = StoredSubscription {
            location: "http://scef/s/1".into(),
            expires_at_ms: 100_000,
        };
        assert!(subscription_due(None, 0, 10_000));
        assert!(!subscription_due(Some(&subscription), 89_999, 10_000));
        assert!(subscription_due(Some(&subscription), 90_000, 10_000));
    }

    #[test]
    fn an_scef_may_shorten_a_duration_but_not_extend_it() {
        let asked = expiry_ms("2026-12-03T12:00:00Z").unwrap();
        assert_eq!(asked, 1_796_299_200_000);
        assert_eq!(expiry_ms("2026-12-03T13:00:00+01:00"), Some(asked));
        assert_eq!(granted_expiry(None, asked), asked);
        assert_eq!(granted_expiry(Some("not a time"), asked), asked);
        assert_eq!(
            granted_expiry(Some("2026-12-03T11:00:00Z"), asked),
            asked - 3_600_000
        );
        assert_eq!(granted_expiry(Some("2027-01-01T00:00:00Z"), asked), asked);
    }

    #[test]
    fn a_failed_item_waits_for_its_retry_without_holding_up_the_others() {
        let now = clock::now();
        let retry = |after_ms: u64| Retry {
            at: now + Duration::from_millis(after_ms),
            backoff: Duration::from_millis(100),
            unsure: false,
        };
        let mut schedule: RetrySchedule<&str> = RetrySchedule::default();
        let all = |items: &[&'static str]| items.to_vec();
        // First round: everything is due, without a retry.
        let due = schedule.due(all(&["a", "b", "c"]), |k| *k, now);
        assert_eq!(
            due.iter()
                .map(|(k, r)| (*k, r.is_some()))
                .collect::<Vec<_>>(),
            [("a", false), ("b", false), ("c", false)]
        );
        schedule.record(vec![
            ("a", Some(retry(1000))),
            ("b", None),
            ("c", Some(retry(10))),
        ]);
        assert_eq!(schedule.next_wait(now), Some(Duration::from_millis(10)));
        // b succeeded and is gone; a and c wait; a new d goes at once.
        let due = schedule.due(all(&["a", "c", "d"]), |k| *k, now);
        assert_eq!(due.iter().map(|(k, _)| *k).collect::<Vec<_>>(), ["d"]);
        let later = now + Duration::from_millis(20);
        let due = schedule.due(all(&["a", "c"]), |k| *k, later);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, "c");
        assert!(
            due[0].1.is_some(),
            "with its last retry, for the next backoff"
        );
        // a is no longer missing (created elsewhere, or removed): forgotten.
        let _ = schedule.due(all(&["c"]), |k| *k, later);
        assert_eq!(schedule.len(), 1);
    }

    #[test]
    fn backoff_jitter_stays_within_a_tenth() {
        for _ in 0..100 {
            let delay = jitter(Duration::from_millis(1000));
            assert!(delay >= Duration::from_millis(1000) && delay < Duration::from_millis(1100));
        }
    }
}
