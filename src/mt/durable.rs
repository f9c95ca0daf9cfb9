//! The durable MT queue: every change to a device queue (a datagram put, a pending mark, a
//! removal) is staged in memory and written by the next group commit as one record of the
//! sled tree `mt_log`, so a commit costs the database one insert and one flush however many
//! datagrams it covers. A restart replays the records in order and reloads each device's queue.
//!
//! The log is compacted (its live entries written as one snapshot record replacing every older
//! one, atomically) once it holds several times more changes than live entries, and rewritten
//! from memory after the store reopened its database. A record or an entry that cannot be
//! decoded is quarantined and the rest loads. Stores of earlier versions kept one sled entry per
//! datagram in `mt_queue`; they are moved into the log when opened.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::identity::DeviceId;
use crate::queue::QueuedDatagram;
use crate::store::{Store, StoreError, StoreTree};

const MT_LOG_TREE: &str = "mt_log";
/// Where stores before the log kept one entry per datagram (key: device, 0, sequence).
const LEGACY_QUEUE_TREE: &str = "mt_queue";

/// The log is compacted once it holds this many times more changes than live entries...
const COMPACT_RATIO: usize = 4;
/// ...and at least this many changes, so a small queue is not compacted at every commit.
const COMPACT_MIN_CHANGES: usize = 50_000;

const PUT: u8 = 1;
const REMOVE: u8 = 2;
/// The highest sequence number handed out so far (snapshots keep it; removals leave none).
const SEQUENCE_MARK: u8 = 3;

/// The durable mirror of every device queue.
#[derive(Clone)]
pub(crate) struct MtStore {
    inner: Arc<Inner>,
}

struct Inner {
    tree: StoreTree,
    next_seq: AtomicU64,
    /// Changes staged since the last record, encoded as log entries.
    staged: Mutex<Staged>,
    /// Held while a record is written, so records are written in the order their keys sort and
    /// a snapshot replaces exactly the records before it.
    writer: Mutex<LogState>,
}

#[derive(Default)]
struct Staged {
    entries: Vec<u8>,
    count: usize,
}

#[derive(Default)]
struct LogState {
    /// Changes in the log since the last snapshot.
    changes: usize,
    /// Live entries the last snapshot held.
    live: usize,
}

impl LogState {
    fn needs_compaction(&self) -> bool {
        self.changes >= COMPACT_MIN_CHANGES.max(COMPACT_RATIO * self.live)
    }
}

/// The entries of a snapshot being written; see [`MtStore::rewrite`].
pub(crate) struct Snapshot {
    entries: Vec<u8>,
    live: usize,
}

impl Snapshot {
    pub(crate) fn put(
        &mut self,
        device: &DeviceId,
        item: &QueuedDatagram,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(item).map_err(StoreError::Encode)?;
        encode_put(
            &mut self.entries,
            device.canonical().as_bytes(),
            item.seq,
            &value,
        );
        self.live += 1;
        Ok(())
    }
}

impl MtStore {
    pub(crate) fn open(store: &Store) -> Result<Self, StoreError> {
        let tree = store.tree(MT_LOG_TREE)?;
        let replayed = replay(&tree.entries()?);
        let this = Self {
            inner: Arc::new(Inner {
                tree,
                next_seq: AtomicU64::new(replayed.highest_seq + 1),
                staged: Mutex::new(Staged::default()),
                writer: Mutex::new(LogState {
                    changes: replayed.changes,
                    live: replayed.live.len(),
                }),
            }),
        };
        this.migrate_legacy_queue(store)?;
        Ok(this)
    }

    /// Moves the entries of an earlier version's `mt_queue` tree into the log (one record,
    /// written before the old entries are removed, so a crash in between only repeats it).
    fn migrate_legacy_queue(&self, store: &Store) -> Result<(), StoreError> {
        let legacy = store.tree(LEGACY_QUEUE_TREE)?;
        let entries = legacy.entries()?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut record = Vec::new();
        let mut highest = 0;
        for (key, value) in &entries {
            let split = key.len().checked_sub(9).filter(|at| key[*at] == 0);
            let item = serde_json::from_slice::<QueuedDatagram>(value);
            match (split, item) {
                (Some(at), Ok(item)) => {
                    encode_put(&mut record, &key[..at], item.seq, value);
                    highest = highest.max(item.seq);
                }
                (_, Err(error)) => legacy.quarantine(key, value, &error)?,
                (None, Ok(_)) => legacy.quarantine(key, value, &"not a device and sequence key")?,
            }
        }
        encode_mark(&mut record, highest);
        self.inner
            .next_seq
            .fetch_max(highest + 1, Ordering::Relaxed);
        let migrated = entries.len();
        {
            let mut log = self.writer();
            self.inner
                .tree
                .insert(&self.inner.tree.generate_id()?.to_be_bytes(), record)?;
            log.changes += migrated;
        }
        let mut removal = sled::Batch::default();
        for (key, _) in entries {
            removal.remove(key);
        }
        legacy.apply_batch(removal)?;
        tracing::info!(entries = migrated, "MT queue moved into the MT log");
        Ok(())
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.inner.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Stages `item` (new, or with a changed pending mark) for the next commit.
    pub(crate) fn put(&self, device: &DeviceId, item: &QueuedDatagram) -> Result<(), StoreError> {
        self.inner.tree.check_write()?;
        let value = serde_json::to_vec(item).map_err(StoreError::Encode)?;
        let mut staged = self.staged();
        encode_put(
            &mut staged.entries,
            device.canonical().as_bytes(),
            item.seq,
            &value,
        );
        staged.count += 1;
        Ok(())
    }

    /// Stages the removal of a datagram for the next commit.
    pub(crate) fn remove(&self, device: &DeviceId, seq: u64) -> Result<(), StoreError> {
        self.inner.tree.check_write()?;
        let mut staged = self.staged();
        encode_remove(&mut staged.entries, device.canonical().as_bytes(), seq);
        staged.count += 1;
        Ok(())
    }

    /// Writes every staged change as one record and flushes: every change staged before the
    /// call is durable when it returns `Ok`. A record that cannot be written is staged again,
    /// ahead of what came since.
    ///
    /// sled's own `flush_async` hands the flush to sled's thread pool and can miss its wake-up
    /// (sled issue #1241: the future is never woken; under load here group commits stalled for
    /// seconds); the store's blocking flush on tokio's blocking pool has no such hand-off.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        let compact = self.write_staged()?;
        if compact {
            let this = self.clone();
            let compacted = tokio::task::spawn_blocking(move || this.compact()).await;
            match compacted {
                Ok(Err(error)) => tracing::warn!(%error, "cannot compact the MT log; it grows"),
                Err(error) => tracing::warn!(%error, "MT log compaction stopped"),
                Ok(Ok(())) => {}
            }
        }
        self.inner.tree.flush().await
    }

    /// Writes the staged changes as one record; returns whether the log needs compacting.
    fn write_staged(&self) -> Result<bool, StoreError> {
        let mut log = self.writer();
        let staged = std::mem::take(&mut *self.staged());
        if staged.count == 0 {
            return Ok(log.needs_compaction());
        }
        // Shared, not copied: the bytes are needed again only when the write fails.
        let record = sled::IVec::from(staged.entries);
        let written = self
            .inner
            .tree
            .generate_id()
            .and_then(|id| self.inner.tree.insert(&id.to_be_bytes(), record.clone()));
        if let Err(error) = written {
            let mut now = self.staged();
            let newer = std::mem::take(&mut *now);
            now.entries = record.to_vec();
            now.entries.extend_from_slice(&newer.entries);
            now.count = staged.count + newer.count;
            return Err(error);
        }
        log.changes += staged.count;
        Ok(log.needs_compaction())
    }

    /// Replaces every record by one snapshot of the live entries (under the writer lock, so no
    /// record is written in between).
    fn compact(&self) -> Result<(), StoreError> {
        let mut log = self.writer();
        let records = self.inner.tree.entries()?;
        let replayed = replay(&records);
        let mut snapshot = Vec::new();
        for ((device, seq), value) in &replayed.live {
            encode_put(&mut snapshot, device, *seq, value);
        }
        encode_mark(&mut snapshot, replayed.highest_seq);
        self.replace_log(&records, snapshot)?;
        tracing::debug!(
            changes = log.changes,
            live = replayed.live.len(),
            "MT log compacted"
        );
        log.changes = replayed.live.len();
        log.live = replayed.live.len();
        Ok(())
    }

    /// Writes `snapshot` as a record after every one in `records` and removes those, in one
    /// batch; a record that does not decode stays, for [`load`](Self::load) to quarantine.
    /// Called with the writer lock held.
    fn replace_log(
        &self,
        records: &[(sled::IVec, sled::IVec)],
        snapshot: Vec<u8>,
    ) -> Result<(), StoreError> {
        let key = self.inner.tree.generate_id()?.to_be_bytes();
        let mut batch = sled::Batch::default();
        for (old, record) in records {
            if decode(record).is_ok() {
                batch.remove(old.clone());
            }
        }
        batch.insert(&key, snapshot);
        self.inner.tree.apply_batch(batch)
    }

    /// Every queued datagram, grouped by canonical device id, in sequence order. A record or an
    /// entry that cannot be decoded is quarantined (counted, logged) and the rest loads.
    pub(crate) fn load(&self) -> Result<HashMap<String, Vec<QueuedDatagram>>, StoreError> {
        let _log = self.writer();
        let records = self.inner.tree.entries()?;
        let replayed = replay(&records);
        for (key, value) in records
            .iter()
            .filter(|(key, _)| replayed.corrupt.contains(key))
        {
            self.inner
                .tree
                .quarantine(key, value, &"the MT log record cannot be decoded")?;
        }
        let mut all: HashMap<String, Vec<QueuedDatagram>> = HashMap::new();
        let mut undecodable = 0;
        for ((device, seq), value) in &replayed.live {
            let device_name = String::from_utf8_lossy(device).into_owned();
            match serde_json::from_slice::<QueuedDatagram>(value) {
                Ok(item) => all.entry(device_name).or_default().push(item),
                Err(error) => {
                    undecodable += 1;
                    let mut key = device.clone();
                    key.push(0);
                    key.extend_from_slice(&seq.to_be_bytes());
                    self.inner.tree.quarantine(&key, value, &error)?;
                    // Staged, so the next record drops it from the log.
                    let mut staged = self.staged();
                    encode_remove(&mut staged.entries, device, *seq);
                    staged.count += 1;
                }
            }
        }
        drop(_log);
        if undecodable > 0 {
            self.write_staged()?;
        }
        Ok(all)
    }

    /// Makes the log exactly what `fill` puts into a snapshot (after the store reopened its
    /// database: what the failed one did not flush is gone). `fill` reads each queue under its
    /// device's lock; changes staged meanwhile are written after the snapshot, which repeats
    /// what it already holds and adds what came later.
    pub(crate) fn rewrite(
        &self,
        fill: impl FnOnce(&mut Snapshot) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut log = self.writer();
        let mut snapshot = Snapshot {
            entries: Vec::new(),
            live: 0,
        };
        fill(&mut snapshot)?;
        let highest = self
            .inner
            .next_seq
            .load(Ordering::Relaxed)
            .saturating_sub(1);
        encode_mark(&mut snapshot.entries, highest);
        let records = self.inner.tree.entries()?;
        self.replace_log(&records, snapshot.entries)?;
        log.changes = snapshot.live;
        log.live = snapshot.live;
        Ok(())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.inner
            .staged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

fn encode_put(out: &mut Vec<u8>, device: &[u8], seq: u64, value: &[u8]) {
    encode_remove_like(out, PUT, device, seq);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn encode_remove(out: &mut Vec<u8>, device: &[u8], seq: u64) {
    encode_remove_like(out, REMOVE, device, seq);
}

fn encode_remove_like(out: &mut Vec<u8>, kind: u8, device: &[u8], seq: u64) {
    out.push(kind);
    // Device ids are short (an External Identifier or an NAI); the config refuses long ones.
    out.extend_from_slice(&(device.len() as u16).to_be_bytes());
    out.extend_from_slice(device);
    out.extend_from_slice(&seq.to_be_bytes());
}

fn encode_mark(out: &mut Vec<u8>, seq: u64) {
    out.push(SEQUENCE_MARK);
    out.extend_from_slice(&seq.to_be_bytes());
}

/// One change read back from a record.
#[derive(Debug, PartialEq)]
enum Change<'a> {
    Put {
        device: &'a [u8],
        seq: u64,
        value: &'a [u8],
    },
    Remove {
        device: &'a [u8],
        seq: u64,
    },
    SequenceMark(u64),
}

/// A record that ends inside an entry or holds an unknown kind.
#[derive(Debug, PartialEq)]
struct Undecodable;

fn decode(mut record: &[u8]) -> Result<Vec<Change<'_>>, Undecodable> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], Undecodable> {
        if input.len() < n {
            return Err(Undecodable);
        }
        let (head, tail) = input.split_at(n);
        *input = tail;
        Ok(head)
    }
    fn take_u64(input: &mut &[u8]) -> Result<u64, Undecodable> {
        let bytes: [u8; 8] = take(input, 8)?.try_into().map_err(|_| Undecodable)?;
        Ok(u64::from_be_bytes(bytes))
    }
    fn take_len(input: &mut &[u8], width: usize) -> Result<usize, Undecodable> {
        let bytes = take(input, width)?;
        Ok(bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
    }
    let mut changes = Vec::new();
    while let Some((&kind, rest)) = record.split_first() {
        record = rest;
        let change = match kind {
            PUT | REMOVE => {
                let device_len = take_len(&mut record, 2)?;
                let device = take(&mut record, device_len)?;
                let seq = take_u64(&mut record)?;
                if kind == PUT {
                    let value_len = take_len(&mut record, 4)?;
                    let value = take(&mut record, value_len)?;
                    Change::Put { device, seq, value }
                } else {
                    Change::Remove { device, seq }
                }
            }
            SEQUENCE_MARK => Change::SequenceMark(take_u64(&mut record)?),
            _ => return Err(Undecodable),
        };
        changes.push(change);
    }
    Ok(changes)
}

/// The log replayed: live entries by device and sequence number.
struct Replayed {
    live: BTreeMap<(Vec<u8>, u64), Vec<u8>>,
    highest_seq: u64,
    changes: usize,
    /// Keys of records that do not decode (skipped whole).
    corrupt: Vec<sled::IVec>,
}

fn replay(records: &[(sled::IVec, sled::IVec)]) -> Replayed {
    let mut replayed = Replayed {
        live: BTreeMap::new(),
        highest_seq: 0,
        changes: 0,
        corrupt: Vec::new(),
    };
    for (key, record) in records {
        let Ok(changes) = decode(record) else {
            replayed.corrupt.push(key.clone());
            continue;
        };
        replayed.changes += changes.len();
        for change in changes {
            match change {
                Change::Put { device, seq, value } => {
                    replayed.highest_seq = replayed.highest_seq.max(seq);
                    replayed.live.insert((device.to_vec(), seq), value.to_vec());
                }
                Change::Remove { device, seq } => {
                    replayed.highest_seq = replayed.highest_seq.max(seq);
                    replayed.live.remove(&(device.to_vec(), seq));
                }
                Change::SequenceMark(seq) => {
                    replayed.highest_seq = replayed.highest_seq.max(seq);
                }
            }
        }
    }
    replayed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OverflowPolicy;
    use crate::queue::QueueLimits;
    use std::time::Duration;

    pub(super) fn item(seq: u64, len: usize) -> QueuedDatagram {
        let limits = QueueLimits {
            max_datagrams: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(247),
            overflow: OverflowPolicy::DropOldest,
        };
        QueuedDatagram::sample(seq, vec![0x40; len], 0, &limits)
    }

    fn seqs(loaded: &HashMap<String, Vec<QueuedDatagram>>, device: &str) -> Vec<u64> {
        loaded
            .get(device)
            .map(|items| items.iter().map(|i| i.seq).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn store_round_trips_and_continues_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        {
            let db = Store::open(dir.path()).unwrap();
            let store = MtStore::open(&db).unwrap();
            let seq = store.next_seq();
            store.put(&id, &item(seq, 5)).unwrap();
            store.put(&id, &item(store.next_seq(), 6)).unwrap();
            store.remove(&id, seq).unwrap();
            store.flush().await.unwrap();
            // The highest sequence number is kept even once its datagram is gone.
            let last = store.next_seq();
            store.put(&id, &item(last, 7)).unwrap();
            store.remove(&id, last).unwrap();
            store.flush().await.unwrap();
        }
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded["a@x"].len(), 1);
        assert_eq!(loaded["a@x"][0].data.len(), 6);
        assert_eq!(store.next_seq(), 4);
    }

    #[tokio::test]
    async fn one_commit_is_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        for _ in 0..100 {
            store.put(&id, &item(store.next_seq(), 20)).unwrap();
        }
        store.remove(&id, 1).unwrap();
        store.flush().await.unwrap();
        assert_eq!(db.tree(MT_LOG_TREE).unwrap().entries().unwrap().len(), 1);
        assert_eq!(store.load().unwrap()["a@x"].len(), 99);
    }

    #[tokio::test]
    async fn compaction_keeps_exactly_the_live_entries() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let b: DeviceId = "b@x".parse().unwrap();
        store.put(&b, &item(store.next_seq(), 3)).unwrap();
        // Enough changes, in many commits, to compact more than once.
        let mut kept = Vec::new();
        for round in 0..(2 * COMPACT_MIN_CHANGES / 1000) {
            for n in 0..500 {
                let seq = store.next_seq();
                store.put(&a, &item(seq, 1)).unwrap();
                if n == 0 && round % 10 == 0 {
                    kept.push(seq);
                } else {
                    store.remove(&a, seq).unwrap();
                }
            }
            store.flush().await.unwrap();
        }
        let records = db.tree(MT_LOG_TREE).unwrap().entries().unwrap().len();
        assert!(
            records < 2 * COMPACT_MIN_CHANGES / 1000,
            "compacted: {records} records"
        );
        let loaded = MtStore::open(&db).unwrap().load().unwrap();
        assert_eq!(seqs(&loaded, "a@x"), kept);
        assert_eq!(seqs(&loaded, "b@x"), [1]);
        let reopened = MtStore::open(&db).unwrap();
        assert_eq!(reopened.next_seq(), store.next_seq());
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_written_is_staged_again() {
        let dir = tempfile::tempdir().unwrap();
        let faults = crate::store::StoreFaults::new();
        let db = Store::open_with(
            dir.path(),
            crate::store::StoreOptions {
                metrics: None,
                faults: Some(faults.clone()),
            },
        )
        .unwrap();
        let store = MtStore::open(&db).unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        store.put(&id, &item(store.next_seq(), 2)).unwrap();
        faults.fail_writes(true);
        assert!(store.flush().await.is_err());
        assert!(
            store.put(&id, &item(store.next_seq(), 2)).is_err(),
            "refused"
        );
        faults.clear();
        store.put(&id, &item(store.next_seq(), 2)).unwrap();
        store.flush().await.unwrap();
        assert_eq!(seqs(&store.load().unwrap(), "a@x"), [1, 3]);
    }

    #[test]
    fn records_decode_as_encoded_and_truncation_is_caught() {
        let mut record = Vec::new();
        encode_put(&mut record, b"a@x", 7, b"{}");
        encode_remove(&mut record, b"b@x", 9);
        encode_mark(&mut record, 11);
        assert_eq!(
            decode(&record).unwrap(),
            [
                Change::Put {
                    device: b"a@x",
                    seq: 7,
                    value: b"{}"
                },
                Change::Remove {
                    device: b"b@x",
                    seq: 9
                },
                Change::SequenceMark(11),
            ]
        );
        for cut in 1..record.len() {
            let decoded = decode(&record[..cut]);
            // Cut on an entry boundary it decodes to fewer entries; anywhere else it fails.
            if let Ok(changes) = decoded {
                assert!(changes.len() < 3);
            }
        }
        assert_eq!(decode(&record[..5]), Err(Undecodable));
        assert_eq!(decode(&[9]), Err(Undecodable));
    }

    proptest::proptest! {
        #[test]
        fn decoding_junk_never_panics(junk in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&junk);
        }
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    fn item(seq: u64) -> QueuedDatagram {
        tests::item(seq, 4)
    }

    fn legacy_key(device: &DeviceId, seq: u64) -> Vec<u8> {
        let mut key = device.canonical().as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    #[tokio::test]
    async fn a_corrupt_entry_is_quarantined_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let b: DeviceId = "b@x".parse().unwrap();
        store.put(&a, &item(1)).unwrap();
        store.put(&b, &item(3)).unwrap();
        let mut record = Vec::new();
        encode_put(&mut record, b"a@x", 2, b"garbage");
        store.flush().await.unwrap();
        let log = db.tree(MT_LOG_TREE).unwrap();
        log.insert(&log.generate_id().unwrap().to_be_bytes(), record)
            .unwrap();

        let loaded = store.load().unwrap();
        assert_eq!(loaded["a@x"].len(), 1);
        assert_eq!(loaded["b@x"].len(), 1);
        let quarantined = db.quarantined().unwrap();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].tree, "mt_log");
        assert_eq!(quarantined[0].key_hex, hex::encode(legacy_key(&a, 2)));
        assert_eq!(quarantined[0].value_hex, hex::encode(b"garbage"));
        // Gone from the log.
        assert_eq!(store.load().unwrap()["a@x"].len(), 1);
        assert_eq!(db.quarantined().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_record_that_does_not_decode_is_quarantined_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        store.put(&a, &item(1)).unwrap();
        store.flush().await.unwrap();
        db.tree(MT_LOG_TREE)
            .unwrap()
            .insert(&u64::MAX.to_be_bytes(), b"\x01\x00".to_vec())
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded["a@x"].len(), 1);
        assert_eq!(db.quarantined().unwrap().len(), 1);
        assert_eq!(db.tree(MT_LOG_TREE).unwrap().entries().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_earlier_versions_queue_is_moved_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let legacy = db.tree(LEGACY_QUEUE_TREE).unwrap();
        for seq in [4, 9] {
            legacy
                .insert(
                    &legacy_key(&a, seq),
                    serde_json::to_vec(&item(seq)).unwrap(),
                )
                .unwrap();
        }
        legacy
            .insert(&legacy_key(&a, 5), b"{\"seq\":".to_vec())
            .unwrap();

        let store = MtStore::open(&db).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(
            loaded["a@x"].iter().map(|i| i.seq).collect::<Vec<_>>(),
            [4, 9]
        );
        assert!(legacy.entries().unwrap().is_empty(), "moved out");
        assert_eq!(db.quarantined().unwrap()[0].tree, "mt_queue");
        assert_eq!(store.next_seq(), 10);
    }

    #[tokio::test]
    async fn rewrite_makes_the_stored_queue_what_memory_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = Store::open(dir.path()).unwrap();
        let store = MtStore::open(&db).unwrap();
        let a: DeviceId = "a@x".parse().unwrap();
        let b: DeviceId = "b@x".parse().unwrap();
        store.put(&a, &item(1)).unwrap();
        store.put(&a, &item(2)).unwrap();
        store.put(&b, &item(3)).unwrap();
        store.flush().await.unwrap();
        // Staged before the rewrite, written after it: repeats what the snapshot holds.
        store.remove(&a, 1).unwrap();
        store
            .rewrite(|snapshot| {
                snapshot.put(&a, &item(2))?;
                snapshot.put(&a, &item(4))?;
                snapshot.put(&b, &item(3))
            })
            .unwrap();
        store.flush().await.unwrap();
        let loaded = store.load().unwrap();
        let seqs: Vec<u64> = loaded["a@x"].iter().map(|i| i.seq).collect();
        assert_eq!(seqs, [2, 4]);
        assert_eq!(loaded["b@x"].len(), 1);
    }
}
