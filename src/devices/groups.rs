//! Groups of devices the SCEF serves through one NIDD configuration (`externalGroupId`): each
//! group's callback capability token (its members' uplinks and the configuration's
//! notifications arrive on the group's URL), its configuration, its members, and the
//! persisted record of each group (sled tree `groups`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use url::Url;

use super::{NiddState, capability_url_with, lock, tokens::mint_capability_token};
use crate::config::GroupConfig;
use crate::identity::{DeviceId, ExternalId};
use crate::store::{GroupRecord, Store, StoreError};

/// One `[[groups]]` entry as the bridge serves it.
pub(crate) struct Group {
    pub(crate) id: ExternalId,
    callback_token: String,
    settings: GroupConfig,
    /// Added through the admin API (its settings kept in its record).
    from_api: bool,
    nidd: Mutex<Option<NiddState>>,
    members: Mutex<HashSet<DeviceId>>,
    /// Held while the group's configuration is being created.
    pub(crate) provisioning: tokio::sync::Mutex<()>,
    /// A reported termination is being checked with the SCEF.
    checking_termination: AtomicBool,
}

impl Group {
    fn new(id: ExternalId, callback_token: String, settings: GroupConfig, from_api: bool) -> Self {
        Self {
            id,
            callback_token,
            settings,
            from_api,
            nidd: Mutex::new(None),
            members: Mutex::new(HashSet::new()),
            provisioning: tokio::sync::Mutex::new(()),
            checking_termination: AtomicBool::new(false),
        }
    }

    /// The callback URL of the group's NIDD configuration.
    pub(crate) fn callback_url(&self, public_url: &Url) -> String {
        capability_url_with(public_url, "nidd", &self.callback_token)
    }

    pub(crate) fn settings(&self) -> &GroupConfig {
        &self.settings
    }

    /// The group's NIDD configuration now.
    pub(crate) fn nidd(&self) -> Option<NiddState> {
        lock(&self.nidd).clone()
    }

    /// The members the bridge serves now.
    pub(crate) fn members(&self) -> Vec<DeviceId> {
        lock(&self.members).iter().cloned().collect()
    }

    pub(crate) fn member_count(&self) -> usize {
        lock(&self.members).len()
    }

    pub(crate) fn has_member(&self, id: &DeviceId) -> bool {
        lock(&self.members).contains(id)
    }

    pub(crate) fn join(&self, id: DeviceId) {
        lock(&self.members).insert(id);
    }

    pub(crate) fn leave(&self, id: &DeviceId) {
        lock(&self.members).remove(id);
    }

    /// Starts checking a reported termination; `false` when one is being checked already.
    pub(crate) fn begin_termination_check(&self) -> bool {
        !self.checking_termination.swap(true, Ordering::Relaxed)
    }

    pub(crate) fn end_termination_check(&self) {
        self.checking_termination.store(false, Ordering::Relaxed);
    }

    pub(crate) fn is_from_api(&self) -> bool {
        self.from_api
    }

    fn record(&self) -> GroupRecord {
        GroupRecord {
            callback_token: self.callback_token.clone(),
            nidd: self.nidd().as_ref().map(NiddState::stored),
            settings: self.from_api.then(|| self.settings.clone()),
            removing: false,
        }
    }
}

/// The groups present now, by identity and by callback token.
#[derive(Default)]
struct Maps {
    by_id: HashMap<ExternalId, Arc<Group>>,
    by_token: HashMap<String, Arc<Group>>,
}

/// Every group the bridge serves (the file's `[[groups]]` and the admin API's), by identity
/// and by callback token, with their records in step.
pub(crate) struct GroupTable {
    maps: RwLock<Maps>,
    /// Stored groups neither source names any more (or removed): their configurations are
    /// deleted, then their records.
    departed: RwLock<Vec<(String, GroupRecord)>>,
    store: Store,
}

impl GroupTable {
    /// The file's groups and the ones the admin API added before (the file wins), each
    /// continuing from its stored record (token, configuration); a new group's record is
    /// written (its token durable) before anything is asked for it.
    pub(crate) fn load(store: &Store, configs: &[GroupConfig]) -> Result<Self, StoreError> {
        let mut stored: HashMap<String, GroupRecord> = store.groups()?.into_iter().collect();
        let table = Self {
            maps: RwLock::new(Maps::default()),
            departed: RwLock::new(Vec::new()),
            store: store.clone(),
        };
        for settings in configs {
            let Ok(id) = settings.group_id() else {
                continue;
            };
            let record = stored.remove(id.as_str()).filter(|r| !r.removing);
            table.insert(id, settings.clone(), false, record)?;
        }
        let mut departed = Vec::new();
        for (key, record) in stored {
            match (&record.settings, key.parse::<ExternalId>()) {
                (Some(settings), Ok(id)) if !record.removing => {
                    let settings = settings.clone();
                    table.insert(id, settings, true, Some(record))?;
                }
                _ => departed.push((key, record)),
            }
        }
        *write(&table.departed) = departed;
        Ok(table)
    }

    fn insert(
        &self,
        id: ExternalId,
        settings: GroupConfig,
        from_api: bool,
        record: Option<GroupRecord>,
    ) -> Result<Arc<Group>, StoreError> {
        let token = record
            .as_ref()
            .map(|r| r.callback_token.clone())
            .unwrap_or_else(mint_capability_token);
        let group = Group::new(id.clone(), token.clone(), settings, from_api);
        *lock(&group.nidd) = record.and_then(|r| r.nidd).and_then(NiddState::from_stored);
        self.store.put_group(id.as_str(), &group.record())?;
        let group = Arc::new(group);
        let mut maps = write(&self.maps);
        maps.by_token.insert(token, group.clone());
        maps.by_id.insert(id, group.clone());
        Ok(group)
    }

    /// Adds a group through the admin API (its record, with its settings, written first).
    pub(crate) fn add(
        &self,
        id: ExternalId,
        settings: GroupConfig,
    ) -> Result<Arc<Group>, StoreError> {
        self.insert(id, settings, true, None)
    }

    /// Takes a group out: its record is marked removing (what it has at the SCEF is deleted
    /// by the caller, then [`forget_removed`](Self::forget_removed)); its URL is refused from
    /// now on.
    pub(crate) fn remove(&self, group: &Group) -> Result<(), StoreError> {
        let mut record = group.record();
        record.removing = true;
        self.store.put_group(group.id.as_str(), &record)?;
        let mut maps = write(&self.maps);
        maps.by_id.remove(&group.id);
        maps.by_token.retain(|_, held| held.id != group.id);
        Ok(())
    }

    /// A removed group's side at the SCEF is deleted: its record goes.
    pub(crate) fn forget_removed(&self, group: &Group) -> Result<(), StoreError> {
        self.store.remove_group(group.id.as_str())
    }

    pub(crate) fn get(&self, id: &ExternalId) -> Option<Arc<Group>> {
        read(&self.maps).by_id.get(id).cloned()
    }

    /// The group whose callback URL carries `token`.
    pub(crate) fn by_token(&self, token: &str) -> Option<Arc<Group>> {
        read(&self.maps).by_token.get(token).cloned()
    }

    /// The groups present now.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Arc<Group>> + use<> {
        let groups: Vec<Arc<Group>> = read(&self.maps).by_id.values().cloned().collect();
        groups.into_iter()
    }

    pub(crate) fn ids(&self) -> HashSet<ExternalId> {
        read(&self.maps).by_id.keys().cloned().collect()
    }

    /// Records the group's configuration (persisted first). The caller brings the members'
    /// copies in step (`DeviceTable::mirror_group`).
    pub(crate) fn set_nidd(
        &self,
        group: &Group,
        nidd: Option<NiddState>,
    ) -> Result<(), StoreError> {
        // A group removed meanwhile keeps its record as it is (marked removing).
        let present = self
            .get(&group.id)
            .is_some_and(|held| std::ptr::eq(Arc::as_ptr(&held), group));
        if present {
            let mut record = group.record();
            record.nidd = nidd.as_ref().map(NiddState::stored);
            self.store.put_group(group.id.as_str(), &record)?;
        }
        *lock(&group.nidd) = nidd;
        Ok(())
    }

    /// Stored groups no source names any more, with what they had at the SCEF.
    pub(crate) fn departed(&self) -> Vec<(String, GroupRecord)> {
        read(&self.departed).clone()
    }

    /// A departed group's side at the SCEF is deleted: its record goes.
    pub(crate) fn forget_departed(&self, id: &str) -> Result<(), StoreError> {
        self.store.remove_group(id)?;
        write(&self.departed).retain(|(departed, _)| departed != id);
        Ok(())
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: &str) -> GroupConfig {
        GroupConfig {
            external_group_id: id.into(),
            lwm2m_server: None,
            buffer_owner: None,
            active_window_s: None,
            monitoring: None,
            trigger_after_s: None,
            wake_period_s: None,
        }
    }

    #[test]
    fn a_group_keeps_its_token_and_configuration_and_departed_ones_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let location = Url::parse("http://scef/3gpp-nidd/v1/as/configurations/g1").unwrap();
        let token = {
            let store = Store::open(dir.path()).unwrap();
            let table = GroupTable::load(
                &store,
                &[group("meters@fleet.example"), group("old@fleet.example")],
            )
            .unwrap();
            let meters = table.get(&"meters@fleet.example".parse().unwrap()).unwrap();
            table
                .set_nidd(
                    &meters,
                    Some(NiddState {
                        location: location.clone(),
                        status: None,
                        maximum_packet_size_bits: None,
                        notification_destination: None,
                        monitoring_subscription: None,
                        expires_at_ms: None,
                    }),
                )
                .unwrap();
            store.flush_blocking().unwrap();
            meters.callback_token.clone()
        };
        let store = Store::open(dir.path()).unwrap();
        let table = GroupTable::load(&store, &[group("meters@fleet.example")]).unwrap();
        let meters = table
            .by_token(&token)
            .expect("the same token after a restart");
        assert_eq!(meters.nidd().unwrap().location, location);
        let departed = table.departed();
        assert_eq!(departed.len(), 1);
        assert_eq!(departed[0].0, "old@fleet.example");
        table.forget_departed("old@fleet.example").unwrap();
        assert!(table.departed().is_empty());
        assert_eq!(store.groups().unwrap().len(), 1);
    }
}
