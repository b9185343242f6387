//! The one process harness of the black-box tests: it starts real `metastore` processes on
//! loopback ports and stops them when dropped. A [`Server`] is one member (a lone member, or,
//! with `METASTORE_TEST_TOPOLOGY`, the leader or a follower of a fresh three-member cluster);
//! a [`Cluster`] is n members that can be killed, restarted, SIGSTOPped, cut off from each
//! other and added to. Also: `etcdctl`, a reference [`Etcd`], and [`wait_until`] /
//! [`wait_until_async`] for waiting on a condition with a deadline.
//!
//! Both test targets include this file, `tests/it` and `tests/robustness`, each from its
//! `main.rs` as `#[path = "../common/harness.rs"] mod harness;`.

// Each target uses a different part of the harness.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::AtomicUsize;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;

/// How long a server may take to print its ready line (generous: the machine is shared).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Cluster::start`] waits for the members to agree on a leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `cond` until it holds or `timeout` passes; whether it held. The first polls come
/// quickly (10 ms), later ones back off to every 100 ms, so that an expensive condition (one
/// that runs `etcdctl`, say) does not load a busy machine.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// [`wait_until`] for an async condition (such as a client call), on the test's runtime.
pub async fn wait_until_async(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Runs `f`, which blocks (waiting for processes), without stalling other tasks on a
/// multi-threaded tokio runtime; on a current-thread runtime or outside one, just runs it.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A free loopback port (it may be taken again before a member binds it: the cluster starts
/// retry on new ports).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Sends `signal` (SIGSTOP, SIGCONT, SIGTERM...) to `pid`.
pub fn signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is a child we own.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

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
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = String::new();
        let mut endpoint = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    // The first client URL is the one the server is reached on (a lone
                    // member's is the harness's own `http://127.0.0.1:0`).
                    if let Some(addr) = line.split("serving client requests on ").nth(1) {
                        // Text lines end the address with a space, JSON lines with a quote.
                        let addr = addr.split(|c: char| c.is_whitespace() || c == '"').next();
                        endpoint = endpoint.or(addr.map(str::to_string));
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
            _cluster: None,
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
    /// The rest of the cluster, when this server is one member of it (see [`topology`]):
    /// dropped, so killed, after this server and before its data directory goes.
    _cluster: Option<Box<Cluster>>,
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

    /// Starts a three-member cluster with etcd's default timing and returns its leader
    /// (`leader`) or a follower; the other members live as long as the returned server.
    fn start_in_cluster(leader: bool) -> Server {
        let mut cluster = Cluster::start_members(3, &[], false);
        // Every member is ready only once it knows a leader; ask them who it is.
        let status = ok_stdout(&etcdctl(
            &cluster.all_endpoints(),
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
        let endpoint = rows[pick]["Endpoint"].as_str().expect("endpoint");
        let at = (0..cluster.len())
            .position(|i| cluster.endpoint(i) == endpoint)
            .expect("a started member");
        let mut chosen = cluster.servers[at].take().expect("a running member");
        chosen._cluster = Some(Box::new(cluster));
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
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::spawn(data_dir, args, env)?.wait_ready()
    }

    /// Spawns a server with `args` (which name its data directory, `data_dir`) without
    /// waiting for it: every member of a cluster must be running before any can elect a
    /// leader. Unless `args` say otherwise, the server gets 2 shards and the storage engine
    /// `METASTORE_TEST_ENGINE` names.
    fn spawn(
        data_dir: &Path,
        mut args: Vec<String>,
        env: &[(&str, &str)],
    ) -> Result<Starting, String> {
        let has = |flag: &str| args.iter().any(|a| a == flag);
        let mut defaults: Vec<String> = Vec::new();
        if !has("--shards") {
            defaults.extend(["--shards".into(), "2".into()]);
        }
        // The whole suite runs once per engine: METASTORE_TEST_ENGINE=rocksdb selects RocksDB.
        if !has("--storage-engine") {
            if let Ok(engine) = std::env::var("METASTORE_TEST_ENGINE") {
                defaults.extend(["--storage-engine".into(), engine]);
            }
        }
        args.extend(defaults);
        // Relative paths a server creates (etcd's `unix://host:port` socket files) land next to
        // its data directory, in the test's temporary directory, not in the repository.
        let cwd = data_dir.parent().unwrap_or(data_dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_metastore"))
            .current_dir(cwd)
            .args(&args)
            // Text lines, which the tests read (`key=value`); a test that wants etcd 3.5's
            // default JSON lines passes `--log-format json` (flags beat environment variables).
            .env("ETCD_LOG_FORMAT", "console")
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
                if line.contains("panicked at") {
                    SERVER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Shown as it happens: the member's log may be gone when the test reports.
                    eprintln!("member panic: {line}");
                }
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

    /// The last `n` lines the server logged.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(n).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Waits up to `timeout` for the server to log a line containing
    /// `needle`; whether it did. The server logs on its own schedule, so a
    /// line about something a client just saw may come a moment later.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log.lock().unwrap().contains(needle))
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A connected `etcd-client` client.
    pub async fn client(&self) -> Client {
        Client::connect([self.endpoint.as_str()], None)
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
        self.wait_status(timeout).is_some()
    }

    /// Sends SIGTERM: the server stops gracefully (etcd's `Stop`).
    pub fn terminate(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// Waits (up to `timeout`) for the process to exit; its exit status, or `None` if it is
    /// still running.
    pub fn wait_status(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// SIGKILLs the server and waits for it to die.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks a running server to stop as an operator would: SIGCONT (in case a test paused
    /// it), then SIGTERM, which runs `NodeHandle::shutdown`. Does not wait.
    fn ask_to_stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), libc::SIGCONT);
            signal(self.pid(), libc::SIGTERM);
        }
    }

    /// Stops the server through its graceful shutdown and waits for it. A server still
    /// running [`GRACEFUL_STOP`] after SIGTERM is killed, and the test fails: a shutdown that
    /// hangs is a bug. A server that already exited (a test killed it, or it stopped itself)
    /// is only reaped.
    fn stop(&mut self) {
        self.ask_to_stop();
        if self.wait_status(GRACEFUL_STOP).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if !std::thread::panicking() {
                panic!(
                    "the server on {} did not stop within {GRACEFUL_STOP:?} of SIGTERM; log:\n{}",
                    self.endpoint,
                    self.log_tail(40)
                );
            }
        }
    }
}

/// How long a server may take to stop after SIGTERM when a test drops it: the drain (at most
/// 5 s), a leader's hand-over (2 election timeouts) and the threads' joins, with margin.
pub const GRACEFUL_STOP: Duration = Duration::from_secs(20);

impl Drop for Server {
    /// Stops the server gracefully (SIGTERM, as `systemctl stop` would); see [`Server::stop`].
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `curl` answer: status code, headers (lower-cased) and body.
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The status line and headers, lower-cased.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

/// `curl` with `args` (then the URL), headers included in the answer; `-k` accepts auto-TLS
/// certificates. Gives up after 20 s.
pub fn curl(url: &str, args: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-s", "-k", "-D", "-", "--max-time", "20"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer from {url}: {text:?} {out:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line of {head:?}"));
    Answer {
        status,
        headers: head.to_lowercase(),
        body: body.to_string(),
    }
}

/// Election settings for [`Cluster::start`]: 50 ms ticks, 500 ms election timeout (etcd's 5x
/// rule).
pub const HEARTBEAT_MS: u64 = 50;
/// See [`HEARTBEAT_MS`].
pub const ELECTION_MS: u64 = 500;

/// A fault on one member's peer links, which the server's test fault hook applies (the
/// `failpoints` feature; `Faults` in `src/consensus/transport.rs` documents the file it
/// reads). Directions are seen from the member whose links have the fault.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LinkFault {
    /// Drop everything both ways (a partition).
    Cut,
    /// Drop what the member sends; what it receives still arrives.
    CutSend,
    /// Drop what the member receives; what it sends still arrives.
    CutRecv,
    /// Hold each message back this many milliseconds, each way, in order.
    Delay(u64),
    /// Drop each message, each way, with this probability in percent (0 to 100).
    Loss(f64),
}

impl LinkFault {
    /// The fault in the words of the fault file.
    fn words(&self) -> String {
        match self {
            LinkFault::Cut => "cut".into(),
            LinkFault::CutSend => "cut-send".into(),
            LinkFault::CutRecv => "cut-recv".into(),
            LinkFault::Delay(ms) => format!("delay={ms}"),
            LinkFault::Loss(percent) => format!("loss={percent}"),
        }
    }
}

/// One member's fixed identity: ports and data dir survive restarts.
pub struct MemberSpec {
    /// `--name`.
    pub name: String,
    /// Client port.
    pub client_port: u16,
    /// Peer port.
    pub peer_port: u16,
    dir: PathBuf,
    faults: PathBuf,
    initial_cluster: String,
    state: &'static str,
    extra: Vec<String>,
}

impl MemberSpec {
    /// `http://127.0.0.1:<peer port>`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// `127.0.0.1:<client port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

/// One member's HashKV answer: (member, its answer), or why it had none.
pub type MemberHash = (usize, Result<HashAnswer, String>);

/// What HashKV answered. (The Rust client does not expose the answer's compaction revision;
/// the hash depends on it anyway, through the versions the compaction keeps.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashAnswer {
    /// The member's revision when it answered (the response header's).
    pub revision: i64,
    /// etcd's HashKV of every version at or below the revision asked for.
    pub hash: u32,
}

/// A cluster of n member processes on ephemeral loopback ports, each with its own data dir,
/// started with etcd's cluster flags. Members can be SIGKILLed and restarted, signalled
/// (see [`Cluster::pid`]), cut off from each other, fully or one way, and have their peer
/// links slowed or made lossy (through the peer transport's fault hook,
/// `METASTORE_TEST_FAULTS`: [`Cluster::partition`], [`Cluster::fault_links`],
/// [`Cluster::heal`]), and added with `--initial-cluster-state existing`. Dropping it
/// kills every member.
pub struct Cluster {
    /// Member specs, by index.
    pub specs: Vec<MemberSpec>,
    /// Running processes (`None` while killed).
    pub servers: Vec<Option<Server>>,
    /// Member IDs, by index (learned from Status once started).
    pub ids: Vec<u64>,
    token: String,
    /// Whether members get the test timing ([`HEARTBEAT_MS`], [`ELECTION_MS`], one shard)
    /// rather than etcd's defaults and the harness's 2 shards.
    fast: bool,
    tmp: tempfile::TempDir,
}

impl Drop for Cluster {
    /// Asks every running member to stop at once (each then waits in its own drop), so that
    /// a stop does not wait for members that are still serving.
    fn drop(&mut self) {
        for s in self.servers.iter_mut().flatten() {
            s.ask_to_stop();
        }
    }
}

impl Cluster {
    /// Starts `n` members as a new cluster with `extra` flags on each (after the test timing:
    /// [`HEARTBEAT_MS`], [`ELECTION_MS`], `--shards 1`, which `extra` may override), and waits
    /// until all are ready and agree on a leader.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        let mut cluster = blocking(|| Cluster::start_members(n, extra, true));
        for i in 0..n {
            cluster.ids[i] = cluster.member_id(i).await;
        }
        cluster.wait_for_leader(LEADER_TIMEOUT).await;
        cluster
    }

    /// Starts `n` members and waits until each is ready (a member is ready once it knows a
    /// leader); member IDs are not learned yet.
    fn start_members(n: usize, extra: &[&str], fast: bool) -> Cluster {
        // Ports are picked before the members bind them (every member must know every peer
        // URL up front), so another process may take one meanwhile: start again on new ones.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Cluster::try_start(n, extra, fast) {
                Ok(cluster) => return cluster,
                Err(e) if e.contains("cannot listen") && attempt < 5 => continue,
                Err(e) => panic!("cluster members start: {e}"),
            }
        }
    }

    /// Starts the members on fresh ports and data dirs and waits until each is ready. On
    /// failure, every member started is stopped (dropped with the cluster).
    fn try_start(n: usize, extra: &[&str], fast: bool) -> Result<Cluster, String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let token = format!("test-{}-{}", std::process::id(), free_port());
        let mut specs: Vec<MemberSpec> = (0..n)
            .map(|i| MemberSpec {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: tmp.path().join(format!("m{i}")),
                faults: tmp.path().join(format!("m{i}.faults")),
                initial_cluster: String::new(),
                state: "new",
                extra: extra.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let initial = specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for s in &mut specs {
            s.initial_cluster = initial.clone();
        }
        let mut cluster = Cluster {
            servers: (0..n).map(|_| None).collect(),
            ids: vec![0; n],
            specs,
            token,
            fast,
            tmp,
        };
        // Every member must run before any can win an election: spawn them all, then wait.
        let mut starting = Vec::new();
        for i in 0..n {
            match cluster.spawn(i) {
                Ok(s) => starting.push(s),
                Err(e) => {
                    starting.into_iter().for_each(Starting::abandon);
                    return Err(e);
                }
            }
        }
        // Every member is waited for, in parallel (a failed one is killed by its wait), so
        // none is left running when another fails; the started ones are killed when the
        // cluster drops.
        let ready: Vec<Result<Server, String>> = std::thread::scope(|scope| {
            let waits: Vec<_> = starting
                .into_iter()
                .map(|s| scope.spawn(move || s.wait_ready()))
                .collect();
            waits
                .into_iter()
                .map(|w| w.join().expect("start thread"))
                .collect()
        });
        let mut failure = None;
        for (i, r) in ready.into_iter().enumerate() {
            match r {
                Ok(server) => cluster.servers[i] = Some(server),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(cluster),
        }
    }

    fn args(&self, i: usize) -> Vec<String> {
        let s = &self.specs[i];
        let client = format!("http://{}", s.endpoint());
        let mut args = vec![
            "--data-dir".to_string(),
            s.dir.display().to_string(),
            "--name".into(),
            s.name.clone(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client,
            "--listen-peer-urls".into(),
            s.peer_url(),
            "--initial-advertise-peer-urls".into(),
            s.peer_url(),
            "--initial-cluster".into(),
            s.initial_cluster.clone(),
            "--initial-cluster-state".into(),
            s.state.into(),
            "--initial-cluster-token".into(),
            self.token.clone(),
        ];
        if self.fast {
            args.extend([
                "--heartbeat-interval".into(),
                HEARTBEAT_MS.to_string(),
                "--election-timeout".into(),
                ELECTION_MS.to_string(),
                "--shards".into(),
                "1".into(),
            ]);
        }
        args.extend(s.extra.iter().cloned());
        args
    }

    /// Spawns member `i`'s process without waiting for its ready line.
    fn spawn(&self, i: usize) -> Result<Starting, String> {
        self.spawn_with_env(i, &[])
    }

    /// Spawns member `i`'s process with extra environment variables, without waiting.
    fn spawn_with_env(&self, i: usize, env: &[(&str, &str)]) -> Result<Starting, String> {
        let s = &self.specs[i];
        let faults = s.faults.display().to_string();
        let mut all = vec![("METASTORE_TEST_FAULTS", faults.as_str())];
        all.extend_from_slice(env);
        Server::spawn(&s.dir, self.args(i), &all)
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.specs[i].endpoint()
    }

    /// Every member's endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Endpoints of every member, comma-separated, as etcdctl's `--endpoints` takes them.
    pub fn all_endpoints(&self) -> String {
        self.endpoints().join(",")
    }

    /// Indexes of running members.
    pub fn live(&self) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|i| self.servers[*i].is_some())
            .collect()
    }

    /// A client bound to member `i` alone; panics if it cannot connect.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect([self.endpoint(i)], None)
            .await
            .expect("connect")
    }

    /// A client bound to member `i` alone, with a 2 s connect timeout and a 5 s request
    /// timeout (for members that may be down or stopped).
    pub async fn try_client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Client::connect([self.endpoint(i)], Some(opts)).await
    }

    /// Process id of member `i`, if it runs (for [`signal`]).
    pub fn pid(&self, i: usize) -> Option<i32> {
        self.servers[i].as_ref().map(Server::pid)
    }

    async fn member_id(&self, i: usize) -> u64 {
        let mut c = self.client(i).await;
        let status = c.status().await.expect("status");
        status.header().expect("header").member_id()
    }

    /// Status of member `i`: (leader ID, raft term, applied index), or `None` if it does not
    /// answer within 2 s.
    pub async fn status(&self, i: usize) -> Option<(u64, u64, u64)> {
        let work = async {
            let mut c = self.try_client(i).await.ok()?;
            let s = c.status().await.ok()?;
            Some((s.leader(), s.raft_term(), s.raft_applied_index()))
        };
        tokio::time::timeout(Duration::from_secs(2), work)
            .await
            .ok()
            .flatten()
    }

    /// Waits until every running member in `among` reports the same leader and term, and that
    /// leader is one of them; returns the leader's index.
    pub async fn wait_for_leader_among(&self, among: &[usize], timeout: Duration) -> usize {
        let mut seen = Vec::new();
        let mut found = None;
        wait_until_async(timeout, async || {
            seen.clear();
            for &i in among {
                seen.push(self.status(i).await);
            }
            if let Some(Some((leader, term, _))) = seen.first().copied() {
                let agreed = seen
                    .iter()
                    .all(|s| matches!(s, Some((l, t, _)) if *l == leader && *t == term));
                if agreed && leader != 0 {
                    found = among.iter().copied().find(|i| self.ids[*i] == leader);
                }
            }
            found.is_some()
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "no agreed leader among {among:?} within {timeout:?}: {seen:?}\n{}",
                self.logs()
            )
        })
    }

    /// [`Cluster::wait_for_leader_among`] over every running member.
    pub async fn wait_for_leader(&self, timeout: Duration) -> usize {
        self.wait_for_leader_among(&self.live(), timeout).await
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.kill();
        }
    }

    /// Restarts member `i` on its data dir and ports; waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.try_restart(i) {
            panic!("member {i} restarts: {e}");
        }
    }

    /// Restarts member `i`; on failure returns everything it printed.
    pub fn try_restart(&mut self, i: usize) -> Result<(), String> {
        assert!(self.servers[i].is_none(), "member {i} is running");
        let server = blocking(|| self.spawn(i)?.wait_ready())?;
        self.servers[i] = Some(server);
        Ok(())
    }

    /// Restarts member `i` with extra environment variables for this run only (such as
    /// `FAILPOINTS`; a later [`Cluster::restart`] starts it without them) and waits until it
    /// is ready. On failure (it exited or never became ready) returns everything it printed;
    /// the member is then not running.
    pub fn try_restart_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> Result<(), String> {
        assert!(self.servers[i].is_none(), "member {i} is running");
        let server = blocking(|| self.spawn_with_env(i, env)?.wait_ready())?;
        self.servers[i] = Some(server);
        Ok(())
    }

    /// Waits up to `timeout` for member `i` to exit by itself (a crash, a fatal error). If it
    /// did, it is marked as not running and its exit status and everything it logged are
    /// returned; `None` if it is still running (or was not running).
    pub fn wait_member_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Option<(std::process::ExitStatus, String)> {
        let status = blocking(|| self.servers[i].as_mut()?.wait_status(timeout))?;
        let server = self.servers[i].take().expect("the member ran");
        // The stderr reader may still be reading the last lines the process wrote; it lets go
        // of the log at end of file.
        wait_until(Duration::from_secs(2), || {
            Arc::strong_count(&server.log) == 1
        });
        let log = server.log();
        drop(server);
        Some((status, log))
    }

    /// Replaces member `i`'s extra flags, for its next (re)start.
    pub fn set_extra(&mut self, i: usize, extra: &[&str]) {
        self.specs[i].extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.specs[i].dir.clone()
    }

    /// Appends `extra` to member `i`'s flags, for its next (re)start (a later flag overrides
    /// an earlier one of the same name).
    pub fn add_extra(&mut self, i: usize, extra: &[&str]) {
        self.specs[i]
            .extra
            .extend(extra.iter().map(|s| s.to_string()));
    }

    /// Moves member `i` (stopped) to the data directory `dir`, for its next (re)start; the
    /// caller has put its data there.
    pub fn set_data_dir(&mut self, i: usize, dir: &Path) {
        assert!(self.servers[i].is_none(), "member {i} is running");
        self.specs[i].dir = dir.to_path_buf();
    }

    /// If member `i`'s process exited by itself (a fatal error), reaps it, marks the member
    /// stopped and returns its exit status and everything it logged.
    pub fn take_exited(&mut self, i: usize) -> Option<(std::process::ExitStatus, String)> {
        let server = self.servers[i].as_mut()?;
        let status = server.child.try_wait().ok().flatten()?;
        let log = server.log();
        self.servers[i] = None;
        Some((status, log))
    }

    /// Re-registers member `i` (stopped, and removed from the cluster with `member remove`)
    /// as a new member with its name, ports and data directory path, as an operator replaces
    /// a member whose data is lost: it joins with `--initial-cluster-state existing` and an
    /// `--initial-cluster` of the running members and itself. Call `member add` with its
    /// peer URL, empty its data directory, then [`Cluster::start_added`].
    pub fn rejoin_as_new(&mut self, i: usize) {
        assert!(self.servers[i].is_none(), "member {i} is running");
        let initial: Vec<String> = self
            .live()
            .iter()
            .chain(std::iter::once(&i))
            .map(|j| format!("{}={}", self.specs[*j].name, self.specs[*j].peer_url()))
            .collect();
        self.specs[i].initial_cluster = initial.join(",");
        self.specs[i].state = "existing";
        self.ids[i] = 0;
    }

    /// Cuts every peer link between members of different groups, in both directions. Members
    /// in no group keep all their links. Replaces every link fault in place; returns once
    /// every running member has applied it.
    pub fn partition(&self, groups: &[&[usize]]) {
        let files = (0..self.specs.len())
            .map(|i| {
                let Some(mine) = groups.iter().find(|g| g.contains(&i)) else {
                    return (i, String::new());
                };
                // Bare IDs: the hook's original format, a cut both ways.
                let blocked: Vec<String> = (0..self.specs.len())
                    .filter(|j| !mine.contains(j))
                    .map(|j| format!("{:x}\n", self.ids[j]))
                    .collect();
                (i, blocked.concat())
            })
            .collect();
        self.write_faults(files);
    }

    /// Adds `fault` to member `i`'s links with each member in `peers` (on top of the faults
    /// in place: a delay and a loss on the same link add up); returns once member `i` has
    /// applied it. [`Cluster::heal`] undoes it.
    pub fn fault_links(&self, i: usize, peers: &[usize], fault: LinkFault) {
        let mut text = std::fs::read_to_string(&self.specs[i].faults).unwrap_or_default();
        for &j in peers.iter().filter(|j| **j != i) {
            text.push_str(&format!("{:x} {}\n", self.ids[j], fault.words()));
        }
        self.write_faults(vec![(i, text)]);
    }

    /// Slows every peer link of member `i`: each Raft message it sends or receives is held
    /// back `ms` milliseconds (so a round trip over one of its links takes `2 * ms` more).
    pub fn delay_links(&self, i: usize, ms: u64) {
        self.fault_links(i, &self.others(i), LinkFault::Delay(ms));
    }

    /// Makes every peer link of member `i` lossy: each Raft message it sends or receives is
    /// dropped with probability `percent` / 100.
    pub fn lossy_links(&self, i: usize, percent: f64) {
        self.fault_links(i, &self.others(i), LinkFault::Loss(percent));
    }

    /// Cuts the peer link from member `from` to member `to` one way: what `from` sends to
    /// `to` is dropped, what `to` sends to `from` still arrives (an asymmetric partition).
    pub fn cut_one_way(&self, from: usize, to: usize) {
        self.fault_links(from, &[to], LinkFault::CutSend);
    }

    /// Every member but `i`.
    fn others(&self, i: usize) -> Vec<usize> {
        (0..self.specs.len()).filter(|j| *j != i).collect()
    }

    /// Restores every peer link (undoes partitions and every [`LinkFault`]); returns once
    /// every running member has applied it.
    pub fn heal(&self) {
        self.write_faults((0..self.specs.len()).map(|i| (i, String::new())).collect());
    }

    /// Writes member fault files (`(member, text)`), each at once (a rename, so a member never
    /// reads half a file), and waits until every running member whose file changed has
    /// re-read it: each logs a line when it does, applied or not. Panics (unless the thread
    /// already panics: a guard healing on unwind) if one does not within 10 s.
    fn write_faults(&self, files: Vec<(usize, String)>) {
        const APPLIED: &str = "test fault hook: peer link faults";
        let count = |i: usize| {
            self.servers[i]
                .as_ref()
                .map(|s| s.log().matches(APPLIED).count())
        };
        let mut waiting = Vec::new();
        for (i, text) in files {
            let path = &self.specs[i].faults;
            if std::fs::read_to_string(path).unwrap_or_default() == text {
                continue;
            }
            if let Some(before) = count(i) {
                waiting.push((i, before));
            }
            let tmp = path.with_extension("faults.tmp");
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        let applied = blocking(|| {
            wait_until(Duration::from_secs(10), || {
                waiting
                    .iter()
                    .all(|(i, before)| count(*i).is_none_or(|now| now > *before))
            })
        });
        if !applied && !std::thread::panicking() {
            panic!(
                "members {:?} did not apply their fault files within 10 s\n{}",
                waiting.iter().map(|(i, _)| i).collect::<Vec<_>>(),
                self.logs()
            );
        }
    }

    /// Waits until every running member reports the same HashKV at the same revision;
    /// returns that revision.
    ///
    /// HashKV is a maintenance call that, with auth enabled, only root may make; this asks
    /// without credentials, so on a cluster with auth enabled it never converges (it fails
    /// after `timeout`). Wait for something a user can see instead, as
    /// `auth_works_across_members_restarts_and_snapshots` does.
    pub async fn wait_converged(&self, timeout: Duration) -> i64 {
        let mut answers = Vec::new();
        let converged = wait_until_async(timeout, async || {
            answers = self.hash_kv_all(0).await;
            let first = answers.first().and_then(|(_, a)| a.as_ref().ok());
            first.is_some() && answers.iter().all(|(_, a)| a.as_ref().ok() == first)
        })
        .await;
        match answers.first() {
            Some((_, Ok(answer))) if converged => answer.revision,
            _ => panic!("members did not converge: {answers:?}\n{}", self.logs()),
        }
    }

    /// Every live member's HashKV at revision `rev` (0: each member's latest), asked once,
    /// each answer within 5 s: what [`Cluster::wait_converged`] and the robustness suite's end
    /// check compare.
    pub async fn hash_kv_all(&self, rev: i64) -> Vec<MemberHash> {
        let mut answers = Vec::new();
        for i in self.live() {
            let answer = async {
                let mut c = self.try_client(i).await.map_err(|e| e.to_string())?;
                let h = c.hash_kv(rev).await.map_err(|e| e.to_string())?;
                Ok(HashAnswer {
                    revision: h.header().map_or(0, |h| h.revision()),
                    hash: h.hash(),
                })
            };
            let answer = tokio::time::timeout(Duration::from_secs(5), answer)
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            answers.push((i, answer));
        }
        answers
    }

    /// Registers a new member (not started) that joins with `--initial-cluster-state
    /// existing`, with `extra` flags; its `--initial-cluster` names the running members and
    /// this one (as `etcdctl member add` prints it).
    pub fn add_spec(&mut self, extra: &[&str]) -> usize {
        let i = self.specs.len();
        let mut spec = MemberSpec {
            name: format!("m{i}"),
            client_port: free_port(),
            peer_port: free_port(),
            dir: self.tmp.path().join(format!("m{i}")),
            faults: self.tmp.path().join(format!("m{i}.faults")),
            initial_cluster: String::new(),
            state: "existing",
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        let mut initial: Vec<String> = self
            .live()
            .iter()
            .map(|j| format!("{}={}", self.specs[*j].name, self.specs[*j].peer_url()))
            .collect();
        initial.push(format!("{}={}", spec.name, spec.peer_url()));
        spec.initial_cluster = initial.join(",");
        self.specs.push(spec);
        self.servers.push(None);
        self.ids.push(0);
        i
    }

    /// Starts a member registered with [`Cluster::add_spec`] and records its ID.
    pub async fn start_added(&mut self, i: usize) {
        self.restart(i);
        self.ids[i] = self.member_id(i).await;
    }

    /// The last 40 lines of every running member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.servers.iter().enumerate() {
            if let Some(s) = s {
                out.push_str(&format!("--- member {i} (last 40 lines) ---\n"));
                out.push_str(&s.log_tail(40));
                out.push('\n');
            }
        }
        out
    }
}

/// Panics (Rust's `panicked at` lines) logged by every server process this test binary
/// started, killed and restarted ones included: the robustness profiles report the count and
/// require 0.
#[allow(dead_code)] // Read only by the robustness target.
pub static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

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
        let healthy = wait_until(START_TIMEOUT, || {
            etcdctl(&etcd.endpoint, &["endpoint", "health"], None)
                .status
                .success()
        });
        assert!(healthy, "etcd did not become healthy");
        etcd
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The exit code of a member whose start failed, read from the harness's report of it
/// (`exit: Some(ExitStatus(unix_wait_status(N)))`): `None` when it was ended by a signal (the
/// harness kills a member that is not ready within 60 s) or the report has no status.
pub fn exit_code_of_failed_start(output: &str) -> Option<i32> {
    let status: i32 = output
        .split("unix_wait_status(")
        .nth(1)?
        .split(')')
        .next()?
        .parse()
        .ok()?;
    (status & 0x7f == 0).then_some(status >> 8)
}
