//! The RocksDB engine beyond the shared suite (which runs against it with
//! `METASTORE_TEST_ENGINE=rocksdb`): crash consistency across shards, restart from the applied
//! index, data larger than the block cache, the space quota, and damaged or misplaced shard
//! databases, which stop the member instead of being served as if they were whole.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::harness::{exit_code_of_failed_start, wait_until, wait_until_async, Server};
use crate::util::Rev;

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
    // (At most 5 s: the kill comes then in any case.)
    wait_until_async(Duration::from_secs(5), async || {
        c.get("ctr/0", None).await.unwrap().rev() > 400
    })
    .await;
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
            Ok(r) => last = r.rev(),
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
    let member = c.status().await.unwrap().header().unwrap().member_id();
    assert_eq!(alarms.alarms()[0].member_id(), member);
    // The alarm is replicated state: it survives a restart (the WAL replays it, though the
    // shards already hold every entry).
    server.kill();
    let server =
        Server::try_start(dir.path(), &flags(&["--quota-backend-bytes", "300000"])).unwrap();
    let mut c = server.client().await;
    let alarms = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        alarms.alarms().len(),
        1,
        "after a restart, before any write"
    );
    let e = c.put("quota", "small", None).await.unwrap_err().to_string();
    assert!(e.contains("database space exceeded"), "{e}");
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
    // As etcd, DEACTIVATE clears exactly (member, type): etcdctl lists the alarms first.
    let mut mine = etcd_client::AlarmOptions::new();
    mine.with_member(member);
    c.alarm(
        etcd_client::AlarmAction::Deactivate,
        etcd_client::AlarmType::Nospace,
        Some(mine),
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
    let list = || -> Vec<PathBuf> {
        std::fs::read_dir(&snap_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "ckpt"))
            .collect()
    };
    // The Raft node saves a snapshot on a thread of its own and removes the older checkpoints
    // only once the new snapshot file is durable, so for a moment two exist.
    let single = wait_until(Duration::from_secs(10), || list().len() == 1);
    let checkpoints = list();
    assert!(single, "older checkpoints are removed: {checkpoints:?}");
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

/// `--snapshot-count` counts requests, as etcd's "committed transactions": concurrent puts
/// share Raft entries (a batch each), and counting entries let the log the Raft node keeps in
/// memory grow about 13 times longer than etcd's before a snapshot released it (a 1M-key load
/// peaked at 599 MiB RSS). Regression: 1,000 puts from 50 clients with `--snapshot-count 300`
/// took at most one snapshot before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_count_counts_requests_not_entries() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&["--snapshot-count", "300"])).unwrap();
    let mut tasks = Vec::new();
    for t in 0..50 {
        let endpoint = server.endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
            for i in 0..20 {
                c.put(format!("sc/{t:02}/{i:02}"), "v", None).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let saved = || server.log().matches("saved snapshot").count();
    // Snapshots are written on the Raft node's own thread: wait for the third.
    let three = wait_until(Duration::from_secs(10), || saved() >= 3);
    assert!(
        three,
        "{} snapshots after 1,000 puts with --snapshot-count 300; log tail:\n{}",
        saved(),
        server.log_tail(20)
    );
}

/// Puts `count` keys `{prefix}{i:05}` with [`test_value`]s, from 4 concurrent clients.
async fn put_keys(server: &Server, prefix: &str, count: usize) {
    let mut tasks = Vec::new();
    for t in 0..4 {
        let endpoint = server.endpoint.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([endpoint.as_str()], None).await.unwrap();
            for i in (t..count).step_by(4) {
                c.put(format!("{prefix}{i:05}"), test_value(i), None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A value of about 100 bytes that LZ4 cannot shrink much, so SST files are mostly data blocks.
fn test_value(i: usize) -> String {
    let mut x = i as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..6)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{x:016x}")
        })
        .collect()
}

/// `member/shards/<shard>` of a data directory.
fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir
        .join("member")
        .join("shards")
        .join(shard.to_string())
}

/// Copies a directory tree (a stopped member's shard database).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Panics unless the harness's report of a failed start shows the member exiting by itself
/// with status 1, not killed by the harness for never getting ready.
fn assert_exited_by_itself(output: &str) {
    assert_eq!(
        exit_code_of_failed_start(output),
        Some(1),
        "the member must exit by itself with status 1:\n{output}"
    );
}

/// What a start-up that must be refused printed; panics if the server started, or if it did not
/// exit by itself with status 1.
fn refused_start(data_dir: &Path) -> String {
    match Server::try_start(data_dir, &flags(&[])) {
        Ok(server) => panic!(
            "the member started on a damaged data directory:\n{}",
            server.startup_log
        ),
        Err(output) => {
            assert_exited_by_itself(&output);
            output
        }
    }
}

/// Regression (issue 11): three bytes flipped in an SST data block made the member serve the
/// keys of the intact blocks as if they were all, with nothing logged. A failed checksum must
/// stop the member with a message naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_sst_block_stops_the_member_instead_of_serving_partial_data() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    put_keys(&server, "c/", 3000).await;
    // Defragment flushes the memtables and compacts every shard: the keys are in SST files.
    server.client().await.defragment().await.unwrap();
    server.kill();

    let sst = std::fs::read_dir(shard_dir(dir.path(), 0))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("shard 0 has an SST file");
    let mut bytes = std::fs::read(&sst).unwrap();
    assert!(bytes.len() > 64 << 10, "{} holds the keys", sst.display());
    // Data blocks start at offset 0 and make up most of the file (index, filter and footer
    // come last): a third of the way in is inside a data block holding keys.
    let at = bytes.len() / 3;
    for b in &mut bytes[at..at + 3] {
        *b ^= 0xa5;
    }
    std::fs::write(&sst, &bytes).unwrap();

    let log = match Server::try_start(dir.path(), &flags(&[])) {
        // Start-up may already read the damaged block.
        Err(output) => {
            assert_exited_by_itself(&output);
            output
        }
        Ok(mut server) => {
            let mut c = server.client().await;
            let read = c.get("c/", Some(GetOptions::new().with_prefix())).await;
            if let Ok(r) = &read {
                panic!(
                    "a corrupt SST was served as a successful read of {} of 3000 keys",
                    r.kvs().len()
                );
            }
            assert!(
                server.wait_exit(Duration::from_secs(10)),
                "the member must stop on corrupt data: {:?}",
                read.err()
            );
            server.log()
        }
    };
    let path = sst.display().to_string();
    assert!(
        log.contains(&path) && log.contains("Corruption"),
        "the member must log RocksDB's Corruption error naming {path}:\n{log}"
    );
}

/// A corrupt SST block that start-up itself reads (the shard's applied state, kept in RocksDB
/// with the keys) stops the member at once, with a failure status and RocksDB's Corruption
/// naming the file. The robustness suite's long profile found a member that logged the error
/// and then waited for the broken shard for ever, until it was killed: the shard had stopped,
/// and start-up did not listen for fatal errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_sst_read_at_start_up_stops_the_member() {
    let dir = tempfile::tempdir().unwrap();
    // Two runs, each ended by a graceful stop, which flushes the memtables: each shard then
    // has an older SST file with its identity (read when the database opens) and a newer one
    // with later keys and its applied state (read once it is open), one data block each.
    for round in 0..2 {
        let mut server = Server::try_start(dir.path(), &flags(&[])).unwrap();
        put_keys(&server, &format!("s{round}/"), 8).await;
        server.terminate();
        assert!(server.wait_exit(Duration::from_secs(20)));
    }
    let sst = std::fs::read_dir(shard_dir(dir.path(), 0))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sst"))
        .max()
        .expect("shard 0 has SST files");
    let mut bytes = std::fs::read(&sst).unwrap();
    // Inside the first data block, which starts the file.
    for b in &mut bytes[8..11] {
        *b ^= 0xa5;
    }
    std::fs::write(&sst, &bytes).unwrap();

    let output = refused_start(dir.path());
    assert!(
        output.contains("Corruption") && output.contains(&sst.display().to_string()),
        "RocksDB's Corruption naming the file:\n{output}"
    );
}

/// Regression (issue 11): with `member/shards/1` deleted, RocksDB recreated it empty and the
/// member served a fraction of its keys and handed out old revisions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_shard_directory_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    put_keys(&server, "k/", 200).await;
    server.kill();

    let gone = shard_dir(dir.path(), 1);
    std::fs::remove_dir_all(&gone).unwrap();
    let err = refused_start(dir.path());
    let path = gone.display().to_string();
    assert!(
        err.contains(&format!("shard directory {path} is missing")),
        "the error names {path}: {err}"
    );
    assert!(!gone.exists(), "nothing was recreated in its place");
}

/// Shard directories swapped: each holds keys the other shard owns. Refused at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_shard_directories_stop_startup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    put_keys(&server, "k/", 200).await;
    server.kill();

    let (zero, one) = (shard_dir(dir.path(), 0), shard_dir(dir.path(), 1));
    let aside = dir.path().join("aside");
    std::fs::rename(&zero, &aside).unwrap();
    std::fs::rename(&one, &zero).unwrap();
    std::fs::rename(&aside, &one).unwrap();
    let err = refused_start(dir.path());
    let path = zero.display().to_string();
    assert!(
        err.contains(&format!("shard directory {path} holds shard 1 of 2")),
        "the error names {path} and what it holds: {err}"
    );
}

/// A shard directory replaced by an older copy of itself: the entries it lacks were released
/// from the WAL by later snapshots, so it cannot catch up. Refused rather than served stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_shard_directory_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let snap = ["--snapshot-count", "100"];
    let server = Server::try_start(dir.path(), &flags(&snap)).unwrap();
    put_keys(&server, "k/", 20).await;
    server.kill();
    let backup = tempfile::tempdir().unwrap();
    let one = shard_dir(dir.path(), 1);
    copy_dir(&one, backup.path());

    let server = Server::try_start(dir.path(), &flags(&snap)).unwrap();
    put_keys(&server, "more/", 400).await;
    server.kill();
    std::fs::remove_dir_all(&one).unwrap();
    copy_dir(backup.path(), &one);

    let err = refused_start(dir.path());
    let path = one.display().to_string();
    assert!(
        err.contains(&format!(
            "shard directory {path} has applied Raft entries only up to"
        )),
        "the error names {path}: {err}"
    );
}

/// A shard directory copied from a newer state of the same member into an older copy of its
/// data directory: the shard holds writes this WAL never had. Refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_directory_ahead_of_the_log_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    put_keys(&server, "k/", 20).await;
    server.kill();
    let old = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), old.path());

    let server = Server::try_start(dir.path(), &flags(&[])).unwrap();
    put_keys(&server, "more/", 100).await;
    server.kill();
    let one = shard_dir(old.path(), 1);
    std::fs::remove_dir_all(&one).unwrap();
    copy_dir(&shard_dir(dir.path(), 1), &one);

    let err = refused_start(old.path());
    let path = one.display().to_string();
    assert!(
        err.contains(&format!(
            "shard directory {path} has applied Raft entries up to"
        )),
        "the error names {path}: {err}"
    );
}
