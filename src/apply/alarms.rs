//! The replicated alarm table, as etcd 3.5's `server/etcdserver/api/v3alarm/alarms.go` keeps it:
//! a set of (member ID, alarm type) pairs. Alarm ACTIVATE/DEACTIVATE travel through the Raft log
//! ([`crate::proto::metastorepb::proposal::Request::Alarm`]) and are applied by the dispatcher
//! on every member, so every member holds the same table; it goes into snapshots
//! (`StateSnapshot.alarms`) and is rebuilt from the WAL on restart.
//!
//! While an alarm is active, the dispatcher refuses requests as etcd's appliers do
//! (`server/etcdserver/apply.go` `applierV3Capped`, `corrupt.go` `applierV3Corrupt`): see
//! [`AlarmTable::refusal`].

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use crate::error::EtcdError;
use crate::proto::etcdserverpb::{AlarmMember, AlarmType};

/// The set of active alarms: (member ID, alarm type as the proto's `i32`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlarmTable {
    active: BTreeSet<(u64, i32)>,
}

/// Which kind of request [`AlarmTable::refusal`] judges, by what etcd's alarm appliers refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guarded {
    /// A Put.
    Put,
    /// A DeleteRange.
    DeleteRange,
    /// A Txn; `writes`: some op (nested ones too) is not a Range (etcd `isTxnReadonly` is
    /// false); `puts`: some op (nested ones too) is a Put (a positive etcd quota `Cost`).
    Txn {
        /// Not read-only.
        writes: bool,
        /// Holds a put.
        puts: bool,
    },
    /// A Compaction.
    Compaction,
    /// A LeaseGrant.
    LeaseGrant,
    /// A LeaseRevoke (a client's, or an expiry).
    LeaseRevoke,
}

impl AlarmTable {
    /// A table holding `alarms` (a snapshot's).
    pub fn from_members(alarms: &[AlarmMember]) -> AlarmTable {
        AlarmTable {
            active: alarms.iter().map(|a| (a.member_id, a.alarm)).collect(),
        }
    }

    /// Raises `alarm` for `member` (etcd `AlarmStore.Activate`). Returns the alarm, whether
    /// new or already active; `None` for the NONE type, which etcd's applier ignores.
    pub fn activate(&mut self, member: u64, alarm: i32) -> Option<AlarmMember> {
        if alarm == AlarmType::None as i32 {
            return None;
        }
        self.active.insert((member, alarm));
        Some(AlarmMember {
            member_id: member,
            alarm,
        })
    }

    /// Clears `alarm` for `member` (etcd `AlarmStore.Deactivate`). Returns the alarm cleared,
    /// or `None` if it was not active: deactivating an alarm not raised is a no-op.
    pub fn deactivate(&mut self, member: u64, alarm: i32) -> Option<AlarmMember> {
        self.active.remove(&(member, alarm)).then_some(AlarmMember {
            member_id: member,
            alarm,
        })
    }

    /// The active alarms of type `alarm`, or all of them for NONE (etcd `AlarmStore.Get`),
    /// sorted by member ID then type.
    pub fn get(&self, alarm: i32) -> Vec<AlarmMember> {
        self.active
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None as i32 || *a == alarm)
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    /// Whether any member has an `alarm` alarm active.
    pub fn is_active(&self, alarm: AlarmType) -> bool {
        self.active.iter().any(|(_, a)| *a == alarm as i32)
    }

    /// Whether no alarm is active.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Why the active alarms refuse `request`, if they do:
    ///
    /// - CORRUPT (etcd `applierV3Corrupt`): Put, DeleteRange, Txn, Compaction, LeaseGrant and
    ///   LeaseRevoke fail with [`EtcdError::Corrupt`] ("etcdserver: corrupt cluster"). As in
    ///   etcd 3.5, a read-only Txn is not refused: etcd serves it (like every Range) through
    ///   `applyV3Base`, never through the alarm applier.
    /// - NOSPACE (etcd `applierV3Capped`): Put, a Txn with a put, and LeaseGrant fail with
    ///   [`EtcdError::NoSpace`] ("etcdserver: mvcc: database space exceeded"); deletes,
    ///   compactions, revokes and reads go on, so that space can be freed.
    ///
    /// CORRUPT is checked first: a corrupt cluster refuses more.
    pub fn refusal(&self, request: Guarded) -> Option<EtcdError> {
        if self.is_empty() {
            return None;
        }
        let corrupt = match request {
            Guarded::Txn { writes, .. } => writes,
            _ => true,
        };
        if corrupt && self.is_active(AlarmType::Corrupt) {
            return Some(EtcdError::Corrupt);
        }
        let capped = match request {
            Guarded::Put | Guarded::LeaseGrant => true,
            Guarded::Txn { puts, .. } => puts,
            _ => false,
        };
        (capped && self.is_active(AlarmType::Nospace)).then_some(EtcdError::NoSpace)
    }

    /// The alarms as Status lists them in `errors` (etcd: each `AlarmMember`'s text form,
    /// `"memberID:<decimal ID> alarm:<TYPE> "`).
    pub fn status_errors(&self) -> Vec<String> {
        self.get(AlarmType::None as i32)
            .into_iter()
            .map(|a| {
                let name = AlarmType::try_from(a.alarm)
                    .map(|t| t.as_str_name().to_string())
                    .unwrap_or_else(|_| a.alarm.to_string());
                format!("memberID:{} alarm:{name} ", a.member_id)
            })
            .collect()
    }
}

/// The alarm table shared between the dispatcher (the only writer, as it applies alarm
/// requests) and the front end (quota checks, Status).
#[derive(Clone, Debug, Default)]
pub struct SharedAlarms(Arc<RwLock<AlarmTable>>);

impl SharedAlarms {
    /// A copy of the table.
    pub fn snapshot(&self) -> AlarmTable {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `f` on the table.
    pub fn read<T>(&self, f: impl FnOnce(&AlarmTable) -> T) -> T {
        f(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `f` on the table, mutably (the dispatcher only).
    pub fn write<T>(&self, f: impl FnOnce(&mut AlarmTable) -> T) -> T {
        f(&mut self.0.write().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOSPACE: i32 = AlarmType::Nospace as i32;
    const CORRUPT: i32 = AlarmType::Corrupt as i32;
    const NONE: i32 = AlarmType::None as i32;

    #[test]
    fn activate_and_deactivate_follow_etcds_alarm_store() {
        let mut t = AlarmTable::default();
        assert_eq!(t.activate(1, NONE), None, "NONE is never raised");
        assert!(t.is_empty());
        let raised = t.activate(2, NOSPACE).unwrap();
        assert_eq!((raised.member_id, raised.alarm), (2, NOSPACE));
        // Raising it again returns the alarm and changes nothing.
        assert_eq!(t.activate(2, NOSPACE), Some(raised));
        t.activate(1, CORRUPT);
        assert_eq!(t.get(NONE).len(), 2);
        assert_eq!(t.get(NOSPACE), vec![raised]);
        // Not raised: a no-op.
        assert_eq!(t.deactivate(1, NOSPACE), None);
        assert_eq!(t.deactivate(0, NONE), None);
        assert_eq!(t.get(NONE).len(), 2);
        assert_eq!(t.deactivate(2, NOSPACE), Some(raised));
        assert!(!t.is_active(AlarmType::Nospace));
        assert!(t.is_active(AlarmType::Corrupt));
    }

    #[test]
    fn get_lists_by_member_then_type_and_round_trips_through_a_snapshot() {
        let mut t = AlarmTable::default();
        t.activate(9, NOSPACE);
        t.activate(3, CORRUPT);
        t.activate(3, NOSPACE);
        let all = t.get(NONE);
        let ids: Vec<(u64, i32)> = all.iter().map(|a| (a.member_id, a.alarm)).collect();
        assert_eq!(ids, vec![(3, NOSPACE), (3, CORRUPT), (9, NOSPACE)]);
        assert_eq!(AlarmTable::from_members(&all), t);
        assert_eq!(
            t.status_errors(),
            vec![
                "memberID:3 alarm:NOSPACE ",
                "memberID:3 alarm:CORRUPT ",
                "memberID:9 alarm:NOSPACE "
            ]
        );
    }

    #[test]
    fn nospace_refuses_only_what_grows_the_backend() {
        let mut t = AlarmTable::default();
        t.activate(1, NOSPACE);
        let no = Some(EtcdError::NoSpace);
        assert_eq!(t.refusal(Guarded::Put), no);
        assert_eq!(t.refusal(Guarded::LeaseGrant), no);
        let put_txn = Guarded::Txn {
            writes: true,
            puts: true,
        };
        assert_eq!(t.refusal(put_txn), no);
        let delete_txn = Guarded::Txn {
            writes: true,
            puts: false,
        };
        assert_eq!(t.refusal(delete_txn), None);
        for allowed in [
            Guarded::DeleteRange,
            Guarded::Compaction,
            Guarded::LeaseRevoke,
        ] {
            assert_eq!(t.refusal(allowed), None, "{allowed:?}");
        }
    }

    #[test]
    fn corrupt_refuses_every_write_and_outranks_nospace() {
        let mut t = AlarmTable::default();
        t.activate(1, NOSPACE);
        t.activate(2, CORRUPT);
        for refused in [
            Guarded::Put,
            Guarded::DeleteRange,
            Guarded::Compaction,
            Guarded::LeaseGrant,
            Guarded::LeaseRevoke,
            Guarded::Txn {
                writes: true,
                puts: false,
            },
        ] {
            assert_eq!(t.refusal(refused), Some(EtcdError::Corrupt), "{refused:?}");
        }
        let read_only = Guarded::Txn {
            writes: false,
            puts: false,
        };
        assert_eq!(t.refusal(read_only), None);
        t.deactivate(2, CORRUPT);
        assert_eq!(t.refusal(Guarded::Put), Some(EtcdError::NoSpace));
        t.deactivate(1, NOSPACE);
        assert_eq!(t.refusal(Guarded::Put), None);
    }
}
