//! The dispatcher's side of the shards' apply queues: commands are gathered per shard and each
//! shard gets them as one [`ApplyCmd::Batch`] when the dispatcher puts a barrier behind them or
//! next has to wait for a shard (a txn's compares, a delete's answer).
//!
//! A put does not wait for its shard, so before this every put of an entry was a send of its
//! own, and the barrier after the entry another: a lone client's put woke the shard that owns
//! its key twice, once for the put and once for the barrier (issue 17, "one wake-up per batch
//! per thread"). Gathered, the put and the barrier arrive together.
//!
//! **Order is kept.** Every command the dispatcher sends a shard goes through the outbox, and
//! a shard's commands leave in the order they were sent; the dispatcher waits for a reply
//! only through [`Outbox::wait`], which sends everything gathered first. So a shard answers
//! each command after exactly the commands sent before it, as with one send per command.
//!
//! **Shards still work alongside the dispatcher on a large entry.** A shard's commands also
//! leave once [`FLUSH_AT`] of them are gathered, so an entry of thousands of puts does not
//! leave the shards idle until its barrier.

use std::cell::RefCell;

use tokio::sync::oneshot;

use crate::shard::ApplyCmd;

/// Commands gathered for one shard before they leave without waiting for a wait.
pub const FLUSH_AT: usize = 64;

/// Per-shard commands not yet sent (see the module docs).
pub struct Outbox {
    /// The shards' apply queues, by shard.
    queues: Vec<flume::Sender<ApplyCmd>>,
    /// Indexed by shard.
    gathered: RefCell<Vec<Vec<ApplyCmd>>>,
    /// Which shards were sent anything but a barrier since [`Outbox::take_touched`] last
    /// asked, by shard.
    touched: RefCell<Vec<bool>>,
}

impl Outbox {
    /// An empty outbox for the shards' apply queues, in shard order.
    pub fn new(queues: Vec<flume::Sender<ApplyCmd>>) -> Outbox {
        let gathered = RefCell::new(queues.iter().map(|_| Vec::new()).collect());
        let touched = RefCell::new(vec![false; queues.len()]);
        Outbox {
            queues,
            gathered,
            touched,
        }
    }

    /// Queues `cmd` for `shard`, after what was queued for it before. It leaves with the next
    /// [`Outbox::flush`] or [`Outbox::wait`], or at once if [`FLUSH_AT`] commands are queued.
    /// Must not be [`ApplyCmd::Purge`] or [`ApplyCmd::Close`], which a shard handles only on
    /// their own (send those with [`Outbox::send_now`]).
    pub fn send(&self, shard: usize, cmd: ApplyCmd) {
        debug_assert!(!matches!(
            cmd,
            ApplyCmd::Purge { .. } | ApplyCmd::Close { .. } | ApplyCmd::Batch(_)
        ));
        // A barrier only asks a shard to report; it gives it nothing to apply.
        if !matches!(cmd, ApplyCmd::Barrier { .. }) {
            self.touched.borrow_mut()[shard] = true;
        }
        let mut gathered = self.gathered.borrow_mut();
        let queue = &mut gathered[shard];
        queue.push(cmd);
        if queue.len() >= FLUSH_AT {
            let cmds = std::mem::take(queue);
            self.deliver(shard, cmds);
        }
    }

    /// Sends `cmd` to `shard` on its own, after everything queued (for every shard).
    pub fn send_now(&self, shard: usize, cmd: ApplyCmd) {
        self.flush();
        self.touched.borrow_mut()[shard] = true;
        // A stopped shard is seen at the next wait (see `Outbox::wait`).
        let _ = self.queues[shard].send(cmd);
    }

    /// Sends every shard what is queued for it: one command as itself, several as one batch.
    pub fn flush(&self) {
        let mut gathered = self.gathered.borrow_mut();
        for (shard, queue) in gathered.iter_mut().enumerate() {
            if !queue.is_empty() {
                let cmds = std::mem::take(queue);
                self.deliver(shard, cmds);
            }
        }
    }

    /// The shards sent anything but a barrier since the last call (or since the start), in
    /// shard order; forgets them.
    pub fn take_touched(&self) -> Vec<usize> {
        let mut touched = self.touched.borrow_mut();
        let shards = (0..touched.len()).filter(|&s| touched[s]).collect();
        touched.fill(false);
        shards
    }

    /// Flushes, then waits for a shard's reply. Unwinds with [`super::ShardStopped`] if the
    /// shard dropped the command unanswered (see [`super::recv_or_unwind`]).
    pub fn wait<T>(&self, rx: oneshot::Receiver<T>) -> T {
        self.flush();
        super::recv_or_unwind(rx)
    }

    fn deliver(&self, shard: usize, mut cmds: Vec<ApplyCmd>) {
        let cmd = if cmds.len() == 1 {
            cmds.pop().expect("one command")
        } else {
            ApplyCmd::Batch(cmds)
        };
        // A stopped shard is seen at the next wait: its reply never comes.
        let _ = self.queues[shard].send(cmd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(rev: i64) -> ApplyCmd {
        ApplyCmd::Compact { rev }
    }

    /// The revisions of the compactions `rx` got, with `[]` around each batch.
    fn received(rx: &flume::Receiver<ApplyCmd>) -> String {
        fn one(cmd: &ApplyCmd) -> String {
            match cmd {
                ApplyCmd::Compact { rev } => rev.to_string(),
                ApplyCmd::Get { .. } => "get".to_string(),
                ApplyCmd::Batch(cmds) => {
                    format!("[{}]", cmds.iter().map(one).collect::<Vec<_>>().join(" "))
                }
                _ => "?".to_string(),
            }
        }
        rx.try_iter().map(|c| one(&c)).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn commands_leave_in_order_as_one_batch_per_shard_when_the_dispatcher_waits() {
        let (tx0, rx0) = flume::unbounded();
        let (tx1, rx1) = flume::unbounded();
        let outbox = Outbox::new(vec![tx0, tx1]);
        outbox.send(0, compact(1));
        outbox.send(1, compact(2));
        outbox.send(0, compact(3));
        assert_eq!(received(&rx0), "", "nothing leaves before a wait");
        let (reply, rx) = oneshot::channel();
        outbox.send(
            1,
            ApplyCmd::Get {
                key: b"k".to_vec(),
                rev: 3,
                reply,
            },
        );
        // The shard answers only once it has the command: from another thread, as a shard.
        let shard1 = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for cmd in rx1.iter() {
                let ApplyCmd::Batch(cmds) = cmd else {
                    panic!("one batch")
                };
                for cmd in cmds {
                    match cmd {
                        ApplyCmd::Get { reply, .. } => {
                            seen.push("get".to_string());
                            let _ = reply.send(None);
                        }
                        ApplyCmd::Compact { rev } => seen.push(rev.to_string()),
                        _ => seen.push("?".to_string()),
                    }
                }
            }
            seen.join(" ")
        });
        assert_eq!(outbox.wait(rx), None);
        assert_eq!(received(&rx0), "[1 3]");
        outbox.send(0, compact(4));
        outbox.flush();
        assert_eq!(received(&rx0), "4", "a lone command goes as itself");
        drop(outbox);
        assert_eq!(shard1.join().unwrap(), "2 get");
    }

    #[test]
    fn a_long_run_of_commands_leaves_without_waiting_for_a_wait() {
        let (tx, rx) = flume::unbounded();
        let outbox = Outbox::new(vec![tx]);
        for rev in 0..FLUSH_AT as i64 + 1 {
            outbox.send(0, compact(rev));
        }
        let first = rx.try_recv().expect("the first FLUSH_AT left");
        assert!(matches!(&first, ApplyCmd::Batch(c) if c.len() == FLUSH_AT));
        assert!(rx.try_recv().is_err(), "the last one waits");
        outbox.send_now(0, ApplyCmd::Purge { rev: 9 });
        assert_eq!(
            received(&rx),
            format!("{FLUSH_AT} ?"),
            "queued ones go first"
        );
    }

    #[test]
    fn the_outbox_tells_which_shards_it_sent_anything_since_it_was_last_asked() {
        let (tx0, _rx0) = flume::unbounded();
        let (tx1, _rx1) = flume::unbounded();
        let (tx2, _rx2) = flume::unbounded();
        let outbox = Outbox::new(vec![tx0, tx1, tx2]);
        assert!(outbox.take_touched().is_empty());
        outbox.send(2, compact(1));
        outbox.send_now(0, ApplyCmd::Purge { rev: 1 });
        assert_eq!(outbox.take_touched(), vec![0, 2]);
        assert!(outbox.take_touched().is_empty(), "forgotten once asked");
        let (mut acks, _passed) = crate::shard::BarrierAck::new(1);
        let state = crate::shard::BarrierState {
            applied_index: 1,
            applied_term: 1,
            revision: 1,
            compact_revision: 0,
            lease_changes: std::sync::Arc::new(Vec::new()),
            events: None,
        };
        let reply = acks.pop().expect("one part");
        outbox.send(1, ApplyCmd::Barrier { state, reply });
        assert!(
            outbox.take_touched().is_empty(),
            "a barrier gives a shard nothing to apply"
        );
    }
}
