//! Three `kaelix serve` processes on loopback with data replication
//! (`cluster.replication_factor = 3`) and stream 1 at the `replicated`
//! durability level (clusters from `failover_support`).
//!
//! - A producer that knows all three brokers sends at a steady rate; the
//!   shard's leader is killed with SIGKILL; the controller moves the shard
//!   to a follower and the producer follows the `not_leader` redirects. The
//!   killed broker is restarted (it drops the tail the new leader lacks and
//!   catches up), and this is repeated three times. Every acknowledged
//!   message is then read back from the last leader exactly once, in order.
//!   The time from each kill to the next acknowledgement is printed (not
//!   asserted: performance is measured in benchmarks, not tests).
//! - With both followers stopped (SIGSTOP) the leader, a minority, commits
//!   nothing; once they continue, everything is acknowledged.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kaelix_client::producer::Producer;
use kaelix_tests::kaelix_bin;

mod failover_support;
use failover_support::*;

#[test]
fn replicated_acks_survive_repeated_leader_kills_and_restarts() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(3);
    let mut nodes = cluster(&bin, &dirs, TUNED);
    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    // The first ACK needs the shard assigned and a follower caught up.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let warmup = b"warmup".to_vec();
    producer
        .send_and_wait(STREAM, &warmup, Duration::from_secs(60))
        .expect("the first replicated ACK");
    sent.push(warmup);

    let per_round = 1500u64;
    let mut failovers = Vec::new();
    for round in 0..3u64 {
        let leader = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
        let epoch = shard0(&runtime, &nodes[leader]).map_or(0, |p| p.epoch);
        eprintln!(
            "round {round}: shard 0 led by node {} at epoch {epoch}",
            nodes[leader].id
        );
        // Steady load; SIGKILL the leader in the middle of it.
        let mut killed_at = None;
        let mut sent_at_kill = 0;
        let mut first_ack_after = None;
        for n in 0..per_round {
            let payload = format!("round {round} message {n:06}").into_bytes();
            producer.send(STREAM, &payload).expect("send");
            sent.push(payload);
            if n == per_round / 3 {
                // Sequences count messages from 1: everything above this
                // was sent after the kill.
                sent_at_kill = sent.len() as u64;
                nodes[leader].kill9();
                killed_at = Some(Instant::now());
            }
            if let Some(at) = killed_at
                && first_ack_after.is_none()
                && producer
                    .flow_ack(STREAM)
                    .is_some_and(|a| a.sequence > sent_at_kill)
            {
                first_ack_after = Some(at.elapsed());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if let Err(err) = producer.flush(Duration::from_secs(60)) {
            let positions: Vec<_> = nodes.iter().map(|n| (n.id, shard0(&runtime, n))).collect();
            panic!(
                "round {round}: not every message acknowledged after the failover: {err}; \
                 producer {:?} sends to {:?}; shard 0 on the nodes: {positions:?}",
                producer.stats(),
                producer.destination(STREAM),
            );
        }
        let took = first_ack_after.unwrap_or_else(|| killed_at.unwrap().elapsed());
        eprintln!("round {round}: kill -9 of the shard leader to the next ACK: {took:?}");
        failovers.push(took);
        let new_leader = leader_of_shard0(&runtime, &nodes).expect("a new shard leader");
        assert_ne!(new_leader, leader, "the leader moved");
        let new_epoch = shard0(&runtime, &nodes[new_leader]).map_or(0, |p| p.epoch);
        assert!(new_epoch > epoch, "a failover starts a new epoch");

        // Restart the killed broker; it must catch up with the new leader
        // (its log agreeing with the new epoch) before the next round.
        let (id, dir, port) = {
            let old = &nodes[leader];
            (old.id, old.dir.clone(), old.cluster_port)
        };
        nodes[leader] = Node::start(&bin, id, &dir, port);
        // (The current epoch, in case a loaded machine moved the shard
        // again meanwhile.)
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let here = shard0(&runtime, &nodes[leader]);
            let current = leader_of_shard0(&runtime, &nodes)
                .and_then(|l| shard0(&runtime, &nodes[l]))
                .map(|p| p.epoch);
            if here.is_some_and(|p| Some(p.epoch) == current && p.epoch >= new_epoch) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not catch up with epoch {current:?}: {here:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let stats = producer.stats();
    eprintln!("failovers: {failovers:?}; producer: {stats:?}");
    assert!(producer.take_errors().is_empty(), "no message failed");

    let last = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    assert_read_back(nodes[last].fetch, producer.producer_id(), &sent);
}

#[test]
fn a_leader_cut_off_from_both_followers_commits_nothing() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(3);
    let nodes = cluster(&bin, &dirs, TUNED);
    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    producer
        .send_and_wait(STREAM, b"warmup", Duration::from_secs(60))
        .expect("the first replicated ACK");
    let leader = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    let followers: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, n)| n)
        .collect();
    for follower in &followers {
        follower.signal("-STOP");
    }
    let acked = producer.flow_ack(STREAM).map_or(0, |a| a.sequence);
    for n in 0..100u64 {
        producer
            .send(STREAM, format!("cut off {n}").as_bytes())
            .expect("send");
    }
    // A second is long enough for the leader's own appends; only a quorum
    // is missing.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        producer.flow_ack(STREAM).map_or(0, |a| a.sequence),
        acked,
        "nothing is acknowledged without a quorum"
    );
    let position = shard0(&runtime, &nodes[leader]).expect("the leader answers");
    assert!(position.leading, "the leader still leads");
    for follower in &followers {
        follower.signal("-CONT");
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("everything acknowledged once the followers are back");
    assert!(producer.take_errors().is_empty(), "no message failed");
}
