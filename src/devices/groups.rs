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
    nidd: Mutex<Option<NiddState>>,
    members: Mutex<HashSet<DeviceId>>,
    /// Held while the group's configuration is being created.
    pub(crate) provisioning: tokio::sync::Mutex<()>,
    /// A reported termination is being checked with the SCEF.
    checking_termination: AtomicBool,
}

impl Group {
    fn new(id: ExternalId, callback_token: String, settings: GroupConfig) -> Self {
        Self {
            id,
            callback_token,
            settings,
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

    fn record(&self) -> GroupRecord {
        GroupRecord {
            callback_token: self.callback_token.clone(),
            nidd: self.nidd().as_ref().map(NiddState::stored),
        }
    }
}

/// Every configured group, by identity and by callback token.
pub(crate) struct GroupTable {
    by_id: HashMap<ExternalId, Arc<Group>>,
    by_token: HashMap<String, Arc<Group>>,
    /// Stored groups no `[[groups]]` entry names any more: their configurations are deleted.
    departed: RwLock<Vec<(String, GroupRecord)>>,
    store: Store,
}

impl GroupTable {
    /// The configured groups, each continuing from its stored record (token, configuration);
    /// a new group's record is written (its token durable) before anything is asked for it.
    pub(crate) fn load(store: &Store, configs: &[GroupConfig]) -> Result<Self, StoreError> {
        let mut stored: HashMap<String, GroupRecord> = store.groups()?.into_iter().collect();
        let mut by_id = HashMap::new();
        let mut by_token = HashMap::new();
        for settings in configs {
            let Ok(id) = settings.group_id() else {
                continue;
            };
            let record = stored.remove(id.as_str());
            let token = record
                .as_ref()
                .map(|r| r.callback_token.clone())
                .unwrap_or_else(mint_capability_token);
            let group = Group::new(id.clone(), token.clone(), settings.clone());
            *lock(&group.nidd) = record.and_then(|r| r.nidd).and_then(NiddState::from_stored);
            store.put_group(id.as_str(), &group.record())?;
            let group = Arc::new(group);
            by_token.insert(token, group.clone());
            by_id.insert(id, group);
        }
        Ok(Self {
            by_id,
            by_token,
            departed: RwLock::new(stored.into_iter().collect()),
            store: store.clone(),
        })
    }

    pub(crate) fn get(&self, id: &ExternalId) -> Option<Arc<Group>> {
        self.by_id.get(id).cloned()
    }

    /// The group whose callback URL carries `token`.
    pub(crate) fn by_token(&self, token: &str) -> Option<Arc<Group>> {
        self.by_token.get(token).cloned()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = Arc<Group>> + '_ {
        self.by_id.values().cloned()
    }

    pub(crate) fn ids(&self) -> HashSet<ExternalId> {
        self.by_id.keys().cloned().collect()
    }

    /// Records the group's configuration (persisted first). The caller brings the members'
    /// copies in step (`DeviceTable::mirror_group`).
    pub(crate) fn set_nidd(
        &self,
        group: &Group,
        nidd: Option<NiddState>,
    ) -> Result<(), StoreError> {
        let mut record = group.record();
        record.nidd = nidd.as_ref().map(NiddState::stored);
        self.store.put_group(group.id.as_str(), &record)?;
        *lock(&group.nidd) = nidd;
        Ok(())
    }

    /// Stored groups the configuration no longer names, with what they had at the SCEF.
    pub(crate) fn departed(&self) -> Vec<(String, GroupRecord)> {
        self.departed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A departed group's side at the SCEF is deleted: its record goes.
    pub(crate) fn forget_departed(&self, id: &str) -> Result<(), StoreError> {
        self.store.remove_group(id)?;
        self.departed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(departed, _)| departed != id);
        Ok(())
    }
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
