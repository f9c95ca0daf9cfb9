//! Group NIDD configurations (`externalGroupId`) kept in place at the SCEF: created with the
//! group's callback URL, checked at start-up and every `nidd.check_interval_s`, renewed like
//! the devices' own, deleted for groups the configuration no longer names; every change copied
//! to the members (`DeviceTable::mirror_group`), whose MT goes through it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use url::Url;

use super::{Provisioner, Retry, RetrySchedule, earliest, granted_expiry};
use crate::clock;
use crate::devices::DeviceTable;
use crate::devices::NiddState;
use crate::devices::groups::{Group, GroupTable};
use crate::identity::ExternalId;
use crate::metrics::Metrics;
use crate::t8::{NiddConfiguration, NiddStatus, T8Client};

/// What ends a group's configuration, for the callback server and the MT path.
#[derive(Clone)]
pub(crate) struct GroupReprovision {
    pub(super) groups: Arc<GroupTable>,
    pub(super) devices: Arc<DeviceTable>,
    pub(super) t8: Arc<T8Client>,
    pub(super) wake: Arc<tokio::sync::Notify>,
    pub(super) metrics: Arc<Metrics>,
}

impl GroupReprovision {
    /// The group's configuration is gone (404 on an MT delivery, a confirmed termination):
    /// forget it, in the members too, and create a new one.
    pub(crate) fn configuration_gone(&self, group: &Group) {
        forget(&self.groups, &self.devices, group);
        self.wake.notify_one();
    }

    /// A new status of the group's configuration, notified by the SCEF.
    pub(crate) fn configuration_changed(&self, group: &Group, nidd: NiddState) {
        tracing::info!(group = %group.id, status = ?nidd.status, "group NIDD configuration status");
        if let Err(error) = self.groups.set_nidd(group, Some(nidd)) {
            self.metrics.store_error("group_put");
            tracing::error!(group = %group.id, %error, "cannot persist the group's NIDD configuration");
        }
        self.devices.mirror_group(group);
    }

    /// A notification reported the group's configuration at `location` ended: believed only
    /// once a GET at the SCEF confirms it.
    pub(crate) fn termination_reported(&self, group: Arc<Group>, location: Url) {
        if !group.begin_termination_check() {
            self.metrics
                .reported_terminations
                .with_label_values(&["already_checking"])
                .inc();
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let outcome = match this.t8.fetch_nidd_configuration(&location).await {
                Ok(found) => {
                    let ended = found.as_ref().is_none_or(|body| {
                        body.status.as_ref().is_some_and(NiddStatus::is_terminated)
                    });
                    let current = group.nidd().is_some_and(|n| n.location == location);
                    if !current {
                        "superseded"
                    } else if ended {
                        tracing::warn!(group = %group.id, %location, "the SCEF ended the group's NIDD configuration; creating a new one");
                        this.configuration_gone(&group);
                        "confirmed"
                    } else {
                        "not_confirmed"
                    }
                }
                Err(error) => {
                    tracing::warn!(group = %group.id, %error, "cannot confirm a reported termination of the group's configuration");
                    "unverified"
                }
            };
            group.end_termination_check();
            this.metrics
                .reported_terminations
                .with_label_values(&[outcome])
                .inc();
        });
    }
}

fn forget(groups: &GroupTable, devices: &DeviceTable, group: &Group) {
    if let Err(error) = groups.set_nidd(group, None) {
        tracing::error!(group = %group.id, %error, "cannot persist the group's lost NIDD configuration");
    }
    devices.mirror_group(group);
}

impl Provisioner {
    /// The handle that ends a group's configuration.
    pub(crate) fn group_reprovision(&self) -> GroupReprovision {
        GroupReprovision {
            groups: self.groups.clone(),
            devices: self.devices.clone(),
            t8: self.t8.clone(),
            wake: self.wake.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Deletes the configurations of groups the configuration file no longer names.
    pub(super) async fn remove_departed_groups(&self) {
        for (id, record) in self.groups.departed() {
            if let Some(location) = record.nidd.and_then(|n| Url::parse(&n.location).ok()) {
                if let Err(error) = self.t8.delete_nidd_configuration(&location).await {
                    tracing::warn!(group = %id, %error, "cannot delete the NIDD configuration of a removed group; will retry at next start");
                    continue;
                }
                tracing::info!(group = %id, %location, "deleted the NIDD configuration of a removed group");
            }
            if let Err(error) = self.groups.forget_departed(&id) {
                self.metrics.store_error("group_remove");
                tracing::error!(group = %id, %error, "cannot remove the record of a removed group");
            }
        }
    }

    /// Checks every group's configuration with the SCEF: one it lost or ended is forgotten
    /// (and created again), a changed callback URL is patched back.
    pub(super) async fn check_groups(&self) {
        let configured: Vec<(Arc<Group>, NiddState)> = self
            .groups
            .iter()
            .filter_map(|g| g.nidd().map(|n| (g, n)))
            .collect();
        for (group, nidd) in configured {
            let outcome = self.check_group(&group, nidd).await;
            self.metrics
                .configuration_checks
                .with_label_values(&[outcome])
                .inc();
        }
    }

    async fn check_group(&self, group: &Group, mut nidd: NiddState) -> &'static str {
        let body = match self.t8.fetch_nidd_configuration(&nidd.location).await {
            Ok(Some(body)) => body,
            Ok(None) => {
                tracing::warn!(group = %group.id, location = %nidd.location, "the SCEF no longer has the group's NIDD configuration; creating a new one");
                self.forget_if_current(group, &nidd.location);
                return "gone";
            }
            Err(error) => {
                tracing::warn!(group = %group.id, %error, "cannot check the group's NIDD configuration; keeping it");
                return "unchecked";
            }
        };
        if body.status.as_ref().is_some_and(NiddStatus::is_terminated) {
            tracing::warn!(group = %group.id, location = %nidd.location, "the SCEF reports the group's NIDD configuration terminated; creating a new one");
            self.forget_if_current(group, &nidd.location);
            return "terminated";
        }
        let mut outcome = "kept";
        if body.status.is_some() && body.status != nidd.status {
            nidd.status = body.status;
            outcome = "status_changed";
        }
        nidd.maximum_packet_size_bits = body.maximum_packet_size.or(nidd.maximum_packet_size_bits);
        let wanted = group.callback_url(&self.public_url);
        if body.notification_destination != wanted {
            match self
                .t8
                .update_notification_destination(&nidd.location, &wanted)
                .await
            {
                Ok(_) => {
                    tracing::info!(group = %group.id, found = %body.notification_destination, "the group's NIDD configuration's callback URL was not ours; patched back");
                    outcome = "destination_restored";
                }
                Err(error) => {
                    tracing::warn!(group = %group.id, %error, "cannot patch the group's callback URL back; replacing its NIDD configuration");
                    if let Err(error) = self.t8.delete_nidd_configuration(&nidd.location).await {
                        tracing::warn!(group = %group.id, %error, "cannot delete the group's old NIDD configuration");
                    }
                    self.forget_if_current(group, &nidd.location);
                    return "replaced";
                }
            }
            nidd.notification_destination = Some(wanted);
        }
        if group
            .nidd()
            .is_some_and(|current| current.location == nidd.location && current != nidd)
        {
            self.keep_group(group, nidd);
        }
        outcome
    }

    fn forget_if_current(&self, group: &Group, location: &Url) {
        if group.nidd().is_some_and(|n| n.location == *location) {
            forget(&self.groups, &self.devices, group);
            self.wake.notify_one();
        }
    }

    fn keep_group(&self, group: &Group, nidd: NiddState) {
        if let Err(error) = self.groups.set_nidd(group, Some(nidd)) {
            self.metrics.store_error("group_put");
            tracing::error!(group = %group.id, %error, "cannot persist the group's NIDD configuration");
        }
        self.devices.mirror_group(group);
    }

    /// One attempt at the configuration of every group without one whose retry is due;
    /// `retries` keeps when to try each failed one again (no group's wait holds up the
    /// devices' provisioning).
    pub(super) async fn provision_groups(&self, retries: &mut RetrySchedule<ExternalId>) {
        let missing: Vec<Arc<Group>> = self.groups.iter().filter(|g| g.nidd().is_none()).collect();
        let due = retries.due(missing, |g| g.id.clone(), clock::now());
        let outcomes: Vec<(ExternalId, Option<Retry>)> = futures::stream::iter(due)
            .map(|(group, retry)| async move {
                let next = self.provision_group(&group, retry).await;
                (group.id.clone(), next)
            })
            .buffer_unordered(self.scef.provisioning_concurrency)
            .collect()
            .await;
        retries.record(outcomes);
    }

    async fn provision_group(&self, group: &Group, previous: Option<Retry>) -> Option<Retry> {
        // A group removed meanwhile gets nothing more.
        self.groups.get(&group.id)?;
        let retry_max = Duration::from_millis(self.scef.retry_max_ms);
        let backoff = previous.map_or(Duration::from_millis(self.scef.retry_initial_ms), |r| {
            r.backoff
        });
        let error = self.create_group(group).await.err()?;
        let retry = Retry::after(&error, backoff, retry_max, false);
        tracing::warn!(group = %group.id, %error, retry_in_ms = retry.at.saturating_duration_since(clock::now()).as_millis() as u64, "group NIDD configuration not created");
        Some(retry)
    }

    async fn create_group(&self, group: &Group) -> Result<(), crate::t8::T8Error> {
        let _creating = group.provisioning.lock().await;
        if self.groups.get(&group.id).is_none() {
            return Ok(());
        }
        let asked = self.asked_duration();
        let request = NiddConfiguration {
            external_id: None,
            msisdn: None,
            external_group_id: Some(group.id.clone()),
            notification_destination: group.callback_url(&self.public_url),
            duration: asked.as_ref().map(|(text, _)| text.clone()),
            ..self.configuration_defaults()
        };
        let created = self.t8.create_nidd_configuration(&request).await?;
        let nidd = NiddState {
            location: created.location,
            status: created.body.status.clone(),
            maximum_packet_size_bits: created.body.maximum_packet_size,
            notification_destination: Some(request.notification_destination.clone()),
            monitoring_subscription: None,
            expires_at_ms: asked
                .map(|(_, asked_ms)| granted_expiry(created.body.duration.as_deref(), asked_ms)),
        };
        tracing::info!(group = %group.id, location = %nidd.location, members = group.member_count(), "group NIDD configuration created");
        self.keep_group(group, nidd);
        // Durable at once: a crash now must not orphan it.
        self.flush_store().await;
        Ok(())
    }

    /// Renews the `duration` of group configurations that are due, like the devices' own;
    /// how long until the next is due.
    pub(super) async fn renew_groups(&self) -> Option<Duration> {
        let lifetime = Duration::from_secs(self.nidd.configuration_duration_s?);
        let margin_ms = (lifetime / super::RENEW_WHEN_LEFT).as_millis() as u64;
        let now_ms = crate::clock::unix_ms();
        let mut failed = false;
        for group in self.groups.iter() {
            let Some(nidd) = group.nidd() else { continue };
            if nidd.expires_at_ms.is_some_and(|e| e > now_ms + margin_ms) {
                continue;
            }
            let Some((text, asked_ms)) = self.asked_duration() else {
                break;
            };
            let outcome = match self
                .t8
                .renew_nidd_configuration(&nidd.location, &text)
                .await
            {
                Ok(answer) => {
                    let renewed = NiddState {
                        expires_at_ms: Some(granted_expiry(answer.duration.as_deref(), asked_ms)),
                        ..nidd
                    };
                    if group.nidd().is_some_and(|n| n.location == renewed.location) {
                        self.keep_group(&group, renewed);
                    }
                    "renewed"
                }
                Err(error) if error.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
                    tracing::warn!(group = %group.id, "the SCEF no longer knows the group's NIDD configuration it was to renew; creating a new one");
                    self.forget_if_current(&group, &nidd.location);
                    "gone"
                }
                Err(error) => {
                    tracing::warn!(group = %group.id, %error, "cannot renew the group's NIDD configuration; retrying");
                    failed = true;
                    "failed"
                }
            };
            self.metrics
                .configuration_renewals
                .with_label_values(&[outcome])
                .inc();
        }
        let now_ms = crate::clock::unix_ms();
        let next = self
            .groups
            .iter()
            .filter_map(|g| g.nidd()?.expires_at_ms)
            .map(|expires| Duration::from_millis(expires.saturating_sub(now_ms + margin_ms)))
            .min();
        earliest(
            next,
            failed.then(|| Duration::from_millis(self.scef.retry_max_ms)),
        )
    }
}
