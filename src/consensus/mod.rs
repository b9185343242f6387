//! The Raft node: the batching proposer, raft-rs's `RawNode`, and the WAL.
//!
//! One thread owns the `RawNode`. Its loop:
//!
//! ```text
//!  wait for a message or the next tick
//!    Propose  -> appended to the current batch (length-delimited Proposals)
//!    ReadIndex-> collected; one raft ReadIndex for all of them
//!  propose the batch as one entry (never waits for more: a batch is whatever queued up while
//!  the previous fsync ran, so a lone client pays no added latency)
//!  tick every --heartbeat-interval
//!  handle Ready, in raft-rs's documented order:
//!    send messages -> apply snapshot -> hand committed entries to the dispatcher
//!    -> append entries + hard state to the WAL, one fsync -> send persisted messages
//!    -> advance -> hand newly committed entries to the dispatcher -> advance_apply
//! ```
//!
//! A single member still runs all of this: it is a one-voter Raft group that elects itself.

mod logger;
pub mod snapshot;
pub mod wal;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Snapshot};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};
use tokio::sync::oneshot;

use crate::apply::{CommittedEntry, Pending, SnapshotTaken};
use crate::error::EtcdError;
use crate::proto::metastorepb::StateSnapshot;
use wal::{Recovered, Wal};

/// Upper bound on one proposal batch (one Raft entry), bytes.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Messages to the Raft node thread.
pub enum NodeMsg {
    /// Append a client write to the next batch.
    Propose {
        /// Proposal ID (see [`crate::apply::Pending`]).
        id: u64,
        /// The encoded `metastorepb.Proposal`.
        data: Vec<u8>,
    },
    /// Ask for a ReadIndex (Raft paper section 6.4): replies with the commit index a
    /// linearizable read must wait to see applied.
    ReadIndex(oneshot::Sender<Result<u64, EtcdError>>),
}

/// Raft progress, readable from any thread.
#[derive(Debug, Default)]
pub struct NodeStatus {
    /// Current term.
    pub term: AtomicU64,
    /// Known leader's member ID (0 = none).
    pub leader: AtomicU64,
    /// Commit index.
    pub commit: AtomicU64,
    /// Last log index.
    pub last_index: AtomicU64,
}

/// How to reach the Raft node thread.
#[derive(Clone)]
pub struct NodeHandle {
    /// The node's inbox.
    pub tx: flume::Sender<NodeMsg>,
    /// Its progress.
    pub status: Arc<NodeStatus>,
}

/// Raft settings derived from the member configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This member's ID (Raft node ID).
    pub id: u64,
    /// Voting members' IDs.
    pub voters: Vec<u64>,
    /// Tick length, ms (`--heartbeat-interval`).
    pub heartbeat_ms: u64,
    /// Election timeout, ms (`--election-timeout`); a multiple of the tick.
    pub election_ms: u64,
}

/// The Raft node thread's state.
pub struct RaftNode {
    raw: RawNode<MemStorage>,
    wal: Wal,
    inbox: flume::Receiver<NodeMsg>,
    snapshots: flume::Receiver<SnapshotTaken>,
    committed: flume::Sender<Vec<CommittedEntry>>,
    pending: Arc<Pending>,
    status: Arc<NodeStatus>,
    tick: Duration,
    batch: Vec<u8>,
    batch_ids: Vec<u64>,
    read_waiters: Vec<oneshot::Sender<Result<u64, EtcdError>>>,
    reads_in_flight: HashMap<u64, Vec<oneshot::Sender<Result<u64, EtcdError>>>>,
    next_read_ctx: u64,
}

impl RaftNode {
    /// Builds the node from what recovery found: the snapshot (if any) and the WAL records
    /// after it.
    /// `applied` is the index the state machine already holds (at least the snapshot's).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &NodeConfig,
        snap: Option<&StateSnapshot>,
        applied: u64,
        wal: Wal,
        recovered: Recovered,
        pending: Arc<Pending>,
        committed: flume::Sender<Vec<CommittedEntry>>,
        snapshots: flume::Receiver<SnapshotTaken>,
    ) -> anyhow::Result<(RaftNode, NodeHandle)> {
        let conf_state = ConfState::from((cfg.voters.clone(), Vec::new()));
        let (storage, snap_index) = match snap {
            Some(s) => {
                let storage = MemStorage::new();
                let mut rs = Snapshot::default();
                rs.mut_metadata().index = s.index;
                rs.mut_metadata().term = s.term;
                rs.mut_metadata()
                    .set_conf_state(ConfState::from((s.voters.clone(), s.learners.clone())));
                storage.wl().apply_snapshot(rs)?;
                (storage, s.index)
            }
            None => (MemStorage::new_with_conf_state(conf_state), 0),
        };
        storage.wl().append(&recovered.entries)?;
        let last_index = recovered.entries.last().map_or(snap_index, |e| e.index);
        if recovered.hard_state.is_some() || applied > snap_index {
            let mut hs = recovered.hard_state.unwrap_or_default();
            // What the snapshot or the durable state machine holds was committed; the log
            // cannot commit what it lacks.
            hs.commit = hs.commit.max(snap_index).max(applied).min(last_index);
            hs.term = hs.term.max(storage.rl().hard_state().term);
            if let Some(last) = recovered.entries.last() {
                hs.term = hs.term.max(last.term);
            }
            storage.wl().set_hardstate(hs);
        }
        let election_tick = (cfg.election_ms / cfg.heartbeat_ms.max(1)).max(2) as usize;
        let config = raft::Config {
            id: cfg.id,
            election_tick,
            heartbeat_tick: 1,
            applied: applied.max(snap_index).min(last_index),
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let mut raw = RawNode::new(&config, storage, &logger::raft_logger())?;
        if cfg.voters == [cfg.id] {
            // Alone in the group: no need to wait out an election timeout.
            raw.campaign()?;
        }
        let (tx, inbox) = flume::bounded(16 * 1024);
        let status = Arc::new(NodeStatus::default());
        let node = RaftNode {
            raw,
            wal,
            inbox,
            snapshots,
            committed,
            pending,
            status: status.clone(),
            tick: Duration::from_millis(cfg.heartbeat_ms.max(1)),
            batch: Vec::new(),
            batch_ids: Vec::new(),
            read_waiters: Vec::new(),
            reads_in_flight: HashMap::new(),
            next_read_ctx: 0,
        };
        node.publish_status();
        Ok((node, NodeHandle { tx, status }))
    }

    /// Runs until every [`NodeHandle`] is dropped. A WAL failure is fatal: nothing can be
    /// acknowledged without it, so the process stops rather than serving stale promises.
    pub fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            match self.inbox.recv_deadline(next_tick) {
                Ok(msg) => {
                    self.on_msg(msg);
                    // Whatever queued up meanwhile joins this batch.
                    while let Ok(msg) = self.inbox.try_recv() {
                        self.on_msg(msg);
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
            self.flush_batch();
            self.flush_reads();
            if Instant::now() >= next_tick {
                self.raw.tick();
                next_tick = Instant::now() + self.tick;
            }
            while let Ok(s) = self.snapshots.try_recv() {
                self.compact_log(s);
            }
            self.ready_or_exit();
            if !self.read_waiters.is_empty() {
                // Held reads may now go: the leader's first entry may have just committed.
                self.flush_reads();
                self.ready_or_exit();
            }
            self.publish_status();
        }
    }

    fn ready_or_exit(&mut self) {
        if let Err(e) = self.on_ready() {
            tracing::error!(error = %e, "fatal: cannot persist the Raft log");
            std::process::exit(1);
        }
    }

    fn on_msg(&mut self, msg: NodeMsg) {
        match msg {
            NodeMsg::Propose { id, data } => {
                if !self.batch.is_empty() && self.batch.len() + data.len() + 10 > MAX_BATCH_BYTES {
                    self.flush_batch();
                }
                prost::encoding::encode_varint(data.len() as u64, &mut self.batch);
                self.batch.extend_from_slice(&data);
                self.batch_ids.push(id);
            }
            NodeMsg::ReadIndex(tx) => self.read_waiters.push(tx),
        }
    }

    fn flush_batch(&mut self) {
        if self.batch_ids.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.batch);
        let ids = std::mem::take(&mut self.batch_ids);
        if let Err(e) = self.raw.propose(Vec::new(), data) {
            tracing::debug!(error = %e, "proposal dropped");
            for id in ids {
                self.pending.complete(id, Err(EtcdError::NoLeader));
            }
        }
    }

    fn flush_reads(&mut self) {
        if self.read_waiters.is_empty() {
            return;
        }
        if self.raw.raft.state != StateRole::Leader {
            for w in self.read_waiters.drain(..) {
                let _ = w.send(Err(EtcdError::NoLeader));
            }
            return;
        }
        // raft-rs drops a ReadIndex until the leader has committed an entry of its own term
        // (Raft paper section 6.4); hold the reads until then instead of losing them.
        if !self.raw.raft.commit_to_current_term() {
            return;
        }
        let waiters = std::mem::take(&mut self.read_waiters);
        self.next_read_ctx += 1;
        self.raw
            .read_index(self.next_read_ctx.to_be_bytes().to_vec());
        self.reads_in_flight.insert(self.next_read_ctx, waiters);
    }

    fn compact_log(&mut self, s: SnapshotTaken) {
        let upto = s.index.min(self.raw.raft.raft_log.applied);
        // Keep the entries the snapshot covers out of memory, and their WAL segments off disk.
        if let Err(e) = self.raw.mut_store().wl().compact(upto) {
            tracing::warn!(error = %e, "log compaction skipped");
        }
        self.wal.release_to(s.index);
    }

    fn on_ready(&mut self) -> Result<(), wal::WalError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        // Messages to peers: a single member has none (peer transport arrives with clusters).
        let _ = ready.take_messages();
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            if let Err(e) = self.raw.mut_store().wl().apply_snapshot(snap) {
                tracing::error!(error = %e, "could not apply the leader's snapshot");
            }
        }
        let committed = ready.take_committed_entries();
        self.handle_committed(committed);
        for rs in ready.take_read_states() {
            let ctx = rs
                .request_ctx
                .as_slice()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            for w in self.reads_in_flight.remove(&ctx).unwrap_or_default() {
                let _ = w.send(Ok(rs.index));
            }
        }
        if !ready.entries().is_empty() {
            self.wal.append(ready.entries(), None);
        }
        if let Some(hs) = ready.hs() {
            self.wal.append(&[], Some(hs));
        }
        self.wal.sync()?;
        if !ready.entries().is_empty() {
            self.raw
                .mut_store()
                .wl()
                .append(ready.entries())
                .expect("append after the WAL");
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().wl().set_hardstate(hs.clone());
        }
        let _ = ready.take_persisted_messages();
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut store = self.raw.mut_store().wl();
            store.mut_hard_state().commit = commit;
            // Persisted with the next fsync; a lost commit index is recomputed by Raft.
            let hs = store.hard_state().clone();
            drop(store);
            self.wal.append(&[], Some(&hs));
        }
        let _ = light.take_messages();
        self.handle_committed(light.take_committed_entries());
        self.raw.advance_apply();
        if self.raw.raft.state != StateRole::Leader && !self.reads_in_flight.is_empty() {
            for (_, ws) in self.reads_in_flight.drain() {
                for w in ws {
                    let _ = w.send(Err(EtcdError::NoLeader));
                }
            }
        }
        Ok(())
    }

    fn handle_committed(&mut self, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let data = match e.get_entry_type() {
                EntryType::EntryNormal => e.data.to_vec(),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        let result = self.raw.apply_conf_change(&cc);
                        self.conf_changed(result);
                    }
                    Vec::new()
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    if cc.merge_from_bytes(&e.data).is_ok() {
                        let result = self.raw.apply_conf_change(&cc);
                        self.conf_changed(result);
                    }
                    Vec::new()
                }
            };
            out.push(CommittedEntry {
                index: e.index,
                term: e.term,
                data,
            });
        }
        // The dispatcher gone means shutdown; nothing left to apply.
        let _ = self.committed.send(out);
    }

    fn conf_changed(&mut self, result: raft::Result<ConfState>) {
        match result {
            Ok(cs) => self.raw.mut_store().wl().set_conf_state(cs),
            Err(e) => tracing::warn!(error = %e, "conf change rejected"),
        }
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        self.status.term.store(r.term, Ordering::Relaxed);
        self.status.leader.store(r.leader_id, Ordering::Relaxed);
        self.status
            .commit
            .store(r.raft_log.committed, Ordering::Relaxed);
        self.status
            .last_index
            .store(r.raft_log.last_index(), Ordering::Relaxed);
    }
}
