//! A MetaStore cluster for tests: n real processes on ephemeral loopback ports, each with its
//! own data dir, started with etcd's cluster flags. Members can be killed, restarted, cut off
//! from each other (through the peer transport's fault hook, `METASTORE_TEST_FAULTS`), and
//! added with `--initial-cluster-state existing`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::harness::{free_port, Server};

/// Election settings for tests: 50 ms ticks, 500 ms election timeout (etcd's 5x rule).
pub const HEARTBEAT_MS: u64 = 50;
/// See [`HEARTBEAT_MS`].
pub const ELECTION_MS: u64 = 500;

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

/// A running cluster. Dropping it kills every member.
pub struct Cluster {
    /// Member specs, by index.
    pub specs: Vec<MemberSpec>,
    /// Running processes (`None` while killed).
    pub servers: Vec<Option<Server>>,
    /// Member IDs, by index (learned from Status once started).
    pub ids: Vec<u64>,
    token: String,
    tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members as a new cluster with `extra` flags on each, and waits until all
    /// are ready and agree on a leader.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        // Ports are picked before the members bind them (every member must know every peer
        // URL up front), so another process may take one meanwhile: start again on new ones.
        let mut attempt = 0;
        let mut cluster = loop {
            attempt += 1;
            match Cluster::try_start(n, extra) {
                Ok(cluster) => break cluster,
                Err(e) if e.contains("cannot listen") && attempt < 5 => continue,
                Err(e) => panic!("cluster members start: {e}"),
            }
        };
        for i in 0..n {
            cluster.ids[i] = cluster.member_id(i).await;
        }
        cluster.wait_for_leader(Duration::from_secs(20)).await;
        cluster
    }

    /// Starts the members on fresh ports and data dirs and waits until each is ready. On
    /// failure, every member started is stopped (dropped with the cluster).
    fn try_start(n: usize, extra: &[&str]) -> Result<Cluster, String> {
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
            tmp,
        };
        // Every member must run before any can win an election.
        let starting: Vec<_> = (0..n).map(|i| cluster.spawn(i)).collect();
        let mut failure = None;
        for (i, s) in starting.into_iter().enumerate() {
            match s.join().expect("start thread") {
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
        let mut args = vec![
            "--name".to_string(),
            s.name.clone(),
            "--advertise-client-urls".into(),
            format!("http://{}", s.endpoint()),
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
            "--heartbeat-interval".into(),
            HEARTBEAT_MS.to_string(),
            "--election-timeout".into(),
            ELECTION_MS.to_string(),
            "--shards".into(),
            "1".into(),
        ];
        args.extend(s.extra.iter().cloned());
        args
    }

    /// Starts member `i`'s process on a thread (ready lines are awaited there).
    fn spawn(&self, i: usize) -> std::thread::JoinHandle<Result<Server, String>> {
        let s = &self.specs[i];
        let args = self.args(i);
        let dir = s.dir.clone();
        let faults = s.faults.display().to_string();
        let client = format!("http://{}", s.endpoint());
        std::thread::spawn(move || {
            let mut flags: Vec<&str> = vec!["--listen-client-urls", &client];
            flags.extend(args.iter().map(String::as_str));
            Server::try_start_with_env(&dir, &flags, &[("METASTORE_TEST_FAULTS", &faults)])
        })
    }

    /// Client endpoint of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.specs[i].endpoint()
    }

    /// Endpoints of every member, comma-separated, as etcdctl's `--endpoints` takes them.
    pub fn all_endpoints(&self) -> String {
        (0..self.specs.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Indexes of running members.
    pub fn live(&self) -> Vec<usize> {
        (0..self.servers.len())
            .filter(|i| self.servers[*i].is_some())
            .collect()
    }

    /// A client bound to member `i` alone.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect([self.endpoint(i)], None)
            .await
            .expect("connect")
    }

    async fn member_id(&self, i: usize) -> u64 {
        let mut c = self.client(i).await;
        let status = c.status().await.expect("status");
        status.header().expect("header").member_id()
    }

    /// Status of member `i`: (leader ID, raft term, applied index), or `None` if it does not
    /// answer within a second.
    pub async fn status(&self, i: usize) -> Option<(u64, u64, u64)> {
        let work = async {
            let mut c = Client::connect([self.endpoint(i)], None).await.ok()?;
            let s = c.status().await.ok()?;
            Some((s.leader(), s.raft_term(), s.raft_applied_index()))
        };
        tokio::time::timeout(Duration::from_secs(1), work)
            .await
            .ok()
            .flatten()
    }

    /// Waits until every running member in `among` reports the same leader and term, and that
    /// leader is one of them; returns the leader's index.
    pub async fn wait_for_leader_among(&self, among: &[usize], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for &i in among {
                seen.push(self.status(i).await);
            }
            if let Some(Some((leader, term, _))) = seen.first().copied() {
                let agreed = seen
                    .iter()
                    .all(|s| matches!(s, Some((l, t, _)) if *l == leader && *t == term));
                let index = among.iter().copied().find(|i| self.ids[*i] == leader);
                if agreed && leader != 0 {
                    if let Some(i) = index {
                        return i;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {timeout:?}: {seen:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// Restarts member `i` on its data dir and ports.
    pub fn restart(&mut self, i: usize) {
        if let Err(e) = self.try_restart(i) {
            panic!("member {i} restarts: {e}");
        }
    }

    /// Restarts member `i`; on failure returns everything it printed.
    pub fn try_restart(&mut self, i: usize) -> Result<(), String> {
        assert!(self.servers[i].is_none(), "member {i} is running");
        let server = self.spawn(i).join().expect("start thread")?;
        self.servers[i] = Some(server);
        Ok(())
    }

    /// Replaces member `i`'s extra flags, for its next (re)start.
    pub fn set_extra(&mut self, i: usize, extra: &[&str]) {
        self.specs[i].extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Member `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.specs[i].dir.clone()
    }

    /// Cuts every peer link between members of different groups, in both directions. Members
    /// in no group keep all their links.
    pub fn partition(&self, groups: &[&[usize]]) {
        for (i, spec) in self.specs.iter().enumerate() {
            let Some(mine) = groups.iter().find(|g| g.contains(&i)) else {
                std::fs::write(&spec.faults, "").unwrap();
                continue;
            };
            let blocked: Vec<String> = (0..self.specs.len())
                .filter(|j| !mine.contains(j))
                .map(|j| format!("{:x}", self.ids[j]))
                .collect();
            std::fs::write(&spec.faults, blocked.join("\n")).unwrap();
        }
    }

    /// Restores every peer link.
    pub fn heal(&self) {
        for spec in &self.specs {
            std::fs::write(&spec.faults, "").unwrap();
        }
    }

    /// Waits until every running member has applied the same index and reports the same
    /// HashKV at the same revision; returns that revision.
    pub async fn wait_converged(&self, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut hashes = Vec::new();
            for i in self.live() {
                let mut c = self.client(i).await;
                let h = match c.hash_kv(0).await {
                    Ok(h) => Some((h.header().map(|h| h.revision()), h.hash())),
                    Err(_) => None,
                };
                hashes.push(h);
            }
            if let Some((rev, _)) = hashes[0] {
                if hashes.iter().all(|h| *h == hashes[0]) {
                    return rev.unwrap_or(0);
                }
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge: {hashes:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers a new member (not started) that joins with `--initial-cluster-state
    /// existing`; `initial_cluster` is what `etcdctl member add` printed for it (or any list
    /// naming the running members and this one).
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

    /// Every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.servers.iter().enumerate() {
            if let Some(s) = s {
                let log = s.log();
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
