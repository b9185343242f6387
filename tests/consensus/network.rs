//! An in-process network for Raft nodes, in the spirit of raft-rs's `harness/network.rs`:
//! messages go straight to the receiving node's inbox, through links the test can cut (one
//! way or both), make lossy, or slow down. Drops and delays are drawn from one seeded RNG, so
//! a seed replays the same fault decisions (thread timing still varies).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metastore::consensus::transport::PeerTransport;
use metastore::consensus::NodeMsg;
use metastore::state_machine::Membership;
use raft::prelude::{Message, MessageType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The network's state: who is reachable, and how badly.
struct State {
    inboxes: HashMap<u64, flume::Sender<NodeMsg>>,
    /// Directed links (from, to) that drop everything.
    cut: HashSet<(u64, u64)>,
    /// Chance that any message is lost, per mille.
    drop_per_mille: u32,
    /// Largest extra delay of a message (zero: delivered at once).
    max_delay: Duration,
    rng: StdRng,
    /// Messages held back by a delay, by delivery time.
    delayed: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    held: HashMap<u64, (u64, Message)>,
    next_held: u64,
}

/// A shared, seeded in-process network (cheap to clone).
#[derive(Clone)]
pub struct Network(Arc<Mutex<State>>);

impl Network {
    /// An empty network whose random decisions follow `seed`.
    pub fn new(seed: u64) -> Network {
        let net = Network(Arc::new(Mutex::new(State {
            inboxes: HashMap::new(),
            cut: HashSet::new(),
            drop_per_mille: 0,
            max_delay: Duration::ZERO,
            rng: StdRng::seed_from_u64(seed),
            delayed: BinaryHeap::new(),
            held: HashMap::new(),
            next_held: 0,
        })));
        let ticker = net.clone();
        // Delivers delayed messages; ends when the last other handle is gone.
        std::thread::spawn(move || {
            while Arc::strong_count(&ticker.0) > 1 {
                ticker.deliver_due();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        net
    }

    /// Registers (or, after a restart, replaces) node `id`'s inbox.
    pub fn attach(&self, id: u64, inbox: flume::Sender<NodeMsg>) {
        self.0.lock().unwrap().inboxes.insert(id, inbox);
    }

    /// Removes node `id` (it is down): messages to it are lost.
    pub fn detach(&self, id: u64) {
        self.0.lock().unwrap().inboxes.remove(&id);
    }

    /// The sending side for node `id`.
    pub fn transport(&self, id: u64) -> SimTransport {
        SimTransport {
            id,
            net: self.clone(),
        }
    }

    /// Cuts every link between `id` and the others, both ways.
    pub fn isolate(&self, id: u64, all: &[u64]) {
        let mut s = self.0.lock().unwrap();
        for &other in all.iter().filter(|&&o| o != id) {
            s.cut.insert((id, other));
            s.cut.insert((other, id));
        }
    }

    /// Cuts the link from `from` to `to` only.
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.0.lock().unwrap().cut.insert((from, to));
    }

    /// Restores every link and removes loss and delay.
    pub fn heal(&self) {
        let mut s = self.0.lock().unwrap();
        s.cut.clear();
        s.drop_per_mille = 0;
        s.max_delay = Duration::ZERO;
    }

    /// Loses each message with this chance, per mille.
    pub fn set_loss(&self, per_mille: u32) {
        self.0.lock().unwrap().drop_per_mille = per_mille;
    }

    /// Delays each message by up to `max`.
    pub fn set_delay(&self, max: Duration) {
        self.0.lock().unwrap().max_delay = max;
    }

    /// A number drawn from the network's RNG, below `n`.
    pub fn draw(&self, n: u64) -> u64 {
        self.0.lock().unwrap().rng.random_range(0..n)
    }

    fn deliver_due(&self) {
        let mut s = self.0.lock().unwrap();
        let now = Instant::now();
        while let Some(Reverse((at, _, key))) = s.delayed.peek().copied() {
            if at > now {
                break;
            }
            s.delayed.pop();
            if let Some((to, m)) = s.held.remove(&key) {
                if let Some(inbox) = s.inboxes.get(&to) {
                    let _ = inbox.try_send(NodeMsg::Step(m));
                }
            }
        }
    }
}

/// One node's sending side of the [`Network`].
pub struct SimTransport {
    id: u64,
    net: Network,
}

impl PeerTransport for SimTransport {
    fn set_peers(&mut self, _membership: &Membership) {
        // Every node is reachable by ID; links are the network's business.
    }

    fn send(&mut self, messages: Vec<Message>) -> Vec<(u64, MessageType)> {
        let mut failed = Vec::new();
        let mut s = self.net.0.lock().unwrap();
        for m in messages {
            let (to, ty) = (m.to, m.get_msg_type());
            let loss = s.drop_per_mille;
            let lost =
                s.cut.contains(&(self.id, to)) || (loss > 0 && s.rng.random_range(0..1000) < loss);
            if ty == MessageType::MsgSnapshot {
                // Reported as the gRPC transport reports its snapshot streams.
                if let Some(me) = s.inboxes.get(&self.id) {
                    let _ = me.try_send(NodeMsg::SnapshotSent { to, ok: !lost });
                }
            }
            if lost {
                continue;
            }
            let Some(inbox) = s.inboxes.get(&to).cloned() else {
                failed.push((to, ty));
                continue;
            };
            if s.max_delay.is_zero() {
                let _ = inbox.try_send(NodeMsg::Step(m));
                continue;
            }
            let max = s.max_delay.as_micros() as u64;
            let delay = s.rng.random_range(0..=max);
            let key = s.next_held;
            s.next_held += 1;
            s.held.insert(key, (to, m));
            let at = Instant::now() + Duration::from_micros(delay);
            s.delayed.push(Reverse((at, to, key)));
        }
        failed
    }
}
