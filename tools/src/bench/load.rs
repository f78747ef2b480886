//! One producer thread of the load generator: offers messages to a
//! [`ProducerState`] (kaelix-client's sans-IO producer), moves its datagrams
//! through a [`Link`] (kernel socket or AF_XDP), and records produce→ack
//! latency in its own HdrHistogram.
//!
//! Latency of a message runs from its *intended* send time to the arrival of
//! the ACK that covers it. In fixed-rate mode the intended time is the slot
//! of the schedule (`start + i / rate`), not the moment the loop got round to
//! it, so a stalled broker shows up as latency instead of as a slower
//! schedule (no coordinated omission). Without a rate the intended time is
//! when the message was offered to the producer (closed loop, bounded by the
//! in-flight limit and the broker's credit window).
//!
//! Nothing here allocates per message: the producer recycles its payload
//! buffers and keeps its queues at their high-water mark, the intended-time
//! rings and the histogram are sized before the first message, the clock is
//! read once per loop iteration.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kaelix_client::{ProducerEvent, ProducerState, ProducerStats};
use kaelix_protocol::DurabilityLevel;

/// Highest latency the histograms hold (longer ones are clamped to it).
pub const LATENCY_MAX_NS: u64 = 60_000_000_000;
/// Messages offered per loop iteration at most (keeps acks flowing in).
const OFFER_BUDGET: usize = 2048;
/// A silence between ACKs at least this long is listed in the report.
pub const ACK_SILENCE_MIN_NS: u64 = 10_000_000;
/// Silences listed per producer at most (the first ones; the longest is
/// always kept apart).
const ACK_SILENCES_MAX: usize = 1024;
/// In fixed-rate mode an idle producer waits in the socket when the next
/// message is due later than this; shorter gaps are spun.
const IDLE_WAIT_MIN_NS: f64 = 20_000.0;

/// How datagrams reach the broker and come back.
pub trait Link {
    /// Hand every datagram waiting now to `on_datagram`, with its sender
    /// when the producer routes (`--brokers`), else `None`; never blocks.
    fn recv(&mut self, on_datagram: &mut dyn FnMut(Option<SocketAddr>, &[u8]))
    -> io::Result<usize>;

    /// Transmit every datagram `core` has ready at `now`; returns how many.
    fn transmit(&mut self, core: &mut ProducerState, now: Instant) -> io::Result<usize>;

    /// Block until a datagram may be waiting or `timeout` passed.
    fn wait(&mut self, timeout: Duration) -> io::Result<()>;
}

/// What one producer thread does, shared by all of them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Common time zero of every thread.
    pub start: Instant,
    /// Payload bytes of every message.
    pub message_size: usize,
    /// Streams written, round robin.
    pub streams: Vec<u32>,
    /// Messages per second for this producer (fixed-rate mode), or as fast as possible.
    pub rate: Option<f64>,
    /// Messages whose intended time is before this (ns from start) are warm-up.
    pub warmup_ns: u64,
    /// No message is offered at or after this (ns from start).
    pub end_ns: u64,
    /// At most this many messages offered by this producer.
    pub count: Option<u64>,
    /// Unacknowledged messages at most (the producer's buffer).
    pub inflight: usize,
    /// After the last offer, how long to wait for outstanding ACKs.
    pub drain: Duration,
    /// `start` on the wall clock (ns since the Unix epoch), for reports
    /// that other processes line up with (a failover's kill time).
    pub start_unix_ns: u64,
}

/// Live counters the progress bar reads (relaxed; published once per iteration).
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages acknowledged so far, all producers together.
    pub acked: AtomicU64,
    /// Set by the main thread to stop early (Ctrl-C is not handled; this is for errors).
    pub stop: AtomicBool,
}

/// What one producer thread measured.
#[derive(Debug)]
pub struct ProducerReport {
    /// produce→ack latency (ns) of messages intended inside the window.
    pub latency: Histogram<u64>,
    /// Messages whose ACK arrived inside the measurement window.
    pub acked_in_window: u64,
    /// Messages offered with an intended time inside the window.
    pub offered_in_window: u64,
    /// Messages offered in all.
    pub offered: u64,
    /// Messages acknowledged in all.
    pub acked: u64,
    /// Messages rejected by the broker.
    pub failed: u64,
    /// When the window closed for this producer (ns from start).
    pub window_end_ns: u64,
    /// Durability level of the last ACK.
    pub level: Option<DurabilityLevel>,
    /// The producer's own counters (retransmissions, timeouts...).
    pub stats: ProducerStats,
    /// Messages still unacknowledged when the drain time ran out.
    pub unacked_at_end: usize,
    /// Datagrams handed to the link.
    pub datagrams: u64,
    /// The longest time between two loop iterations that took ACKs, from
    /// the first ACK on (a failover, a stall), in ns.
    pub ack_gap_max_ns: u64,
    /// When that longest silence ended (ns from start): the first ACK after it.
    pub ack_gap_end_ns: u64,
    /// Every silence of at least [`ACK_SILENCE_MIN_NS`] as (last ACK before,
    /// first ACK after), ns from start; the first [`ACK_SILENCES_MAX`].
    pub ack_silences: Vec<(u64, u64)>,
    /// Each stream's destination at the end (with `--brokers`: the shard
    /// leader the producer was redirected to), empty without routes.
    pub destinations: Vec<(u32, SocketAddr)>,
}

/// Intended send times of the messages in flight on one stream, indexed by
/// the producer's message number (a power-of-two ring larger than the
/// in-flight limit, so a live entry is never overwritten).
struct IntendedTimes {
    stream_id: u32,
    times_ns: Vec<u64>,
    mask: u64,
}

impl IntendedTimes {
    fn new(stream_id: u32, inflight: usize) -> Self {
        let len = (inflight + 1).next_power_of_two();
        Self {
            stream_id,
            times_ns: vec![0; len],
            mask: len as u64 - 1,
        }
    }
}

/// A fresh latency histogram (ns, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("constant bounds are valid")
}

/// Run one producer until its plan is done; `core` must be fresh.
pub fn run_producer(
    link: &mut dyn Link,
    mut core: ProducerState,
    plan: &Plan,
    progress: &Arc<Progress>,
) -> io::Result<ProducerReport> {
    assert!(
        !plan.streams.is_empty(),
        "a plan writes at least one stream"
    );
    let payload = vec![0xA5u8; plan.message_size];
    let mut rings: Vec<IntendedTimes> = plan
        .streams
        .iter()
        .map(|&stream| IntendedTimes::new(stream, plan.inflight))
        .collect();
    let mut latency = new_histogram();
    let interval_ns = plan.rate.map(|rate| 1e9 / rate);
    let mut next_due_ns = 0.0f64;
    let mut report = ProducerReport {
        latency: new_histogram(),
        acked_in_window: 0,
        offered_in_window: 0,
        offered: 0,
        acked: 0,
        failed: 0,
        window_end_ns: plan.end_ns,
        level: None,
        stats: ProducerStats::default(),
        unacked_at_end: 0,
        datagrams: 0,
        ack_gap_max_ns: 0,
        ack_gap_end_ns: 0,
        ack_silences: Vec::with_capacity(ACK_SILENCES_MAX),
        destinations: Vec::new(),
    };
    let mut last_ack_ns: Option<u64> = None;
    let mut next_stream = 0usize;
    let mut drain_until: Option<Instant> = None;
    let mut published = 0u64;
    let limit = plan.count.unwrap_or(u64::MAX);

    loop {
        let now = Instant::now();
        let now_ns = now.saturating_duration_since(plan.start).as_nanos() as u64;
        let in_window = now_ns >= plan.warmup_ns && now_ns < plan.end_ns;

        let received = link.recv(&mut |from, bytes| match from {
            Some(from) => core.handle_datagram_from(now, from, bytes),
            None => core.handle_datagram(now, bytes),
        })?;
        while let Some(event) = core.poll_event() {
            match event {
                ProducerEvent::Delivered { ticket, delivery } => {
                    report.acked += 1;
                    report.level = Some(delivery.level);
                    if in_window {
                        report.acked_in_window += 1;
                    }
                    let ring = rings
                        .iter()
                        .find(|ring| ring.stream_id == ticket.stream_id)
                        .expect("events name only streams this producer writes");
                    let intended = ring.times_ns[(ticket.number & ring.mask) as usize];
                    if intended >= plan.warmup_ns && intended < plan.end_ns {
                        latency.saturating_record(now_ns.saturating_sub(intended).max(1));
                    }
                }
                ProducerEvent::Failed { .. } => report.failed += 1,
            }
        }
        if core.poll_timeout().is_some_and(|at| at <= now) {
            core.handle_timeout(now);
        }

        let offered_before = report.offered;
        let offering = now_ns < plan.end_ns
            && report.offered < limit
            && !progress.stop.load(Ordering::Relaxed);
        if offering {
            let mut budget = OFFER_BUDGET;
            while budget > 0 && report.offered < limit && core.has_room(plan.message_size) {
                let intended_ns = match interval_ns {
                    Some(interval) => {
                        if next_due_ns > now_ns as f64 {
                            break;
                        }
                        let due = next_due_ns as u64;
                        next_due_ns += interval;
                        due
                    }
                    None => now_ns,
                };
                let index = next_stream;
                next_stream = (next_stream + 1) % rings.len();
                let ring = &mut rings[index];
                let ticket = core
                    .send(now, ring.stream_id, &payload, intended_ns, true)
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
                ring.times_ns[(ticket.number & ring.mask) as usize] = intended_ns;
                report.offered += 1;
                if intended_ns >= plan.warmup_ns && intended_ns < plan.end_ns {
                    report.offered_in_window += 1;
                }
                budget -= 1;
            }
        } else if drain_until.is_none() {
            drain_until = Some(now + plan.drain);
            // Send what lingers at once.
            core.flush();
        }
        let transmitted = link.transmit(&mut core, now)?;
        report.datagrams += transmitted as u64;
        if report.acked != published {
            // Once per iteration that took ACKs, not per message.
            if let Some(last) = last_ack_ns {
                let gap = now_ns - last;
                if gap > report.ack_gap_max_ns {
                    report.ack_gap_max_ns = gap;
                    report.ack_gap_end_ns = now_ns;
                }
                if gap >= ACK_SILENCE_MIN_NS && report.ack_silences.len() < ACK_SILENCES_MAX {
                    report.ack_silences.push((last, now_ns));
                }
            }
            last_ack_ns = Some(now_ns);
            progress
                .acked
                .fetch_add(report.acked - published, Ordering::Relaxed);
            published = report.acked;
        }

        if let Some(until) = drain_until
            && (core.is_idle() || now >= until)
        {
            if plan.count.is_some() && now_ns < plan.end_ns {
                // Count mode: the window closes with the last ACK.
                report.window_end_ns = now_ns;
            }
            break;
        }
        if let Some(interval) = interval_ns
            && received == 0
            && transmitted == 0
            && report.offered == offered_before
        {
            // Fixed rate and nothing to do: sleep in the socket until an ACK
            // may be there or the next message is due, instead of spinning
            // (a spinning producer competes with the broker for the cpus).
            let due_in_ns = (next_due_ns - now_ns as f64).clamp(0.0, interval);
            if due_in_ns >= IDLE_WAIT_MIN_NS {
                link.wait(Duration::from_nanos(due_in_ns as u64))?;
            }
        }
    }
    report.latency = latency;
    report.stats = core.stats();
    report.unacked_at_end = core.buffered_frames();
    report.destinations = plan
        .streams
        .iter()
        .filter_map(|&stream| core.destination(stream).map(|addr| (stream, addr)))
        .collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_time_ring_outlives_the_inflight_limit() {
        let ring = IntendedTimes::new(1, 8192);
        assert!(ring.times_ns.len() > 8192);
        assert!(ring.times_ns.len().is_power_of_two());
        assert_eq!(ring.mask as usize + 1, ring.times_ns.len());
    }

    #[test]
    fn histogram_clamps_instead_of_failing() {
        let mut histogram = new_histogram();
        histogram.saturating_record(LATENCY_MAX_NS * 10);
        histogram.saturating_record(25_000);
        assert_eq!(histogram.len(), 2);
        assert!(histogram.max() >= LATENCY_MAX_NS);
        let p50 = histogram.value_at_quantile(0.5);
        assert!((24_900..=25_100).contains(&p50), "p50 {p50}");
    }
}
