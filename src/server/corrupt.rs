//! Data corruption checks between members, as etcd 3.5's `etcdserver/corrupt.go` runs them:
//! HashKV, and `--experimental-initial-corrupt-check`, which compares this member's HashKV with
//! every peer's before it serves clients and refuses to start on a mismatch.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::peer::peer_client;
use super::Core;
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{HashKvRequest, HashKvResponse};

impl Core {
    /// A digest of the MVCC history up to `revision` (0: the current revision), comparable
    /// across members to check that they converged (see [`crate::mvcc::kv_hash`]). The same
    /// answer serves Maintenance.HashKV and the peers' corruption checks.
    ///
    /// Errors: ErrFutureRev above the current revision, ErrCompacted below the compaction
    /// revision.
    pub async fn hash_kv(&self, revision: i64) -> Result<HashKvResponse, EtcdError> {
        let state = *self.applied.borrow();
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
        let hash = self.shards.hash_kv(rev, state.compact_revision).await?;
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
    /// Its hash at that revision and its compaction revision.
    Hash { hash: u32, compact_revision: i64 },
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
pub async fn initial_check(core: &Core, committed: u64) -> anyhow::Result<()> {
    // The Raft node updates the membership table as it hands entries over (even those durable
    // shards already hold), and only then counts them as applied; the shards publish their
    // own progress. Both must reach `committed`.
    let deadline = tokio::time::Instant::now() + core.request_timeout;
    let caught_up = || {
        core.node.status.applied.load(Ordering::Relaxed) >= committed
            && core.applied.borrow().index >= committed
    };
    while !caught_up() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                committed,
                applied = core.applied.borrow().index,
                "initial corruption check: the log is still replaying; checking what is applied"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let local = core.hash_kv(0).await?;
    let me = core.member.id;
    tracing::info!(member = %format!("{me:x}"), revision = local.hash_revision,
        hash = local.hash, compact_revision = local.compact_revision,
        "starting initial corruption check");
    let members = core.node.membership.borrow().list();
    let mut peers = Vec::new();
    for m in members.into_iter().filter(|m| m.id != me) {
        peers.push((m.id, peer_hash(&m.peer_urls, local.hash_revision).await));
    }
    let bad = mismatches(local.hash, local.compact_revision, &peers);
    anyhow::ensure!(bad == 0, "{me:x} found data inconsistency with peers");
    tracing::info!(
        member = %format!("{me:x}"),
        peers = peers.len(),
        "initial corruption check passed: no corruption detected"
    );
    Ok(())
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
            anyhow::Ok(resp)
        };
        match attempt.await {
            Ok(r) => {
                return PeerHash::Hash {
                    hash: r.hash,
                    compact_revision: r.compact_revision,
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
        let same = PeerHash::Hash {
            hash: 7,
            compact_revision: 3,
        };
        let differs = PeerHash::Hash {
            hash: 8,
            compact_revision: 3,
        };
        let other_compaction = PeerHash::Hash {
            hash: 9,
            compact_revision: 5,
        };
        let unreachable = PeerHash::Unknown("connection refused".into());
        assert_eq!(mismatches(7, 3, &[(1, same), (2, other_compaction)]), 0);
        assert_eq!(mismatches(7, 3, &[(3, unreachable)]), 0);
        assert_eq!(mismatches(7, 3, &[(4, differs)]), 1);
    }
}
