//! Checks in front of every client RPC, before its handler runs (etcd
//! `v3rpc/interceptor.go`):
//!
//! * `hasleader: true` metadata: fail with "etcdserver: no leader" while this member knows no
//!   leader, instead of waiting (clientv3's `WithRequireLeader`; Kubernetes sets it on
//!   watches). Streams opened so (Watch, LeaseKeepAlive) are also ended with that error once
//!   the member has known no leader for [`NO_LEADER_CHECKS`] election timeouts in a row
//!   ([`leader_lost`]);
//! * a learner serves only Status, serializable Range (checked in [`super::Reader::range`]) and
//!   the Snapshot stream; everything else fails with "etcdserver: rpc not supported for
//!   learner".

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::consensus::NodeStatus;
use crate::error::EtcdError;

/// gRPC metadata key of clientv3's `WithRequireLeader` (etcd `rpctypes.MetadataRequireLeaderKey`).
pub const REQUIRE_LEADER_KEY: &str = "hasleader";

/// Leaderless election timeouts in a row after which `hasleader` streams end (etcd
/// `maxNoLeaderCnt`).
pub const NO_LEADER_CHECKS: u32 = 3;

/// Returns once this member has known no leader at [`NO_LEADER_CHECKS`] checks in a row, one
/// per `election_timeout` (etcd `monitorLeader`). A stream opened with `hasleader` then ends
/// with "etcdserver: no leader", so the client moves to a member that has one.
pub async fn leader_lost(status: Arc<NodeStatus>, election_timeout: std::time::Duration) {
    let mut misses = 0;
    let mut every = tokio::time::interval(election_timeout);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if status.leader.load(Ordering::Relaxed) == 0 {
            misses += 1;
            if misses >= NO_LEADER_CHECKS {
                return;
            }
        } else {
            misses = 0;
        }
    }
}

/// For a stream opened with `hasleader` (per `headers`): ends it through `tx` with "etcdserver:
/// no leader" once [`leader_lost`] says so, unless the stream has ended first or the member
/// begins to stop (`stopping` cancelled: the stream task then sends "server stopped").
pub fn end_stream_without_leader<T: Send + 'static>(
    headers: &http::HeaderMap,
    status: Arc<NodeStatus>,
    election_timeout: std::time::Duration,
    tx: tokio::sync::mpsc::Sender<Result<T, tonic::Status>>,
    stopping: tokio_util::sync::CancellationToken,
) {
    if !requires_leader(headers) {
        return;
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = leader_lost(status, election_timeout) => {
                let _ = tx.send(Err(EtcdError::NoLeader.into())).await;
            }
            _ = tx.closed() => {}
            // The member is stopping: the stream's own task sends "server stopped"; this
            // sender must go so that the stream can end after it.
            _ = stopping.cancelled() => {}
        }
    });
}

/// Methods a learner serves (etcd `isRPCSupportedForLearner`, plus the Snapshot stream).
const LEARNER_METHODS: [&str; 3] = [
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Maintenance/Snapshot",
];

/// Whether a request carries `hasleader: true`.
pub fn requires_leader(headers: &http::HeaderMap) -> bool {
    headers
        .get(REQUIRE_LEADER_KEY)
        .is_some_and(|v| v.as_bytes() == b"true")
}

/// Why a request to `path` must be refused now, if it must.
fn refusal(status: &NodeStatus, path: &str, headers: &http::HeaderMap) -> Option<EtcdError> {
    if status.is_learner.load(Ordering::Relaxed) && !LEARNER_METHODS.contains(&path) {
        return Some(EtcdError::NotSupportedForLearner);
    }
    if requires_leader(headers) && status.leader.load(Ordering::Relaxed) == 0 {
        return Some(EtcdError::NoLeader);
    }
    None
}

/// The client requests being answered: a stop waits until there are none (etcd's
/// `GracefulStop` waits for the RPCs in flight) rather than for every client connection to
/// close, which an idle client may take its time over. A request counts from the moment the
/// gate admits it until its handler has produced the response (for a stream: opened it; the
/// streams themselves are ended by the stop).
#[derive(Clone, Default)]
pub struct InFlight(Arc<InFlightState>);

#[derive(Default)]
struct InFlightState {
    count: AtomicUsize,
    /// Set once a stop waits: only then does the last request out wake it.
    watched: AtomicBool,
    idle: tokio::sync::Notify,
}

/// One admitted request; dropped when it is answered (or abandoned).
struct Admitted(Arc<InFlightState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.watched.load(Ordering::Acquire)
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl InFlight {
    fn admit(&self) -> Admitted {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        Admitted(self.0.clone())
    }

    /// Requests admitted and not yet answered.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight.
    pub async fn idle(&self) {
        self.0.watched.store(true, Ordering::Release);
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a last request finishing in between wakes it.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The tower layer that puts a [`Gate`] in front of the client services.
#[derive(Clone)]
pub struct GateLayer {
    status: Arc<NodeStatus>,
    in_flight: InFlight,
}

impl GateLayer {
    /// Gates requests on the Raft node's `status`, counting those admitted in `in_flight`.
    pub fn new(status: Arc<NodeStatus>, in_flight: InFlight) -> Self {
        GateLayer { status, in_flight }
    }
}

impl<S> tower_layer::Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            status: self.status.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    status: Arc<NodeStatus>,
    in_flight: InFlight,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower_service::Service<http::Request<B>> for Gate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match refusal(&self.status, req.uri().path(), req.headers()) {
            Some(e) => {
                let response = tonic::Status::from(e).into_http::<RB>();
                Box::pin(async move { Ok(response) })
            }
            None => {
                let admitted = self.in_flight.admit();
                let call = self.inner.call(req);
                Box::pin(async move {
                    let _admitted = admitted;
                    let mut response = call.await?;
                    grpc_size_status(response.headers_mut());
                    Ok(response)
                })
            }
        }
    }
}

/// tonic's refusal of a request message above the decoding limit, as its headers carry it.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large: found ";

/// Rewrites tonic's refusal of an oversized request (OUT_OF_RANGE "Error, decoded message
/// length too large: found N bytes, the limit is: M bytes") into grpc-go's, which etcd's
/// clients see: RESOURCE_EXHAUSTED "grpc: received message larger than max (N vs. M)". The
/// limit is `--max-request-bytes` plus etcd's 512 KiB of gRPC overhead; requests between the
/// two limits get etcd's own "etcdserver: request is too large" from the handlers.
fn grpc_size_status(headers: &mut http::HeaderMap) {
    if headers.get("grpc-status").map(http::HeaderValue::as_bytes) != Some(b"11") {
        return;
    }
    let Some(refused) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let Some(rest) = refused.message().strip_prefix(TONIC_TOO_LARGE) else {
        return;
    };
    let numbers: Vec<&str> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .collect();
    let [found, limit] = numbers[..] else {
        return;
    };
    let status = tonic::Status::from(EtcdError::MessageTooLarge {
        found: found.to_string(),
        limit: limit.to_string(),
    });
    headers.remove("grpc-message");
    headers.remove("grpc-status");
    let _ = status.add_header(headers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_stop_waits_for_admitted_requests_only() {
        let in_flight = InFlight::default();
        // Nothing admitted: idle at once.
        in_flight.idle().await;
        let first = in_flight.admit();
        let second = in_flight.admit();
        assert_eq!(in_flight.count(), 2);
        let waiter = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.idle().await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished(), "one request is still being answered");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the last answer wakes the stop")
            .unwrap();
        assert_eq!(in_flight.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn hasleader_streams_end_after_three_leaderless_checks() {
        let status = Arc::new(NodeStatus::default());
        status.leader.store(7, Ordering::Relaxed);
        let election = std::time::Duration::from_millis(1000);
        let mut headers = http::HeaderMap::new();
        headers.insert(REQUIRE_LEADER_KEY, "true".parse().unwrap());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(), tonic::Status>>(1);
        end_stream_without_leader(&headers, status.clone(), election, tx, Default::default());
        tokio::time::sleep(election * 5).await;
        assert!(
            rx.try_recv().is_err(),
            "a leader is known: the stream stays"
        );
        status.leader.store(0, Ordering::Relaxed);
        tokio::time::sleep(election * 2).await;
        assert!(rx.try_recv().is_err(), "two checks are not enough");
        tokio::time::sleep(election * 2).await;
        let ended = rx.try_recv().expect("ended after the third check");
        assert_eq!(ended.unwrap_err().message(), "etcdserver: no leader");
    }

    #[test]
    fn oversized_requests_get_grpc_gos_status() {
        let mut headers = http::HeaderMap::new();
        tonic::Status::out_of_range(
            "Error, decoded message length too large: found 3000017 bytes, the limit is: 2097152 bytes",
        )
        .add_header(&mut headers)
        .unwrap();
        grpc_size_status(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "grpc: received message larger than max (3000017 vs. 2097152)"
        );
        // Other OUT_OF_RANGE errors (a compacted revision) are left as they are.
        let mut headers = http::HeaderMap::new();
        tonic::Status::from(EtcdError::Compacted)
            .add_header(&mut headers)
            .unwrap();
        grpc_size_status(&mut headers);
        let status = tonic::Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn learners_and_leaderless_members_refuse_like_etcd() {
        let status = NodeStatus::default();
        let mut headers = http::HeaderMap::new();
        assert_eq!(refusal(&status, "/etcdserverpb.KV/Put", &headers), None);
        headers.insert(REQUIRE_LEADER_KEY, "true".parse().unwrap());
        assert_eq!(
            refusal(&status, "/etcdserverpb.KV/Put", &headers),
            Some(EtcdError::NoLeader)
        );
        status.leader.store(7, Ordering::Relaxed);
        assert_eq!(refusal(&status, "/etcdserverpb.KV/Put", &headers), None);
        status.is_learner.store(true, Ordering::Relaxed);
        assert_eq!(
            refusal(&status, "/etcdserverpb.KV/Put", &headers),
            Some(EtcdError::NotSupportedForLearner)
        );
        assert_eq!(
            refusal(&status, "/etcdserverpb.Maintenance/Status", &headers),
            None
        );
    }
}
