//! A member whose disk is full: it restarts and serves what it holds.
//!
//! The data directory lives on a small tmpfs that the test mounts, so these tests need root
//! (CI runs as root); elsewhere they say so and return.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use etcd_client::GetOptions;

use crate::harness::Server;
use crate::util::{keys, values, Rev};

/// A tmpfs of `megabytes` MiB mounted on a fresh temporary directory; unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts it, or `None` when this process may not mount (not root).
    fn mount(megabytes: u64) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes a file until the file system refuses (ENOSPC); returns the bytes written.
    fn fill(&self) -> u64 {
        let mut f = fs::File::create(self.dir.path().join("filler")).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        let mut written = 0;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "expected ENOSPC, got {e}");
                    break;
                }
            }
        }
        // And the last few bytes a partial write may have left.
        while let Ok(n) = f.write(&[0x5a]) {
            if n == 0 {
                break;
            }
            written += 1;
        }
        written
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn no_space_left(path: &Path) -> bool {
    fs::write(path.join("probe"), b"x").is_err()
}

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
    assert!(no_space_left(disk.dir.path()), "the disk is full");
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
