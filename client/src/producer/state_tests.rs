//! Tests of the sans-IO producer against the model broker over a simulated
//! network (virtual time, loss, duplication, reordering), no I/O at all.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kaelix_protocol::{Datagram, ErrorCode, FrameKind, MAX_DATAGRAM_LEN, flags};
use proptest::prelude::*;

use super::config::ProducerConfig;
use super::state::{
    OVERLOAD_BACKOFF_MAX, OVERLOAD_BACKOFF_MIN, ProducerEvent, ProducerState, SendError, Ticket,
};
use crate::testing::{ModelBroker, SplitMix};

#[derive(Debug, Clone, Copy, Default)]
struct NetFaults {
    loss_permille: u32,
    dup_permille: u32,
    /// Extra random delay up to this, so datagrams overtake each other.
    jitter_us: u64,
}

struct Sim {
    start: Instant,
    now: Instant,
    producer: ProducerState,
    broker: ModelBroker,
    to_broker: Vec<(Instant, Vec<u8>)>,
    to_producer: Vec<(Instant, Vec<u8>)>,
    rng: SplitMix,
    faults: NetFaults,
    events: Vec<ProducerEvent>,
    /// Every DATA frame the producer put on the wire: (stream, sequence, flags).
    wire: Vec<(u32, u64, u16)>,
    /// Drop the next N datagrams towards the broker.
    blackhole: usize,
    /// Extra delay of the broker's replies (a broker whose ACKs wait for a
    /// slow disk), nothing lost.
    reply_stall: Duration,
    buf: Vec<u8>,
    /// Steps in a row whose next deadline was already past.
    spins: u32,
}

const LATENCY: Duration = Duration::from_micros(50);

impl Sim {
    fn new(config: ProducerConfig, broker: ModelBroker, faults: NetFaults, seed: u64) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            buf: vec![0; config.datagram_len_max],
            producer: ProducerState::new(config),
            broker,
            to_broker: Vec::new(),
            to_producer: Vec::new(),
            rng: SplitMix::new(seed),
            faults,
            events: Vec::new(),
            wire: Vec::new(),
            blackhole: 0,
            reply_stall: Duration::ZERO,
            spins: 0,
        }
    }

    fn send(&mut self, stream_id: u32, payload: &[u8]) -> Result<Ticket, SendError> {
        self.producer.send(self.now, stream_id, payload, 0, true)
    }

    fn delay(&mut self) -> Duration {
        let jitter = match self.faults.jitter_us {
            0 => 0,
            max => self.rng.next_u64() % max,
        };
        LATENCY + Duration::from_micros(jitter)
    }

    /// Put a datagram on a link, with the link's faults.
    fn transmit(&mut self, to_broker: bool, bytes: Vec<u8>) {
        if self.rng.chance(self.faults.loss_permille) {
            return;
        }
        let copies = 1 + usize::from(self.rng.chance(self.faults.dup_permille));
        for _ in 0..copies {
            let stall = if to_broker {
                Duration::ZERO
            } else {
                self.reply_stall
            };
            let at = self.now + self.delay() + stall;
            let queue = if to_broker {
                &mut self.to_broker
            } else {
                &mut self.to_producer
            };
            queue.push((at, bytes.clone()));
        }
    }

    /// One step: timers, transmissions, deliveries due now, then advance the clock.
    fn step(&mut self) {
        if self
            .producer
            .poll_timeout()
            .is_some_and(|at| at <= self.now)
        {
            self.producer.handle_timeout(self.now);
        }
        while let Some(transmit) = self.producer.poll_transmit(self.now, &mut self.buf) {
            let bytes = self.buf[..transmit.len].to_vec();
            for frame in Datagram::new(&bytes).frames() {
                let frame = frame.expect("the producer writes valid frames");
                assert_eq!(frame.stream_id(), transmit.stream_id);
                if frame.kind() == FrameKind::Data {
                    self.wire
                        .push((frame.stream_id(), frame.sequence(), frame.flags()));
                }
            }
            if self.blackhole > 0 {
                self.blackhole -= 1;
                continue;
            }
            self.transmit(true, bytes);
        }
        let now = self.now;
        let due: Vec<_> = extract_due(&mut self.to_broker, now);
        let mut reply = vec![0u8; MAX_DATAGRAM_LEN];
        for bytes in due {
            let n = self.broker.handle_datagram(&bytes, &mut reply);
            if n > 0 {
                self.transmit(false, reply[..n].to_vec());
            }
        }
        for bytes in extract_due(&mut self.to_producer, now) {
            self.producer.handle_datagram(now, &bytes);
        }
        while let Some(event) = self.producer.poll_event() {
            self.events.push(event);
        }
        // Advance to the next thing that happens.
        let next = [
            self.producer.poll_timeout(),
            self.to_broker.iter().map(|(at, _)| *at).min(),
            self.to_producer.iter().map(|(at, _)| *at).min(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.now = match next {
            Some(at) if at > self.now => {
                self.spins = 0;
                at
            }
            Some(_) => {
                self.spins += 1;
                assert!(
                    self.spins < 1000,
                    "poll_timeout stays in the past: busy loop"
                );
                self.now + Duration::from_micros(1)
            }
            None => {
                assert!(
                    self.producer.is_idle(),
                    "stuck: messages buffered but no timer set: {:?}",
                    self.producer.stats()
                );
                self.now
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

    fn delivered(&self) -> Vec<(Ticket, u64, Option<u64>)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                ProducerEvent::Delivered { ticket, delivery } => {
                    Some((*ticket, delivery.sequence, delivery.offset))
                }
                ProducerEvent::Failed { .. } => None,
            })
            .collect()
    }

    fn failed(&self) -> Vec<(Ticket, ErrorCode)> {
        self.events
            .iter()
            .filter_map(|event| match event {
                ProducerEvent::Failed { ticket, code, .. } => Some((*ticket, *code)),
                ProducerEvent::Delivered { .. } => None,
            })
            .collect()
    }
}

fn extract_due(queue: &mut Vec<(Instant, Vec<u8>)>, now: Instant) -> Vec<Vec<u8>> {
    let mut due = Vec::new();
    let mut index = 0;
    while index < queue.len() {
        if queue[index].0 <= now {
            due.push(queue.remove(index).1);
        } else {
            index += 1;
        }
    }
    due
}

fn config() -> ProducerConfig {
    ProducerConfig {
        producer_id: 77,
        ..ProducerConfig::default()
    }
}

/// A clean-network simulation of `producer_config` against a broker with
/// stream 1, whose flow is already open (one message sent and acknowledged).
fn opened(producer_config: ProducerConfig, seed: u64) -> Sim {
    let mut sim = simple(producer_config, seed);
    sim.send(1, b"open").unwrap();
    sim.run_until_idle(Duration::from_secs(1));
    sim
}

/// A clean-network simulation against a broker with stream 1.
fn simple(producer_config: ProducerConfig, seed: u64) -> Sim {
    Sim::new(
        producer_config,
        broker_with(&[1], 1024),
        NetFaults::default(),
        seed,
    )
}

fn broker_with(streams: &[u32], credit: u32) -> ModelBroker {
    let mut broker = ModelBroker::new(credit);
    for &stream in streams {
        broker.add_stream(stream);
    }
    broker
}

/// Every sent message is in the broker's log exactly once and in order,
/// every ticket was delivered exactly once in order, and the reported
/// sequences and offsets match the log.
fn check_exactly_once(sim: &Sim, sent: &HashMap<u32, Vec<Vec<u8>>>) {
    let delivered = sim.delivered();
    let mut per_stream: HashMap<u32, Vec<(u64, u64, Option<u64>)>> = HashMap::new();
    for (ticket, sequence, offset) in delivered {
        per_stream
            .entry(ticket.stream_id)
            .or_default()
            .push((ticket.number, sequence, offset));
    }
    for (stream, payloads) in sent {
        let records = sim.broker.records(*stream);
        let ours: Vec<_> = records
            .iter()
            .enumerate()
            .filter(|(_, record)| record.producer_id == 77)
            .collect();
        assert_eq!(
            ours.len(),
            payloads.len(),
            "stream {stream}: appended count"
        );
        for ((_, record), payload) in ours.iter().zip(payloads) {
            assert_eq!(&record.payload, payload, "stream {stream}: order");
        }
        let tickets = per_stream.get(stream).cloned().unwrap_or_default();
        let numbers: Vec<u64> = tickets.iter().map(|t| t.0).collect();
        let expected: Vec<u64> = (1..=payloads.len() as u64).collect();
        assert_eq!(
            numbers, expected,
            "stream {stream}: each ticket once, in order"
        );
        for ((_, sequence, offset), (index, record)) in tickets.iter().zip(&ours) {
            assert_eq!(*sequence, record.sequence);
            if let Some(offset) = offset {
                assert_eq!(
                    *offset, *index as u64,
                    "stream {stream}: offset of seq {sequence}"
                );
            }
        }
    }
}

#[test]
fn clean_network_delivers_in_order_with_exact_offsets() {
    let mut sim = simple(config(), 1);
    let mut sent = HashMap::new();
    let payloads: Vec<Vec<u8>> = (0..500).map(|i| format!("m{i}").into_bytes()).collect();
    for payload in &payloads {
        sim.send(1, payload).unwrap();
    }
    sent.insert(1, payloads);
    sim.run_until_idle(Duration::from_secs(5));
    check_exactly_once(&sim, &sent);
    // One producer alone: every offset is known but those of the first
    // acknowledged batch (nothing before it to count from).
    let unknown = sim
        .delivered()
        .iter()
        .filter(|(_, _, offset)| offset.is_none())
        .count();
    assert!(unknown < 40, "{unknown} offsets unknown");
    let stats = sim.producer.stats();
    assert_eq!(stats.frames_retransmitted, 0);
    assert_eq!(stats.frames_sent, 500);
    assert!(stats.datagrams_sent < 100, "batched: {stats:?}");
    assert_eq!(stats.heartbeats_sent, 1, "only the opening probe");
}

#[test]
fn opening_follows_a_flow_the_broker_recovered() {
    let mut broker = broker_with(&[5], 64);
    broker.recover_flow(5, 77, 500);
    let mut sim = Sim::new(config(), broker, NetFaults::default(), 2);
    for i in 0..10 {
        sim.send(5, format!("{i}").as_bytes()).unwrap();
    }
    sim.run_until_idle(Duration::from_secs(1));
    let sequences: Vec<u64> = sim.broker.records(5).iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (501..=510).collect::<Vec<_>>());
    assert_eq!(sim.delivered().len(), 10);
}

#[test]
fn credit_window_is_never_exceeded() {
    let credit = 4;
    let mut sim = Sim::new(config(), broker_with(&[1], credit), NetFaults::default(), 3);
    for i in 0..100 {
        sim.send(1, &[i as u8; 10]).unwrap();
    }
    let mut max_gap = 0;
    while !sim.producer.is_idle() {
        let acked = sim.producer.flow_ack(1).map_or(0, |ack| ack.sequence);
        sim.step();
        let highest = sim.wire.iter().map(|(_, seq, _)| *seq).max().unwrap_or(0);
        max_gap = max_gap.max(highest.saturating_sub(acked));
    }
    assert!(
        max_gap <= u64::from(credit),
        "in flight beyond credit: {max_gap}"
    );
    assert_eq!(sim.broker.frames_rejected(), 0, "no OutOfWindow");
    assert_eq!(sim.broker.records(1).len(), 100);
}

#[test]
fn lost_datagram_is_retransmitted_on_duplicate_ack_before_the_timer() {
    let producer_config = ProducerConfig {
        batch_frames_max: 4,
        linger: Duration::ZERO,
        ..config()
    };
    let mut sim = opened(producer_config, 4);
    let opened_at = sim.now;
    for i in 0..12 {
        sim.send(1, &[i; 8]).unwrap();
    }
    // Lose the first data datagram (frames 2..=5); the next ones arrive as gaps.
    sim.blackhole = 1;
    sim.run_until_idle(Duration::from_secs(1));
    let stats = sim.producer.stats();
    assert!(stats.fast_retransmits >= 1, "{stats:?}");
    assert_eq!(stats.timeouts, 0, "recovered before the timer: {stats:?}");
    assert!(sim.now - opened_at < ProducerConfig::default().retransmit_timeout_initial);
    assert_eq!(sim.broker.records(1).len(), 13);
    assert!(
        sim.wire
            .iter()
            .any(|(_, seq, fl)| *seq == 2 && fl & flags::RETRANSMIT != 0),
        "the lost frame went out again flagged RETRANSMIT"
    );
}

#[test]
fn congestion_window_grows_then_halves_on_loss_and_collapses_on_timeout() {
    let producer_config = ProducerConfig {
        batch_frames_max: 8,
        linger: Duration::ZERO,
        ..config()
    };
    let mut sim = opened(producer_config, 12);
    let window = |sim: &Sim| sim.producer.flow_ack(1).unwrap().congestion_window;
    assert_eq!(window(&sim), 65, "initial 64, plus one acknowledged frame");
    for i in 0..400u32 {
        sim.send(1, &i.to_le_bytes()).unwrap();
    }
    sim.run_until_idle(Duration::from_secs(1));
    let grown = window(&sim);
    assert!(grown >= 400, "slow start doubles per round trip: {grown}");
    // One lost datagram in a full window: the duplicate ACK halves it.
    for i in 0..400u32 {
        sim.send(1, &i.to_le_bytes()).unwrap();
    }
    sim.blackhole = 1;
    sim.run_until_idle(Duration::from_secs(1));
    let stats = sim.producer.stats();
    assert_eq!(
        (stats.fast_retransmits, stats.timeouts),
        (1, 0),
        "{stats:?}"
    );
    assert!(
        window(&sim) < grown,
        "{} after a loss, {grown} before",
        window(&sim)
    );
    // Silence: the timer fires and the window falls to the minimum.
    sim.send(1, b"lost").unwrap();
    sim.blackhole = 1;
    while sim.producer.stats().timeouts == 0 {
        sim.step();
    }
    assert_eq!(window(&sim), 8);
    sim.run_until_idle(Duration::from_secs(5));
    assert_eq!(sim.broker.records(1).len(), 802);
}

#[test]
fn a_late_ack_is_not_a_loss_the_window_survives_a_spurious_timeout() {
    let producer_config = ProducerConfig {
        batch_frames_max: 8,
        linger: Duration::ZERO,
        ..config()
    };
    let mut sim = opened(producer_config, 21);
    let window = |sim: &Sim| sim.producer.flow_ack(1).unwrap().congestion_window;
    for i in 0..400u32 {
        sim.send(1, &i.to_le_bytes()).unwrap();
    }
    sim.run_until_idle(Duration::from_secs(1));
    let grown = window(&sim);
    assert!(grown >= 400, "slow start: {grown}");
    // The broker's ACKs stall for 200 ms (an fdatasync), far past the
    // retransmission timeout; nothing is lost.
    for i in 0..400u32 {
        sim.send(1, &i.to_le_bytes()).unwrap();
    }
    sim.reply_stall = Duration::from_millis(200);
    while sim.producer.stats().timeouts == 0 {
        sim.step();
    }
    assert_eq!(window(&sim), 8, "a timeout drops the window first");
    sim.reply_stall = Duration::ZERO;
    sim.run_until_idle(Duration::from_secs(5));
    let stats = sim.producer.stats();
    assert!(stats.spurious_timeouts >= 1, "{stats:?}");
    assert!(
        window(&sim) >= grown,
        "the window is restored once the late ACK shows nothing was lost: {} vs {grown}",
        window(&sim)
    );
    assert_eq!(
        stats.fast_retransmits, 0,
        "the needless retransmissions' duplicate ACKs start no fast retransmit: {stats:?}"
    );
    assert!(
        stats.frames_retransmitted <= 8,
        "only what went out before the late ACK (the minimum window) is sent again: {stats:?}"
    );
    assert_eq!(sim.broker.records(1).len(), 801, "every message once");
}

#[test]
fn silence_triggers_timeout_retransmission_with_backoff() {
    let mut sim = opened(config(), 5);
    sim.send(1, b"lost twice").unwrap();
    sim.blackhole = 2;
    sim.run_until_idle(Duration::from_secs(5));
    let stats = sim.producer.stats();
    assert!(stats.timeouts >= 2, "{stats:?}");
    assert_eq!(sim.broker.records(1).len(), 2);
}

/// Run until idle; return the virtual times at which DATA frames with
/// sequence `seq` went on the wire.
fn run_watching(sim: &mut Sim, seq: u64, limit: Duration) -> Vec<Instant> {
    let mut times = Vec::new();
    while !(sim.producer.is_idle() && sim.to_producer.is_empty()) {
        assert!(sim.now - sim.start < limit, "{:?}", sim.producer.stats());
        let (at, seen) = (sim.now, sim.wire.len());
        sim.step();
        let sent = sim.wire[seen..].iter().filter(|(_, s, _)| *s == seq);
        times.extend(sent.map(|_| at));
    }
    times
}

#[test]
fn overloaded_broker_is_retried_after_a_growing_backoff_and_nothing_fails() {
    let mut sim = opened(config(), 9);
    let refusals = 9;
    sim.broker.overload_next(refusals);
    let mut sent = vec![b"open".to_vec()];
    for i in 0..50 {
        let payload = format!("m{i}").into_bytes();
        sim.send(1, &payload).unwrap();
        sent.push(payload);
    }
    // Sequence 2 (the first after "open") is refused `refusals` times.
    let times = run_watching(&mut sim, 2, Duration::from_secs(5));
    assert!(sim.failed().is_empty(), "{:?}", sim.failed());
    assert_eq!(sim.producer.stats().overloads, refusals);
    assert_eq!(
        times.len() as u64,
        refusals + 1,
        "sent once, then once per refusal: no spinning, no timer retransmits"
    );
    let mut backoff = OVERLOAD_BACKOFF_MIN;
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // The pause starts when the refusal arrives, one round trip after the send.
        assert!(
            gap >= backoff && gap <= backoff + Duration::from_millis(1),
            "retry after {gap:?}, backoff {backoff:?}"
        );
        backoff = (backoff * 2).min(OVERLOAD_BACKOFF_MAX);
    }
    // The backoff reached its ceiling and stayed there.
    assert!(times[times.len() - 1] - times[times.len() - 2] >= OVERLOAD_BACKOFF_MAX);

    // The broker took the refused sequence: the next episode starts at the minimum again.
    sim.broker.overload_next(1);
    sim.send(1, b"again").unwrap();
    sent.push(b"again".to_vec());
    let times = run_watching(&mut sim, 52, Duration::from_secs(10));
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] < OVERLOAD_BACKOFF_MIN * 2, "{times:?}");
    assert!(sim.failed().is_empty());
    check_exactly_once(&sim, &HashMap::from([(1, sent)]));
}

#[test]
fn permanent_rejection_fails_one_message_and_the_flow_goes_on() {
    let mut broker = broker_with(&[1], 1024);
    broker.reject_payloads(b"bad", ErrorCode::PayloadTooLarge);
    let mut sim = Sim::new(config(), broker, NetFaults::default(), 6);
    let mut good = Vec::new();
    for i in 0..20 {
        let payload = if i == 7 {
            b"bad one".to_vec()
        } else {
            format!("good {i}").into_bytes()
        };
        sim.send(1, &payload).unwrap();
        if i != 7 {
            good.push(payload);
        }
    }
    sim.run_until_idle(Duration::from_secs(1));
    assert_eq!(
        sim.failed(),
        [(
            Ticket {
                stream_id: 1,
                number: 8
            },
            ErrorCode::PayloadTooLarge
        )]
    );
    let stored: Vec<_> = sim
        .broker
        .records(1)
        .iter()
        .map(|r| r.payload.clone())
        .collect();
    assert_eq!(stored, good);
    assert_eq!(sim.delivered().len(), 19);
}

#[test]
fn unknown_stream_fails_every_message() {
    let mut sim = simple(config(), 7);
    for _ in 0..5 {
        sim.send(9, b"nowhere").unwrap();
    }
    sim.run_until_idle(Duration::from_secs(1));
    let failed = sim.failed();
    assert_eq!(failed.len(), 5);
    assert!(
        failed
            .iter()
            .all(|(_, code)| *code == ErrorCode::UnknownStream)
    );
    // The stream appears later: a new send opens the flow again and succeeds.
    sim.broker.add_stream(9);
    sim.send(9, b"now it exists").unwrap();
    sim.run_until_idle(Duration::from_secs(1));
    assert_eq!(sim.broker.records(9).len(), 1);
}

#[test]
fn full_buffer_and_oversized_payload_are_refused() {
    let producer_config = ProducerConfig {
        buffer_frames_max: 3,
        ..config()
    };
    let mut sim = simple(producer_config, 8);
    for _ in 0..3 {
        sim.send(1, b"x").unwrap();
    }
    assert!(matches!(
        sim.send(1, b"x"),
        Err(SendError::BufferFull { frames: 3, .. })
    ));
    assert_eq!(
        sim.send(1, &vec![0; 1393]),
        Err(SendError::PayloadTooLarge {
            len: 1393,
            max: 1392
        })
    );
    sim.run_until_idle(Duration::from_secs(1));
    assert!(sim.send(1, b"room again").is_ok());
}

#[test]
fn linger_holds_a_lone_message_and_flush_releases_it() {
    let producer_config = ProducerConfig {
        linger: Duration::from_millis(10),
        ..config()
    };
    let mut sim = opened(producer_config, 9);
    let before = sim.now;
    sim.send(1, b"lingers").unwrap();
    sim.step();
    assert!(sim.wire.len() == 1, "not sent before the linger time");
    sim.run_until_idle(Duration::from_secs(1));
    assert!(sim.now - before >= Duration::from_millis(10));
    let before = sim.now;
    sim.send(1, b"flushed").unwrap();
    sim.producer.flush();

    sim.run_until_idle(Duration::from_secs(1));
    assert!(sim.now - before < Duration::from_millis(1));
}

#[test]
fn heartbeat_after_silence_carries_lowest_unacked() {
    let producer_config = ProducerConfig {
        heartbeat_interval: Duration::from_millis(20),
        retransmit_timeout_initial: Duration::from_secs(1),
        retransmit_timeout_min: Duration::from_secs(1),
        retransmit_timeout_max: Duration::from_secs(2),
        ..config()
    };
    let mut sim = opened(producer_config, 10);
    sim.send(1, b"lost").unwrap();
    sim.blackhole = 1;
    sim.run_until_idle(Duration::from_secs(5));
    let stats = sim.producer.stats();
    assert!(stats.heartbeats_sent >= 2, "{stats:?}");
    assert!(
        stats.fast_retransmits >= 1,
        "the heartbeat's dup ack triggers it: {stats:?}"
    );
    assert_eq!(stats.timeouts, 0, "{stats:?}");
    assert_eq!(sim.broker.records(1).len(), 2);
}

#[test]
fn broker_ahead_of_everything_sent_renumbers() {
    let mut sim = opened(config(), 11);
    // Another producer with our id moved the broker's flow ahead.
    sim.broker.recover_flow(1, 77, 1000);
    sim.send(1, b"after").unwrap();
    sim.run_until_idle(Duration::from_secs(1));
    let last = sim.broker.records(1).last().unwrap();
    assert_eq!(
        (last.sequence, last.payload.as_slice()),
        (1001, &b"after"[..])
    );
    assert_eq!(sim.producer.stats().resyncs, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_exactly_once_in_order_under_faults(
        seed: u64,
        messages in proptest::collection::vec((0u32..3, 0usize..300), 1..400),
        loss_permille in 0u32..300,
        dup_permille in 0u32..200,
        jitter_us in 0u64..2000,
        credit in 1u32..64,
        batch_frames_max in 1usize..32,
        linger_us in 0u64..500,
        interleave in 1usize..50,
    ) {
        let producer_config = ProducerConfig {
            batch_frames_max,
            linger: Duration::from_micros(linger_us),
            ..config()
        };
        let faults = NetFaults { loss_permille, dup_permille, jitter_us };
        let mut sim = Sim::new(producer_config, broker_with(&[0, 1, 2], credit), faults, seed);
        let mut sent: HashMap<u32, Vec<Vec<u8>>> = HashMap::new();
        for (i, (stream, len)) in messages.iter().enumerate() {
            let mut payload = format!("{stream}:{i}:").into_bytes();
            payload.resize(payload.len().max(*len), b'.');
            sim.send(*stream, &payload).unwrap();
            sent.entry(*stream).or_default().push(payload);
            if i % interleave == 0 {
                sim.step();
            }
        }
        sim.run_until_idle(Duration::from_secs(600));
        prop_assert!(sim.failed().is_empty(), "failed: {:?}", sim.failed());
        check_exactly_once(&sim, &sent);
    }
}
