//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{validate, Core};
use crate::apply::{txn_puts, ApplyResponse};
use crate::proto::etcdserverpb::{
    kv_server::Kv, CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use crate::proto::metastorepb::proposal::Request as Proposed;

/// The KV service.
pub struct KvService {
    core: Arc<Core>,
}

impl KvService {
    /// Serves KV over `core`.
    pub fn new(core: Arc<Core>) -> Self {
        KvService { core }
    }

    async fn write(&self, req: Proposed) -> Result<ApplyResponse, Status> {
        Ok(self.core.propose(req).await?)
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected apply result for {what}"))
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        Ok(Response::new(self.core.range(request.into_inner()).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        validate::check_put(&req)?;
        self.core.check_quota()?;
        match self.write(Proposed::Put(req)).await? {
            ApplyResponse::Put(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("put")),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        validate::check_delete(&req)?;
        match self.write(Proposed::DeleteRange(req)).await? {
            ApplyResponse::DeleteRange(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("delete")),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = request.into_inner();
        validate::check_txn(&req, self.core.cfg.max_txn_ops)?;
        if txn_puts(&req) {
            self.core.check_quota()?;
        }
        match self.write(Proposed::Txn(req)).await? {
            ApplyResponse::Txn(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("txn")),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        match self
            .write(Proposed::Compaction(request.into_inner()))
            .await?
        {
            ApplyResponse::Compaction(mut r) => {
                r.header = self.core.header(r.header.map_or(0, |h| h.revision));
                Ok(Response::new(r))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}
