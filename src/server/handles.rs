//! The narrow handles the services are built from, instead of one shared bag of state: a
//! [`Proposer`] for writes (proposal IDs, the Raft node's inbox, the waiters, the quota) and a
//! [`Reader`] for reads (the applied state, ReadIndex, the shards). The auth gate
//! ([`super::auth::Access`]), the lease handle ([`super::lease::Leases`]) and the membership
//! handle ([`super::cluster::Members`]) are built on these two. Each is cheap to clone (the
//! state behind it is shared) and gives its holder only what its name says.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::watch;

use crate::apply::alarms::SharedAlarms;
use crate::auth::AuthInfo;
use crate::consensus::{NodeMsg, RaftHandle};
use crate::error::EtcdError;
use crate::mvcc::range::merge;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmType, RangeRequest, RangeResponse,
    ResponseHeader,
};
use crate::proto::metastorepb::{proposal::Request as Proposed, AuthHeader, Proposal};
use crate::shard::ShardSet;
use crate::state_machine::{AppliedState, ApplyResponse, Pending};

use super::validate;

/// etcd's request timeout for `election_timeout` (ms): 5 s plus two election timeouts
/// (`ServerConfig.ReqTimeout`).
pub fn request_timeout(election_timeout_ms: u64) -> Duration {
    Duration::from_millis(5000 + 2 * election_timeout_ms)
}

/// The bytes of a protobuf varint holding `v`.
fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

/// The size etcd gives `request` in its `--max-request-bytes` check: the encoded
/// `InternalRaftRequest` carrying it, with the `RequestHeader` etcd adds (its ID, and the
/// caller's username and auth revision), as `processInternalRaftRequestOnce`
/// (`etcdserver/v3_server.go`) marshals it before refusing it with `ErrRequestTooLarge`.
/// MetaStore's own log record (a [`Proposal`]) is laid out differently; measuring etcd's keeps
/// the limit exactly where etcd puts it.
///
/// The header's ID comes from etcd's `idutil.Generator`: the low 16 bits of the member ID in
/// the top 16 bits, then a 40-bit millisecond timestamp and an 8-bit counter, so its varint
/// length depends only on `member_id`'s low 16 bits (and is at least 7 bytes).
fn etcd_request_size(request: &Proposed, member_id: u64, auth: Option<&AuthHeader>) -> usize {
    // Field tags: a field number below 16 takes one byte, up to 2047 two.
    let tag = |field: u32| if field < 16 { 1 } else { 2 };
    let message = |field: u32, len: usize| tag(field) + varint_len(len as u64) + len;
    let etcd_id = ((member_id & 0xffff) << 48) | (1 << 47);
    // RequestHeader.ID = 1, a varint.
    let mut header = tag(1) + varint_len(etcd_id);
    if let Some(auth) = auth {
        if !auth.username.is_empty() {
            header += message(2, auth.username.len());
        }
        if auth.revision != 0 {
            // RequestHeader.auth_revision = 3, a varint.
            header += tag(3) + varint_len(auth.revision);
        }
    }
    // InternalRaftRequest's field numbers (etcdserverpb/raft_internal.proto): the KV, lease
    // and alarm requests are below 16, the auth and downgrade ones above 1000.
    let (field, len) = match request {
        Proposed::Put(r) => (4, r.encoded_len()),
        Proposed::DeleteRange(r) => (5, r.encoded_len()),
        Proposed::Txn(r) => (6, r.encoded_len()),
        Proposed::Compaction(r) => (7, r.encoded_len()),
        Proposed::LeaseGrant(r) => (8, r.encoded_len()),
        Proposed::LeaseRevoke(r) => (9, r.encoded_len()),
        Proposed::Alarm(r) => (10, r.encoded_len()),
        Proposed::LeaseCheckpoint(r) => (11, r.encoded_len()),
        // The rest are fields above 15 in both messages (etcd's above 1000, MetaStore's
        // above 19): a two-byte tag in each, so the oneof's own encoding has etcd's size.
        other => return message(100, header) + other.encoded_len(),
    };
    message(100, header) + message(field, len)
}

/// Writes: proposes requests through the Raft node and waits until they are applied.
#[derive(Clone)]
pub struct Proposer(Arc<ProposerState>);

struct ProposerState {
    member_id: u64,
    node: flume::Sender<NodeMsg>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    max_request_bytes: usize,
    request_timeout: Duration,
    quota: Quota,
}

/// What the front end's quota check reads (etcd `quotaKVServer`/`quotaLeaseServer`).
struct Quota {
    alarms: SharedAlarms,
    shards: ShardSet,
    /// `--quota-backend-bytes` as used (bytes).
    bytes: u64,
    /// A NOSPACE alarm for this member is being proposed: the next writes over quota do not
    /// propose it again meanwhile.
    raising: AtomicBool,
}

/// What a [`Proposer`] is built from.
pub struct ProposerParts {
    /// This member's ID (the proposals' origin).
    pub member_id: u64,
    /// Proposal IDs start here; they only need to differ from those of earlier starts that
    /// the log may still replay.
    pub first_id: u64,
    /// The Raft node's inbox.
    pub node: flume::Sender<NodeMsg>,
    /// Waiters for this member's proposals (answered by the apply dispatcher).
    pub pending: Arc<Pending>,
    /// `--max-request-bytes`: larger proposals are refused (bytes).
    pub max_request_bytes: usize,
    /// How long a proposal may take to apply.
    pub request_timeout: Duration,
    /// The replicated alarm table (NOSPACE refuses writes).
    pub alarms: SharedAlarms,
    /// The shards, whose size the quota is checked against.
    pub shards: ShardSet,
    /// `--quota-backend-bytes` as used (bytes).
    pub quota_bytes: u64,
}

impl Proposer {
    /// A proposer over `parts`.
    pub fn new(parts: ProposerParts) -> Proposer {
        Proposer(Arc::new(ProposerState {
            member_id: parts.member_id,
            node: parts.node,
            pending: parts.pending,
            next_id: AtomicU64::new(parts.first_id),
            max_request_bytes: parts.max_request_bytes,
            request_timeout: parts.request_timeout,
            quota: Quota {
                alarms: parts.alarms,
                shards: parts.shards,
                bytes: parts.quota_bytes,
                raising: AtomicBool::new(false),
            },
        }))
    }

    /// Proposes a write and waits until it is applied.
    ///
    /// Errors: "request is too large" above `--max-request-bytes`; "request timed out" when it
    /// does not apply within etcd's request timeout (5 s + 2 election timeouts; the outcome is
    /// then unknown); "no leader"; "server stopped"; and whatever applying it reports.
    /// The member's own requests (lease expiry, alarms, lock cleanup) act as root, as etcd's
    /// `WithRoot`; clients' go through [`Proposer::propose_as`].
    pub async fn propose(&self, request: Proposed) -> Result<ApplyResponse, EtcdError> {
        self.propose_with(request, None).await
    }

    /// Proposes a client's write made by `caller` (checked against the auth store as it is
    /// applied) and waits until it is applied; see [`Proposer::propose`].
    pub async fn propose_as(
        &self,
        request: Proposed,
        caller: Option<&AuthInfo>,
    ) -> Result<ApplyResponse, EtcdError> {
        self.propose_with(request, Some(AuthInfo::header(caller)))
            .await
    }

    /// [`Proposer::propose`] with the caller's auth header (`None`: the member itself).
    async fn propose_with(
        &self,
        request: Proposed,
        auth: Option<AuthHeader>,
    ) -> Result<ApplyResponse, EtcdError> {
        if etcd_request_size(&request, self.0.member_id, auth.as_ref()) > self.0.max_request_bytes {
            return Err(EtcdError::RequestTooLarge);
        }
        let id = self.next_id();
        let data = Proposal {
            id,
            origin: self.0.member_id,
            request: Some(request),
            auth,
        }
        .encode_to_vec();
        self.submit(id, NodeMsg::Propose { id, data }).await
    }

    /// A proposal ID no other proposal of this member has.
    pub fn next_id(&self) -> u64 {
        self.0.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands `msg` (proposal `id`, from [`Proposer::next_id`]) to the Raft node and waits
    /// until it is applied, within the request timeout.
    ///
    /// Errors: "request timed out", "server stopped", and whatever applying it reports.
    pub async fn submit(&self, id: u64, msg: NodeMsg) -> Result<ApplyResponse, EtcdError> {
        // The guard removes the waiter however this future ends: reply, timeout or the
        // client going away.
        let (_guard, rx) = self.0.pending.register(id);
        let work = async {
            self.0
                .node
                .send_async(msg)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            rx.await.map_err(|_| EtcdError::Stopped)?
        };
        let result = tokio::time::timeout(self.0.request_timeout, work)
            .await
            .unwrap_or(Err(EtcdError::Timeout));
        // etcd counts proposals that time out or cannot be proposed, not apply errors.
        if matches!(result, Err(EtcdError::Timeout | EtcdError::Stopped)) {
            crate::metrics::PROPOSALS_FAILED.inc();
        }
        result
    }

    /// How many of this member's proposals await their outcome.
    pub fn in_flight(&self) -> usize {
        self.0.pending.len()
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
        let quota = &self.0.quota;
        if quota.alarms.read(|t| t.is_active(AlarmType::Nospace)) {
            return Err(EtcdError::NoSpace);
        }
        let db_size = quota.shards.db_size();
        if db_size <= quota.bytes {
            return Ok(());
        }
        if !quota.raising.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                quota = quota.bytes,
                db_size,
                "backend over quota: raising the NOSPACE alarm"
            );
            let proposer = self.clone();
            tokio::spawn(async move {
                let id = proposer.0.member_id;
                if let Err(e) = proposer.raise_alarm(id, AlarmType::Nospace).await {
                    tracing::warn!(error = %e, "cannot raise the NOSPACE alarm");
                }
                proposer.0.quota.raising.store(false, Ordering::Relaxed);
            });
        }
        Err(EtcdError::NoSpace)
    }

    /// Proposes an Alarm ACTIVATE of `alarm` for `member` and waits until it is applied.
    ///
    /// Errors: those of [`Proposer::propose`].
    pub async fn raise_alarm(&self, member: u64, alarm: AlarmType) -> Result<(), EtcdError> {
        self.propose(Proposed::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: member,
            alarm: alarm as i32,
        }))
        .await
        .map(|_| ())
    }
}

/// Reads: the applied state, linearizable reads (ReadIndex) and the shards' data.
#[derive(Clone)]
pub struct Reader(Arc<ReaderState>);

struct ReaderState {
    cluster_id: u64,
    member_id: u64,
    node: RaftHandle,
    applied: watch::Receiver<AppliedState>,
    shards: ShardSet,
    request_timeout: Duration,
}

impl Reader {
    /// A reader for member `member_id` of `cluster_id`: `node` answers ReadIndex and the
    /// term, `applied` is what every shard has applied, `shards` hold the data.
    pub fn new(
        cluster_id: u64,
        member_id: u64,
        node: RaftHandle,
        applied: watch::Receiver<AppliedState>,
        shards: ShardSet,
        request_timeout: Duration,
    ) -> Reader {
        Reader(Arc::new(ReaderState {
            cluster_id,
            member_id,
            node,
            applied,
            shards,
            request_timeout,
        }))
    }

    /// A response header at `revision`, with this member's IDs and the current term.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.0.cluster_id,
            member_id: self.0.member_id,
            revision,
            raft_term: self.0.node.status.term.load(Ordering::Relaxed),
        })
    }

    /// The latest state every shard has applied (what a serializable read sees).
    pub fn applied(&self) -> AppliedState {
        *self.0.applied.borrow()
    }

    /// A receiver of every later applied state, to wait on.
    pub fn applied_changes(&self) -> watch::Receiver<AppliedState> {
        self.0.applied.clone()
    }

    /// The shards, to read from.
    pub fn shards(&self) -> &ShardSet {
        &self.0.shards
    }

    /// The applied state a linearizable read may use: ReadIndex (Raft paper section 6.4), then
    /// wait until every shard has applied that index.
    ///
    /// Errors: "request timed out" after etcd's request timeout; "server stopped"; and the
    /// Raft node's ReadIndex errors ("no leader", "leader changed").
    pub async fn linearizable_state(&self) -> Result<AppliedState, EtcdError> {
        let work = async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.0
                .node
                .tx
                .send_async(NodeMsg::ReadIndex(tx))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            let index = rx.await.map_err(|_| EtcdError::Stopped)??;
            let mut applied = self.0.applied.clone();
            let state = applied
                .wait_for(|a| a.index >= index)
                .await
                .map_err(|_| EtcdError::Stopped)?;
            Ok(*state)
        };
        tokio::time::timeout(self.0.request_timeout, work)
            .await
            .map_err(|_| EtcdError::Timeout)?
    }

    /// Serves a Range: scatter over the shards at one revision, merge in key order.
    ///
    /// Errors: ErrFutureRev above the current revision, ErrCompacted below the compaction
    /// revision, "not supported for learner" for a linearizable read on a learner, plus the
    /// validation errors of [`validate::check_range`].
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, EtcdError> {
        validate::check_range(&req)?;
        if !req.serializable && self.0.node.status.is_learner.load(Ordering::Relaxed) {
            return Err(EtcdError::NotSupportedForLearner);
        }
        let state = if req.serializable {
            self.applied()
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
        let parts = self.0.shards.read_range(req.clone(), rev).await?;
        let merged = merge(&req, parts);
        Ok(RangeResponse {
            header: self.header(state.revision),
            kvs: merged.kvs,
            more: merged.more,
            count: merged.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb::PutRequest;

    fn put(n: usize) -> Proposed {
        Proposed::Put(PutRequest {
            key: b"edge".to_vec(),
            value: vec![b'v'; n],
            ..Default::default()
        })
    }

    /// Real etcd 3.4.23 with member ID 0x...5b3c (ID varint 9 bytes) accepts a 1,572,837-byte
    /// value for key "edge" and refuses 1,572,838 under the default 1,572,864-byte limit:
    /// header 2+1+1+9, put field 1+3, key 1+1+4, value 1+3+n.
    #[test]
    fn etcd_request_size_is_etcds_internal_raft_request() {
        let member = 0x8e9e_05c2_7e6f_5b3c;
        assert_eq!(etcd_request_size(&put(1_572_837), member, None), 1_572_864);
        // Bit 15 of the member ID's low 16 bits makes the ID a 10-byte varint.
        assert_eq!(etcd_request_size(&put(1_572_837), 0x8000, None), 1_572_865);
        // Low bits all clear: the timestamp alone, 7 bytes.
        assert_eq!(etcd_request_size(&put(1_572_837), 0, None), 1_572_862);
        let auth = AuthHeader {
            username: "root".into(),
            revision: 5,
        };
        // username: 1+1+4, auth_revision: 1+1.
        assert_eq!(
            etcd_request_size(&put(1_572_837), member, Some(&auth)),
            1_572_872
        );
        let mut default_auth = AuthHeader::default();
        default_auth.username.clear();
        assert_eq!(
            etcd_request_size(&put(1_572_837), member, Some(&default_auth)),
            1_572_864
        );
    }
}
