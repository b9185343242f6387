//! `--grpc-keepalive-min-time`: grpc-go's server keepalive enforcement policy, which etcd sets
//! on its client port (`keepalive.EnforcementPolicy{MinTime, PermitWithoutStream: false}`).
//! hyper's HTTP/2 server answers pings at any rate, so [`PingGuard`] watches the HTTP/2 frames
//! of each client connection and applies grpc-go's rule (`http2Server.handlePing`):
//!
//! * a PING that comes less than `MinTime` after the previous one, while the client has
//!   streams open, is a strike; with no stream open, less than 2 h after the previous one;
//! * the server sending HEADERS or DATA forgives: the next ping clears the strikes;
//! * more than 2 strikes: GOAWAY with ENHANCE_YOUR_CALM and debug data "too_many_pings", then
//!   the connection closes. grpc-go clients then double their keepalive time.
//!
//! Only frame headers (9 bytes, RFC 9113 section 4.1) are read; payloads pass untouched.

use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// grpc-go's `maxPingStrikes`: the strikes a client may collect before it is sent away.
const MAX_PING_STRIKES: u32 = 2;
/// grpc-go's `defaultPingTimeout`: with no stream open, pings closer than this are strikes
/// (etcd does not permit pings without streams).
const PING_WITHOUT_STREAM_MIN: Duration = Duration::from_secs(2 * 60 * 60);
/// The client connection preface, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" (RFC 9113 section 3.4).
const CLIENT_PREFACE_BYTES: usize = 24;
/// That preface: a connection that starts otherwise is HTTP/1 (`/health`, `/metrics` on the
/// client port), which has no pings to police.
const CLIENT_PREFACE: &[u8; CLIENT_PREFACE_BYTES] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_PING: u8 = 0x6;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const ERROR_ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame header.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FrameHeader {
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame headers in a byte stream handed over in arbitrary pieces.
#[derive(Debug, Default)]
struct FrameScanner {
    /// Bytes of the connection preface still to skip.
    preface_left: usize,
    header: [u8; 9],
    filled: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
}

impl FrameScanner {
    fn new(preface: usize) -> Self {
        FrameScanner {
            preface_left: preface,
            ..Default::default()
        }
    }

    /// Between two frames: nothing of a frame has been seen but not finished.
    fn at_boundary(&self) -> bool {
        self.preface_left == 0 && self.filled == 0 && self.payload_left == 0
    }

    fn feed(&mut self, mut bytes: &[u8], mut on_frame: impl FnMut(FrameHeader)) {
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.filled).min(bytes.len());
                self.header[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                self.filled += n;
                bytes = &bytes[n..];
                if self.filled == 9 {
                    let h = &self.header;
                    self.filled = 0;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    on_frame(FrameHeader {
                        kind: h[3],
                        flags: h[4],
                        stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                    });
                }
            }
        }
    }
}

/// grpc-go's ping bookkeeping for one connection.
#[derive(Debug)]
struct PingPolicy {
    min_time: Duration,
    last_ping: Option<Instant>,
    strikes: u32,
    /// The server sent HEADERS or DATA since the last ping (grpc-go's `resetPingStrikes`).
    forgive: bool,
    /// Streams the client opened that the server has not ended or reset.
    active: HashSet<u32>,
    /// The highest stream the client opened, for GOAWAY's last-stream-id.
    last_stream: u32,
}

impl PingPolicy {
    fn new(min_time: Duration) -> Self {
        PingPolicy {
            min_time,
            last_ping: None,
            strikes: 0,
            forgive: false,
            active: HashSet::new(),
            last_stream: 0,
        }
    }

    /// A frame from the client at `now`. True when the client has gone over the limit.
    fn client_frame(&mut self, frame: FrameHeader, now: Instant) -> bool {
        match frame.kind {
            FRAME_HEADERS if frame.stream > self.last_stream => {
                self.last_stream = frame.stream;
                self.active.insert(frame.stream);
            }
            FRAME_RST_STREAM => {
                self.active.remove(&frame.stream);
            }
            FRAME_PING if frame.flags & FLAG_ACK == 0 => return self.ping(now),
            _ => {}
        }
        false
    }

    fn ping(&mut self, now: Instant) -> bool {
        let last = self.last_ping.replace(now);
        if std::mem::take(&mut self.forgive) {
            self.strikes = 0;
            return false;
        }
        let min = if self.active.is_empty() {
            PING_WITHOUT_STREAM_MIN
        } else {
            self.min_time
        };
        if last.is_some_and(|last| now.duration_since(last) < min) {
            self.strikes += 1;
        }
        self.strikes > MAX_PING_STRIKES
    }

    /// A frame from the server.
    fn server_frame(&mut self, frame: FrameHeader) {
        match frame.kind {
            FRAME_HEADERS | FRAME_DATA => {
                self.forgive = true;
                if frame.flags & FLAG_END_STREAM != 0 {
                    self.active.remove(&frame.stream);
                }
            }
            FRAME_RST_STREAM => {
                self.active.remove(&frame.stream);
            }
            _ => {}
        }
    }

    /// GOAWAY(last stream, ENHANCE_YOUR_CALM, "too_many_pings"), as grpc-go sends it.
    fn goaway(&self) -> Vec<u8> {
        let debug = b"too_many_pings";
        let len = 8 + debug.len() as u32;
        let mut frame = Vec::with_capacity(9 + len as usize);
        frame.extend_from_slice(&len.to_be_bytes()[1..]);
        frame.extend_from_slice(&[0x7, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(&self.last_stream.to_be_bytes());
        frame.extend_from_slice(&ERROR_ENHANCE_YOUR_CALM.to_be_bytes());
        frame.extend_from_slice(debug);
        frame
    }
}

/// A client connection under the keepalive enforcement policy; see the module docs.
pub struct PingGuard<S> {
    inner: S,
    /// None: no policy (`--grpc-keepalive-min-time 0`), bytes pass untouched.
    policy: Option<PingPolicy>,
    from_client: FrameScanner,
    from_server: FrameScanner,
    /// The GOAWAY still to send, once the server's output is between frames.
    goaway: Option<Vec<u8>>,
    /// GOAWAY sent: reads end and writes fail, so the HTTP/2 server drops the connection.
    closed: bool,
    /// Bytes of the client preface seen so far.
    preface_seen: usize,
}

impl<S> PingGuard<S> {
    /// Guards `inner` with a ping interval of at least `min_time` (zero: no guard).
    pub fn new(inner: S, min_time: Duration) -> Self {
        PingGuard {
            inner,
            policy: (!min_time.is_zero()).then(|| PingPolicy::new(min_time)),
            from_client: FrameScanner::new(CLIENT_PREFACE_BYTES),
            from_server: FrameScanner::new(0),
            goaway: None,
            closed: false,
            preface_seen: 0,
        }
    }
}

/// An accepted connection, guarded by [`PingGuard::new`] with `min_time`.
pub fn guard<S>(conn: io::Result<S>, min_time: Duration) -> io::Result<PingGuard<S>> {
    conn.map(|io| PingGuard::new(io, min_time))
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for PingGuard<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), true) = (&polled, this.policy.is_some()) {
            for &b in &buf.filled()[before..] {
                if this.preface_seen == CLIENT_PREFACE_BYTES {
                    break;
                }
                if b != CLIENT_PREFACE[this.preface_seen] {
                    // Not HTTP/2: pass everything through untouched.
                    this.policy = None;
                    return polled;
                }
                this.preface_seen += 1;
            }
        }
        if let (Poll::Ready(Ok(())), Some(policy)) = (&polled, this.policy.as_mut()) {
            let now = Instant::now();
            let mut over = false;
            this.from_client.feed(&buf.filled()[before..], |frame| {
                over |= policy.client_frame(frame, now);
            });
            if over && this.goaway.is_none() {
                tracing::warn!(
                    "transport: Got too many pings from the client, closing the connection"
                );
                this.goaway = Some(policy.goaway());
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> PingGuard<S> {
    /// Sends the pending GOAWAY when the server's output is between frames. Ready(Err) once
    /// it is out: the connection is over.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Err(too_many_pings()));
        }
        let Some(frame) = self.goaway.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        if !self.from_server.at_boundary() {
            return Poll::Ready(Ok(()));
        }
        while !frame.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, frame))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            frame.drain(..n);
        }
        std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.closed = true;
        Poll::Ready(Err(too_many_pings()))
    }

    fn saw_written(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(policy) = self.policy.as_mut() else {
            return;
        };
        for b in bufs {
            if n == 0 {
                break;
            }
            let take = n.min(b.len());
            self.from_server
                .feed(&b[..take], |frame| policy.server_frame(frame));
            n -= take;
        }
    }
}

fn too_many_pings() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed: the client sent too many pings",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.policy.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        std::task::ready!(this.poll_goaway(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.saw_written(&[io::IoSlice::new(buf)], n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.policy.is_none() {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        std::task::ready!(this.poll_goaway(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.saw_written(bufs, n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: usize) -> Vec<u8> {
        let mut f = (payload as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0xAA, payload));
        f
    }

    #[test]
    fn scanner_finds_headers_across_any_split() {
        let mut bytes = vec![b'P'; CLIENT_PREFACE_BYTES];
        bytes.extend(frame(0x4, 0, 0, 6));
        bytes.extend(frame(FRAME_HEADERS, 0x4, 1, 30));
        bytes.extend(frame(FRAME_PING, 0, 0, 8));
        for chunk in [1, 2, 5, 9, 17, bytes.len()] {
            let mut s = FrameScanner::new(CLIENT_PREFACE_BYTES);
            let mut seen = Vec::new();
            for piece in bytes.chunks(chunk) {
                s.feed(piece, |f| seen.push((f.kind, f.stream)));
            }
            assert_eq!(seen, vec![(0x4, 0), (FRAME_HEADERS, 1), (FRAME_PING, 0)]);
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn third_early_ping_is_over_the_limit() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let ping = FrameHeader {
            kind: FRAME_PING,
            flags: 0,
            stream: 0,
        };
        let mut p = PingPolicy::new(Duration::from_secs(5));
        let open = FrameHeader {
            kind: FRAME_HEADERS,
            flags: 0x4,
            stream: 1,
        };
        assert!(!p.client_frame(open, at(0)));
        assert!(!p.client_frame(ping, at(0)), "the first ping is free");
        assert!(!p.client_frame(ping, at(6000)), "after min time");
        assert!(!p.client_frame(ping, at(6100)), "strike 1");
        assert!(!p.client_frame(ping, at(6200)), "strike 2");
        assert!(p.client_frame(ping, at(6300)), "strike 3: too many");
        // Pings with ACK (answers to the server's own) never count.
        let mut p = PingPolicy::new(Duration::from_secs(5));
        p.client_frame(open, at(0));
        for i in 0..10 {
            let ack = FrameHeader {
                flags: FLAG_ACK,
                ..ping
            };
            assert!(!p.client_frame(ack, at(i)));
        }
    }

    #[test]
    fn server_output_forgives_and_idle_connections_need_two_hours() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ping = FrameHeader {
            kind: FRAME_PING,
            flags: 0,
            stream: 0,
        };
        let data = FrameHeader {
            kind: FRAME_DATA,
            flags: 0,
            stream: 1,
        };
        let mut p = PingPolicy::new(Duration::from_secs(5));
        p.client_frame(
            FrameHeader {
                kind: FRAME_HEADERS,
                flags: 0x4,
                stream: 1,
            },
            at(0),
        );
        for i in 0..10 {
            p.server_frame(data);
            assert!(!p.client_frame(ping, at(i)), "forgiven by server data");
        }
        // The stream ends: now pings are measured against two hours.
        p.server_frame(FrameHeader {
            kind: FRAME_HEADERS,
            flags: FLAG_END_STREAM | 0x4,
            stream: 1,
        });
        p.server_frame(data);
        assert!(!p.client_frame(ping, at(100)));
        assert!(!p.client_frame(ping, at(200)), "strike 1");
        assert!(!p.client_frame(ping, at(300)), "strike 2");
        assert!(p.client_frame(ping, at(400)), "strike 3");
    }

    #[tokio::test]
    async fn http1_connections_pass_untouched() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut guarded = PingGuard::new(server, Duration::from_secs(5));
        let mut client = client;
        // Bytes that, read as HTTP/2 frames after a preface, would be a run of PINGs.
        let mut request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        for _ in 0..4 {
            request.extend(frame(FRAME_PING, 0, 0, 8));
        }
        client.write_all(&request).await.unwrap();
        let mut got = vec![0; request.len()];
        guarded.read_exact(&mut got).await.unwrap();
        assert_eq!(got, request);
        assert!(guarded.policy.is_none() && guarded.goaway.is_none());
        guarded.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    }

    #[test]
    fn goaway_is_grpc_gos() {
        let mut p = PingPolicy::new(Duration::from_secs(5));
        p.last_stream = 7;
        let f = p.goaway();
        assert_eq!(&f[..9], &[0, 0, 22, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&f[9..13], &7u32.to_be_bytes());
        assert_eq!(&f[13..17], &0xbu32.to_be_bytes());
        assert_eq!(&f[17..], b"too_many_pings");
    }
}
