//! Keeps every configured device provisioned at the SCEF: checks persisted NIDD
//! configurations at start-up, creates missing ones with exponential backoff (honouring
//! `Retry-After`), deletes the ones of devices removed from the configuration, and re-creates a
//! configuration the SCEF terminated.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock;
use crate::config::{NiddDefaults, ScefConfig};
use crate::devices::{Device, DeviceTable, NiddState};
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::store::StoredSubscription;
use crate::t8::{
    MonitoringEventSubscription, MonitoringType, NiddConfiguration, NiddStatus,
    PdnEstablishmentOption, T8Client,
};

/// What the SCEF said about a device's configuration that asks for provisioning again; the
/// callback server's handle on the provisioner.
#[derive(Clone)]
pub(crate) struct Reprovision {
    devices: Arc<DeviceTable>,
    t8: Arc<T8Client>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

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
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = this.check_termination(&device, &location).await;
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
    t8: Arc<T8Client>,
    scef: ScefConfig,
    nidd: NiddDefaults,
    monitoring_lifetime: Duration,
    public_url: Url,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Provisioner {
    pub(crate) fn new(
        devices: Arc<DeviceTable>,
        t8: Arc<T8Client>,
        scef: ScefConfig,
        nidd: NiddDefaults,
        monitoring_lifetime: Duration,
        public_url: Url,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            devices,
            t8,
            scef,
            nidd,
            monitoring_lifetime,
            public_url,
            wake: Arc::new(Notify::new()),
            metrics,
        }
    }

    /// The callback server's handle.
    pub(crate) fn reprovision(&self) -> Reprovision {
        Reprovision {
            devices: self.devices.clone(),
            t8: self.t8.clone(),
            wake: self.wake.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Provisions until cancelled; woken early by a terminated configuration or subscription.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let this = &self;
        this.remove_departed_devices().await;
        self.verify_persisted().await;
        // Only now is this instance ready: until then the SCEF may still call an earlier run's
        // callback URL.
        self.devices.mark_verified();
        loop {
            let missing: Vec<Arc<Device>> = self
                .devices
                .iter()
                .filter(|d| d.state().nidd.is_none())
                .cloned()
                .collect();
            if !missing.is_empty() {
                tracing::info!(devices = missing.len(), "creating NIDD configurations");
            }
            futures::stream::iter(missing)
                .for_each_concurrent(self.scef.provisioning_concurrency, |device| {
                    let cancel = cancel.clone();
                    async move { this.provision_device(&device, &cancel).await }
                })
                .await;
            let next_renewal = self.ensure_subscriptions().await;
            if let Err(error) = self.devices.store().flush().await {
                self.metrics.store_error("flush");
                tracing::error!(%error, "cannot flush the store");
            }
            let timer = async {
                match next_renewal {
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

    /// Creates the device's NIDD configuration, retrying until it exists or the bridge stops.
    async fn provision_device(&self, device: &Device, cancel: &CancellationToken) {
        let scef = &self.scef;
        let mut backoff = Duration::from_millis(scef.retry_initial_ms);
        let body = self.configuration_request(device);
        loop {
            match self.t8.create_nidd_configuration(&body).await {
                Ok(created) => {
                    let status = created.body.status.clone();
                    if let Some(status) = &status {
                        self.metrics
                            .configuration_statuses
                            .with_label_values(&[status_label(status)])
                            .inc();
                    }
                    let nidd = NiddState {
                        location: created.location,
                        status,
                        maximum_packet_size_bits: created.body.maximum_packet_size,
                        notification_destination: Some(body.notification_destination.clone()),
                        monitoring_subscription: None,
                    };
                    tracing::info!(device = %device.id, location = %nidd.location, status = ?nidd.status, "NIDD configuration created");
                    if let Err(error) = self.devices.set_nidd(device, Some(nidd)) {
                        tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
                    }
                    // MT held for want of a configuration may go now.
                    device.wake.notify_one();
                    return;
                }
                Err(error) => {
                    let delay = error.retry_after().unwrap_or(backoff);
                    tracing::warn!(device = %device.id, %error, retry_in_ms = delay.as_millis() as u64, "NIDD configuration not created");
                    if !error.is_retryable() {
                        // A refusal may be fixed at the operator; ask again at the slowest pace.
                        backoff = Duration::from_millis(scef.retry_max_ms);
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(jitter(delay)) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(scef.retry_max_ms));
                }
            }
        }
    }

    fn configuration_request(&self, device: &Device) -> NiddConfiguration {
        let nidd = &self.nidd;
        NiddConfiguration {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            mtc_provider_id: self.scef.mtc_provider_id.clone(),
            notification_destination: device.callback_url(&self.public_url),
            pdn_establishment_option: Some(PdnEstablishmentOption::from(
                nidd.pdn_establishment_option.as_str(),
            )),
            reliable_data_service: Some(false),
            request_test_notification: nidd.request_test_notification.then_some(true),
            ..Default::default()
        }
    }

    /// Asks the SCEF whether persisted configurations still exist, forgets the ones it lost, and
    /// points the others at this instance's callback URL if that changed.
    async fn verify_persisted(&self) {
        let persisted: Vec<(Arc<Device>, NiddState)> = self
            .devices
            .iter()
            .filter_map(|d| {
                let nidd = d.state().nidd.clone()?;
                Some((d.clone(), nidd))
            })
            .collect();
        futures::stream::iter(persisted)
        .for_each_concurrent(self.scef.provisioning_concurrency, |(device, nidd)| {
            async move {
                let checked = self.verify_one(&device, nidd).await;
                if let Err(error) = self.devices.set_nidd(&device, checked) {
                    tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
                }
            }
        })
        .await;
    }

    /// The configuration to keep for `device` after asking the SCEF about it.
    async fn verify_one(&self, device: &Device, mut nidd: NiddState) -> Option<NiddState> {
        let body = match self.t8.fetch_nidd_configuration(&nidd.location).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::warn!(device = %device.id, location = %nidd.location, "the SCEF no longer has this NIDD configuration; creating a new one");
                return None;
            }
            Err(error) => {
                tracing::warn!(device = %device.id, %error, "cannot check the persisted NIDD configuration; keeping it");
                return Some(nidd);
            }
        };
        nidd.status = body.status.or(nidd.status.take());
        nidd.maximum_packet_size_bits = body.maximum_packet_size.or(nidd.maximum_packet_size_bits);
        if !nidd.is_usable() {
            return None;
        }
        let wanted = device.callback_url(&self.public_url);
        if body.notification_destination == wanted {
            nidd.notification_destination = Some(wanted);
            return Some(nidd);
        }
        match self
            .t8
            .update_notification_destination(&nidd.location, &wanted)
            .await
        {
            Ok(_) => {
                tracing::info!(device = %device.id, "callback URL changed; NIDD configuration updated");
                nidd.notification_destination = Some(wanted);
                Some(nidd)
            }
            Err(error) => {
                // An SCEF without Rel-17 PATCH support: replace the configuration instead.
                tracing::warn!(device = %device.id, %error, "cannot update the callback URL; replacing the NIDD configuration");
                if let Err(error) = self.t8.delete_nidd_configuration(&nidd.location).await {
                    tracing::warn!(device = %device.id, %error, "cannot delete the old NIDD configuration");
                }
                None
            }
        }
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
            .filter(|d| d.monitoring)
            .filter(|d| {
                let state = d.state();
                state.nidd.as_ref().is_some_and(|n| {
                    n.is_usable()
                        && subscription_due(n.monitoring_subscription.as_ref(), now_ms, margin_ms)
                })
            })
            .cloned()
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
            .filter(|d| d.monitoring)
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
        match (next_renewal, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Subscribes one device to UE_REACHABILITY (reachabilityType DATA); replaces an old one.
    async fn subscribe(&self, device: &Device, lifetime: Duration) -> bool {
        let expires = clock::system_now() + lifetime;
        let body = MonitoringEventSubscription {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            notification_destination: device.capability_url(&self.public_url, "monitoring"),
            monitoring_type: Some(MonitoringType::UeReachability),
            reachability_type: Some("DATA".into()),
            monitor_expire_time: Some(humantime::format_rfc3339_seconds(expires).to_string()),
            ..Default::default()
        };
        let location = match self.t8.create_monitoring_subscription(&body).await {
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
        if let Err(error) = self.devices.set_nidd(device, Some(nidd)) {
            tracing::error!(device = %device.id, %error, "cannot persist the monitoring subscription");
        }
        if let Some(old) = old.and_then(|o| Url::parse(&o.location).ok())
            && let Err(error) = self.t8.delete_monitoring_subscription(&old).await
        {
            tracing::warn!(device = %device.id, %error, "cannot delete the replaced monitoring subscription");
        }
        true
    }

    /// Deletes the subscriptions of devices whose monitoring was switched off.
    async fn unsubscribe_unwanted(&self) {
        for device in self.devices.iter().filter(|d| !d.monitoring) {
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
            if let Err(error) = self.devices.set_nidd(device, Some(nidd)) {
                tracing::error!(device = %device.id, %error, "cannot persist the NIDD configuration");
            }
        }
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
    fn backoff_jitter_stays_within_a_tenth() {
        for _ in 0..100 {
            let delay = jitter(Duration::from_millis(1000));
            assert!(delay >= Duration::from_millis(1000) && delay < Duration::from_millis(1100));
        }
    }
}
