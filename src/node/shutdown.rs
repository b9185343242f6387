//! Stopping a member: the threads it waits for, the shards it closes, and the leadership
//! hand-over a stopping leader makes first.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::consensus::NodeMsg;
use crate::server::Core;
use crate::shard::Shards;

/// How long a stop lets the client connections finish their requests (etcd's `stopServers`
/// gives gRPC's `GracefulStop` the request timeout before `Stop`); requests still unanswered
/// then are cut.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stop waits for the Raft thread to finish what it holds.
pub(super) const THREADS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stop waits for the shards to sync their engines' files (RocksDB flushes its
/// memtables), close them and end their threads, all shards together.
pub(super) const SHARDS_TIMEOUT: Duration = Duration::from_secs(10);

/// Closes the shards ([`Shards::close`], at most [`SHARDS_TIMEOUT`]) and logs how it went:
/// "stopping: shards flushed and closed", or a warning per shard that was not.
pub(super) async fn close_shards(shards: Shards) {
    tracing::info!("stopping: flushing and closing the shards");
    match shards.close(SHARDS_TIMEOUT).await {
        Ok(()) => tracing::info!("stopping: shards flushed and closed"),
        Err(errors) => {
            for error in errors {
                tracing::warn!(error = %error, "stopping: a shard did not close cleanly");
            }
        }
    }
}

/// A named thread of the member (Raft), with a signal for when its body has returned,
/// so a stop can wait for it on the runtime without blocking a worker.
pub(super) struct Worker {
    name: &'static str,
    handle: std::thread::JoinHandle<()>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    /// Starts `body` on a thread named `name`.
    ///
    /// Errors: the OS refuses the thread.
    pub(super) fn spawn(
        name: &'static str,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<Worker> {
        let (tx, done) = oneshot::channel();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Dropped when the body returns or unwinds: the waiter wakes either way.
                let _done = tx;
                body();
            })?;
        Ok(Worker { name, handle, done })
    }

    /// Waits up to `timeout` for the thread to finish and joins it; a thread still busy then
    /// is left to the process exit.
    pub(super) async fn join(self, timeout: Duration) {
        let Worker { name, handle, done } = self;
        if tokio::time::timeout(timeout, done).await.is_ok() {
            // The body has returned: joining only collects the thread.
            let _ = handle.join();
            tracing::info!(thread = name, "stopping: thread finished");
        } else {
            tracing::warn!(
                thread = name,
                "stopping: thread still busy; leaving it to the exit"
            );
        }
    }
}

/// Asks the Raft thread to stop after the round it is in ([`NodeMsg::Stop`]: its WAL writes
/// done) and waits up to [`THREADS_TIMEOUT`] for it to leave its loop.
pub(super) async fn stop_raft(core: &Core) {
    tracing::info!("stopping: stopping the raft thread");
    let (tx, rx) = oneshot::channel();
    if core.node.tx.send_async(NodeMsg::Stop(tx)).await.is_ok() {
        let _ = tokio::time::timeout(THREADS_TIMEOUT, rx).await;
    }
}

/// etcd's `EtcdServer.TransferLeadership` on stop (`server/etcdserver/server.go`): when this
/// member leads and the cluster has other voters, hands leadership to the most caught-up voter
/// the leader hears from (highest matched index, then the longest connected; etcd picks the
/// longest connected) and waits until another member leads, at most two election timeouts
/// (raft-rs abandons a transfer after one; it is asked once more). Nothing to do otherwise.
/// A transfer that does not land is logged, and the member stops anyway: the others then
/// elect a leader after an election timeout, as on a crash.
pub(super) async fn transfer_leadership(core: &Arc<Core>) {
    let me = core.member.id;
    let status = &core.node.status;
    if status.leader.load(Ordering::Relaxed) != me {
        return;
    }
    let voters = core.node.membership.borrow().voters();
    if !voters.iter().any(|&v| v != me) {
        return;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if core
        .node
        .tx
        .send_async(NodeMsg::Progress(tx))
        .await
        .is_err()
    {
        return;
    }
    let progress = rx.await.unwrap_or_default();
    let target = progress
        .iter()
        .filter(|p| p.id != me && voters.contains(&p.id) && p.connected_for.is_some())
        .max_by_key(|p| (p.matched, p.connected_for))
        .map(|p| p.id);
    let Some(target) = target else {
        tracing::warn!(
            "stopping: leader, but no other voter is reachable; not transferring leadership"
        );
        return;
    };
    tracing::info!(
        from = %format!("{me:x}"),
        to = %format!("{target:x}"),
        "stopping: leader; transferring leadership"
    );
    let election = Duration::from_millis(core.cfg.election_timeout.max(1));
    let deadline = tokio::time::Instant::now() + 2 * election;
    let mut changes = status.subscribe();
    // raft-rs abandons a transfer after an election timeout: ask again after each one.
    while tokio::time::Instant::now() < deadline {
        if core
            .node
            .tx
            .send_async(NodeMsg::TransferLeader(target))
            .await
            .is_err()
        {
            return;
        }
        let wait = election.min(deadline - tokio::time::Instant::now());
        let other = |l: &crate::consensus::Leadership| l.leader != me && l.leader != 0;
        match tokio::time::timeout(wait, changes.wait_for(other)).await {
            Ok(Ok(now)) => {
                tracing::info!(
                    from = %format!("{me:x}"),
                    to = %format!("{:x}", now.leader),
                    "stopping: transferred leadership"
                );
                return;
            }
            // The Raft thread is gone: nothing to hand over.
            Ok(Err(_)) => return,
            Err(_) => {}
        }
    }
    tracing::warn!(
        to = %format!("{target:x}"),
        "stopping: leadership transfer did not finish in time; stopping anyway"
    );
}
