//! The member's listeners: binding every URL flag's sockets, and serving a gRPC router on
//! each (TCP or Unix socket, plain or TLS, under the client port's keepalive policy).

use std::time::Duration;

use super::NodeError;
use crate::config::Config;

/// Binds every URL of one flag (`what` names it in errors: "client", "peer", "metrics").
///
/// Errors: "cannot listen on {what} URL {url}" with the cause.
pub(super) async fn bind_all(
    urls: &[url::Url],
    what: &'static str,
) -> Result<Vec<crate::net::Listener>, NodeError> {
    let mut listeners = Vec::new();
    for url in urls {
        let listener =
            crate::net::Listener::bind(url)
                .await
                .map_err(|source| NodeError::Listen {
                    what,
                    url: url.clone(),
                    source,
                })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A gRPC server builder for client traffic with etcd's HTTP/2 settings:
/// `--max-concurrent-streams` per connection, and server pings every
/// `--grpc-keepalive-interval` (0 = none) that close the connection when unanswered within
/// `--grpc-keepalive-timeout` (0 keeps the 20 s default, as grpc-go does).
/// `--grpc-keepalive-min-time` is enforced on each connection by
/// [`crate::server::keepalive::PingGuard`].
pub(super) fn client_server_builder(cfg: &Config) -> tonic::transport::Server {
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    tonic::transport::Server::builder()
        // HTTP/1.1 for the HTTP endpoints (`http::HttpLayer`).
        .accept_http1(true)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_keepalive_interval(nonzero(cfg.grpc_keepalive_interval))
        .http2_keepalive_timeout(nonzero(cfg.grpc_keepalive_timeout))
}

/// Serves `$router` on `$listener` into `$servers`: TCP or a Unix socket, with TLS for an
/// `https://` or `unixs://` URL, each connection under the `$min_ping` keepalive policy
/// ([`crate::server::keepalive::PingGuard`]; zero for none). A macro because the client and peer routers have
/// different layer types. Once the `$stop` token is cancelled, the listener stops accepting
/// and each connection is closed gracefully (HTTP/2 GOAWAY) once its requests are answered.
macro_rules! serve {
    ($servers:expr, $router:expr, $listener:expr, $url:expr, $tls:expr, $min_ping:expr, $stop:expr) => {
        use tokio_stream::StreamExt as _;
        let tls = $tls.filter(|_| crate::net::is_tls($url)).cloned();
        let min_ping: std::time::Duration = $min_ping;
        match ($listener, tls) {
            (crate::net::Listener::Tcp(l), Some(acceptor)) => {
                let incoming = crate::net::tls_incoming(l, acceptor)
                    .map(move |c| crate::server::keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Tcp(l), None) => {
                // Without TCP_NODELAY, Nagle plus the client's delayed ACK add ~40 ms to small
                // replies.
                let incoming = tonic::transport::server::TcpIncoming::from(l)
                    .with_nodelay(Some(true))
                    .map(move |c| crate::server::keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Unix(l, _), Some(acceptor)) => {
                let incoming = crate::net::tls_incoming(l, acceptor)
                    .map(move |c| crate::server::keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
            (crate::net::Listener::Unix(l, _), None) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l)
                    .map(move |c| crate::server::keepalive::guard(c, min_ping));
                $servers.spawn(
                    $router.serve_with_incoming_shutdown(incoming, $stop.clone().cancelled_owned()),
                );
            }
        }
    };
}
pub(super) use serve;
