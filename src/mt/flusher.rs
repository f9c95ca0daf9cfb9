//! The MT flusher: the steps of a device's MT work (run by [`super::scheduler`]), each asking
//! the device's `MtState` what to do next and doing it — deliver the head of the queue through T8 (paced over all devices), ask the SCEF to
//! wake the device (T8 device triggering), or say how long it waits.
//! Each T8 answer becomes an [`Outcome`] (the table is in ARCHITECTURE.md, MT); a 404 hands the
//! device to the provisioner through a narrow callback (`mt` does not use `provision`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use url::Url;

use crate::clock;
use crate::config::{BufferOwner, PsmConfig};
use crate::delivery::{Decision, Outcome, Pacer, handover_of, instant_of};
use crate::devices::Device;
use crate::exchange::Handover;
use crate::metrics::Metrics;
use crate::mt::Downlinks;
use crate::queue::{DropReason, QueuedDatagram};
use crate::t8::{
    DeviceTriggering, DownlinkOutcome, NiddDownlinkDataTransfer, PdnEstablishmentOption, T8Client,
};

/// The timer resolution below which a global pacer slot is not waited for.
const PACER_TICK: Duration = Duration::from_millis(1);

/// What a device trigger carries (from `[psm]`).
#[derive(Debug, Clone)]
pub(crate) struct TriggerSettings {
    pub(crate) validity_s: u64,
    pub(crate) application_port: u16,
    pub(crate) payload_base64: String,
}

impl TriggerSettings {
    pub(crate) fn from_config(psm: &PsmConfig) -> Self {
        Self {
            validity_s: psm.trigger_validity_s,
            application_port: psm.trigger_application_port,
            payload_base64: psm.trigger_payload_base64.clone(),
        }
    }
}

/// Called when the SCEF no longer knows a device's NIDD configuration (404 on an MT
/// delivery): forget it and have a new one created. Wired in `bridge` to the provisioner.
pub(crate) type ConfigurationGone = Arc<dyn Fn(&Device) + Send + Sync>;

/// What every device's flusher shares: the queues, the T8 client and the global pacer.
pub(crate) struct Flusher {
    downlinks: Arc<Downlinks>,
    t8: Arc<T8Client>,
    /// Paces MT deliveries over all devices.
    global_pacer: Mutex<Pacer>,
    triggers: TriggerSettings,
    public_url: Url,
    metrics: Arc<Metrics>,
    configuration_gone: ConfigurationGone,
}

impl Flusher {
    pub(crate) fn new(
        downlinks: Arc<Downlinks>,
        t8: Arc<T8Client>,
        global_rate_per_s: f64,
        triggers: TriggerSettings,
        public_url: Url,
        metrics: Arc<Metrics>,
        configuration_gone: ConfigurationGone,
    ) -> Self {
        Self {
            downlinks,
            t8,
            global_pacer: Mutex::new(Pacer::new(global_rate_per_s)),
            triggers,
            public_url,
            metrics,
            configuration_gone,
        }
    }

    /// One step of a device's MT work as `MtState::next_step` decides it: a delivery or a
    /// device trigger (then `None`: the next step may follow at once), or the wait the device
    /// is in now (`Some`, with its deadline if any), which the scheduler keeps.
    pub(crate) async fn step(&self, device: &Device) -> Option<Option<Instant>> {
        let now = clock::now();
        let (decision, dropped, wakeups) = {
            let mut state = device.state();
            let configured = state.is_configured();
            let (decision, dropped) = state.mt.next_step(now, clock::unix_ms(), configured);
            (decision, dropped, state.mt.take_finished_wakeups())
        };
        self.count_wakeups(wakeups);
        self.downlinks.record_drops(device, dropped);
        match decision {
            Decision::Send(item) => self.deliver(device, item).await,
            Decision::Trigger => self.send_trigger(device).await,
            Decision::Wait(until) => return Some(until),
        }
        None
    }

    fn count_wakeups(&self, wakeups: Vec<crate::delivery::WakeupSummary>) {
        let metrics = &self.metrics;
        for wakeup in wakeups {
            let counted = metrics
                .mt_wakeup_datagrams
                .with_label_values(&["same_wakeup"]);
            counted.inc_by(wakeup.delivered as u64);
            metrics
                .mt_wakeup_datagrams
                .with_label_values(&["later_wakeup"])
                .inc_by(wakeup.left_for_later as u64);
            if let Some(drain) = wakeup.wake_to_last_delivery {
                metrics.mt_wakeup_drain_seconds.observe(drain.as_secs_f64());
            }
        }
    }

    async fn deliver(&self, device: &Device, item: QueuedDatagram) {
        let (configuration, owner) = {
            let state = device.state();
            (
                state.nidd.as_ref().map(|n| n.location.clone()),
                state.mt.owner,
            )
        };
        let seq = item.seq;
        let Some(configuration) = configuration else {
            let mut state = device.state();
            state.mt.on_outcome(
                seq,
                Outcome::Retry {
                    after: Some(Duration::from_secs(1)),
                },
                clock::now(),
            );
            return;
        };
        let now = clock::now();
        let slot = self
            .global_pacer
            .lock()
            .map(|mut p| p.reserve(now))
            .unwrap_or(now);
        // tokio's timer ticks in milliseconds and rounds a wait up to the next tick: a slot
        // less than a tick away would cost a whole tick per delivery at high global rates.
        // Sent at once, it stays within the pacer's budget (the next slot is still reserved
        // one interval later).
        if slot.saturating_duration_since(now) >= PACER_TICK {
            tokio::time::sleep_until(slot.into()).await;
        }
        let transfer = NiddDownlinkDataTransfer {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            data: BASE64.encode(&item.data),
            pdn_establishment_option: Some(match owner {
                BufferOwner::Bridge => PdnEstablishmentOption::IndicateError,
                BufferOwner::Scef => PdnEstablishmentOption::WaitForUe,
            }),
            ..Default::default()
        };
        let result = self.t8.deliver_downlink(&configuration, &transfer).await;
        let now = clock::now();
        let handover = match &result {
            Ok(DownlinkOutcome::Delivered { status, .. }) => handover_of(status.as_ref()),
            _ => Handover::Sent,
        };
        let outcome = self.outcome_of(device, result, now);
        let metrics = &self.metrics;
        metrics
            .mt_delivery_attempts
            .with_label_values(&[outcome_label(&outcome)])
            .inc();
        if matches!(outcome, Outcome::NotReachable { .. }) {
            metrics
                .reachability_events
                .with_label_values(&["not_reachable"])
                .inc();
        }
        let gone = matches!(outcome, Outcome::ConfigurationGone);
        let rejected = matches!(outcome, Outcome::Rejected);
        let delivered = matches!(outcome, Outcome::Delivered);
        let (forget, change) = {
            let mut state = device.state();
            if delivered {
                // On its way to the device: its copies are not carried again meanwhile.
                state
                    .exchanges
                    .carried(item.source, &item.data, handover, now);
            }
            let effect = state.mt.on_outcome(seq, outcome, now);
            let change = self.downlinks.apply(device, &effect);
            // Counted once: only when the datagram was still queued.
            if rejected && effect == crate::delivery::QueueEffect::Remove(seq) {
                metrics
                    .mt_queue_dropped
                    .with_label_values(&[DropReason::Rejected.label()])
                    .inc();
            }
            // A configuration replaced meanwhile is not forgotten again.
            let forget = gone
                && state
                    .nidd
                    .as_ref()
                    .is_some_and(|n| n.location == configuration);
            (forget, change)
        };
        // The next datagram goes out only once this one's removal or pending mark is durable,
        // so a crash resends at most the datagram in flight.
        if let Some(generation) = change {
            self.downlinks.durable(generation).await;
        }
        if forget {
            tracing::warn!(device = %device.id, %configuration, "the SCEF no longer knows the NIDD configuration; creating a new one");
            (self.configuration_gone)(device);
        } else if gone {
            device.wake.ring();
        }
    }

    /// What a T8 answer means for the datagram (counted by reported status).
    fn outcome_of(
        &self,
        device: &Device,
        result: Result<DownlinkOutcome, crate::t8::T8Error>,
        now: std::time::Instant,
    ) -> Outcome {
        let metrics = &self.metrics;
        let max = self.downlinks.scef_times.retry_wait;
        let retry_at = |time: Option<&str>| instant_of(time, now, clock::system_now(), max);
        match result {
            Ok(DownlinkOutcome::Delivered {
                status,
                location,
                requested_retransmission_time,
            }) => {
                metrics
                    .mt_deliveries
                    .with_label_values(&[status.as_ref().map_or("SUCCESS", |s| s.label())])
                    .inc();
                Outcome::of_answer(
                    false,
                    status.as_ref(),
                    location.map(|l| l.to_string()),
                    retry_at(requested_retransmission_time.as_deref()),
                )
            }
            Ok(DownlinkOutcome::Pending {
                location,
                status,
                requested_retransmission_time,
            }) => {
                metrics
                    .mt_deliveries
                    .with_label_values(&[status.as_ref().map_or("PENDING", |s| s.label())])
                    .inc();
                Outcome::of_answer(
                    true,
                    status.as_ref(),
                    Some(location.to_string()),
                    retry_at(requested_retransmission_time.as_deref()),
                )
            }
            Ok(DownlinkOutcome::Failed { failure }) => {
                metrics.mt_deliveries.with_label_values(&["FAILED"]).inc();
                tracing::debug!(device = %device.id, cause = ?failure.problem_detail.cause, "SCEF could not deliver; kept for retry");
                Outcome::NotReachable {
                    retry_at: retry_at(failure.requested_retransmission_time.as_deref()),
                }
            }
            Err(error) if error.is_retryable() => {
                tracing::debug!(device = %device.id, %error, "SCEF could not take MT; kept for retry");
                Outcome::Retry {
                    after: error.retry_after(),
                }
            }
            Err(error) => {
                let outcome = refusal(error.status().map(|s| s.as_u16()), error.cause());
                match outcome {
                    Outcome::Rejected => {
                        tracing::warn!(device = %device.id, %error, "SCEF refused MT datagram; dropped")
                    }
                    _ => {
                        tracing::warn!(device = %device.id, %error, "SCEF refused MT datagram; kept")
                    }
                }
                outcome
            }
        }
    }

    /// Asks the SCEF to wake a sleeping device that has MT waiting (T8 device triggering).
    async fn send_trigger(&self, device: &Device) {
        let body = DeviceTriggering {
            external_id: device.id.external_id().cloned(),
            msisdn: device.id.msisdn().cloned(),
            validity_period: self.triggers.validity_s,
            priority: "PRIORITY".into(),
            application_port_id: self.triggers.application_port,
            trigger_payload: self.triggers.payload_base64.clone(),
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
}

/// A non-retryable T8 refusal of an MT delivery (its status and ProblemDetails cause): 401
/// (after one credential refresh) and 403 keep the datagram, 404 keeps it for the next
/// configuration; a datagram the SCEF will never take (400, 411, 413, 415, 403
/// `DATA_TOO_LARGE`, other 4xx, or an answer the bridge cannot read) is dropped.
fn refusal(status: Option<u16>, cause: Option<&str>) -> Outcome {
    match status {
        Some(401) => Outcome::Unauthorized,
        Some(403) if cause == Some("DATA_TOO_LARGE") => Outcome::Rejected,
        Some(403) => Outcome::Forbidden,
        Some(404) => Outcome::ConfigurationGone,
        _ => Outcome::Rejected,
    }
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Pending(_) => "pending",
        Outcome::NotReachable { .. } => "not_reachable",
        Outcome::Retry { .. } => "retry",
        Outcome::Unauthorized => "unauthorized",
        Outcome::ConfigurationGone => "configuration_gone",
        Outcome::Forbidden => "forbidden",
        Outcome::Rejected => "rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_what_the_scef_may_take_later() {
        assert_eq!(refusal(Some(401), None), Outcome::Unauthorized);
        assert_eq!(
            refusal(Some(403), Some("NOT_AUTHORIZED")),
            Outcome::Forbidden
        );
        assert_eq!(refusal(Some(403), None), Outcome::Forbidden);
        assert_eq!(
            refusal(Some(403), Some("DATA_TOO_LARGE")),
            Outcome::Rejected
        );
        assert_eq!(refusal(Some(404), None), Outcome::ConfigurationGone);
        for status in [400, 405, 409, 411, 413, 415] {
            assert_eq!(refusal(Some(status), None), Outcome::Rejected, "{status}");
        }
        assert_eq!(refusal(None, None), Outcome::Rejected, "unreadable answer");
    }
}
