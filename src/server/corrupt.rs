//! Data corruption checks between members, as etcd 3.5's `etcdserver/corrupt.go` runs them:
//! HashKV; `--experimental-initial-corrupt-check`, which compares this member's HashKV with
//! every peer's before it serves clients and refuses to start on a mismatch; and
//! `--experimental-corrupt-check-time`, the leader's periodic check, which raises a CORRUPT
//! alarm through Raft for a member whose data differs (see [`crate::apply::alarms`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::peer::{peer_client, PeerError};
use super::{Core, Reader};
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{AlarmType, HashKvRequest, HashKvResponse};

impl Reader {
    /// A digest of the MVCC history up to `revision` (0: the current revision), comparable
    /// across members to check that they converged (see [`crate::mvcc::kv_hash`]). The same
    /// answer serves Maintenance.HashKV and the peers' corruption checks.
    ///
    /// Errors: ErrFutureRev above the current revision, ErrCompacted below the compaction
    /// revision.
    pub async fn hash_kv(&self, revision: i64) -> Result<HashKvResponse, EtcdError> {
        let state = self.applied();
        let rev = if revision <= 0 {
            state.revision
        } else {
            revision
        };
        if rev > state.revision {
            return Err(EtcdError::FutureRev);
        }
        if rev < state.compact_revision {
            return Err(EtcdError::Compacted);
        }
        let hash = self.shards().hash_kv(rev, state.compact_revision).await?;
        Ok(HashKvResponse {
            header: self.header(state.revision),
            hash,
            compact_revision: state.compact_revision,
            hash_revision: rev,
        })
    }
}

/// What one peer said about the revision this member hashed.
#[derive(Debug)]
enum PeerHash {
    /// Its hash at that revision, its compaction revision, and its current revision (the
    /// answer's header).
    Hash {
        hash: u32,
        compact_revision: i64,
        revision: i64,
    },
    /// It could not say (unreachable, behind, compacted past it): no verdict.
    Unknown(String),
}

/// How the peers' answers judge this member's `hash` at a revision, with its
/// `compact_revision` (etcd `InitialCheck`): a peer that hashed the same history (same
/// compaction revision) to another value is a mismatch. A different compaction revision makes
/// hashes incomparable, and a peer that could not answer gives no verdict; both are logged.
/// Returns the number of mismatches.
fn mismatches(hash: u32, compact_revision: i64, peers: &[(u64, PeerHash)]) -> usize {
    let mut count = 0;
    for (id, answer) in peers {
        let peer = format!("{id:x}");
        match answer {
            PeerHash::Hash {
                hash: theirs,
                compact_revision: their_compact,
                ..
            } if *theirs != hash => {
                if *their_compact == compact_revision {
                    tracing::warn!(%peer, local_hash = hash, remote_hash = theirs,
                        compact_revision, "found different hash values from remote peer");
                    count += 1;
                } else {
                    tracing::warn!(%peer, compact_revision, remote_compact_revision = their_compact,
                        "found different compact revision values from remote peer");
                }
            }
            PeerHash::Hash { .. } => {}
            PeerHash::Unknown(why) => {
                tracing::warn!(%peer, reason = %why, "cannot fetch hash from remote peer")
            }
        }
    }
    count
}

/// `--experimental-initial-corrupt-check`: before this member serves clients, compares its
/// HashKV at its current revision with every peer's at the same revision. It first waits
/// (up to the request timeout) until the Raft node and the state machine have applied
/// `committed` (the commit index this member recovered), so that the revision and the
/// membership table are those it stopped with: a durable engine's shards hold their data at
/// once, but the members come back only as the log replays.
///
/// Errors: "<member ID> found data inconsistency with peers" (etcd's message) when a peer with
/// the same compaction revision has a different hash; the member then does not start.
pub async fn initial_check(core: &Core, committed: u64) -> Result<(), CheckError> {
    // The Raft node updates the membership table as it hands entries over (even those durable
    // shards already hold), and the state machine publishes its own progress once every shard
    // has them. Both must reach `committed`.
    let mut replayed = core.node.status.replayed();
    let mut applied = core.reader.applied_changes();
    let caught_up = async {
        let _ = replayed.wait_for(|r| *r).await;
        let _ = applied.wait_for(|a| a.index >= committed).await;
    };
    if tokio::time::timeout(core.request_timeout(), caught_up)
        .await
        .is_err()
    {
        tracing::warn!(
            committed,
            applied = core.reader.applied().index,
            "initial corruption check: the log is still replaying; checking what is applied"
        );
    }
    let local = core.reader.hash_kv(0).await?;
    let me = core.member.id;
    tracing::info!(member = %format!("{me:x}"), revision = local.hash_revision,
        hash = local.hash, compact_revision = local.compact_revision,
        "starting initial corruption check");
    let peers = peer_hashes(core, local.hash_revision).await;
    let bad = mismatches(local.hash, local.compact_revision, &peers);
    if bad != 0 {
        return Err(CheckError::Inconsistent(me));
    }
    tracing::info!(
        member = %format!("{me:x}"),
        peers = peers.len(),
        "initial corruption check passed: no corruption detected"
    );
    Ok(())
}

/// Every other member's HashKV at `revision` (etcd `getPeerHashKVs`), learners included.
async fn peer_hashes(core: &Core, revision: i64) -> Vec<(u64, PeerHash)> {
    let me = core.member.id;
    let members = core.members.table().list();
    let mut peers = Vec::new();
    for m in members.into_iter().filter(|m| m.id != me) {
        peers.push((m.id, peer_hash(&m.peer_urls, revision).await));
    }
    peers
}

/// A HashKV answer of this member: the hash, the revision it hashed and the compaction
/// revision it hashed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LocalHash {
    hash: u32,
    revision: i64,
    compact_revision: i64,
}

impl From<&HashKvResponse> for LocalHash {
    fn from(r: &HashKvResponse) -> LocalHash {
        LocalHash {
            hash: r.hash,
            revision: r.hash_revision,
            compact_revision: r.compact_revision,
        }
    }
}

/// The leader's verdict in one periodic check (etcd 3.5 `corruptionMonitor.periodicCheck`):
/// which member to raise a CORRUPT alarm for, if any. `me` is the leader; `first` its hash at
/// its revision when the check began (the revision the peers were asked about), `second` its
/// hash at its revision after a linearizable read; `peers` the peers' answers about `first`'s
/// revision. In etcd's order, the first of these names the member:
///
/// - the leader itself, when its hash changed while its revision and compaction did not;
/// - a peer whose current revision is above the leader's (`second`): followers never lead;
/// - a peer whose compaction revision is above the leader's (`second`);
/// - a peer with the leader's compaction revision (`first`'s) and another hash.
///
/// Peers that could not answer (unreachable, behind the revision, compacted past it) are
/// skipped. Each mismatch is logged at error level.
fn periodic_verdict(
    me: u64,
    first: LocalHash,
    second: LocalHash,
    peers: &[(u64, PeerHash)],
) -> Option<u64> {
    let mut alarmed = None;
    let mut mismatch = |id: u64| {
        alarmed.get_or_insert(id);
    };
    if second.hash != first.hash
        && second.revision == first.revision
        && second.compact_revision == first.compact_revision
    {
        tracing::error!(
            revision_1 = first.revision,
            compact_revision_1 = first.compact_revision,
            hash_1 = first.hash,
            revision_2 = second.revision,
            compact_revision_2 = second.compact_revision,
            hash_2 = second.hash,
            "found hash mismatch"
        );
        mismatch(me);
    }
    for (id, answer) in peers {
        let PeerHash::Hash {
            hash,
            compact_revision,
            revision,
        } = *answer
        else {
            continue;
        };
        let peer = format!("{id:x}");
        if revision > second.revision {
            tracing::error!(leader_revision = second.revision, follower_revision = revision,
                follower_peer_id = %peer,
                "revision from follower must be less than or equal to leader's");
            mismatch(*id);
        }
        if compact_revision > second.compact_revision {
            tracing::error!(leader_compact_revision = second.compact_revision,
                follower_compact_revision = compact_revision, follower_peer_id = %peer,
                "compact revision from follower must be less than or equal to leader's");
            mismatch(*id);
        }
        if compact_revision == first.compact_revision && hash != first.hash {
            tracing::error!(leader_compact_revision = first.compact_revision,
                leader_hash = first.hash, follower_compact_revision = compact_revision,
                follower_hash = hash, follower_peer_id = %peer,
                "same compact revision then hashes must match");
            mismatch(*id);
        }
    }
    alarmed
}

/// `--experimental-corrupt-check-time`: every `every`, if this member leads, runs one
/// periodic check (etcd 3.5 `monitorKVHash`). Runs until the process stops.
pub async fn run_periodic_check(core: Arc<Core>, every: Duration) {
    tracing::info!(member = %format!("{:x}", core.member.id), interval = ?every,
        "enabled corruption checking");
    loop {
        tokio::time::sleep(every).await;
        if core.node.status.leader.load(Ordering::Relaxed) != core.member.id {
            continue;
        }
        if let Err(e) = periodic_check(&core).await {
            tracing::warn!(error = %e, "failed to check hash KV");
        }
    }
}

/// One periodic check: this member's HashKV, every peer's at the same revision, this member's
/// again after a linearizable read, then [`periodic_verdict`]; a CORRUPT alarm for the member
/// it names is proposed through Raft (unless that alarm is already active).
///
/// Errors: this member cannot hash, the linearizable read fails (no leader, timeout), or the
/// alarm cannot be proposed.
async fn periodic_check(core: &Core) -> Result<(), EtcdError> {
    let first = LocalHash::from(&core.reader.hash_kv(0).await?);
    let peers = peer_hashes(core, first.revision).await;
    core.reader.linearizable_state().await?;
    let second = LocalHash::from(&core.reader.hash_kv(0).await?);
    let checked = peers
        .iter()
        .filter(|(_, p)| matches!(p, PeerHash::Hash { .. }))
        .count();
    if let Some(id) = periodic_verdict(core.member.id, first, second, &peers) {
        let active = core.alarms.read(|t| {
            t.get(AlarmType::Corrupt as i32)
                .iter()
                .any(|a| a.member_id == id)
        });
        if !active {
            tracing::error!(member = %format!("{id:x}"), "data inconsistency found: raising a CORRUPT alarm");
            core.proposer.raise_alarm(id, AlarmType::Corrupt).await?;
        }
    }
    tracing::info!(
        number_of_peers_checked = checked,
        "finished peer corruption check"
    );
    Ok(())
}

/// Why the start-up corruption check ([`initial_check`]) stops the member.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// This member's own hash cannot be computed.
    #[error(transparent)]
    Hash(#[from] EtcdError),
    /// A peer with the same compaction revision has a different hash (etcd's message; the
    /// member is this one).
    #[error("{0:x} found data inconsistency with peers")]
    Inconsistent(u64),
}

/// A peer's HashKV at `revision`, asked of each of its peer URLs in turn.
async fn peer_hash(urls: &[String], revision: i64) -> PeerHash {
    let mut errors = Vec::new();
    for url in urls {
        let attempt = async {
            let mut client =
                peer_client(url, Duration::from_secs(2), Duration::from_secs(5)).await?;
            let resp = client
                .hash_kv(HashKvRequest { revision })
                .await?
                .into_inner();
            Ok::<_, PeerError>(resp)
        };
        match attempt.await {
            Ok(r) => {
                return PeerHash::Hash {
                    hash: r.hash,
                    compact_revision: r.compact_revision,
                    revision: r.header.map_or(0, |h| h.revision),
                }
            }
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    PeerHash::Unknown(errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_different_hash_of_the_same_history_is_a_mismatch() {
        let same = answer(7, 3, 10);
        let differs = answer(8, 3, 10);
        let other_compaction = answer(9, 5, 10);
        let unreachable = PeerHash::Unknown("connection refused".into());
        assert_eq!(mismatches(7, 3, &[(1, same), (2, other_compaction)]), 0);
        assert_eq!(mismatches(7, 3, &[(3, unreachable)]), 0);
        assert_eq!(mismatches(7, 3, &[(4, differs)]), 1);
    }

    fn answer(hash: u32, compact_revision: i64, revision: i64) -> PeerHash {
        PeerHash::Hash {
            hash,
            compact_revision,
            revision,
        }
    }

    fn local(hash: u32, revision: i64, compact_revision: i64) -> LocalHash {
        LocalHash {
            hash,
            revision,
            compact_revision,
        }
    }

    #[test]
    fn the_periodic_check_names_a_peer_that_hashed_the_same_history_differently() {
        let h = local(7, 10, 3);
        // The leader wrote meanwhile: its second hash differs at a later revision.
        let h2 = local(99, 12, 3);
        let agreeing = [(2, answer(7, 3, 11)), (3, answer(7, 3, 10))];
        assert_eq!(periodic_verdict(1, h, h2, &agreeing), None);
        let one_differs = [(2, answer(7, 3, 11)), (3, answer(8, 3, 10))];
        assert_eq!(periodic_verdict(1, h, h2, &one_differs), Some(3));
        // Only the first mismatch is raised.
        let both_differ = [(2, answer(5, 3, 10)), (3, answer(8, 3, 10))];
        assert_eq!(periodic_verdict(1, h, h2, &both_differ), Some(2));
    }

    #[test]
    fn the_periodic_check_skips_what_it_cannot_compare() {
        let h = local(7, 10, 3);
        // Compacted since (the leader's compaction moved on too): hashes are incomparable.
        let h2 = local(70, 12, 5);
        let peers = [
            (2, answer(9, 5, 12)),
            (
                3,
                PeerHash::Unknown("required revision is a future revision".into()),
            ),
        ];
        assert_eq!(periodic_verdict(1, h, h2, &peers), None);
    }

    #[test]
    fn the_periodic_check_names_a_peer_ahead_of_the_leader() {
        let h = local(7, 10, 3);
        let h2 = local(7, 10, 3);
        // A follower cannot have applied a revision the leader has not.
        assert_eq!(
            periodic_verdict(1, h, h2, &[(2, answer(7, 3, 11))]),
            Some(2)
        );
        // Nor compacted past the leader's compaction.
        assert_eq!(
            periodic_verdict(1, h, h2, &[(2, answer(6, 4, 10))]),
            Some(2)
        );
    }

    #[test]
    fn the_periodic_check_names_the_leader_when_its_own_hash_changed_in_place() {
        let h = local(7, 10, 3);
        let h2 = local(8, 10, 3);
        assert_eq!(
            periodic_verdict(1, h, h2, &[(2, answer(7, 3, 10))]),
            Some(1)
        );
    }
}
