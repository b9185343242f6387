//! Log lines as etcd 3.5 writes them (`--logger zap`: JSON, `--log-format console`: text),
//! `--log-level debug`, `metastore --version`, and a member whose standard error is closed.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{signal, wait_until, Server, GRACEFUL_STOP};

/// The server's log lines parsed as JSON objects; panics on a line that is not one.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

/// etcd 3.5's zap lines: `level`, `ts`, `caller`, `msg` first, kebab-case fields, the ready
/// line's message unchanged, member IDs in hexadecimal, and raft-rs's lines as sentences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_are_etcds_zap_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(&tmp.path().join("d"), &["--log-format", "json"]).unwrap();
    let mut c = server.client().await;
    c.put("k", "v", None).await.unwrap();
    let log = server.log();
    let lines = json_lines(&log);
    for line in &lines {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            ["level", "ts", "caller", "msg"]
                .iter()
                .all(|k| keys.contains(k)),
            "{line}"
        );
        assert!(
            ["debug", "info", "warn", "error"].contains(&line["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(keys.iter().all(|k| !k.contains('_')), "kebab-case: {line}");
    }
    assert!(lines
        .iter()
        .any(|l| l["msg"] == "ready to serve client requests"));
    let start = lines
        .iter()
        .find(|l| l["msg"] == "starting member")
        .expect("the start line");
    let id = start["member-id"].as_str().unwrap();
    assert!(
        id.len() > 8 && u64::from_str_radix(id, 16).is_ok(),
        "{start}"
    );
    // raft-rs's lines: raft-rs's own caller, hexadecimal IDs, no Rust debug dumps.
    let raft: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["caller"].as_str().unwrap().starts_with("raft/"))
        .collect();
    assert!(
        raft.iter()
            .any(|l| l["msg"].as_str().unwrap().contains("became leader")),
        "{log}"
    );
    let decimal = u64::from_str_radix(id, 16).unwrap().to_string();
    for l in raft {
        let msg = l["msg"].as_str().unwrap();
        assert!(!msg.contains("Configuration {"), "{msg}");
        assert!(!msg.contains(&decimal), "a decimal member ID: {msg}");
    }
    assert!(
        log.contains(&format!("voters=[{id}]")),
        "the configuration as etcd prints it: {log}"
    );
}

/// `--log-level debug` shows MetaStore's debug lines but not the HTTP/2 frames of h2 and
/// hyper underneath.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_level_is_metastores_not_its_libraries() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(&tmp.path().join("d"), &["--log-level", "debug"]).unwrap();
    let mut c = server.client().await;
    c.put("k", "v", None).await.unwrap();
    c.get("k", None).await.unwrap();
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains(" DEBUG ") && (l.contains("metastore") || l.contains("raft"))),
        "{log}"
    );
    for noisy in ["h2::", "hyper::", "tonic::", "tower::"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(" DEBUG ") && l.contains(noisy)),
            "{noisy} debug lines: {log}"
        );
    }
}

/// `metastore --version` prints etcd's lines first, then MetaStore's version.
#[test]
fn version_prints_etcds_layout() {
    let out = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("etcd Version: 3.5."), "{text}");
    assert!(lines[1].starts_with("Git SHA: "), "{text}");
    assert!(lines[2].starts_with("Rust Version: rustc "), "{text}");
    assert!(lines[3].starts_with("Go OS/Arch: linux/"), "{text}");
    assert_eq!(
        lines[4],
        format!("MetaStore Version: {}", env!("CARGO_PKG_VERSION"))
    );
}

/// Kills the child on drop, so a failed test stops what it started.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A member whose standard error is a closed pipe (a log collector that went away) keeps
/// serving, keeps writing its other `--log-outputs` target, and stops cleanly on SIGTERM.
/// tracing-subscriber used to report the failed write with `eprint!`, which panicked the
/// thread that logged: the member died at its first line, or hung when it was the Raft thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_the_member() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("etcd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_metastore"))
        .current_dir(tmp.path())
        .args([
            "--data-dir",
            "d",
            "--listen-client-urls",
            "http://127.0.0.1:0",
        ])
        .args([
            "--listen-peer-urls",
            "http://127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--log-outputs")
        .arg(format!("stderr,{}", file.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let mut child = Reap(child);
    let log = || std::fs::read_to_string(&file).unwrap_or_default();
    let ready = wait_until(Duration::from_secs(60), || {
        log().contains("ready to serve client requests")
            || child.0.try_wait().ok().flatten().is_some()
    });
    assert!(ready && child.0.try_wait().unwrap().is_none(), "{}", log());
    let address = json_lines(&log())
        .into_iter()
        .find_map(|l| {
            l["msg"]
                .as_str()?
                .strip_prefix("serving client requests on ")
                .map(str::to_string)
        })
        .expect("the client address");
    let mut c = etcd_client::Client::connect([address.as_str()], None)
        .await
        .unwrap();
    c.put("k", "v", None).await.unwrap();
    signal(child.0.id() as i32, libc::SIGTERM);
    let mut status = None;
    wait_until(GRACEFUL_STOP, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", log());
    assert!(log().contains("\"msg\":\"stopped\""), "{}", log());
}
