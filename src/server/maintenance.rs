//! `etcdserverpb.Maintenance`: Status, Alarm (replicated through Raft, see
//! [`crate::apply::alarms`]), Defragment, Hash, HashKV, MoveLeader, Snapshot (an
//! etcd-format bbolt file, see [`crate::backup`]) and Downgrade (its state replicated through
//! Raft, see [`crate::apply::downgrade`]).

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::{Access, Core, Members, Proposer, Reader};
use crate::apply::alarms::SharedAlarms;
use crate::apply::downgrade::{self, ClusterVersion, SharedDowngrade};
use crate::consensus::NodeMsg;
use crate::consensus::RaftHandle;
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    downgrade_request::DowngradeAction, maintenance_server::Maintenance, AlarmRequest,
    AlarmResponse, DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;
use crate::proto::metastorepb::{DowngradeInfo, StateSnapshot};
use crate::state_machine::ApplyResponse;

/// The etcd version MetaStore's API matches; clients (Kubernetes among them) parse it to turn
/// features on, so it names the etcd API level, not MetaStore's own version.
pub const ETCD_API_VERSION: &str = "3.5.0";

/// The Maintenance service.
pub struct MaintenanceService {
    access: Access,
    proposer: Proposer,
    reader: Reader,
    members: Members,
    /// The Raft node: its status, state images and leadership transfers.
    node: RaftHandle,
    alarms: SharedAlarms,
    /// The replicated downgrade state.
    downgrade: SharedDowngrade,
    /// Where a snapshot file is built (`<data-dir>/member/snap`).
    snap_dir: PathBuf,
    /// `--election-timeout`.
    election_timeout: Duration,
    /// How long MoveLeader waits for the transfer.
    request_timeout: Duration,
}

impl MaintenanceService {
    /// Serves Maintenance with `core`'s handles.
    pub fn new(core: &Core) -> Self {
        MaintenanceService {
            access: core.access.clone(),
            proposer: core.proposer.clone(),
            reader: core.reader.clone(),
            members: core.members.clone(),
            node: core.node.clone(),
            alarms: core.alarms.clone(),
            downgrade: core.downgrade.clone(),
            snap_dir: core.cfg.data_dir().join("member").join("snap"),
            election_timeout: Duration::from_millis(core.cfg.election_timeout.max(1)),
            request_timeout: core.request_timeout(),
        }
    }
}

type SnapshotStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

/// The cluster version every member reports ([`crate::server::http::CLUSTER_VERSION`]), as
/// etcd's `ClusterVersion()`: what Downgrade checks targets against and answers.
fn cluster_version() -> ClusterVersion {
    ClusterVersion::parse_target(super::http::CLUSTER_VERSION)
        .expect("CLUSTER_VERSION is a semantic version")
}

impl MaintenanceService {
    /// etcd 3.5 `downgradeValidate` (`server/etcdserver/v3_server.go`): parse the target,
    /// a linearizable read (so that the downgrade state is not stale), then the checks of
    /// [`downgrade::validate`]. Returns the target.
    async fn downgrade_validate(&self, version: &str) -> Result<ClusterVersion, EtcdError> {
        let target = ClusterVersion::parse_target(version)?;
        self.reader.linearizable_state().await?;
        downgrade::validate(target, cluster_version(), &self.downgrade.get())?;
        Ok(target)
    }

    /// etcd 3.5 `downgradeEnable`: validate, then propose DowngradeInfoSet{enabled, target}
    /// through Raft and wait until it is applied.
    async fn downgrade_enable(&self, version: &str) -> Result<(), EtcdError> {
        let target = self
            .downgrade_validate(version)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "reject downgrade request"))?;
        let set = DowngradeInfo {
            enabled: true,
            target_version: target.to_string(),
        };
        self.propose_downgrade(set)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "reject downgrade request"))
    }

    /// etcd 3.5 `downgradeCancel`: a linearizable read, the check of
    /// [`downgrade::check_cancel`], then DowngradeInfoSet{enabled: false} through Raft.
    async fn downgrade_cancel(&self) -> Result<(), EtcdError> {
        self.reader.linearizable_state().await?;
        downgrade::check_cancel(&self.downgrade.get())?;
        self.propose_downgrade(DowngradeInfo::default()).await
    }

    /// Proposes a DowngradeInfoSet (as the member itself: the caller was checked already, as
    /// etcd's `authMaintenanceServer` does) and waits until it is applied.
    async fn propose_downgrade(&self, set: DowngradeInfo) -> Result<(), EtcdError> {
        match self
            .proposer
            .propose(Proposed::DowngradeInfoSet(set))
            .await?
        {
            ApplyResponse::Downgrade => Ok(()),
            _ => Err(crate::error::unexpected_apply_result("downgrade")),
        }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    /// Alarm GET, ACTIVATE and DEACTIVATE, proposed through Raft and applied on every member
    /// as etcd does (`EtcdServer.Alarm` sends an `InternalRaftRequest{Alarm}`): every member
    /// lists every member's alarms. ACTIVATE answers the alarm raised (NONE raises nothing);
    /// DEACTIVATE answers the alarm cleared, or nothing when it was not active. As etcd's
    /// server, DEACTIVATE clears exactly (member ID, type): etcdctl's `alarm disarm` lists the
    /// alarms first and disarms each one.
    ///
    /// Errors: those of a proposal ("etcdserver: no leader", "etcdserver: request timed out").
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        match self
            .proposer
            .propose(Proposed::Alarm(request.into_inner()))
            .await?
        {
            ApplyResponse::Alarm(mut r) => {
                r.header = self.reader.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(crate::error::unexpected_apply_result("alarm").into()),
        }
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let state = self.reader.applied();
        let status = &self.node.status;
        let leader = status.leader.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        if leader == 0 {
            errors.push(EtcdError::NoLeader.to_string());
        }
        // etcd: one entry per active alarm, every member's, in `AlarmMember`'s text form.
        errors.extend(self.alarms.read(|t| t.status_errors()));
        Ok(Response::new(StatusResponse {
            header: self.reader.header(state.revision),
            version: ETCD_API_VERSION.to_string(),
            db_size: self.reader.shards().db_size() as i64,
            leader,
            raft_index: status.commit.load(Ordering::Relaxed),
            raft_term: status.term.load(Ordering::Relaxed),
            raft_applied_index: state.index,
            errors,
            db_size_in_use: self.reader.shards().db_size_in_use() as i64,
            is_learner: status.is_learner.load(Ordering::Relaxed),
        }))
    }

    async fn defragment(
        &self,
        request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        self.reader.shards().defragment().await?;
        let revision = self.reader.applied().revision;
        Ok(Response::new(DefragmentResponse {
            header: self.reader.header(revision),
        }))
    }

    /// A digest of this member's key-value state (etcd: "the hash of the local KV state for
    /// consistency checking purpose"): the HashKV digest of the whole history at the current
    /// revision. etcd hashes its bbolt file, so the values differ from etcd's; as there, members
    /// holding the same state answer the same hash, and a write changes it.
    ///
    /// Errors: "permission denied" for a user other than root while auth is enabled (etcd
    /// `authMaintenanceServer.Hash`).
    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let kv = self.reader.hash_kv(0).await?;
        Ok(Response::new(HashResponse {
            header: kv.header,
            hash: kv.hash,
        }))
    }

    /// A digest of the MVCC history up to `revision` (0: the current revision), comparable
    /// across members to check that they converged (see [`Reader::hash_kv`]).
    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let revision = request.into_inner().revision;
        Ok(Response::new(self.reader.hash_kv(revision).await?))
    }

    type SnapshotStream = SnapshotStream;

    /// Streams this member's state as an etcd snapshot file (see [`crate::backup`]): a bbolt
    /// database with etcd's buckets, consistent at one applied Raft index (the image the
    /// dispatcher builds for a lagging follower), in `blob`s of 32 KiB with `remaining_bytes`
    /// counting down to 0, then a last message with the 32-byte sha256 of the database and
    /// `remaining_bytes` 0 (etcd `v3rpc/maintenance.go` `Snapshot`). `etcdctl snapshot save`
    /// writes it to a file; `snapshot status` and `snapshot restore` (etcdctl's or
    /// `metastore snapshot restore`) read it. The database is built in a temporary file under
    /// `<data-dir>/member/snap`, removed once read.
    ///
    /// Errors: "etcdserver: permission denied" for a user other than root while auth is
    /// enabled (etcd 3.5 `isAdminPermitted`); "etcdserver: server stopped" while shutting
    /// down; Unknown with the cause when the file cannot be written (etcd `togRPCError` of
    /// the backend's error).
    async fn snapshot(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        // Root only while auth is enabled (etcd 3.5 `isAdminPermitted`).
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let image = self.node.state_image().await?;
        let snap = <StateSnapshot as prost::Message>::decode(image.data.as_ref())
            .map_err(|e| EtcdError::SnapshotImage(e.to_string()))?;
        let dir = self.snap_dir.clone();
        let header = self.reader.header(snap.revision);
        let chunks = tokio::task::spawn_blocking(move || crate::backup::snapshot_db(&snap, &dir))
            .await
            .map_err(|e| EtcdError::Unknown(e.to_string()))?
            .map_err(|e| EtcdError::Unknown(e.to_string()))?;
        tracing::info!(
            index = image.index,
            bytes = chunks.db_len(),
            "sending database snapshot to client"
        );
        // Read from disk one piece at a time, and only as fast as the client takes them: the
        // channel holds a few pieces, and a client that goes away ends the reading.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            for chunk in chunks {
                let message = chunk
                    .map(|c| SnapshotResponse {
                        header,
                        remaining_bytes: c.remaining_bytes,
                        blob: c.blob,
                    })
                    .map_err(|e| Status::from(EtcdError::Unknown(e.to_string())));
                let failed = message.is_err();
                if tx.blocking_send(message).is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// Hands leadership to `target_id` (Raft thesis section 3.10, leadership transfer) and
    /// waits until it leads, as `etcdctl move-leader` expects. Answers without a header, as
    /// etcd 3.5 does.
    ///
    /// Errors: "not leader" when this member does not lead; "bad leader transferee" for a
    /// learner or an unknown member; "request timed out, leader transfer took too long".
    async fn move_leader(
        &self,
        request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        // No permission check: etcd's `authMaintenanceServer.MoveLeader` passes it through.
        let target = request.into_inner().target_id;
        let status = &self.node.status;
        if !self.members.is_leader() {
            return Err(EtcdError::NotLeader.into());
        }
        let is_voter = self.members.table().is_voter(target);
        if !is_voter {
            return Err(EtcdError::BadLeaderTransferee.into());
        }
        if target == self.members.me().id {
            return Ok(Response::new(MoveLeaderResponse { header: None }));
        }
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        // raft-rs abandons a transfer after an election timeout; ask again until it lands.
        let retry = self.election_timeout;
        let mut changes = status.subscribe();
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(EtcdError::LeaderTransferTimeout.into());
            }
            self.node
                .tx
                .send_async(NodeMsg::TransferLeader(target))
                .await
                .map_err(|_| EtcdError::Stopped)?;
            let landed = changes.wait_for(|l| l.leader == target);
            match tokio::time::timeout(retry.min(deadline - now), landed).await {
                Ok(Ok(_)) => break,
                Ok(Err(_)) => return Err(EtcdError::Stopped.into()),
                Err(_) => {}
            }
        }
        Ok(Response::new(MoveLeaderResponse { header: None }))
    }

    /// Cluster downgrade, as etcd 3.5's `EtcdServer.Downgrade` (`server/etcdserver/
    /// v3_server.go`) answers for a cluster whose members all run 3.5:
    ///
    /// - VALIDATE: `version` ("3.4" or "3.4.x") must be one minor version below the cluster
    ///   version and no downgrade may be enabled; answers the cluster version ("3.5.0").
    /// - ENABLE: validates the same way, then records the downgrade (enabled, target "3.4.0")
    ///   through Raft on every member; answers the cluster version.
    /// - CANCEL: a downgrade must be enabled; clears it through Raft; answers the cluster
    ///   version.
    ///
    /// The state is replicated and survives restarts (see [`crate::apply::downgrade`]). What
    /// enabling means here: MetaStore members cannot run as 3.4, so no member changes its
    /// version and the cluster version stays "3.5.0" (as in etcd until members are replaced);
    /// the downgrade stays enabled until a CANCEL.
    ///
    /// Errors (etcd's `api/v3rpc/rpctypes/error.go` statuses): "etcdserver: wrong downgrade
    /// target version format" (InvalidArgument, [`EtcdError::WrongDowngradeVersionFormat`]) for
    /// a `version` that does not parse, checked before anything else; "etcdserver: invalid
    /// downgrade target version" (InvalidArgument,
    /// [`EtcdError::InvalidDowngradeTargetVersion`]) for another target; "etcdserver: cluster
    /// has a downgrade job in progress" (FailedPrecondition, [`EtcdError::DowngradeInProcess`])
    /// for VALIDATE or ENABLE while one is enabled; "etcdserver: no inflight downgrade job"
    /// (FailedPrecondition, [`EtcdError::NoInflightDowngrade`]) for CANCEL while none is;
    /// "etcdserver: unknown method" (Unknown, [`EtcdError::UnknownMethod`]) for another
    /// action; "etcdserver: permission denied" and the other auth errors for a caller other
    /// than root while auth is enabled (etcd `authMaintenanceServer.Downgrade`,
    /// `isAuthenticated`); and those of the linearizable read and the proposal ("etcdserver:
    /// no leader", "etcdserver: request timed out", "etcdserver: leader changed").
    async fn downgrade(
        &self,
        request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        let caller = self.access.caller_of(&request).await?;
        self.access.check_admin(caller.as_ref())?;
        let r = request.into_inner();
        match DowngradeAction::try_from(r.action) {
            Ok(DowngradeAction::Validate) => self.downgrade_validate(&r.version).await.map(drop),
            Ok(DowngradeAction::Enable) => self.downgrade_enable(&r.version).await,
            Ok(DowngradeAction::Cancel) => self.downgrade_cancel().await,
            Err(_) => Err(EtcdError::UnknownMethod),
        }?;
        // etcd fills the header after the call (`maintenanceServer.Downgrade`, `hdr.fill`).
        Ok(Response::new(DowngradeResponse {
            header: self.reader.header(self.reader.applied().revision),
            version: cluster_version().to_string(),
        }))
    }
}
