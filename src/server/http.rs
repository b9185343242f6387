//! HTTP on the client port and on `--listen-metrics-urls`, as etcd 3.5 serves it.
//!
//! etcd multiplexes one listener between gRPC and an HTTP mux (`server/embed/serve.go`,
//! `grpcHandlerFunc`): a request over HTTP/2 whose `content-type` contains `application/grpc`
//! goes to the gRPC server, everything else (HTTP/1.1, or HTTP/2 without that content type) to
//! the HTTP handlers. [`HttpLayer`] does the same in front of the tonic router, which is
//! therefore built with `accept_http1(true)`. gRPC calls are counted on their way through
//! (`grpc_server_started_total`, `grpc_server_handled_total`, `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total`, and `grpc_server_handling_seconds` under `--metrics
//! extensive`, as go-grpc-prometheus counts them), and `grpc.health.v1.Health` is answered here ([`HealthReporter`]).
//!
//! The HTTP endpoints (etcd `server/etcdhttp/health.go`, `metrics.go`, `base.go`):
//!
//! * `GET /health`: `{"health":"true","reason":""}` with 200, or `{"health":"false",
//!   "reason":"..."}` with 503: an active alarm ("ALARM NOSPACE", "ALARM CORRUPT"; skipped
//!   when named by `?exclude=NOSPACE`), no leader ("RAFT NO LEADER"; not checked with
//!   `?serializable=true`), or a failed Range ("RANGE ERROR:..."; linearizable unless
//!   `?serializable=true`);
//! * `GET /livez` (check `serializable_read`) and `GET /readyz` (checks `data_corruption`,
//!   `serializable_read`, `linearizable_read`), etcd 3.5.11's: `ok` with 200, with each check's
//!   `[+]name ok` line first under `?verbose`; 503 listing `[-]name failed: reason` when one
//!   fails. `?exclude=name` skips a check; `/livez/<check>` and `/readyz/<check>` run one;
//! * `GET /version`: `{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}`;
//! * `/metrics`: [`crate::metrics`] in the Prometheus text format.
//!
//! On a client URL, `/v3/...` and `/v3beta/...` are etcd's JSON gateway ([`super::gateway`]),
//! whose calls go through this same layer to the gRPC services. Other paths answer 404 `404
//! page not found` (Go's `http.NotFound`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tonic::body::Body;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use super::Core;
use crate::metrics::{ServerState, GRPC_HANDLED, GRPC_MSG_RECEIVED, GRPC_MSG_SENT, GRPC_STARTED};
use crate::proto::etcdserverpb::{AlarmType, RangeRequest};

/// The cluster version `/version` and `etcd_cluster_version` report (etcd's cluster version
/// is the lowest member's major.minor, ".0").
pub const CLUSTER_VERSION: &str = "3.5.0";

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// A client URL: gRPC, `/version` and the metrics and health endpoints.
    Client,
    /// A `--listen-metrics-urls` URL: `/metrics` and the health endpoints only (etcd
    /// `serveMetrics`), no gRPC.
    Metrics,
}

/// The tower layer that puts [`Mux`] in front of the gRPC services.
#[derive(Clone)]
pub struct HttpLayer {
    core: Arc<Core>,
    health: HealthServer<HealthService>,
    endpoints: Endpoints,
    gateway: Arc<super::gateway::Gateway>,
    access: Arc<AccessController>,
}

impl HttpLayer {
    /// Serves `endpoints` over `core` on a listener that is TLS (`secure`) or not;
    /// `grpc.health.v1.Health` answers from `health`.
    pub fn new(
        core: Arc<Core>,
        health: &HealthReporter,
        endpoints: Endpoints,
        secure: bool,
    ) -> Self {
        let gateway = super::gateway::Gateway::new(core.cfg.max_concurrent_streams);
        let access = AccessController::new(&core.cfg.cors, &core.cfg.host_whitelist, secure);
        HttpLayer {
            core,
            health: HealthServer::new(HealthService::from_health_reporter(health.clone())),
            endpoints,
            gateway: Arc::new(gateway),
            access: Arc::new(access),
        }
    }
}

/// etcd's `accessController` (`embed/serve.go`), in front of every HTTP request on a client
/// URL (the gateway, `/health`, `/version`, `/metrics`; not gRPC, not the metrics URLs):
///
/// * on a listener without TLS, a `Host` (HTTP/2 `:authority`) whose name, port removed, is
///   not in `--host-whitelist` is refused with 421 Misdirected Request and etcd's
///   CVE-2018-5702 text (DNS rebinding); `*` (the default) accepts any;
/// * every answer carries etcd's CORS headers, `Access-Control-Allow-Origin: *` when
///   `--cors` has `*` (the default), else the request's `Origin` when it is listed, else none;
/// * `OPTIONS` (a CORS preflight) answers 200 with nothing.
#[derive(Debug)]
pub struct AccessController {
    /// `--cors` origins; `None` when `*` allows all.
    origins: Option<Vec<String>>,
    /// `--host-whitelist` names; `None` when `*` allows all, or on a TLS listener.
    hosts: Option<Vec<String>>,
}

impl AccessController {
    /// Rules from the comma-separated `--cors` and `--host-whitelist` values, for a listener
    /// with TLS (`secure`: every host is accepted, as etcd checks hosts only for plain HTTP)
    /// or without.
    pub fn new(cors: &str, host_whitelist: &str, secure: bool) -> Self {
        let list = |s: &str| -> Option<Vec<String>> {
            let items: Vec<String> = s
                .split(',')
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect();
            (!items.iter().any(|i| i == "*")).then_some(items)
        };
        AccessController {
            origins: list(cors),
            hosts: list(host_whitelist).filter(|_| !secure),
        }
    }

    /// The refusal for a request whose host is not whitelisted, or `None` to serve it.
    fn refuse(&self, req: &Request<Body>) -> Option<Response<Body>> {
        let hosts = self.hosts.as_ref()?;
        let host = hostname(req);
        if hosts.contains(&host) {
            return None;
        }
        tracing::warn!(host = %host, "rejecting HTTP request to prevent DNS rebinding attacks");
        Some(error(
            StatusCode::MISDIRECTED_REQUEST,
            &format!(
                "\netcd received your request, but the Host header was unrecognized.\n\n\
                 To fix this, choose one of the following options:\n\
                 - Enable TLS, then any HTTP request will be allowed.\n\
                 - Add the hostname you want to use to the whitelist in settings.\n  \
                 - e.g. etcd --host-whitelist {}\n\n\
                 This requirement has been added to help prevent \"DNS Rebinding\" attacks \
                 (CVE-2018-5702).\n",
                json_string(&host)
            ),
        ))
    }

    /// Adds etcd's CORS headers (`addCORSHeader`) to `response` for a request from `origin`.
    fn add_cors(&self, origin: Option<&http::HeaderValue>, response: &mut Response<Body>) {
        let allowed = match &self.origins {
            None => http::HeaderValue::from_static("*"),
            Some(list) => match origin {
                Some(o) if list.iter().any(|l| l.as_bytes() == o.as_bytes()) => o.clone(),
                _ => return,
            },
        };
        let h = response.headers_mut();
        h.insert(
            "access-control-allow-methods",
            http::HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
        );
        h.insert("access-control-allow-origin", allowed);
        h.insert(
            "access-control-allow-headers",
            http::HeaderValue::from_static("accept, content-type, authorization"),
        );
    }
}

/// etcd's `httputil.GetHostname`: the request's host (HTTP/1.1 `Host`, HTTP/2 `:authority`)
/// without its port; the host as given when it has no port.
fn hostname<B>(req: &Request<B>) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    // Go's net.SplitHostPort: `[v6]:port` or `name:port` (exactly one colon).
    if let Some(rest) = host.strip_prefix('[') {
        if let Some((name, port)) = rest.split_once("]:") {
            if !port.contains(':') {
                return name.to_string();
            }
        }
        return host;
    }
    match host.split_once(':') {
        Some((name, port)) if !port.contains(':') => name.to_string(),
        _ => host,
    }
}

impl<S> tower_layer::Layer<S> for HttpLayer {
    type Service = Mux<S>;

    fn layer(&self, inner: S) -> Mux<S> {
        Mux {
            inner,
            layer: self.clone(),
        }
    }
}

/// Routes each request to gRPC (`inner`, or the health service) or to the HTTP endpoints;
/// see the module docs.
#[derive(Clone)]
pub struct Mux<S> {
    inner: S,
    layer: HttpLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// etcd `grpcHandlerFunc`: `r.ProtoMajor == 2 && strings.Contains(contentType,
/// "application/grpc")`.
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.version() == http::Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/grpc"))
}

impl<S> tower_service::Service<Request<Body>> for Mux<S>
where
    S: tower_service::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S: Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if self.layer.endpoints == Endpoints::Metrics {
            let layer = self.layer.clone();
            return Box::pin(
                async move { Ok(serve_http(&layer.core, layer.endpoints, req).await) },
            );
        }
        if !is_grpc(&req) {
            let layer = self.layer.clone();
            if let Some(refusal) = layer.access.refuse(&req) {
                return Box::pin(async move { Ok(refusal) });
            }
            let origin = req.headers().get(header::ORIGIN).cloned();
            let grpc = self.clone();
            return Box::pin(async move {
                let mut response = if req.method() == Method::OPTIONS {
                    Response::new(Body::empty())
                } else if super::gateway::is_gateway_path(req.uri().path()) {
                    // The gateway's gRPC calls come back through this layer.
                    let mut grpc = grpc;
                    let call = Box::new(move |r| grpc.call(r));
                    layer.gateway.serve(req, call).await
                } else {
                    serve_http(&layer.core, layer.endpoints, req).await
                };
                layer.access.add_cors(origin.as_ref(), &mut response);
                Ok(response)
            });
        }
        let mut labels = GrpcLabels::of(req.uri().path());
        if crate::metrics::handling_time_enabled() {
            labels.started = Some(std::time::Instant::now());
        }
        let names = [labels.kind, labels.service.as_str(), labels.method.as_str()];
        GRPC_STARTED.with_label_values(&names).inc();
        let received = GRPC_MSG_RECEIVED.with_label_values(&names);
        let req = req.map(|inner| {
            Body::new(MessageCounter {
                inner,
                scanner: MessageScanner::default(),
                counter: received,
            })
        });
        let call: BoxFuture<Result<Response<Body>, Infallible>> =
            if labels.service == HEALTH_SERVICE {
                let mut health = self.layer.health.clone();
                Box::pin(tower_service::Service::call(&mut health, req))
            } else {
                Box::pin(self.inner.call(req))
            };
        Box::pin(async move {
            let response = call.await?;
            Ok(counted(response, labels))
        })
    }
}

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The labels of one gRPC call (go-grpc-prometheus `grpc_type`, `grpc_service`,
/// `grpc_method`).
#[derive(Clone, Debug)]
struct GrpcLabels {
    kind: &'static str,
    service: String,
    method: String,
    /// When the call started, under `--metrics extensive`.
    started: Option<std::time::Instant>,
}

/// etcd's streaming methods: (service, method, grpc_type). Every other method is unary.
const STREAMING: &[(&str, &str, &str)] = &[
    ("etcdserverpb.Watch", "Watch", "bidi_stream"),
    ("etcdserverpb.Lease", "LeaseKeepAlive", "bidi_stream"),
    ("etcdserverpb.Maintenance", "Snapshot", "server_stream"),
    ("v3electionpb.Election", "Observe", "server_stream"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
];

/// The methods registered on the client port, by service (etcd's go-grpc-prometheus
/// `InitializeMetrics` shows every registered method with zero counts from the start).
const METHODS: &[(&str, &[&str])] = &[
    (
        "etcdserverpb.KV",
        &["Range", "Put", "DeleteRange", "Txn", "Compact"],
    ),
    ("etcdserverpb.Watch", &["Watch"]),
    (
        "etcdserverpb.Lease",
        &[
            "LeaseGrant",
            "LeaseRevoke",
            "LeaseKeepAlive",
            "LeaseTimeToLive",
            "LeaseLeases",
        ],
    ),
    (
        "etcdserverpb.Cluster",
        &[
            "MemberAdd",
            "MemberRemove",
            "MemberUpdate",
            "MemberList",
            "MemberPromote",
        ],
    ),
    (
        "etcdserverpb.Maintenance",
        &[
            "Alarm",
            "Status",
            "Defragment",
            "Hash",
            "HashKV",
            "Snapshot",
            "MoveLeader",
            "Downgrade",
        ],
    ),
    ("v3lockpb.Lock", &["Lock", "Unlock"]),
    (
        "v3electionpb.Election",
        &["Campaign", "Proclaim", "Leader", "Observe", "Resign"],
    ),
    (
        "etcdserverpb.Auth",
        &[
            "AuthEnable",
            "AuthDisable",
            "AuthStatus",
            "Authenticate",
            "UserAdd",
            "UserGet",
            "UserList",
            "UserDelete",
            "UserChangePassword",
            "UserGrantRole",
            "UserRevokeRole",
            "RoleAdd",
            "RoleGet",
            "RoleList",
            "RoleDelete",
            "RoleGrantPermission",
            "RoleRevokePermission",
        ],
    ),
    ("grpc.health.v1.Health", &["Check", "Watch"]),
];

/// gRPC status codes as grpc-go's `codes.Code.String()` spells them, by number.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

impl GrpcLabels {
    fn of(path: &str) -> GrpcLabels {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default().to_string();
        let method = parts.next().unwrap_or_default().to_string();
        GrpcLabels {
            kind: grpc_type(&service, &method),
            service,
            method,
            started: None,
        }
    }
}

fn grpc_type(service: &str, method: &str) -> &'static str {
    STREAMING
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map_or("unary", |(_, _, kind)| kind)
}

/// Creates the gRPC counters of every registered method at zero (go-grpc-prometheus
/// `preRegisterMethod`), so that they are listed before the first call.
pub fn init_grpc_metrics() {
    for (service, methods) in METHODS {
        for method in *methods {
            let kind = grpc_type(service, method);
            GRPC_STARTED.with_label_values(&[kind, service, method]);
            GRPC_MSG_RECEIVED.with_label_values(&[kind, service, method]);
            GRPC_MSG_SENT.with_label_values(&[kind, service, method]);
            for code in CODE_NAMES {
                GRPC_HANDLED.with_label_values(&[kind, service, method, code]);
            }
        }
    }
}

fn code_name(code: &[u8]) -> &'static str {
    std::str::from_utf8(code)
        .ok()
        .and_then(|c| c.parse::<usize>().ok())
        .and_then(|c| CODE_NAMES.get(c).copied())
        .unwrap_or("Unknown")
}

/// `response` with a body that counts the call in `grpc_server_handled_total` when it ends:
/// with the `grpc-status` of its trailers, or of its headers (a trailers-only response, whose
/// empty body hyper may drop unpolled), or as `Canceled` when the body is dropped before its
/// end (the client went away, as grpc-go reports a cancelled stream).
fn counted(response: Response<Body>, labels: GrpcLabels) -> Response<Body> {
    let header_code = response
        .headers()
        .get("grpc-status")
        .map(|v| code_name(v.as_bytes()));
    let sent = GRPC_MSG_SENT.with_label_values(&[labels.kind, &labels.service, &labels.method]);
    response.map(|inner| {
        Body::new(CountedBody {
            inner: MessageCounter {
                inner,
                scanner: MessageScanner::default(),
                counter: sent,
            },
            labels: Some(labels),
            header_code,
        })
    })
}

/// Finds the ends of gRPC messages (a 5-byte prefix: compressed flag, big-endian length; then
/// the message) in a body handed over in arbitrary pieces.
#[derive(Debug, Default)]
struct MessageScanner {
    prefix: [u8; 5],
    filled: usize,
    /// Bytes of the current message still to come.
    left: u64,
}

impl MessageScanner {
    /// Feeds `bytes`; returns how many messages they completed.
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut done = 0;
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = (self.left.min(bytes.len() as u64)) as usize;
                self.left -= n as u64;
                bytes = &bytes[n..];
                if self.left == 0 {
                    done += 1;
                }
                continue;
            }
            let n = (5 - self.filled).min(bytes.len());
            self.prefix[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == 5 {
                self.filled = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.left = u64::from(len);
                if self.left == 0 {
                    done += 1;
                }
            }
        }
        done
    }
}

/// A gRPC body whose messages are counted into `counter` as they pass (go-grpc-prometheus'
/// `grpc_server_msg_received_total` / `grpc_server_msg_sent_total`).
struct MessageCounter {
    inner: Body,
    scanner: MessageScanner,
    counter: prometheus::IntCounter,
}

impl http_body::Body for MessageCounter {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let this = &mut *self;
                let n = this.scanner.feed(data);
                this.counter.inc_by(n);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

struct CountedBody {
    inner: MessageCounter,
    /// None once counted.
    labels: Option<GrpcLabels>,
    header_code: Option<&'static str>,
}

impl CountedBody {
    fn count(&mut self, code: &str) {
        if let Some(l) = self.labels.take() {
            GRPC_HANDLED
                .with_label_values(&[l.kind, &l.service, &l.method, code])
                .inc();
            if let Some(started) = l.started {
                crate::metrics::GRPC_HANDLING_SECONDS
                    .with_label_values(&[l.kind, &l.service, &l.method])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        // hyper does not poll a body that says it is over (a trailers-only answer).
        let code = match self.header_code {
            Some(code) if http_body::Body::is_end_stream(&self.inner) => code,
            _ => "Canceled",
        };
        self.count(code);
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .map(|v| code_name(v.as_bytes()))
                {
                    self.count(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.count("Unknown"),
            Poll::Ready(None) => {
                let code = self.header_code.unwrap_or("OK");
                self.count(code);
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Keeps `grpc.health.v1.Health` (service "") SERVING while this member knows a leader and
/// NOT_SERVING otherwise, checking every 100 ms.
pub async fn run_health_reporter(core: Arc<Core>, reporter: HealthReporter) {
    let mut last = None;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        let serving = core.node.status.leader.load(Ordering::Relaxed) != 0;
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            last = Some(serving);
        }
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Body::new(Full::new(body.into()))
}

/// Go's `http.Error`: the message and a newline, as plain text.
fn error(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{message}\n")));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        http::HeaderValue::from_static("nosniff"),
    );
    r
}

fn method_not_allowed() -> Response<Body> {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static("GET"));
    r
}

fn ok(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// The query parameters of `req`, in order.
fn query<B>(req: &Request<B>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Go's `r.URL.Query()[name]`, empty values left out (etcd `getQuerySet`).
fn query_set(q: &[(String, String)], name: &str) -> Vec<String> {
    q.iter()
        .filter(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.clone())
        .collect()
}

/// Answers one HTTP request; see the module docs.
pub async fn serve_http(core: &Core, endpoints: Endpoints, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let get = req.method() == Method::GET;
    match path.as_str() {
        "/metrics" => ok(crate::metrics::CONTENT_TYPE, metrics_text(core).await),
        "/version" if endpoints == Endpoints::Client => {
            if !get {
                return method_not_allowed();
            }
            ok(
                "application/json",
                format!(
                    "{{\"etcdserver\":\"{}\",\"etcdcluster\":\"{CLUSTER_VERSION}\"}}",
                    super::maintenance::ETCD_API_VERSION
                ),
            )
        }
        "/health" => {
            if !get {
                return method_not_allowed();
            }
            let q = query(&req);
            let excluded = query_set(&q, "exclude");
            let serializable = q
                .iter()
                .find(|(k, _)| k == "serializable")
                .is_some_and(|(_, v)| v == "true");
            let (healthy, reason) = health(core, &excluded, serializable).await;
            let body = format!(
                "{{\"health\":\"{healthy}\",\"reason\":{}}}",
                json_string(&reason)
            );
            if healthy {
                crate::metrics::HEALTH_SUCCESS.inc();
                ok("text/plain; charset=utf-8", body)
            } else {
                crate::metrics::HEALTH_FAILURES.inc();
                tracing::warn!(output = %body, "/health error");
                error(StatusCode::SERVICE_UNAVAILABLE, &body)
            }
        }
        _ => match Check::registry(&path) {
            Some((root, checks)) => {
                if !get {
                    return method_not_allowed();
                }
                let q = query(&req);
                let run: Vec<Check> = if path == root {
                    let excluded = query_set(&q, "exclude");
                    checks
                        .iter()
                        .copied()
                        .filter(|c| !excluded.iter().any(|e| e == c.name()))
                        .collect()
                } else {
                    checks
                        .iter()
                        .copied()
                        .filter(|c| path == format!("{root}/{}", c.name()))
                        .collect()
                };
                let mut reason = String::new();
                let mut failed = false;
                let kind = &root[1..];
                for check in run {
                    let outcome = check.run(core).await;
                    let status = if outcome.is_ok() { "success" } else { "error" };
                    crate::metrics::HEALTHCHECK
                        .with_label_values(&[kind, check.name()])
                        .set(outcome.is_ok().into());
                    crate::metrics::HEALTHCHECKS_TOTAL
                        .with_label_values(&[kind, check.name(), status])
                        .inc();
                    match outcome {
                        Ok(()) => reason.push_str(&format!("[+]{} ok\n", check.name())),
                        Err(e) => {
                            failed = true;
                            reason.push_str(&format!("[-]{} failed: {e}\n", check.name()));
                        }
                    }
                }
                if failed {
                    tracing::error!(path, reason, "Health check error");
                    return error(StatusCode::SERVICE_UNAVAILABLE, &reason);
                }
                let verbose = q.iter().any(|(k, _)| k == "verbose");
                let body = if verbose {
                    format!("{reason}ok\n")
                } else {
                    "ok\n".to_string()
                };
                let mut r = ok("text/plain; charset=utf-8", body);
                r.headers_mut().insert(
                    "x-content-type-options",
                    http::HeaderValue::from_static("nosniff"),
                );
                r
            }
            None => error(StatusCode::NOT_FOUND, "404 page not found"),
        },
    }
}

/// etcd's `/health` checks in order: alarms, leader, a Range (`checkAlarms`, `checkLeader`,
/// `checkAPI`). Returns (healthy, reason).
async fn health(core: &Core, excluded: &[String], serializable: bool) -> (bool, String) {
    let alarms = core.alarms.read(|t| t.get(AlarmType::None as i32));
    for a in alarms {
        let kind = AlarmType::try_from(a.alarm).unwrap_or(AlarmType::None);
        if excluded.iter().any(|e| e == kind.as_str_name()) {
            continue;
        }
        let reason = match kind {
            AlarmType::Nospace => "ALARM NOSPACE",
            AlarmType::Corrupt => "ALARM CORRUPT",
            AlarmType::None => "ALARM UNKNOWN",
        };
        tracing::warn!(
            alarm = kind.as_str_name(),
            "serving /health false due to an alarm"
        );
        return (false, reason.to_string());
    }
    if !serializable && core.node.status.leader.load(Ordering::Relaxed) == 0 {
        tracing::warn!("serving /health false; no leader");
        return (false, "RAFT NO LEADER".to_string());
    }
    if let Err(e) = read_check(core, serializable).await {
        tracing::warn!(error = %e, "serving /health false; Range fails");
        return (false, format!("RANGE ERROR:{e}"));
    }
    (true, String::new())
}

/// etcd's `readCheck`: a keys-only Range of one key, serializable or linearizable.
async fn read_check(core: &Core, serializable: bool) -> Result<(), crate::error::EtcdError> {
    core.reader
        .range(RangeRequest {
            key: vec![0],
            keys_only: true,
            limit: 1,
            serializable,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// The `/livez` and `/readyz` checks (etcd 3.5.11 `installLivezEndpoints`,
/// `installReadyzEndpoints`).
#[derive(Clone, Copy, Debug)]
enum Check {
    DataCorruption,
    SerializableRead,
    LinearizableRead,
}

impl Check {
    fn name(self) -> &'static str {
        match self {
            Check::DataCorruption => "data_corruption",
            Check::SerializableRead => "serializable_read",
            Check::LinearizableRead => "linearizable_read",
        }
    }

    /// The registry `path` belongs to: its root path and checks.
    fn registry(path: &str) -> Option<(&'static str, &'static [Check])> {
        const LIVEZ: &[Check] = &[Check::SerializableRead];
        const READYZ: &[Check] = &[
            Check::DataCorruption,
            Check::SerializableRead,
            Check::LinearizableRead,
        ];
        for (root, checks) in [("/livez", LIVEZ), ("/readyz", READYZ)] {
            if path == root
                || checks
                    .iter()
                    .any(|c| path == format!("{root}/{}", c.name()))
            {
                return Some((root, checks));
            }
        }
        None
    }

    async fn run(self, core: &Core) -> Result<(), String> {
        match self {
            Check::DataCorruption => {
                if core.alarms.read(|t| t.is_active(AlarmType::Corrupt)) {
                    Err("alarm activated: CORRUPT".to_string())
                } else {
                    Ok(())
                }
            }
            Check::SerializableRead => read_check(core, true).await.map_err(|e| e.to_string()),
            Check::LinearizableRead => read_check(core, false).await.map_err(|e| e.to_string()),
        }
    }
}

/// `s` as a JSON string, escaped as Go's `encoding/json` escapes it.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The metrics, with the state gauges read from `core` now.
async fn metrics_text(core: &Core) -> Vec<u8> {
    let status = &core.node.status;
    let leader = status.leader.load(Ordering::Relaxed);
    let shard_keys = count_keys(core).await;
    let shards = core.reader.shards();
    crate::metrics::gather(&ServerState {
        has_leader: leader != 0,
        is_leader: leader != 0 && leader == core.member.id,
        is_learner: status.is_learner.load(Ordering::Relaxed),
        member_id: core.member.id,
        committed: status.commit.load(Ordering::Relaxed),
        applied: core.reader.applied().index,
        pending: core.proposer.in_flight() as u64,
        db_size: core.reader.shards().db_size(),
        db_size_in_use: core.reader.shards().db_size_in_use(),
        quota: core.cfg.quota_bytes(),
        keys: shard_keys.as_ref().map(|k| k.iter().sum()),
        shard_keys,
        shard_apply_queue: shards.iter().map(|s| s.apply.len() as u64).collect(),
        server_version: super::maintenance::ETCD_API_VERSION.to_string(),
        cluster_version: CLUSTER_VERSION.to_string(),
    })
}

/// Live keys at the latest applied revision, per shard in shard order: a count-only Range
/// over every key.
async fn count_keys(core: &Core) -> Option<Vec<u64>> {
    let req = Arc::new(RangeRequest {
        key: vec![0],
        range_end: vec![0],
        count_only: true,
        serializable: true,
        ..Default::default()
    });
    let rev = core.reader.applied().revision;
    let parts = core
        .reader
        .shards()
        .read_range(req.clone(), rev)
        .await
        .ok()?;
    Some(parts.iter().map(|p| p.count.max(0) as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_labels_and_codes() {
        let l = GrpcLabels::of("/etcdserverpb.Watch/Watch");
        assert_eq!(
            (l.kind, l.service.as_str(), l.method.as_str()),
            ("bidi_stream", "etcdserverpb.Watch", "Watch")
        );
        assert_eq!(GrpcLabels::of("/etcdserverpb.KV/Put").kind, "unary");
        assert_eq!(code_name(b"1"), "Canceled");
        assert_eq!(code_name(b"99"), "Unknown");
    }

    #[test]
    fn message_scanner_counts_messages_across_any_split() {
        let mut body = Vec::new();
        for len in [3u32, 0, 70000] {
            body.push(0);
            body.extend(len.to_be_bytes());
            body.extend(std::iter::repeat_n(7, len as usize));
        }
        for split in [1, 2, 4, 5, 6, 1000, body.len()] {
            let mut s = MessageScanner::default();
            let n: u64 = body.chunks(split).map(|c| s.feed(c)).sum();
            assert_eq!(n, 3, "split {split}");
        }
    }

    #[test]
    fn json_strings_escape_as_go() {
        assert_eq!(json_string("a\"b<"), "\"a\\\"b\\u003c\"");
    }

    #[test]
    fn hostnames_drop_the_port_as_go_does() {
        let host = |h: &str| hostname(&Request::builder().header("host", h).body(()).unwrap());
        assert_eq!(host("localhost:2379"), "localhost");
        assert_eq!(host("example.com"), "example.com");
        assert_eq!(host("[::1]:2379"), "::1");
        assert_eq!(host("[::1]"), "[::1]");
        assert_eq!(host("a:b:c"), "a:b:c");
        let authority = Request::builder()
            .uri("http://10.0.0.1:2379/health")
            .body(())
            .unwrap();
        assert_eq!(hostname(&authority), "10.0.0.1");
    }

    #[test]
    fn access_rules_from_flags() {
        let any = AccessController::new("*", "*", false);
        assert!(any.origins.is_none() && any.hosts.is_none());
        let listed = AccessController::new("https://a, https://b", "localhost", false);
        assert_eq!(listed.origins.unwrap(), ["https://a", "https://b"]);
        assert_eq!(listed.hosts.unwrap(), ["localhost"]);
        // `*` anywhere in the list allows all; TLS listeners never check hosts.
        assert!(AccessController::new("https://a,*", "x,*", false)
            .origins
            .is_none());
        assert!(AccessController::new("*", "localhost", true)
            .hosts
            .is_none());
    }

    #[test]
    fn check_paths() {
        assert_eq!(Check::registry("/readyz").map(|r| r.0), Some("/readyz"));
        assert_eq!(
            Check::registry("/livez/serializable_read").map(|r| r.0),
            Some("/livez")
        );
        assert!(Check::registry("/livez/linearizable_read").is_none());
        assert!(Check::registry("/livez/").is_none());
    }
}
