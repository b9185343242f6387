//! `metastore-grpc-floor`: the cost of the gRPC stack alone, measured with the same load as the
//! server (bench/README.md, "The gRPC floor").
//!
//! It serves etcd's `KV` service with MetaStore's generated code and codec on tonic, over
//! HTTP/2 with `TCP_NODELAY` and the member's allocator, but a Put or a Range does no work: a
//! Put takes the next revision from a counter, a Range answers with no keys. Nothing is
//! replicated, stored or fsynced, and the member's own layers (its HTTP endpoints, its request
//! gate, auth) are absent. Its server CPU per request is therefore the floor under any server
//! built on this stack, whatever its storage and consensus cost.
//!
//! `--runtime multi` is the member's runtime: one tokio multi-thread runtime with `--workers`
//! workers sharing one listener. `--runtime per-core` runs `--workers` tokio current-thread
//! runtimes, one per thread, each pinned to a CPU (as the member places its shards:
//! `metastore::shard::shard_cpus`) and accepting on its own `SO_REUSEPORT`
//! listener (the kernel spreads connections over them): no task ever moves between threads.
//! `--runtime glommio` runs `--workers` glommio executors placed as the member's shards are,
//! each accepting on its own `SO_REUSEPORT` listener and serving the same tonic KV service
//! through hyper's HTTP/2 server with a thread-local executor: tonic on the shards' executors,
//! with glommio's io_uring networking instead of tokio's epoll (the `Watch` service is not
//! served there, as it runs on tokio tasks).
//!
//! `--wal-dir DIR` makes it the durable floor: a Put is answered only once its request is
//! written to a file in DIR and made durable by `fdatasync`, group-committed as a WAL is (one
//! write and one sync for every Put queued while the previous sync ran). The sync runs inline
//! on the thread of the Put that starts it, so no thread is woken for it: the least a server on
//! this stack spends for a Put it may not lose, with no consensus, index or store behind it.
//!
//! It also serves etcd's `Watch` service, as little as the watch fan-out needs: a watcher on one
//! key (no range, no history, no cancel, no progress), created at the current revision. Each
//! Put is handed to every stream (a `tokio::sync::broadcast` channel, each Put's event built
//! once), and a stream sends each of its watchers on the Put's key a response of its own, as
//! etcd does. With `--wal-dir` that makes the floor under the watch fan-out: the Puts made
//! durable, their events delivered, nothing else.
//!
//! It prints `listening on ADDR` once every listener is bound, and serves until killed.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use clap::{Parser, ValueEnum};
use metastore::proto::etcdserverpb::kv_server::{Kv, KvServer};
use metastore::proto::etcdserverpb::watch_request::RequestUnion;
use metastore::proto::etcdserverpb::watch_server::{Watch, WatchServer};
use metastore::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
    WatchRequest, WatchResponse,
};
use metastore::proto::mvccpb::{event::EventType, Event, KeyValue};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// The member's allocator (`src/main.rs`), so that the floor pays what the member pays per
/// allocation.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Clone, Copy, ValueEnum)]
enum RuntimeKind {
    /// One multi-thread runtime, one listener (the member's layout).
    Multi,
    /// One current-thread runtime per CPU, each with its own SO_REUSEPORT listener.
    PerCore,
    /// One glommio executor per CPU, each with its own SO_REUSEPORT listener (KV only).
    Glommio,
}

#[derive(Parser)]
#[command(about = "A gRPC KV server that does no work: the gRPC stack's own CPU per request")]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How the threads serve connections.
    #[arg(long, value_enum, default_value = "multi")]
    runtime: RuntimeKind,
    /// Worker threads (multi), runtimes (per-core) or executors (glommio).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Make every Put durable in a group-committed file in this directory before answering it.
    #[arg(long)]
    wal_dir: Option<PathBuf>,
    /// With `--wal-dir`: how long the Put that starts a sync waits for others to join it
    /// before writing, when others are queued already (a lone writer never waits),
    /// milliseconds (0: it writes at once). Larger batches spread each sync's cost over more
    /// Puts, at the price of latency.
    #[arg(long, default_value_t = 0)]
    group_wait_ms: u64,
}

/// The KV service with no work behind it: Put takes the next revision (after making its request
/// durable, with `--wal-dir`), Range finds nothing.
#[derive(Clone)]
struct NoWork {
    revision: Arc<AtomicI64>,
    wal: Option<Arc<GroupWal>>,
    /// Every Put's event, to every watch stream.
    events: broadcast::Sender<Arc<Event>>,
    /// Held while a watched Put takes its revision and sends its event, so that streams see
    /// events in revision order.
    publish: Arc<Mutex<()>>,
}

/// Events a watch stream may fall behind by before it is ended (the floor keeps no history
/// to catch it up from).
const STREAM_BACKLOG: usize = 65_536;

impl NoWork {
    fn new(wal: Option<Arc<GroupWal>>) -> NoWork {
        NoWork {
            revision: Arc::default(),
            wal,
            events: broadcast::channel(STREAM_BACKLOG).0,
            publish: Arc::default(),
        }
    }
}

/// Bytes of the file the durable floor writes into, written through once at start (as etcd and
/// MetaStore preallocate a 64 MiB WAL segment); appends wrap around to its start.
const WAL_FILE_BYTES: u64 = 64 << 20;

/// Put requests made durable by group commit: each Put queues its record, and whichever Put
/// finds no sync running writes everything queued with one `pwrite` and one `fdatasync`, on
/// its own thread, then wakes the Puts that sync covered.
struct GroupWal {
    file: File,
    state: Mutex<WalState>,
    /// The sequence number of the last record made durable.
    synced: tokio::sync::watch::Sender<u64>,
    /// How long a leader waits for more records before it writes.
    group_wait: std::time::Duration,
}

#[derive(Default)]
struct WalState {
    /// Records queued since the last sync started, concatenated.
    queued: Vec<u8>,
    /// Sequence number of the last record queued (the first record is 1).
    last_queued: u64,
    /// Sequence number of the last record a leader took.
    last_taken: u64,
    /// Where the next write goes in the file, bytes.
    offset: u64,
    /// Whether a sync is running (its Put is the leader).
    syncing: bool,
}

/// One leader's share: the records to write, where, and the last sequence number they hold.
struct SyncBatch {
    bytes: Vec<u8>,
    offset: u64,
    last: u64,
}

impl GroupWal {
    /// Creates `dir/floor.wal` and writes it through with zeros, so that a sync carries data
    /// only, never block allocation or extent conversion: the cheapest durable write the disk
    /// offers.
    fn create(dir: &Path, group_wait: std::time::Duration) -> std::io::Result<GroupWal> {
        std::fs::create_dir_all(dir)?;
        let mut file = File::create(dir.join("floor.wal"))?;
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..WAL_FILE_BYTES / zeros.len() as u64 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        Ok(GroupWal {
            file,
            state: Mutex::new(WalState::default()),
            synced: tokio::sync::watch::Sender::new(0),
            group_wait,
        })
    }

    /// Returns once `record` is durable: as the leader of a sync, or woken by the leader of
    /// the sync that covered it.
    async fn append(&self, record: &[u8]) {
        let mut synced = self.synced.subscribe();
        let seq = {
            let mut s = self.state.lock().expect("wal state");
            s.queued.extend_from_slice(record);
            s.last_queued += 1;
            s.last_queued
        };
        loop {
            if *synced.borrow_and_update() >= seq {
                return;
            }
            if let Some(waiting) = self.lead() {
                // Others writing at once: let more join. A lone writer never waits.
                if waiting > 1 && !self.group_wait.is_zero() {
                    tokio::time::sleep(self.group_wait).await;
                }
                self.sync(self.take());
                continue;
            }
            // The running sync's leader sends when it is done; a Put it did not cover then
            // leads the next one.
            let _ = synced.changed().await;
        }
    }

    /// Whether the caller becomes the leader of the next sync: if none is running and a record
    /// waits, a sync is marked as running and the number of records waiting is returned.
    fn lead(&self) -> Option<u64> {
        let mut s = self.state.lock().expect("wal state");
        if s.syncing || s.queued.is_empty() {
            return None;
        }
        s.syncing = true;
        Some(s.last_queued - s.last_taken)
    }

    /// The leader's batch: every record queued so far.
    fn take(&self) -> SyncBatch {
        let mut s = self.state.lock().expect("wal state");
        let bytes = std::mem::take(&mut s.queued);
        if s.offset + bytes.len() as u64 > WAL_FILE_BYTES {
            s.offset = 0;
        }
        let offset = s.offset;
        s.offset += bytes.len() as u64;
        s.last_taken = s.last_queued;
        SyncBatch {
            bytes,
            offset,
            last: s.last_queued,
        }
    }

    /// Writes and syncs `batch` on the calling thread, then wakes every Put waiting. A failed
    /// write or sync ends the process: the batch's Puts can never be answered, and a floor
    /// that cannot write measures nothing.
    fn sync(&self, batch: SyncBatch) {
        let result = self
            .file
            .write_all_at(&batch.bytes, batch.offset)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            eprintln!("metastore-grpc-floor: writing the WAL file: {e}");
            std::process::exit(1);
        }
        self.state.lock().expect("wal state").syncing = false;
        self.synced.send_replace(batch.last);
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 2,
    })
}

#[tonic::async_trait]
impl Kv for NoWork {
    async fn range(&self, _: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let revision = self.revision.load(Ordering::Relaxed);
        Ok(Response::new(RangeResponse {
            header: header(revision),
            ..Default::default()
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        if let Some(wal) = &self.wal {
            // A WAL record: the encoded request behind its length, as a log entry carries it.
            let record = request.get_ref().encode_length_delimited_to_vec();
            wal.append(&record).await;
        }
        let revision = if self.events.receiver_count() == 0 {
            self.revision.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            let put = request.into_inner();
            let _order = self.publish.lock().expect("publish lock");
            let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
            let event = Event {
                r#type: EventType::Put as i32,
                kv: Some(KeyValue {
                    key: put.key,
                    value: put.value,
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                    lease: put.lease,
                }),
                prev_kv: None,
            };
            let _ = self.events.send(Arc::new(event));
            revision
        };
        Ok(Response::new(PutResponse {
            header: header(revision),
            prev_kv: None,
        }))
    }

    async fn delete_range(
        &self,
        _: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn txn(&self, _: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }

    async fn compact(
        &self,
        _: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Err(Status::unimplemented("not measured"))
    }
}

type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for NoWork {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(1024);
        let stream = WatchFloorStream {
            inbound: request.into_inner(),
            events: self.events.subscribe(),
            revision: self.revision.clone(),
            tx,
            watchers: Vec::new(),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// One watch stream of the floor: its watchers (id and key) and the events it has yet to send.
struct WatchFloorStream {
    inbound: Streaming<WatchRequest>,
    events: broadcast::Receiver<Arc<Event>>,
    revision: Arc<AtomicI64>,
    tx: mpsc::Sender<Result<WatchResponse, Status>>,
    watchers: Vec<(i64, Vec<u8>)>,
}

impl WatchFloorStream {
    /// Serves the stream until the client closes it or it falls [`STREAM_BACKLOG`] behind.
    async fn run(mut self) {
        loop {
            let sent = tokio::select! {
                request = self.inbound.message() => match request {
                    Ok(Some(r)) => self.on_request(r).await,
                    _ => return,
                },
                event = self.events.recv() => match event {
                    Ok(event) => self.on_event(&event).await,
                    Err(_) => return,
                },
            };
            if sent.is_err() {
                return;
            }
        }
    }

    /// A create request gets the next watch id and its `created` answer; others are ignored.
    async fn on_request(&mut self, r: WatchRequest) -> Result<(), ()> {
        let Some(RequestUnion::CreateRequest(c)) = r.request_union else {
            return Ok(());
        };
        let watch_id = self.watchers.len() as i64;
        self.watchers.push((watch_id, c.key));
        let revision = self.revision.load(Ordering::Relaxed);
        self.send(WatchResponse {
            header: header(revision),
            watch_id,
            created: true,
            ..Default::default()
        })
        .await
    }

    /// One response per watcher on the event's key.
    async fn on_event(&mut self, event: &Event) -> Result<(), ()> {
        let Some(kv) = &event.kv else {
            return Ok(());
        };
        for (watch_id, key) in &self.watchers {
            if *key != kv.key {
                continue;
            }
            let response = WatchResponse {
                header: header(kv.mod_revision),
                watch_id: *watch_id,
                events: vec![event.clone()],
                ..Default::default()
            };
            self.send(response).await?;
        }
        Ok(())
    }

    async fn send(&self, response: WatchResponse) -> Result<(), ()> {
        self.tx.send(Ok(response)).await.map_err(|_| ())
    }
}

/// A listener on `addr`, with `SO_REUSEPORT` when `shared` (so that several bind one port).
fn listener(addr: SocketAddr, shared: bool) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn serve(service: NoWork, listener: tokio::net::TcpListener) {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(KvServer::new(service.clone()))
        .add_service(WatchServer::new(service))
        .serve_with_incoming(incoming)
        .await
    {
        eprintln!("metastore-grpc-floor: {e}");
        std::process::exit(1);
    }
}

/// Pins the calling thread to `cpu` (best effort, as a benchmark may run under any affinity).
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// tonic's services on glommio: hyper's HTTP/2 server over glommio's `TcpStream`, its
/// per-stream tasks spawned on the executor's own queue.
mod on_glommio {
    use std::mem::MaybeUninit;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_lite::{AsyncRead, AsyncWrite};
    use tonic::codegen::Service;

    use super::{KvServer, NoWork};

    /// hyper's executor for a connection's streams: a task on the calling glommio executor.
    #[derive(Clone, Copy)]
    struct LocalExec;

    impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
        fn execute(&self, fut: F) {
            glommio::spawn_local(fut).detach();
        }
    }

    /// glommio's stream (futures-io's traits) as hyper's I/O.
    struct Io(glommio::net::TcpStream);

    /// Bytes of hyper's buffer a read may fill (and so zeroes first: futures-io reads into
    /// initialised bytes only).
    const READ_CHUNK: usize = 16 << 10;

    impl hyper::rt::Read for Io {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            mut buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            // SAFETY: the bytes handed to the read are zeroed first, so they are initialised,
            // and `advance` counts only the bytes the read filled.
            unsafe {
                let spare = buf.as_mut();
                let len = spare.len().min(READ_CHUNK);
                let spare = &mut spare[..len];
                spare.fill(MaybeUninit::new(0));
                let bytes = std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<u8>(), len);
                match Pin::new(&mut self.0).poll_read(cx, bytes) {
                    Poll::Ready(Ok(n)) => {
                        buf.advance(n);
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    impl hyper::rt::Write for Io {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_close(cx)
        }
    }

    /// Serves each connection `listener` accepts, its KV requests on this executor, until
    /// `stop` completes (never, in the binary: it serves until killed).
    pub(super) async fn serve(
        service: NoWork,
        listener: glommio::net::TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let routes = tonic::service::Routes::new(KvServer::new(service));
        let accept = async {
            loop {
                let stream = match listener.accept().await {
                    Ok(stream) => stream,
                    Err(e) => {
                        eprintln!("metastore-grpc-floor: accept: {e}");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let routes = routes.clone();
                glommio::spawn_local(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let mut routes = routes.clone();
                        async move { routes.call(request).await }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(LocalExec)
                        .serve_connection(Io(stream), service)
                        .await;
                })
                .detach();
            }
        };
        futures_lite::future::or(accept, stop).await;
    }

    /// Binds `addr` as glommio does, with `SO_REUSEPORT`, so that every executor binds the
    /// same port.
    pub(super) fn listener(addr: SocketAddr) -> glommio::Result<glommio::net::TcpListener, ()> {
        glommio::net::TcpListener::bind(addr)
    }
}

/// The port every per-CPU listener shares: the first bind on `listen` picks it (port 0: any
/// free port), then lets it go for the listeners to bind with `SO_REUSEPORT`.
fn shared_port(listen: SocketAddr) -> SocketAddr {
    let first = std::net::TcpListener::bind(listen).expect("bind");
    first.local_addr().expect("bound address")
}

/// The CPU the `i`th per-CPU thread is pinned to, as the member places its shards: the CPUs
/// this process may run on (`cpus`), in turn; none when they are unknown.
fn cpu_for(i: usize, cpus: &[usize]) -> Option<usize> {
    cpus.get(i % cpus.len().max(1)).copied()
}

fn main() {
    let args = Args::parse();
    let service = NoWork::new(args.wal_dir.as_deref().map(|dir| {
        let wait = std::time::Duration::from_millis(args.group_wait_ms);
        Arc::new(GroupWal::create(dir, wait).expect("metastore-grpc-floor: creating the WAL file"))
    }));
    match args.runtime {
        RuntimeKind::Multi => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.workers)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async {
                let l = listener(args.listen, false).expect("bind");
                println!("listening on {}", l.local_addr().expect("bound address"));
                serve(service, l).await;
            });
        }
        RuntimeKind::PerCore => {
            let addr = shared_port(args.listen);
            // Each runtime binds its listener, then moves with it to its thread.
            let served: Vec<_> = (0..args.workers)
                .map(|_| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime");
                    let l = rt.block_on(async { listener(addr, true) }).expect("bind");
                    (rt, l)
                })
                .collect();
            println!("listening on {addr}");
            let cpus = metastore::shard::shard_cpus().unwrap_or_default();
            let threads: Vec<_> = served
                .into_iter()
                .enumerate()
                .map(|(i, (rt, l))| {
                    let service = service.clone();
                    let cpu = cpu_for(i, &cpus);
                    std::thread::spawn(move || {
                        if let Some(cpu) = cpu {
                            pin(cpu);
                        }
                        rt.block_on(serve(service, l));
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        }
        RuntimeKind::Glommio => {
            // A group wait sleeps on tokio's timer, and glommio's is not `Send`, as the KV
            // trait's futures must be.
            if args.group_wait_ms > 0 {
                eprintln!("metastore-grpc-floor: --group-wait-ms needs a tokio runtime");
                std::process::exit(2);
            }
            let addr = shared_port(args.listen);
            let cpus = metastore::shard::shard_cpus().unwrap_or_default();
            // Each executor binds its own listener (glommio's are not `Send`) and says so, so
            // that the address is printed only once every listener accepts.
            let (bound_tx, bound_rx) = std::sync::mpsc::channel();
            let executors: Vec<_> = (0..args.workers)
                .map(|i| {
                    let service = service.clone();
                    let bound = bound_tx.clone();
                    let placement = match cpu_for(i, &cpus) {
                        Some(cpu) => glommio::Placement::Fixed(cpu),
                        None => glommio::Placement::Unbound,
                    };
                    glommio::LocalExecutorBuilder::new(placement)
                        .name(&format!("floor-{i}"))
                        .spawn(move || async move {
                            let l = on_glommio::listener(addr).expect("bind");
                            let _ = bound.send(());
                            on_glommio::serve(service, l, std::future::pending()).await
                        })
                        .expect("glommio executor")
                })
                .collect();
            for _ in 0..args.workers {
                bound_rx.recv().expect("an executor ended before binding");
            }
            println!("listening on {addr}");
            for e in executors {
                let _ = e.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// On a glommio executor the floor answers a real etcd client's Puts with successive
    /// revisions and its Range with none, and its executor ends once told to stop.
    #[test]
    fn the_glommio_layout_serves_a_real_client() {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(move || async move {
                let l = on_glommio::listener("127.0.0.1:0".parse().unwrap()).unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                on_glommio::serve(NoWork::new(None), l, async {
                    let _ = stop_rx.await;
                })
                .await
            })
            .unwrap();
        let addr = addr_rx.recv().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A floor that never answers fails the test instead of hanging it.
        let answered = async {
            let mut client = etcd_client::Client::connect([addr.to_string()], None)
                .await
                .unwrap();
            for expected in 1..=3 {
                let put = client.put("k", "v", None).await.unwrap();
                assert_eq!(put.header().unwrap().revision(), expected);
            }
            let range = client.get("k", None).await.unwrap();
            assert!(range.kvs().is_empty());
            assert_eq!(range.header().unwrap().revision(), 3);
        };
        let served =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), answered).await });
        assert!(
            served.is_ok(),
            "the floor on glommio did not answer in 30 s"
        );
        stop_tx.send(()).unwrap();
        executor.join().unwrap();
    }

    /// Every append returns only once its record is in the file, each record written once,
    /// whether the Puts come one at a time or many at once, with or without a group wait.
    #[test]
    fn every_record_is_written_once_before_its_append_returns() {
        for wait_ms in [0, 1] {
            let dir = tempfile::tempdir().unwrap();
            let wal = Arc::new(
                GroupWal::create(dir.path(), std::time::Duration::from_millis(wait_ms)).unwrap(),
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let record = |i: u32| format!("<record {i:04}>").into_bytes();
            rt.block_on(async {
                // One alone, then 200 at once.
                wal.append(&record(0)).await;
                let tasks: Vec<_> = (1..=200)
                    .map(|i| {
                        let wal = wal.clone();
                        tokio::spawn(async move { wal.append(&record(i)).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            });
            assert_eq!(*wal.synced.borrow(), 201);
            let written = std::fs::read(dir.path().join("floor.wal")).unwrap();
            let text = String::from_utf8_lossy(&written[..201 * 13]);
            for i in 0..=200 {
                let r = String::from_utf8(record(i)).unwrap();
                assert_eq!(text.matches(&r).count(), 1, "{r} with a {wait_ms} ms wait");
            }
        }
    }
}
