//! HTTP on the client port, as etcd 3.5 serves it next to gRPC: `/health`, `/livez`,
//! `/readyz`, `/version`, `/metrics`, over HTTP/1.1 and HTTP/2, plain and TLS; the
//! `--listen-metrics-urls` listener; `grpc.health.v1.Health`.

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{curl, free_port, wait_until, wait_until_async, Answer, Cluster, Server};

fn get(url: &str) -> Answer {
    curl(url, &[])
}

/// The value of the sample `name` (a full series name, labels included) in `/metrics`.
fn metric(base: &str, name: &str) -> f64 {
    let text = get(&format!("{base}/metrics")).body;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// The `# TYPE` line's type of the family `name` in `/metrics`, if listed.
fn type_of(base: &str, name: &str) -> Option<String> {
    get(&format!("{base}/metrics")).body.lines().find_map(|l| {
        let kind = l
            .strip_prefix("# TYPE ")?
            .strip_prefix(name)?
            .strip_prefix(' ')?;
        Some(kind.to_string())
    })
}

/// Polls `/metrics` until the sample `name` satisfies `ok` (10 s at most); returns its value.
fn wait_metric(base: &str, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let mut last = f64::NAN;
    let reached = wait_until(Duration::from_secs(10), || {
        last = metric(base, name);
        ok(last)
    });
    assert!(reached, "{name} stayed at {last}");
    last
}

/// Polls `url` until it answers `status` with `body`; panics with the last answer otherwise.
fn wait_for(url: &str, status: u16, body: &str, timeout: Duration) {
    let mut last = None;
    let answered = wait_until(timeout, || {
        let a = get(url);
        let ok = a.status == status && a.body == body;
        last = Some((a.status, a.body));
        ok
    });
    let (got, got_body) = last.expect("asked at least once");
    assert!(
        answered,
        "{url}: {got} {got_body:?}, want {status} {body:?}"
    );
}

async fn grpc_health(endpoint: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Health/Check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// Polls `grpc.health.v1.Health/Check` on `endpoint` until it answers `want` (5 s at most).
async fn wait_grpc_health(endpoint: &str, want: ServingStatus) {
    let mut got = None;
    let answered = wait_until_async(Duration::from_secs(5), async || {
        got = Some(grpc_health(endpoint).await);
        got == Some(want)
    })
    .await;
    assert!(answered, "gRPC health {got:?}, want {want:?}");
}

const HEALTHY: &str = r#"{"health":"true","reason":""}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_port_serves_etcds_http_endpoints_beside_grpc() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let server = Server::try_start(
        &tmp.path().join("data"),
        &[
            "--listen-metrics-urls",
            &metrics_url,
            "--metrics",
            "extensive",
        ],
    )
    .expect("server starts");
    let base = format!("http://{}", server.endpoint);

    let a = get(&format!("{base}/health"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    // HTTP/2 without gRPC's content type is HTTP too (etcd's grpcHandlerFunc).
    let a = curl(&format!("{base}/health"), &["--http2-prior-knowledge"]);
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    assert!(a.headers.starts_with("http/2 200"), "{}", a.headers);
    let a = get(&format!("{base}/health?serializable=true"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));

    let a = get(&format!("{base}/version"));
    assert_eq!(a.status, 200);
    assert_eq!(a.body, r#"{"etcdserver":"3.5.0","etcdcluster":"3.5.0"}"#);
    assert!(a.headers.contains("content-type: application/json"));

    assert_eq!(get(&format!("{base}/livez")).body, "ok\n");
    assert_eq!(
        get(&format!("{base}/livez?verbose")).body,
        "[+]serializable_read ok\nok\n"
    );
    assert_eq!(
        get(&format!("{base}/readyz?verbose")).body,
        "[+]data_corruption ok\n[+]serializable_read ok\n[+]linearizable_read ok\nok\n"
    );
    assert_eq!(
        get(&format!("{base}/readyz?verbose&exclude=serializable_read")).body,
        "[+]data_corruption ok\n[+]linearizable_read ok\nok\n"
    );
    assert_eq!(
        get(&format!("{base}/readyz/linearizable_read?verbose")).body,
        "[+]linearizable_read ok\nok\n"
    );

    let a = curl(&format!("{base}/health"), &["-X", "POST"]);
    assert_eq!((a.status, a.body.as_str()), (405, "Method Not Allowed\n"));
    assert!(a.headers.contains("allow: get"), "{}", a.headers);
    let a = get(&format!("{base}/nothing-here"));
    assert_eq!((a.status, a.body.as_str()), (404, "404 page not found\n"));

    // gRPC still works on the same port, and the counters move with it.
    let puts = metric(&base, "etcd_mvcc_put_total");
    let handled = r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#;
    let put_calls = metric(&base, handled);
    let labels = r#"{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#;
    let received = format!("grpc_server_msg_received_total{labels}");
    let sent = format!("grpc_server_msg_sent_total{labels}");
    let (put_received, put_sent) = (metric(&base, &received), metric(&base, &sent));
    let mut client = server.client().await;
    for i in 0..3 {
        client.put(format!("k{i}"), "v", None).await.unwrap();
    }
    client.delete("k0", None).await.unwrap();
    // A refused call is counted with its code (a trailers-only answer).
    let future = etcd_client::GetOptions::new().with_revision(1_000_000);
    assert!(client.get("k1", Some(future)).await.is_err());
    assert_eq!(
        metric(
            &base,
            r#"grpc_server_handled_total{grpc_code="OutOfRange",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#
        ),
        1.0
    );
    let id = client.status().await.unwrap().header().unwrap().member_id();
    assert_eq!(
        metric(&base, &format!("etcd_server_id{{server_id=\"{id:x}\"}}")),
        1.0
    );
    assert_eq!(metric(&base, "etcd_server_is_learner"), 0.0);
    assert_eq!(metric(&base, "etcd_mvcc_put_total"), puts + 3.0);
    assert_eq!(metric(&base, handled), put_calls + 3.0);
    assert_eq!(metric(&base, &received), put_received + 3.0);
    assert_eq!(metric(&base, &sent), put_sent + 3.0);
    // A watch stream: one request, then the created response and one per event.
    let mut stream = client.watch("w", None).await.unwrap();
    crate::watch::next_resp(&mut stream).await;
    client.put("w", "1", None).await.unwrap();
    client.put("w", "2", None).await.unwrap();
    let mut events = 0;
    while events < 2 {
        events += crate::watch::next_resp(&mut stream).await.events().len();
    }
    let watch =
        r#"{grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream"}"#;
    assert_eq!(
        metric(&base, &format!("grpc_server_msg_received_total{watch}")),
        1.0
    );
    assert!(metric(&base, &format!("grpc_server_msg_sent_total{watch}")) >= 2.0);
    // One stream with one watcher, gone once the client closes it.
    assert_eq!(metric(&base, "etcd_debugging_mvcc_watch_stream_total"), 1.0);
    assert_eq!(metric(&base, "etcd_debugging_mvcc_watcher_total"), 1.0);
    assert_eq!(metric(&base, "etcd_debugging_mvcc_slow_watcher_total"), 0.0);
    drop(stream);
    assert!(metric(&base, "etcd_mvcc_delete_total") >= 1.0);
    // k1, k2 and w.
    assert_eq!(metric(&base, "etcd_debugging_mvcc_keys_total"), 3.0);
    wait_metric(&base, "etcd_debugging_mvcc_watcher_total", |v| v == 0.0);
    wait_metric(&base, "etcd_debugging_mvcc_watch_stream_total", |v| {
        v == 0.0
    });
    // The harness's two shards: their keys add up to the total.
    let shard_keys: Vec<f64> = (0..2)
        .map(|i| metric(&base, &format!("metastore_shard_keys{{shard=\"{i}\"}}")))
        .collect();
    assert_eq!(shard_keys.iter().sum::<f64>(), 3.0, "{shard_keys:?}");
    for i in 0..2 {
        let depth = metric(
            &base,
            &format!("metastore_shard_apply_queue_depth{{shard=\"{i}\"}}"),
        );
        assert!(depth >= 0.0);
    }
    // Every put was fsynced in the WAL and committed by the shard that holds it.
    assert!(metric(&base, "etcd_disk_wal_fsync_duration_seconds_count") >= 6.0);
    assert!(
        metric(
            &base,
            r#"etcd_disk_wal_fsync_duration_seconds_bucket{le="8.192"}"#
        ) >= 6.0
    );
    assert!(metric(&base, "etcd_disk_backend_commit_duration_seconds_count") >= 6.0);
    for (name, kind) in [
        ("etcd_disk_wal_fsync_duration_seconds", "histogram"),
        ("etcd_disk_backend_commit_duration_seconds", "histogram"),
        ("etcd_debugging_mvcc_watcher_total", "gauge"),
        ("etcd_debugging_mvcc_watch_stream_total", "gauge"),
        ("etcd_debugging_mvcc_slow_watcher_total", "gauge"),
        ("etcd_debugging_server_lease_expired_total", "counter"),
        ("etcd_debugging_lease_granted_total", "counter"),
        ("etcd_debugging_lease_revoked_total", "counter"),
        ("etcd_debugging_lease_renewed_total", "counter"),
        ("metastore_shard_apply_queue_depth", "gauge"),
        ("metastore_shard_keys", "gauge"),
    ] {
        assert_eq!(type_of(&base, name).as_deref(), Some(kind), "{name}");
    }
    // Leases: grant, renew, revoke, and one left to expire (the minimum TTL, 2 s).
    let granted = metric(&base, "etcd_debugging_lease_granted_total");
    let lease = client.lease_grant(60, None).await.unwrap().id();
    assert_eq!(
        metric(&base, "etcd_debugging_lease_granted_total"),
        granted + 1.0
    );
    // etcd-client sends the first keep-alive, and reads its answer, itself.
    let (mut keeper, mut renewals) = client.lease_keep_alive(lease).await.unwrap();
    assert_eq!(metric(&base, "etcd_debugging_lease_renewed_total"), 1.0);
    keeper.keep_alive().await.unwrap();
    renewals.message().await.unwrap().expect("renewed");
    assert_eq!(metric(&base, "etcd_debugging_lease_renewed_total"), 2.0);
    client.lease_revoke(lease).await.unwrap();
    assert_eq!(metric(&base, "etcd_debugging_lease_revoked_total"), 1.0);
    assert_eq!(
        metric(&base, "etcd_debugging_server_lease_expired_total"),
        0.0
    );
    client.lease_grant(1, None).await.unwrap();
    wait_metric(&base, "etcd_debugging_server_lease_expired_total", |v| {
        v == 1.0
    });
    assert_eq!(metric(&base, "etcd_debugging_lease_revoked_total"), 2.0);
    assert_eq!(metric(&base, "etcd_server_has_leader"), 1.0);
    assert_eq!(metric(&base, "etcd_server_is_leader"), 1.0);
    assert_eq!(metric(&base, "etcd_server_leader_changes_seen_total"), 1.0);
    assert!(metric(&base, "etcd_server_proposals_committed_total") >= 4.0);
    assert!(metric(&base, "etcd_server_proposals_applied_total") >= 4.0);
    assert_eq!(
        metric(&base, "etcd_server_quota_backend_bytes"),
        2147483648.0
    );
    assert_eq!(
        metric(&base, r#"etcd_server_version{server_version="3.5.0"}"#),
        1.0
    );
    assert_eq!(
        metric(&base, r#"etcd_cluster_version{cluster_version="3.5.0"}"#),
        1.0
    );
    assert!(metric(&base, "process_resident_memory_bytes") > 0.0);
    // Registered methods are listed before their first call, as go-grpc-prometheus does.
    assert_eq!(
        metric(
            &base,
            r#"grpc_server_started_total{grpc_method="Snapshot",grpc_service="etcdserverpb.Maintenance",grpc_type="server_stream"}"#
        ),
        0.0
    );
    // --metrics extensive: handling-time histograms (five Puts so far).
    assert_eq!(
        metric(
            &base,
            r#"grpc_server_handling_seconds_count{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#
        ),
        5.0
    );
    assert!(
        metric(
            &base,
            r#"etcd_server_healthchecks_total{name="linearizable_read",status="success",type="readyz"}"#
        ) >= 1.0
    );
    assert_eq!(
        metric(
            &base,
            r#"etcd_server_healthcheck{name="serializable_read",type="livez"}"#
        ),
        1.0
    );
    let a = get(&format!("{base}/metrics"));
    assert!(a
        .headers
        .contains("content-type: text/plain; version=0.0.4"));
    assert!(a.body.contains("# TYPE etcd_mvcc_put_total counter"));

    // The metrics URL: metrics and health, nothing else.
    let a = get(&format!("{metrics_url}/health"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    assert_eq!(get(&format!("{metrics_url}/readyz")).body, "ok\n");
    assert_eq!(
        metric(&metrics_url, "etcd_mvcc_put_total"),
        metric(&base, "etcd_mvcc_put_total")
    );
    assert_eq!(get(&format!("{metrics_url}/version")).status, 404);

    wait_grpc_health(&server.endpoint, ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_and_metrics_ports_serve_http() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics_url = format!("https://127.0.0.1:{}", free_port());
    let server = Server::try_start(
        &tmp.path().join("data"),
        &[
            "--listen-client-urls",
            "https://127.0.0.1:0",
            "--auto-tls",
            "--listen-metrics-urls",
            &metrics_url,
        ],
    )
    .expect("server starts");
    let base = format!("https://{}", server.endpoint);
    let a = get(&format!("{base}/health"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    let a = curl(&format!("{base}/health"), &["--http2"]);
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    assert!(a.headers.starts_with("http/2 200"), "{}", a.headers);
    assert_eq!(get(&format!("{base}/readyz")).body, "ok\n");
    assert_eq!(metric(&base, "etcd_server_has_leader"), 1.0);
    // Without --metrics extensive, no handling-time histograms.
    assert!(!get(&format!("{base}/metrics"))
        .body
        .contains("grpc_server_handling_seconds"));
    let a = get(&format!("{metrics_url}/health"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    assert_eq!(metric(&metrics_url, "etcd_server_is_leader"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_false_while_an_alarm_is_active() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(&tmp.path().join("data"), &[]).expect("server starts");
    let base = format!("http://{}", server.endpoint);
    let mut client = server.client().await;
    let id = client.status().await.unwrap().header().unwrap().member_id();
    let member = || {
        let mut m = AlarmOptions::new();
        m.with_member(id);
        Some(m)
    };
    client
        .alarm(AlarmAction::Activate, AlarmType::Nospace, member())
        .await
        .unwrap();
    let a = get(&format!("{base}/health"));
    assert_eq!(a.status, 503);
    assert_eq!(
        a.body,
        "{\"health\":\"false\",\"reason\":\"ALARM NOSPACE\"}\n"
    );
    let a = get(&format!("{base}/health?exclude=NOSPACE"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    // NOSPACE does not make a member unready; CORRUPT does.
    assert_eq!(get(&format!("{base}/readyz")).status, 200);
    assert!(metric(&base, "etcd_server_health_failures") >= 1.0);
    client
        .alarm(AlarmAction::Deactivate, AlarmType::Nospace, member())
        .await
        .unwrap();
    wait_for(
        &format!("{base}/health"),
        200,
        HEALTHY,
        Duration::from_secs(5),
    );

    client
        .alarm(AlarmAction::Activate, AlarmType::Corrupt, member())
        .await
        .unwrap();
    let a = get(&format!("{base}/health"));
    assert_eq!(
        (a.status, a.body.as_str()),
        (503, "{\"health\":\"false\",\"reason\":\"ALARM CORRUPT\"}\n")
    );
    let a = get(&format!("{base}/readyz"));
    assert_eq!(a.status, 503);
    assert!(
        a.body
            .starts_with("[-]data_corruption failed: alarm activated: CORRUPT\n"),
        "{:?}",
        a.body
    );
    assert_eq!(get(&format!("{base}/livez")).status, 200);
    client
        .alarm(AlarmAction::Deactivate, AlarmType::Corrupt, member())
        .await
        .unwrap();
    wait_for(
        &format!("{base}/health"),
        200,
        HEALTHY,
        Duration::from_secs(5),
    );
    assert_eq!(get(&format!("{base}/readyz")).status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_false_without_a_leader_and_grpc_health_not_serving() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    // A follower stays, so that no leader lingers on it.
    let me = (leader + 1) % 3;
    let others: Vec<usize> = (0..3).filter(|&i| i != me).collect();
    let base = format!("http://{}", cluster.endpoint(me));
    wait_for(
        &format!("{base}/health"),
        200,
        HEALTHY,
        Duration::from_secs(10),
    );
    wait_grpc_health(&cluster.endpoint(me), ServingStatus::Serving).await;
    for &i in &others {
        cluster.kill(i);
    }
    wait_for(
        &format!("{base}/health"),
        503,
        "{\"health\":\"false\",\"reason\":\"RAFT NO LEADER\"}\n",
        Duration::from_secs(20),
    );
    // A serializable check asks only this member.
    let a = get(&format!("{base}/health?serializable=true"));
    assert_eq!((a.status, a.body.as_str()), (200, HEALTHY));
    assert_eq!(get(&format!("{base}/livez")).status, 200);
    let a = get(&format!("{base}/readyz?exclude=linearizable_read"));
    assert_eq!(a.status, 200);
    assert_eq!(metric(&base, "etcd_server_has_leader"), 0.0);
    wait_grpc_health(&cluster.endpoint(me), ServingStatus::NotServing).await;
    cluster.restart(others[0]);
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    wait_for(
        &format!("{base}/health"),
        200,
        HEALTHY,
        Duration::from_secs(20),
    );
    // The reporter follows the leader within 100 ms.
    wait_grpc_health(&cluster.endpoint(me), ServingStatus::Serving).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_traffic_is_measured_per_member() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cluster = Cluster::start(3, &[]).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i).await;
        ids.push(c.status().await.unwrap().header().unwrap().member_id());
    }
    let mut c = cluster.client(leader).await;
    for i in 0..5 {
        c.put(format!("p{i}"), "v", None).await.unwrap();
    }
    let base = |i: usize| format!("http://{}", cluster.endpoint(i));
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &f in &followers {
        let to = format!("{{To=\"{:x}\"}}", ids[f]);
        assert!(
            metric(
                &base(leader),
                &format!("etcd_network_peer_sent_bytes_total{to}")
            ) > 0.0
        );
        // A probe when the link connects, then every 4 s.
        wait_metric(
            &base(leader),
            &format!("etcd_network_peer_round_trip_time_seconds_count{to}"),
            |n| n >= 1.0,
        );
        let from = format!("{{From=\"{:x}\"}}", ids[leader]);
        assert!(
            metric(
                &base(f),
                &format!("etcd_network_peer_received_bytes_total{from}")
            ) > 0.0
        );
    }
    for (name, kind) in [
        ("etcd_network_peer_sent_bytes_total", "counter"),
        ("etcd_network_peer_received_bytes_total", "counter"),
        ("etcd_network_peer_sent_failures_total", "counter"),
        ("etcd_network_peer_round_trip_time_seconds", "histogram"),
    ] {
        assert_eq!(
            type_of(&base(leader), name).as_deref(),
            Some(kind),
            "{name}"
        );
    }
    // Heartbeats to a dead member fail.
    let dead = followers[0];
    let failures = format!(
        "etcd_network_peer_sent_failures_total{{To=\"{:x}\"}}",
        ids[dead]
    );
    let leader_base = base(leader);
    let before = metric(&leader_base, &failures);
    cluster.kill(dead);
    wait_metric(&leader_base, &failures, |n| n > before);
}

#[test]
fn a_secure_metrics_url_needs_the_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}", free_port());
    let err = match Server::try_start(&tmp.path().join("data"), &["--listen-metrics-urls", &url]) {
        Ok(_) => panic!("started with an https metrics URL and no certificate"),
        Err(e) => e,
    };
    assert!(
        err.contains(
            "client TLS key/cert (--cert-file, --key-file) must be provided for metrics secure url"
        ),
        "{err}"
    );
}

/// etcd's access controller (`embed/serve.go`): `--host-whitelist` refuses other hosts on a
/// plain-HTTP client URL with 421 (CVE-2018-5702) but not over TLS; `--cors` answers listed
/// origins only; `OPTIONS` is a 200 preflight; by default any host and origin (`*`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_whitelist_and_cors_follow_etcds_access_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(
        &tmp.path().join("plain"),
        &[
            "--host-whitelist",
            "localhost,127.0.0.1",
            "--cors",
            "https://ok.example",
        ],
    )
    .expect("server starts");
    let base = format!("http://{}", server.endpoint);
    let a = curl(
        &format!("{base}/health"),
        &["-H", "Host: evil.example:2379"],
    );
    assert_eq!(a.status, 421, "{}", a.body);
    assert!(a
        .body
        .contains("etcd received your request, but the Host header was unrecognized."));
    assert!(
        a.body.contains("etcd --host-whitelist \"evil.example\""),
        "{}",
        a.body
    );
    assert!(a.body.contains("(CVE-2018-5702)"), "{}", a.body);
    // The gateway is behind the same check; gRPC is not.
    let a = curl(
        &format!("{base}/v3/kv/range"),
        &[
            "-H",
            "Host: evil.example",
            "-X",
            "POST",
            "-d",
            r#"{"key":"YQ=="}"#,
        ],
    );
    assert_eq!(a.status, 421);
    let mut c = server.client().await;
    c.put("a", "1", None).await.unwrap();
    assert!(server
        .log()
        .contains("rejecting HTTP request to prevent DNS rebinding attacks"));

    let a = curl(
        &format!("{base}/health"),
        &["-H", "Origin: https://ok.example"],
    );
    assert_eq!(a.status, 200);
    assert!(
        a.headers
            .contains("access-control-allow-origin: https://ok.example"),
        "{}",
        a.headers
    );
    assert!(a
        .headers
        .contains("access-control-allow-methods: post, get, options, put, delete"));
    let a = curl(
        &format!("{base}/health"),
        &["-H", "Origin: https://other.example"],
    );
    assert_eq!(a.status, 200);
    assert!(
        !a.headers.contains("access-control-allow-origin"),
        "{}",
        a.headers
    );
    let a = curl(
        &format!("{base}/v3/kv/put"),
        &["-X", "OPTIONS", "-H", "Origin: https://ok.example"],
    );
    assert_eq!((a.status, a.body.as_str()), (200, ""));
    assert!(a
        .headers
        .contains("access-control-allow-headers: accept, content-type, authorization"));
    drop(server);

    // Over TLS every host is accepted (etcd checks hosts only when `req.TLS == nil`).
    let tls = Server::try_start(
        &tmp.path().join("tls"),
        &[
            "--listen-client-urls",
            "https://127.0.0.1:0",
            "--auto-tls",
            "--host-whitelist",
            "localhost",
        ],
    )
    .expect("server starts");
    let a = curl(
        &format!("https://{}/health", tls.endpoint),
        &["-H", "Host: evil.example"],
    );
    assert_eq!(a.status, 200, "{}", a.body);
    drop(tls);

    // The defaults: any host, any origin.
    let open = Server::try_start(&tmp.path().join("open"), &[]).expect("server starts");
    let a = curl(
        &format!("http://{}/version", open.endpoint),
        &[
            "-H",
            "Host: evil.example",
            "-H",
            "Origin: https://x.example",
        ],
    );
    assert_eq!(a.status, 200);
    assert!(
        a.headers.contains("access-control-allow-origin: *"),
        "{}",
        a.headers
    );
}
