//! The producer in a cluster, sans-IO: brokers that lead, follow (answering
//! `not_leader` with a hint) or are dead, over a simulated network in
//! virtual time. One model broker stands for the replicated log and
//! producer state every broker of the shard holds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kaelix_protocol::{Datagram, ErrorCode, FrameKind, MAX_DATAGRAM_LEN};
use proptest::prelude::*;

use super::config::ProducerConfig;
use super::route::{ROUTE_BACKOFF_MAX, Routes};
use super::state::{ProducerEvent, ProducerState};
use crate::testing::{ModelBroker, Role, SplitMix, not_leader_replies};

const PRODUCER_ID: u32 = 91;
const LATENCY: Duration = Duration::from_micros(50);

/// What went on the wire towards a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sent {
    at: Instant,
    to: SocketAddr,
    kind: FrameKind,
    stream_id: u32,
    sequence: u64,
}

struct ClusterSim {
    start: Instant,
    now: Instant,
    producer: ProducerState,
    broker: ModelBroker,
    nodes: Vec<(SocketAddr, Role)>,
    /// Role changes to come: (at, node, role).
    schedule: Vec<(Instant, usize, Role)>,
    to_brokers: Vec<(Instant, SocketAddr, Vec<u8>)>,
    to_producer: Vec<(Instant, SocketAddr, Vec<u8>)>,
    rng: SplitMix,
    loss_permille: u32,
    wire: Vec<Sent>,
    events: Vec<ProducerEvent>,
    buf: Vec<u8>,
    spins: u32,
}

fn node_addr(index: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + index as u8], 7100 + 100 * index as u16))
}

impl ClusterSim {
    fn new(config: ProducerConfig, streams: &[u32], roles: &[Role], seed: u64) -> Self {
        let start = Instant::now();
        let nodes: Vec<_> = roles
            .iter()
            .enumerate()
            .map(|(index, role)| (node_addr(index), *role))
            .collect();
        let addrs: Vec<_> = nodes.iter().map(|(addr, _)| *addr).collect();
        let mut broker = ModelBroker::new(256);
        for &stream in streams {
            broker.add_stream(stream);
        }
        Self {
            start,
            now: start,
            buf: vec![0; config.datagram_len_max],
            producer: ProducerState::with_routes(config, Routes::new(&addrs, 1).unwrap()),
            broker,
            nodes,
            schedule: Vec::new(),
            to_brokers: Vec::new(),
            to_producer: Vec::new(),
            rng: SplitMix::new(seed),
            loss_permille: 0,
            wire: Vec::new(),
            events: Vec::new(),
            spins: 0,
        }
    }

    fn send(&mut self, stream_id: u32, payload: &[u8]) {
        self.producer
            .send(self.now, stream_id, payload, 0, true)
            .unwrap();
    }

    fn set_roles(&mut self, roles: &[Role]) {
        for (node, role) in self.nodes.iter_mut().zip(roles) {
            node.1 = *role;
        }
    }

    fn at(&mut self, after: Duration, roles: &[Role]) {
        let at = self.now + after;
        for (index, role) in roles.iter().enumerate() {
            self.schedule.push((at, index, *role));
        }
    }

    /// The node at `addr` dies: what it would still answer is lost too.
    fn kill(&mut self, index: usize) {
        let addr = self.nodes[index].0;
        self.nodes[index].1 = Role::Silent;
        self.to_producer.retain(|(_, from, _)| *from != addr);
    }

    fn step(&mut self) {
        let now = self.now;
        let mut index = 0;
        while index < self.schedule.len() {
            if self.schedule[index].0 <= now {
                let (_, node, role) = self.schedule.remove(index);
                self.nodes[node].1 = role;
            } else {
                index += 1;
            }
        }
        if self.producer.poll_timeout().is_some_and(|at| at <= now) {
            self.producer.handle_timeout(now);
        }
        while let Some(transmit) = self.producer.poll_transmit(now, &mut self.buf) {
            let to = self.producer.destination(transmit.stream_id).unwrap();
            let bytes = self.buf[..transmit.len].to_vec();
            for frame in Datagram::new(&bytes).frames() {
                let frame = frame.expect("the producer writes valid frames");
                self.wire.push(Sent {
                    at: now,
                    to,
                    kind: frame.kind(),
                    stream_id: frame.stream_id(),
                    sequence: frame.sequence(),
                });
            }
            if !self.rng.chance(self.loss_permille) {
                self.to_brokers.push((now + LATENCY, to, bytes));
            }
        }
        let mut reply = vec![0u8; MAX_DATAGRAM_LEN];
        for (to, bytes) in extract_due(&mut self.to_brokers, now) {
            let Some(&(addr, role)) = self.nodes.iter().find(|(addr, _)| *addr == to) else {
                continue;
            };
            let replies = match role {
                Role::Leading => {
                    let n = self.broker.handle_datagram(&bytes, &mut reply);
                    if n == 0 {
                        Vec::new()
                    } else {
                        vec![reply[..n].to_vec()]
                    }
                }
                Role::Following(leader) => not_leader_replies(&bytes, leader),
                Role::Silent => Vec::new(),
            };
            for bytes in replies {
                if !self.rng.chance(self.loss_permille) {
                    self.to_producer.push((now + LATENCY, addr, bytes));
                }
            }
        }
        for (from, bytes) in extract_due(&mut self.to_producer, now) {
            self.producer.handle_datagram_from(now, from, &bytes);
        }
        while let Some(event) = self.producer.poll_event() {
            self.events.push(event);
        }
        let next = [
            self.producer.poll_timeout(),
            self.to_brokers.iter().map(|(at, _, _)| *at).min(),
            self.to_producer.iter().map(|(at, _, _)| *at).min(),
            self.schedule.iter().map(|(at, _, _)| *at).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.now = match next {
            Some(at) if at > now => {
                self.spins = 0;
                at
            }
            Some(_) => {
                self.spins += 1;
                assert!(self.spins < 1000, "poll_timeout stays in the past");
                now + Duration::from_micros(1)
            }
            None => {
                assert!(
                    self.producer.is_idle(),
                    "stuck: messages buffered but no timer set: {:?}",
                    self.producer.stats()
                );
                now
            }
        };
    }

    fn run_until_idle(&mut self, limit: Duration) {
        while !(self.producer.is_idle() && self.to_producer.is_empty()) {
            assert!(
                self.now - self.start < limit,
                "not idle after {limit:?} of virtual time: {} buffered, stats {:?}",
                self.producer.buffered_frames(),
                self.producer.stats()
            );
            self.step();
        }
    }

    fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        while self.now < until {
            self.step();
            if self.producer.poll_timeout().is_none()
                && self.to_brokers.is_empty()
                && self.to_producer.is_empty()
                && self.schedule.is_empty()
            {
                break;
            }
        }
    }

    fn failed(&self) -> Vec<&ProducerEvent> {
        self.events
            .iter()
            .filter(|event| matches!(event, ProducerEvent::Failed { .. }))
            .collect()
    }

    /// Every message stored exactly once and in order per stream, every
    /// ticket delivered exactly once and in order, with the stored sequence.
    fn check_exactly_once(&self, sent: &HashMap<u32, Vec<Vec<u8>>>) {
        assert!(self.failed().is_empty(), "failed: {:?}", self.failed());
        let mut delivered: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        for event in &self.events {
            if let ProducerEvent::Delivered { ticket, delivery } = event {
                delivered
                    .entry(ticket.stream_id)
                    .or_default()
                    .push((ticket.number, delivery.sequence));
            }
        }
        for (stream, payloads) in sent {
            let records = self.broker.records(*stream);
            let stored: Vec<&[u8]> = records.iter().map(|r| r.payload.as_slice()).collect();
            let expected: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            assert_eq!(
                stored, expected,
                "stream {stream}: stored once each, in order"
            );
            let tickets = delivered.remove(stream).unwrap_or_default();
            let numbers: Vec<u64> = tickets.iter().map(|t| t.0).collect();
            assert_eq!(
                numbers,
                (1..=payloads.len() as u64).collect::<Vec<_>>(),
                "stream {stream}: each ticket delivered once, in order"
            );
            for ((_, sequence), record) in tickets.iter().zip(records) {
                assert_eq!(*sequence, record.sequence, "stream {stream}");
            }
        }
    }
}

fn extract_due(
    queue: &mut Vec<(Instant, SocketAddr, Vec<u8>)>,
    now: Instant,
) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut due = Vec::new();
    let mut index = 0;
    while index < queue.len() {
        if queue[index].0 <= now {
            let (_, addr, bytes) = queue.remove(index);
            due.push((addr, bytes));
        } else {
            index += 1;
        }
    }
    due
}

fn config() -> ProducerConfig {
    ProducerConfig {
        producer_id: PRODUCER_ID,
        linger: Duration::ZERO,
        batch_frames_max: 8,
        ..ProducerConfig::default()
    }
}

fn payloads(stream: u32, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("{stream}:{i}").into_bytes())
        .collect()
}

#[test]
fn a_follower_redirects_by_hint_and_everything_arrives_once_in_order() {
    let leader = node_addr(1);
    let mut sim = ClusterSim::new(
        config(),
        &[1],
        &[Role::Following(Some(leader)), Role::Leading],
        1,
    );
    let sent = payloads(1, 0..100);
    for payload in &sent {
        sim.send(1, payload);
    }
    sim.run_until_idle(Duration::from_secs(5));
    sim.check_exactly_once(&HashMap::from([(1, sent)]));
    let stats = sim.producer.stats();
    assert_eq!((stats.redirects, stats.rotations), (1, 0), "{stats:?}");
    assert_eq!(sim.producer.destination(1), Some(leader));
    // The follower got the opening probe only: nothing after the redirect.
    let to_follower: Vec<_> = sim.wire.iter().filter(|s| s.to == node_addr(0)).collect();
    assert_eq!(to_follower.len(), 1, "{to_follower:?}");
    assert_eq!(to_follower[0].kind, FrameKind::Heartbeat);
}

#[test]
fn an_open_flow_is_redirected_at_once_and_resends_its_unacked_frames() {
    let mut sim = ClusterSim::new(config(), &[1, 2], &[Role::Leading, Role::Silent], 2);
    let mut sent = HashMap::from([(1, payloads(1, 0..20)), (2, payloads(2, 0..20))]);
    for (one, two) in sent[&1].clone().iter().zip(sent[&2].clone().iter()) {
        sim.send(1, one);
        sim.send(2, two);
    }
    sim.run_until_idle(Duration::from_secs(1));
    // Leadership moves to node 1; node 0 follows and names it.
    sim.set_roles(&[Role::Following(Some(node_addr(1))), Role::Leading]);
    let more = [payloads(1, 20..120), payloads(2, 20..120)];
    for i in 0..100 {
        for (stream, payloads) in [(1, &more[0]), (2, &more[1])] {
            sim.send(stream, &payloads[i]);
        }
        if i % 10 == 0 {
            sim.step();
        }
    }
    sim.run_until_idle(Duration::from_secs(5));
    sent.get_mut(&1).unwrap().extend(more[0].clone());
    sent.get_mut(&2).unwrap().extend(more[1].clone());
    sim.check_exactly_once(&sent);
    let stats = sim.producer.stats();
    // Both streams share shard 0: one move for both.
    assert_eq!((stats.redirects, stats.rotations), (1, 0), "{stats:?}");
    // The rejected frames went to the leader at once, not after a timer.
    assert_eq!(stats.timeouts, 0, "{stats:?}");
}

#[test]
fn stale_rejections_from_the_former_destination_move_nothing() {
    // Many datagrams in flight to a follower, one ERROR datagram per frame back.
    let producer_config = ProducerConfig {
        batch_frames_max: 1,
        ..config()
    };
    let mut sim = ClusterSim::new(producer_config, &[1], &[Role::Leading, Role::Leading], 3);
    sim.send(1, b"open");
    sim.run_until_idle(Duration::from_secs(1));
    sim.set_roles(&[Role::Following(Some(node_addr(1))), Role::Leading]);
    let mut sent = vec![b"open".to_vec()];
    for payload in payloads(1, 0..50) {
        sim.send(1, &payload);
        sent.push(payload);
    }
    sim.run_until_idle(Duration::from_secs(5));
    sim.check_exactly_once(&HashMap::from([(1, sent)]));
    let stats = sim.producer.stats();
    assert_eq!(stats.redirects, 1, "{stats:?}");
    assert!(stats.stale_replies >= 40, "{stats:?}");
}

#[test]
fn a_dead_leader_is_left_after_silent_timeouts_and_nothing_is_lost_or_doubled() {
    let mut sim = ClusterSim::new(
        config(),
        &[1],
        &[
            Role::Leading,
            Role::Following(Some(node_addr(0))),
            Role::Following(Some(node_addr(0))),
        ],
        4,
    );
    let sent = payloads(1, 0..300);
    for payload in &sent[..150] {
        sim.send(1, payload);
    }
    // Let part of it through, then kill the leader with frames in flight
    // whose ACKs die with it (appended and replicated, never acknowledged).
    for _ in 0..6 {
        sim.step();
    }
    assert!(!sim.broker.records(1).is_empty());
    sim.kill(0);
    let killed_at = sim.now;
    // An election: nobody knows a leader for 400 ms, then node 2 leads.
    sim.set_roles(&[Role::Silent, Role::Following(None), Role::Following(None)]);
    sim.at(
        Duration::from_millis(400),
        &[
            Role::Silent,
            Role::Following(Some(node_addr(2))),
            Role::Leading,
        ],
    );
    for payload in &sent[150..] {
        sim.send(1, payload);
    }
    sim.run_until_idle(Duration::from_secs(10));
    sim.check_exactly_once(&HashMap::from([(1, sent)]));
    let stats = sim.producer.stats();

    assert!(stats.rotations >= 2, "{stats:?}");
    assert_eq!(sim.producer.destination(1), Some(node_addr(2)));
    // While no leader was known only HEARTBEAT probes went out, with a
    // backoff: a handful, not windows of DATA.
    let election = killed_at + Duration::from_millis(50)..killed_at + Duration::from_millis(400);
    let during: Vec<_> = sim
        .wire
        .iter()
        .filter(|s| election.contains(&s.at))
        .collect();
    assert!(
        during.iter().all(|s| s.kind == FrameKind::Heartbeat),
        "{during:?}"
    );
    let at_cap = 350_000 / ROUTE_BACKOFF_MAX.as_micros() as usize;
    assert!(
        during.len() <= at_cap + 10,
        "{} probes: {during:?}",
        during.len()
    );
}

#[test]
fn a_cluster_without_a_leader_gets_backed_off_probes_until_one_is_elected() {
    let mut sim = ClusterSim::new(
        config(),
        &[1],
        &[Role::Following(None), Role::Following(None)],
        5,
    );
    let sent = payloads(1, 0..10);
    for payload in &sent {
        sim.send(1, payload);
    }
    sim.at(
        Duration::from_secs(2),
        &[Role::Following(Some(node_addr(1))), Role::Leading],
    );
    sim.run_for(Duration::from_secs(2) - Duration::from_micros(1));
    assert!(sim.broker.records(1).is_empty());
    assert!(sim.wire.iter().all(|s| s.kind == FrameKind::Heartbeat));
    // 2 s at the capped backoff (plus its ramp), not thousands.
    let probes = sim.wire.len() as u32;
    let at_cap = Duration::from_secs(2).as_micros() as u32 / ROUTE_BACKOFF_MAX.as_micros() as u32;
    assert!(
        (at_cap / 2..=at_cap + 10).contains(&probes),
        "{probes} probes, {at_cap} at the cap"
    );
    // Once the backoff reached its ceiling, probes are at least that far apart.
    let tail: Vec<_> = sim.wire.iter().rev().take(5).map(|s| s.at).collect();
    for pair in tail.windows(2) {
        assert!(pair[0] - pair[1] >= ROUTE_BACKOFF_MAX, "{tail:?}");
    }
    sim.run_until_idle(Duration::from_secs(10));
    sim.check_exactly_once(&HashMap::from([(1, sent)]));
}

#[test]
fn without_routes_not_leader_stays_a_permanent_rejection() {
    let mut producer = ProducerState::new(config());
    let now = Instant::now();
    producer.send(now, 1, b"x", 0, true).unwrap();
    let mut buf = vec![0; 2048];
    let transmit = producer.poll_transmit(now, &mut buf).unwrap();
    let reply = not_leader_replies(&buf[..transmit.len], Some(node_addr(1)));
    producer.handle_datagram(now, &reply[0]);
    assert!(matches!(
        producer.poll_event(),
        Some(ProducerEvent::Failed {
            code: ErrorCode::NotLeader,
            ..
        })
    ));
    assert_eq!(producer.destination(1), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Leadership moves around three brokers at random (with dead leaders,
    /// elections without a leader, stale hints) on a lossy network: every
    /// message is stored once, in order, every ticket delivered once.
    #[test]
    fn prop_exactly_once_in_order_across_failovers(
        seed: u64,
        messages in proptest::collection::vec(0u32..3, 1..300),
        changes in proptest::collection::vec((0usize..3, 0u8..4, 1u64..120), 0..8),
        loss_permille in 0u32..100,
        interleave in 1usize..40,
    ) {
        let roles = [Role::Leading, Role::Following(Some(node_addr(0))), Role::Following(Some(node_addr(0)))];
        let mut sim = ClusterSim::new(config(), &[0, 1, 2], &roles, seed);
        sim.loss_permille = loss_permille;
        let mut at = Duration::ZERO;
        for (leader, kind, after_ms) in &changes {
            at += Duration::from_millis(*after_ms);
            let roles: Vec<Role> = (0..3)
                .map(|node| match (node == *leader, kind) {
                    (true, 0) => Role::Silent,
                    (true, _) => Role::Leading,
                    (false, 1) => Role::Following(None),
                    // A stale hint: names the node before.
                    (false, 2) => Role::Following(Some(node_addr((leader + 2) % 3))),
                    (false, _) => Role::Following(Some(node_addr(*leader))),
                })
                .collect();
            sim.at(at, &roles);
        }
        // Finally a stable leader, so everything can be delivered.
        at += Duration::from_millis(50);
        sim.at(at, &[Role::Following(Some(node_addr(1))), Role::Leading, Role::Following(Some(node_addr(1)))]);
        // The messages are spread over the changes.
        let pause = at / (messages.len() / interleave + 1) as u32;
        let mut sent: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
        for (i, stream) in messages.iter().enumerate() {
            let payload = format!("{stream}:{i}").into_bytes();
            sim.send(*stream, &payload);
            sent.entry(*stream).or_default().push(payload);
            if i % interleave == 0 {
                sim.run_for(pause);
            }
        }
        sim.run_until_idle(Duration::from_secs(600));

        sim.check_exactly_once(&sent);
    }
}
