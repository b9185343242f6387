//! The Lease service through `etcd-client` and `etcdctl`: grants and their validation,
//! attached keys, revoke, expiry, keep-alive, restarts and checkpoints.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, WatchOptions,
};
use tonic::Code;

use crate::harness::{ok_stdout, wait_until_async, Server};
use crate::util::{grpc_err, keys, put_rev, strs, Rev};
use crate::watch::{connect, del_ev, ev, fence, next_resp, open, WAIT};

const NOT_FOUND: &str = "etcdserver: requested lease not found";

async fn grant(c: &mut Client, ttl: i64) -> i64 {
    let r = c.lease_grant(ttl, None).await.unwrap();
    assert_eq!(r.ttl(), ttl);
    r.id()
}

async fn put_with(c: &mut Client, k: &str, v: &str, lease: i64) -> i64 {
    c.put(k, v, Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap()
        .rev()
}

async fn lease_ids(c: &mut Client) -> BTreeSet<i64> {
    c.leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect()
}

/// (ttl, granted_ttl, keys) from TimeToLive with keys.
async fn ttl_of(c: &mut Client, id: i64) -> (i64, i64, Vec<String>) {
    let r = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(r.id(), id);
    let keys = r
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    (r.ttl(), r.granted_ttl(), keys)
}

async fn case_grant_validation(ep: &str) {
    let mut c = connect(ep).await;
    let r = c.lease_grant(5, None).await.unwrap();
    assert_eq!((r.ttl(), r.error()), (5, ""));
    assert!(r.id() > 0, "server-chosen ID {}", r.id());
    assert_eq!(r.rev(), 1, "a grant is not a KV write");
    let auto = r.id();

    let r = c
        .lease_grant(10, Some(LeaseGrantOptions::new().with_id(0x1234)))
        .await
        .unwrap();
    assert_eq!((r.id(), r.ttl()), (0x1234, 10));
    assert_eq!(
        grpc_err(
            c.lease_grant(20, Some(LeaseGrantOptions::new().with_id(0x1234)))
                .await
        ),
        (
            Code::FailedPrecondition,
            "etcdserver: lease already exists".to_string()
        )
    );
    // The failed grant changed nothing.
    assert_eq!(ttl_of(&mut c, 0x1234).await.1, 10);

    // Any ID but 0 may be asked for, negative ones too, as etcd's lessor grants them
    // (regression, issue 11: "lease already exists").
    let r = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(-7)))
        .await
        .unwrap();
    assert_eq!((r.id(), r.ttl()), (-7, 30));
    assert_eq!(ttl_of(&mut c, -7).await.1, 30);
    c.lease_revoke(-7).await.unwrap();

    // Below the minimum (1.5 x the 1 s election timeout, rounded up): raised to 2.
    let r = c.lease_grant(1, None).await.unwrap();
    assert_eq!(r.ttl(), 2);
    let short = r.id();
    assert_eq!(ttl_of(&mut c, short).await.1, 2);

    assert_eq!(
        grpc_err(c.lease_grant(9_000_000_001, None).await),
        (
            Code::OutOfRange,
            "etcdserver: too large lease TTL".to_string()
        )
    );
    let r = c.lease_grant(9_000_000_000, None).await.unwrap();
    assert_eq!(r.ttl(), 9_000_000_000, "the maximum itself is fine");
    let max = r.id();

    assert_eq!(
        lease_ids(&mut c).await,
        BTreeSet::from([auto, 0x1234, short, max])
    );
    let distinct: BTreeSet<i64> = [auto, short, max].into();
    assert_eq!(distinct.len(), 3, "server-chosen IDs are distinct");
}

#[tokio::test]
async fn grant_validation() {
    let server = Server::start();
    case_grant_validation(&server.endpoint).await;
}

async fn case_attach_and_revoke(ep: &str) {
    let mut c = connect(ep).await;
    let l = grant(&mut c, 60).await;
    for (i, k) in ["a/3", "a/1", "a/4", "a/2"].iter().enumerate() {
        assert_eq!(put_with(&mut c, k, "v", l).await, i as i64 + 2);
    }
    // Overwriting without a lease detaches the key.
    assert_eq!(put_rev(&mut c, "a/4", "free").await, 6);
    assert_eq!(put_rev(&mut c, "b", "free").await, 7);
    let got = c
        .get("a/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(
        got.kvs().iter().map(|kv| kv.lease()).collect::<Vec<_>>(),
        vec![l, l, l, 0]
    );

    let (ttl, granted, attached) = ttl_of(&mut c, l).await;
    assert_eq!(granted, 60);
    assert!((55..=60).contains(&ttl), "ttl {ttl}");
    assert_eq!(
        attached,
        strs(&["a/1", "a/2", "a/3"]),
        "attached keys, sorted"
    );
    let r = c.lease_time_to_live(l, None).await.unwrap();
    assert!(r.keys().is_empty(), "keys only when asked for");
    assert_eq!(r.granted_ttl(), 60);
    assert!(lease_ids(&mut c).await.contains(&l));

    let (mut ws, id) = open(&mut c, "a/", Some(WatchOptions::new().with_prefix())).await;
    let r = c.lease_revoke(l).await.unwrap();
    assert_eq!(r.rev(), 8, "one revision for the whole revoke");
    let resp = next_resp(&mut ws).await;
    assert_eq!(resp.watch_id(), id);
    assert_eq!(
        resp.events().iter().map(ev).collect::<Vec<_>>(),
        vec![del_ev("a/1", 8), del_ev("a/2", 8), del_ev("a/3", 8)],
        "one DELETE per attached key, in one response"
    );
    assert_eq!(fence(&mut ws).await, 8);
    let got = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(got.kvs()), strs(&["a/4", "b"]));

    let (ttl, granted, attached) = ttl_of(&mut c, l).await;
    assert_eq!((ttl, granted, attached), (-1, 0, vec![]));
    assert!(!lease_ids(&mut c).await.contains(&l));
    assert_eq!(
        grpc_err(c.lease_revoke(l).await),
        (Code::NotFound, NOT_FOUND.to_string())
    );
    assert_eq!(
        grpc_err(
            c.put("a/9", "v", Some(PutOptions::new().with_lease(l)))
                .await
        ),
        (Code::NotFound, NOT_FOUND.to_string())
    );
    assert_eq!(
        grpc_err(
            c.put("a/9", "v", Some(PutOptions::new().with_lease(0x7777)))
                .await
        ),
        (Code::NotFound, NOT_FOUND.to_string())
    );
    assert_eq!(
        grpc_err(c.lease_revoke(0x7777).await),
        (Code::NotFound, NOT_FOUND.to_string())
    );
    // None of the failures wrote anything.
    assert_eq!(c.get("a/9", None).await.unwrap().rev(), 8);
}

#[tokio::test]
async fn attach_time_to_live_and_revoke() {
    let server = Server::start();
    case_attach_and_revoke(&server.endpoint).await;
}

/// Three keys on different shards, one lease with TTL 2 that nobody keeps alive: the keys go
/// in one revision, no sooner than the TTL and within 10 s.
#[tokio::test]
async fn expiry_deletes_attached_keys_in_one_revision() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &["--shards", "4"]).unwrap();
    let mut names: Vec<String> = Vec::new();
    let mut shards = BTreeSet::new();
    for i in 0..100 {
        let k = format!("x/{i}");
        if shards.insert(metastore::shard::shard_for(k.as_bytes(), 4)) {
            names.push(k);
        }
        if names.len() == 3 {
            break;
        }
    }
    names.sort();
    let mut c = server.client().await;
    let (mut ws, id) = open(&mut c, "x/", Some(WatchOptions::new().with_prefix())).await;
    let l = grant(&mut c, 2).await;
    let granted_at = Instant::now();
    for n in &names {
        put_with(&mut c, n, "v", l).await;
    }
    let other = grant(&mut c, 60).await;
    put_with(&mut c, "y", "other lease", other).await;
    // The three PUTs first.
    let mut puts = 0;
    while puts < 3 {
        let r = next_resp(&mut ws).await;
        puts += r.events().len();
    }
    assert_eq!(puts, 3);

    let r = tokio::time::timeout(Duration::from_secs(10), ws.message())
        .await
        .expect("the lease did not expire within 10 s")
        .unwrap()
        .unwrap();
    let elapsed = granted_at.elapsed();
    assert_eq!(r.watch_id(), id);
    let evs: Vec<_> = r.events().iter().map(ev).collect();
    let rev = evs[0].4;
    assert_eq!(
        evs,
        names.iter().map(|n| del_ev(n, rev)).collect::<Vec<_>>(),
        "all attached keys deleted in one revision, one response"
    );
    assert_eq!(rev, 6, "revisions 2..=5 were the puts");
    assert!(
        elapsed >= Duration::from_millis(1500),
        "expired after only {elapsed:?}"
    );
    assert_eq!(
        c.get(
            "x/",
            Some(GetOptions::new().with_prefix().with_count_only())
        )
        .await
        .unwrap()
        .count(),
        0
    );
    assert_eq!(ttl_of(&mut c, l).await.0, -1);
    assert!(!lease_ids(&mut c).await.contains(&l));
    assert_eq!(c.get("y", None).await.unwrap().kvs().len(), 1);
    assert_eq!(fence(&mut ws).await, 6);
}

#[tokio::test]
async fn keep_alive_holds_a_lease() {
    let server = Server::start();
    let mut c = server.client().await;
    let l = grant(&mut c, 2).await;
    put_with(&mut c, "ka", "v", l).await;
    let (mut keeper, mut stream) = c.lease_keep_alive(l).await.unwrap();
    assert_eq!(keeper.id(), l);
    // Time is the subject: 10 renewals 500 ms apart span 2.5 TTLs.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        keeper.keep_alive().await.unwrap();
        let r = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("keep-alive response")
            .unwrap()
            .expect("keep-alive stream open");
        assert_eq!((r.id(), r.ttl()), (l, 2), "renewal {i}");
    }
    assert_eq!(
        c.get("ka", None).await.unwrap().kvs().len(),
        1,
        "key survived"
    );
    let (ttl, granted, attached) = ttl_of(&mut c, l).await;
    assert!((1..=2).contains(&ttl), "ttl {ttl}");
    assert_eq!((granted, attached), (2, strs(&["ka"])));

    // Unknown lease: etcd-client turns the TTL-0 answer into its own error...
    let e = c.lease_keep_alive(0x4242).await.expect_err("unknown lease");
    assert!(
        matches!(e, etcd_client::Error::LeaseKeepAliveError(_)),
        "expected the client's lease-not-found (a TTL 0 answer), got {e:?}"
    );
    // ...and the raw stream shows the answer itself: TTL 0, not an error status.
    use metastore::proto::etcdserverpb::{lease_client::LeaseClient, LeaseKeepAliveRequest};
    let mut raw = LeaseClient::connect(format!("http://{}", server.endpoint))
        .await
        .unwrap();
    let reqs = tokio_stream::iter(vec![
        LeaseKeepAliveRequest { id: 0x4242 },
        LeaseKeepAliveRequest { id: l },
    ]);
    let mut out = raw.lease_keep_alive(reqs).await.unwrap().into_inner();
    let r1 = tokio::time::timeout(WAIT, out.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((r1.id, r1.ttl), (0x4242, 0));
    let r2 = tokio::time::timeout(WAIT, out.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((r2.id, r2.ttl), (l, 2));

    // Once renewals stop, it expires.
    drop(keeper);
    drop(stream);
    drop(out);
    wait_gone(&mut c, "ka").await;
    assert_eq!(ttl_of(&mut c, l).await.0, -1);
}

/// Waits (at most 10 s) until `key` is gone; how long that took.
async fn wait_gone(c: &mut Client, key: &str) -> Duration {
    let start = Instant::now();
    let gone = wait_until_async(Duration::from_secs(10), async || {
        c.get(key, None).await.unwrap().kvs().is_empty()
    })
    .await;
    assert!(gone, "{key} still present after 10 s");
    start.elapsed()
}

#[tokio::test]
async fn leases_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    let long = grant(&mut c, 30).await;
    put_with(&mut c, "r/1", "v", long).await;
    let short = grant(&mut c, 3).await;
    put_with(&mut c, "r/2", "v", short).await;
    drop(c);
    server.kill();

    let server = Server::try_start(dir.path(), &[]).unwrap();
    let mut c = server.client().await;
    let (ttl, granted, attached) = ttl_of(&mut c, long).await;
    assert!(ttl > 0 && ttl <= 30, "ttl {ttl}");
    assert_eq!((granted, attached), (30, strs(&["r/1"])));
    assert!(lease_ids(&mut c).await.contains(&long));
    // The short lease still expires (its deadline restarted, at most a full TTL).
    let waited = wait_gone(&mut c, "r/2").await;
    assert!(waited <= Duration::from_secs(10));
    assert_eq!(ttl_of(&mut c, short).await.0, -1);
    assert_eq!(c.get("r/1", None).await.unwrap().kvs()[0].lease(), long);
    assert_eq!(lease_ids(&mut c).await, BTreeSet::from([long]));
    // And the restarted member still revokes and grants.
    let r = c.lease_revoke(long).await.unwrap();
    assert!(r.rev() > 3);
    assert!(c
        .get("r/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .is_empty());
    grant(&mut c, 10).await;
}

/// With checkpoints every 2 s, a restart resumes from the checkpointed remaining TTL instead
/// of granting a full TTL again.
#[tokio::test]
async fn checkpointed_ttl_survives_restart() {
    let flags = [
        "--experimental-enable-lease-checkpoint",
        "--experimental-lease-checkpoint-interval",
        "2s",
    ];
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let l = grant(&mut c, 20).await;
    put_with(&mut c, "cp", "v", l).await;
    // Time is the subject: let two checkpoint intervals pass.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    drop(c);
    server.kill();

    let server = Server::try_start(dir.path(), &flags).unwrap();
    let mut c = server.client().await;
    let (ttl, granted, attached) = ttl_of(&mut c, l).await;
    assert_eq!((granted, attached), (20, strs(&["cp"])));
    assert!(
        ttl > 0 && ttl <= 18,
        "remaining TTL after restart {ttl}: the checkpoint was not used"
    );
}

#[test]
fn etcdctl_lease_commands() {
    let server = Server::start();
    let run = |args: &[&str]| ok_stdout(&server.etcdctl(args));
    let out = run(&["lease", "grant", "10"]);
    let hex = out
        .strip_prefix("lease ")
        .and_then(|s| s.strip_suffix(" granted with TTL(10s)\n"))
        .unwrap_or_else(|| panic!("unexpected grant output {out:?}"))
        .to_string();
    assert!(
        i64::from_str_radix(&hex, 16).unwrap() > 0,
        "lease ID {hex:?}"
    );
    assert_eq!(run(&["put", &format!("--lease={hex}"), "lk2", "v"]), "OK\n");
    assert_eq!(run(&["put", &format!("--lease={hex}"), "lk1", "v"]), "OK\n");

    let out = run(&["lease", "timetolive", &hex, "--keys"]);
    let want9 =
        format!("lease {hex} granted with TTL(10s), remaining(9s), attached keys([lk1 lk2])\n");
    let want10 =
        format!("lease {hex} granted with TTL(10s), remaining(10s), attached keys([lk1 lk2])\n");
    assert!(out == want9 || out == want10, "timetolive --keys: {out:?}");
    let out = run(&["lease", "timetolive", &hex]);
    assert!(
        out == format!("lease {hex} granted with TTL(10s), remaining(9s)\n")
            || out == format!("lease {hex} granted with TTL(10s), remaining(10s)\n"),
        "timetolive: {out:?}"
    );
    assert_eq!(run(&["lease", "list"]), format!("found 1 leases\n{hex}\n"));
    assert_eq!(
        run(&["lease", "keep-alive", "--once", &hex]),
        format!("lease {hex} keepalived with TTL(10)\n")
    );
    assert_eq!(
        run(&["lease", "revoke", &hex]),
        format!("lease {hex} revoked\n")
    );
    assert_eq!(run(&["get", "lk", "--prefix"]), "");
    assert_eq!(
        run(&["lease", "timetolive", &hex]),
        format!("lease {hex} already expired\n")
    );
    assert_eq!(run(&["lease", "list"]), "found 0 leases\n");
    let out = server.etcdctl(&["lease", "revoke", &hex]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(NOT_FOUND), "{stderr}");
}
