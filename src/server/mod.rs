//! The gRPC front end: the services and the state they share ([`Core`]). Start-up, listeners
//! and shutdown are the member's ([`crate::node`]).
//!
//! One file per etcd service (`kv.rs`, `watch.rs`, `lease.rs`, `recipes.rs` for v3lock and
//! v3election, `maintenance.rs`, `cluster.rs`, `auth.rs`) and the HTTP endpoints (`http.rs`).
//! They share [`Core`]:
//! writes are validated, proposed through the Raft node and answered once applied; reads go
//! straight to the shards at a revision every shard has applied.

pub mod auth;
pub(crate) mod cluster;
pub mod codec;
pub mod compactor;
pub(crate) mod corrupt;
pub mod gate;
pub mod http;
pub mod keepalive;
pub(crate) mod kv;
pub(crate) mod lease;
pub(crate) mod maintenance;
pub mod peer;
pub(crate) mod recipes;
pub mod validate;
pub(crate) mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch as state_watch;

use crate::apply::alarms::SharedAlarms;
use crate::config::Config;
use crate::consensus::{NodeMsg, RaftHandle};
use crate::error::EtcdError;
use crate::identity::Member;
use crate::lease::LeaseTable;
use crate::mvcc::range::merge;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, RangeRequest, RangeResponse,
    ResponseHeader,
};
use crate::proto::metastorepb::{proposal::Request as Proposed, Proposal};
use crate::shard::ShardSet;
use crate::state_machine::{AppliedState, ApplyResponse, Pending};

/// What [`Core::new`] is built from: the parts the member's start-up
/// ([`crate::node::Node::start`]) made.
pub struct CoreParts {
    /// Settings.
    pub cfg: Arc<Config>,
    /// This member.
    pub member: Member,
    /// The Raft node.
    pub node: RaftHandle,
    /// The shards' read queues.
    pub shards: ShardSet,
    /// The latest state every shard has applied.
    pub applied: state_watch::Receiver<AppliedState>,
    /// Granted leases and their deadlines.
    pub leases: LeaseTable,
    /// Waiters for this member's proposals (answered by the apply dispatcher).
    pub pending: Arc<Pending>,
    /// The replicated alarm table.
    pub alarms: SharedAlarms,
    /// The replicated auth store.
    pub auth: crate::auth::SharedAuth,
}

/// What every service needs: identity, the Raft node, the shards and the applied state.
pub struct Core {
    /// Settings.
    pub cfg: Arc<Config>,
    /// This member.
    pub member: Member,
    /// The Raft node.
    pub node: RaftHandle,
    /// The shards' read queues.
    pub shards: ShardSet,
    /// The latest state every shard has applied.
    pub applied: state_watch::Receiver<AppliedState>,
    /// Granted leases and their deadlines.
    pub leases: LeaseTable,
    pending: Arc<Pending>,
    next_proposal: AtomicU64,
    next_lease_seed: AtomicU64,
    /// The replicated alarm table (etcd's alarm store), as the dispatcher last applied it.
    pub alarms: SharedAlarms,
    /// The replicated auth store, as the dispatcher last applied it, and this member's tokens.
    pub auth: crate::auth::SharedAuth,
    /// A NOSPACE alarm for this member is being proposed: the next writes over quota do not
    /// propose it again meanwhile.
    raising_nospace: std::sync::atomic::AtomicBool,
    /// A Peer client to the current leader, for requests only the leader answers.
    leader_peer: tokio::sync::Mutex<
        Option<(
            u64,
            crate::proto::metastorepb::peer_client::PeerClient<tonic::transport::Channel>,
        )>,
    >,
    /// This core itself, for tasks that outlive a borrowed `&Core` (lock cleanup).
    this: std::sync::Weak<Core>,
    /// Cancelled when the member begins to stop (the first SIGTERM/SIGINT, or its removal
    /// from the cluster; see [`crate::node::NodeHandle::shutdown`]): the client listeners
    /// stop accepting, and every open Watch and LeaseKeepAlive stream ends with "etcdserver:
    /// server stopped" ([`EtcdError::Stopped`]), as etcd's `EtcdServer.Stop` ends its streams.
    pub stopping: tokio_util::sync::CancellationToken,
    request_timeout: Duration,
}

impl Core {
    /// The services' shared state, from the parts start-up made.
    pub fn new(parts: CoreParts) -> Arc<Core> {
        let CoreParts {
            cfg,
            member,
            node,
            shards,
            applied,
            leases,
            pending,
            alarms,
            auth,
        } = parts;
        Arc::new_cyclic(|this| Core {
            this: this.clone(),
            // etcd's request timeout: 5 s plus two election timeouts.
            request_timeout: Duration::from_millis(5000 + 2 * cfg.election_timeout),
            // Proposal IDs only need to differ from those of earlier starts that the log may
            // still replay: 4096 IDs per microsecond since the start before this one is more
            // than any start can use (the shift stays within 64 bits until the year 2112).
            next_proposal: AtomicU64::new(member.boot_stamp << 12),
            next_lease_seed: AtomicU64::new(member.id ^ member.boot_stamp),
            alarms,
            auth,
            raising_nospace: Default::default(),
            leader_peer: Default::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            cfg,
            member,
            node,
            shards,
            applied,
            leases,
            pending,
        })
    }

    /// A response header at `revision`, with this member's IDs and the current term.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.member.cluster_id,
            member_id: self.member.id,
            revision,
            raft_term: self.node.status.term.load(Ordering::Relaxed),
        })
    }

    /// Proposes a write and waits until it is applied.
    ///
    /// Errors: "request is too large" above `--max-request-bytes`; "request timed out" when it
    /// does not apply within etcd's request timeout (5 s + 2 election timeouts; the outcome is
    /// then unknown); "no leader"; "server stopped"; and whatever applying it reports.
    /// The member's own requests (lease expiry, alarms, lock cleanup) act as root, as etcd's
    /// `WithRoot`; clients' go through [`Core::propose_as`].
    pub async fn propose(&self, request: Proposed) -> Result<ApplyResponse, EtcdError> {
        self.propose_with(request, None).await
    }

    /// [`Core::propose`] with the caller's auth header (`None`: the member itself).
    async fn propose_with(
        &self,
        request: Proposed,
        auth: Option<crate::proto::metastorepb::AuthHeader>,
    ) -> Result<ApplyResponse, EtcdError> {
        let id = self.next_proposal.fetch_add(1, Ordering::Relaxed);
        let data = Proposal {
            id,
            origin: self.member.id,
            request: Some(request),
            auth,
        }
        .encode_to_vec();
        if data.len() > self.cfg.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        self.submit(id, NodeMsg::Propose { id, data }).await
    }

    /// Hands `msg` (proposal `id`) to the Raft node and waits until it is applied, within the
    /// request timeout.
    ///
    /// Errors: "request timed out", "server stopped", and whatever applying it reports.
    async fn submit(&self, id: u64, msg: NodeMsg) -> Result<ApplyResponse, EtcdError> {
        // The guard removes the waiter however this future ends: reply, timeout or the
        // client going away.
        let (_guard, rx) = self.pending.register(id);
        let work = async {
            self.node
                .tx
                .send_async(msg)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            rx.await.map_err(|_| EtcdError::Stopped)?
        };
        let result = tokio::time::timeout(self.request_timeout, work)
            .await
            .unwrap_or(Err(EtcdError::Timeout));
        // etcd counts proposals that time out or cannot be proposed, not apply errors.
        if matches!(result, Err(EtcdError::Timeout | EtcdError::Stopped)) {
            crate::metrics::PROPOSALS_FAILED.inc();
        }
        result
    }

    /// The front end's quota check for a request that grows the backend (Put, a Txn with a
    /// put, LeaseGrant), as etcd's `quotaKVServer`/`quotaLeaseServer`: while any member's
    /// NOSPACE alarm is active, or when this member's backend has grown past
    /// `--quota-backend-bytes`, the request is refused. In the latter case this member also
    /// proposes a NOSPACE alarm for itself through Raft (etcd's Alarm ACTIVATE with its member
    /// ID), so that every member refuses such requests until it is disarmed. The dispatcher
    /// refuses them again as it applies them (the alarm may be raised meanwhile). Reads and
    /// deletes are never refused.
    ///
    /// Errors: "etcdserver: mvcc: database space exceeded" (etcd `ErrGRPCNoSpace`).
    pub fn check_quota(&self) -> Result<(), EtcdError> {
        let raised = self
            .alarms
            .read(|t| t.is_active(crate::proto::etcdserverpb::AlarmType::Nospace));
        if raised {
            return Err(EtcdError::NoSpace);
        }
        if self.shards.db_size() <= self.cfg.quota_bytes() {
            return Ok(());
        }
        if !self.raising_nospace.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                quota = self.cfg.quota_bytes(),
                db_size = self.shards.db_size(),
                "backend over quota: raising the NOSPACE alarm"
            );
            if let Some(core) = self.this.upgrade() {
                tokio::spawn(async move {
                    let id = core.member.id;
                    if let Err(e) = core.raise_alarm(id, AlarmType::Nospace).await {
                        tracing::warn!(error = %e, "cannot raise the NOSPACE alarm");
                    }
                    core.raising_nospace.store(false, Ordering::Relaxed);
                });
            }
        }
        Err(EtcdError::NoSpace)
    }

    /// Proposes an Alarm ACTIVATE of `alarm` for `member` and waits until it is applied.
    ///
    /// Errors: those of [`Core::propose`].
    pub async fn raise_alarm(&self, member: u64, alarm: AlarmType) -> Result<(), EtcdError> {
        self.propose(Proposed::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: member,
            alarm: alarm as i32,
        }))
        .await
        .map(|_| ())
    }

    /// The applied state a linearizable read may use: ReadIndex (Raft paper section 6.4), then
    /// wait until every shard has applied that index.
    pub async fn linearizable_state(&self) -> Result<AppliedState, EtcdError> {
        let work = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.node
                .tx
                .send_async(NodeMsg::ReadIndex(tx))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            let index = rx.await.map_err(|_| EtcdError::Stopped)??;
            let mut applied = self.applied.clone();
            let state = applied
                .wait_for(|a| a.index >= index)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            Ok(*state)
        };
        tokio::time::timeout(self.request_timeout, work)
            .await
            .map_err(|_| EtcdError::Timeout)?
    }

    /// Serves a Range: scatter over the shards at one revision, merge in key order.
    ///
    /// Errors: ErrFutureRev above the current revision, ErrCompacted below the compaction
    /// revision, plus the validation errors of [`validate::check_range`].
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, EtcdError> {
        validate::check_range(&req)?;
        if !req.serializable && self.node.status.is_learner.load(Ordering::Relaxed) {
            return Err(EtcdError::NotSupportedForLearner);
        }
        let state = if req.serializable {
            *self.applied.borrow()
        } else {
            self.linearizable_state().await?
        };
        if req.revision > state.revision {
            return Err(EtcdError::FutureRev);
        }
        let rev = if req.revision <= 0 {
            state.revision
        } else {
            req.revision
        };
        if rev < state.compact_revision {
            return Err(EtcdError::Compacted);
        }
        crate::metrics::MVCC_RANGE.inc();
        let req = Arc::new(req);
        let parts = self.shards.read_range(req.clone(), rev).await?;
        let merged = merge(&req, parts);
        Ok(RangeResponse {
            header: self.header(state.revision),
            kvs: merged.kvs,
            more: merged.more,
            count: merged.count,
        })
    }
}
