//! Graceful stop on SIGTERM (etcd `EtcdServer.Stop`): open watches end with "etcdserver:
//! server stopped", the process exits 0, no acknowledged write is lost, and a stopping leader
//! hands leadership over first.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{Cluster, Server};

/// Every key under `prefix`.
async fn keys_under(c: &mut etcd_client::Client, prefix: &str) -> BTreeSet<String> {
    let r = c
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("get");
    r.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

/// Puts `k/{cycle}/{writer}/{n}` until a put fails; records the acknowledged keys in `acked`.
async fn write_until_error(
    mut c: etcd_client::Client,
    cycle: usize,
    writer: usize,
    acked: Arc<Mutex<Vec<String>>>,
) {
    for n in 0.. {
        let key = format!("k/{cycle:02}/{writer}/{n:06}");
        let put = tokio::time::timeout(Duration::from_secs(10), c.put(key.as_str(), "v", None));
        match put.await {
            Ok(Ok(_)) => acked.lock().unwrap().push(key),
            _ => return,
        }
    }
}

/// A watcher on a prefix and two writers, then SIGTERM: the watch ends with etcd's "server
/// stopped" status (not a transport error), the process exits 0, and after a restart every
/// acknowledged put is there. Repeated over many stop-restart cycles under writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_watches_and_loses_no_acknowledged_put() {
    const CYCLES: usize = 12;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("m");
    let mut acked: BTreeSet<String> = BTreeSet::new();
    for cycle in 0..=CYCLES {
        let mut server = Server::try_start(&dir, &[]).expect("server starts");
        let mut c = server.client().await;
        let have = keys_under(&mut c, "k/").await;
        let missing: Vec<&String> = acked.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: {} acknowledged puts missing after a graceful stop, e.g. {:?}",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        if cycle == CYCLES {
            break;
        }
        let mut stream = c
            .watch("k/", Some(WatchOptions::new().with_prefix()))
            .await
            .expect("watch");
        // A keep-alive stream, renewed once: it too ends with "server stopped".
        let lease = c.lease_grant(60, None).await.expect("grant").id();
        let (mut keeper, mut keep_alives) = c.lease_keep_alive(lease).await.expect("keep-alive");
        keeper.keep_alive().await.expect("renew");
        let renewed = keep_alives.message().await.expect("renewal").expect("open");
        assert_eq!(renewed.id(), lease);
        let written = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..2)
            .map(|w| tokio::spawn(write_until_error(c.clone(), cycle, w, written.clone())))
            .collect();
        // Not waiting for a state: the writers run a moment, so that SIGTERM lands mid-load.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.terminate();
        // The watch delivers events until the member stops, then etcd's error.
        let mut events = 0;
        let ended = loop {
            let msg = tokio::time::timeout(Duration::from_secs(15), stream.message())
                .await
                .expect("the watch stream ends within 15 s of SIGTERM");
            match msg {
                Ok(Some(resp)) => events += resp.events().len(),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        match ended {
            Some(etcd_client::Error::GRpcStatus(s)) => assert_eq!(
                (s.code(), s.message()),
                (tonic::Code::Unavailable, "etcdserver: server stopped"),
                "cycle {cycle}: the watch ended with another status\n{}",
                server.log()
            ),
            other => panic!(
                "cycle {cycle}: the watch ended with {other:?}, not \"etcdserver: server \
                 stopped\"\n{}",
                server.log()
            ),
        }
        let keep_alive_end = tokio::time::timeout(Duration::from_secs(15), keep_alives.message())
            .await
            .expect("the keep-alive stream ends within 15 s of SIGTERM");
        match keep_alive_end {
            Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(
                (s.code(), s.message()),
                (tonic::Code::Unavailable, "etcdserver: server stopped"),
                "cycle {cycle}: the keep-alive stream ended with another status"
            ),
            other => panic!(
                "cycle {cycle}: the keep-alive stream ended with {other:?}, not \"etcdserver: \
                 server stopped\""
            ),
        }
        let status = server.wait_status(Duration::from_secs(20));
        assert!(
            status.is_some_and(|s| s.success()),
            "cycle {cycle}: exit {status:?} after SIGTERM\n{}",
            server.log()
        );
        for w in writers {
            w.await.expect("writer");
        }
        let written = std::mem::take(&mut *written.lock().unwrap());
        assert!(
            !written.is_empty(),
            "cycle {cycle}: no put acknowledged before SIGTERM"
        );
        assert!(events > 0, "cycle {cycle}: the watcher saw no event");
        let log = server.log();
        assert!(log.contains("received SIGTERM"), "{log}");
        for step in [
            "stopping: no new client requests",
            "stopping: client requests in flight answered",
            "raft thread stopped",
            "stopped",
        ] {
            assert!(
                log.contains(step),
                "cycle {cycle}: no {step:?} in the log\n{log}"
            );
        }
        acked.extend(written);
    }
    assert!(
        acked.len() > CYCLES,
        "only {} puts acknowledged",
        acked.len()
    );
}

/// SIGTERM to the leader of three members: it hands leadership to another voter before it
/// stops (etcd `TransferLeadership`), so one of the other two leads, and the stopped member
/// exits 0 and says it transferred leadership.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_leader_transfers_leadership_first() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let mut c = cluster.client(leader).await;
    c.put("before-stop", "v", None).await.expect("put");
    let mut server = cluster.servers[leader].take().expect("leader runs");
    server.terminate();
    let status = server.wait_status(Duration::from_secs(30));
    let log = server.log();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after SIGTERM\n{log}"
    );
    assert!(
        log.contains("stopping: transferred leadership"),
        "the stopped leader did not say it transferred leadership\n{log}"
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let new_leader = cluster
        .wait_for_leader_among(&others, Duration::from_secs(20))
        .await;
    assert_ne!(new_leader, leader);
    let mut c = cluster.client(new_leader).await;
    c.put("after-stop", "v", None)
        .await
        .expect("the two others take writes");
    let r = c.get("before-stop", None).await.expect("get");
    assert_eq!(r.kvs().len(), 1);
}

/// The SST files in every shard database of the member whose data directory is `dir`.
fn shard_sst_files(dir: &std::path::Path) -> Vec<usize> {
    let shards = dir.join("member").join("shards");
    let mut counts = Vec::new();
    for shard in 0.. {
        let Ok(files) = std::fs::read_dir(shards.join(shard.to_string())) else {
            break;
        };
        counts.push(
            files
                .filter(|f| {
                    f.as_ref()
                        .is_ok_and(|f| f.path().extension() == Some("sst".as_ref()))
                })
                .count(),
        );
    }
    counts
}

/// SIGTERM on each storage engine, over a few stop-restart cycles under writes: the member
/// flushes and closes its shards' engines and joins their threads before it exits (it says
/// so, before "stopped"), exits 0 (a RocksDB database torn down by the process exit aborted
/// it), and finds every acknowledged put after the restart. On RocksDB the flush put what the
/// memtables held into SST files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_closes_the_shards_on_each_engine() {
    const CYCLES: usize = 3;
    for engine in ["memory", "rocksdb"] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("m");
        let mut acked: BTreeSet<String> = BTreeSet::new();
        for cycle in 0..=CYCLES {
            let extra = ["--storage-engine", engine];
            let mut server = Server::try_start(&dir, &extra).expect("server starts");
            let mut c = server.client().await;
            let have = keys_under(&mut c, "k/").await;
            let missing: Vec<&String> = acked.difference(&have).collect();
            assert!(
                missing.is_empty(),
                "{engine}, cycle {cycle}: {} acknowledged puts missing after a restart, e.g. \
                 {:?}",
                missing.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            );
            if cycle == CYCLES {
                break;
            }
            for n in 0..50 {
                let key = format!("k/{cycle:02}/{n:03}");
                c.put(key.as_str(), "v", None).await.expect("put");
                acked.insert(key);
            }
            // And writes still coming when SIGTERM lands.
            let written = Arc::new(Mutex::new(Vec::new()));
            let writer = tokio::spawn(write_until_error(c.clone(), cycle, 1, written.clone()));
            tokio::time::sleep(Duration::from_millis(200)).await;
            server.terminate();
            let status = server.wait_status(Duration::from_secs(30));
            let log = server.log();
            assert!(
                status.is_some_and(|s| s.success()),
                "{engine}, cycle {cycle}: exit {status:?} after SIGTERM\n{log}"
            );
            writer.await.expect("writer");
            acked.extend(std::mem::take(&mut *written.lock().unwrap()));
            let closed = log
                .find("stopping: shards flushed and closed")
                .unwrap_or_else(|| {
                    panic!("{engine}, cycle {cycle}: the shards were not closed\n{log}")
                });
            assert!(
                log[closed..].contains("stopped"),
                "{engine}, cycle {cycle}: \"stopped\" before the shards were closed\n{log}"
            );
            assert!(
                !log.contains("did not close cleanly"),
                "{engine}, cycle {cycle}: a shard did not close cleanly\n{log}"
            );
            if engine == "rocksdb" {
                let sst = shard_sst_files(&dir);
                assert!(
                    sst.len() == 2 && sst.iter().all(|&n| n > 0),
                    "{engine}, cycle {cycle}: SST files per shard after the stop: {sst:?}"
                );
            }
        }
    }
}
