//! The request/response workloads: one [`Worker`] type per subcommand. Each worker owns a clone
//! of one of the `--conns` connections.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use etcd_client::{
    Compare, CompareOp, GetOptions, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, Txn,
    TxnOp,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::cli::{Consistency, Isolation, KeyValueArgs, RangeArgs, StmArgs, TxnMixedArgs};
use crate::driver::{Outcome, Worker};

/// Key number `n` as a `size`-byte key: decimal, zero-padded (the low digits if `n` needs more).
pub fn key_bytes(n: u64, size: usize) -> Vec<u8> {
    let s = format!("{n:0size$}").into_bytes();
    s[s.len() - size.min(s.len())..].to_vec()
}

/// Picks key numbers in `0..key_space_size`: `i mod size` in sequence, or uniformly at random.
struct KeyPicker {
    space: u64,
    sequential: bool,
    rng: SmallRng,
}

impl KeyPicker {
    fn new(args: &KeyValueArgs, seed: u64) -> KeyPicker {
        KeyPicker {
            space: args.key_space_size.max(1),
            sequential: args.sequential_keys,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    fn pick(&mut self, i: u64) -> u64 {
        if self.sequential {
            i % self.space
        } else {
            self.rng.random_range(0..self.space)
        }
    }
}

/// `put`: one put per request.
pub struct PutWorker {
    kv: KvClient,
    keys: KeyPicker,
    key_size: usize,
    value: Vec<u8>,
    /// Highest revision any put saw, for `--compact-interval`.
    latest: Arc<AtomicI64>,
}

impl PutWorker {
    /// A put worker on connection `kv`; `seed` makes random keys differ per client.
    pub fn new(kv: KvClient, args: &KeyValueArgs, seed: u64, latest: Arc<AtomicI64>) -> Self {
        PutWorker {
            kv,
            keys: KeyPicker::new(args, seed),
            key_size: args.key_size,
            value: vec![b'v'; args.val_size],
            latest,
        }
    }
}

impl Worker for PutWorker {
    async fn call(&mut self, i: u64) -> Result<Outcome, etcd_client::Error> {
        let key = key_bytes(self.keys.pick(i), self.key_size);
        let resp = self.kv.put(key, self.value.clone(), None).await?;
        if let Some(h) = resp.header() {
            self.latest.fetch_max(h.revision(), Ordering::Relaxed);
        }
        Ok(Outcome::default())
    }
}

fn get_options(end: Option<&str>, consistency: Consistency) -> GetOptions {
    let mut opts = GetOptions::new();
    if let Some(end) = end {
        opts = opts.with_range(end);
    }
    if consistency == Consistency::S {
        opts = opts.with_serializable();
    }
    opts
}

/// `range`: one Range per request.
pub struct RangeWorker {
    kv: KvClient,
    key: Vec<u8>,
    opts: GetOptions,
}

impl RangeWorker {
    /// A range worker on connection `kv`.
    pub fn new(kv: KvClient, args: &RangeArgs) -> Self {
        let mut opts = get_options(args.end.as_deref(), args.consistency);
        if args.limit > 0 {
            opts = opts.with_limit(args.limit);
        }
        if args.count_only {
            opts = opts.with_count_only();
        }
        RangeWorker {
            kv,
            key: args.key.clone().into_bytes(),
            opts,
        }
    }
}

impl Worker for RangeWorker {
    async fn call(&mut self, _i: u64) -> Result<Outcome, etcd_client::Error> {
        self.kv
            .get(self.key.clone(), Some(self.opts.clone()))
            .await?;
        Ok(Outcome::default())
    }
}

/// `txn-put`: a txn of `--txn-ops` puts on distinct keys.
pub struct TxnPutWorker {
    kv: KvClient,
    keys: KeyPicker,
    key_size: usize,
    ops: u64,
    value: Vec<u8>,
}

impl TxnPutWorker {
    /// A txn-put worker on connection `kv`.
    pub fn new(kv: KvClient, args: &KeyValueArgs, ops: usize, seed: u64) -> Self {
        TxnPutWorker {
            kv,
            keys: KeyPicker::new(args, seed),
            key_size: args.key_size,
            ops: ops.max(1) as u64,
            value: vec![b'v'; args.val_size],
        }
    }
}

impl Worker for TxnPutWorker {
    async fn call(&mut self, i: u64) -> Result<Outcome, etcd_client::Error> {
        // Keys base*ops .. base*ops+ops-1 (mod the key space): distinct unless the key space is
        // smaller than a txn, which etcd rejects as a duplicate key, as it should.
        let base = self.keys.pick(i);
        let space = self.keys.space;
        let ops: Vec<TxnOp> = (0..self.ops)
            .map(|j| {
                let k = (base.wrapping_mul(self.ops) + j) % space;
                TxnOp::put(key_bytes(k, self.key_size), self.value.clone(), None)
            })
            .collect();
        self.kv.txn(Txn::new().and_then(ops)).await?;
        Ok(Outcome::default())
    }
}

/// `txn-mixed`: each txn either reads the range or puts one key, `--rw-ratio` reads per write.
pub struct TxnMixedWorker {
    kv: KvClient,
    read: TxnOp,
    keys: KeyPicker,
    key_size: usize,
    value: Vec<u8>,
    read_fraction: f64,
}

impl TxnMixedWorker {
    /// A txn-mixed worker on connection `kv`.
    pub fn new(kv: KvClient, args: &TxnMixedArgs, seed: u64) -> Self {
        let opts = get_options(args.end.as_deref(), args.consistency);
        TxnMixedWorker {
            kv,
            read: TxnOp::get(args.key.clone(), Some(opts)),
            keys: KeyPicker::new(&args.kv, seed),
            key_size: args.kv.key_size,
            value: vec![b'v'; args.kv.val_size],
            read_fraction: args.rw_ratio / (args.rw_ratio + 1.0),
        }
    }
}

impl Worker for TxnMixedWorker {
    async fn call(&mut self, i: u64) -> Result<Outcome, etcd_client::Error> {
        let is_read = self
            .keys
            .rng
            .random_bool(self.read_fraction.clamp(0.0, 1.0));
        let op = if is_read {
            self.read.clone()
        } else {
            let k = self.keys.pick(i);
            TxnOp::put(key_bytes(k, self.key_size), self.value.clone(), None)
        };
        self.kv.txn(Txn::new().and_then([op])).await?;
        Ok(Outcome {
            label: Some(if is_read { "read" } else { "write" }),
            retries: 0,
        })
    }
}

/// `lease-keepalive`: one lease per client, renewed once per request over a keep-alive stream.
pub struct KeepAliveWorker {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// TTL of the leases `lease-keepalive` renews, s.
pub const KEEPALIVE_LEASE_TTL: i64 = 60;

impl KeepAliveWorker {
    /// Grants a lease on `lease` and opens its keep-alive stream.
    pub async fn new(lease: &mut LeaseClient) -> Result<Self, etcd_client::Error> {
        let id = lease.grant(KEEPALIVE_LEASE_TTL, None).await?.id();
        let (keeper, stream) = lease.keep_alive(id).await?;
        Ok(KeepAliveWorker { keeper, stream })
    }

    /// The lease this worker renews.
    pub fn id(&self) -> i64 {
        self.keeper.id()
    }
}

impl Worker for KeepAliveWorker {
    async fn call(&mut self, _i: u64) -> Result<Outcome, etcd_client::Error> {
        self.keeper.keep_alive().await?;
        match self.stream.message().await? {
            Some(r) if r.ttl() > 0 => Ok(Outcome::default()),
            Some(_) => Err(etcd_client::Error::LeaseKeepAliveError(
                "lease expired or revoked".into(),
            )),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keep-alive stream closed".into(),
            )),
        }
    }
}

/// `stm`: read `--keys-per-txn` counters, then commit their increments in a txn guarded by each
/// read key's mod_revision; on conflict, read again and retry. A request's latency covers all
/// its attempts, and the retries are counted.
pub struct StmWorker {
    kv: KvClient,
    args: StmArgs,
    rng: SmallRng,
}

/// The key of counter `n` of an `stm` run.
pub fn stm_key(prefix: &str, n: u64) -> String {
    format!("{prefix}{n:08}")
}

impl StmWorker {
    /// An stm worker on connection `kv`.
    pub fn new(kv: KvClient, args: &StmArgs, seed: u64) -> Self {
        StmWorker {
            kv,
            args: args.clone(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }
}

impl Worker for StmWorker {
    async fn call(&mut self, _i: u64) -> Result<Outcome, etcd_client::Error> {
        let keys_total = self.args.keys.max(1);
        let per_txn = self.args.keys_per_txn.clamp(1, keys_total);
        let mut picked: Vec<u64> = Vec::with_capacity(per_txn as usize);
        while picked.len() < per_txn as usize {
            let k = self.rng.random_range(0..keys_total);
            if !picked.contains(&k) {
                picked.push(k);
            }
        }
        let keys: Vec<String> = picked
            .iter()
            .map(|&k| stm_key(&self.args.prefix, k))
            .collect();
        let mut retries = 0;
        loop {
            let mut snapshot_rev = 0;
            let mut cmps = Vec::with_capacity(keys.len());
            let mut puts = Vec::with_capacity(keys.len());
            for key in &keys {
                let mut opts = GetOptions::new();
                if self.args.isolation == Isolation::S && snapshot_rev > 0 {
                    opts = opts.with_revision(snapshot_rev);
                }
                let resp = self.kv.get(key.as_str(), Some(opts)).await?;
                if snapshot_rev == 0 {
                    snapshot_rev = resp.header().map_or(0, |h| h.revision());
                }
                let (mod_rev, count) = match resp.kvs().first() {
                    Some(kv) => (
                        kv.mod_revision(),
                        std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0),
                    ),
                    None => (0, 0),
                };
                cmps.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    mod_rev,
                ));
                puts.push(TxnOp::put(key.as_str(), (count + 1).to_string(), None));
            }
            let resp = self.kv.txn(Txn::new().when(cmps).and_then(puts)).await?;
            if resp.succeeded() {
                return Ok(Outcome {
                    label: None,
                    retries,
                });
            }
            retries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_size_decimal() {
        assert_eq!(key_bytes(42, 8), b"00000042");
        assert_eq!(key_bytes(123_456_789, 4), b"6789");
        assert_eq!(key_bytes(7, 1), b"7");
    }

    #[test]
    fn sequential_keys_cycle_the_key_space() {
        let args = KeyValueArgs {
            key_size: 8,
            val_size: 8,
            key_space_size: 3,
            sequential_keys: true,
        };
        let mut p = KeyPicker::new(&args, 1);
        assert_eq!(
            (0..7).map(|i| p.pick(i)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2, 0]
        );
        let mut r = KeyPicker::new(
            &KeyValueArgs {
                sequential_keys: false,
                ..args
            },
            1,
        );
        assert!((0..100).all(|i| r.pick(i) < 3));
    }
}
