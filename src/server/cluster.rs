//! `etcdserverpb.Cluster`: MemberList answers with this member. Membership changes arrive with
//! multi-member clusters and answer Unimplemented until then.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Core;
use crate::error::EtcdError;
use crate::proto::etcdserverpb::{
    cluster_server::Cluster, Member, MemberAddRequest, MemberAddResponse, MemberListRequest,
    MemberListResponse, MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest,
    MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
};

/// The Cluster service.
pub struct ClusterService {
    core: Arc<Core>,
}

impl ClusterService {
    /// Serves Cluster over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        ClusterService { core }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(EtcdError::Unsupported("member add").into())
    }

    async fn member_remove(
        &self,
        _: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(EtcdError::Unsupported("member remove").into())
    }

    async fn member_update(
        &self,
        _: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(EtcdError::Unsupported("member update").into())
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.core.linearizable_state().await?;
        }
        let m = &self.core.member;
        let revision = self.core.applied.borrow().revision;
        Ok(Response::new(MemberListResponse {
            header: self.core.header(revision),
            members: vec![Member {
                id: m.id,
                name: m.name.clone(),
                peer_ur_ls: m.peer_urls.clone(),
                client_ur_ls: m.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(EtcdError::Unsupported("member promote").into())
    }
}
