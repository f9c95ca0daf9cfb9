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
    #[serde(with = "base64_bytes")]
    pub data: Vec<u8>,
    /// Location of a delivery the SCEF accepted as pending (201); it holds the datagram now.
    pub pending: Option<String>,
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
    Overflow,
    TooLarge,
    Purged,
    Rejected,
}

impl DropReason {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Expired => "expired",
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
/// known but do not count against the bounds: the SCEF holds them.
#[derive(Debug, Default, Clone)]
pub(crate) struct DeviceQueue {
    entries: VecDeque<QueuedDatagram>,
}

impl DeviceQueue {
    pub(crate) fn from_entries(mut entries: Vec<QueuedDatagram>) -> Self {
        entries.sort_by_key(|e| e.seq);
        Self {
            entries: entries.into(),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
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

    /// A retransmission of something queued or pending: same source, message ID and bytes.
    pub(crate) fn is_retransmission(
        &self,
        source: SocketAddr,
        message_id: u16,
        data: &[u8],
    ) -> bool {
        self.entries
            .iter()
            .any(|e| e.source == source && e.message_id == message_id && e.data == data)
    }

    /// Drops expired entries.
    pub(crate) fn expire(&mut self, now_ms: u64) -> Vec<(QueuedDatagram, DropReason)> {
        let (expired, kept): (Vec<_>, Vec<_>) = self
            .entries
            .drain(..)
            .partition(|e| e.expires_at_ms <= now_ms);
        self.entries = kept.into();
        expired
            .into_iter()
            .map(|e| (e, DropReason::Expired))
            .collect()
    }

    /// Adds `item` at the tail, dropping by the limits and the overflow policy.
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
                    let Some(oldest) = self.entries.iter().position(|e| e.pending.is_none()) else {
                        break;
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

    /// The oldest datagram not yet handed to the SCEF.
    pub(crate) fn next_to_send(&self) -> Option<&QueuedDatagram> {
        self.waiting().next()
    }

    /// Earliest expiry among waiting entries.
    pub(crate) fn next_expiry_ms(&self) -> Option<u64> {
        self.entries.iter().map(|e| e.expires_at_ms).min()
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<QueuedDatagram> {
        let index = self.entries.iter().position(|e| e.seq == seq)?;
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

    pub(crate) fn drain_all(&mut self) -> Vec<QueuedDatagram> {
        self.entries.drain(..).collect()
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
            data,
            pending: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        assert!(q.is_retransmission("127.0.0.1:5683".parse().unwrap(), 1, &[0x40; 10]));
        assert!(!q.is_retransmission("127.0.0.1:5683".parse().unwrap(), 1, &[0x41; 10]));
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
