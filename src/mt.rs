//! The MT (downlink) path: a datagram an LwM2M server sent to a device's socket is screened and
//! admitted ([`admission`], sans-IO), made durable ([`durable`]) by group commit and then handed
//! to the device's flusher ([`flusher`]), which delivers it through T8 when the device can take
//! it. [`Downlinks`] is the handle the sockets, the callback server and the admin API use to
//! change a queue; every change is mirrored in the store.
//!
//! Group commit: a receive loop never waits for the disk. It writes the datagram to the store
//! and leaves it to [`Downlinks::run_commits`], which flushes once for every change written
//! since its last flush; only then are new datagrams counted as accepted and their flushers
//! woken. Removals (delivered, rejected, dropped) and pending marks (201 BUFFERING) go into the
//! same commits: each store change gets a [`Generation`], and whoever must not go on before a
//! change is durable (a flusher before its next delivery, a delivery-status callback before
//! its answer) awaits [`Downlinks::durable`]. So a crash resends at most the datagram in flight.

pub(crate) mod admission;
pub(crate) mod durable;
pub(crate) mod flusher;
pub(crate) mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::clock;
use crate::coap;
use crate::config::ServerWaits;
use crate::delivery::{QueueEffect, ScefTimeLimits};
use crate::devices::{Device, DeviceState};
use crate::metrics::Metrics;
use crate::queue::{DropReason, QueueLimits, QueuedDatagram, Stored};
use crate::store::StoreError;
use crate::t8::DeliveryStatus;
use admission::{Admitted, MtRefusal};
use durable::MtStore;

/// How long the committer waits before flushing again after a failed flush.
const COMMIT_RETRY: Duration = Duration::from_millis(100);

/// The number of a store change, in the order changes were written; a commit makes every
/// change up to some generation durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Generation(u64);

/// A flush of the MT queue failed; what it covered waits for the next one.
#[derive(Debug, thiserror::Error)]
#[error("the MT queue could not be flushed")]
pub(crate) struct CommitFailed;

/// Whether a server's request is acknowledged on the device's behalf, and when.
enum Acknowledgement {
    None,
    /// A retransmission of a request acknowledged (and durable) already: ACK again now.
    Now,
    /// A new request: its ACK goes out once the commit made it durable.
    WhenDurable,
}

/// A datagram written to the store and waiting for the next flush to count as accepted.
struct Uncommitted {
    device: Arc<Device>,
    seq: u64,
    bytes: u64,
    oscore: bool,
    /// The empty ACK to send its server on the device's behalf once it is durable.
    acknowledgement: Option<(SocketAddr, [u8; 4])>,
}

/// The MT queues' handle: admission of new datagrams and every later change to a queue.
pub(crate) struct Downlinks {
    /// Addresses of the configured LwM2M servers, by server index.
    servers: Arc<[SocketAddr]>,
    /// How long each server waits for an answer (`[[lwm2m_servers]]` waits), by server index.
    waits: Arc<[ServerWaits]>,
    default_max_packet_bytes: usize,
    store: MtStore,
    limits: QueueLimits,
    /// How far ahead the SCEF's retry and availability times are believed.
    pub(crate) scef_times: ScefTimeLimits,
    metrics: Arc<Metrics>,
    uncommitted: Mutex<Vec<Uncommitted>>,
    commit_due: Notify,
    /// Generation of the last store change written (not necessarily durable).
    written: AtomicU64,
    /// Generation up to which every change is durable.
    durable: watch::Sender<u64>,
    /// Cancels at the SCEF a delivery still pending there (201) whose datagram was dropped.
    pending_canceller: std::sync::OnceLock<PendingCanceller>,
}

/// Asks the SCEF to drop a pending delivery (DELETE on its resource); wired in `bridge` to the
/// T8 client (`mt` does not reach the SCEF itself outside the flusher).
pub(crate) type PendingCanceller = Arc<dyn Fn(&Device, Url) + Send + Sync>;

impl Downlinks {
    pub(crate) fn new(
        servers: Arc<[SocketAddr]>,
        waits: Arc<[ServerWaits]>,
        default_max_packet_bytes: usize,
        store: MtStore,
        limits: QueueLimits,
        scef_times: ScefTimeLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            servers,
            waits,
            default_max_packet_bytes,
            store,
            limits,
            scef_times,
            metrics,
            uncommitted: Mutex::new(Vec::new()),
            commit_due: Notify::new(),
            written: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            pending_canceller: std::sync::OnceLock::new(),
        }
    }

    /// Sets who cancels pending deliveries of dropped datagrams (once; later calls are ignored).
    pub(crate) fn set_pending_canceller(&self, canceller: PendingCanceller) {
        let _ = self.pending_canceller.set(canceller);
    }

    /// Notes a store change just written and asks for a commit; returns its generation.
    fn written(&self) -> Generation {
        let generation = self.written.fetch_add(1, Ordering::SeqCst) + 1;
        self.commit_due.notify_one();
        Generation(generation)
    }

    /// Waits until the change of `generation` (and every one before it) is durable.
    pub(crate) async fn durable(&self, generation: Generation) {
        let mut durable = self.durable.subscribe();
        // The sender lives as long as `self`, so this only ends when the change is durable.
        let _ = durable.wait_for(|done| *done >= generation.0).await;
    }

    fn has_unflushed_changes(&self) -> bool {
        self.written.load(Ordering::SeqCst) > *self.durable.borrow()
    }

    /// One datagram that arrived on a device's socket: dropped (counted), suppressed as a
    /// retransmission (counted), or written to the store for the next group commit, which
    /// counts it as accepted and wakes the flusher. Never waits for the disk. Returns the
    /// empty ACK to send back to `from` at once, when a retransmission of a request the bridge
    /// acknowledged on the device's behalf shows the server missed that ACK; a new request's
    /// ACK goes out with its commit.
    pub(crate) fn receive(
        &self,
        device: &Arc<Device>,
        datagram: Vec<u8>,
        from: SocketAddr,
        now_ms: u64,
    ) -> Option<[u8; 4]> {
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
                return None;
            }
        };
        let length = datagram.len() as u64;
        // A request is worth carrying only while its server waits for the answer.
        let waits = self.waits.get(screened.server).copied();
        let request_timeout = screened
            .view
            .is_request()
            .then(|| waits.map(|w| w.request_timeout))
            .flatten();
        let item = admission::queue_entry(
            self.store.next_seq(),
            &screened,
            from,
            datagram,
            &self.limits,
            (now_ms, request_timeout),
        );
        let seq = item.seq;
        let separate_wait = waits.map_or(Duration::ZERO, |w| w.separate_response_timeout);
        let (admitted, acknowledgement) = {
            let mut state = device.state();
            let now = clock::now();
            let admitted =
                admission::admit(&mut state, &screened, item, &self.limits, (now, now_ms));
            if let Admitted::Queued(admission) = &admitted {
                for (dropped, _) in &admission.dropped {
                    self.remove_dropped(device, dropped);
                }
            }
            let acknowledgement = self.acknowledge_on_behalf(
                &mut state,
                &screened,
                from,
                (seq, &admitted),
                (separate_wait, now, now_ms),
            );
            (admitted, acknowledgement)
        };
        let (ack_now, ack_at_commit) = match acknowledgement {
            Acknowledgement::None => (None, None),
            Acknowledgement::Now => (Some(coap::empty_ack(screened.view.message_id)), None),
            Acknowledgement::WhenDurable => (
                None,
                Some((from, coap::empty_ack(screened.view.message_id))),
            ),
        };
        let admission = match admitted {
            Admitted::Suppressed { .. } => {
                self.metrics.suppressed_retransmissions.inc();
                self.metrics.airtime_saved_bytes.inc_by(length);
                tracing::debug!(device = %device.id, mid = screened.view.message_id, "server retransmission of queued MT suppressed");
                return ack_now;
            }
            Admitted::AlreadyCarried(outcome) => {
                self.metrics.suppressed_retransmissions.inc();
                self.metrics.airtime_saved_bytes.inc_by(length);
                self.metrics
                    .exchange_decisions
                    .with_label_values(&["mt", outcome])
                    .inc();
                tracing::debug!(device = %device.id, mid = screened.view.message_id, outcome, "MT carried already and still on its way; not carried again");
                return ack_now;
            }
            Admitted::Absorbed(outcome) => {
                self.metrics
                    .exchange_decisions
                    .with_label_values(&["mt", outcome])
                    .inc();
                tracing::debug!(device = %device.id, mid = screened.view.message_id, outcome, "the server answered the bridge's separate response");
                return None;
            }
            Admitted::Queued(admission) => admission,
        };
        self.count_drops(admission.dropped.iter().map(|(_, reason)| *reason));
        if !admission.accepted {
            return None;
        }
        self.uncommitted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Uncommitted {
                device: device.clone(),
                seq,
                bytes: length,
                oscore: screened.view.oscore,
                acknowledgement: ack_at_commit,
            });
        self.commit_due.notify_one();
        None
    }

    /// Whether the server's CON request gets an empty ACK on the sleeping device's behalf
    /// (see [`admission::worth_acknowledging`]); recorded in the device's exchanges, and the
    /// queued request then lives only as long as the server waits for the separate response.
    /// A retransmission of a request acknowledged already is acknowledged again at once.
    fn acknowledge_on_behalf(
        &self,
        state: &mut DeviceState,
        screened: &admission::Screened,
        from: SocketAddr,
        (seq, admitted): (u64, &Admitted),
        (separate_wait, now, now_ms): (Duration, Instant, u64),
    ) -> Acknowledgement {
        let view = screened.view.header();
        if view.kind != coap::Kind::Confirmable || !view.is_request() {
            return Acknowledgement::None;
        }
        let again = state.exchanges.was_acknowledged(from, &view);
        let (queued, when) = match admitted {
            Admitted::Queued(admission) if admission.accepted => {
                (seq, Acknowledgement::WhenDurable)
            }
            Admitted::Suppressed { queued } => {
                // A copy not yet durable is acknowledged with its commit, or on the server's
                // next retransmission: a crash must never leave the server waiting for an
                // answer to a request nobody holds.
                let durable = state
                    .mt
                    .queue
                    .get_mut(*queued)
                    .is_some_and(|e| e.stored == Stored::Durable);
                if !durable {
                    return Acknowledgement::None;
                }
                (*queued, Acknowledgement::Now)
            }
            Admitted::AlreadyCarried(_) if again => (seq, Acknowledgement::Now),
            _ => return Acknowledgement::None,
        };
        let outcome = if again {
            "acknowledged_again"
        } else {
            if !admission::worth_acknowledging(state, separate_wait, now) {
                return Acknowledgement::None;
            }
            let Some(entry) = state.mt.queue.get_mut(queued) else {
                return Acknowledgement::None;
            };
            admission::shorten_to_separate_wait(entry, now_ms + separate_wait.as_millis() as u64);
            state.exchanges.acknowledge(from, &view, now);
            "acknowledged_on_behalf"
        };
        self.metrics
            .exchange_decisions
            .with_label_values(&["mt", outcome])
            .inc();
        when
    }

    /// Flushes the store once for every change written since the last flush, then counts the
    /// new datagrams among them as accepted, wakes their flushers and releases whoever awaits
    /// [`durable`](Self::durable). Returns how many datagrams were accepted; after a failed
    /// flush nothing is, and everything waits for the next one.
    pub(crate) async fn commit(&self) -> Result<usize, CommitFailed> {
        // Read before the flush: every change up to it was written before the flush starts.
        let target = self.written.load(Ordering::SeqCst);
        let batch = std::mem::take(
            &mut *self
                .uncommitted
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if batch.is_empty() && target <= *self.durable.borrow() {
            return Ok(0);
        }
        // Written here, not on arrival: under overload most newcomers are pushed out again
        // before their commit and never cost the store a write and a removal.
        let started = crate::clock::now();
        let batch = self.write_batch(batch);
        let flushed = self.store.flush().await;
        self.metrics
            .mt_queue_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = flushed {
            self.metrics.store_error("mt_flush");
            tracing::error!(%error, waiting = batch.len(), "cannot flush the MT queue; retrying");
            let mut uncommitted = self
                .uncommitted
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let newer = std::mem::replace(&mut *uncommitted, batch);
            uncommitted.extend(newer);
            return Err(CommitFailed);
        }
        self.metrics.mt_queue_commits.inc();
        self.durable.send_if_modified(|done| {
            let advanced = target > *done;
            *done = (*done).max(target);
            advanced
        });
        let mut accepted = 0;
        for datagram in &batch {
            {
                let mut state = datagram.device.state();
                match state.mt.queue.get_mut(datagram.seq) {
                    Some(entry) if entry.stored == Stored::Written => {
                        entry.stored = Stored::Durable
                    }
                    // Dropped (expired, purged, overflow) since it was written: durable and
                    // gone, counted where it was dropped.
                    _ => continue,
                }
            }
            accepted += 1;
            self.metrics.mt_datagrams.inc();
            self.metrics.mt_bytes.inc_by(datagram.bytes);
            self.metrics.count_coap("mt", datagram.oscore);
            self.metrics.mt_queue_accepted.inc();
            datagram.device.wake.ring();
            if let Some((server, ack)) = datagram.acknowledgement {
                // Its deadline was shortened: the flusher re-arms its timer on the wake above.
                if let Err(error) = datagram.device.socket.send_to(&ack, server).await {
                    tracing::warn!(device = %datagram.device.id, %error, "cannot send the empty ACK to the server");
                }
            }
        }
        Ok(accepted)
    }

    /// Writes each datagram of `batch` still queued to the store (under its device's lock, so
    /// a drop in between sees where it is); one the store refuses is taken out of the queue
    /// and dropped (`store_error`), never counted as accepted. Returns what was written (and
    /// what a failed flush had written before), to be counted once flushed.
    fn write_batch(&self, batch: Vec<Uncommitted>) -> Vec<Uncommitted> {
        let mut kept = Vec::with_capacity(batch.len());
        for datagram in batch {
            let mut state = datagram.device.state();
            let Some(entry) = state.mt.queue.get_mut(datagram.seq) else {
                continue;
            };
            if entry.stored != Stored::Not {
                drop(state);
                kept.push(datagram);
                continue;
            }
            match self.store.put(&datagram.device.id, entry) {
                Ok(()) => {
                    entry.stored = Stored::Written;
                    drop(state);
                    kept.push(datagram);
                }
                Err(error) => {
                    state.mt.queue.remove(datagram.seq);
                    drop(state);
                    self.metrics.store_error("mt_put");
                    self.metrics.drop_datagram("mt", "store_error");
                    tracing::error!(device = %datagram.device.id, %error, "cannot persist an MT datagram; dropped");
                }
            }
        }
        kept
    }

    /// The group committer: commits whenever changes were written, until cancelled; then
    /// once more, so nothing written is left uncounted.
    pub(crate) async fn run_commits(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = self.commit().await;
                    // Nobody waits for a commit that will not come: the bridge's final flush,
                    // after every task stopped, makes the rest durable.
                    self.durable.send_replace(u64::MAX);
                    return;
                }
                _ = self.commit_due.notified() => {}
            }
            let waiting = self.has_unflushed_changes()
                || !self
                    .uncommitted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .is_empty();
            if waiting && self.commit().await.is_err() {
                // Try again shortly, without waiting for new changes.
                tokio::time::sleep(COMMIT_RETRY).await;
                self.commit_due.notify_one();
            }
        }
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
            self.remove_dropped(device, item);
            // Still waiting at the SCEF: it would reach the device after all when it wakes.
            if let (Some(location), Some(cancel)) = (&item.pending, self.pending_canceller.get()) {
                match Url::parse(location) {
                    Ok(location) => cancel(device, location),
                    Err(error) => {
                        tracing::warn!(device = %device.id, %error, "a pending delivery's location is not a URL; not cancelled")
                    }
                }
            }
        }
        self.count_drops(dropped.into_iter().map(|(_, reason)| reason));
    }

    /// Removes a dropped datagram from the store, in the next commit; one dropped before its
    /// first commit never reached the store and costs it nothing.
    fn remove_dropped(&self, device: &Device, item: &QueuedDatagram) {
        if item.stored == Stored::Not {
            return;
        }
        match self.store.remove(&device.id, item.seq) {
            Ok(()) => {
                self.written();
            }
            Err(error) => {
                self.metrics.store_error("mt_remove");
                tracing::error!(device = %device.id, %error, "cannot remove a dropped MT datagram");
            }
        }
    }

    /// Writes every device's queue, as it is in memory, into the store again (after the store
    /// reopened its database: what the failed one did not flush is gone). Under each device's
    /// lock, so no change to a queue is lost in between.
    pub(crate) fn rewrite(
        &self,
        devices: impl Iterator<Item = Arc<Device>>,
    ) -> Result<(), StoreError> {
        self.store.rewrite(|snapshot| {
            for device in devices {
                let state = device.state();
                // Entries still waiting for their first commit are written by it.
                for entry in state
                    .mt
                    .queue
                    .entries()
                    .filter(|entry| entry.stored != Stored::Not)
                {
                    snapshot.put(&device.id, entry)?;
                }
            }
            Ok(())
        })
    }

    /// Mirrors a queue change in the store (called with the device lock held); the change is
    /// durable once [`durable`](Self::durable) of the returned generation is.
    pub(crate) fn apply(&self, device: &Device, effect: &QueueEffect) -> Option<Generation> {
        let result = match effect {
            QueueEffect::Remove(seq) => self.store.remove(&device.id, *seq),
            QueueEffect::Persist(item) => self.store.put(&device.id, item),
            QueueEffect::Keep => return None,
        };
        match result {
            Ok(()) => Some(self.written()),
            Err(error) => {
                self.metrics.store_error("mt_update");
                tracing::error!(device = %device.id, %error, "cannot update the MT queue in the store");
                None
            }
        }
    }

    /// A delivery-status notification for a delivery pending at the SCEF settles its entry;
    /// returns once that is durable, so the SCEF is answered only for what a crash keeps.
    pub(crate) async fn settle(
        &self,
        device: &Device,
        delivery: &str,
        status: &DeliveryStatus,
        retry_at: Option<Instant>,
        now: Instant,
    ) {
        let change = {
            let mut state = device.state();
            let settled = state
                .mt
                .queue
                .pending_at(delivery)
                .map(|entry| (entry.source, entry.data.clone()));
            let effect = state.mt.on_delivery_status(delivery, status, retry_at, now);
            if let (QueueEffect::Remove(_), Some((source, data))) = (&effect, settled) {
                // Delivered now: on its way to the device's answer, and known received when
                // the device acknowledged it (RDS).
                let handover = crate::delivery::handover_of(Some(status));
                state.exchanges.carried(source, &data, handover, now);
            }
            self.apply(device, &effect)
        };
        if let Some(generation) = change {
            device.wake.ring();
            self.durable(generation).await;
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
        let generation = Generation(self.written.load(Ordering::SeqCst));
        self.durable(generation).await;
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;

    use crate::devices::DeviceState;

    use crate::socket::DeviceSocket;
    use crate::store::Store;

    const SERVER: &str = "127.0.0.1:5683";

    fn downlinks(store: &Store, metrics: &Arc<Metrics>) -> Arc<Downlinks> {
        downlinks_holding(64, store, metrics)
    }

    /// Downlinks whose queues hold at most `max_datagrams` (drop oldest).
    fn downlinks_holding(
        max_datagrams: usize,
        store: &Store,
        metrics: &Arc<Metrics>,
    ) -> Arc<Downlinks> {
        let limits = QueueLimits {
            max_datagrams,
            max_bytes: 64 * 1024,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        };
        Arc::new(Downlinks::new(
            Arc::from(vec![SERVER.parse::<SocketAddr>().unwrap()]),
            Arc::from(vec![crate::config::ServerProfile::default().waits()]),
            1358,
            MtStore::open(store).unwrap(),
            limits,
            ScefTimeLimits::from_config(&crate::config::PsmConfig::default()),
            metrics.clone(),
        ))
    }

    fn device() -> Arc<Device> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = DeviceState::default();
        Arc::new(Device::new(
            "123@iot.example".parse().unwrap(),
            None,
            "token".into(),
            Arc::new(DeviceSocket::from_std(socket).unwrap()),
            false,
            state,
        ))
    }

    /// CON GET /3/0/0 with message ID `mid`.
    fn read(mid: u16) -> Vec<u8> {
        let [high, low] = mid.to_be_bytes();
        vec![0x40, 0x01, high, low, 0xb1, b'3', 0x01, b'0', 0x01, b'0']
    }

    #[tokio::test]
    async fn one_flush_commits_every_datagram_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();
        for mid in 1..=20 {
            downlinks.receive(&device, read(mid), from, 1_000);
        }
        // Written and queued, but not yet durable: not counted as accepted.
        assert_eq!(device.state().mt.queue.len(), 20);
        assert_eq!(metrics.mt_queue_accepted.get(), 0);
        assert_eq!(downlinks.commit().await.unwrap(), 20);
        assert_eq!(
            metrics.mt_queue_commits.get(),
            1,
            "one flush for all twenty"
        );
        assert_eq!(metrics.mt_queue_accepted.get(), 20);
        assert_eq!(metrics.mt_datagrams.get(), 20);
        tokio::time::timeout(Duration::from_secs(5), device.wake.rung())
            .await
            .expect("the flusher is woken once they are durable");
        assert_eq!(
            downlinks.commit().await.unwrap(),
            0,
            "nothing left to commit"
        );
        assert_eq!(metrics.mt_queue_commits.get(), 1);
        // Durable: a store opened again holds them.
        drop(downlinks);
        let reopened = MtStore::open(&store).unwrap().load().unwrap();
        assert_eq!(reopened["123@iot.example"].len(), 20);
    }

    #[tokio::test]
    async fn a_sleeping_devices_request_is_acknowledged_for_it_once_durable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = server.local_addr().unwrap();
        // Waits 15 s for a separate response after an empty ACK (Wakaama).
        let waits = crate::config::ServerProfile::Wakaama.waits();
        let downlinks = Downlinks::new(
            Arc::from(vec![from]),
            Arc::from(vec![waits]),
            1358,
            MtStore::open(&store).unwrap(),
            QueueLimits::from_config(&crate::config::PsmConfig::default()),
            ScefTimeLimits::from_config(&crate::config::PsmConfig::default()),
            metrics.clone(),
        );
        let acknowledged = |outcome: &str| {
            metrics
                .exchange_decisions
                .with_label_values(&["mt", outcome])
                .get()
        };
        // Asleep for 1 s after a 2 s window; it wakes every 10 s: back 7 s from now.
        let device = device();
        {
            let mut state = device.state();
            state.mt.reachability = crate::reachability::Reachability::with_queue_mode(
                Duration::from_secs(2),
                crate::reachability::QueueMode::On,
            )
            .with_wake_period(Some(Duration::from_secs(10)));
            state
                .mt
                .reachability
                .on_uplink(clock::now() - Duration::from_secs(3));
        }
        assert_eq!(downlinks.receive(&device, read(1), from, 1_000), None);
        assert_eq!(acknowledged("acknowledged_on_behalf"), 1);
        let entry = device.state().mt.queue.entries().next().unwrap().clone();
        assert_eq!(
            entry.expires_at_ms,
            1_000 + 15_000,
            "the server's separate wait"
        );
        assert!(entry.server_deadline);
        // The ACK leaves with the commit, from the device's socket.
        downlinks.commit().await.unwrap();
        let mut buffer = [0u8; 16];
        let (length, source) =
            tokio::time::timeout(Duration::from_secs(5), server.recv_from(&mut buffer))
                .await
                .expect("the empty ACK")
                .unwrap();
        assert_eq!(&buffer[..length], &coap::empty_ack(1));
        assert_eq!(source, device.socket.local_addr());
        // The server missed it and retransmits: acknowledged again at once.
        assert_eq!(
            downlinks.receive(&device, read(1), from, 2_000),
            Some(coap::empty_ack(1))
        );
        assert_eq!(acknowledged("acknowledged_again"), 1);

        // Expected back only after the server's wait: no ACK, the server keeps retransmitting.
        let late = self::device();
        {
            let mut state = late.state();
            state.mt.reachability = crate::reachability::Reachability::with_queue_mode(
                Duration::from_secs(2),
                crate::reachability::QueueMode::On,
            )
            .with_wake_period(Some(Duration::from_secs(60)));
            state
                .mt
                .reachability
                .on_uplink(clock::now() - Duration::from_secs(3));
        }
        assert_eq!(downlinks.receive(&late, read(2), from, 1_000), None);
        // An awake device answers itself.
        let awake = self::device();
        awake.state().mt.reachability.on_uplink(clock::now());
        assert_eq!(downlinks.receive(&awake, read(3), from, 1_000), None);
        downlinks.commit().await.unwrap();
        assert_eq!(acknowledged("acknowledged_on_behalf"), 1);
        // Sent within the commit, so already in the server's buffer if it had been sent.
        assert!(server.try_recv_from(&mut buffer).is_err(), "no other ACK");
    }

    #[tokio::test]
    async fn the_committer_commits_as_datagrams_arrive_and_once_more_when_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let cancel = CancellationToken::new();
        let committer = tokio::spawn(downlinks.clone().run_commits(cancel.clone()));
        let from: SocketAddr = SERVER.parse().unwrap();
        downlinks.receive(&device, read(1), from, 1_000);
        tokio::time::timeout(Duration::from_secs(5), device.wake.rung())
            .await
            .expect("committed and woken without anyone asking");
        assert_eq!(metrics.mt_queue_accepted.get(), 1);
        // Suppressed retransmissions and drops are never committed.
        downlinks.receive(&device, read(1), from, 1_000);
        downlinks.receive(&device, vec![0xff], from, 1_000);
        downlinks.receive(&device, read(2), "127.0.0.9:5683".parse().unwrap(), 1_000);
        cancel.cancel();
        committer.await.unwrap();
        assert_eq!(metrics.mt_queue_accepted.get(), 1);
        assert_eq!(metrics.suppressed_retransmissions.get(), 1);
        assert_eq!(
            metrics
                .dropped_datagrams
                .with_label_values(&["mt", "not_coap"])
                .get()
                + metrics
                    .dropped_datagrams
                    .with_label_values(&["mt", "unknown_source"])
                    .get(),
            2
        );
    }

    #[tokio::test]
    async fn a_removal_is_durable_only_after_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();
        downlinks.receive(&device, read(1), from, 1_000);
        downlinks.commit().await.unwrap();
        let seq = {
            let mut state = device.state();
            let seq = state.mt.queue.next_to_send().unwrap().seq;
            state.mt.queue.remove(seq);
            seq
        };
        let removal = downlinks
            .apply(&device, &QueueEffect::Remove(seq))
            .expect("a removal is a store change");
        let waiting = tokio::time::timeout(Duration::from_millis(50), downlinks.durable(removal));
        assert!(waiting.await.is_err(), "not durable before a commit");
        assert_eq!(downlinks.commit().await.unwrap(), 0, "no new datagram");
        assert_eq!(
            metrics.mt_queue_commits.get(),
            2,
            "but a flush of the removal"
        );
        tokio::time::timeout(Duration::from_secs(5), downlinks.durable(removal))
            .await
            .expect("durable after the commit");
        assert_eq!(downlinks.apply(&device, &QueueEffect::Keep), None);
        assert!(MtStore::open(&store).unwrap().load().unwrap().is_empty());
    }

    #[tokio::test]
    async fn waiters_are_released_when_the_committer_stops() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let cancel = CancellationToken::new();
        cancel.cancel();
        downlinks.clone().run_commits(cancel).await;
        let late = downlinks
            .apply(&device, &QueueEffect::Remove(7))
            .expect("a store change");
        tokio::time::timeout(Duration::from_secs(5), downlinks.durable(late))
            .await
            .expect("a change after the last commit does not block shutdown");
    }

    fn faulty_store(
        dir: &std::path::Path,
        metrics: &Arc<Metrics>,
    ) -> (Store, crate::store::StoreFaults) {
        let faults = crate::store::StoreFaults::new();
        let store = Store::open_with(
            dir,
            crate::store::StoreOptions {
                metrics: Some(metrics.clone()),
                faults: Some(faults.clone()),
            },
        )
        .unwrap();
        (store, faults)
    }

    #[tokio::test]
    async fn a_refused_write_is_dropped_and_a_failed_flush_is_not_counted_as_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (store, faults) = faulty_store(dir.path(), &metrics);
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();

        faults.fail_writes(true);
        downlinks.receive(&device, read(1), from, 1_000);
        assert_eq!(device.state().mt.queue.len(), 1, "queued for the commit");
        assert_eq!(downlinks.commit().await.unwrap(), 0);
        assert_eq!(device.state().mt.queue.len(), 0, "taken out of the queue");
        assert_eq!(metrics.mt_queue_accepted.get(), 0);
        assert_eq!(
            metrics
                .dropped_datagrams
                .with_label_values(&["mt", "store_error"])
                .get(),
            1
        );
        assert_eq!(metrics.store_errors.with_label_values(&["mt_put"]).get(), 1);
        assert!(!store.health().healthy);

        faults.fail_writes(false);
        faults.fail_flushes(true);
        downlinks.receive(&device, read(2), from, 1_000);
        assert!(
            downlinks.commit().await.is_err(),
            "not durable, not accepted"
        );
        assert_eq!(metrics.mt_queue_accepted.get(), 0);
        assert_eq!(
            metrics.store_errors.with_label_values(&["mt_flush"]).get(),
            1
        );
        assert_eq!(device.state().mt.queue.len(), 1, "kept for the next flush");

        faults.clear();
        assert_eq!(downlinks.commit().await.unwrap(), 1);
        assert_eq!(metrics.mt_queue_accepted.get(), 1);
        assert!(store.health().healthy);
        assert_eq!(metrics.store_healthy.get(), 1);
    }

    #[tokio::test]
    async fn after_a_reopen_the_queues_are_rewritten_before_anything_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let (store, faults) = faulty_store(dir.path(), &metrics);
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();
        downlinks.receive(&device, read(1), from, 1_000);
        assert_eq!(downlinks.commit().await.unwrap(), 1);

        faults.poison_until_reopened(true);
        faults.fail_flushes(true);
        downlinks.receive(&device, read(2), from, 1_000);
        assert!(downlinks.commit().await.is_err());
        faults.clear();
        assert!(downlinks.commit().await.is_err(), "poisoned until reopened");

        let devices = [device.clone()];
        let rewrite = || downlinks.rewrite(devices.iter().cloned());
        store.recover(&rewrite).await;
        assert_eq!(faults.reopened(), 1);
        assert!(store.health().healthy, "{:?}", store.health());
        assert_eq!(downlinks.commit().await.unwrap(), 1);
        assert_eq!(metrics.mt_queue_accepted.get(), 2);
        let stored = MtStore::open(&store).unwrap().load().unwrap();
        assert_eq!(stored["123@iot.example"].len(), 2, "nothing accepted lost");
    }

    #[tokio::test]
    async fn a_datagram_is_sent_only_once_it_is_durable() {
        use crate::delivery::Decision;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks(&store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();
        downlinks.receive(&device, read(1), from, 1_000);
        let decide = || {
            let mut state = device.state();
            state.mt.decide(crate::clock::now(), 1_000, true).0
        };
        assert!(
            !matches!(decide(), Decision::Send(_)),
            "not sent before its commit"
        );
        downlinks.commit().await.unwrap();
        assert!(matches!(decide(), Decision::Send(_)), "sent once durable");
    }

    #[tokio::test]
    async fn a_datagram_pushed_out_before_its_commit_never_reaches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let downlinks = downlinks_holding(2, &store, &metrics);
        let device = device();
        let from: SocketAddr = SERVER.parse().unwrap();
        for mid in 1..=5 {
            downlinks.receive(&device, read(mid), from, 1_000);
        }
        assert_eq!(
            metrics
                .mt_queue_dropped
                .with_label_values(&["overflow"])
                .get(),
            3
        );
        assert_eq!(downlinks.commit().await.unwrap(), 2, "only the two left");
        assert_eq!(metrics.mt_queue_accepted.get(), 2);
        let stored = MtStore::open(&store).unwrap().load().unwrap();
        let mids: Vec<u16> = stored["123@iot.example"]
            .iter()
            .map(|item| item.message_id)
            .collect();
        assert_eq!(mids, [4, 5], "the pushed-out ones were never written");
        // One pushed out after its commit is removed from the store.
        downlinks.receive(&device, read(6), from, 1_000);
        downlinks.commit().await.unwrap();
        let stored = MtStore::open(&store).unwrap().load().unwrap();
        let mids: Vec<u16> = stored["123@iot.example"]
            .iter()
            .map(|item| item.message_id)
            .collect();
        assert_eq!(mids, [5, 6]);
    }
}
