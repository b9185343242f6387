//! Starting and stopping the servers under test, each single-member on loopback with its own
//! temporary data dir and fsync on, and reading their CPU time and memory use. Besides etcd and
//! MetaStore, the gRPC floor (`metastore-grpc-floor`): MetaStore's KV service on tonic with no
//! work behind it, the least any server on that stack spends per request; and the durable
//! floor, the same with each Put group-committed to a file with `fdatasync` before its answer.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// etcd (the Debian `etcd-server` package).
    Etcd,
    /// MetaStore.
    MetaStore,
    /// `metastore-grpc-floor`: the gRPC stack alone (Put and Range only; nothing stored).
    GrpcFloor,
    /// `metastore-grpc-floor --wal-dir`: the gRPC stack plus a group-committed `fdatasync` per
    /// Put (Put, and Watch on single keys; nothing replicated, indexed or stored).
    DurableFloor,
}

impl Kind {
    /// Display name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::MetaStore => "MetaStore",
            Kind::GrpcFloor => "gRPC floor",
            Kind::DurableFloor => "durable floor",
        }
    }

    /// Whether this is one of the floors (`metastore-grpc-floor`), not a real server.
    pub fn is_floor(self) -> bool {
        matches!(self, Kind::GrpcFloor | Kind::DurableFloor)
    }
}

/// Binaries and extra flags.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// etcd binary.
    pub etcd: PathBuf,
    /// MetaStore binary.
    pub metastore: PathBuf,
    /// Extra flags for MetaStore (e.g. `--storage-engine rocksdb`).
    pub metastore_args: Vec<String>,
    /// The load generator.
    pub loadgen: PathBuf,
    /// `metastore-grpc-floor`.
    pub grpc_floor: PathBuf,
}

/// A running server; stopped (SIGKILL, then reaped) and its data dir removed on drop.
pub struct Server {
    /// Which server.
    pub kind: Kind,
    /// host:port of its client URL.
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Starts `kind` on free loopback ports and waits until it answers a range request.
    pub fn start(kind: Kind, bins: &Binaries) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("bench-{}-", kind.name()))
            .tempdir_in(std::env::var_os("BENCH_DATA_ROOT").unwrap_or_else(|| "/tmp".into()))?;
        let (client, peer) = (free_port()?, free_port()?);
        let curl = format!("http://127.0.0.1:{client}");
        let purl = format!("http://127.0.0.1:{peer}");
        let data = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let mut cmd = match kind {
            Kind::Etcd => Command::new(&bins.etcd),
            Kind::MetaStore => Command::new(&bins.metastore),
            Kind::GrpcFloor | Kind::DurableFloor => Command::new(&bins.grpc_floor),
        };
        if kind.is_floor() {
            // Its best layout: a current-thread runtime per CPU, each with its own listener.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            cmd.args(["--runtime", "per-core", "--workers", &cpus.to_string()])
                .arg("--listen")
                .arg(format!("127.0.0.1:{client}"));
            if kind == Kind::DurableFloor {
                // Its cheapest sync policy: under load, a sync waits a millisecond for more
                // Puts to join it (bench/README.md, step 15).
                cmd.arg("--wal-dir")
                    .arg(&data)
                    .args(["--group-wait-ms", "1"]);
            }
        } else {
            cmd.arg("--name")
                .arg("bench")
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(&curl)
                .arg("--advertise-client-urls")
                .arg(&curl)
                .arg("--listen-peer-urls")
                .arg(&purl)
                .arg("--initial-advertise-peer-urls")
                .arg(&purl)
                .arg("--initial-cluster")
                .arg(format!("bench={purl}"));
        }
        if kind == Kind::MetaStore {
            cmd.args(&bins.metastore_args);
        }
        // Neither server may pick up settings from the caller's environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", kind.name()))?;
        let server = Server {
            kind,
            endpoint: format!("127.0.0.1:{client}"),
            child,
            _dir: dir,
        };
        server.wait_ready(bins, Duration::from_secs(60))?;
        Ok(server)
    }

    fn wait_ready(&self, bins: &Binaries, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let probe = Command::new(&bins.loadgen)
                .args(["--endpoints", &self.endpoint, "--dial-timeout", "1s"])
                .args(["--total", "1", "--output", "json", "range", "ready-probe"])
                .stderr(Stdio::null())
                .output();
            if let Ok(out) = probe {
                if out.status.success() {
                    let v: serde_json::Value =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    if v["count"] == 1 {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready within {timeout:?}; see {}",
                    self.kind.name(),
                    self.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self._dir.path().join("server.log")
    }

    /// The data dir.
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// CPU time the server process has used so far, user + system, seconds (`utime` and
    /// `stime`, fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks of 1/100 s: Linux's
    /// `USER_HZ` is 100 on every architecture it exports to user space).
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The command name (field 2) is in parentheses and may hold spaces: count from after it.
        let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state): utime is field 14, stime field 15.
        let tick = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i - 3)
                .context("short /proc stat")?
                .parse::<u64>()? as f64)
        };
        Ok((tick(14)? + tick(15)?) / 100.0)
    }

    /// Peak and current resident set size, bytes (`VmHWM`, `VmRSS` from /proc).
    pub fn rss(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("{name} missing from /proc status"))?;
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .context("malformed /proc status")?
                .parse()?;
            Ok(kb * 1024)
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }
}

/// Bytes under `path`, recursively.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
