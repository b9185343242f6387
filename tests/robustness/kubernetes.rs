//! The Kubernetes-like profile, after etcd's `tests/robustness/traffic/kubernetes.go`: the
//! requests kube-apiserver sends to etcd, on a pool of [`OBJECTS`] keys under [`K8S_PREFIX`],
//! under the same faults as the etcd-like profile ([`crate::traffic::inject_faults`]).
//!
//! * Writes are optimistic-concurrency txns (`k8s.io/apiserver` `storage/etcd3/store.go`):
//!   a create is `txn(mod_revision(key) == 0 → put)`, an update or a delete is
//!   `txn(mod_revision(key) == R → put / delete, else get)` with the R the client last saw.
//! * Lists are paged ranges of the prefix (limit [`PAGE`]): the first page at revision 0 (the
//!   current one), the following ones pinned to the first page's revision, each from the key
//!   after the previous page's last (kube-apiserver's continue token). A client lists after a
//!   failed write (as etcd's Kubernetes traffic does) and now and then otherwise.
//! * Watchers watch the prefix with prev_kv and progress notifications
//!   ([`crate::traffic::watch_loop`]); a watch cancelled as compacted resumes from the
//!   compaction revision.
//! * Every [`COMPACT_PERIOD`] the compactor compacts to the revision it observed one period
//!   earlier (kube-apiserver compacts every 5 minutes to the revision it saw at the previous
//!   compaction).
//!
//! Checks: the creates/updates/deletes and first pages are checked for linearizability by the
//! model ([`crate::model`]); pinned pages, which the model cannot check (they read the past),
//! against the KV history ([`check_pinned`]); watchers with all validators, accepting resumes
//! after compaction ([`crate::watch::validate_compacted`]); and no acknowledged write lost.
//!
//! **Where the history comes from.** Compaction removes old revisions, so the history cannot
//! be read back at the end as the etcd-like profile does. A recorder ([`record_history`])
//! reads the prefix at every revision *during* the run, from the KV store itself (not from
//! watches, which are what the validators check), and the compactor never compacts past the
//! revision the recorder has read: compacting to c keeps c readable, so everything the checks
//! need is read before it goes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::time::{sleep, timeout};

use crate::harness::{wait_until_async, SERVER_PANICS};
use crate::linearizability::{Operation, INFINITY};
use crate::model::{Request, Response};
use crate::traffic::{
    check_all, check_members_agree, definitive, duration, engines, execute, final_revision,
    inject_faults, prefix_end, spawn_watchers, start_cluster, summary_line, Lcg, Summary, CLUSTERS,
};
use crate::watch::{validate_all, validate_compacted, Event, Kv, KvHistory, Session, WatchResp};

/// The key prefix of the profile (a resource's prefix in kube-apiserver's layout).
pub const K8S_PREFIX: &str = "/registry/pods/";
/// Keys (objects) the clients create, update and delete.
pub const OBJECTS: usize = 10;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// The page size of lists.
pub const PAGE: i64 = 3;
/// How often the compactor compacts.
pub const COMPACT_PERIOD: Duration = Duration::from_secs(3);
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between a client's requests.
const THINK: Duration = Duration::from_millis(40);
/// How long a stale watch ([`stale_watch`]) runs.
const STALE_WATCH: Duration = Duration::from_secs(1);
/// etcd's `ErrCompacted` message (`mvcc.ErrCompacted` as `rpctypes.ErrGRPCCompacted`).
pub const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// A served page: its (key, value, mod_revision)s, the count of the range, and `more`.
pub type Page = (Vec<(String, String, i64)>, i64, bool);

/// A list page pinned to the revision of its list's first page.
#[derive(Clone, Debug)]
pub struct PinnedPage {
    /// The client that sent it.
    pub client: usize,
    /// Call and return times (ns since the start of the run).
    pub call: u64,
    pub ret: u64,
    /// The revision it is pinned to.
    pub revision: i64,
    /// Its start key (the continuation key).
    pub from: String,
    /// Its limit.
    pub limit: i64,
    /// The page's (key, value, mod_revision)s, count and `more`, or `Err(COMPACTED)`.
    pub result: Result<Page, String>,
}

/// A compaction the compactor requested.
#[derive(Clone, Debug)]
pub struct Compaction {
    /// Call time and return time ([`INFINITY`] if the outcome is unknown).
    pub call: u64,
    pub ret: u64,
    /// The revision compacted to.
    pub revision: i64,
}

fn nanos(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
}

async fn connect(endpoints: &[String]) -> Option<Client> {
    match timeout(
        REQUEST_TIMEOUT,
        Client::connect(endpoints.to_vec(), Some(connect_options())),
    )
    .await
    {
        Ok(Ok(c)) => Some(c),
        _ => None,
    }
}

/// The current revision (a linearizable range's header), if a member answers in time.
async fn current_revision(c: &mut Client) -> Option<i64> {
    let opts = GetOptions::new().with_count_only();
    match timeout(REQUEST_TIMEOUT, c.get(K8S_PREFIX, Some(opts))).await {
        Ok(Ok(r)) => r.header().map(|h| h.revision()),
        _ => None,
    }
}

/// What one client recorded.
#[derive(Default)]
struct ClientLog {
    ops: Vec<Operation>,
    pinned: Vec<PinnedPage>,
    lists: usize,
    /// Stale lists (every page pinned to an old revision) and stale watches.
    stale_lists: usize,
    stale_watches: Vec<Session>,
}

/// Lists the prefix page by page; returns the objects seen (key → mod_revision) if the list
/// completed.
async fn list(
    id: usize,
    c: &mut Client,
    start: Instant,
    log: &mut ClientLog,
) -> Option<HashMap<String, i64>> {
    log.lists += 1;
    let req = Request::Range {
        prefix: K8S_PREFIX.into(),
        from: K8S_PREFIX.into(),
        limit: PAGE,
    };
    let call = nanos(start);
    let result = timeout(REQUEST_TIMEOUT, execute(c, &req)).await;
    let ret = nanos(start);
    let resp = match result {
        Ok(Ok(resp)) => resp,
        _ => Response::Unknown,
    };
    log.ops.push(Operation {
        client: id,
        call,
        ret: if resp == Response::Unknown {
            INFINITY
        } else {
            ret
        },
        req,
        resp: resp.clone(),
    });
    let Response::Range {
        kvs,
        more,
        revision,
        ..
    } = resp
    else {
        return None;
    };
    let mut seen: HashMap<String, i64> = kvs.iter().map(|(k, _, r)| (k.clone(), *r)).collect();
    if more {
        let from = format!("{}\0", kvs.last().expect("a page with more has keys").0);
        seen.extend(pinned_pages(id, c, start, log, revision, from).await?);
    }
    Some(seen)
}

/// Reads the prefix from `from` at `revision`, page by page, each page recorded as a
/// [`PinnedPage`]; returns the objects seen (key → mod_revision) if every page was served.
async fn pinned_pages(
    id: usize,
    c: &mut Client,
    start: Instant,
    log: &mut ClientLog,
    revision: i64,
    mut from: String,
) -> Option<HashMap<String, i64>> {
    let mut seen = HashMap::new();
    loop {
        let opts = GetOptions::new()
            .with_range(prefix_end(K8S_PREFIX))
            .with_limit(PAGE)
            .with_revision(revision);
        let call = nanos(start);
        let result = timeout(REQUEST_TIMEOUT, c.get(from.as_str(), Some(opts))).await;
        let ret = nanos(start);
        let result = match result {
            Ok(Ok(r)) => {
                let kvs: Vec<(String, String, i64)> = r
                    .kvs()
                    .iter()
                    .map(|kv| (lossy(kv.key()), lossy(kv.value()), kv.mod_revision()))
                    .collect();
                Ok((kvs, r.count(), r.more()))
            }
            Ok(Err(etcd_client::Error::GRpcStatus(st))) if st.message() == COMPACTED => {
                Err(COMPACTED.to_string())
            }
            // Unknown: a read that failed tells nothing.
            _ => return None,
        };
        log.pinned.push(PinnedPage {
            client: id,
            call,
            ret,
            revision,
            from,
            limit: PAGE,
            result: result.clone(),
        });
        let (kvs, _, more) = result.ok()?;
        seen.extend(kvs.iter().map(|(k, _, r)| (k.clone(), *r)));
        match kvs.last() {
            Some(last) if more => from = format!("{}\0", last.0),
            _ => return Some(seen),
        }
    }
}

/// A watch of the prefix from an old `revision` (a reflector re-watching from the
/// resourceVersion of an earlier list), with prev_kv, for at most [`STALE_WATCH`]: either the
/// events from there on, or a cancel as compacted (`compact_revision` set) if the revision
/// was compacted meanwhile. `None` if no stream opened.
async fn stale_watch(c: &mut Client, revision: i64) -> Option<Session> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(revision);
    let mut stream = timeout(REQUEST_TIMEOUT, c.watch(K8S_PREFIX, Some(opts)))
        .await
        .ok()?
        .ok()?;
    let mut session = Session {
        start: revision,
        responses: Vec::new(),
        compacted: None,
    };
    let until = tokio::time::Instant::now() + STALE_WATCH;
    while let Ok(Ok(Some(resp))) = tokio::time::timeout_at(until, stream.message()).await {
        if resp.created() {
            continue;
        }
        if resp.canceled() {
            session.compacted = (resp.compact_revision() > 0).then_some(resp.compact_revision());
            break;
        }
        let events = resp
            .events()
            .iter()
            .map(|e| {
                let kv = e.kv().expect("an event carries its kv");
                let put = e.event_type() == EventType::Put;
                Event {
                    put,
                    key: lossy(kv.key()),
                    value: if put {
                        lossy(kv.value())
                    } else {
                        String::new()
                    },
                    revision: kv.mod_revision(),
                    prev: e.prev_kv().map(|p| (lossy(p.value()), p.mod_revision())),
                }
            })
            .collect();
        session.responses.push(WatchResp {
            revision: resp.header().map_or(0, |h| h.revision()),
            events,
            progress: false,
        });
    }
    Some(session)
}

/// One client: optimistic creates/updates/deletes and paged lists until `stop`.
async fn client_loop(
    id: usize,
    endpoints: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> ClientLog {
    let mut rng = Lcg::new(0x6b85 + id as u64 * 7919 + start.elapsed().as_nanos() as u64);
    let mut log = ClientLog::default();
    let mut client: Option<Client> = None;
    // The mod_revision of every object this client believes exists.
    let mut known: HashMap<String, i64> = HashMap::new();
    let mut relist = true;
    let mut seq = 0u64;
    let mut observed: std::collections::VecDeque<(Instant, i64)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&endpoints).await {
                Some(c) => client.insert(c),
                None => {
                    // A retry pause: the members may be down or stopped.
                    sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let roll = rng.below(100);
        if relist || roll < 15 {
            match list(id, c, start, &mut log).await {
                Some(seen) => {
                    known = seen;
                    relist = false;
                }
                None => client = None,
            }
            // The revision this client has seen, for stale lists and watches later.
            if let Some(Operation {
                resp: Response::Range { revision, .. },
                ..
            }) = log.ops.last()
            {
                observed.push_back((Instant::now(), *revision));
            }
            sleep(THINK).await;
            continue;
        }
        // The oldest revision seen within the last 10 s: a few compactions old.
        while observed
            .front()
            .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(10))
        {
            observed.pop_front();
        }
        let old = observed.front().map(|(_, r)| *r);
        if let (Some(rev), 15..18) = (old, roll) {
            // A stale list (etcd's `KubernetesListStale`).
            log.stale_lists += 1;
            if pinned_pages(id, c, start, &mut log, rev, K8S_PREFIX.into())
                .await
                .is_none()
                && log.pinned.last().is_none_or(|p| p.result.is_ok())
            {
                client = None;
            }
            sleep(THINK).await;
            continue;
        }
        if let (Some(rev), 18..21) = (old, roll) {
            match stale_watch(c, rev + 1).await {
                Some(session) => log.stale_watches.push(session),
                None => client = None,
            }
            sleep(THINK).await;
            continue;
        }
        seq += 1;
        let key = format!("{K8S_PREFIX}default/pod-{}", rng.below(OBJECTS as u64));
        let value = format!("k{id}-{seq}");
        let req = match known.get(&key) {
            None => Request::Update {
                key: key.clone(),
                expect: 0,
                value: Some(value),
                get_on_failure: false,
            },
            Some(&rev) => Request::Update {
                key: key.clone(),
                expect: rev,
                value: (rng.below(100) >= 15).then_some(value),
                get_on_failure: true,
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
        match (&req, &resp) {
            (
                Request::Update { value, .. },
                Response::Update {
                    succeeded: true,
                    revision,
                    ..
                },
            ) => {
                match value {
                    Some(_) => known.insert(key, *revision),
                    None => known.remove(&key),
                };
            }
            (
                Request::Update {
                    get_on_failure: true,
                    ..
                },
                Response::Update {
                    current: Some((_, rev)),
                    ..
                },
            ) => {
                known.insert(key, *rev);
            }
            (
                Request::Update {
                    get_on_failure: true,
                    ..
                },
                Response::Update { current: None, .. },
            ) => {
                known.remove(&key);
            }
            // A failed create (the object exists) or an unknown outcome: list again first.
            _ => relist = true,
        }
        if resp == Response::Unknown {
            client = None;
        }
        log.ops.push(Operation {
            client: id,
            call,
            ret,
            req,
            resp,
        });
        sleep(THINK).await;
    }
    log
}

/// Every [`COMPACT_PERIOD`], compacts to the revision observed one period earlier, never
/// past `recorded` (the history the checks need; see the module docs). Until `stop`.
async fn compactor(
    endpoints: Vec<String>,
    start: Instant,
    stop: Arc<AtomicBool>,
    recorded: Arc<AtomicI64>,
) -> Vec<Compaction> {
    let mut out = Vec::new();
    let mut observed = 0i64;
    let mut compacted = 0i64;
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        sleep(COMPACT_PERIOD).await;
        let c = match client.as_mut() {
            Some(c) => c,
            None => match connect(&endpoints).await {
                Some(c) => client.insert(c),
                None => continue,
            },
        };
        let target = observed.min(recorded.load(Ordering::Relaxed));
        if target > compacted {
            let call = nanos(start);
            let r = timeout(REQUEST_TIMEOUT, c.compact(target, None)).await;
            let ret = nanos(start);
            let ok = matches!(r, Ok(Ok(_)));
            out.push(Compaction {
                call,
                ret: if ok { ret } else { INFINITY },
                revision: target,
            });
            if ok {
                compacted = target;
            } else {
                client = None;
                continue;
            }
        }
        match current_revision(c).await {
            Some(rev) => observed = rev,
            None => client = None,
        }
    }
    out
}

/// Reads [`K8S_PREFIX`] at every revision from 1 on, while the run goes on, until it has read
/// `upto` (which the caller sets once the final revision is known); `recorded` is the last
/// revision read with all before it. Several revisions are read at once to keep up with the
/// traffic; a failed batch is retried (faults).
///
/// Panics if a revision it needs was compacted: the compactor must not pass `recorded`.
async fn record_history(
    endpoints: Vec<String>,
    upto: Arc<AtomicI64>,
    recorded: Arc<AtomicI64>,
) -> Vec<(i64, BTreeMap<String, Kv>)> {
    const BATCH: i64 = 16;
    let mut out = Vec::new();
    let mut next = 1i64;
    let mut client: Option<Client> = None;
    while next <= upto.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            client = connect(&endpoints).await;
            if client.is_none() {
                sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        let Some(cur) = current_revision(c).await else {
            client = None;
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        if cur < next {
            sleep(Duration::from_millis(50)).await;
            continue;
        }
        let end = cur.min(next + BATCH - 1).min(upto.load(Ordering::Relaxed));
        let mut tasks = tokio::task::JoinSet::new();
        for rev in next..=end {
            let mut c = c.clone();
            tasks.spawn(async move {
                let opts = GetOptions::new().with_prefix().with_revision(rev);
                let r = timeout(REQUEST_TIMEOUT, c.get(K8S_PREFIX, Some(opts))).await;
                (rev, r)
            });
        }
        let mut batch = Vec::new();
        let mut failed = false;
        for (rev, r) in tasks.join_all().await {
            match r {
                Ok(Ok(resp)) => batch.push((
                    rev,
                    resp.kvs()
                        .iter()
                        .map(|kv| (lossy(kv.key()), (lossy(kv.value()), kv.mod_revision())))
                        .collect::<BTreeMap<String, Kv>>(),
                )),
                Ok(Err(etcd_client::Error::GRpcStatus(st))) if st.message() == COMPACTED => {
                    panic!("the history recorder lost revision {rev} to a compaction")
                }
                _ => failed = true,
            }
        }
        if failed {
            client = None;
            sleep(Duration::from_millis(200)).await;
            continue;
        }
        batch.sort_by_key(|(r, _)| *r);
        out.extend(batch);
        next = end + 1;
        recorded.store(end, Ordering::Relaxed);
    }
    out
}

/// Checks pinned pages against the recorded history (`snapshots`: revision → the prefix's
/// live keys) and the compactions: a page served at revision p must be exactly the keys of
/// the prefix at p from its start key (sorted, at most `limit`, with the count of all of them
/// and `more`), and must not be served once a compaction past p was acknowledged before the
/// page was sent; a page answered `ErrCompacted` needs a compaction past p requested before
/// the answer came. Returns the violations.
pub fn check_pinned(
    pages: &[PinnedPage],
    snapshots: &BTreeMap<i64, BTreeMap<String, Kv>>,
    compactions: &[Compaction],
) -> Vec<String> {
    let mut out = Vec::new();
    for p in pages {
        match &p.result {
            Ok((kvs, count, more)) => {
                if let Some(c) = compactions
                    .iter()
                    .find(|c| c.ret < p.call && c.revision > p.revision)
                {
                    out.push(format!(
                        "client {}: a page at revision {} served after the compaction to {} \
                         was acknowledged",
                        p.client, p.revision, c.revision
                    ));
                }
                let Some(snap) = snapshots.get(&p.revision) else {
                    out.push(format!(
                        "client {}: a page at revision {} beyond the history",
                        p.client, p.revision
                    ));
                    continue;
                };
                let all: Vec<(String, String, i64)> = snap
                    .range(p.from.clone()..)
                    .take_while(|(k, _)| k.starts_with(K8S_PREFIX))
                    .map(|(k, (v, r))| (k.clone(), v.clone(), *r))
                    .collect();
                let want_count = all.len() as i64;
                let want: Vec<_> = all.into_iter().take(p.limit as usize).collect();
                let want_more = (want.len() as i64) < want_count;
                if (kvs, *count, *more) != (&want, want_count, want_more) {
                    out.push(format!(
                        "client {}: the page from {:?} at revision {} is {kvs:?} (count {count}, \
                         more {more}); the history has {want:?} (count {want_count}, more \
                         {want_more})",
                        p.client, p.from, p.revision
                    ));
                }
            }
            Err(_) => {
                if !compactions
                    .iter()
                    .any(|c| c.call < p.ret && c.revision > p.revision)
                {
                    out.push(format!(
                        "client {}: a page at revision {} answered \"{COMPACTED}\" with no \
                         compaction past it",
                        p.client, p.revision
                    ));
                }
            }
        }
    }
    out
}

/// What the Kubernetes-like profile adds to [`Summary`].
#[derive(Debug, Default)]
pub struct K8sSummary {
    /// The common counts and findings (pinned-page violations are among its violations).
    pub base: Summary,
    /// Lists started.
    pub lists: usize,
    /// Pinned pages served, and answered `ErrCompacted`.
    pub pinned_served: usize,
    pub pinned_compacted: usize,
    /// Compactions requested, and the last revision compacted to.
    pub compactions: usize,
    pub compacted_to: i64,
    /// Watch sessions cancelled as compacted (watchers' and stale watches').
    pub compacted_resumes: usize,
    /// Stale lists (all pages pinned to a revision seen up to 10 s before) and stale watches
    /// (from such a revision, for [`STALE_WATCH`]).
    pub stale_lists: usize,
    pub stale_watches: usize,
    /// Faults planted into the pinned pages that [`check_pinned`] caught (of 2), if any page
    /// with keys was served.
    pub pinned_planted_caught: Option<usize>,
}

/// Plants two faults into the served pinned pages (a value changed, a key dropped from the
/// page) and counts how many [`check_pinned`] reports.
fn plant_pinned(
    pages: &[PinnedPage],
    snapshots: &BTreeMap<i64, BTreeMap<String, Kv>>,
    compactions: &[Compaction],
) -> Option<usize> {
    let i = pages
        .iter()
        .position(|p| p.result.as_ref().is_ok_and(|(kvs, _, _)| !kvs.is_empty()))?;
    let mut caught = 0;
    for fault in 0..2 {
        let mut planted = pages[i].clone();
        if let Ok((kvs, _, _)) = &mut planted.result {
            if fault == 0 {
                kvs[0].1 = "never-written".into();
            } else {
                kvs.remove(0);
            }
        }
        caught += !check_pinned(&[planted], snapshots, compactions).is_empty() as usize;
    }
    Some(caught)
}

/// Runs the profile on `engine` for `run_for` and checks everything.
pub async fn run(engine: &str, run_for: Duration) -> K8sSummary {
    let panics = SERVER_PANICS.load(Ordering::Relaxed);
    let (mut cluster, small_disk) = start_cluster(engine).await;
    let endpoints = cluster.endpoints();
    let start = Instant::now();
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_watchers = Arc::new(AtomicBool::new(false));
    let upto = Arc::new(AtomicI64::new(i64::MAX));
    let recorded = Arc::new(AtomicI64::new(0));
    let recorder = tokio::spawn(record_history(
        endpoints.clone(),
        upto.clone(),
        recorded.clone(),
    ));
    let (reached, watchers) = spawn_watchers(K8S_PREFIX, &endpoints, &stop_watchers);
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
    let compactions = tokio::spawn(compactor(
        endpoints.clone(),
        start,
        stop_clients.clone(),
        recorded.clone(),
    ));

    let base = inject_faults(&mut cluster, engine, small_disk.as_ref(), start, run_for).await;
    cluster.heal();
    tokio::time::sleep_until((start + run_for).into()).await;
    stop_clients.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    let mut pinned = Vec::new();
    let mut lists = 0;
    let mut stale_lists = 0;
    let mut stale_watches = Vec::new();
    for c in clients {
        let log = c.await.expect("client task");
        ops.extend(log.ops);
        pinned.extend(log.pinned);
        lists += log.lists;
        stale_lists += log.stale_lists;
        stale_watches.extend(log.stale_watches);
    }
    ops.sort_by_key(|op| op.call);
    let compactions = compactions.await.expect("compactor task");
    let last = final_revision(&cluster).await;
    upto.store(last, Ordering::Relaxed);
    wait_until_async(Duration::from_secs(60), async || {
        reached.iter().all(|r| r.load(Ordering::Relaxed) >= last)
    })
    .await;
    stop_watchers.store(true, Ordering::Relaxed);
    let mut watched = Vec::new();
    for w in watchers {
        watched.push(w.await.expect("watch task"));
    }
    let snapshots = timeout(Duration::from_secs(300), recorder)
        .await
        .expect("the history recorder reaches the final revision")
        .expect("recorder task");

    let checks = Instant::now();
    let history = KvHistory::from_snapshots(&snapshots);
    let by_rev: BTreeMap<i64, BTreeMap<String, Kv>> = snapshots.into_iter().collect();
    let mut s = K8sSummary {
        base,
        lists,
        pinned_served: pinned.iter().filter(|p| p.result.is_ok()).count(),
        pinned_compacted: pinned.iter().filter(|p| p.result.is_err()).count(),
        compactions: compactions.len(),
        compacted_to: compactions
            .iter()
            .filter(|c| c.ret != INFINITY)
            .map(|c| c.revision)
            .max()
            .unwrap_or(0),
        compacted_resumes: watched
            .iter()
            .flatten()
            .chain(&stale_watches)
            .filter(|s| s.compacted.is_some())
            .count(),
        stale_lists,
        stale_watches: stale_watches.len(),
        pinned_planted_caught: plant_pinned(&pinned, &by_rev, &compactions),
    };
    let revisions: Vec<i64> = compactions.iter().map(|c| c.revision).collect();
    check_all(&mut s.base, ops, &history, &watched, last, &revisions);
    check_members_agree(&cluster, last, &mut s.base).await;
    for v in check_pinned(&pinned, &by_rev, &compactions) {
        s.base.violations.push(format!("pinned page: {v}"));
    }
    // Each stale watch is a watcher of its own that need not have caught up.
    for (i, w) in stale_watches.iter().enumerate() {
        let one = std::slice::from_ref(w);
        let mut found = validate_all(&history, one, None, &revisions);
        found.extend(validate_compacted(one, &revisions));
        for v in found {
            s.base
                .violations
                .push(format!("stale watch {i}: {}: {}", v.validator, v.detail));
        }
    }
    s.base.check_time = checks.elapsed();
    drop(cluster);
    // (Unmounted after the members stopped.)
    drop(small_disk);
    s.base.panics = SERVER_PANICS.load(Ordering::Relaxed) - panics;
    s
}

/// The one-line summary of the profile.
pub fn k8s_summary_line(engine: &str, s: &K8sSummary) -> String {
    format!(
        "kubernetes-like {} lists={} pinned-pages={} (compacted={}, planted faults caught {}) \
         stale-lists={} stale-watches={} compactions={} (to revision {}) \
         watch-compacted-cancels={}",
        summary_line(engine, &s.base),
        s.lists,
        s.pinned_served,
        s.pinned_compacted,
        s.pinned_planted_caught
            .map_or("n/a".to_string(), |n| format!("{n}/2")),
        s.stale_lists,
        s.stale_watches,
        s.compactions,
        s.compacted_to,
        s.compacted_resumes
    )
}

/// The Kubernetes-like profile under the etcd-like profile's faults: linearizability of the
/// optimistic writes and first pages, pinned pages against the history, watch validators with
/// compacted resumes, lost writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_like_under_process_faults() {
    let _one = CLUSTERS.lock().await;
    for engine in engines() {
        let s = run(&engine, duration()).await;
        println!("{}", k8s_summary_line(&engine, &s));
        let b = &s.base;
        for v in b.violations.iter().chain(&b.lost_writes).take(20) {
            println!("  {v}");
        }
        assert!(
            b.violations.is_empty() && b.lost_writes.is_empty() && b.panics == 0,
            "{engine}: {} violations, {} lost writes, {} member panics (see above)",
            b.violations.len(),
            b.lost_writes.len(),
            b.panics
        );
        assert!(b.operations > 0 && b.faults() > 0);
        assert!(s.compacted_to > 0, "the run compacted nothing");
        if let Some(caught) = b.planted_caught {
            assert_eq!(caught, 2, "the checker missed a planted fault");
        }
        if let Some(caught) = s.pinned_planted_caught {
            assert_eq!(caught, 2, "the pinned-page check missed a planted fault");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> String {
        format!("{K8S_PREFIX}{n}")
    }

    /// Revision 2: a; 3: b; 4: c; 5: b updated; 6: a deleted.
    fn snapshots() -> BTreeMap<i64, BTreeMap<String, Kv>> {
        let mut out = BTreeMap::new();
        let mut cur: BTreeMap<String, Kv> = BTreeMap::new();
        out.insert(1, cur.clone());
        for (rev, k, v) in [(2, "a", "1"), (3, "b", "1"), (4, "c", "1"), (5, "b", "2")] {
            cur.insert(key(k), (v.to_string(), rev));
            out.insert(rev, cur.clone());
        }
        cur.remove(&key("a"));
        out.insert(6, cur);
        out
    }

    fn page(revision: i64, from: &str, kvs: &[(&str, &str, i64)], count: i64) -> PinnedPage {
        let kvs: Vec<_> = kvs
            .iter()
            .map(|(k, v, r)| (key(k), v.to_string(), *r))
            .collect();
        let more = (kvs.len() as i64) < count;
        PinnedPage {
            client: 0,
            call: 100,
            ret: 200,
            revision,
            from: key(from),
            limit: 2,
            result: Ok((kvs, count, more)),
        }
    }

    #[test]
    fn pinned_pages_are_checked_against_the_history() {
        let snaps = snapshots();
        // At revision 4, from "b": b@3, c@4; at 5 from "a\0": b@5, c@4.
        let good = [
            page(4, "b", &[("b", "1", 3), ("c", "1", 4)], 2),
            page(5, "a\0", &[("b", "2", 5), ("c", "1", 4)], 2),
            page(6, "", &[("b", "2", 5), ("c", "1", 4)], 2),
        ];
        assert!(check_pinned(&good, &snaps, &[]).is_empty());
        // The current state instead of the pinned one; a deleted key still listed; a wrong
        // count; a page past the history.
        for bad in [
            page(4, "b", &[("b", "2", 5), ("c", "1", 4)], 2),
            page(6, "", &[("a", "1", 2), ("b", "2", 5)], 3),
            page(5, "a\0", &[("b", "2", 5), ("c", "1", 4)], 3),
            page(9, "a\0", &[], 0),
        ] {
            assert_eq!(check_pinned(&[bad], &snaps, &[]).len(), 1);
        }
        assert_eq!(plant_pinned(&good, &snaps, &[]), Some(2));
    }

    #[test]
    fn compacted_pages_need_a_compaction() {
        let snaps = snapshots();
        let mut p = page(4, "b", &[], 0);
        p.result = Err(COMPACTED.into());
        // No compaction, or one not past the page's revision, or one requested only after the
        // answer: not excused.
        let at = |call, ret, revision| Compaction {
            call,
            ret,
            revision,
        };
        assert_eq!(check_pinned(&[p.clone()], &snaps, &[]).len(), 1);
        assert_eq!(
            check_pinned(&[p.clone()], &snaps, &[at(50, 60, 4)]).len(),
            1
        );
        assert_eq!(
            check_pinned(&[p.clone()], &snaps, &[at(300, 310, 5)]).len(),
            1
        );
        // A compaction past it, requested before the answer (even one still unanswered).
        assert!(check_pinned(&[p.clone()], &snaps, &[at(150, INFINITY, 5)]).is_empty());
        // A page served although a compaction past its revision was acknowledged before it
        // was sent.
        let served = page(4, "b", &[("b", "1", 3), ("c", "1", 4)], 2);
        assert!(check_pinned(std::slice::from_ref(&served), &snaps, &[at(150, 160, 5)]).is_empty());
        assert_eq!(check_pinned(&[served], &snaps, &[at(50, 60, 5)]).len(), 1);
    }
}
