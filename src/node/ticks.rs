//! `--initial-election-tick-advance`: how soon a starting member may campaign.

use std::time::Duration;

use crate::consensus::transport::Faults;
use crate::consensus::{initial_tick_advance, NodeMsg, RaftHandle, TickAdvance};

/// How often, and for how long, [`adjust_ticks`] looks for reachable peers (etcd: every 50 ms
/// for `rafthttp.ConnReadTimeout`, 5 s).
const TICK_ADVANCE_POLL: Duration = Duration::from_millis(50);
/// See [`TICK_ADVANCE_POLL`].
const TICK_ADVANCE_WAIT: Duration = Duration::from_secs(5);

/// `--initial-election-tick-advance` at start-up (etcd 3.5 `EtcdServer.adjustTicks`,
/// `server/etcdserver/server.go`): once the Raft thread has replayed the log it started with
/// as committed, the membership table decides (see
/// [`initial_tick_advance`]). In a multi-member cluster with the flag on, the peers' URLs are
/// dialed every 50 ms for up to 5 s; as soon as more than one peer answers (etcd's
/// `transport.ActivePeers() > 1`) the election clock is advanced by `election_ticks - 2`, so
/// the first campaign does not wait a whole election timeout. Peers cut by the test fault hook
/// (`faults`) count as unreachable. A member that does not know its cluster yet (a joiner
/// whose log is empty) does nothing: the leader contacts it.
pub(super) async fn adjust_ticks(
    node: RaftHandle,
    id: u64,
    enabled: bool,
    election_ticks: usize,
    faults: Faults,
) {
    // The membership table is whole once the Raft node has handed over what it knew to be
    // committed at start-up (bootstrap and --force-new-cluster entries included).
    let mut replayed = node.status.replayed();
    if !matches!(
        tokio::time::timeout(TICK_ADVANCE_WAIT, replayed.wait_for(|r| *r)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    let membership = node.membership.borrow().clone();
    if membership.members.is_empty() {
        tracing::info!("membership not known yet; no initial election tick advance");
        return;
    }
    match initial_tick_advance(membership.members.len(), election_ticks, enabled) {
        TickAdvance::SingleNode(ticks) => {
            // The Raft thread campaigns at once as the only voter: nothing left to advance.
            tracing::info!(
                local_member_id = %format!("{id:x}"),
                forward_ticks = ticks,
                election_ticks,
                "started as single-node; fast-forwarding election ticks"
            );
        }
        TickAdvance::Skip => {
            tracing::info!(election_ticks, "skipping initial election tick advance");
        }
        TickAdvance::AfterPeersConnect(ticks) => {
            tracing::info!(election_ticks, "starting initial election tick advance");
            let deadline = tokio::time::Instant::now() + TICK_ADVANCE_WAIT;
            let mut active = std::collections::BTreeSet::new();
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(TICK_ADVANCE_POLL).await;
                for m in membership.members.values() {
                    if m.id == id || active.contains(&m.id) || faults.blocks(m.id) {
                        continue;
                    }
                    if crate::consensus::transport::reachable(&m.peer_urls, TICK_ADVANCE_POLL * 4)
                        .await
                    {
                        active.insert(m.id);
                    }
                }
                if active.len() > 1 {
                    tracing::info!(
                        local_member_id = %format!("{id:x}"),
                        forward_ticks = ticks,
                        election_ticks,
                        active_remote_members = active.len(),
                        "initialized peer connections; fast-forwarding election ticks"
                    );
                    let _ = node.tx.send_async(NodeMsg::AdvanceTicks(ticks)).await;
                    return;
                }
            }
            tracing::info!(
                active_remote_members = active.len(),
                "fewer than two peers reachable; no initial election tick advance"
            );
        }
    }
}
