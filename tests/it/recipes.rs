//! The v3lock and v3election services through `etcd-client`, and `etcdctl lock` / `elect`
//! (which run the same recipes client-side over KV, Watch and Lease).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, EventType, GetOptions, LeaderKey, LockOptions, ProclaimOptions, ResignOptions,
    WatchOptions,
};
use tokio::time::timeout;

use crate::harness::Server;
use crate::util::{keys, Rev};
use crate::watch::{connect, open, read_events, Ctl, WAIT};

/// How long a call that must stay blocked is given to (wrongly) complete.
const STILL_PENDING: Duration = Duration::from_millis(500);

async fn lease(c: &mut Client) -> i64 {
    c.lease_grant(60, None).await.unwrap().id()
}

/// `fut`, which must complete within [`WAIT`] (lock and campaign calls block by design).
async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    timeout(WAIT, fut)
        .await
        .expect("call did not complete in time")
}

fn lock_opts(lease: i64) -> Option<LockOptions> {
    Some(LockOptions::new().with_lease(lease))
}

/// Waits for the PUT of `key` on a watch (the waiter's key: it is now queued).
async fn wait_for_put(ws: &mut etcd_client::WatchStream, id: i64, key: &str) -> i64 {
    let e = read_events(ws, id, 1).await;
    let kv = e[0].kv().unwrap();
    assert_eq!(
        (e[0].event_type(), kv.key_str().unwrap()),
        (EventType::Put, key)
    );
    kv.create_revision()
}

async fn case_lock_blocks_until_unlock(ep: &str) {
    let mut c1 = connect(ep).await;
    let mut c2 = connect(ep).await;
    let (l1, l2) = (lease(&mut c1).await, lease(&mut c2).await);
    let (k1, k2) = (format!("m/{l1:x}"), format!("m/{l2:x}"));

    let r = within(c1.lock("m", lock_opts(l1))).await.unwrap();
    assert_eq!(String::from_utf8_lossy(r.key()), k1);
    let got = c1.get(k1.as_str(), None).await.unwrap();
    let kv = &got.kvs()[0];
    assert_eq!((kv.lease(), kv.value()), (l1, &b""[..]));
    assert_eq!((kv.create_revision(), r.rev()), (2, 2));

    let (mut ws, id) = open(&mut c1, "m/", Some(WatchOptions::new().with_prefix())).await;
    let mut waiter = {
        let mut c2 = c2.clone();
        tokio::spawn(async move { c2.lock("m", lock_opts(l2)).await })
    };
    assert_eq!(wait_for_put(&mut ws, id, &k2).await, 3);
    assert!(
        timeout(STILL_PENDING, &mut waiter).await.is_err(),
        "the second lock completed while the first was held"
    );

    let unlocked = c1.unlock(k1.as_bytes()).await.unwrap();
    assert_eq!(unlocked.rev(), 4);
    let r = timeout(WAIT, &mut waiter)
        .await
        .expect("the waiter did not get the lock after unlock")
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(r.key()), k2);
    // etcd's Mutex.Lock keeps the header of its last wait read, taken once every earlier key
    // was gone: the waiter learns a revision at or after the release (here the unlock's),
    // not the older revision that created its own key (3).
    assert_eq!(r.rev(), 4, "lock response header revision of a waiter");
    let got = c2
        .get("m/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), vec![k2.clone()]);
    c2.unlock(k2.as_bytes()).await.unwrap();
    let got = c2
        .get("m/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
}

#[tokio::test]
async fn lock_blocks_until_unlock() {
    let server = Server::start();
    case_lock_blocks_until_unlock(&server.endpoint).await;
}

async fn case_lock_mutual_exclusion(ep: &str) {
    let inside = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut c = connect(ep).await;
        let inside = inside.clone();
        tasks.push(tokio::spawn(async move {
            let l = lease(&mut c).await;
            for _ in 0..5 {
                let key = c
                    .lock("counter-lock", lock_opts(l))
                    .await
                    .unwrap()
                    .key()
                    .to_vec();
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "task {t}: two holders"
                );
                let got = c.get("counter", None).await.unwrap();
                let n: u32 = got
                    .kvs()
                    .first()
                    .map_or(0, |kv| kv.value_str().unwrap().parse().unwrap());
                tokio::task::yield_now().await;
                c.put("counter", (n + 1).to_string(), None).await.unwrap();
                assert_eq!(inside.fetch_sub(1, Ordering::SeqCst), 1);
                c.unlock(key).await.unwrap();
            }
        }));
    }
    for t in tasks {
        timeout(Duration::from_secs(60), t)
            .await
            .expect("lock/increment rounds finished")
            .unwrap();
    }
    let mut c = connect(ep).await;
    let got = c.get("counter", None).await.unwrap();
    assert_eq!(got.kvs()[0].value_str().unwrap(), "20");
    assert_eq!(got.kvs()[0].version(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_mutual_exclusion() {
    let server = Server::start();
    case_lock_mutual_exclusion(&server.endpoint).await;
}

async fn case_lock_released_by_revoke(ep: &str) {
    let mut c1 = connect(ep).await;
    let mut c2 = connect(ep).await;
    let (l1, l2) = (lease(&mut c1).await, lease(&mut c2).await);
    let k2 = format!("m/{l2:x}");
    within(c1.lock("m", lock_opts(l1))).await.unwrap();
    let (mut ws, id) = open(&mut c1, "m/", Some(WatchOptions::new().with_prefix())).await;
    let mut waiter = {
        let mut c2 = c2.clone();
        tokio::spawn(async move { c2.lock("m", lock_opts(l2)).await })
    };
    wait_for_put(&mut ws, id, &k2).await;
    assert!(timeout(STILL_PENDING, &mut waiter).await.is_err());

    c1.lease_revoke(l1).await.unwrap();
    let r = timeout(WAIT, &mut waiter)
        .await
        .expect("the waiter did not get the lock after the holder's lease was revoked")
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(r.key()), k2);
    let got = c2
        .get("m/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), vec![k2]);
}

#[tokio::test]
async fn lock_released_by_lease_revoke() {
    let server = Server::start();
    case_lock_released_by_revoke(&server.endpoint).await;
}

/// The next leader proposal on an observe stream, as (key, value).
async fn observed(obs: &mut etcd_client::ObserveStream) -> (String, String) {
    let r = timeout(WAIT, obs.message())
        .await
        .expect("observe stream stalled")
        .expect("observe failed")
        .expect("observe stream ended");
    let kv = r.kv().expect("leader kv");
    (
        kv.key_str().unwrap().to_string(),
        kv.value_str().unwrap().to_string(),
    )
}

async fn leader_of(c: &mut Client, name: &str) -> (String, String) {
    let r = c.leader(name).await.unwrap();
    let kv = r.kv().expect("leader kv");
    (
        kv.key_str().unwrap().to_string(),
        kv.value_str().unwrap().to_string(),
    )
}

fn err_message(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

async fn case_election(ep: &str) {
    let mut c1 = connect(ep).await;
    let mut c2 = connect(ep).await;
    let mut c3 = connect(ep).await;
    let (l1, l2) = (lease(&mut c1).await, lease(&mut c2).await);
    let (k1, k2) = (format!("e/{l1:x}"), format!("e/{l2:x}"));

    let r = within(c1.campaign("e", "v1", l1)).await.unwrap();
    let leader1: LeaderKey = r.leader().expect("leader key").clone();
    assert_eq!(
        (leader1.name(), leader1.key(), leader1.lease()),
        (&b"e"[..], k1.as_bytes(), l1)
    );
    assert_eq!(leader1.rev(), r.rev());
    assert_eq!(leader_of(&mut c3, "e").await, (k1.clone(), "v1".into()));

    let mut obs = c3.observe("e").await.unwrap();
    assert_eq!(observed(&mut obs).await, (k1.clone(), "v1".into()));

    let (mut ws, id) = open(&mut c3, "e/", Some(WatchOptions::new().with_prefix())).await;
    let mut candidate2 = {
        let mut c2 = c2.clone();
        tokio::spawn(async move { c2.campaign("e", "v2", l2).await })
    };
    wait_for_put(&mut ws, id, &k2).await;
    assert!(
        timeout(STILL_PENDING, &mut candidate2).await.is_err(),
        "candidate 2 won while candidate 1 leads"
    );
    assert_eq!(leader_of(&mut c3, "e").await, (k1.clone(), "v1".into()));

    c1.proclaim(
        "v1b",
        Some(ProclaimOptions::new().with_leader(leader1.clone())),
    )
    .await
    .unwrap();
    assert_eq!(leader_of(&mut c3, "e").await, (k1.clone(), "v1b".into()));
    assert_eq!(observed(&mut obs).await, (k1.clone(), "v1b".into()));

    c1.resign(Some(ResignOptions::new().with_leader(leader1.clone())))
        .await
        .unwrap();
    let r = timeout(WAIT, &mut candidate2)
        .await
        .expect("candidate 2 did not win after the leader resigned")
        .unwrap()
        .unwrap();
    let leader2 = r.leader().unwrap();
    assert_eq!((leader2.key(), leader2.lease()), (k2.as_bytes(), l2));
    assert_eq!(leader_of(&mut c3, "e").await, (k2.clone(), "v2".into()));
    assert_eq!(observed(&mut obs).await, (k2.clone(), "v2".into()));

    // The resigned leader can no longer proclaim.
    let e = c1
        .proclaim("stale", Some(ProclaimOptions::new().with_leader(leader1)))
        .await
        .expect_err("a resigned leader proclaimed");
    let msg = err_message(e);
    assert!(msg.contains("election: not leader"), "{msg}");
    assert_eq!(leader_of(&mut c3, "e").await, (k2.clone(), "v2".into()));

    // An election nobody campaigned in.
    let e = c3
        .leader("nobody")
        .await
        .expect_err("leader of an empty election");
    let msg = err_message(e);
    assert!(msg.contains("election: no leader"), "{msg}");
}

#[tokio::test]
async fn election_campaign_proclaim_observe_resign() {
    let server = Server::start();
    case_election(&server.endpoint).await;
}

/// etcd's v3lock/v3election run each call in a `concurrency.Session`: with lease 0 the session
/// grants its own lease (TTL 60, not kept alive), so the lock or leadership still ends when
/// that lease runs out.
async fn case_without_lease(ep: &str) {
    let mut c = connect(ep).await;
    let r = within(c.lock("nl", None)).await.unwrap();
    let key = String::from_utf8(r.key().to_vec()).unwrap();
    let got = c.get(key.as_str(), None).await.unwrap();
    let lease = got.kvs()[0].lease();
    assert_ne!(lease, 0, "lock {key:?} was taken without a lease");
    assert_eq!(key, format!("nl/{lease:x}"));
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 60);

    let r = within(c.campaign("ne", "v", 0)).await.unwrap();
    let leader = r.leader().unwrap();
    assert_ne!(leader.lease(), 0, "campaign without a lease");
    assert_eq!(
        leader.key_str().unwrap(),
        format!("ne/{:x}", leader.lease())
    );
    let got = c.get(leader.key(), None).await.unwrap();
    assert_eq!(got.kvs()[0].lease(), leader.lease());
}

#[tokio::test]
async fn lock_and_campaign_without_lease_use_a_session_lease() {
    let server = Server::start();
    case_without_lease(&server.endpoint).await;
}

/// Error messages etcd gives on the recipe services.
async fn case_recipe_errors(ep: &str) {
    let mut c = connect(ep).await;
    let lease_nf = "etcdserver: requested lease not found";
    let e = within(c.lock("x", lock_opts(0x999)))
        .await
        .expect_err("unknown lease");
    assert_eq!(err_message(e), lease_nf);
    let e = within(c.campaign("x", "v", 0x999))
        .await
        .expect_err("unknown lease");
    assert_eq!(err_message(e), lease_nf);
    // Neither left a key behind.
    let got = c
        .get("x/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
    let missing = "\"leader\" field must be provided";
    let e = c
        .proclaim("v", None)
        .await
        .expect_err("proclaim without leader");
    assert_eq!(err_message(e), missing);
    let e = c.resign(None).await.expect_err("resign without leader");
    assert_eq!(err_message(e), missing);
}

#[tokio::test]
async fn recipe_errors() {
    let server = Server::start();
    case_recipe_errors(&server.endpoint).await;
}

#[tokio::test]
async fn etcdctl_lock_runs_command() {
    let server = Server::start();
    for args in [
        &["lock", "mylock", "--", "echo", "held"][..],
        &["lock", "mylock", "echo", "again"][..],
    ] {
        let mut ctl = Ctl::spawn(&server.endpoint, args);
        let word = args.last().unwrap().to_string();
        assert_eq!(ctl.lines(1).await, vec![word]);
        assert!(ctl.exit().await.success(), "{args:?}");
    }
    // The lock was released after each command.
    let mut c = server.client().await;
    let got = c
        .get("mylock/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(got.kvs().is_empty(), "{:?}", keys(got.kvs()));
}

#[tokio::test]
async fn etcdctl_lock_holds_and_elect_leads() {
    let server = Server::start();
    let mut c = server.client().await;

    let mut lock = Ctl::spawn(&server.endpoint, &["lock", "mylock"]);
    let held = lock.lines(1).await.remove(0);
    assert!(held.starts_with("mylock/"), "{held:?}");
    let got = c
        .get("mylock/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), vec![held.clone()]);
    lock.kill().await;

    let mut elect = Ctl::spawn(&server.endpoint, &["elect", "myelection", "val1"]);
    let out = elect.lines(2).await;
    assert!(out[0].starts_with("myelection/"), "{out:?}");
    assert_eq!(out[1], "val1");
    assert_eq!(
        leader_of(&mut c, "myelection").await,
        (out[0].clone(), "val1".into())
    );
    // `elect -l` observes the same leader.
    let mut listen = Ctl::spawn(&server.endpoint, &["elect", "-l", "myelection"]);
    assert_eq!(listen.lines(2).await, out);
    listen.kill().await;
    elect.kill().await;
}
