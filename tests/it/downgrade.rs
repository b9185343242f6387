//! Maintenance.Downgrade answers as etcd 3.5 (`server/etcdserver/v3_server.go` `Downgrade`)
//! for a cluster whose members all run 3.5: VALIDATE and ENABLE accept only "3.4" (one minor
//! below the cluster version "3.5.0"), with etcd's exact statuses otherwise; the downgrade
//! state is replicated (ENABLE on one member, CANCEL on another) and survives restarts.

use std::time::Duration;

use etcd_client::{Client, DowngradeOptions, Error};
use tonic::Code;

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{Cluster, Server};

/// Sends one Downgrade request; the cluster version answered, or the gRPC status.
async fn downgrade(c: &mut Client, options: DowngradeOptions) -> Result<String, (Code, String)> {
    match c.maintenance_client().downgrade(options).await {
        Ok(r) => {
            assert!(r.header().is_some(), "etcd fills the header");
            Ok(r.version().to_string())
        }
        Err(Error::GRpcStatus(s)) => Err((s.code(), s.message().to_string())),
        Err(e) => panic!("not a gRPC status: {e}"),
    }
}

fn validate(v: &str) -> DowngradeOptions {
    DowngradeOptions::Validate(v.to_string())
}

fn enable(v: &str) -> DowngradeOptions {
    DowngradeOptions::Enable(v.to_string())
}

const IN_PROCESS: (Code, &str) = (
    Code::FailedPrecondition,
    "etcdserver: cluster has a downgrade job in progress",
);
const NO_INFLIGHT: (Code, &str) = (
    Code::FailedPrecondition,
    "etcdserver: no inflight downgrade job",
);

fn err(e: (Code, &str)) -> Result<String, (Code, String)> {
    Err((e.0, e.1.to_string()))
}

fn ok() -> Result<String, (Code, String)> {
    Ok("3.5.0".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_validate_enable_and_cancel_answer_as_etcd_3_5() {
    let server = Server::start();
    let mut c = server.client().await;
    // Validating changes nothing, and may be repeated.
    for v in ["3.4", "3.4.0", "3.4.7", "3.4.0-rc.0"] {
        assert_eq!(downgrade(&mut c, validate(v)).await, ok(), "{v}");
    }
    let invalid = (
        Code::InvalidArgument,
        "etcdserver: invalid downgrade target version",
    );
    let format = (
        Code::InvalidArgument,
        "etcdserver: wrong downgrade target version format",
    );
    for (v, want) in [
        ("3.6", invalid),
        ("3.5", invalid),
        ("2.0", invalid),
        ("3.3", invalid),
        ("4.4", invalid),
        ("abc", format),
        ("", format),
        ("v3.4", format),
        ("3.4.0.0", format),
    ] {
        assert_eq!(
            downgrade(&mut c, validate(v)).await,
            err(want),
            "validate {v:?}"
        );
        assert_eq!(
            downgrade(&mut c, enable(v)).await,
            err(want),
            "enable {v:?}"
        );
    }
    // Nothing was enabled by the refused requests.
    assert_eq!(
        downgrade(&mut c, DowngradeOptions::Cancel).await,
        err(NO_INFLIGHT)
    );
    assert_eq!(downgrade(&mut c, enable("3.4")).await, ok());
    // Enabled: VALIDATE and ENABLE are refused, a wrong target still first.
    assert_eq!(downgrade(&mut c, enable("3.4")).await, err(IN_PROCESS));
    assert_eq!(downgrade(&mut c, validate("3.4.0")).await, err(IN_PROCESS));
    assert_eq!(downgrade(&mut c, enable("3.6")).await, err(invalid));
    assert_eq!(downgrade(&mut c, enable("abc")).await, err(format));
    // The cluster version is unchanged: no member runs 3.4.
    let status = c.status().await.unwrap();
    assert_eq!(status.version(), "3.5.0");
    assert_eq!(downgrade(&mut c, DowngradeOptions::Cancel).await, ok());
    assert_eq!(
        downgrade(&mut c, DowngradeOptions::Cancel).await,
        err(NO_INFLIGHT)
    );
    // And it can be enabled again.
    assert_eq!(downgrade(&mut c, validate("3.4")).await, ok());
    assert_eq!(downgrade(&mut c, enable("3.4.2")).await, ok());
    assert_eq!(downgrade(&mut c, DowngradeOptions::Cancel).await, ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_unknown_action_is_etcds_unknown_method() {
    let server = Server::start();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.endpoint))
        .unwrap()
        .connect()
        .await
        .unwrap();
    use metastore::proto::etcdserverpb::{maintenance_client::MaintenanceClient, DowngradeRequest};
    let mut raw = MaintenanceClient::new(channel);
    let e = raw
        .downgrade(DowngradeRequest {
            action: 7,
            version: "3.4".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unknown, "etcdserver: unknown method")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_enabled_on_one_member_is_cancelled_on_another() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cluster = Cluster::start(3, &["--snapshot-count", "5"]).await;
    let mut c: Vec<Client> = Vec::new();
    for i in 0..3 {
        c.push(cluster.client(i).await);
    }
    assert_eq!(downgrade(&mut c[0], enable("3.4")).await, ok());
    // Every member sees it at once: Downgrade reads linearizably.
    for (i, client) in c.iter_mut().enumerate() {
        assert_eq!(
            downgrade(client, validate("3.4")).await,
            err(IN_PROCESS),
            "member {i}"
        );
    }
    // Enough entries for snapshots, then a member restarts and finds it in its snapshot.
    for i in 0..12 {
        c[1].put(format!("k{i}"), "v", None).await.unwrap();
    }
    cluster.kill(2);
    cluster.restart(2);
    c[2] = cluster.client(2).await;
    cluster.wait_for_leader(Duration::from_secs(10)).await;
    assert_eq!(downgrade(&mut c[2], enable("3.4")).await, err(IN_PROCESS));
    assert_eq!(downgrade(&mut c[1], DowngradeOptions::Cancel).await, ok());
    for (i, client) in c.iter_mut().enumerate() {
        assert_eq!(
            downgrade(client, DowngradeOptions::Cancel).await,
            err(NO_INFLIGHT),
            "member {i}"
        );
    }
    assert_eq!(downgrade(&mut c[2], enable("3.4")).await, ok());
    assert_eq!(downgrade(&mut c[0], DowngradeOptions::Cancel).await, ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_state_survives_a_restart_from_the_wal_and_from_a_snapshot() {
    // The memory engine replays the WAL or restores the snapshot; RocksDB shards already hold
    // the entries, and the dispatcher replays only the replicated tables from the WAL after
    // the snapshot (none without --snapshot-count).
    let rocks = ["--storage-engine", "rocksdb"];
    let rocks_snap = ["--storage-engine", "rocksdb", "--snapshot-count", "3"];
    let setups: [&[&str]; 4] = [&[], &["--snapshot-count", "3"], &rocks, &rocks_snap];
    for flags in setups {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::try_start(dir.path(), flags).unwrap();
        let mut c = server.client().await;
        assert_eq!(downgrade(&mut c, enable("3.4")).await, ok(), "{flags:?}");
        // With --snapshot-count 3, the downgrade entry ends up in a snapshot.
        for i in 0..8 {
            c.put(format!("k{i}"), "v", None).await.unwrap();
        }
        drop(c);
        server.kill();
        let server = Server::try_start(dir.path(), flags).unwrap();
        let mut c = server.client().await;
        assert_eq!(
            downgrade(&mut c, validate("3.4")).await,
            err(IN_PROCESS),
            "{flags:?}"
        );
        // Recovered from a snapshot, the state is logged with etcd's words (where etcd 3.5
        // would stop: this member does not run 3.4).
        if flags.contains(&"--snapshot-count") {
            assert!(
                server.wait_log(
                    "invalid downgrade; server version is not allowed to join when downgrade is enabled",
                    Duration::from_secs(5)
                ),
                "{flags:?}: {}",
                server.log_tail(30)
            );
        }
        assert_eq!(
            downgrade(&mut c, DowngradeOptions::Cancel).await,
            ok(),
            "{flags:?}"
        );
        drop(c);
        // Cancelled, after a restart too.
        drop(server);
        let server = Server::try_start(dir.path(), flags).unwrap();
        let mut c = server.client().await;
        assert_eq!(
            downgrade(&mut c, DowngradeOptions::Cancel).await,
            err(NO_INFLIGHT),
            "{flags:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_through_the_json_gateway() {
    let server = Server::start();
    let url = format!("http://{}/v3/maintenance/downgrade", server.endpoint);
    let post = |body: &str| crate::harness::curl(&url, &["-X", "POST", "-d", body]);
    let a = post(r#"{"action":"ENABLE","version":"3.4"}"#);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["version"], "3.5.0");
    let a = post(r#"{"action":"VALIDATE","version":"3.4"}"#);
    assert_eq!(
        a.body,
        r#"{"error":"etcdserver: cluster has a downgrade job in progress","message":"etcdserver: cluster has a downgrade job in progress","code":9}"#
    );
    let a = post(r#"{"action":"CANCEL"}"#);
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["version"], "3.5.0");
}
