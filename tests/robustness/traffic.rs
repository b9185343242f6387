//! The short robustness profile: a 3-member cluster of real processes, concurrent KV clients
//! and watchers, and process faults, after etcd's `tests/robustness` (traffic, failpoints'
//! process-level faults, and the final validation).
//!
//! * Traffic: [`CLIENTS`] clients (the `etcd-client` crate, all endpoints, 2 s per-request
//!   timeout) run put / get / delete / compare-and-set on [`KEYS`] keys with unique values;
//!   every operation is recorded with call and return times from a monotonic clock. A failed
//!   or timed-out request is recorded with an unknown outcome.
//! * Watchers: [`WATCHERS`] watchers watch the key prefix from revision 1 with prev_kv and
//!   progress notifications, each stream on one member; when a stream breaks or stalls they
//!   resume on another member from the revision after the last event.
//! * Faults: every few seconds, with equal odds, SIGKILL of a random member and its restart,
//!   SIGSTOP of the leader for three election timeouts then SIGCONT, or a network partition
//!   that cuts the leader or a random member off from the other two for as long, then heals;
//!   slow, lossy or one-way-cut links of one member ([`crate::links`]); a full disk under one
//!   member, or a damaged WAL, snapshot or SST file of a follower ([`crate::disk`]); or
//!   (`--features failpoints`) a crash at one of the server's WAL or apply crash points
//!   ([`crate::failpoint`]).
//! * Checks at the end: the KV history is read back revision by revision; unknown-outcome
//!   writes are resolved against it (as etcd's `patchedOperationHistory` does: a write whose
//!   unique value is in the history happened at that revision, one whose value is not never
//!   happened); then linearizability of the whole history ([`crate::linearizability`]), no
//!   acknowledged write lost, and every watcher against the history ([`crate::watch`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseGrantOptions,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::time::{sleep, timeout};

use crate::harness::{
    signal, wait_until_async, Cluster, HashAnswer, MemberHash, ELECTION_MS, SERVER_PANICS,
};
use crate::linearizability::{check, Operation, Verdict, INFINITY};
use crate::model::{Cond, Request, Response, State, LEASE_EXISTS, LEASE_NOT_FOUND};
use crate::small_disk::SmallDisk;
use crate::watch::{validate_all, validate_compacted, Event, Kv, KvHistory, Session, WatchResp};

/// Concurrent KV clients.
pub const CLIENTS: usize = 4;
/// Keys the clients write, all under [`PREFIX`].
pub const KEYS: usize = 3;
/// Concurrent watchers.
pub const WATCHERS: usize = 2;
/// The key prefix of the traffic.
pub const PREFIX: &str = "robust/";
/// Per-request timeout of the traffic clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between a client's operations (keeps histories at a few thousand operations).
const THINK: Duration = Duration::from_millis(40);

/// Deterministic 64-bit LCG (Knuth's MMIX constants).
pub struct Lcg(u64);

impl Lcg {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Lcg {
        Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next number, 31 bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
}

/// Whether reads are serializable (`ROBUSTNESS_SERIALIZABLE_READS=1`): a member answers
/// from its own state, which may be stale, so the linearizability check is expected to fail —
/// a way to see it catch real stale reads.
fn serializable_reads() -> bool {
    std::env::var("ROBUSTNESS_SERIALIZABLE_READS").is_ok_and(|v| v == "1")
}

/// The TTL of the traffic's leases, in seconds: long enough never to expire during a run (as
/// etcd's robustness traffic grants them), so that only revokes delete their keys.
pub const LEASE_TTL: i64 = 24 * 3600;

/// The end of the range of keys that start with `prefix` (etcd's `GetPrefixRangeEnd`; the
/// traffic's prefixes end in an ASCII byte below 0xff).
pub fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    String::from_utf8(end).expect("an ASCII prefix")
}

/// The error of a request that definitively did nothing, as the model's response: etcd's
/// lease errors (the lease check runs at apply, so the answer is linearizable). Any other
/// error leaves the outcome unknown.
pub fn definitive(e: &etcd_client::Error) -> Option<Response> {
    match e {
        etcd_client::Error::GRpcStatus(st)
            if st.message() == LEASE_NOT_FOUND || st.message() == LEASE_EXISTS =>
        {
            Some(Response::Error(st.message().to_string()))
        }
        _ => None,
    }
}

/// Sends `req` and converts the reply to the model's response.
pub async fn execute(c: &mut Client, req: &Request) -> Result<Response, etcd_client::Error> {
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(0, |h| h.revision());
    Ok(match req {
        Request::Get { key } => {
            let opts = serializable_reads().then(|| GetOptions::new().with_serializable());
            let r = c.get(key.as_str(), opts).await?;
            Response::Get {
                kv: r
                    .kvs()
                    .first()
                    .map(|kv| (lossy(kv.value()), kv.mod_revision())),
                revision: rev(r.header()),
            }
        }
        Request::Put { key, value } => {
            let r = c.put(key.as_str(), value.as_str(), None).await?;
            Response::Put {
                revision: rev(r.header()),
            }
        }
        Request::Delete { key } => {
            let r = c.delete(key.as_str(), None).await?;
            Response::Delete {
                deleted: r.deleted() > 0,
                revision: rev(r.header()),
            }
        }
        Request::Cas { key, cond, value } => {
            let cmp = match cond {
                Cond::ModRevision(r) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *r),
                Cond::Value(v) => Compare::value(key.as_str(), CompareOp::Equal, v.as_str()),
            };
            let txn = Txn::new().when(vec![cmp]).and_then(vec![TxnOp::put(
                key.as_str(),
                value.as_str(),
                None,
            )]);
            let r = c.txn(txn).await?;
            Response::Cas {
                succeeded: r.succeeded(),
                revision: rev(r.header()),
            }
        }
        Request::PutAll { kvs } => {
            let puts: Vec<TxnOp> = kvs
                .iter()
                .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                .collect();
            let r = c.txn(Txn::new().and_then(puts)).await?;
            Response::Put {
                revision: rev(r.header()),
            }
        }
        Request::PutLease { key, value, lease } => {
            let opts = PutOptions::new().with_lease(*lease);
            let r = c.put(key.as_str(), value.as_str(), Some(opts)).await?;
            Response::Put {
                revision: rev(r.header()),
            }
        }
        Request::Range {
            prefix,
            from,
            limit,
        } => {
            let opts = GetOptions::new()
                .with_range(prefix_end(prefix))
                .with_limit(*limit);
            let r = c.get(from.as_str(), Some(opts)).await?;
            Response::Range {
                kvs: r
                    .kvs()
                    .iter()
                    .map(|kv| (lossy(kv.key()), lossy(kv.value()), kv.mod_revision()))
                    .collect(),
                count: r.count(),
                more: r.more(),
                revision: rev(r.header()),
            }
        }
        Request::LeaseGrant { id } => {
            let opts = LeaseGrantOptions::new().with_id(*id);
            let r = c.lease_grant(LEASE_TTL, Some(opts)).await?;
            Response::Lease {
                revision: rev(r.header()),
            }
        }
        Request::LeaseRevoke { id } => {
            let r = c.lease_revoke(*id).await?;
            Response::Lease {
                revision: rev(r.header()),
            }
        }
        Request::Update {
            key,
            expect,
            value,
            get_on_failure,
        } => {
            let cmp = Compare::mod_revision(key.as_str(), CompareOp::Equal, *expect);
            let then = match value {
                Some(v) => TxnOp::put(key.as_str(), v.as_str(), None),
                None => TxnOp::delete(key.as_str(), None),
            };
            let mut txn = Txn::new().when(vec![cmp]).and_then(vec![then]);
            if *get_on_failure {
                txn = txn.or_else(vec![TxnOp::get(key.as_str(), None)]);
            }
            let r = c.txn(txn).await?;
            let current = match r.op_responses().first() {
                Some(TxnOpResponse::Get(g)) if !r.succeeded() => g
                    .kvs()
                    .first()
                    .map(|kv| (lossy(kv.value()), kv.mod_revision())),
                _ => None,
            };
            Response::Update {
                succeeded: r.succeeded(),
                revision: rev(r.header()),
                current,
            }
        }
    })
}

/// One traffic client: random operations until `stop`, every one recorded.
async fn client_loop(
    id: usize,
    endpoints: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Operation> {
    let mut rng = Lcg::new(0x5eed + id as u64 * 7919 + start.elapsed().as_nanos() as u64);
    let mut ops = Vec::new();
    let mut client: Option<Client> = None;
    // The last (value, mod_revision) this client saw per key, for its compare-and-sets.
    let mut seen: HashMap<String, Kv> = HashMap::new();
    let mut seq = 0u64;
    // Leases: this client's granted ones, its revoked ones (for puts that must fail), and a
    // grant or revoke whose outcome is still unknown, retried until definitive so that the
    // model's branches for it merge again.
    let mut leases: Vec<i64> = Vec::new();
    let mut revoked: Vec<i64> = Vec::new();
    let mut pending: Option<Request> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => {
                match timeout(
                    REQUEST_TIMEOUT,
                    Client::connect(endpoints.clone(), Some(connect_options())),
                )
                .await
                {
                    Ok(Ok(c)) => client.insert(c),
                    _ => {
                        // A retry pause: the members may be down or stopped.
                        sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
        };
        seq += 1;
        let key_index = rng.below(KEYS as u64);
        let key = format!("{PREFIX}k{key_index}");
        let value = format!("c{id}-{seq}");
        let last = seen.get(&key).cloned();
        let req = match rng.below(100) {
            _ if pending.is_some() => pending.take().expect("pending"),
            0..28 => Request::Get { key },
            28..30 => Request::Range {
                prefix: PREFIX.into(),
                from: PREFIX.into(),
                limit: rng.below(KEYS as u64) as i64,
            },
            30..56 => Request::Put { key, value },
            56..60 => lease_request(&mut rng, id, seq, key, value, &leases, &revoked),
            60..70 => Request::Delete { key },
            70..80 => {
                let other = format!("{PREFIX}k{}", (key_index + 1) % KEYS as u64);
                Request::PutAll {
                    kvs: vec![(key, value.clone()), (other, value)],
                }
            }
            roll => Request::Cas {
                key,
                cond: if roll % 2 == 0 {
                    Cond::ModRevision(last.map_or(0, |(_, r)| r))
                } else {
                    Cond::Value(last.map_or_else(|| "none".into(), |(v, _)| v))
                },
                value,
            },
        };
        let call = nanos(start);
        let result = timeout(REQUEST_TIMEOUT, execute(c, &req)).await;
        let ret = nanos(start);
        let (ret, resp) = match result {
            Ok(Ok(resp)) => (ret, resp),
            Ok(Err(e)) if definitive(&e).is_some() => (ret, definitive(&e).expect("definitive")),
            _ => (INFINITY, Response::Unknown),
        };
        if let Response::Get { kv, .. } = &resp {
            match kv {
                Some(kv) => seen.insert(req.key().to_string(), kv.clone()),
                None => seen.remove(req.key()),
            };
        }
        let failed = resp == Response::Unknown;
        match (&req, &resp) {
            (Request::LeaseGrant { .. } | Request::LeaseRevoke { .. }, Response::Unknown) => {
                pending = Some(req.clone());
            }
            // Granted (a retry that finds it granted: the first attempt took effect).
            (Request::LeaseGrant { id }, _) => leases.push(*id),
            // Revoked (a retry that finds it gone: the first attempt took effect).
            (Request::LeaseRevoke { id }, _) => {
                leases.retain(|l| l != id);
                revoked.push(*id);
            }
            _ => {}
        }
        ops.push(Operation {
            client: id,
            call,
            ret,
            req,
            resp,
        });
        if failed {
            // Let the faulty member go; a fresh client re-resolves the endpoints.
            client = None;
        }
        sleep(THINK).await;
    }
    ops
}

/// A lease operation of the etcd-like traffic (a low share of it): a grant of a fresh ID when
/// the client holds fewer than two leases, else mostly a put attached to one of them, a
/// revoke of the oldest, and now and then a put attached to a revoked lease (which must fail
/// with "lease not found").
fn lease_request(
    rng: &mut Lcg,
    client: usize,
    seq: u64,
    key: String,
    value: String,
    leases: &[i64],
    revoked: &[i64],
) -> Request {
    match rng.below(8) {
        _ if leases.is_empty() => Request::LeaseGrant {
            id: ((client as i64 + 1) << 32) + seq as i64,
        },
        0 if leases.len() < 2 => Request::LeaseGrant {
            id: ((client as i64 + 1) << 32) + seq as i64,
        },
        1 => Request::LeaseRevoke { id: leases[0] },
        2 if !revoked.is_empty() => Request::PutLease {
            key,
            value,
            lease: revoked[rng.below(revoked.len() as u64) as usize],
        },
        _ => Request::PutLease {
            key,
            value,
            lease: leases[rng.below(leases.len() as u64) as usize],
        },
    }
}

/// One watcher: watches `prefix` from revision 1 until `stop`, resuming on another member
/// when a stream breaks or stalls; `reached` is the highest revision it is known to have
/// caught up to (last event or progress notification). A watch cancelled because its start
/// revision was compacted (`compact_revision` set, as etcd's `watchableStore` cancels it) ends
/// its session with [`Session::compacted`] and resumes from the compaction revision, the
/// oldest one still readable (etcd's robustness watch client restarts from there too).
pub async fn watch_loop(
    id: usize,
    prefix: &'static str,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    reached: Arc<AtomicI64>,
) -> Vec<Session> {
    let mut sessions = Vec::new();
    let mut next = 1i64;
    let mut attempt = 0usize;
    while !stop.load(Ordering::Relaxed) {
        attempt += 1;
        let endpoint = endpoints[(id + attempt) % endpoints.len()].clone();
        let opened = async {
            let mut c = Client::connect([endpoint], Some(connect_options())).await?;
            let opts = WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_progress_notify()
                .with_start_revision(next);
            c.watch(prefix, Some(opts)).await
        };
        let mut stream = match timeout(REQUEST_TIMEOUT, opened).await {
            Ok(Ok(s)) => s,
            _ => {
                // A retry pause: the members may be down or stopped.
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut session = Session {
            start: next,
            responses: Vec::new(),
            compacted: None,
        };
        let mut last_message = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                m = stream.message() => {
                    let Ok(Some(resp)) = m else { break };
                    last_message = Instant::now();
                    if resp.created() {
                        continue;
                    }
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            session.compacted = Some(resp.compact_revision());
                            next = next.max(resp.compact_revision());
                        } else {
                            eprintln!("watcher {id}: canceled: {:?}", resp.cancel_reason());
                        }
                        break;
                    }
                    let events: Vec<Event> = resp
                        .events()
                        .iter()
                        .map(|e| {
                            let kv = e.kv().expect("an event carries its kv");
                            let put = e.event_type() == EventType::Put;
                            Event {
                                put,
                                key: lossy(kv.key()),
                                value: if put { lossy(kv.value()) } else { String::new() },
                                revision: kv.mod_revision(),
                                prev: e.prev_kv().map(|p| (lossy(p.value()), p.mod_revision())),
                            }
                        })
                        .collect();
                    let revision = resp.header().map_or(0, |h| h.revision());
                    let progress = events.is_empty() && resp.compact_revision() == 0;
                    if let Some(last) = events.last() {
                        next = next.max(last.revision + 1);
                        reached.fetch_max(last.revision, Ordering::Relaxed);
                    } else if progress {
                        reached.fetch_max(revision, Ordering::Relaxed);
                    }
                    session.responses.push(WatchResp { revision, events, progress });
                }
                _ = tick.tick() => {
                    // A stopped or partitioned member answers nothing: move on.
                    if last_message.elapsed() > Duration::from_secs(5) {
                        break;
                    }
                    if timeout(REQUEST_TIMEOUT, stream.request_progress()).await.is_err() {
                        break;
                    }
                }
            }
        }
        sessions.push(session);
    }
    sessions
}

/// Counts of what a run did and found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Operations recorded.
    pub operations: usize,
    /// Of which with an unknown outcome.
    pub unknown: usize,
    /// Unknown-outcome reads (dropped).
    pub unknown_reads: usize,
    /// Unknown-outcome puts, CASes and txns found in the KV history (resolved as applied).
    pub unknown_applied: usize,
    /// Unknown-outcome puts, CASes and txns not in the KV history (dropped).
    pub unknown_not_applied: usize,
    /// Unknown-outcome deletes and lease grants/revokes (kept with both outcomes).
    pub unknown_deletes: usize,
    /// Progress notifications received, over all watchers.
    pub watch_progress: usize,
    /// SIGKILL + restart faults.
    pub kills: usize,
    /// SIGSTOP + SIGCONT faults of the leader.
    pub stops: usize,
    /// Network partitions (one member cut off from the other two, then healed).
    pub partitions: usize,
    /// Of which cut off the leader.
    pub partitioned_leaders: usize,
    /// Slow, lossy and one-way-cut peer links ([`crate::links`]).
    pub links: crate::links::LinkFaultCounts,
    /// Crash-at-a-failpoint faults ([`crate::failpoint::crash_at`]).
    pub failpoint_crashes: usize,
    /// Of which the member aborted at the point (the others were killed after
    /// [`crate::failpoint::FIRE_WITHIN`]).
    pub failpoint_fired: usize,
    /// Full-disk and damaged-file faults ([`crate::disk`]).
    pub disk: crate::disk::DiskCounts,
    /// Panics the members logged during the run ([`SERVER_PANICS`]).
    pub panics: usize,
    /// The last revision.
    pub revision: i64,
    /// Watch events delivered, over all watchers.
    pub watch_events: usize,
    /// Watch sessions (streams), over all watchers.
    pub watch_sessions: usize,
    /// Linearizability and watch violations.
    pub violations: Vec<String>,
    /// Acknowledged writes missing from the KV history.
    pub lost_writes: Vec<String>,
    /// Whether the linearizability check finished.
    pub linearizability_checked: bool,
    /// Time the checks took.
    pub check_time: Duration,
    /// Time the linearizability check took.
    pub linearizability_time: Duration,
    /// Faults planted into the recorded history that the checker caught (of 2; see
    /// [`plant_faults`]), when the history itself passed.
    pub planted_caught: Option<usize>,
}

impl Summary {
    /// Faults injected, of every kind.
    pub fn faults(&self) -> usize {
        self.kills
            + self.stops
            + self.partitions
            + self.links.total()
            + self.failpoint_crashes
            + self.disk.total()
    }
}

/// Plants faults into a linearizable recorded history and counts how many the checker
/// rejects, so a run also shows that its check is not vacuous: (1) the first acknowledged read
/// that saw a value returns a value never written; (2) the second acknowledged put claims the
/// revision of the first (a revision reused). Early operations, so that the search, which must
/// exhaust every linearization up to the planted fault to reject it, ends quickly.
pub fn plant_faults(ops: &[Operation]) -> usize {
    let mut caught = 0;
    let illegal = |h: &[Operation]| {
        matches!(
            check(h, State::initial(), Duration::from_secs(60)),
            Verdict::Illegal(_)
        )
    };
    let read = ops.iter().position(|o| {
        o.ret != INFINITY
            && match &o.resp {
                Response::Get { kv, .. } => kv.is_some(),
                Response::Range { kvs, .. } => !kvs.is_empty(),
                _ => false,
            }
    });
    if let Some(i) = read {
        let mut h = ops.to_vec();
        match &mut h[i].resp {
            Response::Get { kv: Some(kv), .. } => kv.0 = "never-written".into(),
            Response::Range { kvs, .. } => kvs[0].1 = "never-written".into(),
            _ => unreachable!("a read that saw a value"),
        }
        caught += illegal(&h) as usize;
    }
    // Writes that created a revision of their own (puts, and successful optimistic puts).
    let puts: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            o.ret != INFINITY
                && matches!(
                    (&o.req, &o.resp),
                    (_, Response::Put { .. })
                        | (
                            Request::Update { value: Some(_), .. },
                            Response::Update {
                                succeeded: true,
                                ..
                            },
                        )
                )
        })
        .map(|(i, _)| i)
        .collect();
    if let (Some(&first), Some(&second)) = (puts.first(), puts.get(1)) {
        let mut h = ops.to_vec();
        h[second].resp = h[first].resp.clone();
        caught += illegal(&h) as usize;
    }
    caught
}

/// How long the profile runs: `ROBUSTNESS_SECONDS`, 60 s by default.
pub fn duration() -> Duration {
    let secs = std::env::var("ROBUSTNESS_SECONDS")
        .ok()
        .map(|s| s.parse::<u64>().expect("ROBUSTNESS_SECONDS is a number"))
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// Reads the KV history of [`PREFIX`] back, one snapshot per revision from 1 to `last`.
async fn read_history(cluster: &Cluster, last: i64) -> Vec<(i64, BTreeMap<String, Kv>)> {
    const READERS: i64 = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for r in 0..READERS {
        let mut c = cluster
            .try_client(r as usize % cluster.len())
            .await
            .expect("connect");
        tasks.spawn(async move {
            let mut out = Vec::new();
            let mut rev = 1 + r;
            while rev <= last {
                let opts = GetOptions::new().with_prefix().with_revision(rev);
                // A spurious election on a loaded machine may fail a read: retry.
                let mut tries = 0;
                let resp = loop {
                    tries += 1;
                    match c.get(PREFIX, Some(opts.clone())).await {
                        Ok(r) => break r,
                        Err(e) if tries >= 20 => panic!("read revision {rev}: {e}"),
                        Err(_) => sleep(Duration::from_millis(250)).await,
                    }
                };
                let snap: BTreeMap<String, Kv> = resp
                    .kvs()
                    .iter()
                    .map(|kv| (lossy(kv.key()), (lossy(kv.value()), kv.mod_revision())))
                    .collect();
                out.push((rev, snap));
                rev += READERS;
            }
            out
        });
    }
    let mut all: Vec<(i64, BTreeMap<String, Kv>)> =
        tasks.join_all().await.into_iter().flatten().collect();
    all.sort_by_key(|(r, _)| *r);
    all
}

/// Resolves unknown outcomes against the KV history (etcd's `patchedOperationHistory`):
/// reads with unknown outcomes carry no information and go; a put or compare-and-set whose
/// unique value is in the history happened at that revision (its return time stays infinite);
/// one whose value is not never took effect and goes. Unknown deletes stay unknown (the model
/// keeps both outcomes). Returns the patched history; counts what it did in `summary`.
pub fn patch_history(
    ops: Vec<Operation>,
    history: &KvHistory,
    summary: &mut Summary,
) -> Vec<Operation> {
    let mut written: HashMap<(&str, &str), i64> = HashMap::new();
    for evs in history.events.values() {
        for e in evs.iter().filter(|e| e.put) {
            written.insert((e.key.as_str(), e.value.as_str()), e.revision);
        }
    }
    let mut out = Vec::with_capacity(ops.len());
    for mut op in ops {
        if op.resp == Response::Unknown {
            match &op.req {
                Request::Get { .. } | Request::Range { .. } => {
                    summary.unknown_reads += 1;
                    continue;
                }
                // A delete, or a lease grant or revoke (the client retries those until it
                // learns the outcome; the model keeps both branches until then).
                Request::Delete { .. }
                | Request::Update { value: None, .. }
                | Request::LeaseGrant { .. }
                | Request::LeaseRevoke { .. } => summary.unknown_deletes += 1,
                Request::Put { .. }
                | Request::Cas { .. }
                | Request::PutAll { .. }
                | Request::PutLease { .. }
                | Request::Update { .. } => {
                    let Some(rev) = op.req.writes().first().and_then(|kv| written.get(kv)) else {
                        summary.unknown_not_applied += 1;
                        continue;
                    };
                    summary.unknown_applied += 1;
                    op.resp = match op.req {
                        Request::Cas { .. } => Response::Cas {
                            succeeded: true,
                            revision: *rev,
                        },
                        Request::Update { .. } => Response::Update {
                            succeeded: true,
                            revision: *rev,
                            current: None,
                        },
                        _ => Response::Put { revision: *rev },
                    };
                }
            }
        }
        out.push(op);
    }
    out
}

/// Acknowledged writes that the KV history does not have at their revision.
pub fn lost_writes(ops: &[Operation], history: &KvHistory) -> Vec<String> {
    let mut lost = Vec::new();
    for op in ops.iter().filter(|op| op.ret != INFINITY) {
        let (rev, put) = match (&op.req, &op.resp) {
            (
                Request::Put { .. } | Request::PutAll { .. } | Request::PutLease { .. },
                Response::Put { revision },
            ) => (*revision, true),
            (
                Request::Update { value, expect, .. },
                Response::Update {
                    succeeded: true,
                    revision,
                    ..
                },
            ) if value.is_some() || *expect > 0 => (*revision, value.is_some()),
            (
                Request::Cas { .. },
                Response::Cas {
                    succeeded: true,
                    revision,
                },
            ) => (*revision, true),
            (
                Request::Delete { .. },
                Response::Delete {
                    deleted: true,
                    revision,
                },
            ) => (*revision, false),
            _ => continue,
        };
        let found = history.events.get(&rev).is_some_and(|evs| {
            if put {
                op.req
                    .writes()
                    .iter()
                    .all(|(k, v)| evs.iter().any(|e| e.put && e.key == *k && e.value == *v))
            } else {
                evs.iter().any(|e| !e.put && e.key == op.req.key())
            }
        });
        if !found {
            lost.push(format!(
                "client {}: {:?} acknowledged at revision {rev}, not in the history",
                op.client, op.req
            ));
        }
    }
    lost
}

/// A partition in place: heals every peer link when dropped, so that a partition never
/// outlives its fault, even when the run panics while it is in place.
struct Partitioned<'a>(&'a Cluster);

impl<'a> Partitioned<'a> {
    /// Cuts member `victim` off from every other member of `cluster`.
    fn isolate(cluster: &'a Cluster, victim: usize) -> Partitioned<'a> {
        let others: Vec<usize> = (0..cluster.len()).filter(|i| *i != victim).collect();
        cluster.partition(&[&[victim], &others]);
        Partitioned(cluster)
    }
}

impl Drop for Partitioned<'_> {
    fn drop(&mut self) {
        self.0.heal();
    }
}

/// Whether the profile partitions the network: only the `failpoints` feature builds the server
/// with the `METASTORE_TEST_FAULTS` hook that [`Cluster::partition`] relies on (without it,
/// a partition would silently cut nothing).
const PARTITIONS: bool = cfg!(feature = "failpoints");

/// Serializes the tests of this target that start clusters (two at once would load a small
/// machine enough to make elections spurious).
pub static CLUSTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The member whose data directory is on a small tmpfs, for the full-disk fault (root only).
pub const DISK_MEMBER: usize = 2;

/// The 3-member cluster of a profile on `engine`, with the server's own shard count (one per
/// CPU, not the harness's test default of one), and member [`DISK_MEMBER`] moved onto a small
/// tmpfs for the full-disk fault (`Err` with the reason when it cannot be mounted).
pub async fn start_cluster(engine: &str) -> (Cluster, Result<SmallDisk, String>) {
    let shards = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .to_string();
    let mut cluster = Cluster::start(3, &["--storage-engine", engine, "--shards", &shards]).await;
    let small_disk = crate::disk::on_small_disk(&mut cluster, DISK_MEMBER);
    (cluster, small_disk)
}

/// Starts the [`WATCHERS`] watchers of `prefix` on `endpoints` until `stop`; returns the
/// revision each has reached and their tasks (each yields its sessions).
pub fn spawn_watchers(
    prefix: &'static str,
    endpoints: &[String],
    stop: &Arc<AtomicBool>,
) -> (
    Vec<Arc<AtomicI64>>,
    Vec<tokio::task::JoinHandle<Vec<Session>>>,
) {
    let reached: Vec<Arc<AtomicI64>> = (0..WATCHERS).map(|_| Arc::default()).collect();
    let watchers = (0..WATCHERS)
        .map(|w| {
            tokio::spawn(watch_loop(
                w,
                prefix,
                endpoints.to_vec(),
                stop.clone(),
                reached[w].clone(),
            ))
        })
        .collect();
    (reached, watchers)
}

/// Runs the profile on `engine` for `run_for` and checks everything; returns the summary.
pub async fn run(engine: &str, run_for: Duration) -> Summary {
    let panics = SERVER_PANICS.load(Ordering::Relaxed);
    let (mut cluster, small_disk) = start_cluster(engine).await;
    let endpoints = cluster.endpoints();
    let start = Instant::now();
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_watchers = Arc::new(AtomicBool::new(false));
    let (reached, watchers) = spawn_watchers(PREFIX, &endpoints, &stop_watchers);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(client_loop(
                c,
                endpoints.clone(),
                start,
                stop_clients.clone(),
            ))
        })
        .collect();

    let mut summary =
        inject_faults(&mut cluster, engine, small_disk.as_ref(), start, run_for).await;
    let deadline = start + run_for;
    // (Every partition is healed above; once more, so the final checks never run cut off.)
    cluster.heal();
    // Traffic runs on until the end of the run (time is the subject).
    tokio::time::sleep_until(deadline.into()).await;
    stop_clients.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for c in clients {
        ops.extend(c.await.expect("client task"));
    }
    ops.sort_by_key(|op| op.call);
    let last = final_revision(&cluster).await;
    // Watchers must catch up to it (ask for progress notifications; conditions, not sleeps).
    // (One that never does is reported by the validators below.)
    wait_until_async(Duration::from_secs(60), async || {
        reached.iter().all(|r| r.load(Ordering::Relaxed) >= last)
    })
    .await;
    stop_watchers.store(true, Ordering::Relaxed);
    let mut watched = Vec::new();
    for w in watchers {
        watched.push(w.await.expect("watch task"));
    }

    let checks = Instant::now();
    let snapshots = read_history(&cluster, last).await;
    let history = KvHistory::from_snapshots(&snapshots);
    check_all(&mut summary, ops, &history, &watched, last, &[]);
    check_members_agree(&cluster, last, &mut summary).await;
    summary.check_time = checks.elapsed();
    drop(cluster);
    // (Unmounted after the members stopped.)
    drop(small_disk);
    summary.panics = SERVER_PANICS.load(Ordering::Relaxed) - panics;
    summary
}

/// The faults of the profiles, one at a time every 2–4 s from `start` until 3 s before
/// `start + run_for`; returns a summary with the fault counters.
pub async fn inject_faults(
    cluster: &mut Cluster,
    engine: &str,
    small_disk: Result<&SmallDisk, &String>,
    start: Instant,
    run_for: Duration,
) -> Summary {
    let mut summary = Summary::default();
    if let Err(why) = small_disk {
        summary.disk.full_disk_skipped = Some(why.clone());
    }
    let mut rng = Lcg::new(start.elapsed().as_nanos() as u64 ^ 0xfa17);
    let deadline = start + run_for;
    loop {
        sleep(Duration::from_millis(2000 + rng.below(2000))).await;
        if Instant::now() + Duration::from_secs(3) > deadline {
            break;
        }
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        // Faults run one at a time: a partition is healed before the next fault (so a member
        // is never killed or restarted while cut off).
        match rng.below(if PARTITIONS { 7 } else { 4 }) {
            0 => {
                let victim = rng.below(cluster.len() as u64) as usize;
                cluster.kill(victim);
                sleep(Duration::from_millis(300 + rng.below(1500))).await;
                cluster.restart(victim);
                summary.kills += 1;
            }
            1 => {
                let pid = cluster.pid(leader).expect("the leader runs");
                signal(pid, libc::SIGSTOP);
                sleep(Duration::from_millis(3 * ELECTION_MS + rng.below(1000))).await;
                signal(pid, libc::SIGCONT);
                summary.stops += 1;
            }
            2 if small_disk.is_ok() => {
                let disk = small_disk.expect("mounted");
                let hold = Duration::from_millis(500 + rng.below(1500));
                let full = crate::disk::full_disk(cluster, disk, DISK_MEMBER, hold).await;
                summary.disk.full_disk += 1;
                summary.disk.full_disk_enospc += full.enospc as usize;
                summary.disk.full_disk_stopped += full.stopped as usize;
            }
            2 | 3 => {
                let rocksdb = engine == "rocksdb";
                let wanted = crate::disk::pick(&mut rng, rocksdb);
                if let Some(d) = crate::disk::damage(cluster, wanted, rocksdb).await {
                    summary.disk.damaged[d.kind.index()] += 1;
                    summary.disk.refused += d.replaced as usize;
                    summary.disk.repaired += !d.replaced as usize;
                    summary
                        .violations
                        .extend(d.violation.map(|v| format!("disk: {v}")));
                }
            }
            4 => crate::links::inject(cluster, leader, &mut rng, &mut summary.links).await,
            #[cfg(feature = "failpoints")]
            5 => {
                let victim = rng.below(cluster.len() as u64) as usize;
                let points = crate::failpoint::PROFILE_POINTS;
                let point = points[rng.below(points.len() as u64) as usize];
                let crash = crate::failpoint::crash_at(cluster, victim, point, "10%return");
                summary.failpoint_fired += (crash.await == crate::failpoint::Crash::Fired) as usize;
                summary.failpoint_crashes += 1;
            }
            _ => {
                // The leader half of the time, else any member (a follower, or the leader
                // again).
                let victim = if rng.below(2) == 0 {
                    leader
                } else {
                    rng.below(cluster.len() as u64) as usize
                };
                let partitioned = Partitioned::isolate(cluster, victim);
                sleep(Duration::from_millis(3 * ELECTION_MS + rng.below(1000))).await;
                drop(partitioned);
                summary.partitions += 1;
                summary.partitioned_leaders += (victim == leader) as usize;
            }
        }
    }
    summary
}

/// The final revision, read linearizably from the leader once everyone agrees on it.
pub async fn final_revision(cluster: &Cluster) -> i64 {
    let mut tries = 0;
    loop {
        tries += 1;
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let read = async {
            let mut c = cluster.try_client(leader).await?;
            c.get(PREFIX, Some(GetOptions::new().with_prefix())).await
        };
        match timeout(Duration::from_secs(5), read).await {
            Ok(Ok(r)) => break r.header().expect("header").revision(),
            _ if tries < 20 => sleep(Duration::from_millis(250)).await,
            other => panic!("final read: {other:?}\n{}", cluster.logs()),
        }
    }
}

/// Whether the members' HashKV answers at one revision agree: every member answered, with the
/// same hash. `None` when they do; otherwise the disagreement. HashKV
/// covers every version a read at an uncompacted revision can see, so a member whose history
/// differs anywhere above the compaction (not only in its latest state) hashes differently.
pub fn members_disagree(answers: &[MemberHash]) -> Option<String> {
    // Only the hash: each member answers with its own latest revision in the header.
    let hash = |a: &Result<HashAnswer, String>| a.as_ref().ok().map(|a| a.hash);
    let first = hash(&answers.first()?.1);
    let agree = first.is_some() && answers.iter().all(|(_, a)| hash(a) == first);
    (!agree).then(|| format!("HashKV differs between members: {answers:?}"))
}

/// Members' agreement at the end of a run: every live member's HashKV at `last` (once each has
/// applied it), compared by [`members_disagree`] until they agree or 60 s pass; a
/// disagreement is a violation.
pub async fn check_members_agree(cluster: &Cluster, last: i64, summary: &mut Summary) {
    let mut answers = Vec::new();
    let agreed = wait_until_async(Duration::from_secs(60), async || {
        answers = cluster.hash_kv_all(last).await;
        members_disagree(&answers).is_none()
    })
    .await;
    if !agreed {
        summary
            .violations
            .extend(members_disagree(&answers).map(|d| format!("members at revision {last}: {d}")));
    }
}

/// The checks of a run against the KV `history`: lost writes, linearizability of the patched
/// history of `ops` (with the planted faults when it passes), and every watcher's sessions
/// with all validators caught up to `last` (and [`validate_compacted`] against
/// `compactions`, the revisions compacted to during the run).
pub fn check_all(
    summary: &mut Summary,
    ops: Vec<Operation>,
    history: &KvHistory,
    watched: &[Vec<Session>],
    last: i64,
    compactions: &[i64],
) {
    summary.operations = ops.len();
    summary.unknown = ops.iter().filter(|o| o.resp == Response::Unknown).count();
    summary.revision = last;
    summary.lost_writes = lost_writes(&ops, history);
    let patched = patch_history(ops, history, summary);
    let lin = Instant::now();
    let verdict = check(&patched, State::initial(), Duration::from_secs(120));
    summary.linearizability_time = lin.elapsed();
    match verdict {
        Verdict::Ok => {
            summary.linearizability_checked = true;
            summary.planted_caught = Some(plant_faults(&patched));
        }
        Verdict::Illegal(why) => {
            summary.linearizability_checked = true;
            summary.violations.push(format!("linearizability: {why}"));
        }
        Verdict::Timeout => eprintln!("linearizability check timed out: inconclusive"),
    }
    for (w, sessions) in watched.iter().enumerate() {
        summary.watch_sessions += sessions.len();
        summary.watch_events += sessions
            .iter()
            .flat_map(|s| &s.responses)
            .map(|r| r.events.len())
            .sum::<usize>();
        summary.watch_progress += sessions
            .iter()
            .flat_map(|s| &s.responses)
            .filter(|r| r.progress)
            .count();
        let mut found = validate_all(history, sessions, Some(last), compactions);
        found.extend(validate_compacted(sessions, compactions));
        for v in found {
            summary
                .violations
                .push(format!("watcher {w}: {}: {}", v.validator, v.detail));
        }
    }
}

/// The one-line summary the profile prints.
pub fn summary_line(engine: &str, s: &Summary) -> String {
    format!(
        "robustness engine={engine}: operations={} (unknown={}: reads dropped={}, writes \
         applied={}, writes not applied={}, deletes kept unknown={}) revision={} faults={} \
         (kill+restart={}, leader-stop={}, partition={} of which leader={}, {}, crash-at-failpoint={} \
         of which fired={}, {}) watch-events={} watch-sessions={} \
         watch-progress-notifications={} linearizability={} ({:?}, planted faults caught {}) violations={} \
         lost-writes={} panics={} checks={:?}",
        s.operations,
        s.unknown,
        s.unknown_reads,
        s.unknown_applied,
        s.unknown_not_applied,
        s.unknown_deletes,
        s.revision,
        s.faults(),
        s.kills,
        s.stops,
        s.partitions,
        s.partitioned_leaders,
        s.links,
        s.failpoint_crashes,
        s.failpoint_fired,
        s.disk.summary(),
        s.watch_events,
        s.watch_sessions,
        s.watch_progress,
        if s.linearizability_checked {
            "checked"
        } else {
            "inconclusive"
        },
        s.linearizability_time,
        s.planted_caught
            .map_or("n/a".to_string(), |n| format!("{n}/2")),
        s.violations.len(),
        s.lost_writes.len(),
        s.panics,
        s.check_time
    )
}

/// The engines to run: `ROBUSTNESS_ENGINES` (comma-separated) or `METASTORE_TEST_ENGINE` (as
/// the `it` suite), else the memory engine.
pub fn engines() -> Vec<String> {
    if let Ok(list) = std::env::var("ROBUSTNESS_ENGINES") {
        return list.split(',').map(|s| s.trim().to_string()).collect();
    }
    vec![std::env::var("METASTORE_TEST_ENGINE").unwrap_or_else(|_| "memory".into())]
}

/// The profile: KV traffic and watches under SIGKILL/restart, SIGSTOP/SIGCONT and partition
/// faults, then linearizability, lost-write and watch checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kv_and_watch_under_process_faults() {
    let _one = CLUSTERS.lock().await;
    for engine in engines() {
        let s = run(&engine, duration()).await;
        println!("{}", summary_line(&engine, &s));
        for v in s.violations.iter().chain(&s.lost_writes).take(20) {
            println!("  {v}");
        }
        assert!(
            s.violations.is_empty() && s.lost_writes.is_empty() && s.panics == 0,
            "{engine}: {} violations, {} lost writes, {} member panics (see above)",
            s.violations.len(),
            s.lost_writes.len(),
            s.panics
        );
        assert!(s.operations > 0 && s.faults() > 0);
        if let Some(caught) = s.planted_caught {
            assert_eq!(caught, 2, "the checker missed a planted fault");
        }
    }
}

/// The partition fault really cuts a member off: with the leader isolated, the other two elect
/// a new leader in a higher term and take a write, while a linearizable read and a put sent
/// only to the old leader fail (an error or a timeout, never an answer); once healed, all
/// three converge on the majority's state.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_fault_cuts_the_member_off() {
    let _one = CLUSTERS.lock().await;
    let cluster = Cluster::start(3, &[]).await;
    let old = cluster.wait_for_leader(Duration::from_secs(60)).await;
    let (_, old_term, _) = cluster.status(old).await.expect("status of the leader");
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let partitioned = Partitioned::isolate(&cluster, old);

    // The other two agree on a new leader among themselves, in a higher term.
    let mut seen = Vec::new();
    let mut new = None;
    wait_until_async(Duration::from_secs(60), async || {
        seen.clear();
        for &i in &others {
            seen.push(cluster.status(i).await);
        }
        if let [Some((l0, t0, _)), Some((l1, t1, _))] = seen[..] {
            if l0 == l1 && t0 == t1 && t0 > old_term {
                new = others.iter().copied().find(|i| cluster.ids[*i] == l0);
            }
        }
        new.is_some()
    })
    .await;
    let new = new.unwrap_or_else(|| {
        panic!(
            "no new leader among {others:?} after term {old_term}: {seen:?}\n{}",
            cluster.logs()
        )
    });
    let mut majority = cluster.client(new).await;
    let put = majority
        .put(format!("{PREFIX}cut"), "majority", None)
        .await
        .expect("the majority takes a write");
    let written = put.header().expect("header").revision();

    // The isolated old leader answers neither a linearizable read nor a put.
    let mut isolated = cluster
        .try_client(old)
        .await
        .expect("connect to the isolated member");
    let read = timeout(
        Duration::from_secs(10),
        isolated.get(format!("{PREFIX}cut"), None),
    )
    .await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "the isolated member answered a linearizable read: {read:?}"
    );
    let put = timeout(
        Duration::from_secs(10),
        isolated.put(format!("{PREFIX}cut"), "minority", None),
    )
    .await;
    assert!(
        !matches!(put, Ok(Ok(_))),
        "the isolated member acknowledged a put: {put:?}"
    );

    // Healed, all three converge on the majority's write.
    drop(partitioned);
    cluster.wait_for_leader(Duration::from_secs(60)).await;
    let revision = cluster.wait_converged(Duration::from_secs(60)).await;
    assert!(revision >= written);
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        let got = c
            .get(
                format!("{PREFIX}cut"),
                Some(GetOptions::new().with_serializable()),
            )
            .await
            .expect("read after healing");
        let values: Vec<String> = got.kvs().iter().map(|kv| lossy(kv.value())).collect();
        assert_eq!(values, ["majority"], "member {i} after healing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_disagreeing_on_hash_kv_is_a_violation() {
        let at = |revision, hash| Ok(HashAnswer { revision, hash });
        // Members at different latest revisions agree on the hash at the one asked for.
        let same = [(0, at(10, 7)), (1, at(12, 7)), (2, at(10, 7))];
        assert_eq!(members_disagree(&same), None);
        // A member whose history differs above the compaction (a resurrected version, say).
        let hash = [(0, at(10, 7)), (1, at(10, 9)), (2, at(10, 7))];
        assert!(members_disagree(&hash).is_some());
        // A member that cannot answer is no agreement either.
        let silent = [(0, at(10, 7)), (1, Err("unavailable".to_string()))];
        assert!(members_disagree(&silent).is_some());
    }
}
