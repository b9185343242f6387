//! Auth (etcd 3.5 `server/auth`): users, roles, tokens and permission checks, driven by
//! etcd-client (`ConnectOptions::with_user`) and etcdctl `--user`.

use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, Permission, PutOptions, WatchOptions,
    WatchStream,
};
use tonic::Code;

use crate::cluster::CLUSTER_LOCK;
use crate::harness::{ok_stdout, wait_until_async, Cluster, Server};
use crate::util::grpc_err;

const FAST: &[&str] = &["--bcrypt-cost", "4"];

fn start(extra: &[&str]) -> (tempfile::TempDir, Server) {
    let tmp = tempfile::tempdir().unwrap();
    let mut flags = FAST.to_vec();
    flags.extend_from_slice(extra);
    let s = Server::try_start(tmp.path(), &flags).expect("server starts");
    (tmp, s)
}

async fn as_user(endpoint: &str, user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(
        [endpoint],
        Some(ConnectOptions::new().with_user(user, password)),
    )
    .await
}

/// root (password `rootpw`) with the root role; `u` (password `upw`) with role `r` holding
/// READ on [a, c) and READWRITE on prefix `w/`; auth enabled.
async fn setup(c: &mut Client) {
    c.user_add("root", "rootpw", None).await.unwrap();
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.user_add("u", "upw", None).await.unwrap();
    c.role_add("r").await.unwrap();
    c.role_grant_permission("r", Permission::read("a").with_range_end("c"))
        .await
        .unwrap();
    c.role_grant_permission("r", Permission::read_write("w/").with_prefix())
        .await
        .unwrap();
    c.user_grant_role("u", "r").await.unwrap();
    c.auth_enable().await.unwrap();
}

#[tokio::test]
async fn auth_rpcs_answer_with_etcds_errors() {
    let (_tmp, s) = start(&[]);
    let mut c = s.client().await;
    assert_eq!(
        grpc_err(c.auth_enable().await),
        (
            Code::FailedPrecondition,
            "etcdserver: root user does not exist".into()
        )
    );
    c.user_add("root", "rootpw", None).await.unwrap();
    assert_eq!(
        grpc_err(c.auth_enable().await),
        (
            Code::FailedPrecondition,
            "etcdserver: root user does not have root role".into()
        )
    );
    assert_eq!(
        grpc_err(c.user_add("root", "x", None).await),
        (
            Code::FailedPrecondition,
            "etcdserver: user name already exists".into()
        )
    );
    assert_eq!(
        grpc_err(c.user_add("", "x", None).await),
        (
            Code::InvalidArgument,
            "etcdserver: user name is empty".into()
        )
    );
    assert_eq!(
        grpc_err(c.user_grant_role("nobody", "root").await).1,
        "etcdserver: user name not found"
    );
    assert_eq!(
        grpc_err(c.user_grant_role("root", "nope").await).1,
        "etcdserver: role name not found"
    );
    assert_eq!(
        grpc_err(c.role_get("nope").await).1,
        "etcdserver: role name not found"
    );
    assert_eq!(
        grpc_err(
            c.auth_client()
                .authenticate("root".into(), "rootpw".into())
                .await
        ),
        (
            Code::FailedPrecondition,
            "etcdserver: authentication is not enabled".into()
        )
    );
    setup_rest(&mut c).await;
    // Now enabled: no token is no user.
    assert_eq!(
        grpc_err(c.put("k", "v", None).await),
        (
            Code::InvalidArgument,
            "etcdserver: user name is empty".into()
        )
    );
    assert_eq!(
        grpc_err(as_user(&s.endpoint, "root", "bad").await.map(|_| ())),
        (
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password".into()
        )
    );
    let mut root = as_user(&s.endpoint, "root", "rootpw").await.unwrap();
    assert_eq!(
        grpc_err(root.user_revoke_role("root", "root").await),
        (
            Code::InvalidArgument,
            "etcdserver: invalid auth management".into()
        )
    );
    assert_eq!(
        grpc_err(root.user_delete("root").await).1,
        "etcdserver: invalid auth management"
    );
    assert_eq!(
        grpc_err(root.role_delete("root").await).1,
        "etcdserver: invalid auth management"
    );
    assert_eq!(
        grpc_err(root.user_revoke_role("u", "root").await).1,
        "etcdserver: role is not granted to the user"
    );
    assert_eq!(
        grpc_err(root.role_revoke_permission("r", "zz", None).await).1,
        "etcdserver: permission is not granted to the role"
    );
    assert_eq!(
        grpc_err(root.role_add("r").await).1,
        "etcdserver: role name already exists"
    );
    let users = root.user_list().await.unwrap();
    assert_eq!(users.users(), ["root", "u"]);
    let roles = root.role_list().await.unwrap();
    assert_eq!(roles.roles(), ["r", "root"]);
    let r = root.role_get("r").await.unwrap();
    assert_eq!(r.permissions().len(), 2);
    // A non-root user: admin RPCs are denied; its own user and roles are readable.
    let mut u = as_user(&s.endpoint, "u", "upw").await.unwrap();
    assert_eq!(
        grpc_err(u.user_list().await),
        (
            Code::PermissionDenied,
            "etcdserver: permission denied".into()
        )
    );
    assert_eq!(
        grpc_err(u.user_add("x", "y", None).await).1,
        "etcdserver: permission denied"
    );
    assert_eq!(u.user_get("u").await.unwrap().roles(), ["r"]);
    assert!(u.role_get("r").await.is_ok());
    assert_eq!(
        grpc_err(u.role_get("root").await).1,
        "etcdserver: permission denied"
    );
    // Disable, as root; then everyone may do anything again.
    root.auth_disable().await.unwrap();
    c.put("k", "v", None).await.unwrap();
}

async fn setup_rest(c: &mut Client) {
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.user_add("u", "upw", None).await.unwrap();
    c.role_add("r").await.unwrap();
    c.role_grant_permission("r", Permission::read("a").with_range_end("c"))
        .await
        .unwrap();
    c.role_grant_permission("r", Permission::read_write("w/").with_prefix())
        .await
        .unwrap();
    c.user_grant_role("u", "r").await.unwrap();
    c.auth_enable().await.unwrap();
}

#[tokio::test]
async fn permissions_are_checked_per_service() {
    let (_tmp, s) = start(&[]);
    let mut c = s.client().await;
    c.put("a1", "x", None).await.unwrap();
    c.put("b1", "x", None).await.unwrap();
    c.put("d", "x", None).await.unwrap();
    setup(&mut c).await;
    let mut u = as_user(&s.endpoint, "u", "upw").await.unwrap();
    let denied = (
        Code::PermissionDenied,
        "etcdserver: permission denied".to_string(),
    );
    // Range: a key, a range inside [a, c), a range past it, a prefix.
    assert_eq!(u.get("a1", None).await.unwrap().kvs().len(), 1);
    let r = u
        .get("a", Some(GetOptions::new().with_range("c")))
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 2);
    assert_eq!(grpc_err(u.get("d", None).await), denied);
    assert_eq!(
        grpc_err(u.get("a", Some(GetOptions::new().with_range("e"))).await),
        denied
    );
    assert_eq!(
        grpc_err(u.get("", Some(GetOptions::new().with_all_keys())).await),
        denied
    );
    // Put/Delete: read-only [a, c) refuses writes; w/ allows them.
    assert_eq!(grpc_err(u.put("a1", "y", None).await), denied);
    u.put("w/1", "y", None).await.unwrap();
    u.delete("w/1", None).await.unwrap();
    assert_eq!(grpc_err(u.delete("a1", None).await), denied);
    // Txn: every compare and op, nested ones too.
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let ok = Txn::new()
        .when([Compare::value("a1", CompareOp::Equal, "x")])
        .and_then([TxnOp::put("w/2", "v", None)]);
    assert!(u.txn(ok).await.unwrap().succeeded());
    let bad_compare = Txn::new()
        .when([Compare::value("d", CompareOp::Equal, "x")])
        .and_then([TxnOp::put("w/2", "v", None)]);
    assert_eq!(grpc_err(u.txn(bad_compare).await), denied);
    let nested = Txn::new().and_then([TxnOp::txn(
        Txn::new().and_then([TxnOp::put("a1", "v", None)]),
    )]);
    assert_eq!(grpc_err(u.txn(nested).await), denied);
    // Lease: revoking a lease with a key the user may not write is refused.
    let lease = c_root(&s).await.lease_grant(60, None).await.unwrap().id();
    c_root(&s)
        .await
        .put("d", "l", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    assert_eq!(grpc_err(u.lease_revoke(lease).await), denied);
    assert_eq!(
        grpc_err(
            u.lease_time_to_live(
                lease,
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())
            )
            .await
        ),
        denied
    );
    c_root(&s).await.lease_revoke(lease).await.unwrap();
    // Watch: creating a watch on keys the user cannot read is refused.
    let mut stream = u.watch("d", None).await.unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(resp.canceled(), "{resp:?}");
    assert_eq!(resp.cancel_reason(), "etcdserver: permission denied");
    // Admin-only RPCs (etcd's `authMaintenanceServer` and membership checks).
    assert_eq!(grpc_err(u.defragment().await), denied);
    assert_eq!(grpc_err(u.hash().await), denied);
    assert_eq!(grpc_err(u.hash_kv(0).await), denied);
    let validate = || etcd_client::DowngradeOptions::Validate("3.4".into());
    let mut m = u.maintenance_client();
    assert_eq!(grpc_err(m.downgrade(validate()).await), denied);
    let mut m = c_root(&s).await.maintenance_client();
    assert_eq!(m.downgrade(validate()).await.unwrap().version(), "3.5.0");
    // As in etcd, compaction needs no permission.
    u.compact(1, None)
        .await
        .expect("any user may compact, as in etcd");
    assert_eq!(
        grpc_err(u.member_add(["http://127.0.0.1:1"], None).await),
        denied
    );
    // etcdctl --user.
    let out = s.etcdctl(&["--user", "u:upw", "get", "a1"]);
    assert!(ok_stdout(&out).contains("a1"));
    let out = s.etcdctl(&["--user", "u:upw", "put", "a1", "z"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
}

async fn c_root(s: &Server) -> Client {
    as_user(&s.endpoint, "root", "rootpw").await.unwrap()
}

/// User `u`'s client and its watch of the prefix `w/` (which its role `r` may read), open and
/// past one event (`w/1`, written by root).
async fn watch_as_u(s: &Server) -> (Client, WatchStream) {
    let mut c = s.client().await;
    setup(&mut c).await;
    let mut u = as_user(&s.endpoint, "u", "upw").await.unwrap();
    let mut stream = u
        .watch("w/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(stream.message().await.unwrap().unwrap().created());
    c_root(s).await.put("w/1", "seen", None).await.unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    assert_eq!(resp.events()[0].event_type(), EventType::Put);
    (u, stream)
}

/// The next response on `stream` cancels the watch for want of permission, with no events.
async fn assert_denied(stream: &mut WatchStream) {
    let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    assert!(resp.events().is_empty(), "no events once denied: {resp:?}");
    assert!(resp.canceled());
    assert_eq!(resp.cancel_reason(), "etcdserver: permission denied");
}

#[tokio::test]
async fn a_role_revoked_mid_watch_stops_the_watch() {
    let (_tmp, s) = start(&[]);
    let (_u, mut stream) = watch_as_u(&s).await;
    let mut root = c_root(&s).await;
    root.user_revoke_role("u", "r").await.unwrap();
    root.put("w/2", "secret", None).await.unwrap();
    assert_denied(&mut stream).await;
}

/// A role revoked while auth is disabled stops the watch once auth is enabled again. Enabling
/// auth does not move the auth revision, so a stream that rechecked its watchers only when the
/// revision moved kept sending the user events it may no longer read.
#[tokio::test]
async fn a_role_revoked_while_auth_is_off_stops_the_watch_once_it_is_on() {
    let (_tmp, s) = start(&[]);
    let (_u, mut stream) = watch_as_u(&s).await;
    c_root(&s).await.auth_disable().await.unwrap();
    let mut anyone = s.client().await;
    anyone.user_revoke_role("u", "r").await.unwrap();
    anyone.put("w/2", "open", None).await.unwrap();
    let resp = stream.message().await.unwrap().unwrap();
    assert_eq!(resp.events()[0].kv().unwrap().key(), b"w/2");
    anyone.auth_enable().await.unwrap();
    c_root(&s).await.put("w/3", "secret", None).await.unwrap();
    assert_denied(&mut stream).await;
}

#[tokio::test]
async fn tokens_expire_and_go_with_their_user() {
    let (_tmp, s) = start(&["--auth-token-ttl", "1"]);
    let mut c = s.client().await;
    setup(&mut c).await;
    let root = c_root(&s).await;
    let token = root
        .auth_client()
        .authenticate("u".into(), "upw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    assert!(token.split('.').next().unwrap().len() == 16, "{token}");
    let raw = RawKv::connect(&s.endpoint).await;
    assert!(raw.get(&token, "a1").await.is_ok());
    // Time is the subject: let the 1 s --auth-token-ttl pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        raw.get(&token, "a1").await.unwrap_err(),
        (
            Code::Unauthenticated,
            "etcdserver: invalid auth token".into()
        )
    );
    // A deleted user's token is invalid at once (root's own token expired too: a new client).
    let mut root = c_root(&s).await;
    let token = root
        .auth_client()
        .authenticate("u".into(), "upw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    assert!(raw.get(&token, "a1").await.is_ok());
    root.user_delete("u").await.unwrap();
    assert_eq!(
        raw.get(&token, "a1").await.unwrap_err().1,
        "etcdserver: invalid auth token"
    );
    assert_eq!(
        raw.get("garbage.1", "a1").await.unwrap_err().1,
        "etcdserver: invalid auth token"
    );
}

/// A bare KV client that sends a given token.
struct RawKv {
    ch: tonic::transport::Channel,
}

impl RawKv {
    async fn connect(endpoint: &str) -> RawKv {
        let url = if endpoint.starts_with("http") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let ch = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        RawKv { ch }
    }

    async fn get(&self, token: &str, key: &str) -> Result<(), (Code, String)> {
        use metastore::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
        let mut kv = KvClient::new(self.ch.clone());
        let mut req = tonic::Request::new(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        });
        req.metadata_mut().insert("token", token.parse().unwrap());
        kv.range(req)
            .await
            .map(|_| ())
            .map_err(|s| (s.code(), s.message().to_string()))
    }
}

#[tokio::test]
async fn jwt_tokens_are_signed_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let priv_path = tmp.path().join("jwt.key");
    let pub_path = tmp.path().join("jwt.pub");
    std::fs::write(&priv_path, key.serialize_pem()).unwrap();
    std::fs::write(&pub_path, key.public_key_pem()).unwrap();
    let spec = format!(
        "jwt,pub-key={},priv-key={},sign-method=ES256,ttl=2s",
        pub_path.display(),
        priv_path.display()
    );
    let (_d, s) = start(&["--auth-token", &spec]);
    let mut c = s.client().await;
    setup(&mut c).await;
    let mut root = c_root(&s).await;
    let token = root
        .auth_client()
        .authenticate("u".into(), "upw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let raw = RawKv::connect(&s.endpoint).await;
    assert!(raw.get(&token, "a1").await.is_ok());
    // An auth change makes the token's revision old.
    root.role_add("other").await.unwrap();
    assert_eq!(
        raw.get(&token, "a1").await.unwrap_err().1,
        "etcdserver: revision of auth store is old"
    );
    let token = root
        .auth_client()
        .authenticate("u".into(), "upw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    assert!(raw.get(&token, "a1").await.is_ok());
    // Time is the subject: let the JWT's 2 s ttl pass.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        raw.get(&token, "a1").await.unwrap_err().1,
        "etcdserver: invalid auth token"
    );
    // etcd-client authenticates by itself.
    let mut u = as_user(&s.endpoint, "u", "upw").await.unwrap();
    u.put("w/x", "1", None).await.unwrap();
}

fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

#[tokio::test]
async fn no_password_reaches_the_data_dir() {
    for engine in ["memory", "rocksdb"] {
        let tmp = tempfile::tempdir().unwrap();
        let flags = [
            "--bcrypt-cost",
            "4",
            "--storage-engine",
            engine,
            "--snapshot-count",
            "5",
        ];
        let s = Server::try_start(tmp.path(), &flags).expect("starts");
        ok_stdout(&s.etcdctl(&["user", "add", "alice:Sup3rSecretPw1"]));
        let out = s.etcdctl_stdin(
            &["user", "passwd", "alice", "--interactive=false"],
            "An0therSecretPw2\n",
        );
        ok_stdout(&out);
        ok_stdout(&s.etcdctl(&["user", "add", "root:R00tSecretPw3"]));
        ok_stdout(&s.etcdctl(&["role", "add", "root"]));
        ok_stdout(&s.etcdctl(&["user", "grant-role", "root", "root"]));
        ok_stdout(&s.etcdctl(&["auth", "enable"]));
        for i in 0..8 {
            ok_stdout(&s.etcdctl(&["--user", "alice:An0therSecretPw2", "user", "get", "alice"]));
            let _ = i;
        }
        drop(s);
        for pw in ["Sup3rSecretPw1", "An0therSecretPw2", "R00tSecretPw3"] {
            let hits = grep_dir(tmp.path(), pw.as_bytes());
            assert!(hits.is_empty(), "{engine}: {pw} found in {hits:?}");
        }
        // And the store survives a restart.
        let s = Server::try_start(tmp.path(), &flags).expect("restarts");
        let out = s.etcdctl(&["--user", "alice:An0therSecretPw2", "user", "get", "alice"]);
        assert!(ok_stdout(&out).contains("alice"), "{engine}");
        let out = s.etcdctl(&["get", "x"]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("user name is empty"));
    }
}

#[tokio::test]
async fn auth_works_across_members_restarts_and_snapshots() {
    let _one = CLUSTER_LOCK.lock().await;
    let mut cl = Cluster::start(3, &["--bcrypt-cost", "4", "--snapshot-count", "5"]).await;
    let mut c = cl.client(0).await;
    c.put("a1", "x", None).await.unwrap();
    setup(&mut c).await;
    // A token made on one member works on the others (simple tokens: each member assigns it
    // as it applies the Authenticate entry).
    let mut root0 = as_user(&cl.endpoint(0), "root", "rootpw").await.unwrap();
    let token = root0
        .auth_client()
        .authenticate("u".into(), "upw".into())
        .await
        .unwrap()
        .token()
        .to_string();
    for i in 0..3 {
        let raw = RawKv::connect(&cl.endpoint(i)).await;
        assert!(raw.get(&token, "a1").await.is_ok(), "member {i}");
        assert_eq!(
            raw.get(&token, "d").await.unwrap_err().1,
            "etcdserver: permission denied"
        );
    }
    // Member 2 misses changes that go into a snapshot, then catches up from it.
    cl.kill(2);
    // Member 2 may have led: a write sent before the others elect would time out.
    cl.wait_for_leader_among(&[0, 1], Duration::from_secs(20))
        .await;
    root0.user_add("late", "latepw", None).await.unwrap();
    root0.user_grant_role("late", "r").await.unwrap();
    for i in 0..20 {
        root0.put(format!("w/{i}"), "v", None).await.unwrap();
    }
    cl.restart(2);
    // (HashKV is root-only now: wait for the user to appear on member 2 instead.)
    let mut late = None;
    let mut err = None;
    wait_until_async(Duration::from_secs(20), async || {
        match as_user(&cl.endpoint(2), "late", "latepw").await {
            Ok(c) => late = Some(c),
            Err(e) => err = Some(e),
        }
        late.is_some()
    })
    .await;
    let mut late = late.unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(late.get("a1", None).await.unwrap().kvs().len(), 1);
    // Restart every member: the store is rebuilt from snapshots and the WAL.
    for i in 0..3 {
        cl.kill(i);
        cl.restart(i);
    }
    cl.wait_for_leader(Duration::from_secs(20)).await;
    for i in 0..3 {
        let mut u = as_user(&cl.endpoint(i), "late", "latepw").await.unwrap();
        assert_eq!(
            u.get("a1", None).await.unwrap().kvs().len(),
            1,
            "member {i}"
        );
        let mut anon = cl.client(i).await;
        assert_eq!(
            grpc_err(anon.get("a1", None).await).1,
            "etcdserver: user name is empty"
        );
    }
}

/// loadgen's `--user` authenticates its clients: with a user allowed on `w/` the puts all
/// succeed; as a user who may only read they are all refused.
#[tokio::test]
async fn loadgen_runs_as_a_user() {
    use clap::Parser;
    let (_tmp, s) = start(&[]);
    let mut c = s.client().await;
    setup(&mut c).await;
    let run = |user: &str| {
        let argv = format!(
            "metastore-loadgen --endpoints {} --user {user} --clients 2 --total 20 put --key-size 8 --val-size 8 --key-space-size 5",
            s.endpoint
        );
        let cli = metastore_loadgen::cli::Cli::try_parse_from(argv.split_whitespace()).unwrap();
        async move {
            let (_stop_tx, stop) = tokio::sync::watch::channel(false);
            metastore_loadgen::run(&cli, stop).await.expect("run")
        }
    };
    let root_ok = run("root:rootpw").await;
    assert_eq!(root_ok.errors, 0, "{}", root_ok.text());
    assert_eq!(root_ok.summary.count, 20);
    let denied = run("u:upw").await;
    assert_eq!(denied.summary.count, 0, "{}", denied.text());
    assert_eq!(denied.errors, 20, "{}", denied.text());
}
