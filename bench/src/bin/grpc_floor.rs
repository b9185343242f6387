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
//!
//! It prints `listening on ADDR` once every listener is bound, and serves until killed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use metastore::proto::etcdserverpb::kv_server::{Kv, KvServer};
use metastore::proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, ResponseHeader, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

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
    /// Worker threads (multi) or runtimes (per-core).
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

/// The KV service with no work behind it: Put takes the next revision, Range finds nothing.
#[derive(Clone, Default)]
struct NoWork {
    revision: Arc<AtomicI64>,
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

    async fn put(&self, _: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let revision = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
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
        .add_service(KvServer::new(service))
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

fn main() {
    let args = Args::parse();
    let service = NoWork::default();
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
            // The first listener picks the port; the others share it.
            let first = std::net::TcpListener::bind(args.listen).expect("bind");
            let addr = first.local_addr().expect("bound address");
            drop(first);
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
            // The member's placement of its shards: the CPUs this process may run on.
            let cpus = metastore::shard::shard_cpus().unwrap_or_default();
            let threads: Vec<_> = served
                .into_iter()
                .enumerate()
                .map(|(i, (rt, l))| {
                    let service = service.clone();
                    let cpu = cpus.get(i % cpus.len().max(1)).copied();
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
    }
}
