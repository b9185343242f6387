//! A watch checker: 4 watchers on "c/" (separate streams, different start revisions) follow a
//! random workload of ~560 writes from 4 concurrent clients on a 4-shard server. Every watcher's
//! events are then checked against the KV's own history, read back revision by revision:
//!
//! * ordered: event revisions never go backwards;
//! * unique: no (key, mod_revision) twice;
//! * reliable: the revisions seen are exactly the acknowledged writes that changed "c/" at or
//!   after the watcher's start, and each revision's events are exactly the difference between
//!   the "c/" snapshots at r-1 and r (PUT: keys whose mod_revision is r, with their full
//!   key-value; DELETE: keys gone at r), with prev_kv from the r-1 snapshot;
//! * atomic: all events of one revision arrive in one response.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::watch as signal;
use tokio::time::timeout;

use crate::harness::Server;
use crate::util::Rev;
use crate::watch::{fence, next_resp};

/// Deterministic 64-bit LCG (Knuth's MMIX constants).
struct Lcg(u64);

impl Lcg {
    fn new(seed: u64) -> Lcg {
        Lcg(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn c_key(rng: &mut Lcg) -> String {
    format!("c/{}/{}", rng.below(4), rng.below(8))
}

/// An acknowledged write: its revision, and whether it changed something (a new revision) and
/// whether that change touched "c/".
#[derive(Debug, Clone, Copy)]
struct Write {
    rev: i64,
    changed: bool,
    changed_c: bool,
}

/// 2-3 ops on distinct keys, sometimes one outside "c/".
fn txn_ops(rng: &mut Lcg, tag: &str) -> Vec<(String, Option<String>)> {
    let n = 2 + rng.below(2) as usize;
    let mut keys = BTreeSet::new();
    let mut ops = Vec::new();
    while ops.len() < n {
        let k = if rng.below(10) == 0 {
            format!("d/{}", rng.below(4))
        } else {
            c_key(rng)
        };
        if !keys.insert(k.clone()) {
            continue;
        }
        let v = (rng.below(10) < 6).then(|| format!("{tag}-{}", ops.len()));
        ops.push((k, v));
    }
    ops
}

fn to_txn_ops(ops: &[(String, Option<String>)]) -> Vec<TxnOp> {
    ops.iter()
        .map(|(k, v)| match v {
            Some(v) => TxnOp::put(k.as_str(), v.as_str(), None),
            None => TxnOp::delete(k.as_str(), None),
        })
        .collect()
}

/// One random op.
async fn random_op(c: &mut Client, rng: &mut Lcg, tag: &str) -> Write {
    let roll = rng.below(100);
    if roll < 40 {
        let r = c.put(c_key(rng), tag, None).await.unwrap();
        return Write {
            rev: r.rev(),
            changed: true,
            changed_c: true,
        };
    }
    if roll < 55 {
        let r = c.delete(c_key(rng), None).await.unwrap();
        let changed = r.deleted() > 0;
        return Write {
            rev: r.rev(),
            changed,
            changed_c: changed,
        };
    }
    if roll < 60 {
        let prefix = format!("c/{}/", rng.below(4));
        let r = c
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        let changed = r.deleted() > 0;
        return Write {
            rev: r.rev(),
            changed,
            changed_c: changed,
        };
    }
    if roll < 88 {
        let then_ops = txn_ops(rng, &format!("{tag}t"));
        let else_ops = txn_ops(rng, &format!("{tag}e"));
        let mut txn = Txn::new();
        if rng.below(2) == 0 {
            let k = c_key(rng);
            txn = txn.when(vec![Compare::version(k, CompareOp::Greater, 0)]);
        }
        let txn = txn
            .and_then(to_txn_ops(&then_ops))
            .or_else(to_txn_ops(&else_ops));
        let r = c.txn(txn).await.unwrap();
        let ran = if r.succeeded() { &then_ops } else { &else_ops };
        let resps = r.op_responses();
        assert_eq!(resps.len(), ran.len());
        let (mut changed, mut changed_c) = (false, false);
        for ((k, _), resp) in ran.iter().zip(resps) {
            let effective = match resp {
                TxnOpResponse::Put(_) => true,
                TxnOpResponse::Delete(d) => d.deleted() > 0,
                other => panic!("unexpected op response {other:?}"),
            };
            changed |= effective;
            changed_c |= effective && k.starts_with("c/");
        }
        return Write {
            rev: r.rev(),
            changed,
            changed_c,
        };
    }
    let r = c
        .put(format!("d/{}", rng.below(4)), tag, None)
        .await
        .unwrap();
    Write {
        rev: r.rev(),
        changed: true,
        changed_c: false,
    }
}

/// What a watcher received: per response, its events as (key, kv, prev_kv, is_put).
type Received = Vec<Vec<(String, KeyValue, Option<KeyValue>, bool)>>;

/// Reads `ws` until it has an event at or past the target revision (once the target is set).
async fn follow(
    mut ws: WatchStream,
    id: i64,
    mut target: signal::Receiver<i64>,
) -> (Received, WatchStream) {
    let mut got: Received = Vec::new();
    let mut last = 0;
    loop {
        if last >= *target.borrow_and_update() {
            return (got, ws);
        }
        tokio::select! {
            msg = ws.message() => {
                let r = msg.expect("watch stream failed").expect("watch stream ended");
                assert!(!r.canceled() && !r.created(), "watcher {id}: {r:?}");
                assert_eq!(r.watch_id(), id);
                assert!(!r.events().is_empty(), "watcher {id}: empty response {r:?}");
                let evs: Vec<_> = r
                    .events()
                    .iter()
                    .map(|e| {
                        let kv = e.kv().expect("event kv").clone();
                        last = last.max(kv.mod_revision());
                        (
                            kv.key_str().unwrap().to_string(),
                            kv,
                            e.prev_kv().cloned(),
                            e.event_type() == EventType::Put,
                        )
                    })
                    .collect();
                got.push(evs);
            }
            changed = target.changed() => changed.expect("target sender dropped"),
        }
    }
}

/// A key-value as comparable fields: (key, value, create, mod, version, lease).
fn kv_fields(kv: &KeyValue) -> (String, String, i64, i64, i64, i64) {
    (
        kv.key_str().unwrap().to_string(),
        kv.value_str().unwrap().to_string(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    )
}

type Fields = (String, String, i64, i64, i64, i64);
/// An event as (is_put, kv fields, prev_kv fields).
type ExpEvent = (bool, Fields, Option<Fields>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_checker_random_workload() {
    const CLIENTS: u64 = 4;
    const OPS: usize = 130;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let mut c = server.client().await;

    // Pre-phase: 40 puts at revisions 2..=41, so some watchers can start in the past.
    let mut writes: Vec<Write> = Vec::new();
    let mut rng = Lcg::new(7);
    for i in 0..40 {
        let k = if i % 5 == 4 {
            format!("d/{}", rng.below(4))
        } else {
            c_key(&mut rng)
        };
        let r = c.put(k.as_str(), format!("pre-{i}"), None).await.unwrap();
        let rev = r.rev();
        assert_eq!(rev, i + 2);
        writes.push(Write {
            rev,
            changed: true,
            changed_c: k.starts_with("c/"),
        });
    }

    // Watchers: (start revision or live, prev_kv).
    let specs: [(Option<i64>, bool); 4] = [
        (Some(1), false),
        (Some(30), true),
        (None, true),
        (Some(38), false),
    ];
    let (target_tx, target_rx) = signal::channel(i64::MAX);
    let mut followers = Vec::new();
    for (start, prev_kv) in specs {
        let mut wc = server.client().await;
        let mut opts = WatchOptions::new().with_prefix();
        if let Some(s) = start {
            opts = opts.with_start_revision(s);
        }
        if prev_kv {
            opts = opts.with_prev_key();
        }
        let mut ws = wc.watch("c/", Some(opts)).await.expect("watch");
        let created = next_resp(&mut ws).await;
        assert!(created.created() && !created.canceled(), "{created:?}");
        let id = created.watch_id();
        let s = start.unwrap_or(created.rev() + 1);
        let rx = target_rx.clone();
        followers.push((s, prev_kv, wc, tokio::spawn(follow(ws, id, rx))));
    }

    // The workload.
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Lcg::new(1000 + t);
            let mut out = Vec::new();
            for i in 0..OPS {
                out.push(random_op(&mut c, &mut rng, &format!("w{t}-{i}")).await);
            }
            out
        }));
    }
    for t in tasks {
        writes.extend(
            timeout(Duration::from_secs(120), t)
                .await
                .expect("workload finished")
                .unwrap(),
        );
    }

    // Every revision belongs to exactly one acknowledged changing write.
    let final_rev = c.get("c/", None).await.unwrap().rev();
    let mut changing: Vec<i64> = writes.iter().filter(|w| w.changed).map(|w| w.rev).collect();
    changing.sort();
    assert_eq!(changing, (2..=final_rev).collect::<Vec<_>>());
    let c_revs: BTreeSet<i64> = writes
        .iter()
        .filter(|w| w.changed_c)
        .map(|w| w.rev)
        .collect();
    let target = *c_revs.last().unwrap();
    eprintln!(
        "{} writes, final revision {final_rev}, {} touched c/",
        writes.len(),
        c_revs.len()
    );

    // The history of "c/", snapshot by snapshot.
    let mut snaps: Vec<BTreeMap<String, KeyValue>> = vec![BTreeMap::new()]; // index 0 unused
    for r in 1..=final_rev {
        let got = c
            .get("c/", Some(GetOptions::new().with_prefix().with_revision(r)))
            .await
            .unwrap();
        snaps.push(
            got.kvs()
                .iter()
                .map(|kv| (kv.key_str().unwrap().to_string(), kv.clone()))
                .collect(),
        );
    }
    assert!(snaps[1].is_empty());
    // Expected events per revision, from the snapshots.
    let mut expected: BTreeMap<i64, BTreeSet<ExpEvent>> = BTreeMap::new();
    for r in 2..=final_rev {
        let (before, after) = (&snaps[r as usize - 1], &snaps[r as usize]);
        let mut evs = BTreeSet::new();
        for (k, kv) in after {
            if kv.mod_revision() == r {
                evs.insert((true, kv_fields(kv), before.get(k).map(kv_fields)));
            }
        }
        for (k, kv) in before {
            if !after.contains_key(k) {
                let tomb = (k.clone(), String::new(), 0, r, 0, 0);
                evs.insert((false, tomb, Some(kv_fields(kv))));
            }
        }
        if !evs.is_empty() {
            expected.insert(r, evs);
        }
    }
    assert_eq!(
        expected.keys().copied().collect::<BTreeSet<_>>(),
        c_revs,
        "the KV history changes \"c/\" at exactly the acknowledged c/ writes"
    );

    target_tx.send(target).unwrap();
    for (n, (start, prev_kv, _wc, handle)) in followers.into_iter().enumerate() {
        let (received, mut ws) = timeout(Duration::from_secs(60), handle)
            .await
            .unwrap_or_else(|_| panic!("watcher {n} did not reach revision {target} in 60 s"))
            .unwrap();
        // Nothing beyond.
        assert_eq!(fence(&mut ws).await, final_rev, "watcher {n}");

        let mut last = 0;
        let mut seen_pairs = BTreeSet::new();
        let mut response_of: BTreeMap<i64, usize> = BTreeMap::new();
        let mut got: BTreeMap<i64, BTreeSet<ExpEvent>> = BTreeMap::new();
        for (i, resp) in received.iter().enumerate() {
            for (key, kv, prev, is_put) in resp {
                let r = kv.mod_revision();
                assert!(r >= last, "watcher {n}: revision {r} after {last}");
                last = r;
                assert!(
                    seen_pairs.insert((key.clone(), r)),
                    "watcher {n}: duplicate event {key}@{r}"
                );
                let at = *response_of.entry(r).or_insert(i);
                assert_eq!(
                    at, i,
                    "watcher {n}: revision {r} split over responses {at} and {i}"
                );
                if !prev_kv {
                    assert!(prev.is_none(), "watcher {n}: prev_kv not asked for");
                }
                let prev = if prev_kv {
                    prev.as_ref().map(kv_fields)
                } else {
                    None
                };
                got.entry(r)
                    .or_default()
                    .insert((*is_put, kv_fields(kv), prev));
            }
        }
        let want: BTreeMap<i64, BTreeSet<ExpEvent>> = expected
            .range(start..)
            .map(|(r, evs)| {
                let evs = evs
                    .iter()
                    .map(|(p, kv, prev)| {
                        (*p, kv.clone(), if prev_kv { prev.clone() } else { None })
                    })
                    .collect();
                (*r, evs)
            })
            .collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "watcher {n} (start {start}): revisions"
        );
        for (r, evs) in &want {
            assert_eq!(
                &got[r], evs,
                "watcher {n} (start {start}): events at revision {r}"
            );
        }
        eprintln!(
            "watcher {n} (start {start}, prev_kv {prev_kv}): {} events in {} responses",
            seen_pairs.len(),
            received.len()
        );
    }
}
