//! TLS on the client and peer ports: certificates made here with rcgen, served to etcd-client
//! and etcdctl, mutual TLS, CRLs, auto-TLS, and clusters whose members talk over TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};

use crate::harness::{etcdctl, free_port, ok_stdout, Server};
use crate::util::get_value;

/// A test CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A leaf (server and client usage) signed by `ca` for localhost and 127.0.0.1: (cert PEM,
/// key PEM).
fn leaf(ca: &Ca, cn: &str, serial: u64, expired: bool) -> (String, String) {
    leaf_for(ca, cn, serial, expired, &["localhost", "127.0.0.1"])
}

/// A leaf signed by `ca`, valid for the names and IPs in `sans`.
fn leaf_for(ca: &Ca, cn: &str, serial: u64, expired: bool, sans: &[&str]) -> (String, String) {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.serial_number = Some(SerialNumber::from(serial));
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn crl(ca: &Ca, revoked: &[u64]) -> String {
    let now = time::OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: now - time::Duration::hours(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca.issuer)
    .unwrap()
    .pem()
    .unwrap()
}

/// Writes `name` under `dir` and returns its path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Files for one server: CA, server cert/key, a good client cert/key.
struct Files {
    ca: String,
    cert: String,
    key: String,
    client_cert: String,
    client_key: String,
    ca_pem: String,
    client_pem: (String, String),
}

fn files(dir: &Path, ca: &Ca) -> Files {
    let (cert, key) = leaf(ca, "server", 1, false);
    let client_pem = leaf(ca, "client", 2, false);
    Files {
        ca: write(dir, "ca.pem", &ca.pem),
        cert: write(dir, "server.pem", &cert),
        key: write(dir, "server-key.pem", &key),
        client_cert: write(dir, "client.pem", &client_pem.0),
        client_key: write(dir, "client-key.pem", &client_pem.1),
        ca_pem: ca.pem.clone(),
        client_pem,
    }
}

fn https(server: &Server) -> String {
    format!("https://{}", server.endpoint)
}

async fn tls_client(
    endpoint: &str,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Client, etcd_client::Error> {
    let mut tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let opts = ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    let mut client = Client::connect([endpoint], Some(opts)).await?;
    // The connection is lazy in places: a request proves the handshake went through.
    client.get("probe", None).await?;
    Ok(client)
}

fn start(dir: &Path, flags: &[&str]) -> Server {
    let data = dir.join("data");
    let mut all = vec!["--listen-client-urls", "https://127.0.0.1:0"];
    all.extend_from_slice(flags);
    Server::try_start(&data, &all).expect("server starts")
}

#[tokio::test]
async fn client_tls_serves_etcd_client_and_etcdctl_and_refuses_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), &ca("test-ca"));
    let server = start(dir.path(), &["--cert-file", &f.cert, "--key-file", &f.key]);
    let endpoint = https(&server);

    let mut client = tls_client(&endpoint, &f.ca_pem, None)
        .await
        .expect("TLS client");
    client.put("k", "over-tls", None).await.unwrap();
    let got = ok_stdout(&etcdctl(
        &endpoint,
        &["--cacert", &f.ca, "get", "k", "--print-value-only"],
        None,
    ));
    assert_eq!(got.trim(), "over-tls");
    ok_stdout(&etcdctl(
        &endpoint,
        &["--cacert", &f.ca, "put", "k2", "v2"],
        None,
    ));

    // Plain text on the TLS port: refused, and the member keeps serving.
    let plain = etcdctl(
        &format!("http://{}", server.endpoint),
        &["get", "k", "--dial-timeout=2s", "--command-timeout=3s"],
        None,
    );
    assert!(!plain.status.success(), "plain text must be refused");
    let mut plain_client = Client::connect(
        [format!("http://{}", server.endpoint)],
        Some(ConnectOptions::new().with_timeout(Duration::from_secs(3))),
    )
    .await;
    if let Ok(c) = plain_client.as_mut() {
        assert!(
            c.get("k", None).await.is_err(),
            "plain-text request must fail"
        );
    }
    // Without the CA the server's certificate is not trusted.
    let untrusted = etcdctl(
        &endpoint,
        &["get", "k", "--dial-timeout=2s", "--command-timeout=3s"],
        None,
    );
    assert!(!untrusted.status.success());
    let got = ok_stdout(&etcdctl(
        &endpoint,
        &["--cacert", &f.ca, "get", "k2", "--print-value-only"],
        None,
    ));
    assert_eq!(got.trim(), "v2");
    assert!(
        server.wait_log("rejected connection", Duration::from_secs(10)),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("test-ca");
    let f = files(dir.path(), &ca1);
    let other = ca("other-ca");
    let (ocert, okey) = leaf(&other, "intruder", 3, false);
    let (ocert, okey) = (
        write(dir.path(), "other.pem", &ocert),
        write(dir.path(), "other-key.pem", &okey),
    );
    let (ecert, ekey) = leaf(&ca1, "old", 4, true);
    let (ecert, ekey) = (
        write(dir.path(), "expired.pem", &ecert),
        write(dir.path(), "expired-key.pem", &ekey),
    );
    let server = start(
        dir.path(),
        &[
            "--cert-file",
            &f.cert,
            "--key-file",
            &f.key,
            "--trusted-ca-file",
            &f.ca,
            "--client-cert-auth",
        ],
    );
    let endpoint = https(&server);
    let short = ["--dial-timeout=2s", "--command-timeout=3s"];

    let mut good = tls_client(&endpoint, &f.ca_pem, Some(&f.client_pem))
        .await
        .expect("client with a cert");
    good.put("a", "1", None).await.unwrap();

    assert!(
        tls_client(&endpoint, &f.ca_pem, None).await.is_err(),
        "no client cert must be refused"
    );
    let refused = |cert: &str, key: &str| {
        let mut args = vec!["--cacert", &f.ca, "--cert", cert, "--key", key];
        args.extend(short);
        args.extend(["get", "a"]);
        let out = etcdctl(&endpoint, &args, None);
        assert!(!out.status.success(), "{cert} must be refused");
    };
    let mut args = vec!["--cacert", f.ca.as_str()];
    args.extend(short);
    args.extend(["get", "a"]);
    assert!(
        !etcdctl(&endpoint, &args, None).status.success(),
        "no cert via etcdctl"
    );
    refused(&ocert, &okey);
    refused(&ecert, &ekey);

    // The good client still gets through, old connection and new ones.
    good.put("a", "2", None).await.unwrap();
    let got = ok_stdout(&etcdctl(
        &endpoint,
        &[
            "--cacert",
            &f.ca,
            "--cert",
            &f.client_cert,
            "--key",
            &f.client_key,
            "get",
            "a",
            "--print-value-only",
        ],
        None,
    ));
    assert_eq!(got.trim(), "2");
}

#[tokio::test]
async fn crl_refuses_revoked_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("test-ca");
    let f = files(dir.path(), &ca1);
    let revoked_pem = leaf(&ca1, "revoked", 77, false);
    let (rcert, rkey) = (
        write(dir.path(), "r.pem", &revoked_pem.0),
        write(dir.path(), "r-key.pem", &revoked_pem.1),
    );
    let crl_file = write(dir.path(), "crl.pem", &crl(&ca1, &[77]));
    let server = start(
        dir.path(),
        &[
            "--cert-file",
            &f.cert,
            "--key-file",
            &f.key,
            "--trusted-ca-file",
            &f.ca,
            "--client-cert-auth",
            "--client-crl-file",
            &crl_file,
        ],
    );
    let endpoint = https(&server);
    assert!(
        tls_client(&endpoint, &f.ca_pem, Some(&revoked_pem))
            .await
            .is_err(),
        "revoked cert must be refused"
    );
    let out = etcdctl(
        &endpoint,
        &[
            "--cacert",
            &f.ca,
            "--cert",
            &rcert,
            "--key",
            &rkey,
            "--dial-timeout=2s",
            "--command-timeout=3s",
            "put",
            "x",
            "y",
        ],
        None,
    );
    assert!(!out.status.success());
    ok_stdout(&etcdctl(
        &endpoint,
        &[
            "--cacert",
            &f.ca,
            "--cert",
            &f.client_cert,
            "--key",
            &f.client_key,
            "put",
            "x",
            "y",
        ],
        None,
    ));
}

#[tokio::test]
async fn auto_tls_generates_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &["--auto-tls", "--self-signed-cert-validity", "2"],
    );
    let endpoint = https(&server);
    let fixtures = server.data_dir.join("fixtures").join("client");
    assert!(fixtures.join("cert.pem").exists() && fixtures.join("key.pem").exists());
    ok_stdout(&etcdctl(
        &endpoint,
        &[
            "--insecure-transport=false",
            "--insecure-skip-tls-verify",
            "put",
            "auto",
            "tls",
        ],
        None,
    ));
    let got = ok_stdout(&etcdctl(
        &endpoint,
        &[
            "--insecure-transport=false",
            "--insecure-skip-tls-verify",
            "get",
            "auto",
            "--print-value-only",
        ],
        None,
    ));
    assert_eq!(got.trim(), "tls");
    // Self-signed: a verifying client does not trust it.
    let out = etcdctl(
        &endpoint,
        &["--dial-timeout=2s", "--command-timeout=3s", "get", "auto"],
        None,
    );
    assert!(!out.status.success());
}

#[test]
fn bad_tls_settings_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let err = Server::try_start(
        &dir.path().join("a"),
        &["--listen-client-urls", "https://127.0.0.1:0"],
    )
    .err()
    .expect("https without a certificate must not start");
    assert!(
        err.contains("TLS key/cert (--cert-file, --key-file) must be provided"),
        "{err}"
    );
    let err = Server::try_start(&dir.path().join("b"), &["--tls-min-version", "TLS1.1"])
        .err()
        .expect("TLS1.1 is refused");
    assert!(err.contains("TLS1.1 is not supported"), "{err}");
    let err = Server::try_start(&dir.path().join("c"), &["--cipher-suites", "TLS_BOGUS"])
        .err()
        .expect("an unknown suite is refused");
    assert!(err.contains("unexpected TLS cipher suite"), "{err}");
}

/// Starts `n` members with `https://` peer URLs and `flags(i)` each; returns them once ready.
fn start_tls_cluster(dir: &Path, n: usize, flags: impl Fn(usize) -> Vec<String>) -> Vec<Server> {
    // Peer ports are picked before the members bind them, so another process may take one
    // meanwhile: start again on new ones (as `Cluster::start` does).
    for attempt in 1.. {
        let peers: Vec<String> = (0..n)
            .map(|_| format!("https://127.0.0.1:{}", free_port()))
            .collect();
        let args = cluster_args(&peers, &flags);
        match try_start_members(dir, &args) {
            Ok(members) => return members,
            Err(e) if e.contains("cannot listen") && attempt < 5 => {
                for i in 0..n {
                    let _ = std::fs::remove_dir_all(dir.join(format!("m{i}")));
                }
            }
            Err(e) => panic!("member starts: {e}"),
        }
    }
    unreachable!()
}

/// Each member's flags for a cluster whose members `m0..` listen for peers on `peer_urls`.
fn cluster_args(peer_urls: &[String], flags: &impl Fn(usize) -> Vec<String>) -> Vec<Vec<String>> {
    let initial = (0..peer_urls.len())
        .map(|i| format!("m{i}={}", peer_urls[i]))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("tls-{}", free_port());
    (0..peer_urls.len())
        .map(|i| {
            let purl = &peer_urls[i];
            let mut args: Vec<String> = [
                "--name",
                &format!("m{i}"),
                "--listen-peer-urls",
                purl,
                "--initial-advertise-peer-urls",
                purl,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &token,
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]
            .map(str::to_string)
            .to_vec();
            args.extend(flags(i));
            args
        })
        .collect()
}

/// Starts member `m{i}` of `dir` with `args[i]`, all at once (none can elect alone).
fn start_members(dir: &Path, args: &[Vec<String>]) -> Vec<Server> {
    try_start_members(dir, args).unwrap_or_else(|e| panic!("member starts: {e}"))
}

/// As [`start_members`]; the first member's failure is the error (the others are stopped).
fn try_start_members(dir: &Path, args: &[Vec<String>]) -> Result<Vec<Server>, String> {
    let handles: Vec<_> = args
        .iter()
        .enumerate()
        .map(|(i, args)| {
            let data = dir.join(format!("m{i}"));
            let args = args.clone();
            std::thread::spawn(move || {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                Server::try_start(&data, &refs)
            })
        })
        .collect();
    // Collecting into a Result drops (stops) the members that did start if one did not.
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

async fn put_on_first_read_on_last(members: &[Server]) {
    let mut first = members[0].client().await;
    first.put("peer-tls", "replicated", None).await.unwrap();
    let mut last = members[members.len() - 1].client().await;
    let got = last.get("peer-tls", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"replicated");
}

#[tokio::test]
async fn cluster_with_peer_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("peer-ca");
    let mut per_member = Vec::new();
    for i in 0..3 {
        let (c, k) = leaf(&ca1, &format!("peer{i}"), 100 + i, false);
        per_member.push((
            write(dir.path(), &format!("p{i}.pem"), &c),
            write(dir.path(), &format!("p{i}-key.pem"), &k),
        ));
    }
    let ca_file = write(dir.path(), "peer-ca.pem", &ca1.pem);
    let members = start_tls_cluster(dir.path(), 3, |i| {
        [
            "--peer-cert-file",
            &per_member[i].0,
            "--peer-key-file",
            &per_member[i].1,
            "--peer-trusted-ca-file",
            &ca_file,
            "--peer-client-cert-auth",
        ]
        .map(str::to_string)
        .to_vec()
    });
    put_on_first_read_on_last(&members).await;
    assert!(members[0].startup_log.contains("starting with peer TLS"));
}

#[tokio::test]
async fn cluster_with_peer_auto_tls() {
    let dir = tempfile::tempdir().unwrap();
    let members = start_tls_cluster(dir.path(), 3, |_| vec!["--peer-auto-tls".to_string()]);
    put_on_first_read_on_last(&members).await;
    assert!(members[1].data_dir.join("fixtures/peer/cert.pem").exists());
}

/// The Peer service answers anything else with Unimplemented: a gRPC status proves the TLS
/// handshake was accepted, a transport error that it was refused.
async fn peer_port_accepts(endpoint: &str, ca_pem: &str, identity: &(String, String)) -> bool {
    match tls_client(endpoint, ca_pem, Some(identity)).await {
        Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Unimplemented => true,
        Ok(_) => panic!("the peer port served a KV request"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn peer_cert_allowed_cn_and_hostname_restrict_peer_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("peer-ca");
    let f = files(dir.path(), &ca1);
    let peer0 = leaf(&ca1, "peer0", 300, false);
    let peer2 = leaf(&ca1, "peer2", 302, false);
    let peer_port = |server: &Server| {
        let line = server
            .startup_log
            .lines()
            .find_map(|l| l.split("serving peer traffic on ").nth(1))
            .expect("peer address logged")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        format!("https://{line}")
    };
    let tls = [
        "--listen-peer-urls",
        "https://127.0.0.1:0",
        "--peer-cert-file",
        &f.cert,
        "--peer-key-file",
        &f.key,
        "--peer-trusted-ca-file",
        &f.ca,
        "--peer-client-cert-auth",
    ];
    let mut flags = tls.to_vec();
    flags.extend(["--peer-cert-allowed-cn", "peer0"]);
    let server = Server::try_start(&dir.path().join("cn"), &flags).expect("starts");
    let endpoint = peer_port(&server);
    assert!(
        peer_port_accepts(&endpoint, &f.ca_pem, &peer0).await,
        "CN peer0 is allowed"
    );
    assert!(
        !peer_port_accepts(&endpoint, &f.ca_pem, &peer2).await,
        "CN peer2 is not"
    );
    assert!(
        server.wait_log(
            "client certificate authentication failed",
            Duration::from_secs(10)
        ),
        "{}",
        server.log()
    );
    drop(server);

    // Every test leaf is valid for localhost; none for example.com.
    let mut flags = tls.to_vec();
    flags.extend(["--peer-cert-allowed-hostname", "example.com"]);
    let server = Server::try_start(&dir.path().join("host"), &flags).expect("starts");
    assert!(!peer_port_accepts(&peer_port(&server), &f.ca_pem, &peer0).await);
    drop(server);
    let mut flags = tls.to_vec();
    flags.extend(["--peer-cert-allowed-hostname", "localhost"]);
    let server = Server::try_start(&dir.path().join("host2"), &flags).expect("starts");
    assert!(peer_port_accepts(&peer_port(&server), &f.ca_pem, &peer0).await);
}

#[tokio::test]
async fn mixed_http_and_https_client_urls_serve_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let f = files(dir.path(), &ca("test-ca"));
    let server = Server::try_start(
        &dir.path().join("data"),
        &[
            "--listen-client-urls",
            "http://127.0.0.1:0,https://127.0.0.1:0",
            "--cert-file",
            &f.cert,
            "--key-file",
            &f.key,
        ],
    )
    .expect("server starts");
    // One "serving client requests on ADDR ... scheme=..." line per URL, in order.
    let addrs: Vec<&str> = server
        .startup_log
        .lines()
        .filter_map(|l| l.split("serving client requests on ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(addrs.len(), 2, "{}", server.startup_log);
    let (plain, tls) = (
        format!("http://{}", addrs[0]),
        format!("https://{}", addrs[1]),
    );
    ok_stdout(&etcdctl(&plain, &["put", "mixed", "yes"], None));
    let got = ok_stdout(&etcdctl(
        &tls,
        &["--cacert", &f.ca, "get", "mixed", "--print-value-only"],
        None,
    ));
    assert_eq!(got.trim(), "yes");
    // The TLS listener does not speak plain text.
    let out = etcdctl(
        &format!("http://{}", addrs[1]),
        &["get", "mixed", "--dial-timeout=2s", "--command-timeout=3s"],
        None,
    );
    assert!(!out.status.success());
}

/// etcd's `unix://` and `unixs://` URLs: the socket file is named by the URL's host:port,
/// relative to the member's working directory (the harness runs members in `dir`).
#[tokio::test]
async fn unix_sockets_carry_peer_and_client_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("unix-ca");
    let f = files(dir.path(), &ca1);
    // Distinct "ports" keep the members' socket files apart; "localhost" is the name every
    // test certificate is valid for, and what a TLS peer dial checks.
    let base = free_port();
    let peers: Vec<String> = (0..3)
        .map(|i| format!("unixs://localhost:{}", base + i))
        .collect();
    let client_socket = |i: u16| format!("localhost:{}", base + 100 + i);
    let args = cluster_args(&peers, &|i| {
        [
            "--peer-cert-file",
            &f.cert,
            "--peer-key-file",
            &f.key,
            "--peer-trusted-ca-file",
            &f.ca,
            "--peer-client-cert-auth",
            "--listen-client-urls",
            &format!("http://127.0.0.1:0,unix://{}", client_socket(i as u16)),
        ]
        .map(str::to_string)
        .to_vec()
    });
    let mut members = start_members(dir.path(), &args);
    put_on_first_read_on_last(&members).await;
    for i in 0..3 {
        let peer_socket = dir.path().join(format!("localhost:{}", base + i));
        assert!(peer_socket.exists(), "{} exists", peer_socket.display());
    }

    // etcdctl (grpc-go) dials the client socket, relative to its own working directory.
    let etcdctl_unix = |i: u16, args: &[&str]| {
        std::process::Command::new("etcdctl")
            .current_dir(dir.path())
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=unix://{}", client_socket(i)))
            .arg("--command-timeout=10s")
            .args(args)
            .output()
            .expect("etcdctl is installed")
    };
    let got = ok_stdout(&etcdctl_unix(2, &["get", "peer-tls", "--print-value-only"]));
    assert_eq!(got.trim(), "replicated");

    // A restarted member replaces the socket files its last run left behind.
    drop(members.remove(0));
    assert!(
        dir.path().join(client_socket(0)).exists(),
        "stale socket left"
    );
    let refs: Vec<&str> = args[0].iter().map(String::as_str).collect();
    let _m0 = Server::try_start(&dir.path().join("m0"), &refs).expect("m0 restarts");
    ok_stdout(&etcdctl_unix(0, &["put", "after-restart", "1"]));
    let got = ok_stdout(&etcdctl_unix(
        1,
        &["get", "after-restart", "--print-value-only"],
    ));
    assert_eq!(got.trim(), "1");
}

/// etcd 3.5's `--peer-client-cert-file`: a dialing member presents that certificate, not its
/// serving one. The peers admit only the client certificate's CN, so the cluster forms only if
/// every member dials with it.
#[tokio::test]
async fn peer_client_cert_file_is_presented_when_dialing_peers() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("peer-ca");
    let (server_cert, server_key) = leaf(&ca1, "peer-server", 400, false);
    let (client_cert, client_key) = leaf(&ca1, "peer-client", 401, false);
    let paths = [
        write(dir.path(), "server.pem", &server_cert),
        write(dir.path(), "server-key.pem", &server_key),
        write(dir.path(), "client.pem", &client_cert),
        write(dir.path(), "client-key.pem", &client_key),
        write(dir.path(), "ca.pem", &ca1.pem),
    ];
    let members = start_tls_cluster(dir.path(), 3, |_| {
        [
            "--peer-cert-file",
            &paths[0],
            "--peer-key-file",
            &paths[1],
            "--peer-client-cert-file",
            &paths[2],
            "--peer-client-key-file",
            &paths[3],
            "--peer-trusted-ca-file",
            &paths[4],
            "--peer-client-cert-auth",
            "--peer-cert-allowed-cn",
            "peer-client",
        ]
        .map(str::to_string)
        .to_vec()
    });
    put_on_first_read_on_last(&members).await;
    assert!(!members[0].startup_log.contains(" ignored: "));

    // One of the pair alone is refused at start-up, as etcd refuses it.
    let err = Server::try_start(
        &dir.path().join("half"),
        &["--peer-client-cert-file", &paths[2]],
    )
    .err()
    .expect("a client certificate without its key is refused");
    assert!(
        err.contains("ClientKeyFile and ClientCertFile must both be present or both absent"),
        "{err}"
    );
}

/// kubeadm's etcd static pod command line (shared/reference/deployment.md), with the node's
/// IP (127.0.0.2 here), free ports and a temporary data directory: MetaStore starts from it
/// unchanged, and kube-apiserver's way in (a client certificate, CN
/// kube-apiserver-etcd-client) works on both client URLs, through etcdctl and etcd-client.
#[tokio::test]
async fn kubeadm_static_pod_command_line_starts_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let ca1 = ca("etcd-ca");
    let names = ["localhost", "127.0.0.1", "127.0.0.2", "node1"];
    let (server_crt, server_key) = leaf_for(&ca1, "node1", 10, false, &names);
    let (peer_crt, peer_key) = leaf_for(&ca1, "node1", 11, false, &names);
    let apiserver = leaf_for(&ca1, "kube-apiserver-etcd-client", 12, false, &[]);
    let ca_crt = write(pki, "ca.crt", &ca1.pem);
    let server_crt = write(pki, "server.crt", &server_crt);
    let server_key = write(pki, "server.key", &server_key);
    let peer_crt = write(pki, "peer.crt", &peer_crt);
    let peer_key = write(pki, "peer.key", &peer_key);
    let (client_port, peer_port, metrics_port) = (free_port(), free_port(), free_port());
    let ip = "127.0.0.2";
    let line = format!(
        "--advertise-client-urls=https://{ip}:{client_port} --cert-file={server_crt} \
         --client-cert-auth=true --experimental-initial-corrupt-check=true \
         --experimental-watch-progress-notify-interval=5s \
         --initial-advertise-peer-urls=https://{ip}:{peer_port} \
         --initial-cluster=node1=https://{ip}:{peer_port} --key-file={server_key} \
         --listen-client-urls=https://127.0.0.1:{client_port},https://{ip}:{client_port} \
         --listen-metrics-urls=http://127.0.0.1:{metrics_port} \
         --listen-peer-urls=https://{ip}:{peer_port} --name=node1 --peer-cert-file={peer_crt} \
         --peer-client-cert-auth=true --peer-key-file={peer_key} \
         --peer-trusted-ca-file={ca_crt} --snapshot-count=10000 --trusted-ca-file={ca_crt}"
    );
    let args: Vec<&str> = line.split_whitespace().collect();
    let server = Server::try_start(&dir.path().join("var-lib-etcd"), &args)
        .expect("kubeadm's command line starts MetaStore");
    for endpoint in [
        format!("https://127.0.0.1:{client_port}"),
        format!("https://{ip}:{client_port}"),
    ] {
        let mut c = tls_client(&endpoint, &ca1.pem, Some(&apiserver))
            .await
            .unwrap();
        c.put("/registry/pods/default/p", endpoint.as_str(), None)
            .await
            .unwrap();
        let status = c.status().await.unwrap();
        assert!(status.version().starts_with("3.5"), "{}", status.version());
        let apiserver_crt = write(pki, "apiserver-etcd-client.crt", &apiserver.0);
        let apiserver_key = write(pki, "apiserver-etcd-client.key", &apiserver.1);
        let got = ok_stdout(&etcdctl(
            &endpoint,
            &[
                "--cacert",
                &ca_crt,
                "--cert",
                &apiserver_crt,
                "--key",
                &apiserver_key,
                "get",
                "/registry/pods/default/p",
                "--print-value-only",
            ],
            None,
        ));
        assert_eq!(got.trim(), endpoint);
        // Without a client certificate the handshake is refused.
        assert!(tls_client(&endpoint, &ca1.pem, None).await.is_err());
    }
    let log = server.log();
    assert!(log.contains("starting with client TLS") && log.contains("starting with peer TLS"));
    // kubeadm's liveness and startup probes.
    for (probe, want) in [
        ("/health?exclude=NOSPACE&serializable=true", "200"),
        ("/health?serializable=false", "200"),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{metrics_port}{probe}"))
            .output()
            .expect("curl is installed");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{probe}");
    }
}

/// Go (and so etcd) accepts a client that presents a trusted CA certificate itself, a chain of
/// one root; webpki calls that "CA used as end entity". etcd's e2e fixture
/// `CommonName-root.crt` is such a certificate (`TestCtlV3AuthCertCNWithWithConcurrentOperation`).
#[tokio::test]
async fn a_trusted_ca_certificate_is_accepted_as_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "root");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let key = KeyPair::generate().unwrap();
    let root_pem = p.self_signed(&key).unwrap().pem();
    let root_key = key.serialize_pem();
    let ca1 = Ca {
        pem: root_pem.clone(),
        issuer: Issuer::new(p, key),
    };
    let f = files(dir.path(), &ca1);
    let server = start(
        dir.path(),
        &[
            "--cert-file",
            &f.cert,
            "--key-file",
            &f.key,
            "--trusted-ca-file",
            &f.ca,
            "--client-cert-auth",
        ],
    );
    let mut c = tls_client(&https(&server), &f.ca_pem, Some(&(root_pem, root_key)))
        .await
        .expect("the trusted root itself is a valid client certificate");
    c.put("k", "v", None).await.unwrap();
    // A CA certificate that is not trusted is still refused.
    let other = ca("untrusted-ca");
    let other_key = other.issuer.key().serialize_pem();
    assert!(
        tls_client(&https(&server), &f.ca_pem, Some(&(other.pem, other_key)))
            .await
            .is_err()
    );
}

/// With `--client-cert-auth`, a request without a token is made as the client certificate's
/// CN (etcd `AuthInfoFromTLS`): the CN user's permissions apply, a CN that names no user gets
/// "permission denied", and a token still wins over the certificate.
#[tokio::test]
async fn certificate_common_name_is_the_user_when_auth_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("cn-ca");
    let f = files(dir.path(), &ca1);
    let server = start(
        dir.path(),
        &[
            "--cert-file",
            &f.cert,
            "--key-file",
            &f.key,
            "--trusted-ca-file",
            &f.ca,
            "--client-cert-auth",
            "--bcrypt-cost",
            "4",
        ],
    );
    let endpoint = https(&server);
    // The client certificate's CN is "client".
    let mut c = tls_client(&endpoint, &f.ca_pem, Some(&f.client_pem))
        .await
        .unwrap();
    c.put("a", "1", None).await.unwrap();
    c.user_add("root", "rootpw", None).await.unwrap();
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.user_add("client", "clientpw", None).await.unwrap();
    c.role_add("reader").await.unwrap();
    c.role_grant_permission("reader", etcd_client::Permission::read("a"))
        .await
        .unwrap();
    c.user_grant_role("client", "reader").await.unwrap();
    c.auth_enable().await.unwrap();

    assert_eq!(get_value(&mut c, "a").await.as_deref(), Some("1"));
    let e = c.put("a", "2", None).await.unwrap_err().to_string();
    assert!(e.contains("etcdserver: permission denied"), "{e}");
    // A certificate whose CN is no user.
    let stranger = leaf(&ca1, "stranger", 77, false);
    let mut s = tls_client_no_probe(&endpoint, &f.ca_pem, &stranger).await;
    let e = s.get("a", None).await.unwrap_err().to_string();
    assert!(e.contains("etcdserver: permission denied"), "{e}");
    // A token (root's) beats the certificate.
    let opts = ConnectOptions::new().with_user("root", "rootpw").with_tls(
        TlsOptions::new()
            .ca_certificate(Certificate::from_pem(&f.ca_pem))
            .domain_name("localhost")
            .identity(Identity::from_pem(&f.client_pem.0, &f.client_pem.1)),
    );
    let mut r = Client::connect([endpoint.as_str()], Some(opts))
        .await
        .unwrap();
    r.put("a", "3", None).await.expect("root may write");
}

/// A TLS client with `identity`, without the probing read of [`tls_client`].
async fn tls_client_no_probe(endpoint: &str, ca_pem: &str, identity: &(String, String)) -> Client {
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(&identity.0, &identity.1));
    Client::connect([endpoint], Some(ConnectOptions::new().with_tls(tls)))
        .await
        .unwrap()
}
