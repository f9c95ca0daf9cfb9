//! The per-device MT flusher: a thin task that asks the device's `MtState` what to do next and
//! does it — deliver the head of the queue through T8 (paced over all devices), ask the SCEF to
//! wake the device (T8 device triggering), or wait for a wake-up, a new datagram or a timer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock;
use crate::config::{BufferOwner, PsmConfig};
use crate::delivery::{Decision, Outcome, Pacer, instant_of};
use crate::devices::Device;
use crate::metrics::Metrics;
use crate::mt::Downlinks;
use crate::queue::{DropReason, QueuedDatagram};
use crate::t8::{
    DeviceTriggering, DownlinkOutcome, NiddDownlinkDataTransfer, PdnEstablishmentOption, T8Client,
};

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

/// What every device's flusher shares: the queues, the T8 client and the global pacer.
pub(crate) struct Flusher {
    downlinks: Arc<Downlinks>,
    t8: Arc<T8Client>,
    /// Paces MT deliveries over all devices.
    global_pacer: Mutex<Pacer>,
    triggers: TriggerSettings,
    public_url: Url,
    metrics: Arc<Metrics>,
}

impl Flusher {
    pub(crate) fn new(
        downlinks: Arc<Downlinks>,
        t8: Arc<T8Client>,
        global_rate_per_s: f64,
        triggers: TriggerSettings,
        public_url: Url,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            downlinks,
            t8,
            global_pacer: Mutex::new(Pacer::new(global_rate_per_s)),
            triggers,
            public_url,
            metrics,
        }
    }

    /// One device's flusher: carries out `MtState::decide` until cancelled.
    pub(crate) async fn run(self: Arc<Self>, device: Arc<Device>, cancel: CancellationToken) {
        loop {
            let now = clock::now();
            let (decision, dropped) = {
                let mut state = device.state();
                let configured = state.is_configured();
                state.mt.decide(now, clock::unix_ms(), configured)
            };
            self.downlinks.record_drops(&device, dropped);
            match decision {
                Decision::Send(item) => self.deliver(&device, item).await,
                Decision::Trigger => self.send_trigger(&device).await,
                Decision::Wait(until) => {
                    let timer = async {
                        match until {
                            Some(until) => tokio::time::sleep_until(until.into()).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = device.wake.notified() => {}
                        _ = timer => {}
                    }
                }
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
        let slot = self
            .global_pacer
            .lock()
            .map(|mut p| p.reserve(clock::now()))
            .unwrap_or_else(|_| clock::now());
        tokio::time::sleep_until(slot.into()).await;
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
        let metrics = &self.metrics;
        let outcome = match result {
            Ok(DownlinkOutcome::Delivered { status }) => {
                metrics
                    .mt_deliveries
                    .with_label_values(&[status.as_ref().map_or("SUCCESS", |s| s.label())])
                    .inc();
                Outcome::Delivered
            }
            Ok(DownlinkOutcome::Pending { location, status }) => {
                metrics
                    .mt_deliveries
                    .with_label_values(&[status.as_ref().map_or("PENDING", |s| s.label())])
                    .inc();
                Outcome::Pending(location.to_string())
            }
            Ok(DownlinkOutcome::Failed { failure }) => {
                metrics.mt_deliveries.with_label_values(&["FAILED"]).inc();
                tracing::debug!(device = %device.id, cause = ?failure.problem_detail.cause, "SCEF could not deliver; kept for retry");
                Outcome::NotReachable {
                    retry_at: instant_of(
                        failure.requested_retransmission_time.as_deref(),
                        now,
                        clock::system_now(),
                    ),
                }
            }
            Err(error) if error.is_retryable() => {
                tracing::debug!(device = %device.id, %error, "SCEF could not take MT; kept for retry");
                Outcome::Retry {
                    after: error.retry_after(),
                }
            }
            Err(error) => {
                tracing::warn!(device = %device.id, %error, "SCEF refused MT datagram; dropped");
                Outcome::Rejected
            }
        };
        metrics
            .mt_delivery_attempts
            .with_label_values(&[outcome_label(&outcome)])
            .inc();
        match &outcome {
            Outcome::Rejected => metrics
                .mt_queue_dropped
                .with_label_values(&[DropReason::Rejected.label()])
                .inc(),
            Outcome::NotReachable { .. } => metrics
                .reachability_events
                .with_label_values(&["not_reachable"])
                .inc(),
            _ => {}
        }
        let mut state = device.state();
        let effect = state.mt.on_outcome(seq, outcome, now);
        self.downlinks.apply(device, &effect);
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

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Pending(_) => "pending",
        Outcome::NotReachable { .. } => "not_reachable",
        Outcome::Retry { .. } => "retry",
        Outcome::Rejected => "rejected",
    }
}
