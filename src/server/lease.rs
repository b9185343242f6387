//! `etcdserverpb.Lease`, and the leader's lease clock that turns deadlines into revokes.
//!
//! Grants, revokes and checkpoints go through the Raft log (see [`crate::lease`]); keep-alives
//! renew the leader's deadline directly, as etcd does.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use tokio_util::sync::CancellationToken;

use super::{Access, Core, Members, Proposer, Reader};
use crate::consensus::NodeStatus;
use crate::error::EtcdError;
use crate::lease::LeaseTable;
use crate::lease::MAX_LEASE_TTL;
use crate::proto::etcdserverpb::{
    lease_server::Lease, LeaseCheckpoint, LeaseCheckpointRequest, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;
use crate::state_machine::ApplyResponse;

/// How often the leader looks for expired leases.
const EXPIRY_SCAN: Duration = Duration::from_millis(250);
/// A revoke still not applied after this long is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(10);

/// The Lease service.
pub struct LeaseService {
    access: Access,
    proposer: Proposer,
    reader: Reader,
    leases: Leases,
    /// For keep-alive streams opened with `hasleader`.
    status: Arc<NodeStatus>,
    /// `--election-timeout`.
    election_timeout: Duration,
    /// Ends keep-alive streams when the member stops.
    stopping: CancellationToken,
}

impl LeaseService {
    /// Serves Lease with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        LeaseService {
            access: core.access.clone(),
            proposer: core.proposer.clone(),
            reader: core.reader.clone(),
            leases: core.leases.clone(),
            status: core.node.status.clone(),
            election_timeout: Duration::from_millis(core.cfg.election_timeout),
            stopping: core.stopping.clone(),
        }
    }
}

/// Lease grants, renewals, time-to-live and the deadlines behind them: the lease table (what
/// the log granted, with this member's deadlines), the lease ID sequence, and the way to the
/// leader, whose deadlines are the ones that count.
#[derive(Clone)]
pub struct Leases(Arc<LeasesState>);

struct LeasesState {
    table: LeaseTable,
    next_seed: AtomicU64,
    proposer: Proposer,
    reader: Reader,
    members: Members,
}

fn unexpected() -> Status {
    crate::error::unexpected_apply_result("a lease request").into()
}

type KeepAliveStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut req = request.into_inner();
        if req.ttl > MAX_LEASE_TTL {
            return Err(EtcdError::LeaseTtlTooLarge.into());
        }
        self.proposer.check_quota()?;
        if req.id == 0 {
            req.id = self.leases.new_lease_id();
        }
        Ok(Response::new(self.leases.grant(req).await?))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // etcd `checkLeasePuts`, at apply: WRITE on every key attached to the lease.
        let caller = self.access.caller_of(&request).await?;
        match self
            .proposer
            .propose_as(Proposed::LeaseRevoke(request.into_inner()), caller.as_ref())
            .await?
        {
            ApplyResponse::LeaseRevoke(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected()),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let (metadata, _, mut inbound) = request.into_parts();
        let (tx, rx) = mpsc::channel(16);
        super::gate::end_stream_without_leader(
            &metadata.into_headers(),
            self.status.clone(),
            self.election_timeout,
            tx.clone(),
            self.stopping.clone(),
        );
        let (leases, reader, stopping) = (
            self.leases.clone(),
            self.reader.clone(),
            self.stopping.clone(),
        );
        tokio::spawn(async move {
            loop {
                // A stopping member ends the stream with "etcdserver: server stopped", as
                // etcd's `LeaseKeepAlive` does (`ErrGRPCStopped`).
                let req = tokio::select! {
                    biased;
                    _ = stopping.cancelled() => {
                        let _ = tx.send(Err(EtcdError::Stopped.into())).await;
                        break;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => req,
                        _ => break,
                    },
                };
                // One response per request; an unknown lease answers TTL 0 (etcd). A follower
                // renews on the leader; without a leader the stream ends with the error.
                let resp = match leases.renew(req.id).await {
                    Ok(ttl) => {
                        let revision = reader.applied().revision;
                        Ok(LeaseKeepAliveResponse {
                            header: reader.header(revision),
                            id: req.id,
                            ttl,
                        })
                    }
                    Err(e) => Err(Status::from(e)),
                };
                let failed = resp.is_err();
                if tx.send(resp).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        let req = request.into_inner();
        let resp = self.leases.time_to_live(req).await?;
        // With keys, READ on each attached key while auth is enabled (etcd 3.5
        // `checkLeaseTimeToLive`): "etcdserver: permission denied" otherwise.
        for k in &resp.keys {
            self.access.check_read(caller.as_ref(), k, &[])?;
        }
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let state = self.reader.linearizable_state().await?;
        let leases = self
            .leases
            .table()
            .lock()
            .keys()
            .map(|id| LeaseStatus { id: *id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.reader.header(state.revision),
            leases,
        }))
    }
}

impl Leases {
    /// The lease handle over `table`: lease IDs from the splitmix64 sequence seeded with
    /// `seed`; grants and checkpoints through `proposer`; renewals on the leader found through
    /// `members`.
    pub fn new(
        table: LeaseTable,
        seed: u64,
        proposer: Proposer,
        reader: Reader,
        members: Members,
    ) -> Leases {
        Leases(Arc::new(LeasesState {
            table,
            next_seed: AtomicU64::new(seed),
            proposer,
            reader,
            members,
        }))
    }

    /// Granted leases and this member's deadlines for them.
    pub fn table(&self) -> &LeaseTable {
        &self.0.table
    }

    /// Renews lease `id` where it counts: on the leader, which alone runs the lease clock.
    /// Returns the granted TTL in seconds, or 0 for an unknown lease (etcd).
    ///
    /// Errors: "no leader"; "leader changed" when the leader cannot be reached.
    pub async fn renew(&self, id: i64) -> Result<i64, EtcdError> {
        if let Some(mut peer) = self.0.members.remote_leader().await? {
            let resp = peer
                .lease_renew(LeaseKeepAliveRequest { id })
                .await
                .map_err(|_| EtcdError::LeaderChanged)?;
            return Ok(resp.into_inner().ttl);
        }
        Ok(self.renew_here(id))
    }

    /// The leader's side of [`Leases::renew`]; a renewal is counted in
    /// `etcd_debugging_lease_renewed_total`, as etcd's lessor counts it.
    pub fn renew_here(&self, id: i64) -> i64 {
        let Some((ttl, clear_checkpoint)) = self.0.table.renew(id) else {
            return 0;
        };
        crate::metrics::LEASE_RENEWED.inc();
        if clear_checkpoint {
            // A renewed lease starts over from its full TTL: the checkpointed remainder no
            // longer applies after a restart or leader change.
            let proposer = self.0.proposer.clone();
            let clear = LeaseCheckpointRequest {
                checkpoints: vec![LeaseCheckpoint {
                    id,
                    remaining_ttl: 0,
                }],
            };
            tokio::spawn(async move { proposer.propose(Proposed::LeaseCheckpoint(clear)).await });
        }
        ttl
    }

    /// LeaseTimeToLive, answered by the leader (a follower's deadlines are not the ones that
    /// expire leases).
    ///
    /// Errors: "no leader", "leader changed", and [`Reader::linearizable_state`]'s.
    pub async fn time_to_live(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> Result<LeaseTimeToLiveResponse, EtcdError> {
        if let Some(mut peer) = self.0.members.remote_leader().await? {
            let resp = peer
                .lease_time_to_live(req)
                .await
                .map_err(|_| EtcdError::LeaderChanged)?;
            return Ok(resp.into_inner());
        }
        let state = self.0.reader.linearizable_state().await?;
        let found = self
            .0
            .table
            .lock()
            .get(&req.id)
            .map(|l| (l.remaining_secs(Instant::now()), l.ttl));
        let Some((ttl, granted_ttl)) = found else {
            // etcd answers an unknown lease with TTL -1 rather than an error.
            return Ok(LeaseTimeToLiveResponse {
                header: self.0.reader.header(state.revision),
                id: req.id,
                ttl: -1,
                ..Default::default()
            });
        };
        let keys = if req.keys {
            self.0.reader.shards().lease_keys(req.id).await?
        } else {
            Vec::new()
        };
        Ok(LeaseTimeToLiveResponse {
            header: self.0.reader.header(state.revision),
            id: req.id,
            ttl,
            granted_ttl,
            keys,
        })
    }

    /// A fresh positive lease ID (splitmix64 over a per-member sequence), as etcd picks one on
    /// the member that receives the grant.
    pub fn new_lease_id(&self) -> i64 {
        let mut z = self
            .0
            .next_seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) & (i64::MAX as u64)).max(1) as i64
    }

    /// Proposes a grant and returns the applied response.
    ///
    /// Errors: "lease already exists", "too large lease TTL", and [`Proposer::propose`]'s.
    pub async fn grant(&self, req: LeaseGrantRequest) -> Result<LeaseGrantResponse, EtcdError> {
        match self.0.proposer.propose(Proposed::LeaseGrant(req)).await? {
            ApplyResponse::LeaseGrant(mut r) => {
                r.header = self.0.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(r)
            }
            _ => Err(crate::error::unexpected_apply_result("a lease request")),
        }
    }

    /// On becoming leader: once everything committed before this term is applied, restart
    /// every lease deadline from its checkpointed (or full) TTL. Returns the term promoted in,
    /// or `None` when this member is not a settled leader.
    pub async fn promote(&self) -> Option<u64> {
        let members = &self.0.members;
        if !members.is_leader() {
            return None;
        }
        let term = members.status().term.load(Ordering::Relaxed);
        self.0.reader.linearizable_state().await.ok()?;
        self.0.table.promote();
        Some(term)
    }
}

/// The leader's lease clock: revokes expired leases through the log and, with
/// `--experimental-enable-lease-checkpoint`, checkpoints remaining TTLs every
/// `--experimental-lease-checkpoint-interval`. Runs for the life of the member.
pub async fn run_lease_clock(core: Arc<Core>, promoted_term: Option<u64>) {
    let mut scan = tokio::time::interval(EXPIRY_SCAN);
    let mut promoted_term = promoted_term.unwrap_or(0);
    let mut last_checkpoint = Instant::now();
    let mut revoking: std::collections::HashMap<i64, Instant> = Default::default();
    let checkpoint_every = core
        .cfg
        .experimental_lease_checkpoint_interval
        .max(Duration::from_secs(1));
    loop {
        scan.tick().await;
        if !core.members.is_leader() {
            promoted_term = 0;
            continue;
        }
        let term = core.node.status.term.load(Ordering::Relaxed);
        if promoted_term != term {
            match core.leases.promote().await {
                Some(t) => promoted_term = t,
                None => continue,
            }
            last_checkpoint = Instant::now();
        }
        let now = Instant::now();
        let (expired, checkpoints) = {
            let table = core.leases.table().lock();
            revoking.retain(|id, since| {
                table.contains_key(id) && now.duration_since(*since) < REVOKE_RETRY
            });
            let expired: Vec<i64> = table
                .iter()
                .filter(|(id, l)| l.deadline <= now && !revoking.contains_key(id))
                .map(|(id, _)| *id)
                .collect();
            // As etcd, checkpoints only with --experimental-enable-lease-checkpoint: without
            // them a leader change or restart renews every lease to its full TTL.
            let checkpoints: Vec<LeaseCheckpoint> = if core.cfg.experimental_enable_lease_checkpoint
                && now.duration_since(last_checkpoint) >= checkpoint_every
            {
                table
                    .iter()
                    .filter(|(_, l)| l.ttl as u64 > checkpoint_every.as_secs() && l.deadline > now)
                    .map(|(id, l)| LeaseCheckpoint {
                        id: *id,
                        remaining_ttl: l.remaining_secs(now).max(1),
                    })
                    .collect()
            } else {
                Vec::new()
            };
            (expired, checkpoints)
        };
        for id in expired {
            revoking.insert(id, now);
            let proposer = core.proposer.clone();
            tokio::spawn(async move {
                match proposer
                    .propose(Proposed::LeaseRevoke(LeaseRevokeRequest { id }))
                    .await
                {
                    // etcd counts an expired lease once its revoke went through.
                    Ok(_) => crate::metrics::LEASE_EXPIRED.inc(),
                    Err(e) => {
                        tracing::debug!(lease = id, error = %e, "lease expiry revoke not applied yet")
                    }
                }
            });
        }
        if now.duration_since(last_checkpoint) >= checkpoint_every {
            last_checkpoint = now;
            if !checkpoints.is_empty() {
                let proposer = core.proposer.clone();
                tokio::spawn(async move {
                    let _ = proposer
                        .propose(Proposed::LeaseCheckpoint(LeaseCheckpointRequest {
                            checkpoints,
                        }))
                        .await;
                });
            }
        }
    }
}
