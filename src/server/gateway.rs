//! etcd's JSON gateway (grpc-gateway v1) on the client port: `POST /v3/<service>/<method>`
//! with a JSON body, as etcd 3.4/3.5 serves it (`embed/serve.go` `registerGateway`, the
//! `*.pb.gw.go` handlers), so that `curl` works as against etcd:
//!
//! ```text
//! curl -L http://127.0.0.1:2379/v3/kv/put -X POST -d '{"key":"Zm9v","value":"YmFy"}'
//! ```
//!
//! Each request is turned into a gRPC call on the member's own gRPC services, through the
//! same [`super::http::Mux`] a gRPC client reaches (as etcd's gateway dials its own gRPC
//! server), so validation, auth, errors and the gRPC metrics are the same. The
//! `Authorization` header carries the token (forwarded as the `authorization` metadata, which
//! the services read as etcd does); `Grpc-Metadata-<key>` headers become `<key>` metadata.
//!
//! JSON is grpc-gateway's `runtime.JSONPb{OrigName: true}` (the serde impls pbjson generates,
//! see `proto/build.rs`): proto field names out (`create_revision`), either the proto or the
//! JSON name in; 64-bit integers as strings; bytes as standard base64; enums by name; fields at
//! their default value left out; unknown input fields ignored. `<`, `>`, `&`, U+2028 and
//! U+2029 are escaped as Go's `encoding/json` escapes them.
//!
//! Answers:
//!
//! * unary: the response message with 200 and `Grpc-Metadata-Content-Type:
//!   application/grpc`; a failed call answers the HTTP status grpc-gateway maps the gRPC code
//!   to (`runtime.HTTPStatusFromCode`: InvalidArgument and OutOfRange 400, Unauthenticated 401,
//!   PermissionDenied 403, NotFound 404, FailedPrecondition 412, Unavailable 503, Unknown 500,
//!   ...) and `{"error":"<message>","message":"<message>","code":<grpc code>}`; a body that is
//!   not JSON answers 400 with code 3 (InvalidArgument) and Go's decoder message, e.g.
//!   `unexpected EOF` or `invalid character 'x' looking for beginning of value`; an empty
//!   body is the empty request;
//! * streams (`/v3/watch`, `/v3/lease/keepalive`, `/v3/maintenance/snapshot`,
//!   `/v3/election/observe`): request messages are JSON objects one after another in the body;
//!   each response is a line `{"result":{...}}`; an error ends the stream with
//!   `{"error":{"grpc_code":N,"http_code":N,"message":"...","http_status":"..."}}` (with that
//!   HTTP status if nothing was sent before). A watch stays open after the body ends, until
//!   the client goes away (etcd's watch server ignores the client's half-close); the other
//!   streams end once their requests are answered;
//! * a `/v3/` path that is no route answers 404 `Not Found`, a route asked with another method
//!   than POST 405 `Method Not Allowed` (grpc-gateway's `OtherErrorHandler`, plain text).
//!   `OPTIONS`, CORS and the host whitelist are etcd's access controller's, in front of all
//!   HTTP on the client port ([`super::http::AccessController`]).
//!
//! `/v3beta/` paths are the same routes (etcd 3.4/3.5 rewrite them to `/v3/`). As on etcd,
//! where the gateway holds one HTTP/2 connection to its gRPC server, the calls of one
//! listener share `--max-concurrent-streams`: a call waits while that many gateway calls
//! (open streams included) are in flight.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::Code;

use crate::proto::etcdserverpb as pb;
use crate::proto::{v3electionpb as epb, v3lockpb as lpb};

/// A gRPC call on the member's own services: the gRPC request in, its response out.
pub type GrpcCall = Box<
    dyn FnOnce(
            Request<Body>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>
        + Send,
>;

/// The gateway of one client listener.
pub struct Gateway {
    /// The calls in flight at once (`--max-concurrent-streams`, as the HTTP/2 connection
    /// between etcd's gateway and its gRPC server allows).
    streams: Arc<Semaphore>,
}

/// How a method's messages flow.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses.
    ServerStream,
    /// Requests and responses both streamed; the call ends once the requests are answered.
    Bidi,
    /// As [`Shape::Bidi`], but the call stays open after the body ends (Watch).
    BidiOpen,
}

/// Whether `path` is the gateway's (`/v3/...` or `/v3beta/...`).
pub fn is_gateway_path(path: &str) -> bool {
    path.starts_with("/v3/") || path.starts_with("/v3beta/")
}

impl Gateway {
    /// A gateway that lets `max_streams` calls run at once (`--max-concurrent-streams`).
    pub fn new(max_streams: u32) -> Gateway {
        let permits = (max_streams as usize).clamp(1, Semaphore::MAX_PERMITS);
        Gateway {
            streams: Arc::new(Semaphore::new(permits)),
        }
    }

    /// Answers one gateway request (a path [`is_gateway_path`] accepts), making its gRPC call
    /// through `grpc`; see the module docs for the answers. The CORS headers and `OPTIONS`
    /// are the access controller's ([`super::http::AccessController`]).
    pub async fn serve(&self, req: Request<Body>, grpc: GrpcCall) -> Response<Body> {
        let path = req.uri().path();
        let path = path
            .strip_prefix("/v3beta/")
            .or_else(|| path.strip_prefix("/v3/"))
            .unwrap_or_default()
            .to_string();
        let post = req.method() == Method::POST;
        macro_rules! routes {
            ($($($route:literal)|+ => $shape:ident $grpc:literal $req:ty, $resp:ty;)*) => {
                match path.as_str() {
                    $($($route)|+ => {
                        if !post {
                            return text_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
                        }
                        self.call::<$req, $resp>(Shape::$shape, $grpc, req, grpc).await
                    })*
                    _ => text_error(StatusCode::NOT_FOUND, "Not Found"),
                }
            };
        }
        routes! {
            "kv/range" => Unary "/etcdserverpb.KV/Range" pb::RangeRequest, pb::RangeResponse;
            "kv/put" => Unary "/etcdserverpb.KV/Put" pb::PutRequest, pb::PutResponse;
            "kv/deleterange" => Unary "/etcdserverpb.KV/DeleteRange"
                pb::DeleteRangeRequest, pb::DeleteRangeResponse;
            "kv/txn" => Unary "/etcdserverpb.KV/Txn" pb::TxnRequest, pb::TxnResponse;
            "kv/compaction" => Unary "/etcdserverpb.KV/Compact"
                pb::CompactionRequest, pb::CompactionResponse;
            "watch" => BidiOpen "/etcdserverpb.Watch/Watch" pb::WatchRequest, pb::WatchResponse;
            "lease/grant" => Unary "/etcdserverpb.Lease/LeaseGrant"
                pb::LeaseGrantRequest, pb::LeaseGrantResponse;
            "lease/revoke" | "kv/lease/revoke" => Unary "/etcdserverpb.Lease/LeaseRevoke"
                pb::LeaseRevokeRequest, pb::LeaseRevokeResponse;
            "lease/keepalive" => Bidi "/etcdserverpb.Lease/LeaseKeepAlive"
                pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse;
            "lease/timetolive" | "kv/lease/timetolive" => Unary "/etcdserverpb.Lease/LeaseTimeToLive"
                pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse;
            "lease/leases" | "kv/lease/leases" => Unary "/etcdserverpb.Lease/LeaseLeases"
                pb::LeaseLeasesRequest, pb::LeaseLeasesResponse;
            "cluster/member/add" => Unary "/etcdserverpb.Cluster/MemberAdd"
                pb::MemberAddRequest, pb::MemberAddResponse;
            "cluster/member/remove" => Unary "/etcdserverpb.Cluster/MemberRemove"
                pb::MemberRemoveRequest, pb::MemberRemoveResponse;
            "cluster/member/update" => Unary "/etcdserverpb.Cluster/MemberUpdate"
                pb::MemberUpdateRequest, pb::MemberUpdateResponse;
            "cluster/member/list" => Unary "/etcdserverpb.Cluster/MemberList"
                pb::MemberListRequest, pb::MemberListResponse;
            "cluster/member/promote" => Unary "/etcdserverpb.Cluster/MemberPromote"
                pb::MemberPromoteRequest, pb::MemberPromoteResponse;
            "maintenance/alarm" => Unary "/etcdserverpb.Maintenance/Alarm"
                pb::AlarmRequest, pb::AlarmResponse;
            "maintenance/status" => Unary "/etcdserverpb.Maintenance/Status"
                pb::StatusRequest, pb::StatusResponse;
            "maintenance/defragment" => Unary "/etcdserverpb.Maintenance/Defragment"
                pb::DefragmentRequest, pb::DefragmentResponse;
            // Hash and HashKV share this path in etcd's gateway; Hash, registered first, wins.
            "maintenance/hash" => Unary "/etcdserverpb.Maintenance/Hash"
                pb::HashRequest, pb::HashResponse;
            "maintenance/snapshot" => ServerStream "/etcdserverpb.Maintenance/Snapshot"
                pb::SnapshotRequest, pb::SnapshotResponse;
            "maintenance/transfer-leadership" => Unary "/etcdserverpb.Maintenance/MoveLeader"
                pb::MoveLeaderRequest, pb::MoveLeaderResponse;
            "maintenance/downgrade" => Unary "/etcdserverpb.Maintenance/Downgrade"
                pb::DowngradeRequest, pb::DowngradeResponse;
            "auth/enable" => Unary "/etcdserverpb.Auth/AuthEnable"
                pb::AuthEnableRequest, pb::AuthEnableResponse;
            "auth/disable" => Unary "/etcdserverpb.Auth/AuthDisable"
                pb::AuthDisableRequest, pb::AuthDisableResponse;
            "auth/status" => Unary "/etcdserverpb.Auth/AuthStatus"
                pb::AuthStatusRequest, pb::AuthStatusResponse;
            "auth/authenticate" => Unary "/etcdserverpb.Auth/Authenticate"
                pb::AuthenticateRequest, pb::AuthenticateResponse;
            "auth/user/add" => Unary "/etcdserverpb.Auth/UserAdd"
                pb::AuthUserAddRequest, pb::AuthUserAddResponse;
            "auth/user/get" => Unary "/etcdserverpb.Auth/UserGet"
                pb::AuthUserGetRequest, pb::AuthUserGetResponse;
            "auth/user/list" => Unary "/etcdserverpb.Auth/UserList"
                pb::AuthUserListRequest, pb::AuthUserListResponse;
            "auth/user/delete" => Unary "/etcdserverpb.Auth/UserDelete"
                pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse;
            "auth/user/changepw" => Unary "/etcdserverpb.Auth/UserChangePassword"
                pb::AuthUserChangePasswordRequest, pb::AuthUserChangePasswordResponse;
            "auth/user/grant" => Unary "/etcdserverpb.Auth/UserGrantRole"
                pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse;
            "auth/user/revoke" => Unary "/etcdserverpb.Auth/UserRevokeRole"
                pb::AuthUserRevokeRoleRequest, pb::AuthUserRevokeRoleResponse;
            "auth/role/add" => Unary "/etcdserverpb.Auth/RoleAdd"
                pb::AuthRoleAddRequest, pb::AuthRoleAddResponse;
            "auth/role/get" => Unary "/etcdserverpb.Auth/RoleGet"
                pb::AuthRoleGetRequest, pb::AuthRoleGetResponse;
            "auth/role/list" => Unary "/etcdserverpb.Auth/RoleList"
                pb::AuthRoleListRequest, pb::AuthRoleListResponse;
            "auth/role/delete" => Unary "/etcdserverpb.Auth/RoleDelete"
                pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse;
            "auth/role/grant" => Unary "/etcdserverpb.Auth/RoleGrantPermission"
                pb::AuthRoleGrantPermissionRequest, pb::AuthRoleGrantPermissionResponse;
            "auth/role/revoke" => Unary "/etcdserverpb.Auth/RoleRevokePermission"
                pb::AuthRoleRevokePermissionRequest, pb::AuthRoleRevokePermissionResponse;
            "lock/lock" => Unary "/v3lockpb.Lock/Lock" lpb::LockRequest, lpb::LockResponse;
            "lock/unlock" => Unary "/v3lockpb.Lock/Unlock" lpb::UnlockRequest, lpb::UnlockResponse;
            "election/campaign" => Unary "/v3electionpb.Election/Campaign"
                epb::CampaignRequest, epb::CampaignResponse;
            "election/proclaim" => Unary "/v3electionpb.Election/Proclaim"
                epb::ProclaimRequest, epb::ProclaimResponse;
            "election/leader" => Unary "/v3electionpb.Election/Leader"
                epb::LeaderRequest, epb::LeaderResponse;
            "election/observe" => ServerStream "/v3electionpb.Election/Observe"
                epb::LeaderRequest, epb::LeaderResponse;
            "election/resign" => Unary "/v3electionpb.Election/Resign"
                epb::ResignRequest, epb::ResignResponse;
        }
    }

    /// One call of `grpc_path` with request type `Q` and response type `R`.
    async fn call<Q, R>(
        &self,
        shape: Shape,
        grpc_path: &'static str,
        req: Request<Body>,
        grpc: GrpcCall,
    ) -> Response<Body>
    where
        Q: Message + Default + serde::de::DeserializeOwned + Send + 'static,
        R: Message + Default + serde::Serialize + Send + 'static,
    {
        let (parts, mut body) = req.into_parts();
        let mut input = JsonInput::default();
        // The first (for unary calls the only) request message, read before the call.
        let first = match input.next::<Q>(&mut body).await {
            Ok(m) => m,
            Err(message) => {
                // grpc-gateway: InvalidArgument for a unary call's body; the streams return
                // the decoder's own error, which is Unknown.
                let code = if shape == Shape::Unary {
                    Code::InvalidArgument
                } else {
                    Code::Unknown
                };
                return error_response(code, &message);
            }
        };
        let permit = match self.streams.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return error_response(Code::Unavailable, "gateway closed"),
        };
        let done = CancellationToken::new();
        let grpc_body = request_body::<Q>(shape, first, input, body, done.clone()).await;
        let grpc_req = grpc_request(grpc_path, &parts.headers, grpc_body);
        let response = match grpc(grpc_req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let mut reply = GrpcReply::new(response);
        if shape == Shape::Unary {
            let answer = reply.next().await;
            drop(permit);
            return match answer {
                Ok(Some(msg)) => match R::decode(msg) {
                    Ok(resp) => json_response(StatusCode::OK, to_json(&resp)),
                    Err(e) => error_response(Code::Internal, &e.to_string()),
                },
                Ok(None) => error_response(Code::Internal, "no response message"),
                Err(status) => error_response(status.code(), status.message()),
            };
        }
        // A stream: the status is that of the first answer.
        let first = match reply.next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                done.cancel();
                return stream_response(None);
            }
            Err(status) => {
                done.cancel();
                let mut r = stream_response(Some(Bytes::from(stream_error(&status))));
                *r.status_mut() = http_status(status.code());
                return r;
            }
        };
        stream_answer::<R>(first, reply, permit, done)
    }
}

/// The gRPC request body of a call: the one request message (`first`, or the default) for a
/// unary or server-streaming call; for a bidirectional one, `first` then every further JSON
/// message `input` reads from `body`, pumped by a task until `done` (for
/// [`Shape::BidiOpen`], the body's end does not end the call).
async fn request_body<Q>(
    shape: Shape,
    first: Option<Q>,
    mut input: JsonInput,
    mut body: Body,
    done: CancellationToken,
) -> Body
where
    Q: Message + Default + serde::de::DeserializeOwned + Send + 'static,
{
    match shape {
        Shape::Unary | Shape::ServerStream => {
            let msg = first.unwrap_or_default();
            Body::new(http_body_util::Full::new(frame(&msg)))
        }
        Shape::Bidi | Shape::BidiOpen => {
            let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, tonic::Status>>(16);
            let ended = first.is_none();
            if let Some(msg) = first {
                let _ = tx.send(Ok(http_body::Frame::data(frame(&msg)))).await;
            }
            let keep_open = shape == Shape::BidiOpen;
            tokio::spawn(async move {
                if !ended {
                    loop {
                        let next = tokio::select! {
                            _ = done.cancelled() => return,
                            next = input.next::<Q>(&mut body) => next,
                        };
                        match next {
                            Ok(Some(msg)) => {
                                if tx
                                    .send(Ok(http_body::Frame::data(frame(&msg))))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            // The end of the body, or a message that does not decode:
                            // the gateway closes its side of the stream.
                            _ => break,
                        }
                    }
                }
                if keep_open {
                    tokio::select! {
                        _ = done.cancelled() => {}
                        _ = tx.closed() => {}
                    }
                }
            });
            Body::new(http_body_util::StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ))
        }
    }
}

/// A stream's answer: `first` and every later response message of `reply`, each as a line
/// `{"result":...}` (an error as the stream error line, which ends it), sent by a task that
/// holds the call's `permit` and cancels `done` (ending the request pump) when it ends.
fn stream_answer<R>(
    first: Bytes,
    mut reply: GrpcReply,
    permit: tokio::sync::OwnedSemaphorePermit,
    done: CancellationToken,
) -> Response<Body>
where
    R: Message + Default + serde::Serialize + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let _permit = permit;
        // Ends the request pump (and so the gRPC call) once this task ends.
        let _done = done.drop_guard();
        let mut next: Result<Option<Bytes>, tonic::Status> = Ok(Some(first));
        loop {
            let chunk = match next {
                Ok(Some(msg)) => match R::decode(msg) {
                    Ok(resp) => format!("{{\"result\":{}}}\n", to_json(&resp)),
                    Err(e) => stream_error(&tonic::Status::new(Code::Internal, e.to_string())),
                },
                Ok(None) => return,
                Err(status) => stream_error(&status),
            };
            let last = !chunk.ends_with('\n');
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from(chunk))))
                .await
                .is_err()
                || last
            {
                return;
            }
            next = tokio::select! {
                _ = tx.closed() => return,
                n = reply.next() => n,
            };
        }
    });
    let body = Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let mut r = Response::new(body);
    stream_headers(r.headers_mut());
    r
}

/// A stream's answer with `first` as its whole body.
fn stream_response(body: Option<Bytes>) -> Response<Body> {
    let mut r = Response::new(match body {
        Some(b) => Body::new(http_body_util::Full::new(b)),
        None => Body::empty(),
    });
    stream_headers(r.headers_mut());
    r
}

fn stream_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
}

/// The gRPC request for `path` with the forwarded metadata of `headers`
/// (`runtime.AnnotateContext`).
fn grpc_request(path: &'static str, headers: &HeaderMap, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = Method::POST;
    *req.uri_mut() = http::Uri::from_static(path);
    *req.version_mut() = http::Version::HTTP_2;
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    for (name, value) in headers {
        let name = name.as_str();
        if name == "authorization" {
            h.append(header::AUTHORIZATION, value.clone());
        } else if let Some(key) = name.strip_prefix("grpc-metadata-") {
            if let Ok(key) = http::HeaderName::from_bytes(key.as_bytes()) {
                h.append(key, value.clone());
            }
        }
    }
    req
}

/// `msg` in gRPC's length-prefixed framing, uncompressed.
fn frame<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a BytesMut grows");
    buf.freeze()
}

/// The messages and final status of a gRPC response.
struct GrpcReply {
    body: Body,
    buf: BytesMut,
    /// The status from the headers (a trailers-only answer) or the trailers.
    status: Option<tonic::Status>,
    ended: bool,
}

impl GrpcReply {
    fn new(response: Response<Body>) -> GrpcReply {
        let (parts, body) = response.into_parts();
        let status = tonic::Status::from_header_map(&parts.headers);
        let ended = status.is_some();
        GrpcReply {
            body,
            buf: BytesMut::new(),
            status,
            ended,
        }
    }

    /// The next response message; `Ok(None)` once the call ended with OK, the status if it
    /// ended otherwise.
    async fn next(&mut self) -> Result<Option<Bytes>, tonic::Status> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    return Ok(Some(self.buf.split_to(len).freeze()));
                }
            }
            if self.ended {
                return match self.status.take() {
                    Some(s) if s.code() != Code::Ok => Err(s),
                    Some(_) => Ok(None),
                    None => Err(tonic::Status::new(
                        Code::Internal,
                        "server closed the stream without sending trailers",
                    )),
                };
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(frame) => {
                        if let Some(trailers) = frame.trailers_ref() {
                            self.status = tonic::Status::from_header_map(trailers);
                        }
                    }
                },
                Some(Err(status)) => {
                    self.ended = true;
                    self.status = Some(status);
                }
                None => self.ended = true,
            }
        }
    }
}

/// The request messages in an HTTP body: JSON values one after another (Go's
/// `json.Decoder`).
#[derive(Default)]
struct JsonInput {
    buf: Vec<u8>,
    ended: bool,
}

impl JsonInput {
    /// The next message: `Ok(None)` at the end of the body, or Go's decoder message for JSON
    /// that does not parse or does not fit the message.
    async fn next<Q: serde::de::DeserializeOwned>(
        &mut self,
        body: &mut Body,
    ) -> Result<Option<Q>, String> {
        loop {
            let mut values =
                serde_json::Deserializer::from_slice(&self.buf).into_iter::<serde_json::Value>();
            match values.next() {
                Some(Ok(value)) => {
                    let used = values.byte_offset();
                    self.buf.drain(..used);
                    return serde_json::from_value::<Q>(value)
                        .map(Some)
                        .map_err(|e| go_type_error(&e));
                }
                Some(Err(e)) if !e.is_eof() || self.ended => {
                    return Err(go_syntax_error(&e, &self.buf));
                }
                None if self.ended => return Ok(None),
                _ => {}
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => self.ended = true,
            }
        }
    }
}

/// Go's `encoding/json` message for a syntax error serde_json found in `input`.
fn go_syntax_error(e: &serde_json::Error, input: &[u8]) -> String {
    if e.is_eof() {
        return "unexpected EOF".to_string();
    }
    // The offending byte: serde_json reports its line and (1-based) column.
    let offset = input
        .split(|b| *b == b'\n')
        .take(e.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum::<usize>()
        + e.column().saturating_sub(1);
    let Some(&c) = input.get(offset) else {
        return "unexpected EOF".to_string();
    };
    let text = e.to_string();
    let context = if text.starts_with("expected `:`") {
        "after object key"
    } else if text.starts_with("expected `,` or `}`") {
        "after object key:value pair"
    } else if text.starts_with("expected `,` or `]`") {
        "after array element"
    } else if text.starts_with("key must be a string")
        || (text.starts_with("trailing comma") && c == b'}')
    {
        "looking for beginning of object key string"
    } else if text.starts_with("control character") || text.starts_with("invalid escape") {
        "in string literal"
    } else {
        "looking for beginning of value"
    };
    let shown = match c {
        b'\'' => "'\\''".to_string(),
        b'"' => "'\"'".to_string(),
        c if c.is_ascii_graphic() || c == b' ' => format!("'{}'", c as char),
        c => format!("'\\x{c:02x}'"),
    };
    format!("invalid character {shown} {context}")
}

/// The message for JSON that parsed but does not fit the request message (pbjson's, with
/// Go's wording for bad base64).
fn go_type_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    // pbjson's base64 errors: "Invalid symbol 46, offset 3.", "Invalid last symbol 57,
    // offset 2.", ...
    if let Some(rest) = text
        .strip_prefix("Invalid symbol ")
        .or_else(|| text.strip_prefix("Invalid last symbol "))
    {
        if let Some(offset) = rest
            .split("offset ")
            .nth(1)
            .map(|o| o.trim_end_matches('.').trim())
        {
            return format!("illegal base64 data at input byte {offset}");
        }
    }
    text
}

/// `msg` as grpc-gateway's JSONPb marshals it.
fn to_json<M: serde::Serialize>(msg: &M) -> String {
    go_escape(serde_json::to_string(msg).unwrap_or_default())
}

/// Go's `encoding/json` escapes of HTML characters and line separators (serde_json writes them
/// as they are). Outside strings JSON has none of these characters, so a plain replace does.
fn go_escape(json: String) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON string literal, as Go writes it.
fn json_str(s: &str) -> String {
    go_escape(serde_json::to_string(s).unwrap_or_default())
}

/// grpc-gateway's `HTTPStatusFromCode`.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// grpc-gateway's `DefaultHTTPError`: `{"error":..,"message":..,"code":..}` with the HTTP
/// status of `code`, and the gRPC trailer announced as etcd's gateway does.
fn error_response(code: Code, message: &str) -> Response<Body> {
    let m = json_str(message);
    let body = if code == Code::Ok {
        format!("{{\"error\":{m},\"message\":{m}}}")
    } else {
        format!("{{\"error\":{m},\"message\":{m},\"code\":{}}}", code as i32)
    };
    let mut r = json_response(http_status(code), body);
    r.headers_mut().remove("grpc-metadata-content-type");
    r
}

/// grpc-gateway's stream error chunk (`runtime.StreamError`), without a delimiter.
fn stream_error(status: &tonic::Status) -> String {
    let http = http_status(status.code());
    let mut fields = Vec::new();
    if status.code() != Code::Ok {
        fields.push(format!("\"grpc_code\":{}", status.code() as i32));
    }
    fields.push(format!("\"http_code\":{}", http.as_u16()));
    if !status.message().is_empty() {
        fields.push(format!("\"message\":{}", json_str(status.message())));
    }
    fields.push(format!(
        "\"http_status\":{}",
        json_str(http.canonical_reason().unwrap_or_default())
    ));
    format!("{{\"error\":{{{}}}}}", fields.join(","))
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::new(http_body_util::Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    stream_headers(r.headers_mut());
    r
}

/// Go's `http.Error`: the message and a newline, as plain text.
fn text_error(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(Body::new(http_body_util::Full::new(Bytes::from(format!(
        "{message}\n"
    )))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_and_types_are_grpc_gateways() {
        let resp = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 3,
                raft_term: 4,
            }),
            kvs: vec![crate::proto::mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 2,
                version: 1,
                value: b"bar".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            to_json(&resp),
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"3","raft_term":"4"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}"#
        );
        // Either name in; enums by name or number; 64-bit integers as strings or numbers.
        let txn: pb::TxnRequest = serde_json::from_str(
            r#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":1,"createRevision":"0"}],
                "success":[{"request_put":{"key":"Zm9v","value":"YmFy","lease":7}}],"x":1}"#,
        )
        .unwrap();
        assert_eq!(
            txn.compare[0].target,
            pb::compare::CompareTarget::Create as i32
        );
        assert_eq!(
            txn.compare[0].target_union,
            Some(pb::compare::TargetUnion::CreateRevision(0))
        );
        let Some(pb::request_op::Request::RequestPut(put)) = &txn.success[0].request else {
            panic!("{txn:?}");
        };
        assert_eq!((put.key.as_slice(), put.lease), (&b"foo"[..], 7));
    }

    #[test]
    fn go_error_messages() {
        let parse = |s: &str| {
            let mut v =
                serde_json::Deserializer::from_slice(s.as_bytes()).into_iter::<serde_json::Value>();
            go_syntax_error(&v.next().unwrap().unwrap_err(), s.as_bytes())
        };
        assert_eq!(
            parse("xx"),
            "invalid character 'x' looking for beginning of value"
        );
        assert_eq!(parse("{\"key\":\"Zm9v\","), "unexpected EOF");
        assert_eq!(parse("{\"a\" 1}"), "invalid character '1' after object key");
        let e = serde_json::from_str::<pb::RangeRequest>(r#"{"key":"Zm9"}"#).unwrap_err();
        assert!(!go_type_error(&e).is_empty());
        assert_eq!(go_escape("\"<a&b>\"".into()), "\"\\u003ca\\u0026b\\u003e\"");
        assert_eq!(
            stream_error(&tonic::Status::new(Code::NotFound, "x")),
            r#"{"error":{"grpc_code":5,"http_code":404,"message":"x","http_status":"Not Found"}}"#
        );
    }
}
