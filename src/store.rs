//! Durable state in sled: one record per device (its UDP address, its callback capability
//! token, its NIDD configuration at the SCEF). What is written here survives a restart, so a
//! restarted bridge keeps every device's address and creates no configuration twice.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::identity::DeviceId;
use crate::reachability::QueueMode;

/// sled tree holding `DeviceRecord`s keyed by the canonical device identity.
const DEVICES_TREE: &str = "devices";

/// How long `open` waits for the file lock of a database that is still being closed.
const LOCK_ATTEMPTS: u32 = 100;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

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
}

/// A NIDD configuration the SCEF created for a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredConfiguration {
    /// The configuration's resource URL (`Location` of the 201).
    pub location: String,
    /// Last `NiddStatus` seen, verbatim (open enum).
    pub status: Option<String>,
    /// `maximumPacketSize` as the SCEF reported it (bits, per the 3GPP schema).
    pub maximum_packet_size_bits: Option<u64>,
    /// The callback URL the SCEF was given; a changed public URL is patched in at start-up.
    #[serde(default)]
    pub notification_destination: Option<String>,
    #[serde(default)]
    pub monitoring_subscription: Option<StoredSubscription>,
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
    pub nidd: Option<StoredConfiguration>,
    /// The LwM2M queue mode the device last stated (Register, Update).
    #[serde(default)]
    pub queue_mode: QueueMode,
}

#[derive(Clone)]
pub(crate) struct Store {
    db: sled::Db,
    devices: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store. A store still locked by a database that is being closed
    /// (sled releases its file lock from a background thread) is waited for, briefly.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .mode(sled::Mode::LowSpace)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(error))
                    if error.kind() == std::io::ErrorKind::WouldBlock
                        && attempts < LOCK_ATTEMPTS =>
                {
                    attempts += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(sled::Error::Io(error)) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(StoreError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                Err(error) => return Err(error.into()),
            }
        };
        let devices = db.open_tree(DEVICES_TREE)?;
        Ok(Self { db, devices })
    }

    pub(crate) fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        match self.devices.get(id.canonical().as_bytes())? {
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

    pub(crate) fn put_device(
        &self,
        id: &DeviceId,
        record: &DeviceRecord,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(StoreError::Encode)?;
        self.devices.insert(id.canonical().as_bytes(), bytes)?;
        Ok(())
    }

    /// Another tree of the same database, for state other modules own (the MT queue).
    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub(crate) fn remove_device(&self, id: &DeviceId) -> Result<(), StoreError> {
        self.devices.remove(id.canonical().as_bytes())?;
        Ok(())
    }

    /// Every stored device, including ones no longer in the configuration.
    pub(crate) fn devices(&self) -> Result<Vec<(String, DeviceRecord)>, StoreError> {
        self.devices
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let key = String::from_utf8_lossy(&key).into_owned();
                let record =
                    serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                        key: key.clone(),
                        source,
                    })?;
                Ok((key, record))
            })
            .collect()
    }

    /// Writes everything to disk; called on shutdown and after provisioning.
    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Writes everything to disk from synchronous code.
    #[cfg(test)]
    pub(crate) fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id: DeviceId = "a@x".parse().unwrap();
        let record = DeviceRecord {
            udp_address: Some("127.0.0.1:20000".parse().unwrap()),
            callback_token: "t".repeat(32),
            nidd: Some(StoredConfiguration {
                location: "http://scef/c/1".into(),
                status: Some("ACTIVE".into()),
                maximum_packet_size_bits: Some(10864),
                notification_destination: Some("http://127.0.0.1:8081/t8/v1/nidd/x".into()),
                monitoring_subscription: None,
            }),
            queue_mode: QueueMode::On,
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
}
