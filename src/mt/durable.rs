//! The durable MT queue: every accepted downlink datagram mirrored in the sled tree
//! `mt_queue`, keyed by device and sequence number, so nothing accepted is lost on a crash and a
//! restart reloads each device's queue in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::identity::DeviceId;
use crate::queue::QueuedDatagram;
use crate::store::{Store, StoreError, StoreTree};

const MT_QUEUE_TREE: &str = "mt_queue";

/// The sled mirror of every device queue.
#[derive(Clone)]
pub(crate) struct MtStore {
    tree: StoreTree,
    next_seq: Arc<AtomicU64>,
}

impl MtStore {
    pub(crate) fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree(MT_QUEUE_TREE)?;
        // Keys sort by device first, so scan for the highest sequence number.
        let highest = tree
            .entries()?
            .iter()
            .filter_map(|(key, _)| seq_of(key))
            .max()
            .unwrap_or(0);
        Ok(Self {
            tree,
            next_seq: Arc::new(AtomicU64::new(highest + 1)),
        })
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn put(&self, device: &DeviceId, item: &QueuedDatagram) -> Result<(), StoreError> {
        let value = serde_json::to_vec(item).map_err(StoreError::Encode)?;
        self.tree.insert(&key(device, item.seq), value)
    }

    pub(crate) fn remove(&self, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.tree.remove(&key(device, seq))
    }

    /// Makes every accepted datagram durable.
    ///
    /// sled's own `flush_async` hands the flush to sled's thread pool and can miss its wake-up
    /// (sled issue #1241: the future is never woken; under load here group commits stalled for
    /// seconds); the blocking flush on tokio's blocking pool has no such hand-off.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush().await
    }

    /// Every queued datagram, grouped by canonical device id. An entry that cannot be decoded
    /// is quarantined (counted, logged) and the rest loads.
    pub(crate) fn load(&self) -> Result<HashMap<String, Vec<QueuedDatagram>>, StoreError> {
        let mut all: HashMap<String, Vec<QueuedDatagram>> = HashMap::new();
        for (key, value) in self.tree.entries()? {
            let device = key.split(|b| *b == 0).next().unwrap_or_default();
            let device = String::from_utf8_lossy(device).into_owned();
            match serde_json::from_slice::<QueuedDatagram>(&value) {
                Ok(item) => all.entry(device).or_default().push(item),
                Err(error) => {
                    if let Err(store_error) = self.tree.quarantine(&key, &value, &error) {
                        tracing::error!(%device, error = %store_error, "cannot quarantine a corrupt MT queue entry; it is skipped");
                    }
                }
            }
        }
        Ok(all)
    }

    /// Makes the stored queue of `device` exactly `items` (after the store was reopened: what
    /// the failed database did not flush is gone, and removals may not have reached it).
    pub(crate) fn rewrite<'a>(
        &self,
        device: &DeviceId,
        items: impl Iterator<Item = &'a QueuedDatagram>,
    ) -> Result<(), StoreError> {
        let mut kept = HashSet::new();
        for item in items {
            self.put(device, item)?;
            kept.insert(item.seq);
        }
        let mut prefix = device.canonical().as_bytes().to_vec();
        prefix.push(0);
        for stale in self.tree.keys_with_prefix(&prefix)? {
            if seq_of(&stale).is_some_and(|seq| !kept.contains(&seq))
                && stale.len() == prefix.len() + 8
            {
                self.tree.remove(&stale)?;
            }
        }
        Ok(())
    }
}

fn key(device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = device.canonical().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::queue::QueueLimits;
    use std::time::Duration;

    fn item(seq: u64, len: usize) -> QueuedDatagram {
        let limits = QueueLimits {
            max_datagrams: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        };
        QueuedDatagram::sample(seq, vec![0x40; len], 0, &limits)
    }

    #[test]
    fn store_round_trips_and_continues_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        {
            let db = Store::open(dir.path()).unwrap();
            let store = MtStore::open(&db).unwrap();
            let seq = store.next_seq();
            store.put(&id, &item(seq, 5)).unwrap();
            store.put(&id, &item(store.next_seq(), 6)).unwrap();
            store.remove(&id, seq).unwrap();
            db.flush_blocking().unwrap();
        }
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded["a@x"].len(), 1);
        assert_eq!(loaded["a@x"][0].data.len(), 6);
        assert!(store.next_seq() > loaded["a@x"][0].seq);
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::queue::QueueLimits;
    use std::time::Duration;

    fn item(seq: u64) -> QueuedDatagram {
        let limits = QueueLimits {
            max_datagrams: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        };
        QueuedDatagram::sample(seq, vec![0x40; 4], 0, &limits)
    }

    #[test]
    fn a_corrupt_entry_is_quarantined_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let b: DeviceId = "b@x".parse().unwrap();
        store.put(&a, &item(1)).unwrap();
        store.put(&b, &item(3)).unwrap();
        db.tree(MT_QUEUE_TREE)
            .unwrap()
            .insert(&key(&a, 2), b"garbage".to_vec())
            .unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(loaded["a@x"].len(), 1);
        assert_eq!(loaded["b@x"].len(), 1);
        let quarantined = db.quarantined().unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].tree, "mt_queue");
        assert_eq!(quarantined[0].key_hex, hex::encode(key(&a, 2)));
        assert_eq!(quarantined[0].value_hex, hex::encode(b"garbage"));
        // Moved out of the queue tree.
        assert_eq!(store.load().unwrap()["a@x"].len(), 1);
        assert_eq!(db.quarantined().unwrap().len(), 1);
    }

    #[test]
    fn rewrite_makes_the_stored_queue_what_memory_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let b: DeviceId = "b@x".parse().unwrap();
        store.put(&a, &item(1)).unwrap();
        store.put(&a, &item(2)).unwrap();
        store.put(&b, &item(3)).unwrap();
        let memory = [item(2), item(4)];
        store.rewrite(&a, memory.iter()).unwrap();
        let loaded = store.load().unwrap();
        let seqs: Vec<u64> = loaded["a@x"].iter().map(|i| i.seq).collect();
        assert_eq!(seqs, [2, 4]);
        assert_eq!(loaded["b@x"].len(), 1, "other devices untouched");
    }
}
