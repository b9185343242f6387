//! Sockets for the client and peer ports, opened as etcd's `pkg/transport` opens them: TCP for
//! `http://` and `https://` URLs, Unix domain sockets for `unix://` and `unixs://`, TLS for the
//! two secure schemes. A Unix socket file is named by the URL's `host:port` (Go's `u.Host`),
//! relative to the working directory: `unix://etcd.unix:1` listens on `./etcd.unix:1`.
//!
//! Serving side: [`Listener`] and [`tls_incoming`]. Dialing side: [`connect_peer`] and
//! [`connect_peer_lazy`], used for every member-to-member connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};
use url::Url;

pub use crate::tls::is_tls;
use crate::tls::{go_tls_error, HANDSHAKE_TIMEOUT};

/// Whether `url` names a Unix domain socket: `unix://` or `unixs://`.
pub fn is_unix(url: &Url) -> bool {
    matches!(url.scheme(), "unix" | "unixs")
}

/// The `host:port` of `url`, as Go's `url.URL.Host` spells it. For a Unix URL this is the socket
/// file's path.
pub fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or("localhost");
    match url.port_or_known_default() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// A bound client or peer listener.
pub enum Listener {
    /// `http://` or `https://`.
    Tcp(TcpListener),
    /// `unix://` or `unixs://`, with its socket file's path.
    Unix(UnixListener, String),
}

impl Listener {
    /// Listens on `url`. A Unix socket file left by an earlier run is replaced, as etcd does.
    ///
    /// Errors: the address is taken or cannot be bound; the stale socket cannot be removed.
    pub async fn bind(url: &Url) -> io::Result<Listener> {
        if is_unix(url) {
            let path = host_port(url);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            return Ok(Listener::Unix(UnixListener::bind(&path)?, path));
        }
        let host = url
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']']);
        let port = url.port_or_known_default().unwrap_or(2379);
        Ok(Listener::Tcp(TcpListener::bind((host, port)).await?))
    }

    /// Where it listens, for the log: `ip:port`, or the socket file's path.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("<{e}>"), |a| a.to_string()),
            Listener::Unix(_, path) => path.clone(),
        }
    }
}

/// A listener whose connections [`tls_incoming`] can secure.
pub trait Accept: Send + 'static {
    /// One accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, with the remote address for the log.
    fn next_connection(&self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn next_connection(&self) -> io::Result<(TcpStream, String)> {
        let (tcp, remote) = self.accept().await?;
        // Without TCP_NODELAY, Nagle plus the client's delayed ACK add ~40 ms to small replies.
        let _ = tcp.set_nodelay(true);
        Ok((tcp, remote.to_string()))
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn next_connection(&self) -> io::Result<(UnixStream, String)> {
        let (stream, remote) = self.accept().await?;
        let remote = remote
            .as_pathname()
            .map_or_else(|| "@".to_string(), |p| p.display().to_string());
        Ok((stream, remote))
    }
}

/// TLS connections accepted on `listener`: each handshake runs in its own task under
/// [`HANDSHAKE_TIMEOUT`], so that a plain-text client, a bad certificate or a stalled peer is
/// refused (and logged as etcd logs it) while the accept loop goes on serving everyone else.
pub fn tls_incoming<L: Accept>(
    listener: L,
    acceptor: TlsAcceptor,
) -> impl tokio_stream::Stream<Item = io::Result<TlsStream<L::Stream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.next_connection().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, conn_tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = conn_tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => reject(&remote, &go_tls_error(&e)),
                    Err(_) => reject(&remote, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn reject(remote: &str, error: &str) {
    // etcd (Go's http server) logs "http: TLS handshake error from ADDR: ERR".
    tracing::warn!(remote_addr = %remote, error, "rejected connection: TLS handshake error from {remote}: {error}");
}

/// Any byte stream a peer connection runs over: TCP or Unix, plain or TLS.
pub trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerStream for T {}

/// A tonic connector for one peer URL: TCP or a Unix socket, then TLS when `tls` is set.
/// tonic itself refuses `https://` URIs given to a custom connector, so every endpoint is
/// handed over as `http://host:port` with TLS done here; the HTTP/2 `:scheme` is not checked by
/// the server.
#[derive(Clone)]
struct PeerConnector {
    /// The socket file, for `unix://` and `unixs://`.
    unix: Option<String>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

async fn secure<S: PeerStream + 'static>(
    stream: S,
    tls: Option<(TlsConnector, ServerName<'static>)>,
) -> io::Result<Box<dyn PeerStream>> {
    Ok(match tls {
        Some((connector, name)) => Box::new(connector.connect(name, stream).await?),
        None => Box::new(stream),
    })
}

impl tower_service::Service<http::Uri> for PeerConnector {
    type Response = hyper_util::rt::TokioIo<Box<dyn PeerStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let PeerConnector { unix, tls } = self.clone();
        Box::pin(async move {
            let io = match unix {
                Some(path) => secure(UnixStream::connect(path).await?, tls).await?,
                None => {
                    let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']);
                    let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?;
                    tcp.set_nodelay(true)?;
                    secure(tcp, tls).await?
                }
            };
            Ok(hyper_util::rt::TokioIo::new(io))
        })
    }
}

/// A peer endpoint for `url` (any of the four schemes), with the connector that dials it.
///
/// Errors: a malformed URL; a TLS URL while no peer TLS is configured ("Connecting to HTTPS
/// without TLS enabled", as tonic says).
fn peer_parts(url: &str) -> Result<(tonic::transport::Endpoint, PeerConnector), String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let tls = if is_tls(&parsed) {
        let config = crate::tls::peer_client()
            .ok_or_else(|| format!("{url}: Connecting to HTTPS without TLS enabled"))?;
        let host = parsed
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']']);
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{url}: {e}"))?;
        Some((TlsConnector::from(config), name))
    } else {
        None
    };
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", host_port(&parsed)))
            .map_err(|e| format!("{url}: {e}"))?;
    let unix = is_unix(&parsed).then(|| host_port(&parsed));
    Ok((endpoint, PeerConnector { unix, tls }))
}

/// Applies `f` to the endpoint for a peer URL, then connects (TLS for `https://` and
/// `unixs://`).
///
/// Errors: a malformed URL, no peer TLS for a TLS URL, or the dial or handshake failing.
pub async fn connect_peer(
    url: &str,
    f: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, ConnectError> {
    let (endpoint, connector) = peer_parts(url).map_err(ConnectError::Url)?;
    Ok(f(endpoint).connect_with_connector(connector).await?)
}

/// Why [`connect_peer`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A malformed URL, or a TLS URL while no peer TLS is configured; the text names the URL.
    #[error("{0}")]
    Url(String),
    /// The dial or the TLS handshake failed (the transport error and its causes, unchanged).
    #[error(transparent)]
    Dial(#[from] tonic::transport::Error),
}

/// As [`connect_peer`], dialing on first use.
///
/// Errors: a malformed URL or no peer TLS for a TLS URL.
pub fn connect_peer_lazy(
    url: &str,
    f: impl FnOnce(tonic::transport::Endpoint) -> tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, String> {
    let (endpoint, connector) = peer_parts(url)?;
    Ok(f(endpoint).connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_urls_name_their_socket_by_host_and_port() {
        let u = Url::parse("unix://etcd.unix:1").unwrap();
        assert!(is_unix(&u) && !is_tls(&u));
        assert_eq!(host_port(&u), "etcd.unix:1");
        let u = Url::parse("unixs://localhost:2379").unwrap();
        assert!(is_unix(&u) && is_tls(&u));
        assert_eq!(host_port(&u), "localhost:2379");
        let u = Url::parse("https://127.0.0.1:2379").unwrap();
        assert!(!is_unix(&u) && is_tls(&u));
        assert_eq!(
            host_port(&Url::parse("http://[::1]:80").unwrap()),
            "[::1]:80"
        );
    }
}
