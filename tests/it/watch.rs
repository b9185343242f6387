//! The Watch service through `etcd-client` and `etcdctl`: events and their key-values, prefix
//! and cross-shard ranges, history replay, compaction, filters, prev_kv, watch IDs, cancel,
//! progress, txn atomicity, slow consumers and disconnects.
//!
//! "Nothing more arrives" is checked with a progress request as a fence: MetaStore sends the
//! progress response (watch ID -1) only once every watcher of the stream has been sent
//! everything up to the current revision, so any event still owed would come before it.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, Event, EventType, GetOptions,
    Txn, TxnOp, WatchFilterType, WatchOptions, WatchResponse, WatchStream,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::time::timeout;

use crate::harness::Server;
use crate::util::{put_rev, Rev};

/// How long any single expected response may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A connected client for `endpoint`.
pub async fn connect(endpoint: &str) -> Client {
    Client::connect([endpoint], None).await.expect("connect")
}

/// The next response on `ws`; panics on timeout, error or end of stream.
pub async fn next_resp(ws: &mut WatchStream) -> WatchResponse {
    match timeout(WAIT, ws.message()).await {
        Err(_) => panic!("no watch response within {WAIT:?}"),
        Ok(Err(e)) => panic!("watch stream failed: {e:?}"),
        Ok(Ok(None)) => panic!("watch stream ended"),
        Ok(Ok(Some(r))) => r,
    }
}

/// Opens a watch and reads its `created` response; returns the stream and the watch ID.
pub async fn open(c: &mut Client, key: &str, opts: Option<WatchOptions>) -> (WatchStream, i64) {
    let mut ws = timeout(WAIT, c.watch(key, opts))
        .await
        .expect("watch call timed out")
        .expect("watch");
    let r = next_resp(&mut ws).await;
    assert!(r.created(), "first response must be `created`: {r:?}");
    assert!(!r.canceled(), "watch refused: {r:?}");
    assert!(r.events().is_empty(), "{r:?}");
    (ws, r.watch_id())
}

/// Reads event responses until `n` events arrived; every response must carry events for
/// `watch_id`, and the count must come out exact.
pub async fn read_events(ws: &mut WatchStream, watch_id: i64, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < n {
        let r = next_resp(ws).await;
        assert!(
            !r.canceled() && !r.created() && !r.events().is_empty(),
            "expected events, got {r:?} after {} events",
            got.len()
        );
        assert_eq!(r.watch_id(), watch_id, "{r:?}");
        got.extend(r.events().iter().cloned());
    }
    assert_eq!(got.len(), n, "more events than expected: {got:?}");
    got
}

/// Requests progress and checks that the very next response is the progress response (watch
/// ID -1, no events): nothing else was owed. Returns its header revision.
pub async fn fence(ws: &mut WatchStream) -> i64 {
    ws.request_progress().await.expect("progress request");
    let r = next_resp(ws).await;
    assert_eq!(
        (r.watch_id(), r.events().len(), r.created(), r.canceled()),
        (-1, 0, false, false),
        "expected the progress response and nothing before it, got {r:?}"
    );
    r.rev()
}

/// An event as (type, key, value, create_revision, mod_revision, version).
pub type Ev = (&'static str, String, String, i64, i64, i64);

/// [`Ev`] of an event.
pub fn ev(e: &Event) -> Ev {
    let kv = e.kv().expect("event without kv");
    let t = match e.event_type() {
        EventType::Put => "PUT",
        EventType::Delete => "DELETE",
    };
    (
        t,
        String::from_utf8_lossy(kv.key()).into_owned(),
        String::from_utf8_lossy(kv.value()).into_owned(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
    )
}

/// An expected PUT event.
pub fn put_ev(k: &str, v: &str, create: i64, m: i64, version: i64) -> Ev {
    ("PUT", k.into(), v.into(), create, m, version)
}

/// An expected DELETE event (a tombstone: only the key and the deleting revision).
pub fn del_ev(k: &str, m: i64) -> Ev {
    ("DELETE", k.into(), String::new(), 0, m, 0)
}

/// The prev_kv of an event as (value, create, mod, version).
fn prev(e: &Event) -> Option<(String, i64, i64, i64)> {
    e.prev_kv().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.version(),
        )
    })
}

async fn del(c: &mut Client, k: &str) -> i64 {
    let r = c.delete(k, None).await.unwrap();
    assert_eq!(r.deleted(), 1, "delete {k}");
    r.rev()
}

// ---------------------------------------------------------------------------------------------

async fn case_put_then_delete(ep: &str) {
    let mut c = connect(ep).await;
    let mut ws = c.watch("k", None).await.unwrap();
    let created = next_resp(&mut ws).await;
    assert!(created.created() && !created.canceled(), "{created:?}");
    assert_eq!(created.watch_id(), 0, "the first auto watch ID is 0");
    assert_eq!(created.rev(), 1);
    assert!(created.events().is_empty());

    assert_eq!(put_rev(&mut c, "k", "v1").await, 2);
    assert_eq!(put_rev(&mut c, "other", "x").await, 3);
    assert_eq!(put_rev(&mut c, "k", "v2").await, 4);
    assert_eq!(put_rev(&mut c, "k2", "x").await, 5);
    assert_eq!(del(&mut c, "k").await, 6);

    let got: Vec<Ev> = read_events(&mut ws, 0, 3).await.iter().map(ev).collect();
    assert_eq!(
        got,
        vec![
            put_ev("k", "v1", 2, 2, 1),
            put_ev("k", "v2", 2, 4, 2),
            del_ev("k", 6),
        ]
    );
    assert_eq!(fence(&mut ws).await, 6);
}

#[tokio::test]
async fn put_then_delete_events() {
    let server = Server::start();
    case_put_then_delete(&server.endpoint).await;
}

/// Keys w/0..w/49 spread over 4 shards, written concurrently by 5 clients: the prefix watcher
/// sees all 50 PUTs exactly once, in revision order, each at the revision its put returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_watch_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let keys: Vec<String> = (0..50).map(|i| format!("w/{i}")).collect();
    let shards: BTreeSet<usize> = keys
        .iter()
        .map(|k| metastore::shard::shard_for(k.as_bytes(), 4))
        .collect();
    assert_eq!(shards.len(), 4, "the keys must span every shard");

    let mut c = server.client().await;
    let (mut ws, id) = open(&mut c, "w/", Some(WatchOptions::new().with_prefix())).await;
    // Neighbours outside the prefix.
    put_rev(&mut c, "w", "no").await;
    put_rev(&mut c, "w0", "no").await;

    let mut tasks = Vec::new();
    for t in 0..5 {
        let mut c = server.client().await;
        let mine: Vec<String> = keys.iter().skip(t).step_by(5).cloned().collect();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for k in mine {
                revs.push((put_rev(&mut c, &k, &format!("v-{k}")).await, k));
            }
            revs
        }));
    }
    let mut written: Vec<(i64, String)> = Vec::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    written.sort();
    assert_eq!(
        written.iter().map(|w| w.0).collect::<Vec<_>>(),
        (4..54).collect::<Vec<i64>>(),
        "every put got its own revision"
    );

    let got: Vec<Ev> = read_events(&mut ws, id, 50).await.iter().map(ev).collect();
    let want: Vec<Ev> = written
        .iter()
        .map(|(r, k)| put_ev(k, &format!("v-{k}"), *r, *r, 1))
        .collect();
    assert_eq!(got, want);
    assert_eq!(fence(&mut ws).await, 53);
}

async fn case_start_revision_replay(ep: &str) {
    let mut c = connect(ep).await;
    let mut revs = Vec::new();
    for i in 0..5 {
        revs.push(put_rev(&mut c, &format!("r/{}", i % 3), &format!("v{i}")).await);
        put_rev(&mut c, "rx", "outside").await;
    }
    assert_eq!(revs, vec![2, 4, 6, 8, 10]);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revs[0]);
    let (mut ws, id) = open(&mut c, "r/", Some(opts)).await;
    let got: Vec<Ev> = read_events(&mut ws, id, 5).await.iter().map(ev).collect();
    assert_eq!(
        got,
        vec![
            put_ev("r/0", "v0", 2, 2, 1),
            put_ev("r/1", "v1", 4, 4, 1),
            put_ev("r/2", "v2", 6, 6, 1),
            put_ev("r/0", "v3", 2, 8, 2),
            put_ev("r/1", "v4", 4, 10, 2),
        ]
    );
    // Then live.
    assert_eq!(put_rev(&mut c, "r/2", "live").await, 12);
    let got: Vec<Ev> = read_events(&mut ws, id, 1).await.iter().map(ev).collect();
    assert_eq!(got, vec![put_ev("r/2", "live", 6, 12, 2)]);
    assert_eq!(fence(&mut ws).await, 12);

    // A start revision in the middle replays from exactly there.
    let opts = WatchOptions::new().with_prefix().with_start_revision(7);
    let (mut ws, id) = open(&mut c, "r/", Some(opts)).await;
    let got: Vec<Ev> = read_events(&mut ws, id, 3).await.iter().map(ev).collect();
    assert_eq!(got.iter().map(|e| e.4).collect::<Vec<_>>(), vec![8, 10, 12]);
    assert_eq!(fence(&mut ws).await, 12);
}

#[tokio::test]
async fn start_revision_replay() {
    let server = Server::start();
    case_start_revision_replay(&server.endpoint).await;
}

async fn case_compacted_start_revision(ep: &str) {
    let mut c = connect(ep).await;
    for i in 0..5 {
        assert_eq!(put_rev(&mut c, "k", &format!("v{i}")).await, i + 2);
    }
    c.compact(5, None).await.unwrap();

    // Below the compaction revision: created, then canceled with compact_revision.
    let mut ws = c
        .watch("k", Some(WatchOptions::new().with_start_revision(3)))
        .await
        .unwrap();
    let r = next_resp(&mut ws).await;
    assert!(r.created() && !r.canceled(), "{r:?}");
    let id = r.watch_id();
    let r = next_resp(&mut ws).await;
    assert_eq!(
        (
            r.watch_id(),
            r.canceled(),
            r.compact_revision(),
            r.events().len()
        ),
        (id, true, 5, 0),
        "{r:?}"
    );
    // The stream stays usable, and the canceled watcher gets nothing more.
    assert_eq!(put_rev(&mut c, "k", "after").await, 7);
    assert_eq!(fence(&mut ws).await, 7);

    // At the compaction revision itself: still in history.
    let (mut ws, id) = open(
        &mut c,
        "k",
        Some(WatchOptions::new().with_start_revision(5)),
    )
    .await;
    let got: Vec<Ev> = read_events(&mut ws, id, 3).await.iter().map(ev).collect();
    assert_eq!(
        got,
        vec![
            put_ev("k", "v3", 2, 5, 4),
            put_ev("k", "v4", 2, 6, 5),
            put_ev("k", "after", 2, 7, 6),
        ]
    );
}

#[tokio::test]
async fn compacted_start_revision_cancels() {
    let server = Server::start();
    case_compacted_start_revision(&server.endpoint).await;
}

/// A watch canceled because its start revision is compacted names the compaction that cut it,
/// also while the shards have applied that compaction and readers have not been told yet. The
/// robustness suite's Kubernetes-like profile found a cancel naming the compaction before
/// (3825 for a watch from 3873, cut by the compaction at 3902): the shard answered
/// ErrCompacted, the cancel read the compaction revision published to readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_watch_names_the_compaction_that_cut_it() {
    let dir = tempfile::tempdir().unwrap();
    // Each batch waits 300 ms after the shards applied it, before readers see it.
    let env = [("FAILPOINTS", "apply-after-barrier=sleep(300)")];
    let server = Server::try_start_with_env(dir.path(), &[], &env).unwrap();
    let mut c = connect(&server.endpoint).await;
    for i in 0..5 {
        assert_eq!(put_rev(&mut c, "k", &format!("v{i}")).await, i + 2);
    }
    let mut compactor = c.clone();
    let compact = tokio::spawn(async move { compactor.compact(5, None).await });
    // Watches from revision 3 until the compaction is answered: each one either replays from 3
    // (not compacted yet) or is canceled.
    let mut cancels = Vec::new();
    while !compact.is_finished() {
        let mut ws = c
            .watch("k", Some(WatchOptions::new().with_start_revision(3)))
            .await
            .unwrap();
        let r = next_resp(&mut ws).await;
        assert!(r.created(), "{r:?}");
        let r = next_resp(&mut ws).await;
        if r.canceled() {
            cancels.push(r.compact_revision());
        } else {
            assert_eq!(r.events()[0].kv().unwrap().mod_revision(), 3, "{r:?}");
        }
    }
    compact.await.unwrap().unwrap();
    assert!(
        !cancels.is_empty(),
        "no watch was canceled before the compaction was answered"
    );
    let wrong: Vec<i64> = cancels.iter().copied().filter(|&rev| rev != 5).collect();
    assert!(
        wrong.is_empty(),
        "{} of {} cancels named another compaction: {:?}",
        wrong.len(),
        cancels.len(),
        wrong.iter().collect::<BTreeSet<_>>()
    );
}

/// An event at the compaction revision comes without prev_kv, as from etcd (checked against
/// etcd 3.4: `compact 3`, then `watch --rev 3 --prev-kv` gives revision 3 without it and
/// revision 4 with it): etcd reads prev_kv at the compacted revision 2. (MetaStore used to
/// give it until the background purge ran; the store's conformance case
/// `no_prev_kv_at_the_compaction_revision` pins that deterministically.)
#[tokio::test]
async fn no_prev_kv_for_an_event_at_the_compaction_revision() {
    let server = Server::start();
    let mut c = connect(&server.endpoint).await;
    assert_eq!(put_rev(&mut c, "k", "v1").await, 2);
    assert_eq!(put_rev(&mut c, "k", "v2").await, 3);
    assert_eq!(put_rev(&mut c, "k", "v3").await, 4);
    c.compact(3, None).await.unwrap();
    let opts = WatchOptions::new().with_start_revision(3).with_prev_key();
    let (mut ws, id) = open(&mut c, "k", Some(opts)).await;
    let got = read_events(&mut ws, id, 2).await;
    assert_eq!(
        got.iter().map(prev).collect::<Vec<_>>(),
        vec![None, Some(("v2".into(), 2, 3, 2))]
    );
}

async fn case_filters_and_prev_kv(ep: &str) {
    let mut c = connect(ep).await;
    let (mut no_put, np) = open(
        &mut c,
        "f",
        Some(WatchOptions::new().with_filters([WatchFilterType::NoPut])),
    )
    .await;
    let (mut no_del, nd) = open(
        &mut c,
        "f",
        Some(
            WatchOptions::new()
                .with_filters([WatchFilterType::NoDelete])
                .with_prev_key(),
        ),
    )
    .await;
    let (mut with_prev, wp) = open(&mut c, "f", Some(WatchOptions::new().with_prev_key())).await;
    let (mut plain, pl) = open(&mut c, "f", None).await;

    assert_eq!(put_rev(&mut c, "f", "1").await, 2);
    assert_eq!(put_rev(&mut c, "f", "2").await, 3);
    assert_eq!(del(&mut c, "f").await, 4);
    assert_eq!(put_rev(&mut c, "f", "3").await, 5);

    let got = read_events(&mut no_put, np, 1).await;
    assert_eq!(ev(&got[0]), del_ev("f", 4));
    assert_eq!(fence(&mut no_put).await, 5);

    let got = read_events(&mut no_del, nd, 3).await;
    assert_eq!(
        got.iter().map(ev).collect::<Vec<_>>(),
        vec![
            put_ev("f", "1", 2, 2, 1),
            put_ev("f", "2", 2, 3, 2),
            put_ev("f", "3", 5, 5, 1),
        ]
    );
    assert_eq!(
        got.iter().map(prev).collect::<Vec<_>>(),
        vec![None, Some(("1".into(), 2, 2, 1)), None]
    );
    assert_eq!(fence(&mut no_del).await, 5);

    let got = read_events(&mut with_prev, wp, 4).await;
    assert_eq!(ev(&got[2]), del_ev("f", 4));
    assert_eq!(
        got.iter().map(prev).collect::<Vec<_>>(),
        vec![
            None,
            Some(("1".into(), 2, 2, 1)),
            Some(("2".into(), 2, 3, 2)),
            None
        ],
        "the DELETE carries the deleted value as prev_kv"
    );
    let p = got[2].prev_kv().unwrap();
    assert_eq!(p.key(), b"f");

    // Without prev_kv nothing carries one.
    let got = read_events(&mut plain, pl, 4).await;
    assert!(got.iter().all(|e| e.prev_kv().is_none()), "{got:?}");
    assert_eq!(
        got.iter().map(ev).collect::<Vec<_>>(),
        vec![
            put_ev("f", "1", 2, 2, 1),
            put_ev("f", "2", 2, 3, 2),
            del_ev("f", 4),
            put_ev("f", "3", 5, 5, 1),
        ]
    );
}

#[tokio::test]
async fn filters_and_prev_kv() {
    let server = Server::start();
    case_filters_and_prev_kv(&server.endpoint).await;
}

async fn case_watch_ids(ep: &str) {
    let mut c = connect(ep).await;
    let mut ws = c
        .watch("a", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!((r.created(), r.canceled(), r.watch_id()), (true, false, 7));

    // The same ID again on the same stream is refused.
    ws.watch("b", Some(WatchOptions::new().with_watch_id(7)))
        .await
        .unwrap();
    let r = next_resp(&mut ws).await;
    assert!(r.created() && r.canceled(), "{r:?}");
    assert!(
        r.cancel_reason().contains("duplicate watch ID"),
        "cancel_reason {:?}",
        r.cancel_reason()
    );
    assert_eq!(r.watch_id(), -1, "{r:?}");

    // Automatic IDs skip the ones in use: 0, then an explicit 1, then 2.
    ws.watch("b", None).await.unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!((r.created(), r.canceled(), r.watch_id()), (true, false, 0));
    ws.watch("c", Some(WatchOptions::new().with_watch_id(1)))
        .await
        .unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!((r.created(), r.canceled(), r.watch_id()), (true, false, 1));
    ws.watch("d", None).await.unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!((r.created(), r.canceled(), r.watch_id()), (true, false, 2));

    // Each event goes to its own watcher, and the refused watcher on "b" gets nothing.
    assert_eq!(put_rev(&mut c, "a", "1").await, 2);
    let got = read_events(&mut ws, 7, 1).await;
    assert_eq!(ev(&got[0]), put_ev("a", "1", 2, 2, 1));
    assert_eq!(put_rev(&mut c, "b", "1").await, 3);
    let got = read_events(&mut ws, 0, 1).await;
    assert_eq!(ev(&got[0]), put_ev("b", "1", 3, 3, 1));
    assert_eq!(put_rev(&mut c, "d", "1").await, 4);
    let got = read_events(&mut ws, 2, 1).await;
    assert_eq!(ev(&got[0]), put_ev("d", "1", 4, 4, 1));
    assert_eq!(fence(&mut ws).await, 4);
}

#[tokio::test]
async fn client_chosen_and_duplicate_watch_ids() {
    let server = Server::start();
    case_watch_ids(&server.endpoint).await;
}

async fn case_cancel(ep: &str) {
    let mut c = connect(ep).await;
    let (mut ws, id) = open(&mut c, "k", None).await;
    assert_eq!(put_rev(&mut c, "k", "1").await, 2);
    let got = read_events(&mut ws, id, 1).await;
    assert_eq!(ev(&got[0]), put_ev("k", "1", 2, 2, 1));

    ws.cancel(id).await.unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!(
        (r.watch_id(), r.canceled(), r.created(), r.events().len()),
        (id, true, false, 0),
        "{r:?}"
    );
    assert_eq!(put_rev(&mut c, "k", "2").await, 3);
    assert_eq!(del(&mut c, "k").await, 4);
    assert_eq!(fence(&mut ws).await, 4, "a canceled watcher gets no events");

    // Another watcher on the same stream still works.
    ws.watch("k", None).await.unwrap();
    let r = next_resp(&mut ws).await;
    assert!(r.created() && !r.canceled(), "{r:?}");
    let id2 = r.watch_id();
    assert_eq!(put_rev(&mut c, "k", "3").await, 5);
    let got = read_events(&mut ws, id2, 1).await;
    assert_eq!(ev(&got[0]), put_ev("k", "3", 5, 5, 1));
}

#[tokio::test]
async fn cancel_stops_events() {
    let server = Server::start();
    case_cancel(&server.endpoint).await;
}

async fn case_progress_request(ep: &str) {
    let mut c = connect(ep).await;
    let (mut ws, _) = open(&mut c, "p", None).await;
    for i in 0..3 {
        put_rev(&mut c, &format!("q{i}"), "x").await;
    }
    ws.request_progress().await.unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!(
        (r.watch_id(), r.created(), r.canceled(), r.events().len()),
        (-1, false, false, 0),
        "{r:?}"
    );
    assert_eq!(r.rev(), 4);
    assert_eq!(r.compact_revision(), 0);
}

#[tokio::test]
async fn progress_request() {
    let server = Server::start();
    case_progress_request(&server.endpoint).await;
}

#[tokio::test]
async fn progress_notify_on_idle_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(
        dir.path(),
        &["--experimental-watch-progress-notify-interval", "500ms"],
    )
    .unwrap();
    let mut c = server.client().await;
    let (mut ws, id) = open(
        &mut c,
        "idle",
        Some(WatchOptions::new().with_progress_notify()),
    )
    .await;
    // A second watcher on the stream without progress_notify gets no notifications.
    ws.watch("idle", Some(WatchOptions::new().with_watch_id(100)))
        .await
        .unwrap();
    let r = next_resp(&mut ws).await;
    assert_eq!((r.created(), r.watch_id()), (true, 100));

    assert_eq!(put_rev(&mut c, "other", "x").await, 2);
    assert_eq!(put_rev(&mut c, "other", "y").await, 3);
    let start = std::time::Instant::now();
    // Notifications taken before the puts applied may carry an older revision; within a few
    // intervals one must report revision 3.
    let mut seen = Vec::new();
    loop {
        let r = next_resp(&mut ws).await;
        assert_eq!(
            (r.watch_id(), r.events().len(), r.created(), r.canceled()),
            (id, 0, false, false),
            "{r:?}"
        );
        let rev = r.rev();
        seen.push(rev);
        if rev == 3 {
            break;
        }
        assert!(rev < 3, "{seen:?}");
        assert!(seen.len() < 5, "no notification at revision 3: {seen:?}");
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "notification took {:?}",
        start.elapsed()
    );
    // And they keep coming while idle.
    let r = next_resp(&mut ws).await;
    assert_eq!((r.watch_id(), r.events().len(), r.rev()), (id, 0, 3));
}

/// One txn putting 3 keys (on different shards) and then one putting and deleting: each txn's
/// events arrive together in one response, at one revision, in the txn's op order.
#[tokio::test]
async fn txn_events_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let names = ["t/c", "t/a", "t/b", "t/d"];
    let shards: BTreeSet<usize> = names[..3]
        .iter()
        .map(|k| metastore::shard::shard_for(k.as_bytes(), 4))
        .collect();
    assert!(shards.len() >= 2, "the txn's keys should span shards");
    let mut c = server.client().await;
    let (mut ws, id) = open(&mut c, "t/", Some(WatchOptions::new().with_prefix())).await;

    let txn = Txn::new().and_then(vec![
        TxnOp::put("t/c", "3", None),
        TxnOp::put("t/a", "1", None),
        TxnOp::put("t/b", "2", None),
        TxnOp::put("u", "outside", None),
    ]);
    let r = c.txn(txn).await.unwrap();
    assert_eq!(r.rev(), 2);
    let resp = next_resp(&mut ws).await;
    assert_eq!(resp.watch_id(), id);
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![
            put_ev("t/c", "3", 2, 2, 1),
            put_ev("t/a", "1", 2, 2, 1),
            put_ev("t/b", "2", 2, 2, 1),
        ],
        "all three in one response, in op order"
    );

    let txn = Txn::new()
        .when(vec![Compare::version("t/a", CompareOp::Equal, 1)])
        .and_then(vec![
            TxnOp::put("t/d", "4", None),
            TxnOp::delete("t/a", None),
            TxnOp::put("t/c", "33", None),
        ]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.rev(), 3);
    let resp = next_resp(&mut ws).await;
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![
            put_ev("t/d", "4", 3, 3, 1),
            del_ev("t/a", 3),
            put_ev("t/c", "33", 2, 3, 2),
        ]
    );
    // A range delete of the rest: one response, key order.
    let r = c
        .delete("t/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!((r.deleted(), r.rev()), (3, 4));
    let resp = next_resp(&mut ws).await;
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![del_ev("t/b", 4), del_ev("t/c", 4), del_ev("t/d", 4)]
    );
    assert_eq!(fence(&mut ws).await, 4);
}

/// Stream A is not read while 2000 ~1 KiB puts happen; stream B on another connection must
/// get all of them promptly regardless. Then A, drained, must have all 2000 in order too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_does_not_block_others() {
    const N: usize = 2000;
    let server = Server::start();
    let mut ca = server.client().await;
    let mut cb = server.client().await;
    let (mut wa, ida) = open(&mut ca, "s/", Some(WatchOptions::new().with_prefix())).await;
    let (mut wb, idb) = open(&mut cb, "s/", Some(WatchOptions::new().with_prefix())).await;

    let reader_b = tokio::spawn(async move {
        let mut got: Vec<Event> = Vec::new();
        while got.len() < N {
            let r = next_resp(&mut wb).await;
            assert!(!r.canceled() && !r.events().is_empty(), "B: {r:?}");
            assert_eq!(r.watch_id(), idb);
            got.extend(r.events().iter().cloned());
        }
        (got, std::time::Instant::now(), wb)
    });

    // 8 puts in flight at a time; revisions within a batch come in any order, so events are
    // compared with the KV's mod_revisions below.
    let writer = server.client().await;
    let value = vec![b'v'; 1024];
    let mut pending = Vec::new();
    let t0 = std::time::Instant::now();
    for chunk in (0..N).collect::<Vec<_>>().chunks(8) {
        for &i in chunk {
            let mut c = writer.clone();
            let v = value.clone();
            pending.push(async move { put_rev(&mut c, format!("s/{i:04}"), v).await });
        }
        futures_join(std::mem::take(&mut pending)).await;
    }
    let writes_done = std::time::Instant::now();
    let (got_b, b_done, _wb) = timeout(WAIT, reader_b)
        .await
        .expect("B did not receive all events within 10 s of the last write while A was not read")
        .unwrap();
    // Within a chunk of concurrent puts revisions may be assigned in any order: compare B's
    // (key, revision) pairs with the KV.
    let mut c = server.client().await;
    let all = c
        .get("s/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.kvs().len(), N);
    let mut by_rev: Vec<(i64, String)> = all
        .kvs()
        .iter()
        .map(|kv| (kv.mod_revision(), kv.key_str().unwrap().to_string()))
        .collect();
    by_rev.sort();
    assert_eq!(by_rev[0].0, 2);
    assert_eq!(by_rev[N - 1].0, 1 + N as i64);
    let check = |events: &[Event], who: &str| {
        assert_eq!(events.len(), N, "{who}: event count");
        for (i, e) in events.iter().enumerate() {
            let (t, k, _, _, m, v) = ev(e);
            assert_eq!((t, m, v), ("PUT", 2 + i as i64, 1), "{who}: event {i}");
            assert_eq!(k, by_rev[i].1, "{who}: event {i}");
            assert_eq!(e.kv().unwrap().value().len(), 1024, "{who}: event {i}");
        }
    };
    check(&got_b, "B");
    eprintln!(
        "writes took {:?}; B caught up {:?} after the last write",
        writes_done - t0,
        b_done.saturating_duration_since(writes_done)
    );

    // Now drain A.
    let mut got_a: Vec<Event> = Vec::new();
    let drain = async {
        while got_a.len() < N {
            let r = next_resp(&mut wa).await;
            assert!(!r.canceled() && !r.events().is_empty(), "A: {r:?}");
            assert_eq!(r.watch_id(), ida);
            got_a.extend(r.events().iter().cloned());
        }
    };
    timeout(Duration::from_secs(60), drain)
        .await
        .expect("A drained within 60 s");
    check(&got_a, "A");
    assert_eq!(fence(&mut wa).await, 1 + N as i64);
}

/// Awaits all futures concurrently (no extra crates: spawned on the runtime).
async fn futures_join<F>(futs: Vec<F>) -> Vec<i64>
where
    F: std::future::Future<Output = i64> + Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(timeout(WAIT, h).await.expect("put timed out").unwrap());
    }
    out
}

/// A watch stream dropped by its client (with events still owed) does not disturb the server.
#[tokio::test]
async fn dropped_stream_leaves_server_working() {
    let server = Server::start();
    let mut c1 = server.client().await;
    let (ws, _) = open(&mut c1, "d/", Some(WatchOptions::new().with_prefix())).await;
    let mut c = server.client().await;
    for i in 0..100 {
        put_rev(&mut c, &format!("d/{i:03}"), &"x".repeat(512)).await;
    }
    drop(ws);
    drop(c1);
    // A stream that owes a whole history, dropped right after creation.
    let mut c3 = server.client().await;
    let (ws3, _) = open(
        &mut c3,
        "d/",
        Some(WatchOptions::new().with_prefix().with_start_revision(1)),
    )
    .await;
    drop(ws3);

    let mut c2 = server.client().await;
    let (mut ws, id) = open(&mut c2, "d/", Some(WatchOptions::new().with_prefix())).await;
    assert_eq!(put_rev(&mut c, "d/new", "1").await, 102);
    let got = read_events(&mut ws, id, 1).await;
    assert_eq!(ev(&got[0]), put_ev("d/new", "1", 102, 102, 1));
    assert_eq!(fence(&mut ws).await, 102);
    // And the KV is fine.
    let r = c2
        .get(
            "d/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(r.count(), 101);
    // c3's connection is still usable for other calls after its stream went away.
    assert_eq!(c3.get("d/new", None).await.unwrap().kvs().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// etcdctl

/// A long-running `etcdctl` child whose stdout is read line by line; killed when dropped.
pub struct Ctl {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Ctl {
    /// Starts `etcdctl <args>` against `endpoint`.
    pub fn spawn(endpoint: &str, args: &[&str]) -> Ctl {
        let mut child = tokio::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("etcdctl is installed");
        let stdout = child.stdout.take().unwrap();
        Ctl {
            stdin: child.stdin.take(),
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Writes `s` to its stdin.
    pub async fn write(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(s.as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// The next `n` lines of stdout (panics with what arrived if they do not within [`WAIT`]).
    pub async fn lines(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        while got.len() < n {
            match timeout(WAIT, self.lines.next_line()).await {
                Ok(Ok(Some(l))) => got.push(l),
                other => panic!("etcdctl output ended or stalled ({other:?}); got {got:?}"),
            }
        }
        got
    }

    /// Closes its stdin and waits (at most [`WAIT`]) for it to exit.
    pub async fn exit(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        timeout(WAIT, self.child.wait())
            .await
            .expect("etcdctl did not exit")
            .unwrap()
    }

    /// Kills it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn etcdctl_watch_prefix_rev_prev_kv() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "k/a", "1").await, 2);
    assert_eq!(put_rev(&mut c, "k/a", "2").await, 3);
    assert_eq!(del(&mut c, "k/a").await, 4);
    assert_eq!(put_rev(&mut c, "k/b", "x").await, 5);
    assert_eq!(put_rev(&mut c, "other", "o").await, 6);

    let mut ctl = Ctl::spawn(
        &server.endpoint,
        &["watch", "k", "--prefix", "--rev", "2", "--prev-kv"],
    );
    let want = strings(&[
        "PUT", "k/a", "1", // created: no prev_kv
        "PUT", "k/a", "1", "k/a", "2", // prev, then current
        "DELETE", "k/a", "2", "k/a", "", // prev, then the tombstone
        "PUT", "k/b", "x",
    ]);
    assert_eq!(ctl.lines(want.len()).await, want);
    // Live events follow.
    put_rev(&mut c, "k/b", "y").await;
    assert_eq!(
        ctl.lines(5).await,
        strings(&["PUT", "k/b", "x", "k/b", "y"])
    );
    ctl.kill().await;

    // Without --prefix: exactly one key, from --rev.
    let mut ctl = Ctl::spawn(&server.endpoint, &["watch", "k/b", "--rev", "5"]);
    assert_eq!(
        ctl.lines(6).await,
        strings(&["PUT", "k/b", "x", "PUT", "k/b", "y"])
    );
    ctl.kill().await;
}

/// `etcdctl watch -i`: commands on stdin; "progress" prints "progress notify: <revision>".
#[tokio::test]
async fn etcdctl_watch_interactive() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "k/a", "1").await, 2);
    assert_eq!(put_rev(&mut c, "k/b", "2").await, 3);

    let mut ctl = Ctl::spawn(&server.endpoint, &["watch", "-i"]);
    ctl.write("watch k --prefix --rev 2 --prev-kv\n").await;
    assert_eq!(
        ctl.lines(6).await,
        strings(&["PUT", "k/a", "1", "PUT", "k/b", "2"])
    );
    ctl.write("progress\n").await;
    assert_eq!(ctl.lines(1).await, strings(&["progress notify: 3"]));
    put_rev(&mut c, "k/a", "3").await;
    assert_eq!(
        ctl.lines(5).await,
        strings(&["PUT", "k/a", "1", "k/a", "3"])
    );
    // A second watch on the same stream.
    ctl.write("watch z --rev 5\n").await;
    put_rev(&mut c, "z", "zz").await;
    assert_eq!(ctl.lines(3).await, strings(&["PUT", "z", "zz"]));
    // The progress response (watch ID -1) goes to every watch of the stream: etcdctl prints
    // it once per watch, as it does against etcd 3.4.
    ctl.write("progress\n").await;
    assert_eq!(
        ctl.lines(2).await,
        strings(&["progress notify: 5", "progress notify: 5"])
    );
    ctl.kill().await;
}

/// A watcher whose client stops reading falls behind; once its next revision is compacted it
/// is canceled with `compact_revision` (and a reason), after a gap-free prefix of events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_watcher_is_canceled_when_its_revision_is_compacted() {
    let server = Server::start();
    let mut c = connect(&server.endpoint).await;
    let first = put_rev(&mut c, "lag/0", "start").await;
    let (mut ws, id) = open(&mut c, "lag/", Some(WatchOptions::new().with_prefix())).await;
    // Enough data to fill the stream's outbound queue and HTTP/2 windows while nobody reads.
    let value = "v".repeat(4096);
    let mut last = first;
    for i in 1..=1500 {
        last = put_rev(&mut c, &format!("lag/{i}"), &value).await;
    }
    c.compact(last, None).await.unwrap();

    let mut next = first + 1;
    loop {
        let r = next_resp(&mut ws).await;
        assert_eq!(r.watch_id(), id, "{r:?}");
        if r.canceled() {
            assert_eq!(r.compact_revision(), last, "{r:?}");
            assert!(r.cancel_reason().contains("compacted"), "{r:?}");
            assert!(
                next < last,
                "the cancel came although every event was delivered"
            );
            break;
        }
        for e in r.events() {
            let rev = e.kv().unwrap().mod_revision();
            assert_eq!(rev, next, "events must have no gaps before the cancel");
            next += 1;
        }
    }
}

/// With `fragment`, a response larger than `--max-request-bytes` arrives in pieces: every piece
/// but the last has `fragment` set, and together they hold the revision's events.
#[tokio::test]
async fn large_revision_is_fragmented_on_request() {
    use metastore::proto::etcdserverpb::{watch_client::WatchClient, watch_request::RequestUnion};
    use metastore::proto::etcdserverpb::{WatchCreateRequest, WatchRequest};

    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--max-request-bytes", "8192"]).unwrap();
    let mut c = connect(&server.endpoint).await;
    let value = "x".repeat(2000);
    for i in 0..20 {
        put_rev(&mut c, &format!("frag/{i:02}"), &value).await;
    }

    let mut raw = WatchClient::connect(format!("http://{}", server.endpoint))
        .await
        .unwrap();
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"frag/".to_vec(),
            range_end: b"frag0".to_vec(),
            prev_kv: true,
            fragment: true,
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(create).await.unwrap();
    let mut stream = raw
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let created = timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(created.created);

    // One revision deletes all 20 keys; with prev_kv its events are ~80 KB.
    let deleted = c
        .delete("frag/", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(deleted.deleted(), 20);
    let mut events = 0;
    let mut pieces = 0;
    loop {
        let r = timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        pieces += 1;
        events += r.events.len();
        assert!(r
            .events
            .iter()
            .all(|e| e.kv.as_ref().unwrap().mod_revision == deleted.rev()));
        if !r.fragment {
            break;
        }
    }
    assert_eq!(events, 20);
    assert!(
        pieces > 1,
        "a response over --max-request-bytes must be fragmented"
    );
    drop(tx);
}

/// Regression, found by the robustness profile's bookmarkable validator: a requested progress
/// notification must never name a revision whose events the stream has not sent yet. The
/// stream used to read the applied revision twice, once to see that its watchers were caught
/// up and once for the notification, so a revision applied in between was announced ahead of
/// its events. Here every revision after the first is a put under the watched prefix, so a
/// notification at revision R must come after the events of every revision up to R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_notifications_never_run_ahead_of_events_under_writes() {
    const WRITERS: usize = 4;
    const WRITES: usize = 1500;
    let server = Server::start();
    let mut c = connect(&server.endpoint).await;
    let (mut ws, _) = open(&mut c, "race/", Some(WatchOptions::new().with_prefix())).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let ep = server.endpoint.clone();
            tokio::spawn(async move {
                let mut c = connect(&ep).await;
                for i in 0..WRITES {
                    put_rev(&mut c, &format!("race/{w}/{}", i % 8), "v").await;
                }
            })
        })
        .collect();
    let last = 1 + (WRITERS * WRITES) as i64;
    // One progress request outstanding at a time, sent again as soon as it is answered, while
    // the writes go on; every answer is checked against the events received before it.
    let (mut seen, mut notifications) = (1i64, 0);
    while seen < last {
        ws.request_progress().await.expect("progress request");
        loop {
            let r = next_resp(&mut ws).await;
            for e in r.events() {
                let rev = e.kv().expect("kv").mod_revision();
                assert_eq!(rev, seen + 1, "events must arrive in revision order");
                seen = rev;
            }
            if r.watch_id() == -1 && r.events().is_empty() {
                notifications += 1;
                assert!(
                    r.rev() <= seen,
                    "progress notification at revision {} before the events of revisions \
                     {}..={} were sent",
                    r.rev(),
                    seen + 1,
                    r.rev()
                );
                break;
            }
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    assert!(notifications > 0);
}

/// 300 watchers on one stream share the member's feed: 100 on each of three keys, every other
/// one with prev_kv, and one prefix watcher over all three. Each gets exactly the events of its
/// keys, in revision order, with prev_kv only if it asked (and the right one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watchers_on_one_stream_each_get_their_own_events() {
    const PER_KEY: usize = 100;
    const PUTS: usize = 30;
    let server = Server::try_start(tempfile::tempdir().unwrap().path(), &["--shards", "2"]);
    let server = server.unwrap();
    let mut c = server.client().await;
    let keys = ["fan/a", "fan/b", "fan/c"];
    let (mut ws, prefix_id) = open(&mut c, "fan/", Some(WatchOptions::new().with_prefix())).await;
    // (watch ID, key index, prev_kv)
    let mut watchers = Vec::new();
    for i in 0..PER_KEY * keys.len() {
        let prev = i % 2 == 0;
        let opts = WatchOptions::new().with_prev_key();
        ws.watch(keys[i % keys.len()], prev.then_some(opts))
            .await
            .unwrap();
        let r = next_resp(&mut ws).await;
        assert!(r.created() && !r.canceled(), "{r:?}");
        watchers.push((r.watch_id(), i % keys.len(), prev));
    }
    let mut written = Vec::new();
    for n in 0..PUTS {
        let k = keys[n % keys.len()];
        written.push((k, put_rev(&mut c, k, &format!("v{n}")).await));
    }
    // Every watcher's events, by watch ID.
    let mut got: std::collections::BTreeMap<i64, Vec<Event>> = Default::default();
    let want_total = PUTS + watchers.len() * PUTS / keys.len();
    let mut total = 0;
    while total < want_total {
        let r = next_resp(&mut ws).await;
        assert!(!r.canceled() && !r.created(), "{r:?}");
        total += r.events().len();
        got.entry(r.watch_id())
            .or_default()
            .extend(r.events().iter().cloned());
    }
    assert_eq!(total, want_total);
    let revs = |events: &[Event]| -> Vec<i64> {
        events
            .iter()
            .map(|e| e.kv().unwrap().mod_revision())
            .collect()
    };
    assert_eq!(
        revs(&got[&prefix_id]),
        written.iter().map(|w| w.1).collect::<Vec<_>>()
    );
    for (id, key, prev_kv) in watchers {
        let events = &got[&id];
        let mine: Vec<i64> = written
            .iter()
            .filter(|w| w.0 == keys[key])
            .map(|w| w.1)
            .collect();
        assert_eq!(revs(events), mine, "watcher {id} on {}", keys[key]);
        for (n, e) in events.iter().enumerate() {
            let before = prev(e).map(|p| p.2);
            let want = (prev_kv && n > 0).then(|| mine[n - 1]);
            assert_eq!(before, want, "prev_kv of watcher {id}'s event {n}");
        }
    }
    assert_eq!(fence(&mut ws).await, written.last().unwrap().1);
}

/// A watcher whose client stops reading falls behind the member's feed (which keeps about
/// 8,192 events): once read again, it catches up from the history and then from the feed,
/// without a gap or a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_feed_catches_up_from_the_history() {
    // The client's HTTP/2 windows and the stream's outbound queue take the first few thousand
    // events; the rest must pass the feed's bound for the watcher to fall behind it.
    const N: usize = 16_000;
    let server = Server::start();
    let mut c = server.client().await;
    let (mut slow, slow_id) = open(&mut c, "", Some(WatchOptions::new().with_all_keys())).await;
    let (mut live, live_id) = open(&mut c, "", Some(WatchOptions::new().with_all_keys())).await;
    let writer = server.client().await;
    let reader = tokio::spawn(async move {
        let events = read_events(&mut live, live_id, N).await;
        (events, live)
    });
    for chunk in (0..N).collect::<Vec<_>>().chunks(64) {
        let puts = chunk.iter().map(|&i| {
            let mut c = writer.clone();
            async move { put_rev(&mut c, format!("b/{}", i % 100), [b'v'; 512]).await }
        });
        futures_join(puts.collect()).await;
    }
    let (events, mut live) = timeout(Duration::from_secs(60), reader)
        .await
        .expect("the reading watcher got every event")
        .unwrap();
    let want: Vec<i64> = (2..2 + N as i64).collect();
    let revs = |events: &[Event]| -> Vec<i64> {
        events
            .iter()
            .map(|e| e.kv().unwrap().mod_revision())
            .collect()
    };
    assert_eq!(revs(&events), want);
    assert_eq!(fence(&mut live).await, 1 + N as i64);
    let events = timeout(Duration::from_secs(60), read_events(&mut slow, slow_id, N))
        .await
        .expect("the slow watcher drained");
    assert_eq!(revs(&events), want);
    // Caught up, it is served from the feed again.
    let rev = put_rev(&mut c, "b/after", "v").await;
    let after = read_events(&mut slow, slow_id, 1).await;
    assert_eq!(revs(&after), vec![rev]);
    assert_eq!(fence(&mut slow).await, rev);
}

/// A compaction at a revision keeps each key's newest change of that revision, a delete
/// included (etcd 3.5 keeps a tombstone at the compaction revision, etcd #18274), and removes
/// an earlier change of the same key in it. A watch from the compaction revision gets exactly
/// what remains. Regression: a txn's PUT of a key it then deleted came out as a second DELETE
/// (the put's version was gone, and a missing version read as a delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_the_compaction_revision_gets_what_the_compaction_kept() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "d", "1").await, 2);
    assert_eq!(put_rev(&mut c, "g", "old").await, 3);
    // One revision: a put of "g", a delete of "d", and a delete of "g" from an earlier key
    // (range end "\0", which etcd's duplicate-key check does not see).
    let txn = Txn::new().and_then([
        TxnOp::put("g", "v", None),
        TxnOp::delete("d", None),
        TxnOp::delete("foo", Some(DeleteOptions::new().with_from_key())),
    ]);
    let r = c.txn(txn).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 4);
    c.compact(4, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    let opts = WatchOptions::new().with_start_revision(4).with_range("z");
    let (mut ws, id) = open(&mut c, "a", Some(opts)).await;
    let events = read_events(&mut ws, id, 2).await;
    let got: Vec<Ev> = events.iter().map(ev).collect();
    assert_eq!(got, vec![del_ev("d", 4), del_ev("g", 4)]);
    // Nothing else was owed from revision 4: the next event is the next put's.
    assert_eq!(put_rev(&mut c, "g", "new").await, 5);
    let next: Vec<Ev> = read_events(&mut ws, id, 1).await.iter().map(ev).collect();
    assert_eq!(next, vec![put_ev("g", "new", 5, 5, 1)]);
}

/// Regression (found by the request fuzzer): a txn that puts a key and then deletes it with a
/// DeleteRange from an earlier key (range end "\0", which etcd's duplicate-key check does not
/// see: etcd 3.4 accepts it) makes two versions of the key in one revision. A watcher gets
/// both, as from etcd: the PUT (version 2) and then the DELETE, each with the value before the
/// txn as prev_kv. Before, both events came out as DELETEs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_and_delete_of_one_key_in_one_txn_are_two_events() {
    let server = Server::start();
    let mut c = server.client().await;
    assert_eq!(put_rev(&mut c, "g", "old").await, 2);
    let txn = Txn::new().and_then([
        TxnOp::put("g", "v", None),
        TxnOp::delete("foo", Some(DeleteOptions::new().with_from_key())),
    ]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 3);
    assert!(c.get("g", None).await.unwrap().kvs().is_empty());
    let opts = WatchOptions::new().with_start_revision(2).with_prev_key();
    let (mut ws, id) = open(&mut c, "g", Some(opts)).await;
    let events = read_events(&mut ws, id, 3).await;
    let got: Vec<Ev> = events.iter().map(ev).collect();
    assert_eq!(
        got,
        vec![
            put_ev("g", "old", 2, 2, 1),
            put_ev("g", "v", 2, 3, 2),
            del_ev("g", 3),
        ]
    );
    let prevs: Vec<_> = events.iter().map(prev).collect();
    assert_eq!(
        prevs,
        vec![
            None,
            Some(("old".into(), 2, 2, 1)),
            Some(("old".into(), 2, 2, 1))
        ]
    );
}

/// One stream's watchers from past, present and future revisions, of one key and of a
/// prefix, each get exactly the events owed them, however they move between being served
/// alone and being served with the stream's synced watchers; a canceled one gets nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_from_past_present_and_future_revisions_share_a_stream() {
    let server = Server::start();
    let mut c = server.client().await;
    let mut written: Vec<(&str, i64)> = Vec::new();
    for n in 0..3 {
        written.push(("mix/a", put_rev(&mut c, "mix/a", format!("v{n}")).await));
    }
    let (mut ws, present) = open(&mut c, "mix/a", None).await;
    // Events of the watchers already created may come before a `created`: kept for later.
    let mut early = Vec::new();
    async fn create(
        ws: &mut WatchStream,
        early: &mut Vec<WatchResponse>,
        key: &str,
        opts: WatchOptions,
    ) -> i64 {
        ws.watch(key, Some(opts)).await.unwrap();
        loop {
            let r = next_resp(ws).await;
            if !r.created() {
                early.push(r);
                continue;
            }
            assert!(!r.canceled(), "{r:?}");
            return r.watch_id();
        }
    }
    let start = |rev: i64| WatchOptions::new().with_start_revision(rev);
    let past = create(&mut ws, &mut early, "mix/a", start(written[0].1)).await;
    let future_rev = written[2].1 + 4;
    let future = create(&mut ws, &mut early, "mix/a", start(future_rev)).await;
    let prefix = create(
        &mut ws,
        &mut early,
        "mix/",
        WatchOptions::new().with_prefix(),
    )
    .await;
    let canceled = create(&mut ws, &mut early, "mix/b", WatchOptions::new()).await;
    for n in 0..6 {
        let key = ["mix/a", "mix/b"][n % 2];
        written.push((key, put_rev(&mut c, key, format!("w{n}")).await));
    }
    let after_create = written[2].1;
    // Every event of the first six written after the watchers exist, by watch ID.
    let owed = |id: i64| -> Vec<i64> {
        let (key, from) = match id {
            _ if id == present => ("mix/a", after_create + 1),
            _ if id == past => ("mix/a", written[0].1),
            _ if id == future => ("mix/a", future_rev),
            _ if id == prefix => ("mix/", after_create + 1),
            _ => ("mix/b", after_create + 1),
        };
        written
            .iter()
            .filter(|(k, rev)| k.starts_with(key) && *rev >= from)
            .map(|w| w.1)
            .collect()
    };
    let mut got: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    let ids = [present, past, future, prefix, canceled];
    let total: usize = ids.iter().map(|&id| owed(id).len()).sum();
    let mut early = early.into_iter();
    while got.values().map(Vec::len).sum::<usize>() < total {
        let r = match early.next() {
            Some(r) => r,
            None => next_resp(&mut ws).await,
        };
        assert!(!r.canceled() && !r.created(), "{r:?}");
        let revs = r.events().iter().map(|e| e.kv().unwrap().mod_revision());
        got.entry(r.watch_id()).or_default().extend(revs);
    }
    for id in ids {
        assert_eq!(
            got.get(&id).cloned().unwrap_or_default(),
            owed(id),
            "watch {id}"
        );
    }
    assert_eq!(fence(&mut ws).await, written.last().unwrap().1);
    // A canceled watcher gets nothing more; the others get the next write of their key.
    ws.cancel(canceled).await.unwrap();
    assert!(next_resp(&mut ws).await.canceled());
    let b = put_rev(&mut c, "mix/b", "last").await;
    let a = put_rev(&mut c, "mix/a", "last").await;
    let mut next: Vec<(i64, i64)> = Vec::new();
    while next.len() < 5 {
        let r = next_resp(&mut ws).await;
        for e in r.events() {
            next.push((r.watch_id(), e.kv().unwrap().mod_revision()));
        }
    }
    next.sort();
    let mut want = vec![
        (present, a),
        (past, a),
        (future, a),
        (prefix, b),
        (prefix, a),
    ];
    want.sort();
    assert_eq!(next, want);
    assert_eq!(fence(&mut ws).await, a);
}
