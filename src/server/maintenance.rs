//! `etcdserverpb.Maintenance`: Status and Alarm (GET) for `etcdctl endpoint status/health`.
//! The other RPCs arrive with the maintenance issue and answer Unimplemented until then.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Core;
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmMember, AlarmRequest,
    AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse, DowngradeRequest,
    DowngradeResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest,
    MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};

/// The etcd version MetaStore's API matches; clients (Kubernetes among them) parse it to turn
/// features on, so it names the etcd API level, not MetaStore's own version.
pub const ETCD_API_VERSION: &str = "3.5.0";

/// The Maintenance service.
pub struct MaintenanceService {
    core: Arc<Core>,
}

impl MaintenanceService {
    /// Serves Maintenance over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        MaintenanceService { core }
    }
}

type SnapshotStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

fn unsupported<T>(rpc: &'static str) -> Result<Response<T>, Status> {
    Err(EtcdError::Unsupported(rpc).into())
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        let req = request.into_inner();
        let nospace =
            |alarm: i32| alarm == AlarmType::Nospace as i32 || alarm == AlarmType::None as i32;
        let action = AlarmAction::try_from(req.action).unwrap_or(AlarmAction::Get);
        match action {
            AlarmAction::Get => {}
            AlarmAction::Activate if req.alarm == AlarmType::Nospace as i32 => {
                self.core.nospace.store(true, Ordering::Relaxed);
            }
            // Disarming after a compaction and defragment lets writes through again; if the
            // backend is still over quota, the next write raises the alarm anew.
            AlarmAction::Deactivate if nospace(req.alarm) => {
                self.core.nospace.store(false, Ordering::Relaxed);
            }
            _ => return unsupported("alarms other than NOSPACE"),
        }
        let state = *self.core.applied.borrow();
        let mut alarms = Vec::new();
        if self.core.nospace.load(Ordering::Relaxed) || action == AlarmAction::Deactivate {
            alarms.push(AlarmMember {
                member_id: self.core.member.id,
                alarm: AlarmType::Nospace as i32,
            });
        }
        Ok(Response::new(AlarmResponse {
            header: self.core.header(state.revision),
            alarms,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let state = *self.core.applied.borrow();
        let status = &self.core.node.status;
        Ok(Response::new(StatusResponse {
            header: self.core.header(state.revision),
            version: ETCD_API_VERSION.to_string(),
            db_size: self.core.shards.db_size() as i64,
            leader: status.leader.load(Ordering::Relaxed),
            raft_index: status.commit.load(Ordering::Relaxed),
            raft_term: status.term.load(Ordering::Relaxed),
            raft_applied_index: state.index,
            errors: Vec::new(),
            db_size_in_use: self.core.shards.db_size_in_use() as i64,
            is_learner: false,
        }))
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.core.shards.defragment().await?;
        let revision = self.core.applied.borrow().revision;
        Ok(Response::new(DefragmentResponse {
            header: self.core.header(revision),
        }))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        unsupported("hash")
    }

    async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        unsupported("hashkv")
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        unsupported("snapshot")
    }

    async fn move_leader(
        &self,
        _: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        unsupported("move-leader")
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        unsupported("downgrade")
    }
}
