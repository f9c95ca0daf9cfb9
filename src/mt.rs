//! The MT (downlink) path: a datagram an LwM2M server sent to a device's socket is screened and
//! admitted ([`admission`], sans-IO), made durable ([`durable`]) and handed to the device's
//! flusher ([`flusher`]), which delivers it through T8 when the device can take it. [`Downlinks`]
//! is the handle the sockets, the callback server and the admin API use to change a queue; every
//! change is mirrored in the store.

pub(crate) mod admission;
pub(crate) mod durable;
pub(crate) mod flusher;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::delivery::QueueEffect;
use crate::devices::Device;
use crate::metrics::Metrics;
use crate::queue::{DropReason, QueueLimits, QueuedDatagram};
use crate::t8::DeliveryStatus;
use admission::{Admitted, MtRefusal};
use durable::MtStore;

/// The MT queues' handle: admission of new datagrams and every later change to a queue.
pub(crate) struct Downlinks {
    /// Addresses of the configured LwM2M servers, by server index.
    servers: Arc<[SocketAddr]>,
    default_max_packet_bytes: usize,
    store: MtStore,
    limits: QueueLimits,
    metrics: Arc<Metrics>,
}

impl Downlinks {
    pub(crate) fn new(
        servers: Arc<[SocketAddr]>,
        default_max_packet_bytes: usize,
        store: MtStore,
        limits: QueueLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            servers,
            default_max_packet_bytes,
            store,
            limits,
            metrics,
        }
    }

    /// One datagram that arrived on a device's socket: dropped (counted), suppressed as a
    /// retransmission (counted), or queued durably and the flusher woken.
    pub(crate) async fn receive(
        &self,
        device: &Device,
        datagram: Vec<u8>,
        from: SocketAddr,
        now_ms: u64,
    ) {
        let limit = device
            .state()
            .max_packet_bytes(self.default_max_packet_bytes);
        let screened = match admission::screen(&self.servers, from, &datagram, limit) {
            Ok(screened) => screened,
            Err(refusal) => {
                self.metrics.drop_datagram("mt", refusal.label());
                match refusal {
                    MtRefusal::Oversized { .. } => {
                        tracing::warn!(device = %device.id, %refusal, "dropped MT datagram")
                    }
                    _ => tracing::debug!(device = %device.id, %refusal, "dropped MT datagram"),
                }
                return;
            }
        };
        let length = datagram.len() as u64;
        let item = admission::queue_entry(
            self.store.next_seq(),
            &screened,
            from,
            datagram,
            &self.limits,
            now_ms,
        );
        let persisted = item.clone();
        let admitted = {
            let mut state = device.state();
            let admitted = admission::admit(&mut state, &screened, item, &self.limits, now_ms);
            if let Admitted::Queued(admission) = &admitted {
                // Written under the device lock so the flusher can never remove it first.
                if admission.accepted
                    && let Err(error) = self.store.put(&device.id, &persisted)
                {
                    tracing::error!(device = %device.id, %error, "cannot persist an MT datagram");
                }
                for (dropped, _) in &admission.dropped {
                    if let Err(error) = self.store.remove(&device.id, dropped.seq) {
                        tracing::error!(device = %device.id, %error, "cannot remove a dropped MT datagram");
                    }
                }
            }
            admitted
        };
        let admission = match admitted {
            Admitted::Suppressed => {
                self.metrics.suppressed_retransmissions.inc();
                self.metrics.airtime_saved_bytes.inc_by(length);
                tracing::debug!(device = %device.id, mid = screened.view.message_id, "server retransmission of queued MT suppressed");
                return;
            }
            Admitted::Queued(admission) => admission,
        };
        self.count_drops(admission.dropped.iter().map(|(_, reason)| *reason));
        if !admission.accepted {
            return;
        }
        self.metrics.mt_datagrams.inc();
        self.metrics.mt_bytes.inc_by(length);
        self.metrics.count_coap("mt", screened.view.oscore);
        self.metrics.mt_queue_accepted.inc();
        // Accepted means durable: flushed before the flusher is told.
        if let Err(error) = self.store.flush().await {
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
    pub(crate) fn record_drops(&self, device: &Device, dropped: Vec<(QueuedDatagram, DropReason)>) {
        for (item, reason) in &dropped {
            tracing::debug!(device = %device.id, seq = item.seq, reason = reason.label(), "MT datagram dropped from the queue");
            if let Err(error) = self.store.remove(&device.id, item.seq) {
                tracing::error!(device = %device.id, %error, "cannot remove a dropped MT datagram");
            }
        }
        self.count_drops(dropped.into_iter().map(|(_, reason)| reason));
    }

    /// Mirrors a queue change in the store (called with the device lock held).
    pub(crate) fn apply(&self, device: &Device, effect: &QueueEffect) {
        let result = match effect {
            QueueEffect::Remove(seq) => self.store.remove(&device.id, *seq),
            QueueEffect::Persist(item) => self.store.put(&device.id, item),
            QueueEffect::Keep => Ok(()),
        };
        if let Err(error) = result {
            tracing::error!(device = %device.id, %error, "cannot update the MT queue in the store");
        }
    }

    /// A delivery-status notification for a delivery pending at the SCEF settles its entry.
    pub(crate) fn settle(
        &self,
        device: &Device,
        delivery: &str,
        status: &DeliveryStatus,
        retry_at: Option<Instant>,
        now: Instant,
    ) {
        let effect = {
            let mut state = device.state();
            let effect = state.mt.on_delivery_status(delivery, status, retry_at, now);
            self.apply(device, &effect);
            effect
        };
        if effect != QueueEffect::Keep {
            device.wake.notify_one();
        }
    }

    /// Drops every datagram queued for a device (pending ones at the SCEF included), counted as
    /// `purged`; returns how many. The one in flight is left to its T8 answer, so it is never
    /// counted both purged and delivered.
    pub(crate) async fn purge(&self, device: &Device) -> usize {
        let purged = device.state().mt.queue.drain_all();
        let count = purged.len();
        self.record_drops(
            device,
            purged
                .into_iter()
                .map(|item| (item, DropReason::Purged))
                .collect(),
        );
        if let Err(error) = self.store.flush().await {
            tracing::error!(%error, "cannot flush the MT queue");
        }
        count
    }
}
