//! Disaster recovery and start-up flags of etcd's "unsafe" and election groups:
//! `--force-new-cluster` (etcd 3.5 `restartAsStandaloneNode`) and
//! `--initial-election-tick-advance` (etcd 3.5 `adjustTicks`). Real processes; the cluster
//! tests take the cluster lock.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions};

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{etcdctl, ok_stdout, wait_until, Cluster, Server};
use crate::util::Rev;

/// Waits until `log()` contains `needle`; panics with the log after `timeout`.
fn wait_for_log(what: &str, log: impl Fn() -> String, needle: &str, timeout: Duration) {
    let logged = wait_until(timeout, || log().contains(needle));
    assert!(logged, "{what} never logged {needle:?}:\n{}", log());
}

/// Member IDs in member `i`'s MemberList.
async fn member_ids(c: &mut Client) -> Vec<u64> {
    let list = c.member_list().await.expect("member list");
    list.members().iter().map(|m| m.id()).collect()
}

/// Every key under `k/` as `c` reads it, with the response's revision.
async fn keys(c: &mut Client) -> (Vec<(String, String)>, i64) {
    let resp = c
        .get("k/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read keys");
    let kvs = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect();
    (kvs, resp.rev())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_restarts_a_member_alone_with_all_its_data() {
    let _one = CLUSTER_LOCK.lock().await;
    // Snapshots every 8 entries: the survivor recovers from a snapshot plus the WAL after it,
    // and the member added later catches up from a snapshot.
    let mut cluster = Cluster::start(3, &["--snapshot-count", "8"]).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let mut c = cluster.client(leader).await;
    for i in 0..20 {
        c.put(format!("k/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("k/leased", "l", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let revision = cluster.wait_converged(Duration::from_secs(20)).await;
    let (before, _) = keys(&mut c).await;
    assert_eq!(before.len(), 21);
    drop(c);
    let old_ids = cluster.ids.clone();

    // Quorum lost for good: every member stops; one restarts as a cluster of its own.
    for i in 0..3 {
        cluster.kill(i);
    }
    let survivor = (leader + 1) % 3;
    let snaps = std::fs::read_dir(cluster.data_dir(survivor).join("member/snap"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "snap")
        })
        .count();
    assert!(snaps > 0, "the survivor has a snapshot to recover from");
    cluster.set_extra(survivor, &["--snapshot-count", "8", "--force-new-cluster"]);
    cluster.restart(survivor);
    let log = cluster.servers[survivor].as_ref().unwrap().log();
    assert!(log.contains("forcing restart member"), "{log}");
    for (i, id) in old_ids.iter().enumerate() {
        if i != survivor {
            assert!(
                log.contains(&format!("{id:x}")),
                "removed {id:x} logged:\n{log}"
            );
        }
    }
    let mut c = cluster.client(survivor).await;
    assert_eq!(member_ids(&mut c).await, vec![old_ids[survivor]]);
    let (after, at) = keys(&mut c).await;
    assert_eq!(after, before, "same keys");
    assert_eq!(at, revision, "same revision");
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease survives: {ttl:?}");
    let put = c.put("k/new", "after", None).await.unwrap();
    assert_eq!(put.rev(), revision + 1);

    // The new configuration is in the log: a restart without the flag keeps it.
    cluster.kill(survivor);
    cluster.set_extra(survivor, &["--snapshot-count", "8"]);
    cluster.restart(survivor);
    let mut c = cluster.client(survivor).await;
    assert_eq!(member_ids(&mut c).await, vec![old_ids[survivor]]);
    assert_eq!(keys(&mut c).await.0.len(), 22);

    // And it grows again the usual way.
    let new = cluster.add_spec(&[]);
    let name = cluster.specs[new].name.clone();
    let peer_url = cluster.specs[new].peer_url();
    let out = etcdctl(
        &cluster.endpoint(survivor),
        &["member", "add", &name, "--peer-urls", &peer_url],
        None,
    );
    let printed = ok_stdout(&out);
    assert!(
        printed.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""),
        "{printed}"
    );
    cluster.start_added(new).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let mut on_new = cluster.client(new).await;
    let (joined, _) = keys(&mut on_new).await;
    assert_eq!(joined.len(), 22, "the new member caught up");
    let mut ids = member_ids(&mut c).await;
    ids.sort();
    let mut want = vec![old_ids[survivor], cluster.ids[new]];
    want.sort();
    assert_eq!(ids, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_on_an_empty_data_dir_starts_a_new_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(tmp.path(), &["--force-new-cluster"]).expect("starts");
    let log = server.log();
    assert!(!log.contains("forcing restart member"), "{log}");
    assert!(!log.contains("--force-new-cluster ignored"), "{log}");
    let mut c = server.client().await;
    assert_eq!(member_ids(&mut c).await.len(), 1);
    c.put("k/a", "1", None).await.unwrap();
}

/// Election settings that make the first election slow enough to see: 100 ms ticks, a 5 s
/// election timeout (50 ticks).
const SLOW_ELECTION: [&str; 4] = ["--heartbeat-interval", "100", "--election-timeout", "5000"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_election_tick_advance_fast_forwards_once_peers_are_reachable() {
    let _one = CLUSTER_LOCK.lock().await;
    let cluster = Cluster::start(3, &SLOW_ELECTION).await;
    for i in 0..3 {
        let server = cluster.servers[i].as_ref().unwrap();
        wait_for_log(
            &format!("member {i}"),
            || server.log(),
            "initialized peer connections; fast-forwarding election ticks",
            Duration::from_secs(15),
        );
        assert!(
            server.log().contains("forward_ticks=48"),
            "{}",
            server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_initial_election_tick_advance_a_cluster_waits_a_whole_election_timeout() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut flags = SLOW_ELECTION.to_vec();
    flags.push("--initial-election-tick-advance=false");
    let started = Instant::now();
    // Every member is ready only once a leader is elected.
    let cluster = Cluster::start(3, &flags).await;
    // No member may campaign before 50 ticks of 100 ms have passed since it started.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "a leader after {:?}",
        started.elapsed()
    );
    for i in 0..3 {
        let server = cluster.servers[i].as_ref().unwrap();
        wait_for_log(
            &format!("member {i}"),
            || server.log(),
            "skipping initial election tick advance",
            Duration::from_secs(15),
        );
        assert!(
            !server.log().contains("fast-forwarding"),
            "{}",
            server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_member_fast_forwards_whatever_the_tick_advance_flag() {
    // As etcd: a one-member cluster advances its election clock even with the flag off, so it
    // elects itself well within the (long) election timeout.
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let server = Server::try_start(
        tmp.path(),
        &[
            "--heartbeat-interval",
            "500",
            "--election-timeout",
            "25000",
            "--initial-election-tick-advance=false",
        ],
    )
    .expect("starts");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "ready after {:?}",
        started.elapsed()
    );
    wait_for_log(
        "the member",
        || server.log(),
        "started as single-node; fast-forwarding election ticks",
        Duration::from_secs(15),
    );
    assert!(
        server.log().contains("forward_ticks=49"),
        "{}",
        server.log()
    );
}
