//! `loadgen`: drives one workload against an etcd v3 endpoint (MetaStore or etcd) and prints
//! throughput and latency percentiles, so both servers can be measured side by side with the
//! same client.
//!
//! Workloads mirror etcd's `benchmark` tool: `put` (sequential keys), `range` (one small key,
//! linearizable or `--serializable`), `txn-put` (`--txn-ops` puts per txn), and `delete`
//! (DeleteRange of a key that exists, which exercises the apply path's shard round trip).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use hdrhistogram::Histogram;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Workload {
    Put,
    Range,
    TxnPut,
    Delete,
}

#[derive(Parser, Debug)]
#[command(about = "Side-by-side load for etcd v3 endpoints")]
struct Args {
    /// Endpoint, host:port.
    #[arg(long, default_value = "127.0.0.1:2379")]
    endpoint: String,
    /// What to send.
    #[arg(long, value_enum, default_value = "put")]
    workload: Workload,
    /// Concurrent clients (tasks).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections shared by the clients.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Key size, bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size, bytes.
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Puts per txn for `txn-put`.
    #[arg(long, default_value_t = 4)]
    txn_ops: usize,
    /// Serializable reads for `range`.
    #[arg(long)]
    serializable: bool,
    /// A label printed with the result (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let s = format!("{i:0size$}").into_bytes();
    s[s.len().saturating_sub(size)..].to_vec()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let mut conns = Vec::new();
    for _ in 0..args.conns.max(1) {
        conns.push(Client::connect([args.endpoint.as_str()], None).await?);
    }
    let value = vec![b'v'; args.val_size];
    if matches!(args.workload, Workload::Range) {
        conns[0]
            .put(key(0, args.key_size), value.clone(), None)
            .await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients.max(1) {
        let mut client = conns[c % conns.len()].clone();
        let (args, next, errors, value) =
            (args.clone(), next.clone(), errors.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.total {
                    break;
                }
                let t = Instant::now();
                let ok = match args.workload {
                    Workload::Put => client
                        .put(key(i, args.key_size), value.clone(), None)
                        .await
                        .is_ok(),
                    Workload::Range => {
                        let opts = args
                            .serializable
                            .then(|| GetOptions::new().with_serializable());
                        client.get(key(0, args.key_size), opts).await.is_ok()
                    }
                    Workload::TxnPut => {
                        let ops: Vec<TxnOp> = (0..args.txn_ops as u64)
                            .map(|j| {
                                TxnOp::put(
                                    key(i * args.txn_ops as u64 + j, args.key_size),
                                    value.clone(),
                                    None,
                                )
                            })
                            .collect();
                        client.txn(Txn::new().and_then(ops)).await.is_ok()
                    }
                    Workload::Delete => {
                        let k = key(i, args.key_size);
                        client.put(k.clone(), value.clone(), None).await.is_ok()
                            && client.delete(k, None).await.is_ok()
                    }
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                hist.record(t.elapsed().as_micros().max(1) as u64).unwrap();
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for t in tasks {
        hist.add(t.await?).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{} workload={:?} clients={} conns={} requests={} errors={} req/s={:.0} avg={:.2}ms p50={:.2}ms p99={:.2}ms max={:.2}ms",
        args.label,
        args.workload,
        args.clients,
        args.conns,
        hist.len(),
        errors.load(Ordering::Relaxed),
        hist.len() as f64 / secs,
        hist.mean() / 1000.0,
        ms(hist.value_at_quantile(0.5)),
        ms(hist.value_at_quantile(0.99)),
        ms(hist.max()),
    );
    Ok(())
}
