//! The MT queue policy (sans-IO): one device's FIFO of downlink datagrams waiting for a
//! sleeping device or for the SCEF, bounded by count, bytes and age with a counted drop policy.
//! Time comes in as Unix milliseconds. `mt::durable` mirrors it in sled.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::config::{OverflowPolicy, PsmConfig};

/// CoAP NON_LIFETIME (RFC 7252 §4.8.2): a non-confirmable message is stale after it.
const NON_LIFETIME: Duration = Duration::from_secs(145);

/// One queued MT datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QueuedDatagram {
    pub seq: u64,
    /// Index of the LwM2M server that sent it, and its address.
    pub server: usize,
    pub source: SocketAddr,
    pub message_id: u16,
    pub confirmable: bool,
    pub enqueued_at_ms: u64,
    pub expires_at_ms: u64,
    /// `expires_at_ms` is when its server stops waiting for the answer (a request), not the
    /// queue's own limit: dropped then as `server_gave_up`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server_deadline: bool,
    /// `expires_at_ms` is when the device stops waiting for this answer to its request:
    /// dropped then as `device_gave_up`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device_deadline: bool,
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    /// Location of a delivery the SCEF accepted as pending (201); it holds the datagram now.
    pub pending: Option<String>,
    /// How far it is in the store; only a durable entry may be sent, so nothing is delivered
    /// that was never accepted.
    #[serde(skip, default = "loaded_entries_are_durable")]
    pub stored: Stored,
}

/// Where a queued datagram is on its way into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    /// Admitted, waiting for the group commit: not in the store yet, so one dropped now
    /// costs the store nothing.
    Not,
    /// Written by a group commit whose flush has not ended.
    Written,
    /// Flushed (or loaded from the store).
    Durable,
}

fn loaded_entries_are_durable() -> Stored {
    Stored::Durable
}

mod base64_bytes {
    use super::*;
    pub(super) fn serialize<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }
    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        BASE64.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Why a queued datagram was dropped (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    Expired,
    /// A request whose server no longer waits for the answer.
    ServerGaveUp,
    /// An answer the device no longer waits for (its request's MAX_TRANSMIT_WAIT is over).
    DeviceGaveUp,
    Overflow,
    TooLarge,
    Purged,
    Rejected,
}

impl DropReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::ServerGaveUp => "server_gave_up",
            Self::DeviceGaveUp => "device_gave_up",
            Self::Overflow => "overflow",
            Self::TooLarge => "too_large",
            Self::Purged => "purged",
            Self::Rejected => "rejected_by_scef",
        }
    }
}

/// Bounds of one device's queue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct QueueLimits {
    pub max_datagrams: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
    pub overflow: OverflowPolicy,
}

impl QueueLimits {
    pub(crate) fn from_config(psm: &PsmConfig) -> Self {
        Self {
            max_datagrams: psm.queue_max_datagrams,
            max_bytes: psm.queue_max_bytes,
            max_age: Duration::from_secs(psm.queue_max_age_s),
            overflow: psm.overflow,
        }
    }

    /// When a datagram enqueued at `now_ms` expires.
    pub(crate) fn expiry(&self, now_ms: u64, confirmable: bool) -> u64 {
        let age = if confirmable {
            self.max_age
        } else {
            self.max_age.min(NON_LIFETIME)
        };
        now_ms + age.as_millis() as u64
    }
}

/// What admitting a datagram did.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Admission {
    pub accepted: bool,
    pub dropped: Vec<(QueuedDatagram, DropReason)>,
}

/// One device's queue, oldest first. Entries pending at the SCEF stay until their outcome is
/// known but do not count against the bounds: the SCEF holds them. The entry in flight (handed
/// to the SCEF, T8 request outstanding) counts against the bounds but is never dropped for
/// overflow nor for age: its outcome decides what becomes of it, so a datagram is never both
/// dropped and delivered.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeviceQueue {
    entries: VecDeque<QueuedDatagram>,
    /// Sequence number of the entry whose T8 delivery request is outstanding.
    in_flight: Option<u64>,
}

impl DeviceQueue {
    pub(crate) fn from_entries(mut entries: Vec<QueuedDatagram>) -> Self {
        entries.sort_by_key(|e| e.seq);
        Self {
            entries: entries.into(),
            in_flight: None,
        }
    }

    /// Marks `seq` as handed to the SCEF (or, with `None`, its outcome as known).
    pub(crate) fn set_in_flight(&mut self, seq: Option<u64>) {
        self.in_flight = seq;
    }

    pub(crate) fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Whether the queue holds an entry with this sequence number.
    #[cfg(test)]
    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.entries.iter().any(|e| e.seq == seq)
    }

    /// An entry overflow may drop: waiting (not pending at the SCEF) and not in flight.
    /// Brings a queue loaded from the store within `limits`, which may have shrunk since it
    /// was stored: by the overflow policy, the oldest (`drop_oldest`) or newest
    /// (`drop_newest`) waiting entries go; pending ones do not count. Returns what went.
    pub(crate) fn enforce(&mut self, limits: &QueueLimits) -> Vec<(QueuedDatagram, DropReason)> {
        let mut dropped = Vec::new();
        while self.waiting().count() > limits.max_datagrams
            || self.waiting_bytes() > limits.max_bytes
        {
            let candidate = match limits.overflow {
                OverflowPolicy::DropOldest => self.entries.iter().position(|e| self.droppable(e)),
                OverflowPolicy::DropNewest => self.entries.iter().rposition(|e| self.droppable(e)),
            };
            let Some(entry) = candidate.and_then(|index| self.entries.remove(index)) else {
                break;
            };
            dropped.push((entry, DropReason::Overflow));
        }
        dropped
    }

    fn droppable(&self, entry: &QueuedDatagram) -> bool {
        entry.pending.is_none() && Some(entry.seq) != self.in_flight
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every entry, waiting or pending at the SCEF, oldest first (what the store mirrors).
    pub(crate) fn entries(&self) -> impl Iterator<Item = &QueuedDatagram> {
        self.entries.iter()
    }

    /// Datagrams waiting to be sent (not pending at the SCEF).
    pub(crate) fn waiting(&self) -> impl Iterator<Item = &QueuedDatagram> {
        self.entries.iter().filter(|e| e.pending.is_none())
    }

    pub(crate) fn waiting_bytes(&self) -> usize {
        self.waiting().map(|e| e.data.len()).sum()
    }

    pub(crate) fn pending_count(&self) -> usize {
        self.entries.iter().filter(|e| e.pending.is_some()).count()
    }

    pub(crate) fn oldest_enqueued_ms(&self) -> Option<u64> {
        self.waiting().map(|e| e.enqueued_at_ms).min()
    }

    /// A retransmission of something queued or pending (same source, message ID and bytes):
    /// the queued entry's sequence number.
    pub(crate) fn queued_copy(
        &self,
        source: SocketAddr,
        message_id: u16,
        data: &[u8],
    ) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.source == source && e.message_id == message_id && e.data == data)
            .map(|e| e.seq)
    }

    /// Drops expired entries; the one in flight waits for its outcome.
    pub(crate) fn expire(&mut self, now_ms: u64) -> Vec<(QueuedDatagram, DropReason)> {
        let in_flight = self.in_flight;
        let is_expired = |e: &QueuedDatagram| e.expires_at_ms <= now_ms && Some(e.seq) != in_flight;
        // Every admission asks; almost always nothing has expired, and that costs no allocation.
        if !self.entries.iter().any(is_expired) {
            return Vec::new();
        }
        let (expired, kept): (Vec<_>, Vec<_>) = self.entries.drain(..).partition(|e| is_expired(e));
        self.entries = kept.into();
        expired
            .into_iter()
            .map(|e| {
                let reason = if e.server_deadline {
                    DropReason::ServerGaveUp
                } else if e.device_deadline {
                    DropReason::DeviceGaveUp
                } else {
                    DropReason::Expired
                };
                (e, reason)
            })
            .collect()
    }

    /// Adds `item` at the tail, dropping by the limits and the overflow policy. `drop_oldest`
    /// never drops the entry in flight nor one pending at the SCEF: when only those are left,
    /// the newcomer is dropped instead (overflow), so the bounds hold.
    pub(crate) fn admit(
        &mut self,
        item: QueuedDatagram,
        limits: &QueueLimits,
        now_ms: u64,
    ) -> Admission {
        let mut dropped = self.expire(now_ms);
        if item.data.len() > limits.max_bytes {
            dropped.push((item, DropReason::TooLarge));
            return Admission {
                accepted: false,
                dropped,
            };
        }
        loop {
            let count = self.waiting().count();
            let bytes = self.waiting_bytes();
            if count < limits.max_datagrams && bytes + item.data.len() <= limits.max_bytes {
                break;
            }
            match limits.overflow {
                OverflowPolicy::DropNewest => {
                    dropped.push((item, DropReason::Overflow));
                    return Admission {
                        accepted: false,
                        dropped,
                    };
                }
                OverflowPolicy::DropOldest => {
                    let Some(oldest) = self.entries.iter().position(|e| self.droppable(e)) else {
                        dropped.push((item, DropReason::Overflow));
                        return Admission {
                            accepted: false,
                            dropped,
                        };
                    };
                    if let Some(entry) = self.entries.remove(oldest) {
                        dropped.push((entry, DropReason::Overflow));
                    }
                }
            }
        }
        self.entries.push_back(item);
        Admission {
            accepted: true,
            dropped,
        }
    }

    /// The oldest datagram not yet handed to the SCEF, once it is durable (order is kept:
    /// a newer one never overtakes it).
    pub(crate) fn next_to_send(&self) -> Option<&QueuedDatagram> {
        self.waiting()
            .next()
            .filter(|entry| entry.stored == Stored::Durable)
    }

    /// The entry `seq`, if still queued, for the group commit to move it into the store.
    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut QueuedDatagram> {
        self.entries.iter_mut().find(|e| e.seq == seq)
    }

    /// Earliest expiry among entries that can expire (not the one in flight).
    pub(crate) fn next_expiry_ms(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter(|e| Some(e.seq) != self.in_flight)
            .map(|e| e.expires_at_ms)
            .min()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<QueuedDatagram> {
        let index = self.entries.iter().position(|e| e.seq == seq)?;
        if self.in_flight == Some(seq) {
            self.in_flight = None;
        }
        self.entries.remove(index)
    }

    pub(crate) fn mark_pending(&mut self, seq: u64, location: String) -> Option<&QueuedDatagram> {
        let entry = self.entries.iter_mut().find(|e| e.seq == seq)?;
        entry.pending = Some(location);
        Some(entry)
    }

    /// The entry whose pending delivery has this location.
    pub(crate) fn pending_at(&self, location: &str) -> Option<&QueuedDatagram> {
        self.entries
            .iter()
            .find(|e| e.pending.as_deref() == Some(location))
    }

    pub(crate) fn clear_pending(&mut self, seq: u64) -> Option<&QueuedDatagram> {
        let entry = self.entries.iter_mut().find(|e| e.seq == seq)?;
        entry.pending = None;
        Some(entry)
    }

    /// Takes every entry out of the queue except the one in flight, whose outcome decides.
    pub(crate) fn drain_all(&mut self) -> Vec<QueuedDatagram> {
        let in_flight = self.in_flight;
        let (kept, drained): (Vec<_>, Vec<_>) = self
            .entries
            .drain(..)
            .partition(|e| Some(e.seq) == in_flight);
        self.entries = kept.into();
        drained
    }
}

/// A confirmable datagram from server 0 at 127.0.0.1:5683, message ID = `seq`, for tests.
#[cfg(test)]
impl QueuedDatagram {
    pub(crate) fn sample(seq: u64, data: Vec<u8>, now_ms: u64, limits: &QueueLimits) -> Self {
        Self {
            seq,
            server: 0,
            source: SocketAddr::from(([127, 0, 0, 1], 5683)),
            message_id: u16::try_from(seq % 65_536).unwrap_or_default(),
            confirmable: true,
            enqueued_at_ms: now_ms,
            expires_at_ms: limits.expiry(now_ms, true),
            server_deadline: false,
            device_deadline: false,
            data,
            pending: None,
            stored: Stored::Durable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_reloaded_queue_is_brought_within_shrunk_limits() {
        let wide = QueueLimits {
            max_datagrams: 10,
            max_bytes: 10_000,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        };
        let entries: Vec<QueuedDatagram> = (1..=6).map(|seq| item(seq, 10, 0, &wide)).collect();
        for (overflow, kept) in [
            (OverflowPolicy::DropOldest, [4, 5, 6]),
            (OverflowPolicy::DropNewest, [1, 2, 3]),
        ] {
            let mut queue = DeviceQueue::from_entries(entries.clone());
            let narrow = QueueLimits {
                max_datagrams: 3,
                overflow,
                ..wide
            };
            let dropped = queue.enforce(&narrow);
            assert_eq!(dropped.len(), 3);
            assert!(
                dropped
                    .iter()
                    .all(|(_, reason)| *reason == DropReason::Overflow)
            );
            let left: Vec<u64> = queue.entries().map(|e| e.seq).collect();
            assert_eq!(left, kept, "{overflow:?}");
            assert!(queue.enforce(&narrow).is_empty(), "within the limits now");
        }
        // By bytes too.
        let mut queue = DeviceQueue::from_entries(entries);
        let dropped = queue.enforce(&QueueLimits {
            max_bytes: 25,
            ..wide
        });
        assert_eq!(dropped.len(), 4);
    }

    fn item(seq: u64, len: usize, now_ms: u64, limits: &QueueLimits) -> QueuedDatagram {
        QueuedDatagram::sample(seq, vec![0x40; len], now_ms, limits)
    }

    fn limits(overflow: OverflowPolicy) -> QueueLimits {
        QueueLimits {
            max_datagrams: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(247),
            overflow,
        }
    }

    #[test]
    fn fifo_with_drop_oldest() {
        let l = limits(OverflowPolicy::DropOldest);
        let mut q = DeviceQueue::default();
        for seq in 1..=4 {
            let admission = q.admit(item(seq, 10, 0, &l), &l, 0);
            assert!(admission.accepted);
        }
        assert_eq!(
            q.waiting().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(q.next_to_send().map(|e| e.seq), Some(2));
    }

    #[test]
    fn drop_newest_refuses_and_bytes_bound() {
        let l = limits(OverflowPolicy::DropNewest);
        let mut q = DeviceQueue::default();
        assert!(q.admit(item(1, 60, 0, &l), &l, 0).accepted);
        let refused = q.admit(item(2, 50, 0, &l), &l, 0);
        assert!(!refused.accepted);
        assert_eq!(refused.dropped[0].1, DropReason::Overflow);
        let too_large = q.admit(item(3, 101, 0, &l), &l, 0);
        assert_eq!(too_large.dropped[0].1, DropReason::TooLarge);
    }

    #[test]
    fn age_limits_follow_coap_lifetimes() {
        let l = limits(OverflowPolicy::DropOldest);
        assert_eq!(l.expiry(0, true), 247_000);
        assert_eq!(l.expiry(0, false), 145_000);
        let mut q = DeviceQueue::default();
        q.admit(item(1, 10, 0, &l), &l, 0);
        assert!(q.expire(246_999).is_empty());
        assert_eq!(q.expire(247_000).len(), 1);
    }

    #[test]
    fn pending_entries_do_not_count_and_are_found_by_location() {
        let l = limits(OverflowPolicy::DropNewest);
        let mut q = DeviceQueue::default();
        for seq in 1..=3 {
            assert!(q.admit(item(seq, 10, 0, &l), &l, 0).accepted);
        }
        q.mark_pending(1, "http://scef/d/1".into());
        assert!(q.admit(item(4, 10, 0, &l), &l, 0).accepted);
        assert_eq!(q.pending_at("http://scef/d/1").map(|e| e.seq), Some(1));
        assert_eq!(q.next_to_send().map(|e| e.seq), Some(2));
        let source = "127.0.0.1:5683".parse().unwrap();
        assert!(q.queued_copy(source, 1, &[0x40; 10]).is_some());
        assert!(q.queued_copy(source, 1, &[0x41; 10]).is_none());
    }

    #[test]
    fn drop_oldest_never_drops_the_entry_in_flight() {
        let l = limits(OverflowPolicy::DropOldest);
        let mut q = DeviceQueue::default();
        for seq in 1..=3 {
            assert!(q.admit(item(seq, 10, 0, &l), &l, 0).accepted);
        }
        q.set_in_flight(Some(1));
        let admission = q.admit(item(4, 10, 0, &l), &l, 0);
        assert!(admission.accepted);
        assert_eq!(
            admission
                .dropped
                .iter()
                .map(|(e, r)| (e.seq, *r))
                .collect::<Vec<_>>(),
            vec![(2, DropReason::Overflow)]
        );
        assert_eq!(
            q.waiting().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 3, 4]
        );
    }

    #[test]
    fn only_undroppable_entries_left_drops_the_newcomer() {
        let l = QueueLimits {
            max_datagrams: 2,
            ..limits(OverflowPolicy::DropOldest)
        };
        let mut q = DeviceQueue::default();
        assert!(q.admit(item(1, 10, 0, &l), &l, 0).accepted);
        assert!(q.admit(item(2, 10, 0, &l), &l, 0).accepted);
        q.mark_pending(1, "http://scef/d/1".into());
        q.set_in_flight(Some(2));
        // Pending does not count: one waiting (in flight), room for one more.
        assert!(q.admit(item(3, 10, 0, &l), &l, 0).accepted);
        q.remove(3);
        let l1 = QueueLimits {
            max_datagrams: 1,
            ..l
        };
        let refused = q.admit(item(4, 10, 0, &l1), &l1, 0);
        assert!(!refused.accepted);
        assert_eq!(refused.dropped.len(), 1);
        assert_eq!(refused.dropped[0].0.seq, 4);
        assert_eq!(refused.dropped[0].1, DropReason::Overflow);
        assert!(q.contains(1) && q.contains(2));
        assert!(q.waiting().count() <= l1.max_datagrams);
    }

    #[test]
    fn expiry_of_the_entry_in_flight_waits_for_its_outcome() {
        let l = limits(OverflowPolicy::DropOldest);
        let mut q = DeviceQueue::default();
        q.admit(item(1, 10, 0, &l), &l, 0);
        q.admit(item(2, 10, 0, &l), &l, 0);
        q.set_in_flight(Some(1));
        let expired = q.expire(247_000);
        assert_eq!(expired.iter().map(|(e, _)| e.seq).collect::<Vec<_>>(), [2]);
        assert!(q.contains(1));
        assert_eq!(q.next_expiry_ms(), None, "the entry in flight has no timer");
        q.set_in_flight(None);
        assert_eq!(q.expire(247_000).len(), 1);
        assert!(q.is_empty());
    }

    #[test]
    fn a_purge_leaves_the_entry_in_flight_to_its_outcome() {
        let l = limits(OverflowPolicy::DropOldest);
        let mut q = DeviceQueue::default();
        q.admit(item(1, 10, 0, &l), &l, 0);
        q.admit(item(2, 10, 0, &l), &l, 0);
        q.set_in_flight(Some(1));
        let purged = q.drain_all();
        assert_eq!(purged.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(q.remove(1).map(|e| e.seq), Some(1));
        assert_eq!(
            q.in_flight(),
            None,
            "removing the entry in flight clears the mark"
        );
    }

    /// One step of the queue's life as the flusher and the sockets drive it.
    #[derive(Debug, Clone)]
    enum Op {
        Admit(usize),
        Send,
        Delivered,
        Retry,
        Pending,
        PendingSettled,
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..50).prop_map(Op::Admit),
            3 => Just(Op::Send),
            2 => Just(Op::Delivered),
            1 => Just(Op::Retry),
            1 => Just(Op::Pending),
            1 => Just(Op::PendingSettled),
            2 => (0u64..40_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Over any admit / send / outcome / expire sequence, every offered datagram ends
        /// exactly once delivered, dropped (with its reason) or still queued.
        #[test]
        fn every_datagram_is_delivered_dropped_or_queued_exactly_once(
            ops in proptest::collection::vec(op(), 1..80),
            max_datagrams in 1usize..4,
            drop_oldest in any::<bool>(),
        ) {
            let l = QueueLimits {
                max_datagrams,
                max_bytes: 100,
                max_age: Duration::from_secs(60),
                overflow: if drop_oldest { OverflowPolicy::DropOldest } else { OverflowPolicy::DropNewest },
            };
            let mut q = DeviceQueue::default();
            let mut now_ms = 0u64;
            let mut offered = 0u64;
            let mut delivered: Vec<u64> = Vec::new();
            let mut dropped: Vec<(u64, DropReason)> = Vec::new();
            for op in ops {
                match op {
                    Op::Admit(len) => {
                        offered += 1;
                        let admission = q.admit(item(offered, len, now_ms, &l), &l, now_ms);
                        dropped.extend(admission.dropped.iter().map(|(e, r)| (e.seq, *r)));
                    }
                    Op::Send => {
                        dropped.extend(q.expire(now_ms).iter().map(|(e, r)| (e.seq, *r)));
                        if q.in_flight().is_none() {
                            let next = q.next_to_send().map(|e| e.seq);
                            q.set_in_flight(next);
                        }
                    }
                    Op::Delivered => {
                        if let Some(seq) = q.in_flight() {
                            prop_assert!(q.remove(seq).is_some(), "the entry in flight is still queued");
                            delivered.push(seq);
                        }
                    }
                    Op::Retry => q.set_in_flight(None),
                    Op::Pending => {
                        if let Some(seq) = q.in_flight() {
                            q.set_in_flight(None);
                            let location = format!("loc{seq}");
                            prop_assert!(q.mark_pending(seq, location).is_some());
                        }
                    }
                    Op::PendingSettled => {
                        let settled = q.entries.iter().find(|e| e.pending.is_some()).map(|e| e.seq);
                        if let Some(seq) = settled {
                            prop_assert!(q.remove(seq).is_some());
                            delivered.push(seq);
                        }
                    }
                    Op::Advance(ms) => now_ms += ms,
                }
                prop_assert!(q.waiting().count() <= max_datagrams);
                prop_assert!(q.waiting_bytes() <= l.max_bytes);
            }
            for seq in 1..=offered {
                let times_delivered = delivered.iter().filter(|s| **s == seq).count();
                let times_dropped = dropped.iter().filter(|(s, _)| *s == seq).count();
                let queued = usize::from(q.contains(seq));
                prop_assert_eq!(times_delivered + times_dropped + queued, 1, "datagram {}", seq);
            }
        }
    }

    proptest! {
        #[test]
        fn bounds_and_order_hold(
            lens in proptest::collection::vec(1usize..60, 1..40),
            max_datagrams in 1usize..6,
            drop_oldest in any::<bool>(),
        ) {
            let l = QueueLimits {
                max_datagrams,
                max_bytes: 120,
                max_age: Duration::from_secs(60),
                overflow: if drop_oldest { OverflowPolicy::DropOldest } else { OverflowPolicy::DropNewest },
            };
            let mut q = DeviceQueue::default();
            let mut accepted = 0;
            let mut dropped = 0;
            for (seq, len) in lens.iter().enumerate() {
                let admission = q.admit(item(seq as u64, *len, 0, &l), &l, 0);
                accepted += usize::from(admission.accepted);
                dropped += admission.dropped.len();
                prop_assert!(q.waiting().count() <= max_datagrams);
                prop_assert!(q.waiting_bytes() <= 120);
                let seqs: Vec<u64> = q.waiting().map(|e| e.seq).collect();
                prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            }
            // Every datagram offered is either queued now or was dropped, counted once.
            prop_assert_eq!(q.len() + dropped, lens.len());
            prop_assert!(accepted >= q.len());
        }
    }
}
