//! A member whose disk is full: it restarts and serves what it holds.
//!
//! The data directory lives on a small tmpfs that the test mounts, so these tests need root
//! (CI runs as root); elsewhere they say so and return.

use etcd_client::GetOptions;

use crate::harness::Server;
use crate::small_disk::SmallDisk;
use crate::util::{keys, values, Rev};

/// Regression (issue 11, defect 7): start-up rewrote `member/identity` on every start, so a
/// member on a full disk could not restart at all. The disk (256 MiB) holds a preallocated WAL
/// segment (64 MiB) and, with RocksDB, the ballast (64 MiB) before it is filled up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_a_full_disk_serves_reads() {
    let Some(disk) = SmallDisk::mount(256) else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let data = disk.path();
    let server = Server::try_start(&data, &[]).unwrap();
    let mut c = server.client().await;
    for i in 0..100 {
        c.put(format!("full/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    drop(c);
    server.kill();

    assert!(disk.fill() > 0);
    assert!(disk.is_full(), "the disk is full");
    let server = Server::try_start(&data, &[]).unwrap_or_else(|log| {
        panic!("a member on a full disk must restart; it said:\n{log}");
    });
    let mut c = server.client().await;
    let got = c
        .get("full/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), 100);
    assert_eq!(keys(got.kvs())[7], "full/007");
    assert_eq!(values(got.kvs())[99], "v99");
    assert_eq!(got.rev(), 101);
    // Serializable reads too (no Raft round).
    let got = c
        .get("full/042", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(values(got.kvs()), vec!["v42".to_string()]);
    if std::env::var("METASTORE_TEST_ENGINE").as_deref() == Ok("rocksdb") {
        // RocksDB's databases opened in the space the ballast gave back.
        assert!(
            server.log().contains("released the ballast"),
            "{}",
            server.log()
        );
    }
}
