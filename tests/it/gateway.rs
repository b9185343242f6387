//! etcd's JSON gateway on the client port (`POST /v3/...`), driven with curl as etcd's own
//! e2e tests drive it: KV with base64 keys and values, txn, the watch and lease keepalive
//! streams, leases, a token in `Authorization`, error bodies and statuses, bodies that are not
//! JSON, over HTTP/1.1 and HTTP/2, plain and TLS.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::harness::{curl, Answer, Server};

/// `curl -X POST -d body` to `url` with extra `args`.
fn post_with(url: &str, body: &str, args: &[&str]) -> Answer {
    let mut all = vec!["-X", "POST", "-d", body];
    all.extend_from_slice(args);
    curl(url, &all)
}

fn post(url: &str, body: &str) -> Answer {
    post_with(url, body, &[])
}

/// `post`, which must answer 200; its JSON.
fn ok(url: &str, body: &str) -> Value {
    let a = post(url, body);
    assert_eq!(a.status, 200, "{url} {body}: {}", a.body);
    a.json()
}

fn b64(s: &str) -> String {
    // Enough of base64 for short ASCII test strings.
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The lines a streaming request answers within `secs` seconds (curl -N -m).
fn stream_lines(url: &str, body: &str, secs: u32) -> Vec<String> {
    let out = Command::new("curl")
        .args([
            "-s",
            "-N",
            "-m",
            &secs.to_string(),
            "-X",
            "POST",
            "-d",
            body,
            url,
        ])
        .output()
        .expect("curl is installed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn kv_put_range_txn_delete_in_base64_json() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    assert_eq!(b64("foo"), "Zm9v");
    let put = ok(
        &format!("{base}/v3/kv/put"),
        r#"{"key":"Zm9v","value":"YmFy"}"#,
    );
    let rev: i64 = put["header"]["revision"].as_str().unwrap().parse().unwrap();
    // 64-bit integers are strings; fields at their default value are left out.
    assert!(put["header"]["cluster_id"].is_string(), "{put}");
    let got = ok(&format!("{base}/v3/kv/range"), r#"{"key":"Zm9v"}"#);
    assert_eq!(
        got["kvs"],
        json!([{"key":"Zm9v","create_revision":rev.to_string(),"mod_revision":rev.to_string(),
                "version":"1","value":"YmFy"}])
    );
    assert_eq!(got["count"], "1");
    assert!(got.get("more").is_none(), "{got}");

    // /v3beta is the same API (etcd 3.4/3.5 rewrite it), and input takes either field name.
    let txn = ok(
        &format!("{base}/v3beta/kv/txn"),
        r#"{"compare":[{"key":"Zm9v","result":"EQUAL","target":"VALUE","value":"YmFy"}],
            "success":[{"request_put":{"key":"YmF6","value":"cXV4"}},{"requestRange":{"key":"Zm9v"}}],
            "failure":[]}"#,
    );
    assert_eq!(txn["succeeded"], true, "{txn}");
    let put_rev = (rev + 1).to_string();
    assert_eq!(
        txn["responses"][0],
        json!({"response_put":{"header":{"revision":put_rev}}})
    );
    assert_eq!(
        txn["responses"][1]["response_range"]["kvs"][0]["value"],
        "YmFy"
    );
    // A failed compare: `succeeded` (false) is left out.
    let txn = ok(
        &format!("{base}/v3/kv/txn"),
        r#"{"compare":[{"key":"Zm9v","target":"CREATE","create_revision":"0"}],
            "success":[{"request_put":{"key":"Zm9v","value":"YmFy"}}]}"#,
    );
    assert!(txn.get("succeeded").is_none(), "{txn}");

    let del = ok(
        &format!("{base}/v3/kv/deleterange"),
        &format!(
            r#"{{"key":"{}","range_end":"{}","prev_kv":true}}"#,
            b64("b"),
            b64("c")
        ),
    );
    assert_eq!(del["deleted"], "1");
    assert_eq!(del["prev_kvs"][0]["key"], b64("baz"));
    let got = ok(&format!("{base}/v3/kv/range"), r#"{"key":"YmF6"}"#);
    assert!(
        got.get("kvs").is_none() && got.get("count").is_none(),
        "{got}"
    );

    // HTTP/2 without TLS (prior knowledge) too.
    let a = post_with(
        &format!("{base}/v3/kv/range"),
        r#"{"key":"Zm9v"}"#,
        &["--http2-prior-knowledge"],
    );
    assert!(a.headers.starts_with("http/2 200"), "{}", a.headers);
    assert_eq!(a.json()["kvs"][0]["value"], "YmFy");
    assert!(
        a.headers.contains("content-type: application/json"),
        "{}",
        a.headers
    );
    assert!(
        a.headers
            .contains("grpc-metadata-content-type: application/grpc"),
        "{}",
        a.headers
    );
}

#[test]
fn errors_answer_grpc_gateway_bodies_and_statuses() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    // A gRPC error: its code's HTTP status and grpc-gateway's body.
    let a = post(
        &format!("{base}/v3/kv/range"),
        r#"{"key":"Zm9v","revision":"100"}"#,
    );
    assert_eq!(a.status, 400);
    assert_eq!(
        a.body,
        r#"{"error":"etcdserver: mvcc: required revision is a future revision","message":"etcdserver: mvcc: required revision is a future revision","code":11}"#
    );
    let a = post(&format!("{base}/v3/election/proclaim"), "{}");
    assert_eq!(a.status, 500);
    assert_eq!(
        a.body,
        r#"{"error":"\"leader\" field must be provided","message":"\"leader\" field must be provided","code":2}"#
    );
    let a = post(&format!("{base}/v3/lease/revoke"), r#"{"ID":"12345"}"#);
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["message"], "etcdserver: requested lease not found");

    // Bodies that are not JSON: 400, InvalidArgument, Go's decoder message.
    let a = post(&format!("{base}/v3/kv/put"), r#"{"key":"Zm9v","#);
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            400,
            r#"{"error":"unexpected EOF","message":"unexpected EOF","code":3}"#
        )
    );
    let a = post(&format!("{base}/v3/kv/put"), "xx");
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            400,
            r#"{"error":"invalid character 'x' looking for beginning of value","message":"invalid character 'x' looking for beginning of value","code":3}"#
        )
    );
    // An empty body is the empty request: a Put without a key.
    let a = post(&format!("{base}/v3/kv/put"), "");
    assert_eq!(
        (a.status, a.json()["message"].as_str()),
        (400, Some("etcdserver: key is not provided"))
    );
    // Not a route, or not POST: grpc-gateway's plain-text answers.
    let a = post(&format!("{base}/v3/kv/nope"), "{}");
    assert_eq!((a.status, a.body.as_str()), (404, "Not Found\n"));
    let a = post_with(&format!("{base}/v3/kv/range"), "", &["-X", "GET"]);
    assert_eq!((a.status, a.body.as_str()), (405, "Method Not Allowed\n"));
}

#[test]
fn watch_streams_newline_delimited_results() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    ok(
        &format!("{base}/v3/kv/put"),
        r#"{"key":"Zm9v","value":"YmFy"}"#,
    );
    // A watch from revision 1 gets the put at once, then stays open until curl gives up.
    let lines = stream_lines(
        &format!("{base}/v3/watch"),
        r#"{"create_request":{"key":"Zm9v","start_revision":1}}"#,
        2,
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    let created: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(created["result"]["created"], true, "{created}");
    let events: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(
        events["result"]["events"][0]["kv"]["value"], "YmFy",
        "{events}"
    );
    // PUT is the default event type, so left out.
    assert!(events["result"]["events"][0].get("type").is_none());

    // Events that come while the stream is open, and a delete's type by name.
    let mut watch = Command::new("curl")
        .args(["-s", "-N", "-m", "20", "-X", "POST", "-d"])
        .arg(r#"{"create_request":{"key":"Zm9v"}}"#)
        .arg(format!("{base}/v3/watch"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed");
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let created: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(created["result"]["created"], true);
    ok(
        &format!("{base}/v3/kv/put"),
        r#"{"key":"Zm9v","value":"YmF6"}"#,
    );
    let put: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(put["result"]["events"][0]["kv"]["value"], "YmF6", "{put}");
    ok(&format!("{base}/v3/kv/deleterange"), r#"{"key":"Zm9v"}"#);
    let del: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(del["result"]["events"][0]["type"], "DELETE", "{del}");
    let _ = watch.kill();
    let _ = watch.wait();

    // A first message that is not JSON: a plain error, Unknown (500), as etcd's gateway.
    let a = post(&format!("{base}/v3/watch"), "xx");
    assert_eq!(a.status, 500);
    assert_eq!(a.json()["code"], 2);
}

#[test]
fn leases_grant_keepalive_timetolive_and_leases() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    let grant = ok(&format!("{base}/v3/lease/grant"), r#"{"TTL":30,"ID":4660}"#);
    assert_eq!(
        (grant["ID"].as_str(), grant["TTL"].as_str()),
        (Some("4660"), Some("30"))
    );
    ok(
        &format!("{base}/v3/kv/put"),
        r#"{"key":"Zm9v","value":"YmFy","lease":"4660"}"#,
    );
    // One result line per request in the body; the stream ends once they are answered.
    let lines = stream_lines(
        &format!("{base}/v3/lease/keepalive"),
        r#"{"ID":4660} {"ID":"4660"}"#,
        10,
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (v["result"]["ID"].as_str(), v["result"]["TTL"].as_str()),
            (Some("4660"), Some("30"))
        );
    }
    for path in ["lease/timetolive", "kv/lease/timetolive"] {
        let ttl = ok(&format!("{base}/v3/{path}"), r#"{"ID":4660,"keys":true}"#);
        assert_eq!(ttl["grantedTTL"], "30", "{ttl}");
        assert_eq!(ttl["keys"], json!(["Zm9v"]));
    }
    for path in ["lease/leases", "kv/lease/leases"] {
        let leases = ok(&format!("{base}/v3/{path}"), "{}");
        assert_eq!(leases["leases"], json!([{"ID":"4660"}]), "{leases}");
    }
    ok(&format!("{base}/v3/kv/lease/revoke"), r#"{"ID":4660}"#);
    let a = post(&format!("{base}/v3/lease/revoke"), r#"{"ID":4660}"#);
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.body.contains("etcdserver: requested lease not found"));
}

#[test]
fn auth_token_in_authorization_header() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    ok(
        &format!("{base}/v3/auth/user/add"),
        r#"{"name":"root","password":"toor"}"#,
    );
    ok(&format!("{base}/v3/auth/role/add"), r#"{"name":"root"}"#);
    ok(
        &format!("{base}/v3/auth/user/grant"),
        r#"{"user":"root","role":"root"}"#,
    );
    ok(&format!("{base}/v3/auth/enable"), "{}");
    let put = r#"{"key":"Zm9v","value":"YmFy"}"#;
    let a = post(&format!("{base}/v3/kv/put"), put);
    assert_eq!(
        (a.status, a.body.as_str()),
        (
            400,
            r#"{"error":"etcdserver: user name is empty","message":"etcdserver: user name is empty","code":3}"#
        )
    );
    let a = post_with(
        &format!("{base}/v3/kv/put"),
        put,
        &["-H", "Authorization: bogus"],
    );
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.json()["code"], 16);
    let auth = ok(
        &format!("{base}/v3/auth/authenticate"),
        r#"{"name":"root","password":"toor"}"#,
    );
    let token = auth["token"].as_str().expect("a token").to_string();
    let header = format!("Authorization: {token}");
    let a = post_with(&format!("{base}/v3/kv/put"), put, &["-H", &header]);
    assert_eq!(a.status, 200, "{}", a.body);
    let status = post_with(&format!("{base}/v3/auth/status"), "{}", &["-H", &header]);
    assert_eq!(status.json()["enabled"], true, "{}", status.body);
    let a = post_with(&format!("{base}/v3/auth/disable"), "{}", &["-H", &header]);
    assert_eq!(a.status, 200, "{}", a.body);
}

#[test]
fn tls_over_http1_and_http2() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::try_start(
        &tmp.path().join("data"),
        &["--listen-client-urls", "https://127.0.0.1:0", "--auto-tls"],
    )
    .expect("server starts");
    let base = format!("https://{}", server.endpoint);
    let a = post_with(
        &format!("{base}/v3/kv/put"),
        r#"{"key":"Zm9v","value":"YmFy"}"#,
        &["--http1.1"],
    );
    assert!(a.headers.starts_with("http/1.1 200"), "{}", a.headers);
    let a = post_with(
        &format!("{base}/v3/kv/range"),
        r#"{"key":"Zm9v"}"#,
        &["--http2"],
    );
    assert!(a.headers.starts_with("http/2 200"), "{}", a.headers);
    assert_eq!(a.json()["kvs"][0]["value"], "YmFy");
    let status = ok(&format!("{base}/v3/maintenance/status"), "");
    assert!(status["version"].is_string(), "{status}");
    let members = ok(&format!("{base}/v3/cluster/member/list"), "{}");
    assert_eq!(
        members["members"].as_array().map(Vec::len),
        Some(1),
        "{members}"
    );
}

#[test]
fn lock_and_election_recipes() {
    let server = Server::start();
    let base = format!("http://{}", server.endpoint);
    let lease = ok(&format!("{base}/v3/lease/grant"), r#"{"TTL":30}"#);
    let id = lease["ID"].as_str().unwrap().to_string();
    let lock = ok(
        &format!("{base}/v3/lock/lock"),
        &format!(r#"{{"name":"{}","lease":"{id}"}}"#, b64("lk")),
    );
    let key = lock["key"].as_str().expect("the lock's key").to_string();
    ok(
        &format!("{base}/v3/lock/unlock"),
        &format!(r#"{{"key":"{key}"}}"#),
    );

    let campaign = ok(
        &format!("{base}/v3/election/campaign"),
        &format!(
            r#"{{"name":"{}","value":"{}","lease":"{id}"}}"#,
            b64("el"),
            b64("v1")
        ),
    );
    let leader = campaign["leader"].clone();
    assert_eq!(leader["name"], b64("el"), "{campaign}");
    let now = ok(
        &format!("{base}/v3/election/leader"),
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
    );
    assert_eq!(now["kv"]["value"], b64("v1"), "{now}");
    ok(
        &format!("{base}/v3/election/proclaim"),
        &json!({"leader": leader, "value": b64("v2")}).to_string(),
    );
    let lines = stream_lines(
        &format!("{base}/v3/election/observe"),
        &format!(r#"{{"name":"{}"}}"#, b64("el")),
        2,
    );
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["result"]["kv"]["value"], b64("v2"), "{lines:?}");
    ok(
        &format!("{base}/v3/election/resign"),
        &json!({ "leader": leader }).to_string(),
    );
}

/// etcd3gw (Debian's `python3-etcd3gw`, installed by `.ci/deps.sh`), a Python client built on
/// etcd's JSON gateway, works unchanged: `tests/it/clients/etcd3gw_check.py` (which passes
/// against etcd 3.4.23 too) puts, gets, creates and replaces in txns, lists prefixes, grants,
/// refreshes and revokes a lease, takes a lock, watches and deletes.
#[test]
fn etcd3gw_works_unchanged() {
    let server = Server::start();
    let (host, port) = server.endpoint.rsplit_once(':').expect("host:port");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/clients/etcd3gw_check.py"
    );
    // Debian's interpreter, where python3-etcd3gw is installed (not a pyenv one on PATH).
    let out = Command::new("/usr/bin/python3")
        .args([script, host, port])
        .output()
        .expect("/usr/bin/python3 runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("etcd3gw ok"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
