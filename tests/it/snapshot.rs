//! etcd-format snapshots: `etcdctl snapshot save` / `status` against MetaStore,
//! `metastore snapshot restore` from MetaStore's and from real etcd's snapshots, and etcd
//! 3.4 starting from a MetaStore snapshot restored with `etcdctl snapshot restore`.

use std::path::Path;
use std::process::{Command, Output};

use std::time::Duration;

use crate::harness::{etcdctl, free_port, ok_stdout, wait_until_async, Etcd, Server};

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok_stdout(out)).expect("JSON output")
}

/// `etcdctl snapshot save` into `file` against `endpoint`, as `user` (`None`: no auth).
fn save(endpoint: &str, file: &Path, user: Option<&str>) -> Output {
    let mut args = vec!["snapshot", "save"];
    let f = file.display().to_string();
    let u;
    if let Some(user) = user {
        u = format!("--user={user}");
        args.push(&u);
    }
    args.push(&f);
    etcdctl(endpoint, &args, None)
}

/// `etcdctl snapshot status -w json FILE`.
fn status(file: &Path) -> serde_json::Value {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(file)
        .output()
        .expect("etcdctl");
    json(&out)
}

/// `metastore snapshot restore FILE --data-dir DIR ...` as member `name` alone, with peer
/// URL `http://127.0.0.1:<peer>`.
fn metastore_restore(file: &Path, dir: &Path, name: &str, peer: u16, extra: &[&str]) -> Output {
    let purl = format!("http://127.0.0.1:{peer}");
    Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .args(["--name", name])
        .args(["--initial-cluster", &format!("{name}={purl}")])
        .args(["--initial-cluster-token", "restored"])
        .args(["--initial-advertise-peer-urls", &purl])
        .args(extra)
        .output()
        .expect("run metastore")
}

/// Starts MetaStore on a restored data directory as member `name` with peer port `peer`.
fn start_restored(dir: &Path, name: &str, peer: u16) -> Server {
    let purl = format!("http://127.0.0.1:{peer}");
    Server::try_start(
        dir,
        &[
            "--name",
            name,
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
            "--initial-cluster",
            &format!("{name}={purl}"),
        ],
    )
    .expect("restored member starts")
}

fn etcd_installed() -> bool {
    Path::new("/usr/bin/etcd").exists()
}

/// Writes history a restore must keep: two versions of `foo`, a deleted key, a compaction,
/// a key under a lease. Returns the lease ID (hex) and the revision.
fn write_history(endpoint: &str, user: &[&str]) -> (String, i64) {
    let ctl = |args: &[&str]| {
        let all: Vec<&str> = user.iter().chain(args).copied().collect();
        ok_stdout(&etcdctl(endpoint, &all, None))
    };
    ctl(&["put", "foo", "bar"]);
    ctl(&["put", "foo", "bar2"]);
    ctl(&["put", "gone", "x"]);
    ctl(&["del", "gone"]);
    for i in 0..5 {
        ctl(&["put", &format!("k{i}"), &format!("v{i}")]);
    }
    let lease = ctl(&["lease", "grant", "600"]);
    let lease = lease
        .split_whitespace()
        .nth(1)
        .expect("lease ID")
        .to_string();
    ctl(&["put", "leased", "y", &format!("--lease={lease}")]);
    ctl(&["compact", "3"]);
    let all: Vec<&str> = user
        .iter()
        .chain(&["get", "foo", "-w", "json"])
        .copied()
        .collect();
    let rev = json(&etcdctl(endpoint, &all, None))["header"]["revision"]
        .as_i64()
        .unwrap();
    (lease, rev)
}

/// Checks what [`write_history`] wrote, through `endpoint`.
fn check_history(endpoint: &str, user: &[&str], lease: &str, rev: i64) {
    let get = |args: &[&str]| {
        let all: Vec<&str> = user.iter().chain(args).copied().collect();
        json(&etcdctl(endpoint, &all, None))
    };
    let got = get(&["get", "foo", "-w", "json"]);
    assert_eq!(got["header"]["revision"].as_i64(), Some(rev), "{got}");
    let kv = &got["kvs"][0];
    assert_eq!(kv["value"], "YmFyMg=="); // bar2
    assert_eq!(kv["create_revision"], 2);
    assert_eq!(kv["mod_revision"], 3);
    assert_eq!(kv["version"], 2);
    // History from the compaction revision on is there; below it is compacted.
    let at3 = get(&["get", "foo", "--rev=3", "-w", "json"]);
    assert_eq!(at3["kvs"][0]["value"], "YmFyMg==");
    let gone = get(&["get", "gone", "--rev=4", "-w", "json"]);
    assert_eq!(gone["kvs"][0]["value"], "eA==", "{gone}"); // x
    let all: Vec<&str> = user
        .iter()
        .chain(&["get", "foo", "--rev=2"])
        .copied()
        .collect();
    let old = etcdctl(endpoint, &all, None);
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("compacted"),
        "{old:?}"
    );
    let keys = get(&["get", "", "--prefix", "--keys-only", "-w", "json"]);
    assert_eq!(keys["count"], 7, "{keys}");
    let ttl = get(&["lease", "timetolive", lease, "--keys", "-w", "json"]);
    assert_eq!(ttl["granted-ttl"], 600, "{ttl}");
    assert!(ttl["ttl"].as_i64().unwrap() > 0, "{ttl}");
    assert_eq!(ttl["keys"][0], "bGVhc2Vk", "{ttl}"); // leased
}

#[test]
fn save_and_status_through_etcdctl() {
    let server = Server::start();
    let (_, rev) = write_history(&server.endpoint, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    ok_stdout(&save(&server.endpoint, &file, None));
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(size % 512, 32, "bbolt pages plus the sha256");
    let st = status(&file);
    assert_eq!(st["revision"].as_i64(), Some(rev), "{st}");
    assert!(st["totalKey"].as_i64().unwrap() > 7, "{st}");
    assert!(st["hash"].as_u64().unwrap() > 0, "{st}");
    assert!(st["totalSize"].as_u64().unwrap() >= 4096, "{st}");
}

#[test]
fn snapshot_is_root_only_with_auth() {
    let server = Server::start();
    for args in [
        vec!["user", "add", "root:rootpw"],
        vec!["user", "grant-role", "root", "root"],
        vec!["user", "add", "alice:alicepw"],
        vec!["auth", "enable"],
    ] {
        ok_stdout(&server.etcdctl(&args));
    }
    let dir = tempfile::tempdir().unwrap();
    let denied = save(
        &server.endpoint,
        &dir.path().join("a.db"),
        Some("alice:alicepw"),
    );
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("permission denied"),
        "{denied:?}"
    );
    ok_stdout(&save(
        &server.endpoint,
        &dir.path().join("r.db"),
        Some("root:rootpw"),
    ));
}

#[test]
fn restore_metastore_snapshot_into_metastore() {
    let server = Server::start();
    let (lease, rev) = write_history(&server.endpoint, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    ok_stdout(&save(&server.endpoint, &file, None));
    drop(server);

    // A damaged file fails the hash check, as in etcdctl.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[5000] ^= 0xff;
    let bad = dir.path().join("bad.db");
    std::fs::write(&bad, &bytes).unwrap();
    let out = metastore_restore(&bad, &dir.path().join("x"), "m", free_port(), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected sha256"),
        "{out:?}"
    );

    let peer = free_port();
    let data = dir.path().join("restored");
    let out = metastore_restore(&file, &data, "m", peer, &[]);
    assert!(out.status.success(), "{out:?}");
    // An existing data directory is refused.
    let again = metastore_restore(&file, &data, "m", peer, &[]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("exists"),
        "{again:?}"
    );

    let restored = start_restored(&data, "m", peer);
    check_history(&restored.endpoint, &[], &lease, rev);
    // It takes writes after the snapshot's revision.
    let put = json(&restored.etcdctl(&["put", "after", "z", "-w", "json"]));
    assert_eq!(put["header"]["revision"].as_i64(), Some(rev + 1));
}

/// A snapshot taken while a client keeps writing holds exactly the writes up to its
/// revision. The shards export their keys beside the writes that follow (off the Raft thread,
/// which goes on applying), each answering from its queue at the point the image was asked
/// for, so the image is the state at one index: nothing after it, nothing before it missing.
#[tokio::test]
async fn a_snapshot_taken_under_writes_holds_exactly_the_writes_up_to_its_revision() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let server = Server::start();
    let mut c = server.client().await;
    // Some bulk for the shards to export while the writer goes on.
    for i in 0..200 {
        c.put(format!("bulk/{i:04}"), vec![7u8; 1024], None)
            .await
            .unwrap();
    }
    let base = c
        .get("bulk/0000", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (stop, written) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let writer = {
        let (stop, written, mut c) = (stop.clone(), written.clone(), c.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let put = c.put(format!("w/{i:06}"), "v", None).await.unwrap();
                assert_eq!(put.header().unwrap().revision(), base + 1 + i as i64);
                i += 1;
                written.store(i, Ordering::Relaxed);
            }
        })
    };
    let wrote_more = |than: usize| {
        let written = written.clone();
        async move {
            let more = wait_until_async(Duration::from_secs(20), async || {
                written.load(Ordering::Relaxed) >= than + 20
            })
            .await;
            assert!(more, "the writer keeps writing");
        }
    };
    wrote_more(0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    let (endpoint, f) = (server.endpoint.clone(), file.clone());
    let saved = tokio::task::spawn_blocking(move || save(&endpoint, &f, None))
        .await
        .unwrap();
    ok_stdout(&saved);
    let rev = status(&file)["revision"].as_i64().expect("revision");
    // Writes went on after the snapshot's point too: the test saw both sides of it.
    wrote_more((rev - base) as usize).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(rev > base, "the snapshot came after some of the writes");
    drop(server);

    let peer = free_port();
    let data = dir.path().join("restored");
    let out = metastore_restore(&file, &data, "m", peer, &[]);
    assert!(out.status.success(), "{out:?}");
    let restored = start_restored(&data, "m", peer);
    let mut r = restored.client().await;
    let got = r
        .get("w/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let keys: Vec<String> = got
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = (0..(rev - base) as usize)
        .map(|i| format!("w/{i:06}"))
        .collect();
    assert_eq!(keys, expected, "exactly the writes through revision {rev}");
    assert!(got.kvs().iter().all(|kv| kv.mod_revision() <= rev));
    let bulk = r
        .get(
            "bulk/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(bulk.count(), 200);
}

#[test]
fn restore_etcd_snapshot_into_metastore() {
    if !etcd_installed() {
        eprintln!("skipped: /usr/bin/etcd is not installed");
        return;
    }
    let etcd = Etcd::start();
    let (lease, rev) = write_history(&etcd.endpoint, &[]);
    for args in [
        vec!["user", "add", "root:rootpw"],
        vec!["user", "grant-role", "root", "root"],
        vec!["user", "add", "alice:alicepw"],
        vec!["role", "add", "r"],
        vec!["role", "grant-permission", "r", "read", "foo"],
        vec!["user", "grant-role", "alice", "r"],
        vec!["auth", "enable"],
    ] {
        ok_stdout(&etcdctl(&etcd.endpoint, &args, None));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.db");
    ok_stdout(&save(&etcd.endpoint, &file, Some("root:rootpw")));
    drop(etcd);

    let peer = free_port();
    let data = dir.path().join("restored");
    let out = metastore_restore(&file, &data, "m", peer, &[]);
    assert!(out.status.success(), "{out:?}");
    let restored = start_restored(&data, "m", peer);
    check_history(&restored.endpoint, &["--user=root:rootpw"], &lease, rev);
    // The users, their bcrypt hashes and roles came along, and auth is on.
    let alice = ok_stdout(&restored.etcdctl(&["--user=alice:alicepw", "get", "foo"]));
    assert_eq!(alice, "foo\nbar2\n");
    let denied = restored.etcdctl(&["--user=alice:alicepw", "get", "k1"]);
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("permission denied"),
        "{denied:?}"
    );
    let anonymous = restored.etcdctl(&["get", "foo"]);
    assert!(
        !anonymous.status.success(),
        "auth is enabled: {anonymous:?}"
    );
}

#[test]
fn metastore_snapshot_restored_with_etcdctl_runs_under_etcd() {
    if !etcd_installed() {
        eprintln!("skipped: /usr/bin/etcd is not installed");
        return;
    }
    let server = Server::start();
    let (lease, rev) = write_history(&server.endpoint, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    ok_stdout(&save(&server.endpoint, &file, None));
    drop(server);

    let peer = free_port();
    let purl = format!("http://127.0.0.1:{peer}");
    let data = dir.path().join("etcd-data");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "e"])
        .args(["--initial-cluster", &format!("e={purl}")])
        .args(["--initial-advertise-peer-urls", &purl])
        .output()
        .expect("etcdctl");
    assert!(out.status.success(), "{out:?}");
    let etcd = Etcd::start_in(dir, &data, "e", peer);
    check_history(&etcd.endpoint, &[], &lease, rev);
}

#[test]
fn metastore_starts_on_an_etcdctl_restored_data_dir() {
    // etcd's e2e TestIssue6361: `etcdctl snapshot restore`, then the server on its output.
    let server = Server::start();
    let (lease, rev) = write_history(&server.endpoint, &[]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    ok_stdout(&save(&server.endpoint, &file, None));
    drop(server);

    let peer = free_port();
    let purl = format!("http://127.0.0.1:{peer}");
    let data = dir.path().join("etcd-data");
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "m"])
        .args(["--initial-cluster", &format!("m={purl}")])
        .args(["--initial-cluster-token", "tok"])
        .args(["--initial-advertise-peer-urls", &purl])
        .output()
        .expect("etcdctl");
    assert!(out.status.success(), "{out:?}");
    let restored = Server::try_start(
        &data,
        &[
            "--name",
            "m",
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
            "--initial-cluster",
            &format!("m={purl}"),
            "--initial-cluster-token",
            "tok",
        ],
    )
    .expect("starts on the etcd data dir");
    check_history(&restored.endpoint, &[], &lease, rev);
    // etcd's IDs: the member ID is the one etcdctl restore computed.
    let members = json(&restored.etcdctl(&["member", "list", "-w", "json"]));
    let status = json(&restored.etcdctl(&["endpoint", "status", "-w", "json"]));
    assert_eq!(
        members["members"][0]["ID"], status[0]["Status"]["header"]["member_id"],
        "{members} {status}"
    );
    assert!(data.join("member.etcd").join("snap").join("db").exists());
}

#[test]
fn metastore_takes_over_a_stopped_etcd_data_dir() {
    if !etcd_installed() {
        eprintln!("skipped: /usr/bin/etcd is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("etcd-data");
    let peer = free_port();
    let etcd = Etcd::start_in(tempfile::tempdir().unwrap(), &data, "e", peer);
    let (lease, rev) = write_history(&etcd.endpoint, &[]);
    // etcd commits its backend every 100 ms; nothing a client sees says it has, so this
    // sleep stays (a generous margin over the interval).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    drop(etcd);

    let purl = format!("http://127.0.0.1:{peer}");
    let ms = Server::try_start(
        &data,
        &[
            "--name",
            "e",
            "--listen-peer-urls",
            &purl,
            "--initial-advertise-peer-urls",
            &purl,
            "--initial-cluster",
            &format!("e={purl}"),
        ],
    )
    .expect("starts on the etcd data dir");
    check_history(&ms.endpoint, &[], &lease, rev);
}
