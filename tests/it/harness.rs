//! Starts real `metastore` processes on ephemeral ports and stops them when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How long a server may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A spawned server that has not printed its ready line yet.
struct Starting {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<String>>,
    data_dir: PathBuf,
}

impl Starting {
    /// Kills a server that will not be waited for.
    fn abandon(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the ready line; on failure kills the process and returns its output.
    fn wait_ready(mut self) -> Result<Server, String> {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        let mut seen = String::new();
        let mut endpoint = None;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // The first client URL is the harness's own `http://127.0.0.1:0`.
                    if let Some(addr) = line.split("serving client requests on ").nth(1) {
                        endpoint = endpoint.or(addr.split_whitespace().next().map(str::to_string));
                    }
                    let ready = line.contains("ready to serve client requests");
                    seen.push_str(&line);
                    seen.push('\n');
                    if ready {
                        break;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let status = self.child.wait().ok();
                    return Err(format!(
                        "server did not become ready (exit: {status:?}); output:\n{seen}"
                    ));
                }
            }
        }
        Ok(Server {
            child: self.child,
            endpoint: endpoint.expect("the server printed its address before the ready line"),
            data_dir: self.data_dir,
            startup_log: seen,
            log: self.log,
            _peers: Vec::new(),
            _tmp: None,
        })
    }
}

/// A running server. Dropping it kills the process.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT` of the client listener.
    pub endpoint: String,
    /// The server's data directory.
    pub data_dir: PathBuf,
    /// Everything the server logged up to its ready line.
    pub startup_log: String,
    log: Arc<Mutex<String>>,
    /// The other members, when this server is one member of a cluster (dropped, so killed,
    /// before the data directories go).
    _peers: Vec<Server>,
    _tmp: Option<tempfile::TempDir>,
}

/// Where [`Server::start`] runs the server a suite talks to, from `METASTORE_TEST_TOPOLOGY`:
/// unset or `single`, a lone member; `follower` or `leader`, that member of a fresh
/// three-member cluster (the KV, txn, watch and lease suites run so in CI).
fn topology() -> Option<bool> {
    match std::env::var("METASTORE_TEST_TOPOLOGY").as_deref() {
        Err(_) | Ok("") | Ok("single") => None,
        Ok("leader") => Some(true),
        Ok("follower") => Some(false),
        Ok(other) => panic!("METASTORE_TEST_TOPOLOGY={other}: expected single, leader or follower"),
    }
}

/// How many members [`Server::start`] starts (see [`topology`]).
pub fn members_started() -> usize {
    if topology().is_some() {
        3
    } else {
        1
    }
}

impl Server {
    /// A fresh server on a temporary data directory with 2 shards: a lone member, or one
    /// member of a three-member cluster (see [`topology`]).
    pub fn start() -> Server {
        if let Some(leader) = topology() {
            return Server::start_in_cluster(leader);
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = Server::try_start(tmp.path(), &[]).expect("server starts");
        s._tmp = Some(tmp);
        s
    }

    /// Three fresh members of a new cluster on free ports, all ready (a member is ready once
    /// it knows a leader). On failure, the members started so far are stopped.
    fn try_start_cluster() -> Result<(tempfile::TempDir, Vec<Server>), String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut starting = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let dir = tmp.path().join(format!("m{i}"));
            let (curl, purl) = (
                format!("http://127.0.0.1:{client}"),
                format!("http://127.0.0.1:{peer}"),
            );
            let args = [
                "--data-dir",
                &dir.display().to_string(),
                "--name",
                &format!("m{i}"),
                "--listen-client-urls",
                &curl,
                "--advertise-client-urls",
                &curl,
                "--listen-peer-urls",
                &purl,
                "--initial-advertise-peer-urls",
                &purl,
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
            ]
            .map(str::to_string)
            .to_vec();
            match Server::spawn(&dir, args, &[], &[]) {
                Ok(member) => starting.push(member),
                Err(e) => {
                    starting.into_iter().for_each(Starting::abandon);
                    return Err(e);
                }
            }
        }
        // Every member is waited for (a failed one is killed by its wait), so none is left
        // running when another fails; the started ones are killed when dropped.
        let members: Vec<Result<Server, String>> =
            starting.into_iter().map(Starting::wait_ready).collect();
        let members = members
            .into_iter()
            .collect::<Result<Vec<Server>, String>>()?;
        Ok((tmp, members))
    }

    /// Starts a three-member cluster with etcd's flags and returns its leader (`leader`) or a
    /// follower; the other members live as long as the returned server.
    fn start_in_cluster(leader: bool) -> Server {
        // Ports are picked before the members bind them (every member must know every peer
        // URL up front), so another process may take one meanwhile: start again on new ones.
        let mut attempt = 0;
        let (tmp, mut members) = loop {
            attempt += 1;
            match Server::try_start_cluster() {
                Ok(started) => break started,
                Err(e) if e.contains("cannot listen") && attempt < 5 => continue,
                Err(e) => panic!("cluster members start: {e}"),
            }
        };
        // Every member is ready only once it knows a leader; ask them who it is.
        let endpoints: Vec<&str> = members.iter().map(|m| m.endpoint.as_str()).collect();
        let status = ok_stdout(&etcdctl(
            &endpoints.join(","),
            &["endpoint", "status", "-w", "json"],
            None,
        ));
        let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
        let rows = status.as_array().expect("one row per endpoint");
        let is_leader = |row: &serde_json::Value| {
            row["Status"]["leader"] == row["Status"]["header"]["member_id"]
        };
        let pick = rows
            .iter()
            .position(|row| is_leader(row) == leader)
            .expect("a member in the role asked for");
        let endpoint = rows[pick]["Endpoint"]
            .as_str()
            .expect("endpoint")
            .to_string();
        let at = members
            .iter()
            .position(|m| m.endpoint == endpoint)
            .expect("a started member");
        let mut chosen = members.remove(at);
        chosen._tmp = Some(tmp);
        chosen._peers = members;
        chosen
    }

    /// Starts a server on `data_dir` with extra flags; on failure returns everything it printed.
    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Server::try_start_with_env(data_dir, extra, &[])
    }

    /// Like [`Server::try_start`], with extra environment variables for the server process.
    pub fn try_start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen-client-urls".into(),
            "http://127.0.0.1:0".into(),
        ];
        // A single member still listens for peers; an ephemeral port keeps tests apart.
        if !extra.contains(&"--listen-peer-urls") {
            args.extend(["--listen-peer-urls".into(), "http://127.0.0.1:0".into()]);
        }
        Server::spawn(data_dir, args, extra, env)?.wait_ready()
    }

    /// Spawns a server without waiting for it: every member of a cluster must be running
    /// before any can elect a leader.
    fn spawn(
        data_dir: &Path,
        mut args: Vec<String>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Starting, String> {
        if !extra.contains(&"--shards") {
            args.extend(["--shards".into(), "2".into()]);
        }
        // The whole suite runs once per engine: METASTORE_TEST_ENGINE=rocksdb selects RocksDB.
        if !extra.contains(&"--storage-engine") {
            if let Ok(engine) = std::env::var("METASTORE_TEST_ENGINE") {
                args.extend(["--storage-engine".into(), engine]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        // Relative paths a server creates (etcd's `unix://host:port` socket files) land next to
        // its data directory, in the test's temporary directory, not in the repository.
        let cwd = data_dir.parent().unwrap_or(data_dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_metastore"))
            .current_dir(cwd)
            .args(&args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn metastore: {e}"))?;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let log = Arc::new(Mutex::new(String::new()));
        let keep = log.clone();
        // Keeps draining stderr for the life of the process so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = keep.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = tx.send(line);
            }
        });
        Ok(Starting {
            child,
            lines: rx,
            log,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for the server to log a line containing
    /// `needle`; whether it did. The server logs on its own schedule, so a
    /// line about something a client just saw may come a moment later.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.log.lock().unwrap().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A connected `etcd-client` client.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.as_str()], None)
            .await
            .expect("connect")
    }

    /// Runs `etcdctl` against this server.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        etcdctl(&self.endpoint, args, None)
    }

    /// Runs `etcdctl` with `stdin` as its input.
    pub fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        etcdctl(&self.endpoint, args, Some(stdin))
    }

    /// Waits (up to `timeout`) for the process to exit by itself; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends SIGTERM: the server stops gracefully (etcd's `Stop`).
    pub fn terminate(&self) {
        // SAFETY: kill(2) on the pid of a child this struct still owns (not yet reaped).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {}", self.child.id());
    }

    /// Waits (up to `timeout`) for the process to exit; its exit status, or `None` if it is
    /// still running.
    pub fn wait_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server and waits for it to die.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs etcdctl (API v3) against `endpoint`.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl is installed (apt-get install etcd-client)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// stdout of a successful command, as text; panics with stderr otherwise.
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real etcd (the Debian `etcd-server` package that `.ci/deps.sh` installs) on free loopback
/// ports with a temporary data dir, for tests that run the same client against both servers.
/// Dropping it kills the process.
pub struct Etcd {
    child: Child,
    /// `127.0.0.1:PORT` of the client listener.
    pub endpoint: String,
    _tmp: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

impl Etcd {
    /// Starts etcd and waits until `etcdctl endpoint health` succeeds.
    pub fn start() -> Etcd {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        Etcd::start_in(tmp, &data, "ref", free_port())
    }

    /// Starts etcd as member `name` with peer URL `http://127.0.0.1:<peer>` on `data_dir`
    /// (which may already hold a member, such as one `etcdctl snapshot restore` wrote), keeping
    /// `tmp` until it stops, and waits until `etcdctl endpoint health` succeeds.
    pub fn start_in(tmp: tempfile::TempDir, data_dir: &Path, name: &str, peer: u16) -> Etcd {
        let client = free_port();
        let curl = format!("http://127.0.0.1:{client}");
        let purl = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", name, "--data-dir"])
            .arg(data_dir)
            .args([
                "--listen-client-urls",
                &curl,
                "--advertise-client-urls",
                &curl,
            ])
            .args([
                "--listen-peer-urls",
                &purl,
                "--initial-advertise-peer-urls",
                &purl,
            ])
            .args(["--initial-cluster", &format!("{name}={purl}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)");
        let etcd = Etcd {
            child,
            endpoint: format!("127.0.0.1:{client}"),
            _tmp: tmp,
        };
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while !etcdctl(&etcd.endpoint, &["endpoint", "health"], None)
            .status
            .success()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
