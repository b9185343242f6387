//! The basic round trip through every layer.

use crate::harness::Server;
use crate::util::Rev;

#[tokio::test]
async fn put_then_get() {
    let server = Server::start();
    let mut c = server.client().await;
    let put = c.put("hello", "world", None).await.unwrap();
    assert_eq!(put.rev(), 2);
    let got = c.get("hello", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"world");
}

/// Runs the binary with `args` and returns (exit success, stderr).
fn run_metastore(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metastore"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run metastore");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_and_data_dirs_exit_non_zero_with_a_clear_error() {
    let (ok, err) = run_metastore(&["--no-such-flag"]);
    assert!(!ok && err.contains("--no-such-flag"), "{err}");

    let (ok, err) = run_metastore(&["--snapshot-count", "lots"]);
    assert!(!ok && err.contains("--snapshot-count"), "{err}");

    let (ok, err) = run_metastore(&["--election-timeout", "100"]);
    assert!(!ok && err.contains("--election-timeout"), "{err}");

    // A data dir that is a regular file cannot be used.
    let file = tempfile::NamedTempFile::new().unwrap();
    let path = file.path().to_str().unwrap();
    let (ok, err) = run_metastore(&[
        "--data-dir",
        path,
        "--listen-client-urls",
        "http://127.0.0.1:0",
    ]);
    assert!(
        !ok && err.contains("data directory") && err.contains(path),
        "{err}"
    );
}

/// Regression: when glommio could not build a shard's executor (here: RLIMIT_MEMLOCK below
/// what its io_uring rings need), start-up failed with only "shard 0 stopped while opening its
/// engine". The reason must reach the operator.
#[test]
fn a_shard_that_cannot_start_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // `ulimit -l 16` lowers the soft memlock limit to 16 KiB for the server alone.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -l 16 && exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_metastore"))
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--listen-client-urls", "http://127.0.0.1:0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run metastore under sh");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot start shard 0: "), "{err}");
    assert!(!err.contains("stopped while opening"), "{err}");
}

#[test]
fn environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().unwrap();
    // ETCD_MAX_TXN_OPS=1 must reject a txn with two ops.
    let server = Server::try_start_with_env(dir.path(), &[], &[("ETCD_MAX_TXN_OPS", "1")]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = server.client().await;
        let ops = vec![
            etcd_client::TxnOp::put("a", "1", None),
            etcd_client::TxnOp::put("b", "2", None),
        ];
        let err = c
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("too many operations in txn request"),
            "{err}"
        );
    });
}
