//! A MetaStore cluster of real processes for the robustness profiles: n members on ephemeral
//! loopback ports with their own data dirs, which can be SIGKILLed and restarted, or
//! SIGSTOPped and SIGCONTed. Adapted from `tests/it/harness.rs` and
//! `tests/it/cluster_harness.rs` (copied, not shared, so that this suite does not depend on
//! their helpers and can reach the process ids it signals).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;

/// Election settings: 50 ms ticks, 500 ms election timeout (etcd's 5x rule).
pub const HEARTBEAT_MS: u64 = 50;
/// See [`HEARTBEAT_MS`].
pub const ELECTION_MS: u64 = 500;

/// How long a member may take to print its ready line (generous: the machine is shared).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A free loopback port (it may be taken again before the member binds it; see
/// [`Cluster::start`]).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A running member process. Dropping it SIGKILLs it (stopped or not).
pub struct Member {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Member {
    /// Starts `metastore` with `args` and waits for "ready to serve client requests".
    fn start(cwd: &std::path::Path, args: &[String]) -> Result<Member, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_metastore"))
            .current_dir(cwd)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn metastore: {e}"))?;
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let log = Arc::new(Mutex::new(String::new()));
        let keep = log.clone();
        // Drains stderr for the life of the process so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut all = keep.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
                drop(all);
                let _ = tx.send(line);
            }
        });
        let mut member = Member { child, log };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("ready to serve client requests") => return Ok(member),
                Ok(_) => {}
                Err(_) => {
                    member.stop();
                    return Err(format!(
                        "member did not become ready; output:\n{}",
                        member.log()
                    ));
                }
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the member logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal` to `pid`.
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

struct Spec {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

/// A running cluster. Dropping it kills every member.
pub struct Cluster {
    specs: Vec<Spec>,
    /// Running members (`None` while killed).
    members: Vec<Option<Member>>,
    /// Member ids by index.
    pub ids: Vec<u64>,
    initial: String,
    token: String,
    extra: Vec<String>,
    tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members of a new cluster with `extra` flags on each, and waits until they
    /// agree on a leader.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        let mut attempt = 0;
        let mut cluster = loop {
            attempt += 1;
            match tokio::task::block_in_place(|| Cluster::try_start(n, extra)) {
                Ok(c) => break c,
                // A port picked up front may have been taken meanwhile: pick new ones.
                Err(e) if e.contains("cannot listen") && attempt < 5 => continue,
                Err(e) => panic!("cluster start: {e}"),
            }
        };
        for i in 0..n {
            let mut c = cluster.client(i).await.expect("connect");
            let s = c.status().await.expect("status");
            cluster.ids[i] = s.header().expect("header").member_id();
        }
        cluster.wait_for_leader(Duration::from_secs(60)).await;
        cluster
    }

    fn try_start(n: usize, extra: &[&str]) -> Result<Cluster, String> {
        let tmp = tempfile::tempdir().expect("tempdir");
        let specs: Vec<Spec> = (0..n)
            .map(|i| Spec {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: tmp.path().join(format!("m{i}")),
            })
            .collect();
        let initial = specs
            .iter()
            .map(|s| format!("{}=http://127.0.0.1:{}", s.name, s.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            specs,
            members: (0..n).map(|_| None).collect(),
            ids: vec![0; n],
            initial,
            token: format!("robust-{}-{}", std::process::id(), free_port()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tmp,
        };
        // Every member must run before any can win an election: start them in parallel.
        let starting: Vec<_> = (0..n)
            .map(|i| {
                let (cwd, args) = (cluster.tmp.path().to_path_buf(), cluster.args(i));
                std::thread::spawn(move || Member::start(&cwd, &args))
            })
            .collect();
        let mut failure = None;
        for (i, s) in starting.into_iter().enumerate() {
            match s.join().expect("start thread") {
                Ok(m) => cluster.members[i] = Some(m),
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
        let client = format!("http://127.0.0.1:{}", s.client_port);
        let peer = format!("http://127.0.0.1:{}", s.peer_port);
        let mut args: Vec<String> = [
            "--name",
            &s.name,
            "--data-dir",
            &s.dir.display().to_string(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &self.initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &self.token,
            "--heartbeat-interval",
            &HEARTBEAT_MS.to_string(),
            "--election-timeout",
            &ELECTION_MS.to_string(),
        ]
        .map(str::to_string)
        .to_vec();
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// `127.0.0.1:<client port>` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.specs[i].client_port)
    }

    /// Every member's endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// A client of member `i` alone (2 s connect timeout).
    pub async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        Client::connect([self.endpoint(i)], Some(opts)).await
    }

    /// Process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<i32> {
        self.members[i].as_ref().map(Member::pid)
    }

    /// (leader id, term) as member `i` reports it, or `None` if it does not answer in 2 s.
    pub async fn status(&self, i: usize) -> Option<(u64, u64)> {
        let work = async {
            let mut c = self.client(i).await.ok()?;
            let s = c.status().await.ok()?;
            Some((s.leader(), s.raft_term()))
        };
        tokio::time::timeout(Duration::from_secs(2), work)
            .await
            .ok()
            .flatten()
    }

    /// Waits until every running member reports the same leader and term, and that leader
    /// runs; returns its index.
    pub async fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let live: Vec<usize> = (0..self.len())
            .filter(|i| self.members[*i].is_some())
            .collect();
        loop {
            let mut seen = Vec::new();
            for &i in &live {
                seen.push(self.status(i).await);
            }
            if let Some(Some((leader, term))) = seen.first().copied() {
                let agreed = seen
                    .iter()
                    .all(|s| matches!(s, Some((l, t)) if *l == leader && *t == term));
                if let Some(i) = live.iter().copied().find(|i| self.ids[*i] == leader) {
                    if agreed && leader != 0 {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {timeout:?}: {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        self.members[i] = None;
    }

    /// Restarts member `i` on its data dir and ports; waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "member {i} runs");
        let (cwd, args) = (self.tmp.path().to_path_buf(), self.args(i));
        let m = tokio::task::block_in_place(|| Member::start(&cwd, &args))
            .unwrap_or_else(|e| panic!("member {i} restarts: {e}"));
        self.members[i] = Some(m);
    }

    /// The last 40 lines of every running member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            if let Some(m) = m {
                let log = m.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                out.push_str(&format!("--- member {i} (last 40 lines) ---\n"));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}
