//! The RocksDB engine beyond the shared suite (which runs against it with
//! `METASTORE_TEST_ENGINE=rocksdb`): crash consistency across shards, restart from the applied
//! index, data larger than the block cache, and the space quota.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::harness::Server;

const ROCKS: [&str; 2] = ["--storage-engine", "rocksdb"];

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    ROCKS.iter().copied().chain(extra.iter().copied()).collect()
}

/// Each writer bumps its own key: attempt n writes value n. Returns the last acknowledged n
/// per writer. Stops when `stop` is set or the server stops answering.
async fn counter_load(endpoint: String, writers: usize, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let endpoint = endpoint.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
            let mut acked = 0u64;
            for n in 1..=100_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let put = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.put(format!("ctr/{w}"), n.to_string(), None),
                );
                match put.await {
                    Ok(Ok(_)) => acked = n,
                    _ => break,
                }
            }
            acked
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// After a restart every acknowledged write is there, and no entry was applied twice: each
/// key's version equals the attempt number it holds (a re-applied put would bump the version
/// past the value).
async fn check_counters(server: &Server, acked: &[u64]) {
    let mut c = server.client().await;
    for (w, &n) in acked.iter().enumerate() {
        let got = c.get(format!("ctr/{w}"), None).await.unwrap();
        let kv = &got.kvs()[0];
        let value: u64 = kv.value_str().unwrap().parse().unwrap();
        assert!(value >= n, "writer {w}: acknowledged {n}, found {value}");
        assert!(
            value <= n + 1,
            "writer {w}: only one unacknowledged write can be in flight"
        );
        assert_eq!(
            kv.version() as u64,
            value,
            "writer {w}: version must equal the attempt count"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_shard_flushes_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    // Shard 1 aborts the process just before persisting its 300th barrier, possibly after
    // shard 0 persisted the same one: the two shards then hold different applied indexes.
    let env = [("FAILPOINTS", "shard-before-flush=300*off->return(1)")];
    let mut server = Server::try_start_with_env(dir.path(), &flags(&[]), &env).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = counter_load(server.endpoint.clone(), 4, stop).await;
    assert!(
        server.wait_exit(Duration::from_secs(10)),
        "the failpoint should have stopped the server"
    );
    assert!(
        acked.iter().sum::<u64>() > 0,
        "writes were acknowledged before the crash"
    );
    drop(server);

    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    // Shard 0 persisted a barrier shard 1 never did: recovery starts from shard 1's index and
    // shard 0 skips what it already holds.
    let (index, replay_until) = recovered_indexes(&server);
    assert!(
        replay_until > index,
        "expected shards at different indexes: {index} vs {replay_until}"
    );
    check_counters(&server, &acked).await;
}

/// (index, replay_until) from the server's "recovered state machine" log line.
fn recovered_indexes(server: &Server) -> (u64, u64) {
    let line = server
        .startup_log
        .lines()
        .find(|l| l.contains("recovered state machine"))
        .expect("recovery line");
    let field = |name: &str| -> u64 {
        let pat = format!("{name}=");
        line.split(&pat)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (field(" index"), field("replay_until"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_write_load_then_resume_from_applied_index() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(counter_load(server.endpoint.clone(), 4, stop.clone()));
    // Let the load run until a few hundred writes are acknowledged, then kill mid-stream.
    let mut c = server.client().await;
    for _ in 0..200 {
        let rev = c
            .get("ctr/0", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        if rev > 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    let acked = load.await.unwrap();
    assert!(acked.iter().sum::<u64>() > 100);

    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    // The state machine resumed from its applied index instead of replaying the whole log.
    let (index, _) = recovered_indexes(&server);
    assert!(index > 100, "resumed from index {index}");
    check_counters(&server, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_larger_than_the_block_cache_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let small = [
        "--rocksdb-block-cache-bytes",
        "1048576",
        "--rocksdb-write-buffer-bytes",
        "1048576",
    ];
    let server = Server::try_start(dir.path(), &flags(&small)).unwrap();
    let value = |i: usize| format!("{i:06}-{}", "x".repeat(2000));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let endpoint = server.endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
            for i in (t..8000).step_by(4) {
                c.put(format!("big/{i:06}"), value(i), None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // ~16 MB of values against a 1 MiB cache per shard; restart so reads come from SST files.
    server.kill();
    let server = Server::try_start(dir.path(), &flags(&small)).unwrap();
    let mut c = server.client().await;
    let count = c
        .get(
            "big/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(count.count(), 8000);
    for i in (0..8000).step_by(97) {
        let got = c.get(format!("big/{i:06}"), None).await.unwrap();
        assert_eq!(got.kvs()[0].value_str().unwrap(), value(i));
    }
    let page = c
        .get(
            "big/",
            Some(GetOptions::new().with_prefix().with_limit(500)),
        )
        .await
        .unwrap();
    assert_eq!(page.kvs().len(), 500);
    assert!(page.more());
    assert_eq!(page.kvs()[499].key_str().unwrap(), "big/000499");
}

#[tokio::test]
async fn quota_raises_nospace_until_compacted_and_disarmed() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::try_start(dir.path(), &flags(&["--quota-backend-bytes", "300000"])).unwrap();
    let mut c = server.client().await;
    let value = "q".repeat(8000);
    let mut last = 0;
    let mut refused = None;
    for _ in 0..200 {
        match c.put("quota", value.clone(), None).await {
            Ok(r) => last = r.header().unwrap().revision(),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("the quota must stop writes");
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    // Reads go on, and the alarm is listed.
    assert_eq!(c.get("quota", None).await.unwrap().kvs().len(), 1);
    let alarms = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(alarms.alarms().len(), 1);
    // Compact away the history, defragment, disarm: writes are accepted again.
    c.compact(
        last,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    c.defragment().await.unwrap();
    let status = c.status().await.unwrap();
    assert!(
        status.db_size() < 300000,
        "defragment should shrink the backend: {}",
        status.db_size()
    );
    c.alarm(
        etcd_client::AlarmAction::Deactivate,
        etcd_client::AlarmType::Nospace,
        None,
    )
    .await
    .unwrap();
    c.put("quota", "small", None).await.unwrap();
}

#[tokio::test]
async fn snapshots_are_rocksdb_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&["--snapshot-count", "50"])).unwrap();
    let mut c = server.client().await;
    for i in 0..200 {
        c.put(format!("cp/{i:03}"), "v", None).await.unwrap();
    }
    let snap_dir = dir.path().join("member").join("snap");
    let checkpoints: Vec<_> = std::fs::read_dir(&snap_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "older checkpoints are removed: {checkpoints:?}"
    );
    for shard in 0..2 {
        let current = checkpoints[0].join(shard.to_string()).join("CURRENT");
        assert!(
            current.exists(),
            "{} is a RocksDB checkpoint",
            current.display()
        );
    }
    // A checkpoint opens as a database holding the keys of its shard.
    drop(server);
}
