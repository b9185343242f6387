//! Slow, lossy and one-way-cut peer links as a fault of the robustness profile, through the
//! server's test fault hook ([`Cluster::fault_links`]; `failpoints` builds only), and the tests
//! that show each link fault acts.

use std::time::Duration;

use tokio::time::sleep;

use crate::harness::{Cluster, LinkFault};
use crate::traffic::Lcg;

/// Link faults the profile injected, by kind.
#[derive(Debug, Default)]
pub struct LinkFaultCounts {
    /// Every peer link of one member slowed (50-300 ms each way).
    pub slow: usize,
    /// Every peer link of one member lossy (20-60 % each way).
    pub lossy: usize,
    /// One member can send but not receive, or receive but not send.
    pub one_way: usize,
    /// Of all of these, faults on the leader's links.
    pub leader: usize,
}

impl LinkFaultCounts {
    /// All link faults.
    pub fn total(&self) -> usize {
        self.slow + self.lossy + self.one_way
    }
}

impl std::fmt::Display for LinkFaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "link={} (slow={}, lossy={}, one-way={}) of which leader={}",
            self.total(),
            self.slow,
            self.lossy,
            self.one_way,
            self.leader
        )
    }
}

/// Link faults in place: heals every peer link when dropped, so that they never outlive
/// their fault, even when the run panics meanwhile.
pub struct LinksFaulted<'a>(&'a Cluster);

impl<'a> LinksFaulted<'a> {
    /// Puts `fault` on every peer link of member `victim`.
    pub fn on(cluster: &'a Cluster, victim: usize, fault: LinkFault) -> LinksFaulted<'a> {
        let others: Vec<usize> = (0..cluster.len()).filter(|i| *i != victim).collect();
        cluster.fault_links(victim, &others, fault);
        LinksFaulted(cluster)
    }
}

impl Drop for LinksFaulted<'_> {
    fn drop(&mut self) {
        self.0.heal();
    }
}

/// The profile's link fault: for 1.5-3 s, one member's links (the leader's half of the time)
/// are slow (50-300 ms each way), lossy (20-60 %), or cut one way (it sends but does not
/// receive, or the reverse); then they heal. Counted in `counts`.
pub async fn inject(cluster: &Cluster, leader: usize, rng: &mut Lcg, counts: &mut LinkFaultCounts) {
    let victim = if rng.below(2) == 0 {
        leader
    } else {
        rng.below(cluster.len() as u64) as usize
    };
    let fault = match rng.below(3) {
        0 => {
            counts.slow += 1;
            LinkFault::Delay(50 + rng.below(251))
        }
        1 => {
            counts.lossy += 1;
            LinkFault::Loss((20 + rng.below(41)) as f64)
        }
        _ => {
            counts.one_way += 1;
            if rng.below(2) == 0 {
                LinkFault::CutRecv
            } else {
                LinkFault::CutSend
            }
        }
    };
    counts.leader += (victim == leader) as usize;
    let faulted = LinksFaulted::on(cluster, victim, fault);
    sleep(Duration::from_millis(1500 + rng.below(1501))).await;
    drop(faulted);
}

#[cfg(feature = "failpoints")]
mod tests {
    use std::time::Instant;

    use tokio::time::timeout;

    use super::*;
    use crate::harness::{wait_until_async, ELECTION_MS};
    use crate::traffic::{CLUSTERS, PREFIX};

    /// A put of `value` through member `i`: its latency, or `None` if it failed or took more
    /// than 10 s.
    async fn timed_put(cluster: &Cluster, i: usize, value: &str) -> Option<Duration> {
        let mut c = cluster.try_client(i).await.ok()?;
        let started = Instant::now();
        match timeout(
            Duration::from_secs(10),
            c.put(format!("{PREFIX}links"), value, None),
        )
        .await
        {
            Ok(Ok(_)) => Some(started.elapsed()),
            _ => None,
        }
    }

    /// Waits until the members other than `old` agree on a leader among themselves in a term
    /// above `old_term`; that leader's index.
    async fn new_leader_among_others(cluster: &Cluster, old: usize, old_term: u64) -> usize {
        let others: Vec<usize> = (0..cluster.len()).filter(|i| *i != old).collect();
        let mut seen = Vec::new();
        let mut new = None;
        wait_until_async(Duration::from_secs(60), async || {
            seen.clear();
            for &i in &others {
                seen.push(cluster.status(i).await);
            }
            if let [Some((l0, t0, _)), Some((l1, t1, _))] = seen[..] {
                if l0 == l1 && t0 == t1 && t0 > old_term {
                    new = others.iter().copied().find(|i| cluster.ids[*i] == l0);
                }
            }
            new.is_some()
        })
        .await;
        new.unwrap_or_else(|| {
            panic!(
                "no new leader among {others:?} after term {old_term}: {seen:?}\n{}",
                cluster.logs()
            )
        })
    }

    /// After a heal: every member agrees on a leader and holds the same data.
    async fn converges(cluster: &Cluster) {
        cluster.wait_for_leader(Duration::from_secs(60)).await;
        cluster.wait_converged(Duration::from_secs(60)).await;
    }

    /// A delay of D on the leader's links holds every Raft message to and from it back D, so
    /// a put through the leader, which commits only once a follower's answer to the append
    /// is back, takes at least 2 D (a lower bound: the machine's load only adds to it); once
    /// healed, puts are fast again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_delay_holds_back_every_message_of_the_link() {
        let _one = CLUSTERS.lock().await;
        let cluster = Cluster::start(3, &[]).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        // Below the election timeout both ways (heartbeats late by D, answers by 2 D), so
        // the leader keeps its lease and followers do not campaign.
        const D: u64 = 150;
        const { assert!(2 * D < ELECTION_MS) };
        cluster.delay_links(leader, D);
        for n in 0..3 {
            let took = timed_put(&cluster, leader, &format!("slow-{n}"))
                .await
                .unwrap_or_else(|| panic!("a put through the slowed leader\n{}", cluster.logs()));
            assert!(
                took >= Duration::from_millis(2 * D),
                "put {n} took {took:?}, under the {}ms round trip of the delayed link",
                2 * D
            );
        }
        cluster.heal();
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        // A condition, not a timing assertion: some put commits faster than one delayed hop.
        let mut last = None;
        let fast = wait_until_async(Duration::from_secs(30), async || {
            last = timed_put(&cluster, leader, "healed").await;
            last.is_some_and(|t| t < Duration::from_millis(D))
        })
        .await;
        assert!(fast, "puts stay slow after the heal: last {last:?}");
        converges(&cluster).await;
    }

    /// 100 % loss on the leader's links: the other two elect a new leader in a higher term and
    /// take a put, while a put through the old leader fails; healed, all converge.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_loss_on_the_leaders_links_elects_a_new_leader() {
        let _one = CLUSTERS.lock().await;
        let cluster = Cluster::start(3, &[]).await;
        let old = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let (_, old_term, _) = cluster.status(old).await.expect("status of the leader");
        let faulted = LinksFaulted::on(&cluster, old, LinkFault::Loss(100.0));
        let new = new_leader_among_others(&cluster, old, old_term).await;
        assert!(timed_put(&cluster, new, "majority").await.is_some());
        assert_eq!(
            timed_put(&cluster, old, "minority").await,
            None,
            "the old leader, all of whose messages are lost, acknowledged a put"
        );
        drop(faulted);
        converges(&cluster).await;
    }

    /// Partial loss acts without stopping the cluster: the lossy member counts dropped
    /// messages in `etcd_network_peer_sent_failures_total` while puts through it still
    /// commit (Raft retransmits what is lost).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_loss_drops_messages_and_raft_retransmits() {
        let _one = CLUSTERS.lock().await;
        let cluster = Cluster::start(3, &[]).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let failures = || {
            let metrics =
                crate::harness::curl(&format!("http://{}/metrics", cluster.endpoint(leader)), &[]);
            metrics
                .body
                .lines()
                .filter(|l| l.starts_with("etcd_network_peer_sent_failures_total"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let before = failures();
        let faulted = LinksFaulted::on(&cluster, leader, LinkFault::Loss(50.0));
        let mut committed = 0;
        for n in 0..10 {
            // Retried: a put can time out if a leader change happens meanwhile.
            if timed_put(&cluster, leader, &format!("lossy-{n}"))
                .await
                .is_some()
            {
                committed += 1;
            }
        }
        let after = failures();
        drop(faulted);
        assert!(
            committed > 0,
            "no put committed over 50 % loss\n{}",
            cluster.logs()
        );
        // Heartbeats alone are 20 a second per follower: at 50 % loss, none lost over the
        // puts has probability below 2^-20.
        assert!(
            after > before,
            "no message counted as lost ({before} -> {after})"
        );
        converges(&cluster).await;
    }

    /// The leader receives nothing but its messages still go out: its followers keep hearing
    /// heartbeats, so nobody campaigns until the leader, hearing no answers, steps down
    /// (check_quorum); the other two then elect a new leader in a higher term. The old leader
    /// hears none of it, and with pre-vote (a campaign must first win a pre-vote, whose
    /// answers it cannot hear) it never raises its term: it stays in the old term, without a
    /// leader it knows of, taking no writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_cannot_receive_steps_down_and_keeps_its_term() {
        let _one = CLUSTERS.lock().await;
        let cluster = Cluster::start(3, &[]).await;
        let old = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let (_, old_term, _) = cluster.status(old).await.expect("status of the leader");
        let faulted = LinksFaulted::on(&cluster, old, LinkFault::CutRecv);
        let new = new_leader_among_others(&cluster, old, old_term).await;
        assert!(timed_put(&cluster, new, "majority").await.is_some());
        // Several election timeouts on, the old leader has stepped down and kept its term.
        let mut status = None;
        let stepped_down = wait_until_async(Duration::from_secs(30), async || {
            status = cluster.status(old).await;
            matches!(status, Some((leader, _, _)) if leader != cluster.ids[old])
        })
        .await;
        assert!(stepped_down, "the old leader still leads: {status:?}");
        let (_, term, _) = status.expect("status");
        assert_eq!(
            term, old_term,
            "its term rose, though it hears no pre-vote answer"
        );
        assert_eq!(timed_put(&cluster, old, "minority").await, None);
        drop(faulted);
        converges(&cluster).await;
    }

    /// The leader receives everything but sends nothing: its followers hear no heartbeat and
    /// elect a new leader among themselves in a higher term, and the old leader, which hears
    /// the new one, follows it (same leader, same term), though a put through it cannot
    /// reach that leader and fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_that_cannot_send_is_replaced_and_follows_the_new_leader() {
        let _one = CLUSTERS.lock().await;
        let cluster = Cluster::start(3, &[]).await;
        let old = cluster.wait_for_leader(Duration::from_secs(60)).await;
        let (_, old_term, _) = cluster.status(old).await.expect("status of the leader");
        let faulted = LinksFaulted::on(&cluster, old, LinkFault::CutSend);
        let new = new_leader_among_others(&cluster, old, old_term).await;
        let mut status = None;
        let follows = wait_until_async(Duration::from_secs(30), async || {
            status = cluster.status(old).await;
            let (_, new_term, _) = cluster.status(new).await.unwrap_or_default();
            matches!(status, Some((l, t, _)) if l == cluster.ids[new] && t == new_term)
        })
        .await;
        assert!(
            follows,
            "the old leader does not follow the new one: {status:?}"
        );
        assert!(timed_put(&cluster, new, "majority").await.is_some());
        assert_eq!(
            timed_put(&cluster, old, "minority").await,
            None,
            "a put through a member that cannot send was acknowledged"
        );
        drop(faulted);
        converges(&cluster).await;
    }
}
