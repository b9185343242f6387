//! The replicated membership table: who is in the cluster, their URLs, learners, and the IDs
//! removed for good.
//!
//! Every change is a Raft conf change (raft-rs `ConfChangeV2`, one change at a time: Raft
//! paper section 4.1, "single-server changes") whose context is a
//! [`MembershipChange`]. The Raft thread applies them in log order, so every member derives the
//! same table from snapshot plus log. Validation follows etcd's
//! `RaftCluster.ValidateConfigurationChange`: a change the table rejects is not applied to
//! Raft either, so Raft's configuration and the table never disagree.

use std::collections::{BTreeMap, BTreeSet};

use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState};

use crate::error::EtcdError;
use crate::proto::metastorepb::{membership_change::Kind, MemberRecord, MembershipChange};

/// etcd's default `maxLearners` (`--experimental-max-learners`): one learner at a time.
pub const MAX_LEARNERS: usize = crate::config::defaults::MAX_LEARNERS;

/// The membership table at some Raft index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Current members by ID.
    pub members: BTreeMap<u64, MemberRecord>,
    /// IDs removed from the cluster; they can never come back.
    pub removed: BTreeSet<u64>,
}

impl Membership {
    /// The table a snapshot recorded.
    pub fn from_records(members: &[MemberRecord], removed: &[u64]) -> Self {
        Membership {
            members: members.iter().map(|m| (m.id, m.clone())).collect(),
            removed: removed.iter().copied().collect(),
        }
    }

    /// Members sorted by ID (MemberList's order).
    pub fn list(&self) -> Vec<MemberRecord> {
        self.members.values().cloned().collect()
    }

    /// Voting members' IDs.
    pub fn voters(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect()
    }

    /// Learners' IDs.
    pub fn learners(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.is_learner)
            .map(|m| m.id)
            .collect()
    }

    /// Whether `id` is a voting member (not a learner, not unknown).
    pub fn is_voter(&self, id: u64) -> bool {
        self.members.get(&id).is_some_and(|m| !m.is_learner)
    }

    /// Raft's configuration for this table.
    pub fn conf_state(&self) -> ConfState {
        ConfState::from((self.voters(), self.learners()))
    }

    /// Whether `url` is one of a member's peer URLs, other than `except`'s.
    fn url_in_use(&self, urls: &[String], except: u64) -> bool {
        self.members
            .values()
            .filter(|m| m.id != except)
            .any(|m| m.peer_urls.iter().any(|u| urls.contains(u)))
    }

    /// Checks a change against the table as etcd does at apply time.
    ///
    /// Errors: [`EtcdError::MemberNotFound`] for a removed or unknown ID,
    /// [`EtcdError::MemberExists`], [`EtcdError::PeerUrlExists`],
    /// [`EtcdError::TooManyLearners`], [`EtcdError::MemberNotLearner`].
    /// `max_learners` is `--experimental-max-learners`.
    pub fn validate(
        &self,
        change: &MembershipChange,
        max_learners: usize,
    ) -> Result<(), EtcdError> {
        let m = change.member.as_ref().ok_or(EtcdError::MemberNotFound)?;
        if self.removed.contains(&m.id) {
            return Err(EtcdError::MemberNotFound);
        }
        let existing = self.members.get(&m.id);
        match change.kind() {
            Kind::Add => {
                if existing.is_some() {
                    return Err(EtcdError::MemberExists);
                }
                if self.url_in_use(&m.peer_urls, 0) {
                    return Err(EtcdError::PeerUrlExists);
                }
                if m.is_learner && self.learners().len() >= max_learners {
                    return Err(EtcdError::TooManyLearners);
                }
            }
            Kind::Remove | Kind::Attributes => {
                existing.ok_or(EtcdError::MemberNotFound)?;
            }
            Kind::Promote => {
                if !existing.ok_or(EtcdError::MemberNotFound)?.is_learner {
                    return Err(EtcdError::MemberNotLearner);
                }
            }
            Kind::Update => {
                existing.ok_or(EtcdError::MemberNotFound)?;
                if self.url_in_use(&m.peer_urls, m.id) {
                    return Err(EtcdError::PeerUrlExists);
                }
            }
        }
        Ok(())
    }

    /// Validates and applies a change, with at most `max_learners` learners. Returns whether
    /// Raft's configuration changes with it.
    pub fn apply(
        &mut self,
        change: &MembershipChange,
        max_learners: usize,
    ) -> Result<bool, EtcdError> {
        self.validate(change, max_learners)?;
        let m = change.member.clone().unwrap_or_default();
        match change.kind() {
            Kind::Add => {
                self.members.insert(m.id, m);
                Ok(true)
            }
            Kind::Remove => {
                self.members.remove(&m.id);
                self.removed.insert(m.id);
                Ok(true)
            }
            Kind::Promote => {
                if let Some(e) = self.members.get_mut(&m.id) {
                    e.is_learner = false;
                }
                Ok(true)
            }
            Kind::Update => {
                if let Some(e) = self.members.get_mut(&m.id) {
                    e.peer_urls = m.peer_urls;
                }
                Ok(false)
            }
            Kind::Attributes => {
                if let Some(e) = self.members.get_mut(&m.id) {
                    e.name = m.name;
                    e.client_urls = m.client_urls;
                }
                Ok(false)
            }
        }
    }
}

/// The Raft side of a membership change: one single-node change. Updates and attribute
/// publications change nothing in Raft; they carry a change for node 0, which raft-rs treats
/// as a no-op (an empty change list would be refused by the leader as a request to leave a
/// joint configuration, like etcd's `ConfChangeUpdateNode` relies on `raft.None`). They are
/// never applied to Raft anyway.
pub fn raft_conf_change(change: &MembershipChange) -> ConfChangeV2 {
    let id = change.member.as_ref().map_or(0, |m| m.id);
    let (ty, node_id) = match change.kind() {
        Kind::Add if change.member.as_ref().is_some_and(|m| m.is_learner) => {
            (ConfChangeType::AddLearnerNode, id)
        }
        Kind::Add | Kind::Promote => (ConfChangeType::AddNode, id),
        Kind::Remove => (ConfChangeType::RemoveNode, id),
        Kind::Update | Kind::Attributes => (ConfChangeType::AddNode, 0),
    };
    let mut single = ConfChangeSingle::default();
    single.set_change_type(ty);
    single.node_id = node_id;
    let mut cc = ConfChangeV2::default();
    cc.mut_changes().push(single);
    cc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: Kind, id: u64, url: &str, learner: bool) -> MembershipChange {
        MembershipChange {
            kind: kind as i32,
            origin: 1,
            proposal: 1,
            member: Some(MemberRecord {
                id,
                name: String::new(),
                peer_urls: vec![url.to_string()],
                client_urls: vec![],
                is_learner: learner,
            }),
        }
    }

    #[test]
    fn follows_etcds_rules() {
        let mut t = Membership::default();
        assert_eq!(
            t.apply(&change(Kind::Add, 1, "http://a:1", false), MAX_LEARNERS),
            Ok(true)
        );
        assert_eq!(
            t.apply(&change(Kind::Add, 1, "http://b:1", false), MAX_LEARNERS),
            Err(EtcdError::MemberExists)
        );
        assert_eq!(
            t.apply(&change(Kind::Add, 2, "http://a:1", false), MAX_LEARNERS),
            Err(EtcdError::PeerUrlExists)
        );
        t.apply(&change(Kind::Add, 2, "http://b:1", true), MAX_LEARNERS)
            .unwrap();
        assert_eq!(
            t.apply(&change(Kind::Add, 3, "http://c:1", true), MAX_LEARNERS),
            Err(EtcdError::TooManyLearners)
        );
        assert_eq!(t.conf_state(), ConfState::from((vec![1], vec![2])));
        assert_eq!(
            t.apply(&change(Kind::Promote, 1, "", false), MAX_LEARNERS),
            Err(EtcdError::MemberNotLearner)
        );
        t.apply(&change(Kind::Promote, 2, "", false), MAX_LEARNERS)
            .unwrap();
        assert_eq!(t.voters(), vec![1, 2]);
        assert_eq!(
            t.apply(&change(Kind::Update, 2, "http://a:1", false), MAX_LEARNERS),
            Err(EtcdError::PeerUrlExists)
        );
        assert_eq!(
            t.apply(&change(Kind::Update, 2, "http://b:2", false), MAX_LEARNERS),
            Ok(false)
        );
        t.apply(&change(Kind::Remove, 2, "", false), MAX_LEARNERS)
            .unwrap();
        assert_eq!(
            t.apply(&change(Kind::Add, 2, "http://z:1", false), MAX_LEARNERS),
            Err(EtcdError::MemberNotFound),
            "a removed ID never comes back"
        );
        assert_eq!(
            t.apply(&change(Kind::Remove, 9, "", false), MAX_LEARNERS),
            Err(EtcdError::MemberNotFound)
        );
    }

    #[test]
    fn raft_side_is_one_change() {
        let cc = raft_conf_change(&change(Kind::Add, 5, "http://a:1", true));
        assert_eq!(cc.changes.len(), 1);
        assert_eq!(
            cc.changes[0].get_change_type(),
            ConfChangeType::AddLearnerNode
        );
        let update = raft_conf_change(&change(Kind::Update, 5, "http://a:1", false));
        assert_eq!(update.changes.len(), 1);
        assert_eq!(update.changes[0].node_id, 0, "a no-op for raft");
    }
}
