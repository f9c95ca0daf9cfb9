//! Durable state in sled: one record per device (its UDP address, its callback capability
//! token, its NIDD configuration at the SCEF). What is written here survives a restart, so a
//! restarted bridge keeps every device's address and creates no configuration twice.
//!
//! [`Store`] is a handle on the database, not the database: every read, write and flush of every
//! tree goes through it (other modules' trees are [`StoreTree`]s), so it knows whether the store
//! can write ([`health`]) and can replace the database after a failure. That is needed because
//! sled 0.34 keeps the first I/O error of its log writer as a global error in the open database:
//! every later write and flush fails with it, even once the disk has room again, and only
//! opening the database anew clears it. [`Store::run_health`] probes an unhealthy store every
//! second, reopens the database when the probe fails, has the owners of the in-memory state
//! write it into the reopened database (what the failed database held but had not flushed is
//! gone) and only then, after a flush, calls the store healthy again.
//!
//! A record that cannot be decoded at start-up is moved to the `quarantine` tree (raw key, raw
//! bytes, reason, time), counted and logged; the rest of the store loads as usual.

mod health;

#[cfg(any(test, feature = "store-faults"))]
mod faults;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[cfg(any(test, feature = "store-faults"))]
pub use faults::StoreFaults;
use health::Health;
pub(crate) use health::StoreHealth;

use crate::clock;
use crate::identity::DeviceId;
use crate::metrics::Metrics;
use crate::reachability::QueueMode;

/// sled tree holding `DeviceRecord`s keyed by the canonical device identity.
pub(crate) const DEVICES_TREE: &str = "devices";
/// sled tree of records that could not be decoded (`QuarantinedRecord`s).
pub(crate) const QUARANTINE_TREE: &str = "quarantine";
/// sled tree the health probe writes to.
const HEALTH_TREE: &str = "health";
/// sled tree holding `GroupRecord`s keyed by the External Group Identifier.
pub(crate) const GROUPS_TREE: &str = "groups";
/// sled tree of on-demand onboarding: the trigger URL's capability token.
const ONBOARDING_TREE: &str = "onboarding";
const TRIGGER_TOKEN_KEY: &[u8] = b"trigger_token";

/// sled's page cache. Its default (1 GiB) keeps every record read at start-up in memory,
/// about 1 KiB per device at 100 000 devices; records are read again only for a change and the
/// MT queue's pages are few and hot, so a small cache costs nothing on the data path (the
/// benchmark's MT ratio stayed at 1.00 from 16 MiB down to 2 MiB, which saved 0.2 KiB per
/// device at 100 000).
const CACHE_BYTES: u64 = 2 * 1024 * 1024;

/// How long `open` waits for the file lock of a database that is still being closed.
const LOCK_ATTEMPTS: u32 = 100;
const LOCK_RETRY: Duration = Duration::from_millis(20);
/// How often an unhealthy store is probed (and reopened when the probe fails).
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store {path} is in use by another process (its lock is held)")]
    Locked { path: std::path::PathBuf },
    #[error("store: corrupt record for {key}: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("store: cannot encode record: {0}")]
    Encode(serde_json::Error),
    #[error("store {path} is closed: reopening it after a failure failed (retried every second)")]
    Closed { path: std::path::PathBuf },
    #[error("store was reopened after a failure and is not durable until it has been rewritten")]
    Recovering,
}

/// A NIDD configuration the SCEF created for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredConfiguration {
    /// The configuration's resource URL (`Location` of the 201).
    pub location: String,
    /// Last `NiddStatus` seen, verbatim (open enum).
    pub status: Option<String>,
    /// `maximumPacketSize` as the SCEF reported it (bits, per the 3GPP schema).
    // What is absent is left out: sled holds every record in memory, 100 000 of them at scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_packet_size_bits: Option<u64>,
    /// The callback URL the SCEF was given; a changed public URL is patched in at start-up.
    #[serde(default)]
    pub notification_destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitoring_subscription: Option<StoredSubscription>,
    /// The configuration's `duration` (its expiry) as Unix milliseconds, when one was asked
    /// for (`nidd.configuration_duration_s`); renewed before it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// A MonitoringEvent subscription the SCEF created for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredSubscription {
    pub location: String,
    /// `monitorExpireTime` as Unix milliseconds; renewed before it passes.
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeviceRecord {
    pub udp_address: Option<SocketAddr>,
    /// Capability token of this device's NIDD callback URL.
    pub callback_token: String,
    /// The token a callback URL rotation moves to, until the SCEF took its URL; accepted
    /// besides `callback_token` meanwhile (so a crash mid-rotation loses neither URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_callback_token: Option<String>,
    pub nidd: Option<StoredConfiguration>,
    /// The LwM2M queue mode the device last stated (Register, Update).
    #[serde(default, skip_serializing_if = "QueueMode::is_unknown")]
    pub queue_mode: QueueMode,
    /// The settings of a device added through the admin API; `None` for one declared in the
    /// configuration file, which the file describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<crate::config::DeviceConfig>,
    /// The device was removed; its side at the SCEF may still have to be deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// Created on demand (`[onboarding]`), not through the admin API; with `settings`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onboarded: bool,
    /// The group whose configuration `nidd` is (a member's is its group's, never to be
    /// deleted with the member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The persisted state of a group (`[[groups]]`): its callback capability token and the
/// NIDD configuration the SCEF created for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GroupRecord {
    pub callback_token: String,
    pub nidd: Option<StoredConfiguration>,
    /// The settings of a group added through the admin API; `None` for a `[[groups]]` one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<crate::config::GroupConfig>,
    /// The group was removed; its configuration at the SCEF may still have to be deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

/// A record moved out of its tree because it could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct QuarantinedRecord {
    /// The tree it was read from.
    pub tree: String,
    /// Its key, as text where it is UTF-8 (lossy otherwise).
    pub key: String,
    pub key_hex: String,
    /// Its bytes, unchanged.
    pub value_hex: String,
    /// Why it could not be decoded.
    pub reason: String,
    pub quarantined_at_ms: u64,
}

/// What a store is opened with besides its path.
#[derive(Clone, Default)]
pub(crate) struct StoreOptions {
    /// Where the health gauge and the quarantine counter go.
    pub(crate) metrics: Option<Arc<Metrics>>,
    /// Faults injected into every write and flush (tests only).
    #[cfg(any(test, feature = "store-faults"))]
    pub(crate) faults: Option<StoreFaults>,
}

/// The handle on the sled database; clones share it.
#[derive(Clone)]
pub(crate) struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// `None` after a reopen that failed, until the next one succeeds.
    db: RwLock<Option<sled::Db>>,
    health: Health,
    metrics: Option<Arc<Metrics>>,
    #[cfg(any(test, feature = "store-faults"))]
    faults: Option<StoreFaults>,
}

/// One tree of the store, for state other modules own (the MT queue); every operation goes
/// through the store, so it always reaches the database the store has open now.
#[derive(Clone)]
pub(crate) struct StoreTree {
    store: Store,
    name: &'static str,
}

impl StoreTree {
    pub(crate) fn insert(
        &self,
        key: &[u8],
        value: impl Into<sled::IVec>,
    ) -> Result<(), StoreError> {
        self.store
            .write(self.name, |tree| tree.insert(key, value).map(|_| ()))
    }

    /// Applies every insert and removal of `batch` atomically.
    pub(crate) fn apply_batch(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.store.write(self.name, |tree| tree.apply_batch(batch))
    }

    /// A number the database never hands out again, not even after a crash: increasing, so
    /// keys made from it sort in the order they were made.
    pub(crate) fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.store.db()?.generate_id()?)
    }

    /// Refuses a write before it is staged, when a write made now would fail (tests inject
    /// that); the refusal counts for the store's health like a failed write.
    pub(crate) fn check_write(&self) -> Result<(), StoreError> {
        let result = self.store.check_write();
        if let Err(error) = &result {
            self.store.inner.health.write_failed(error);
        }
        result
    }

    /// Every entry, in key order.
    pub(crate) fn entries(&self) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        self.store
            .read(self.name, |tree| tree.iter().collect::<Result<Vec<_>, _>>())
    }

    /// Moves an entry that cannot be decoded to the quarantine tree.
    pub(crate) fn quarantine(
        &self,
        key: &[u8],
        value: &[u8],
        reason: &dyn std::fmt::Display,
    ) -> Result<(), StoreError> {
        self.store.quarantine(self.name, key, value, reason)
    }

    /// Makes every write to any tree durable.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }
}

/// Opens the database at `path`, waiting briefly for the file lock of one that is still being
/// closed (sled releases its file lock from a background thread).
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let mut attempts = 0;
    loop {
        match sled::Config::new()
            .path(path)
            .mode(sled::Mode::LowSpace)
            .cache_capacity(CACHE_BYTES)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(error)) if is_lock_held(&error) && attempts < LOCK_ATTEMPTS => {
                attempts += 1;
                std::thread::sleep(LOCK_RETRY);
            }
            Err(sled::Error::Io(error)) if is_lock_held(&error) => {
                return Err(StoreError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Whether sled's open failed on the file lock. sled reports a held lock as `WouldBlock`, or
/// wraps it in an `Other` error that names it ("could not acquire lock on ...").
fn is_lock_held(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::WouldBlock
        || (error.kind() == std::io::ErrorKind::Other
            && error.to_string().starts_with("could not acquire lock"))
}

impl Store {
    /// Opens (or creates) the store. A store still locked by a database that is being closed
    /// is waited for, briefly.
    #[cfg(test)]
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    pub(crate) fn open_with(path: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        #[cfg(any(test, feature = "store-faults"))]
        if let Some(faults) = &options.faults {
            faults.opened(false);
        }
        let db = open_db(path)?;
        let gauge = options.metrics.as_ref().map(|m| m.store_healthy.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                db: RwLock::new(Some(db)),
                health: Health::new(gauge),
                metrics: options.metrics,
                #[cfg(any(test, feature = "store-faults"))]
                faults: options.faults,
            }),
        })
    }

    /// The database open now.
    fn db(&self) -> Result<sled::Db, StoreError> {
        self.inner
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::Closed {
                path: self.inner.path.clone(),
            })
    }

    fn read<T>(
        &self,
        tree: &str,
        op: impl FnOnce(&sled::Tree) -> sled::Result<T>,
    ) -> Result<T, StoreError> {
        let tree = self.db()?.open_tree(tree)?;
        Ok(op(&tree)?)
    }

    /// Every write of every tree: faults first (tests), then sled; the outcome feeds health.
    fn write<T>(
        &self,
        tree: &str,
        op: impl FnOnce(&sled::Tree) -> sled::Result<T>,
    ) -> Result<T, StoreError> {
        let result = self.check_write().and_then(|()| {
            let tree = self.db()?.open_tree(tree)?;
            Ok(op(&tree)?)
        });
        match &result {
            Ok(_) => self.inner.health.wrote(),
            Err(error) => self.inner.health.write_failed(error),
        }
        result
    }

    #[cfg(any(test, feature = "store-faults"))]
    fn check_write(&self) -> Result<(), StoreError> {
        self.inner
            .faults
            .as_ref()
            .map_or(Ok(()), StoreFaults::check_write)
    }

    #[cfg(not(any(test, feature = "store-faults")))]
    fn check_write(&self) -> Result<(), StoreError> {
        Ok(())
    }

    #[cfg(any(test, feature = "store-faults"))]
    fn check_flush(&self) -> Result<(), StoreError> {
        self.inner
            .faults
            .as_ref()
            .map_or(Ok(()), StoreFaults::check_flush)
    }

    #[cfg(not(any(test, feature = "store-faults")))]
    fn check_flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        match self.read(DEVICES_TREE, |tree| tree.get(id.canonical().as_bytes()))? {
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        key: id.canonical().into(),
                        source,
                    })
            }
            None => Ok(None),
        }
    }

    /// A device's record at start-up: one that cannot be decoded is quarantined and the device
    /// treated as having none (a new address, a new NIDD configuration).
    pub(crate) fn load_device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let key = id.canonical().as_bytes();
        let Some(bytes) = self.read(DEVICES_TREE, |tree| tree.get(key))? else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some(record)),
            Err(error) => {
                if let Err(store_error) = self.quarantine(DEVICES_TREE, key, &bytes, &error) {
                    tracing::error!(device = %id, error = %store_error, "cannot quarantine a corrupt device record; it is overwritten");
                }
                Ok(None)
            }
        }
    }

    pub(crate) fn put_device(
        &self,
        id: &DeviceId,
        record: &DeviceRecord,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.write(DEVICES_TREE, |tree| {
            tree.insert(id.canonical().as_bytes(), bytes).map(|_| ())
        })
    }

    /// Another tree of the same database, for state other modules own (the MT queue).
    pub(crate) fn tree(&self, name: &'static str) -> Result<StoreTree, StoreError> {
        Ok(StoreTree {
            store: self.clone(),
            name,
        })
    }

    /// The capability token of the NIDD Configuration Trigger URL: the stored one, or one
    /// `mint` makes now and the store keeps (flushed), so the URL the NEF was given holds
    /// across restarts.
    pub(crate) fn trigger_token(
        &self,
        mint: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        if let Some(stored) = self.read(ONBOARDING_TREE, |tree| tree.get(TRIGGER_TOKEN_KEY))?
            && let Ok(token) = String::from_utf8(stored.to_vec())
        {
            return Ok(token);
        }
        let token = mint();
        self.write(ONBOARDING_TREE, |tree| {
            tree.insert(TRIGGER_TOKEN_KEY, token.as_bytes()).map(|_| ())
        })?;
        self.flush_blocking()?;
        Ok(token)
    }

    /// Every stored group; records that cannot be decoded are quarantined and left out (that
    /// group starts as a new one).
    pub(crate) fn groups(&self) -> Result<Vec<(String, GroupRecord)>, StoreError> {
        let entries = self.read(GROUPS_TREE, |tree| {
            tree.iter().collect::<Result<Vec<_>, _>>()
        })?;
        let mut groups = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            match serde_json::from_slice(&value) {
                Ok(record) => groups.push((String::from_utf8_lossy(&key).into_owned(), record)),
                Err(error) => {
                    if let Err(store_error) = self.quarantine(GROUPS_TREE, &key, &value, &error) {
                        tracing::error!(error = %store_error, "cannot quarantine a corrupt group record");
                    }
                }
            }
        }
        Ok(groups)
    }

    pub(crate) fn put_group(&self, id: &str, record: &GroupRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.write(GROUPS_TREE, |tree| {
            tree.insert(id.as_bytes(), bytes).map(|_| ())
        })
    }

    pub(crate) fn remove_group(&self, id: &str) -> Result<(), StoreError> {
        self.write(GROUPS_TREE, |tree| tree.remove(id.as_bytes()).map(|_| ()))
    }

    pub(crate) fn remove_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.write(DEVICES_TREE, |tree| {
            tree.remove(id.canonical().as_bytes()).map(|_| ())
        })
    }

    /// Every stored device, including ones no longer in the configuration; records that cannot
    /// be decoded are quarantined and left out.
    pub(crate) fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        let entries = self.read(DEVICES_TREE, |tree| {
            tree.iter().collect::<Result<Vec<_>, _>>()
        })?;
        let mut devices = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            match serde_json::from_slice(&value) {
                Ok(record) => devices.push((String::from_utf8_lossy(&key).into_owned(), record)),
                Err(error) => {
                    if let Err(store_error) = self.quarantine(DEVICES_TREE, &key, &value, &error) {
                        tracing::error!(error = %store_error, "cannot quarantine a corrupt device record");
                    }
                }
            }
        }
        Ok(devices)
    }

    /// Moves a record that cannot be decoded from `tree` to the quarantine tree (raw key, raw
    /// bytes, reason, time), counts and logs it.
    pub(crate) fn quarantine(
        &self,
        tree: &str,
        key: &[u8],
        value: &[u8],
        reason: &dyn std::fmt::Display,
    ) -> Result<(), StoreError> {
        let now_ms = clock::unix_ms();
        let record = QuarantinedRecord {
            tree: tree.to_string(),
            key: String::from_utf8_lossy(key).into_owned(),
            key_hex: hex::encode(key),
            value_hex: hex::encode(value),
            reason: reason.to_string(),
            quarantined_at_ms: now_ms,
        };
        tracing::error!(tree, key = %record.key, key_hex = %record.key_hex, %reason, "corrupt record moved to the quarantine tree");
        if let Some(metrics) = &self.inner.metrics {
            metrics.store_quarantined.with_label_values(&[tree]).inc();
        }
        let mut quarantine_key = tree.as_bytes().to_vec();
        quarantine_key.push(0);
        quarantine_key.extend_from_slice(key);
        quarantine_key.push(0);
        quarantine_key.extend_from_slice(&now_ms.to_be_bytes());
        let bytes = serde_json::to_vec(&record).map_err(StoreError::Encode)?;
        self.write(QUARANTINE_TREE, |quarantine| {
            quarantine.insert(quarantine_key, bytes).map(|_| ())
        })?;
        self.write(tree, |source| source.remove(key).map(|_| ()))
    }

    /// Every quarantined record, oldest tree key first.
    pub(crate) fn quarantined(&self) -> Result<Vec<QuarantinedRecord>, StoreError> {
        let entries = self.read(QUARANTINE_TREE, |tree| {
            tree.iter().collect::<Result<Vec<_>, _>>()
        })?;
        Ok(entries
            .into_iter()
            .filter_map(|(_, value)| serde_json::from_slice(&value).ok())
            .collect())
    }

    /// Writes everything to disk; called on shutdown, after provisioning and by the MT group
    /// commit. Refused while a reopened database is being rewritten: what was written before the
    /// reopen is not in it yet.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        if self.inner.health.is_recovering() {
            return Err(StoreError::Recovering);
        }
        self.flush_now().await
    }

    async fn flush_now(&self) -> Result<(), StoreError> {
        let ticket = self.inner.health.ticket();
        let result = match self.check_flush().and_then(|()| self.db()) {
            // sled's blocking flush on tokio's blocking pool, not `flush_async`: its hand-off
            // to sled's thread pool can miss the wake-up (sled #1241; the benchmark saw 3 group
            // commits in 5 s).
            Ok(db) => match tokio::task::spawn_blocking(move || db.flush()).await {
                Ok(flushed) => flushed.map(|_| ()).map_err(StoreError::from),
                Err(joined) => Err(StoreError::Sled(sled::Error::Io(std::io::Error::other(
                    joined,
                )))),
            },
            Err(error) => Err(error),
        };
        match &result {
            Ok(()) => self.inner.health.flushed(ticket),
            Err(error) => self.inner.health.flush_failed(error),
        }
        result
    }

    /// Writes everything to disk from synchronous code (start-up, tests).
    pub(crate) fn flush_blocking(&self) -> Result<(), StoreError> {
        self.check_flush()?;
        let ticket = self.inner.health.ticket();
        self.db()?.flush()?;
        self.inner.health.flushed(ticket);
        Ok(())
    }

    /// Whether the store can write, and the last failure when it cannot.
    pub(crate) fn health(&self) -> StoreHealth {
        self.inner.health.snapshot()
    }

    /// A small write and a flush: proves the store writes (and makes it healthy if it does).
    async fn probe(&self) -> Result<(), StoreError> {
        self.write(HEALTH_TREE, |tree| {
            tree.insert("probe", clock::unix_ms().to_be_bytes().to_vec())
                .map(|_| ())
        })?;
        self.flush_now().await
    }

    /// Closes the database and opens it again, which clears sled's kept I/O error. Until the
    /// owners have rewritten their state ([`run_health`](Self::run_health)) the store stays
    /// unhealthy and refuses flushes.
    async fn reopen(&self) -> Result<(), StoreError> {
        self.inner.health.reopening();
        let old = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // The file lock goes with the last handle on the old database (a flush still running
        // holds one; `open_db` waits for it).
        drop(old);
        #[cfg(any(test, feature = "store-faults"))]
        if let Some(faults) = &self.inner.faults {
            faults.check_open()?;
        }
        let path = self.inner.path.clone();
        let db = tokio::task::spawn_blocking(move || open_db(&path))
            .await
            .map_err(|error| StoreError::Sled(sled::Error::Io(std::io::Error::other(error))))??;
        #[cfg(any(test, feature = "store-faults"))]
        if let Some(faults) = &self.inner.faults {
            faults.opened(true);
        }
        *self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(db);
        tracing::warn!(path = %self.inner.path.display(), "store reopened after a failure; rewriting it from memory");
        Ok(())
    }

    /// Keeps the store's health until cancelled: once a write or flush failed, probes every
    /// [`PROBE_INTERVAL`] with a small write and flush. When the probe fails the database is
    /// reopened (sled keeps an I/O error until then), `rewrite` writes the owners' in-memory
    /// state into it (device records, MT queues), and a flush makes the store healthy again.
    pub(crate) async fn run_health(
        self,
        cancel: CancellationToken,
        rewrite: impl Fn() -> Result<(), StoreError> + Send,
    ) {
        loop {
            if self.inner.health.is_healthy() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.inner.health.failed.notified() => continue,
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            self.recover(&rewrite).await;
        }
    }

    /// One probe of an unhealthy store, reopening and rewriting it when the probe fails.
    pub(crate) async fn recover(&self, rewrite: &(impl Fn() -> Result<(), StoreError> + Send)) {
        if self.inner.health.is_healthy() {
            return;
        }
        // A reopen or rewrite that failed last time is tried again at once.
        if !self.inner.health.is_recovering() {
            match self.probe().await {
                Ok(()) => return,
                Err(error) => {
                    self.count_error("health_probe");
                    tracing::warn!(%error, "store probe failed; reopening the database");
                }
            }
        }
        if let Err(error) = self.reopen().await {
            self.count_error("reopen");
            self.inner.health.write_failed(&error);
            tracing::error!(%error, "cannot reopen the store; retrying");
            return;
        }
        if let Err(error) = rewrite() {
            self.count_error("rewrite");
            tracing::error!(%error, "cannot rewrite the reopened store; retrying");
            return;
        }
        self.inner.health.rewritten();
        if let Err(error) = self.probe().await {
            self.count_error("health_probe");
            tracing::warn!(%error, "the reopened store does not write yet");
        }
    }

    fn count_error(&self, operation: &str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.store_error(operation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_in_use_is_named_as_locked_and_a_closed_one_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        // Within this process sled reports the held lock as a wrapped error, not WouldBlock.
        assert!(matches!(
            open_db(dir.path()),
            Err(StoreError::Locked { .. })
        ));
        drop(held);
        // sled may still be releasing the lock from its background thread: open waits for it.
        for _ in 0..20 {
            drop(Store::open(dir.path()).unwrap());
        }
    }

    #[test]
    fn the_trigger_token_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path())
            .unwrap()
            .trigger_token(|| "first".into())
            .unwrap();
        assert_eq!(first, "first");
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.trigger_token(|| "second".into()).unwrap(), "first");
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        let record = DeviceRecord {
            udp_address: Some("127.0.0.1:20000".parse().unwrap()),
            callback_token: "t".repeat(32),
            pending_callback_token: None,
            nidd: Some(StoredConfiguration {
                location: "http://scef/c/1".into(),
                status: Some("ACTIVE".into()),
                maximum_packet_size_bits: Some(10864),
                notification_destination: Some("http://127.0.0.1:8081/t8/v1/nidd/x".into()),
                monitoring_subscription: None,
                expires_at_ms: Some(1_900_000_000_000),
            }),
            queue_mode: QueueMode::On,
            settings: Some(crate::config::DeviceConfig {
                external_id: Some("a@x".into()),
                endpoint_name: Some("urn:dev:a".into()),
                ..Default::default()
            }),
            removing: true,
            onboarded: true,
            group: Some("meters@x".into()),
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_device(&id, &record).unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.device(&id).unwrap(), Some(record));
        assert_eq!(store.devices().unwrap().len(), 1);
        store.remove_device(&id).unwrap();
        assert_eq!(store.device(&id).unwrap(), None);
    }

    #[test]
    fn absent_fields_are_left_out_and_records_with_them_spelled_out_still_read() {
        let written = r#"{"udp_address":"127.64.0.1:5683","callback_token":"t","nidd":{"location":"http://scef/c/1","status":"ACTIVE","maximum_packet_size_bits":null,"notification_destination":"http://b/t8/v1/nidd/t","monitoring_subscription":null,"expires_at_ms":null},"queue_mode":"unknown"}"#;
        let record: DeviceRecord = serde_json::from_str(written).unwrap();
        let compact = serde_json::to_string(&record).unwrap();
        assert_eq!(
            compact,
            r#"{"udp_address":"127.64.0.1:5683","callback_token":"t","nidd":{"location":"http://scef/c/1","status":"ACTIVE","notification_destination":"http://b/t8/v1/nidd/t"}}"#
        );
        assert_eq!(
            serde_json::from_str::<DeviceRecord>(&compact).unwrap(),
            record
        );
    }
}

#[cfg(test)]
mod fault_tests {
    //! The store's health and quarantine, driven through `StoreFaults`.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn record(token: &str) -> DeviceRecord {
        DeviceRecord {
            udp_address: Some("127.0.0.1:20001".parse().unwrap()),
            callback_token: token.into(),
            pending_callback_token: None,
            nidd: None,
            queue_mode: QueueMode::default(),
            settings: None,
            removing: false,
            onboarded: false,
            group: None,
        }
    }

    fn faulty_store(dir: &Path) -> (Store, StoreFaults, Arc<Metrics>) {
        let faults = StoreFaults::new();
        let metrics = Arc::new(Metrics::new().unwrap());
        let store = Store::open_with(
            dir,
            StoreOptions {
                metrics: Some(metrics.clone()),
                faults: Some(faults.clone()),
            },
        )
        .unwrap();
        (store, faults, metrics)
    }

    fn is_enospc(error: &StoreError) -> bool {
        matches!(error, StoreError::Sled(sled::Error::Io(e)) if e.raw_os_error() == Some(28))
    }

    #[tokio::test]
    async fn a_failed_write_makes_the_store_unhealthy_until_a_later_write_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, metrics) = faulty_store(dir.path());
        let id: DeviceId = "a@x".parse().unwrap();
        assert!(store.health().healthy);
        assert_eq!(metrics.store_healthy.get(), 1);

        faults.fail_writes(true);
        let error = store.put_device(&id, &record("t1")).unwrap_err();
        assert!(is_enospc(&error), "a real StoreError: {error}");
        let health = store.health();
        assert!(!health.healthy);
        assert!(health.error.unwrap().contains("No space left"));
        assert_eq!(metrics.store_healthy.get(), 0);
        // Nothing was written, so a flush proves nothing.
        store.flush().await.unwrap();
        assert!(!store.health().healthy);

        faults.clear();
        store.put_device(&id, &record("t2")).unwrap();
        assert!(!store.health().healthy, "a write alone is not on disk yet");
        store.flush().await.unwrap();
        assert!(store.health().healthy);
        assert_eq!(metrics.store_healthy.get(), 1);
        assert_eq!(store.device(&id).unwrap(), Some(record("t2")));
        assert_eq!(faults.injected(), 1);
    }

    #[tokio::test]
    async fn a_failed_flush_makes_the_store_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, _) = faulty_store(dir.path());
        let id: DeviceId = "a@x".parse().unwrap();
        store.put_device(&id, &record("t")).unwrap();
        faults.fail_flushes(true);
        assert!(is_enospc(&store.flush().await.unwrap_err()));
        assert!(!store.health().healthy);
        faults.clear();
        // The probe of the health task writes and flushes.
        store.recover(&|| Ok(())).await;
        assert!(store.health().healthy);
        assert_eq!(faults.reopened(), 0, "a store that writes is not reopened");
    }

    #[tokio::test]
    async fn a_poisoned_store_recovers_by_reopening_and_rewriting_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, metrics) = faulty_store(dir.path());
        let durable: DeviceId = "durable@x".parse().unwrap();
        let lost: DeviceId = "lost@x".parse().unwrap();
        store.put_device(&durable, &record("d")).unwrap();
        store.flush().await.unwrap();

        faults.poison_until_reopened(true);
        faults.disk_full(true);
        assert!(store.put_device(&lost, &record("l")).is_err());
        // Room again, but like sled the open database keeps the error.
        faults.disk_full(false);
        assert!(faults.is_poisoned());
        assert!(store.put_device(&lost, &record("l")).is_err());
        assert!(store.flush().await.is_err());

        let rewrites = AtomicUsize::new(0);
        let rewrite = || {
            rewrites.fetch_add(1, Ordering::SeqCst);
            store.put_device(&lost, &record("l"))
        };
        store.recover(&rewrite).await;
        assert_eq!(faults.reopened(), 1);
        assert_eq!(rewrites.load(Ordering::SeqCst), 1);
        assert!(store.health().healthy, "{:?}", store.health());
        assert_eq!(store.device(&durable).unwrap(), Some(record("d")));
        assert_eq!(store.device(&lost).unwrap(), Some(record("l")));
        assert_eq!(
            metrics
                .store_errors
                .with_label_values(&["health_probe"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_store_that_cannot_reopen_is_closed_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, metrics) = faulty_store(dir.path());
        let id: DeviceId = "a@x".parse().unwrap();
        faults.poison_until_reopened(true);
        faults.disk_full(true);
        assert!(store.put_device(&id, &record("t")).is_err());

        store.recover(&|| Ok(())).await;
        assert!(store.put_device(&id, &record("t")).is_err());
        assert!(matches!(store.device(&id), Err(StoreError::Closed { .. })));
        let health = store.health();
        assert!(!health.healthy && health.recovering);
        assert!(matches!(store.flush().await, Err(StoreError::Recovering)));
        assert_eq!(metrics.store_errors.with_label_values(&["reopen"]).get(), 1);

        faults.disk_full(false);
        store.recover(&|| Ok(())).await;
        assert!(store.health().healthy, "{:?}", store.health());
        store.put_device(&id, &record("t")).unwrap();
    }

    #[tokio::test]
    async fn the_health_task_recovers_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults, _) = faulty_store(dir.path());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(store.clone().run_health(cancel.clone(), || Ok(())));
        faults.poison_until_reopened(true);
        faults.fail_writes(true);
        let id: DeviceId = "a@x".parse().unwrap();
        assert!(store.put_device(&id, &record("t")).is_err());
        faults.clear();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !store.health().healthy {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("healthy again without anyone writing");
        assert_eq!(faults.reopened(), 1);
        cancel.cancel();
        task.await.unwrap();
    }

    #[test]
    fn corrupt_device_records_are_quarantined_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, metrics) = faulty_store(dir.path());
        let good: DeviceId = "good@x".parse().unwrap();
        let bad: DeviceId = "bad@x".parse().unwrap();
        let departed = b"departed@x";
        store.put_device(&good, &record("g")).unwrap();
        let devices = store.tree(DEVICES_TREE).unwrap();
        devices
            .insert(bad.canonical().as_bytes(), b"\x00junk".to_vec())
            .unwrap();
        devices
            .insert(departed, b"{\"not\":\"a record\"}".to_vec())
            .unwrap();

        assert_eq!(store.load_device(&good).unwrap(), Some(record("g")));
        assert_eq!(store.load_device(&bad).unwrap(), None, "treated as new");
        assert_eq!(store.devices().unwrap().len(), 1, "departed@x quarantined");
        let quarantined = store.quarantined().unwrap();
        assert_eq!(quarantined.len(), 2);
        let bad_record = quarantined.iter().find(|q| q.key == "bad@x").unwrap();
        assert_eq!(bad_record.tree, "devices");
        assert_eq!(bad_record.value_hex, hex::encode(b"\x00junk"));
        assert_eq!(bad_record.key_hex, hex::encode(b"bad@x"));
        assert!(!bad_record.reason.is_empty());
        assert!(bad_record.quarantined_at_ms > 0);
        assert_eq!(
            metrics
                .store_quarantined
                .with_label_values(&["devices"])
                .get(),
            2
        );
        // Moved, not copied: the next start finds nothing to quarantine.
        assert_eq!(store.load_device(&bad).unwrap(), None);
        assert_eq!(store.devices().unwrap().len(), 1);
        assert_eq!(store.quarantined().unwrap().len(), 2);
    }
}
