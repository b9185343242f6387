//! The Raft node (batching proposer, raft-rs, WAL) tested in process: three nodes over an
//! in-memory network ([`network::Network`]) with seeded partitions, one-way cuts, loss,
//! delays and restarts from the WAL, checking Raft's safety properties (Raft paper, figure 3)
//! as they run:
//! * **Election Safety**: at most one leader per term, among the leaders the nodes report;
//! * **State Machine Safety**: no two nodes apply different entries at one index, and a
//!   restarted node applies again exactly what it applied before;
//! * and liveness once healed: a leader is elected and a new proposal commits everywhere.
//!
//! `RAFT_SIM_SEEDS` sets the number of seeded scenarios (default 30), `RAFT_SIM_SEED` runs one.

mod network;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metastore::consensus::wal::Wal;
use metastore::consensus::{Leadership, NodeConfig, NodeMsg, RaftNode};
use metastore::proto::metastorepb::MemberRecord;
use metastore::state_machine::{ApplyMsg, SnapshotTaken};
use network::Network;

const IDS: [u64; 3] = [1, 2, 3];
const HEARTBEAT_MS: u64 = 10;
const ELECTION_MS: u64 = 100;
/// How long a healed cluster may take to elect a leader and commit a proposal everywhere.
const CONVERGE: Duration = Duration::from_secs(20);

/// What one node applied: index -> (term, data). Survives the node's restarts.
type Applied = Arc<Mutex<BTreeMap<u64, (u64, Vec<u8>)>>>;

/// A node of the simulated cluster.
struct SimNode {
    id: u64,
    dir: tempfile::TempDir,
    tx: flume::Sender<NodeMsg>,
    leadership: tokio::sync::watch::Receiver<Leadership>,
    raft: Option<std::thread::JoinHandle<()>>,
    apply: Option<std::thread::JoinHandle<()>>,
    /// Kept so the Raft node's snapshot channel stays open.
    _snapshots: flume::Sender<SnapshotTaken>,
    applied: Applied,
    violations: Arc<Mutex<Vec<String>>>,
}

fn member(id: u64) -> MemberRecord {
    MemberRecord {
        id,
        name: format!("n{id}"),
        peer_urls: vec![format!("http://sim-{id}:2380")],
        client_urls: Vec::new(),
        is_learner: false,
    }
}

impl SimNode {
    /// Starts node `id` on `dir` (a new cluster on first start; its WAL afterwards).
    fn start(
        id: u64,
        dir: tempfile::TempDir,
        net: &Network,
        applied: Applied,
        violations: Arc<Mutex<Vec<String>>>,
    ) -> SimNode {
        let (wal, recovered) = Wal::open(&dir.path().join("wal"), 0, false).expect("open the WAL");
        let cfg = NodeConfig {
            id,
            this_member: member(id),
            bootstrap: IDS.iter().map(|&i| member(i)).collect(),
            seed_peers: Vec::new(),
            heartbeat_ms: HEARTBEAT_MS,
            election_ms: ELECTION_MS,
            lease_reads: false,
            catch_up_entries: 5000,
            request_timeout: Duration::from_secs(2),
            snap_dir: dir.path().join("snap"),
            max_snapshots: 5,
            pre_vote: true,
            max_learners: 1,
            force_new_cluster: false,
        };
        let (committed_tx, committed) = flume::bounded(1024);
        let (snapshots, snapshots_rx) = flume::unbounded();
        let transport = net.transport(id);
        let (node, handle) = RaftNode::new(
            &cfg,
            None,
            0,
            wal,
            recovered,
            |_| transport,
            committed_tx,
            snapshots_rx,
        )
        .expect("raft node");
        net.attach(id, handle.tx.clone());
        let raft = std::thread::spawn(move || node.run().expect("the raft node runs"));
        let apply = {
            let (applied, violations) = (applied.clone(), violations.clone());
            std::thread::spawn(move || record(id, committed, applied, violations))
        };
        SimNode {
            id,
            dir,
            tx: handle.tx,
            leadership: handle.status.subscribe(),
            raft: Some(raft),
            apply: Some(apply),
            _snapshots: snapshots,
            applied,
            violations,
        }
    }

    /// Stops the Raft thread after its current round (the WAL written) and the applier.
    fn stop(&mut self, net: &Network) {
        net.detach(self.id);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(NodeMsg::Stop(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
        if let Some(t) = self.raft.take() {
            t.join().expect("raft thread");
        }
        if let Some(t) = self.apply.take() {
            t.join().expect("apply thread");
        }
    }

    /// Stops the node and starts it again from its WAL, as after a crash between rounds.
    fn restart(self, net: &Network) -> SimNode {
        let mut old = self;
        old.stop(net);
        let SimNode {
            id,
            dir,
            applied,
            violations,
            ..
        } = old;
        SimNode::start(id, dir, net, applied, violations)
    }

    /// The term this node leads, if it leads (term and leader read together).
    fn is_leader(&self) -> Option<u64> {
        let now = *self.leadership.borrow();
        (now.leader == self.id).then_some(now.term)
    }
}

/// The applier: records every committed entry, and flags an index applied twice differently
/// (after a restart the node applies its log again from the start; it must be the same).
fn record(
    id: u64,
    committed: flume::Receiver<ApplyMsg>,
    applied: Applied,
    violations: Arc<Mutex<Vec<String>>>,
) {
    while let Ok(msg) = committed.recv() {
        let ApplyMsg::Entries(entries) = msg else {
            continue; // Dropped proposals; no snapshots without log compaction.
        };
        let mut log = applied.lock().unwrap();
        for e in entries {
            let now = (e.term, e.data.clone());
            match log.get(&e.index) {
                Some(before) if *before != now => violations.lock().unwrap().push(format!(
                    "node {id} applied index {} as term {} then as term {}",
                    e.index, before.0, e.term
                )),
                Some(_) => {}
                None => {
                    log.insert(e.index, now);
                }
            }
        }
    }
}

/// One seeded scenario: faults and proposals, then heal and check.
fn scenario(seed: u64) {
    let net = Network::new(seed);
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut nodes: Vec<Option<SimNode>> = IDS
        .iter()
        .map(|&id| {
            Some(SimNode::start(
                id,
                tempfile::tempdir().unwrap(),
                &net,
                Applied::default(),
                violations.clone(),
            ))
        })
        .collect();
    let mut leaders: HashMap<u64, u64> = HashMap::new();
    let mut next_id = 1u64;
    let mut check_leaders = |nodes: &[Option<SimNode>]| {
        for n in nodes.iter().flatten() {
            if let Some(term) = n.is_leader() {
                if let Some(&other) = leaders.get(&term) {
                    if other != n.id {
                        violations.lock().unwrap().push(format!(
                            "seed {seed}: nodes {other} and {} both led term {term}",
                            n.id
                        ));
                    }
                }
                leaders.insert(term, n.id);
            }
        }
    };
    for _step in 0..8 {
        match net.draw(7) {
            0 | 1 => net.isolate(IDS[net.draw(3) as usize], &IDS),
            2 => {
                // Isolate whoever leads now.
                if let Some(n) = nodes.iter().flatten().find(|n| n.is_leader().is_some()) {
                    net.isolate(n.id, &IDS);
                }
            }
            3 => net.cut_one_way(IDS[net.draw(3) as usize], IDS[net.draw(3) as usize]),
            4 => {
                net.set_loss(net.draw(300) as u32);
                net.set_delay(Duration::from_millis(net.draw(30)));
            }
            5 => {
                let i = net.draw(3) as usize;
                let node = nodes[i].take().unwrap();
                nodes[i] = Some(node.restart(&net));
            }
            _ => net.heal(),
        }
        let until = Instant::now() + Duration::from_millis(50 + net.draw(250));
        while Instant::now() < until {
            let n = nodes[net.draw(3) as usize].as_ref().unwrap();
            let _ = n.tx.send(NodeMsg::Propose {
                id: next_id,
                data: format!("s{seed}-p{next_id}").into_bytes(),
            });
            next_id += 1;
            check_leaders(&nodes);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Healed, the cluster must elect a leader and commit a marker on every node.
    net.heal();
    let marker = format!("s{seed}-marker").into_bytes();
    let deadline = Instant::now() + CONVERGE;
    let mut last_sent = None::<Instant>;
    let everywhere = |nodes: &[Option<SimNode>]| {
        nodes.iter().flatten().all(|n| {
            let log = n.applied.lock().unwrap();
            log.values().any(|(_, d)| contains(d, &marker))
        })
    };
    while !everywhere(&nodes) {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the healed cluster did not commit a proposal on every node in {CONVERGE:?}"
        );
        check_leaders(&nodes);
        // Proposals to a member without a leader are dropped: send again now and then.
        if last_sent.is_none_or(|t| t.elapsed() > Duration::from_millis(200)) {
            for n in nodes.iter().flatten() {
                let _ = n.tx.send(NodeMsg::Propose {
                    id: next_id,
                    data: marker.clone(),
                });
                next_id += 1;
            }
            last_sent = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // State Machine Safety across nodes: one entry per index.
    let logs: Vec<_> = nodes
        .iter()
        .flatten()
        .map(|n| n.applied.lock().unwrap().clone())
        .collect();
    for (i, a) in logs.iter().enumerate() {
        for b in &logs[i + 1..] {
            for (index, entry) in a {
                if let Some(other) = b.get(index) {
                    assert_eq!(
                        entry, other,
                        "seed {seed}: index {index} differs between nodes"
                    );
                }
            }
        }
    }
    for n in nodes.iter_mut().flatten() {
        n.stop(&net);
    }
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "seed {seed}: {v:#?}");
}

/// Whether `data` (length-delimited proposals, or one raw proposal) holds `needle`.
fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn seeded_partitions_restarts_and_leader_changes_keep_raft_safe() {
    let seeds: Vec<u64> = match std::env::var("RAFT_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("RAFT_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("RAFT_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(30);
            (0..n).collect()
        }
    };
    for seed in seeds {
        scenario(seed);
    }
}
