//! Leases: the replicated lease table and the leader's lease clock.
//!
//! What is replicated (changed only by applying Raft entries, identical on every replica): which
//! leases exist, their granted TTL, and their checkpointed remaining TTL. The keys attached to
//! a lease are indexed in the shards that own them (`mvcc::Store::lease_keys`).
//!
//! What is not: each lease's wall-clock deadline. Only the leader's deadlines matter. When a
//! member becomes leader it first applies everything committed before its term, then sets
//! every deadline to now + remaining TTL (the checkpointed one, or the full TTL). Expiry is
//! detected by the leader and proposed as a LeaseRevoke through the log, so every replica
//! deletes the same keys at the same revision.
//!
//! Checkpoints (`--experimental-lease-checkpoint-interval`) record remaining TTLs through Raft,
//! so a restart or leader change extends a lease by at most one interval. A keep-alive clears
//! the checkpoint (a checkpoint with remaining TTL 0), so a renewed lease is not cut short by an
//! older checkpoint after a restart: etcd's known bug here (keep-alives not resetting the
//! checkpointed TTL) is not copied.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::metastorepb::LeaseRecord;

/// Largest TTL etcd accepts, seconds (`MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// One lease.
#[derive(Clone, Debug)]
pub struct Lease {
    /// Granted TTL, seconds (after raising to the minimum).
    pub ttl: i64,
    /// Remaining TTL at the last checkpoint, seconds (0 = none).
    pub remaining_ttl: i64,
    /// When the leader will revoke it (leader-local, not replicated).
    pub deadline: Instant,
}

impl Lease {
    /// Seconds until expiry, as etcd reports it (truncated, never below 0).
    pub fn remaining_secs(&self, now: Instant) -> i64 {
        self.deadline.saturating_duration_since(now).as_secs() as i64
    }
}

/// The lease table, shared between the dispatcher (which applies grants, revokes and
/// checkpoints) and the front end and lease clock (which renew and read deadlines).
#[derive(Clone, Default)]
pub struct LeaseTable {
    inner: Arc<Mutex<BTreeMap<i64, Lease>>>,
}

impl LeaseTable {
    /// Locks the table.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Lease>> {
        self.inner.lock().unwrap()
    }

    /// Whether `id` is granted.
    pub fn contains(&self, id: i64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Applies a grant: the deadline starts at a full TTL.
    pub fn grant(&self, id: i64, ttl: i64) {
        let deadline = Instant::now() + Duration::from_secs(ttl as u64);
        self.lock().insert(
            id,
            Lease {
                ttl,
                remaining_ttl: 0,
                deadline,
            },
        );
    }

    /// Applies a revoke; returns whether the lease existed.
    pub fn revoke(&self, id: i64) -> bool {
        self.lock().remove(&id).is_some()
    }

    /// Applies a checkpoint of the remaining TTL; returns the lease's TTL if it exists.
    pub fn checkpoint(&self, id: i64, remaining_ttl: i64) -> Option<i64> {
        let mut table = self.lock();
        let l = table.get_mut(&id)?;
        l.remaining_ttl = remaining_ttl;
        Some(l.ttl)
    }

    /// Renews a lease on the leader (keep-alive): returns its TTL and whether a checkpoint must
    /// be cleared, or `None` for an unknown lease.
    pub fn renew(&self, id: i64) -> Option<(i64, bool)> {
        let mut table = self.lock();
        let l = table.get_mut(&id)?;
        l.deadline = Instant::now() + Duration::from_secs(l.ttl as u64);
        Some((l.ttl, l.remaining_ttl != 0))
    }

    /// On becoming leader: every deadline restarts from the checkpointed remaining TTL, or the
    /// full TTL when there is none.
    pub fn promote(&self) {
        let now = Instant::now();
        for l in self.lock().values_mut() {
            let secs = if l.remaining_ttl > 0 {
                l.remaining_ttl
            } else {
                l.ttl
            };
            l.deadline = now + Duration::from_secs(secs as u64);
        }
    }

    /// The replicated part, for snapshots.
    pub fn records(&self) -> Vec<LeaseRecord> {
        self.lock()
            .iter()
            .map(|(id, l)| LeaseRecord {
                id: *id,
                ttl: l.ttl,
                remaining_ttl: l.remaining_ttl,
            })
            .collect()
    }

    /// Restores the replicated part from a snapshot.
    pub fn restore(&self, records: &[LeaseRecord]) {
        let now = Instant::now();
        let mut table = self.lock();
        table.clear();
        for r in records {
            let deadline = now + Duration::from_secs(r.ttl as u64);
            table.insert(
                r.id,
                Lease {
                    ttl: r.ttl,
                    remaining_ttl: r.remaining_ttl,
                    deadline,
                },
            );
        }
    }
}

/// The lease minimum TTL, seconds: ceil(1.5 x election timeout), as etcd's lessor computes it.
pub fn min_ttl_secs(election_timeout_ms: u64) -> i64 {
    (3 * election_timeout_ms).div_ceil(2 * 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_matches_etcd_default() {
        assert_eq!(min_ttl_secs(1000), 2);
        assert_eq!(min_ttl_secs(5000), 8);
    }

    #[test]
    fn promote_uses_checkpointed_remaining_ttl() {
        let t = LeaseTable::default();
        t.grant(1, 100);
        t.grant(2, 100);
        t.checkpoint(1, 10);
        t.promote();
        let now = Instant::now();
        let table = t.lock();
        assert!(table[&1].remaining_secs(now) <= 10);
        assert!(table[&2].remaining_secs(now) >= 99);
    }

    #[test]
    fn renew_asks_to_clear_a_checkpoint() {
        let t = LeaseTable::default();
        t.grant(1, 30);
        assert_eq!(t.renew(1), Some((30, false)));
        t.checkpoint(1, 5);
        assert_eq!(t.renew(1), Some((30, true)));
        assert_eq!(t.renew(9), None);
    }
}
