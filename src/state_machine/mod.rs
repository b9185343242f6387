//! The boundary between consensus and the state machine: what the Raft node hands over, what
//! comes back, and the types both sides share.
//!
//! ```text
//!  consensus (Raft node thread)                 apply (the dispatcher, a StateMachine)
//!        |  ApplyMsg::Entries / Restore / Image / Dropped  (flume, log order)
//!        +-------------------------------------------> run(): one message at a time
//!        <------------------------------------------- SnapshotTaken (release the log)
//!                                                      AppliedState (tokio watch, to readers)
//!                                                      Pending (one waiter per proposal)
//! ```
//!
//! Both [`crate::consensus`] and [`crate::apply`] depend on this module and neither on the
//! other. The Raft node owns Raft, the WAL and the membership table (it applies conf changes
//! in log order, as raft-rs requires); the state machine owns everything replicated through
//! normal entries, and it alone answers proposal waiters ([`Pending`]): results of applied
//! entries, of membership changes (handed over in [`CommittedEntry::conf_change`]), and
//! proposals Raft refused ([`ApplyMsg::Dropped`]). The shape follows openraft's
//! `RaftStateMachine` (apply, build a snapshot, install one, report what is applied).

pub mod membership;
pub mod pending;
pub mod snapshot;

use std::sync::Arc;

use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    AlarmResponse, CompactionResponse, DeleteRangeResponse, LeaseCheckpointResponse,
    LeaseGrantResponse, LeaseRevokeResponse, PutResponse, TxnResponse,
};
use crate::proto::metastorepb::StateSnapshot;
pub use membership::Membership;
pub use pending::{Pending, PendingGuard};

/// What clients may read: published after every shard has applied through `index`
/// (watched by the front end; see [`StateMachine::applied`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppliedState {
    /// Raft index applied on every shard.
    pub index: u64,
    /// The store revision at `index`: reads at this revision see every write up to `index`.
    pub revision: i64,
    /// Reads below this revision fail with ErrCompacted.
    pub compact_revision: i64,
}

/// What the Raft node hands the state machine, in log order (see [`drain`]).
pub enum ApplyMsg {
    /// Committed entries.
    Entries(Vec<CommittedEntry>),
    /// A leader's snapshot this member's Raft log has been reset to (already saved to disk):
    /// replace the whole state machine with it.
    Restore(Arc<StateSnapshot>),
    /// Build a complete image of the state machine at the applied index, for a follower the
    /// leader's log no longer reaches (Raft paper section 7).
    Image(flume::Sender<SnapshotImage>),
    /// Proposals of this member that the Raft node could not propose (raft-rs refused them:
    /// no leader known): their waiters get `error`, etcd's "etcdserver: no leader".
    Dropped {
        /// Proposal IDs (see [`Pending`]).
        ids: Vec<u64>,
        /// What the waiters get.
        error: EtcdError,
    },
}

/// A complete image of the state machine, ready to ship to a follower.
#[derive(Clone)]
pub struct SnapshotImage {
    /// Raft index it reflects.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// The membership at `index` (the snapshot's Raft configuration).
    pub membership: Arc<Membership>,
    /// The encoded `metastorepb.StateSnapshot`, `complete` set.
    pub data: bytes::Bytes,
}

/// The result of an applied write request, before the front end adds member and term to the
/// header.
#[derive(Debug, Clone)]
pub enum ApplyResponse {
    /// A Put.
    Put(PutResponse),
    /// A DeleteRange.
    DeleteRange(DeleteRangeResponse),
    /// A Txn.
    Txn(TxnResponse),
    /// A Compaction.
    Compaction(CompactionResponse),
    /// A LeaseGrant.
    LeaseGrant(LeaseGrantResponse),
    /// A LeaseRevoke (or an expiry).
    LeaseRevoke(LeaseRevokeResponse),
    /// A LeaseCheckpoint.
    LeaseCheckpoint(LeaseCheckpointResponse),
    /// A membership change: the members after it, sorted by ID.
    Members(Vec<crate::proto::metastorepb::MemberRecord>),
    /// An alarm request (GET, ACTIVATE or DEACTIVATE).
    Alarm(AlarmResponse),
    /// An auth store change or Authenticate; `revision` is the store (KV) revision.
    Auth {
        /// What it returned.
        applied: crate::auth::AuthApplied,
        /// The KV revision, for the response header.
        revision: i64,
    },
    /// A DowngradeInfoSet (Downgrade ENABLE or CANCEL), applied.
    Downgrade,
}

/// An applied request's outcome.
pub type ApplyResult = Result<ApplyResponse, EtcdError>;

/// A committed Raft entry handed to the state machine.
#[derive(Debug, Clone)]
pub struct CommittedEntry {
    /// Raft index.
    pub index: u64,
    /// Raft term.
    pub term: u64,
    /// Length-delimited `metastorepb.Proposal`s; empty for leader no-ops and conf changes.
    pub data: Vec<u8>,
    /// For a membership change: what applying it did (the Raft node applies conf changes to
    /// Raft and to the table, in log order; the state machine records the table in snapshots
    /// and answers the proposer).
    pub conf_change: Option<ConfChangeApplied>,
}

/// A membership change as the Raft node applied it.
#[derive(Debug, Clone)]
pub struct ConfChangeApplied {
    /// The membership table after it (unchanged if the change was rejected).
    pub membership: Arc<Membership>,
    /// The member that proposed it (0: not proposed by a member, e.g. a first boot's seed).
    pub origin: u64,
    /// The proposal ID on `origin` (see [`Pending`]).
    pub proposal: u64,
    /// `Err`: the table rejected it, with etcd's error (`ErrMemberExists`,
    /// `ErrPeerURLExist`, `ErrMemberNotFound`, `ErrMemberNotLearner`, `ErrTooManyLearners`,
    /// see [`Membership::apply`]).
    pub result: Result<(), EtcdError>,
}

/// A snapshot the state machine took at its applied index, handed to the Raft node, which
/// alone writes snapshot files: it saves this one, then releases the log before `index`.
#[derive(Debug, Clone)]
pub struct SnapshotTaken {
    /// Raft index the snapshot covers.
    pub index: u64,
    /// Term of that entry.
    pub term: u64,
    /// The snapshot: a complete image (memory engine), or the state beside the shards'
    /// on-disk checkpoints in [`snapshot::checkpoint_dir`] (durable engines).
    pub snapshot: Arc<StateSnapshot>,
}

/// A replicated state machine driven by committed Raft entries (openraft's
/// `RaftStateMachine`; Raft paper sections 5.3 and 7). Every replica applies the same entries
/// in the same order and must end in the same state; [`drain`] calls it, on the Raft thread.
pub trait StateMachine {
    /// Applies committed entries, in log order. Entries at or below the applied index (replayed
    /// after a restart) change nothing already applied.
    fn apply(&mut self, entries: Vec<CommittedEntry>);

    /// Builds a complete image of the state machine at the applied index, to send to a
    /// follower the leader's log no longer reaches, and sends it to `reply` once built, from
    /// any thread. `reply` dropped unsent says none can be built (the member is stopping).
    fn build_snapshot(&mut self, reply: flume::Sender<SnapshotImage>);

    /// Replaces the whole state machine with a leader's snapshot.
    fn install_snapshot(&mut self, snapshot: &StateSnapshot);

    /// Answers this member's proposals that were never proposed.
    fn drop_proposals(&mut self, ids: Vec<u64>, error: EtcdError);

    /// What is applied and readable now.
    fn applied(&self) -> AppliedState;
}

/// Most committed entries one [`StateMachine::apply`] call takes: whatever else the Raft
/// node's round handed over is coalesced up to this, so one shard barrier covers all.
const MAX_COALESCED_ENTRIES: usize = 4096;

/// Applies what the Raft node has handed over so far, in order, without waiting for more:
/// the state machine runs on the Raft thread itself, after each of its rounds
/// (`RaftNode::apply_here`), so there is no thread between the WAL and the shards.
pub fn drain<S: StateMachine>(sm: &mut S, inbox: &flume::Receiver<ApplyMsg>) {
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => match inbox.try_recv() {
                Ok(msg) => msg,
                Err(_) => return,
            },
        };
        next = handle(sm, inbox, msg);
    }
}

/// Applies one message (coalescing the entries queued behind it); returns the message after
/// them that it took from `inbox`, if any.
fn handle<S: StateMachine>(
    sm: &mut S,
    inbox: &flume::Receiver<ApplyMsg>,
    msg: ApplyMsg,
) -> Option<ApplyMsg> {
    let mut next = None;
    match msg {
        ApplyMsg::Entries(mut entries) => {
            while entries.len() < MAX_COALESCED_ENTRIES {
                match inbox.try_recv() {
                    Ok(ApplyMsg::Entries(more)) => entries.extend(more),
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            sm.apply(entries);
        }
        ApplyMsg::Restore(snap) => sm.install_snapshot(&snap),
        ApplyMsg::Image(reply) => sm.build_snapshot(reply),
        ApplyMsg::Dropped { ids, error } => sm.drop_proposals(ids, error),
    }
    next
}
