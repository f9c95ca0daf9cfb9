//! The durable MT queue: every accepted downlink datagram mirrored in the sled tree
//! `mt_queue`, keyed by device and sequence number, so nothing accepted is lost on a crash and a
//! restart reloads each device's queue in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::identity::DeviceId;
use crate::queue::QueuedDatagram;
use crate::store::{Store, StoreError};

const MT_QUEUE_TREE: &str = "mt_queue";

/// The sled mirror of every device queue.
#[derive(Clone)]
pub(crate) struct MtStore {
    tree: sled::Tree,
    next_seq: Arc<AtomicU64>,
}

impl MtStore {
    pub(crate) fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree(MT_QUEUE_TREE)?;
        let last = match tree.last()? {
            Some((key, _)) => seq_of(&key).unwrap_or(0),
            None => 0,
        };
        // Keys sort by device first, so scan for the highest sequence number.
        let mut highest = last;
        for entry in tree.iter() {
            let (key, _) = entry?;
            highest = highest.max(seq_of(&key).unwrap_or(0));
        }
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
        self.tree.insert(key(device, item.seq), value)?;
        Ok(())
    }

    pub(crate) fn remove(&self, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.tree.remove(key(device, seq))?;
        Ok(())
    }

    /// Makes every accepted datagram durable.
    ///
    /// sled's own `flush_async` hands the flush to sled's thread pool and can miss its wake-up
    /// (sled issue #1241: the future is never woken; under load here group commits stalled for
    /// seconds); the blocking flush on tokio's blocking pool has no such hand-off.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let tree = self.tree.clone();
        tokio::task::spawn_blocking(move || tree.flush())
            .await
            .map_err(|e| StoreError::Sled(sled::Error::Io(std::io::Error::other(e))))??;
        Ok(())
    }

    /// Every queued datagram, grouped by canonical device id.
    pub(crate) fn load(&self) -> Result<HashMap<String, Vec<QueuedDatagram>>, StoreError> {
        let mut all: HashMap<String, Vec<QueuedDatagram>> = HashMap::new();
        for entry in self.tree.iter() {
            let (key, value) = entry?;
            let device = key.split(|b| *b == 0).next().unwrap_or_default();
            let device = String::from_utf8_lossy(device).into_owned();
            let item: QueuedDatagram =
                serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                    key: device.clone(),
                    source,
                })?;
            all.entry(device).or_default().push(item);
        }
        Ok(all)
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
