//! The sans-IO producer: sequences, batching, the unacknowledged buffer,
//! retransmission, the credit window and error reports, with no sockets,
//! threads or clock reads.
//!
//! ## How to drive it
//!
//! ```text
//! loop {
//!     now = clock()
//!     for each datagram received from the broker: handle_datagram(now, bytes)
//!     if now >= poll_timeout(): handle_timeout(now)
//!     while let Some(t) = poll_transmit(now, buf): send buf[..t.len] to the broker
//!     while let Some(event) = poll_event(): tell the application
//!     sleep until a datagram arrives or poll_timeout()
//! }
//! ```
//!
//! Applications call [`ProducerState::send`] between iterations.
//!
//! ## Per flow (one per stream this producer writes)
//!
//! A flow starts `Opening`: the producer sends a HEARTBEAT (sequence 1) and
//! waits for the broker's ACK, whose sequence tells where the broker's
//! expectation for `(producer_id, stream_id)` stands (0 for a new flow, the
//! last stored sequence for a flow it recovered from its log). Messages sent
//! meanwhile wait; once the ACK arrives they are numbered from there.
//!
//! Open, the flow keeps every message from `base` (lowest unacknowledged)
//! on in `slots`, transmits from `send_next` while the sequence is within
//! the broker's credit window, and rewinds `send_next` to `base` (go-back-N,
//! frames flagged RETRANSMIT) when the retransmission timer expires or a
//! duplicate ACK shows a gap at the broker (once per recovery episode). A
//! permanent ERROR marks its message rejected; when that message reaches
//! the head it is failed and skipped, and the producer sends a HEARTBEAT
//! with the next sequence so the broker skips it too. An `overloaded` ERROR
//! (the broker's storage is behind) rewinds `send_next` to the refused
//! sequence and holds DATA back for a backoff (1 ms, doubling to 100 ms per
//! refused retry, reset once the broker takes the refused sequence).
//!
//! ## In a cluster (with [`Routes`])
//!
//! Each shard has a destination ([`ProducerState::destination`]). A
//! `not_leader` ERROR from that destination naming a leader moves the
//! shard there and sends every unacknowledged frame of its flows again
//! from `base` (a HEARTBEAT with `base` leads them, so the new leader
//! answers with where it stands); `leader=` (none known), or
//! `rotate_after_timeouts` retransmission timeouts in a row with no reply
//! from the destination, moves the shard to the next bootstrap broker.
//! Moves after the first one without an acknowledgement wait a backoff and
//! send a HEARTBEAT probe first; DATA follows once the new destination
//! acknowledges (see [`Routes`]). Sequences never change on a move:
//! the new leader holds the replicated producer state, so frames it already
//! has are acknowledged as duplicates and nothing is stored twice.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kaelix_protocol::{
    Datagram, DatagramBuilder, DurabilityLevel, ErrorCode, FrameFields, FrameKind, HEADER_LEN,
    flags, parse_leader_hint,
};

use super::config::ProducerConfig;
use super::route::Routes;

/// Sequence a flow's opening HEARTBEAT carries.
const OPENING_SEQUENCE: u64 = 1;
/// `last_offset` value meaning "nothing appended yet".
const NO_OFFSET: u64 = u64::MAX;
/// First backoff after an `overloaded` ERROR.
pub const OVERLOAD_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Ceiling of the backoff after `overloaded` ERRORs.
pub const OVERLOAD_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Identifies one message sent through a producer: its stream and its
/// position (from 1) among the messages this producer sent to that stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket {
    /// Stream the message was sent to.
    pub stream_id: u32,
    /// 1 for the first message this producer sent to the stream, then 2, 3...
    pub number: u64,
}

/// What happened to a message, as reported by [`ProducerState::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProducerEvent {
    /// A tracked message was acknowledged (untracked ones are only counted).
    Delivered {
        /// The message.
        ticket: Ticket,
        /// Delivery facts.
        delivery: Delivery,
    },
    /// A message (tracked or not) was rejected by the broker and will not be
    /// retransmitted.
    Failed {
        /// The message.
        ticket: Ticket,
        /// The sequence it had, if it was numbered.
        sequence: Option<u64>,
        /// The broker's reason.
        code: ErrorCode,
        /// The code-specific detail of the ERROR frame.
        detail: u32,
    },
}

/// Facts about an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The sequence the message was sent with.
    pub sequence: u64,
    /// Its stream offset, when known exactly: always when the ACK named this
    /// sequence, and for earlier messages when the acknowledged range holds
    /// no other producer's records (offsets are dense per stream).
    pub offset: Option<u64>,
    /// The durability level the broker acknowledged at.
    pub level: DurabilityLevel,
}

/// Why [`ProducerState::send`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The unacknowledged buffer is full; retry after acknowledgements free room.
    #[error(
        "producer buffer full: {frames} frames / {bytes} bytes buffered, limits {frames_max} / {bytes_max}"
    )]
    BufferFull {
        /// Frames buffered.
        frames: usize,
        /// Bytes buffered.
        bytes: usize,
        /// Frame limit.
        frames_max: usize,
        /// Byte limit.
        bytes_max: usize,
    },
    /// The payload cannot fit one datagram.
    #[error(
        "payload of {len} bytes exceeds the maximum of {max} for this producer's datagram size"
    )]
    PayloadTooLarge {
        /// Payload length.
        len: usize,
        /// The maximum.
        max: usize,
    },
}

/// One datagram written by [`ProducerState::poll_transmit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Stream whose frames the datagram carries (all frames of one datagram
    /// belong to one stream, so a driver may route by stream).
    pub stream_id: u32,
    /// Bytes written at the start of the caller's buffer.
    pub len: usize,
    /// Frames in the datagram (heartbeats included).
    pub frames: usize,
}

/// The acknowledgement state of one flow, from the latest ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowAck {
    /// Highest sequence acknowledged.
    pub sequence: u64,
    /// Stream offset of that sequence (`None` before anything was appended).
    pub offset: Option<u64>,
    /// Level acknowledged at.
    pub level: DurabilityLevel,
    /// Credit the broker granted beyond `sequence`.
    pub credit: u32,
    /// The producer's congestion window for the flow, in frames.
    pub congestion_window: u32,
}

/// Counters of a producer. Plain numbers; read them with [`ProducerState::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Messages accepted by `send`.
    pub messages_sent: u64,
    /// Messages acknowledged.
    pub messages_acked: u64,
    /// Messages failed by an ERROR.
    pub messages_failed: u64,
    /// DATA frames transmitted for the first time.
    pub frames_sent: u64,
    /// DATA frames transmitted again.
    pub frames_retransmitted: u64,
    /// Datagrams written by `poll_transmit`.
    pub datagrams_sent: u64,
    /// HEARTBEAT frames sent.
    pub heartbeats_sent: u64,
    /// ACK frames received.
    pub acks_received: u64,
    /// ACKs that did not advance the acknowledged sequence.
    pub duplicate_acks: u64,
    /// Go-back-N retransmissions started by a duplicate ACK.
    pub fast_retransmits: u64,
    /// Go-back-N retransmissions started by the retransmission timer.
    pub timeouts: u64,
    /// Timeouts found spurious afterwards (an ACK covered frames not sent
    /// again since: the broker had them, its ACK was only late, e.g.
    /// behind a slow fdatasync); their window reduction was undone.
    pub spurious_timeouts: u64,
    /// ERROR frames received.
    pub errors_received: u64,
    /// `overloaded` ERRORs received (the broker's storage was behind; the
    /// message was sent again after a backoff).
    pub overloads: u64,
    /// Frames received that were malformed, for another producer, or of an unexpected kind.
    pub frames_ignored: u64,
    /// ACKs or ERRORs for sequences this producer holds no message for.
    pub stale_replies: u64,
    /// Times a flow was renumbered because the broker acknowledged beyond
    /// anything sent (another producer using the same id).
    pub resyncs: u64,
    /// Shards moved to the leader a `not_leader` ERROR named.
    pub redirects: u64,
    /// Shards moved to the next bootstrap broker (no leader known, or the
    /// destination stayed silent).
    pub rotations: u64,
}

#[derive(Debug)]
struct Slot {
    payload: Vec<u8>,
    timestamp_ns: u64,
    queued_at: Instant,
    sent_at: Option<Instant>,
    transmissions: u32,
    rejected: Option<(ErrorCode, u32)>,
    tracked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the ACK to the opening HEARTBEAT.
    Opening,
    /// Sequences known; sending.
    Open,
}

#[derive(Debug)]
struct Flow {
    stream_id: u32,
    phase: Phase,
    /// Messages from `base` on, in sequence order: `slots[i]` has sequence `base + i`.
    slots: VecDeque<Slot>,
    /// Sequence of `slots[0]` (the next to assign when empty). Meaningful when Open.
    base: u64,
    /// Message number of `slots[0]` (the next to give when empty).
    first_number: u64,
    /// Highest cumulative sequence the broker acknowledged.
    broker_acked: u64,
    /// Broker's credit beyond `broker_acked`.
    credit: u64,
    /// Congestion window: frames in flight beyond `base - 1` (AIMD).
    cwnd: u64,
    /// Slow-start threshold of the congestion window.
    ssthresh: u64,
    /// Acknowledged frames counted towards the next window increment.
    cwnd_growth: u64,
    /// `(cwnd, ssthresh)` before the first timeout of the current episode,
    /// restored if the timeout proves spurious.
    before_timeout: Option<(u64, u64)>,
    /// Next sequence to transmit, `base..=base + slots.len()`.
    send_next: u64,
    /// Highest sequence ever transmitted (frames at or below go out flagged RETRANSMIT).
    sent_high: u64,
    /// No fast retransmit until `base` passes this (one per recovery episode).
    recover: u64,
    /// A HEARTBEAT should lead the next datagram.
    heartbeat_due: bool,
    /// Every datagram starts with a HEARTBEAT until the broker acknowledges
    /// `skip_to - 1` (it skipped rejected sequences).
    skip_to: Option<u64>,
    /// The opening HEARTBEAT is out and unanswered.
    probe_outstanding: bool,
    /// Retransmission (or opening-probe) deadline.
    timer: Option<Instant>,
    rto: Duration,
    srtt: Option<Duration>,
    rttvar: Duration,
    last_heard: Instant,
    last_heartbeat: Option<Instant>,
    /// The latest progressing ACK: (sequence, offset). Offsets of earlier
    /// sequences it covers are inferred from it and `anchor`.
    ack: (u64, u64),
    /// The ACK before `ack`, or no offset when a skip lies between them.
    anchor: (u64, u64),
    /// `last_offset` of the latest ACK.
    last_offset: u64,
    level: DurabilityLevel,
    /// Send at once regardless of linger (a flush is waiting).
    flushing: bool,
    /// No DATA goes out before this: the broker's storage was behind.
    paused_until: Option<Instant>,
    /// The backoff of the current overload episode (zero: none yet).
    overload_backoff: Duration,
    /// The lowest sequence refused as overloaded in the current episode;
    /// the episode (and its backoff) ends when the broker acknowledges it.
    overloaded_seq: Option<u64>,
    /// The shard moved to a destination not yet heard from: only HEARTBEATs
    /// go out until it acknowledges one, then DATA from `base`.
    probing: bool,
}

impl Flow {
    fn new(stream_id: u32, now: Instant, config: &ProducerConfig) -> Self {
        Self {
            stream_id,
            phase: Phase::Opening,
            slots: VecDeque::new(),
            base: OPENING_SEQUENCE,
            first_number: 1,
            broker_acked: 0,
            credit: 0,
            cwnd: config.congestion_window_initial as u64,
            ssthresh: u64::MAX,
            cwnd_growth: 0,
            before_timeout: None,
            send_next: OPENING_SEQUENCE,
            sent_high: 0,
            recover: 0,
            heartbeat_due: false,
            skip_to: None,
            probe_outstanding: false,
            timer: None,
            rto: config.retransmit_timeout_initial,
            srtt: None,
            rttvar: Duration::ZERO,
            last_heard: now,
            last_heartbeat: None,
            ack: (0, NO_OFFSET),
            anchor: (0, NO_OFFSET),
            last_offset: NO_OFFSET,
            level: DurabilityLevel::Memory,
            flushing: false,
            paused_until: None,
            overload_backoff: Duration::ZERO,
            overloaded_seq: None,
            probing: false,
        }
    }

    fn end(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    /// Highest sequence the credit window and the congestion window allow in flight.
    fn window_end(&self) -> u64 {
        self.broker_acked
            .saturating_add(self.credit)
            .min((self.base - 1).saturating_add(self.cwnd))
    }

    /// `frames` newly acknowledged: grow the congestion window (doubling
    /// per round trip below `ssthresh`, then one frame per window's worth).
    fn on_acked(&mut self, frames: u64, config: &ProducerConfig) {
        if self.cwnd < self.ssthresh {
            self.cwnd += frames;
        } else {
            self.cwnd_growth += frames;
            while self.cwnd_growth >= self.cwnd {
                self.cwnd_growth -= self.cwnd;
                self.cwnd += 1;
            }
        }
        self.cwnd = self.cwnd.min(config.buffer_frames_max as u64);
    }

    /// A loss: halve the congestion window (after a duplicate ACK) or fall
    /// back to the minimum (after a timeout).
    fn on_loss(&mut self, timeout: bool, config: &ProducerConfig) {
        let min = config.congestion_window_min as u64;
        let in_flight = self.sent_high.saturating_sub(self.base - 1);
        self.ssthresh = (in_flight / 2).max(min);
        self.cwnd = if timeout { min } else { self.ssthresh };
        self.cwnd_growth = 0;
    }

    /// Frames transmitted and not yet acknowledged exist.
    fn in_flight(&self) -> bool {
        self.phase == Phase::Open && self.send_next > self.base
    }

    fn has_sendable(&self) -> bool {
        self.phase == Phase::Open
            && !self.probing
            && self.send_next < self.end()
            && self.send_next <= self.window_end()
    }

    /// The moment the frame at `send_next` should go, if it may go at all:
    /// at once for retransmissions, flushes, skips and full batches, else
    /// when the oldest fresh frame has lingered long enough.
    fn data_deadline(&self, config: &ProducerConfig) -> Option<Instant> {
        if !self.has_sendable() {
            return None;
        }
        let queued_at = self.slots[(self.send_next - self.base) as usize].queued_at;
        let at_once = self.send_next <= self.sent_high
            || self.flushing
            || self.skip_to.is_some()
            || config.linger.is_zero()
            || self.batch_full(config);
        let deadline = if at_once {
            queued_at
        } else {
            queued_at + config.linger
        };
        Some(
            self.paused_until
                .map_or(deadline, |until| deadline.max(until)),
        )
    }

    /// Enough frames wait to fill a datagram (by frames or by bytes).
    fn batch_full(&self, config: &ProducerConfig) -> bool {
        let last = self.window_end().min(self.end() - 1);
        let waiting = (last + 1 - self.send_next) as usize;
        if waiting >= config.batch_frames_max {
            return true;
        }
        let start = (self.send_next - self.base) as usize;
        let mut bytes = 0;
        self.slots.range(start..start + waiting).any(|slot| {
            bytes += HEADER_LEN + slot.payload.len();
            bytes > config.datagram_len_max
        })
    }

    fn heartbeat_deadline(&self, interval: Duration) -> Option<Instant> {
        if self.phase != Phase::Open || self.slots.is_empty() {
            return None;
        }
        let heard = self
            .last_heard
            .max(self.last_heartbeat.unwrap_or(self.last_heard));
        Some(heard + interval)
    }

    fn sample_rtt(&mut self, sample: Duration, config: &ProducerConfig) {
        match self.srtt {
            None => {
                self.srtt = Some(sample);
                self.rttvar = sample / 2;
            }
            Some(srtt) => {
                let delta = srtt.abs_diff(sample);
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + sample) / 8);
            }
        }
        self.rto = self.computed_rto(config);
    }

    fn computed_rto(&self, config: &ProducerConfig) -> Duration {
        match self.srtt {
            None => config.retransmit_timeout_initial,
            Some(srtt) => (srtt + (self.rttvar * 4).max(Duration::from_micros(100)))
                .clamp(config.retransmit_timeout_min, config.retransmit_timeout_max),
        }
    }
}

/// The producer state machine. See the module docs for how to drive it.
#[derive(Debug)]
pub struct ProducerState {
    config: ProducerConfig,
    flows: Vec<Flow>,
    by_stream: HashMap<u32, usize>,
    /// Round-robin cursor over `flows` for `poll_transmit`.
    next_flow: usize,
    events: VecDeque<ProducerEvent>,
    pool: Vec<Vec<u8>>,
    buffered_frames: usize,
    buffered_bytes: usize,
    stats: ProducerStats,
    /// Per-shard destinations, when the producer routes (in a cluster).
    routes: Option<Routes>,
}

/// Whether the broker will reject a frame again if it is sent again.
/// (`not_leader` is permanent for that broker; a producer with [`Routes`]
/// sends the frame to the leader instead of failing it.)
pub fn is_permanent(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::OutOfWindow
            | ErrorCode::Overloaded
            | ErrorCode::CrcMismatch
            | ErrorCode::Truncated
            | ErrorCode::LengthMismatch
            | ErrorCode::BadMagic
    )
}

impl ProducerState {
    /// A producer with `config`.
    ///
    /// # Panics
    /// If `config` is invalid: check it first with [`ProducerConfig::validate`].
    pub fn new(config: ProducerConfig) -> Self {
        if let Err(err) = config.validate() {
            panic!("invalid producer config: {err}");
        }
        Self {
            config,
            flows: Vec::new(),
            by_stream: HashMap::new(),
            next_flow: 0,
            events: VecDeque::new(),
            pool: Vec::new(),
            buffered_frames: 0,
            buffered_bytes: 0,
            stats: ProducerStats::default(),
            routes: None,
        }
    }

    /// A producer with `config` that keeps a destination per shard in
    /// `routes` and follows `not_leader` redirects (see the module docs).
    /// Send each datagram of [`ProducerState::poll_transmit`] to
    /// [`ProducerState::destination`] and hand replies in with
    /// [`ProducerState::handle_datagram_from`].
    ///
    /// # Panics
    /// If `config` is invalid: check it first with [`ProducerConfig::validate`].
    pub fn with_routes(config: ProducerConfig, routes: Routes) -> Self {
        let mut state = Self::new(config);
        state.routes = Some(routes);
        state
    }

    /// Where datagrams of `stream_id` go now (`None` without routes: the
    /// driver decides).
    pub fn destination(&self, stream_id: u32) -> Option<SocketAddr> {
        self.routes
            .as_ref()
            .map(|routes| routes.destination(stream_id))
    }

    /// The routes, when the producer has them.
    pub fn routes(&self) -> Option<&Routes> {
        self.routes.as_ref()
    }

    /// The settings in force.
    pub fn config(&self) -> &ProducerConfig {
        &self.config
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u32 {
        self.config.producer_id
    }

    /// Counters.
    pub fn stats(&self) -> ProducerStats {
        self.stats
    }

    /// Messages buffered (unsent or unacknowledged).
    pub fn buffered_frames(&self) -> usize {
        self.buffered_frames
    }

    /// Bytes buffered (payloads plus headers).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// True when every message sent was acknowledged or failed.
    pub fn is_idle(&self) -> bool {
        self.buffered_frames == 0
    }

    /// The latest acknowledgement of `stream_id`'s flow, once the flow is open.
    pub fn flow_ack(&self, stream_id: u32) -> Option<FlowAck> {
        let flow = &self.flows[*self.by_stream.get(&stream_id)?];
        (flow.phase == Phase::Open).then(|| FlowAck {
            sequence: flow.broker_acked,
            offset: (flow.last_offset != NO_OFFSET).then_some(flow.last_offset),
            level: flow.level,
            credit: flow.credit.min(u64::from(u32::MAX)) as u32,
            congestion_window: flow.cwnd.min(u64::from(u32::MAX)) as u32,
        })
    }

    /// True if a message of `len` payload bytes fits the buffer now.
    pub fn has_room(&self, len: usize) -> bool {
        self.buffered_frames < self.config.buffer_frames_max
            && self.buffered_bytes + len + HEADER_LEN <= self.config.buffer_bytes_max
    }

    /// Queue one message for `stream_id`. `timestamp_ns` goes into the frame
    /// as is. A `tracked` message produces a [`ProducerEvent::Delivered`]
    /// when acknowledged; every failure produces [`ProducerEvent::Failed`].
    ///
    /// Call [`ProducerState::poll_transmit`] afterwards (or let the driver's
    /// next iteration do it); the message lingers up to `config.linger` for
    /// company unless a datagram's worth is ready.
    pub fn send(
        &mut self,
        now: Instant,
        stream_id: u32,
        payload: &[u8],
        timestamp_ns: u64,
        tracked: bool,
    ) -> Result<Ticket, SendError> {
        let max = self.config.payload_len_max();
        if payload.len() > max {
            return Err(SendError::PayloadTooLarge {
                len: payload.len(),
                max,
            });
        }
        if !self.has_room(payload.len()) {
            return Err(SendError::BufferFull {
                frames: self.buffered_frames,
                bytes: self.buffered_bytes,
                frames_max: self.config.buffer_frames_max,
                bytes_max: self.config.buffer_bytes_max,
            });
        }
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(payload);
        let index = self.flow_index(stream_id, now);
        let flow = &mut self.flows[index];
        let ticket = Ticket {
            stream_id,
            number: flow.first_number + flow.slots.len() as u64,
        };
        if flow.phase == Phase::Opening && !flow.probe_outstanding {
            flow.heartbeat_due = true;
        }
        flow.slots.push_back(Slot {
            payload: buf,
            timestamp_ns,
            queued_at: now,
            sent_at: None,
            transmissions: 0,
            rejected: None,
            tracked,
        });
        self.buffered_frames += 1;
        self.buffered_bytes += payload.len() + HEADER_LEN;
        self.stats.messages_sent += 1;
        Ok(ticket)
    }

    /// Send everything buffered without waiting for the linger time (until
    /// the buffer next empties).
    pub fn flush(&mut self) {
        for flow in &mut self.flows {
            flow.flushing = !flow.slots.is_empty();
        }
    }

    /// Give up on every buffered message of every flow: each is reported as
    /// failed with `code` (the driver uses this when it shuts down with
    /// messages still unacknowledged).
    pub fn abandon(&mut self, code: ErrorCode) {
        for index in 0..self.flows.len() {
            self.fail_all(index, code, 0);
        }
    }

    fn flow_index(&mut self, stream_id: u32, now: Instant) -> usize {
        if let Some(&index) = self.by_stream.get(&stream_id) {
            return index;
        }
        let index = self.flows.len();
        self.flows.push(Flow::new(stream_id, now, &self.config));
        self.by_stream.insert(stream_id, index);
        index
    }

    /// Process one datagram received from the broker (without routes, or
    /// when the sender's address is not known: taken as coming from the
    /// current destination of each frame's stream).
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) {
        self.handle_datagram_inner(now, None, bytes);
    }

    /// Process one datagram received from `from`. With routes, replies from
    /// the address a shard last moved away from still acknowledge what they
    /// acknowledge, but their `not_leader` ERRORs are stale and they confirm
    /// nothing about the new destination.
    pub fn handle_datagram_from(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.handle_datagram_inner(now, Some(from), bytes);
    }

    /// Whether a reply about `stream_id` from `from` comes from the stream's
    /// current destination; if so the shard's silence count starts over.
    fn heard_from_destination(&mut self, stream_id: u32, from: Option<SocketAddr>) -> bool {
        let Some(routes) = self.routes.as_mut() else {
            return true;
        };
        let shard = routes.shard_of(stream_id);
        let current = from.is_none_or(|from| routes.is_current(shard, from));
        if current {
            routes.route_mut(shard).silent_timeouts = 0;
        }
        current
    }

    fn handle_datagram_inner(&mut self, now: Instant, from: Option<SocketAddr>, bytes: &[u8]) {
        for frame in Datagram::new(bytes).frames() {
            let Ok(frame) = frame else {
                self.stats.frames_ignored += 1;
                return;
            };
            if frame.producer_id() != self.config.producer_id {
                self.stats.frames_ignored += 1;
                continue;
            }
            match frame.kind() {
                FrameKind::Ack => {
                    let body = frame.ack().expect("parse checked the ACK body size");
                    let level = DurabilityLevel::from_u8(body.level).unwrap_or_default();
                    if self.heard_from_destination(frame.stream_id(), from) {
                        self.confirm_destination(frame.stream_id());
                    }
                    self.handle_ack(
                        now,
                        frame.stream_id(),
                        frame.sequence(),
                        body.credit.get(),
                        level,
                        body.last_offset.get(),
                    );
                }
                FrameKind::Error => {
                    let (body, message) = frame.error().expect("parse checked the ERROR body size");
                    self.stats.errors_received += 1;
                    let current = self.heard_from_destination(frame.stream_id(), from);
                    match ErrorCode::from_u16(body.code.get()) {
                        Some(ErrorCode::NotLeader) if self.routes.is_some() => {
                            self.handle_not_leader(now, frame.stream_id(), current, message);
                        }
                        Some(code) => self.handle_error(
                            now,
                            frame.stream_id(),
                            frame.sequence(),
                            code,
                            body.detail.get(),
                        ),
                        None => self.stats.frames_ignored += 1,
                    }
                }
                FrameKind::Heartbeat => {
                    self.heard_from_destination(frame.stream_id(), from);
                    if let Some(&index) = self.by_stream.get(&frame.stream_id()) {
                        self.flows[index].last_heard = now;
                    }
                }
                FrameKind::Data => self.stats.frames_ignored += 1,
            }
        }
    }

    /// The current destination of `stream_id`'s shard acknowledged: it
    /// leads the shard, and a flow probing it sends everything unacknowledged.
    fn confirm_destination(&mut self, stream_id: u32) {
        let Some(routes) = self.routes.as_mut() else {
            return;
        };
        let shard = routes.shard_of(stream_id);
        routes.route_mut(shard).moves = 0;
        if let Some(&index) = self.by_stream.get(&stream_id) {
            let flow = &mut self.flows[index];
            if flow.probing {
                flow.probing = false;
                flow.send_next = flow.base;
                flow.timer = None;
            }
        }
    }

    fn handle_ack(
        &mut self,
        now: Instant,
        stream_id: u32,
        sequence: u64,
        credit: u32,
        level: DurabilityLevel,
        offset: u64,
    ) {
        self.stats.acks_received += 1;
        let Some(&index) = self.by_stream.get(&stream_id) else {
            self.stats.stale_replies += 1;
            return;
        };
        let config = &self.config;
        let flow = &mut self.flows[index];
        flow.last_heard = now;
        if flow.phase == Phase::Opening {
            if flow.last_heartbeat.is_none() {
                self.stats.stale_replies += 1;
                return;
            }
            if let Some(sent) = flow.last_heartbeat {
                flow.sample_rtt(now.saturating_duration_since(sent), config);
            }
            flow.phase = Phase::Open;
            flow.probe_outstanding = false;
            flow.timer = None;
            flow.credit = u64::from(credit);
            flow.level = level;
            flow.last_offset = offset;
            Self::restart_numbering(flow, sequence, offset);
            return;
        }
        if sequence < flow.broker_acked {
            // Reordered: an older ACK overtaken by a newer one.
            self.stats.stale_replies += 1;
            return;
        }
        flow.credit = u64::from(credit);
        flow.level = level;
        flow.last_offset = offset;
        if sequence > flow.sent_high.max(flow.base - 1) {
            // The broker is ahead of everything we ever sent: another
            // producer with our id, or a flow the broker recovered after we
            // opened. Number what we hold after it and send it all again.
            self.stats.resyncs += 1;
            Self::restart_numbering(flow, sequence, offset);
            return;
        }
        if sequence == flow.broker_acked {
            self.stats.duplicate_acks += 1;
            if flow.skip_to.is_none() && flow.in_flight() && flow.base > flow.recover {
                // The broker dropped something after `sequence` (a gap):
                // go back to the first unacknowledged frame.
                self.stats.fast_retransmits += 1;
                flow.on_loss(false, config);
                flow.recover = flow.sent_high;
                flow.send_next = flow.base;
            }
            return;
        }
        // Progress.
        if let Some((cwnd, ssthresh)) = flow.before_timeout.take()
            && sequence >= flow.send_next
        {
            // Go-back-N has not sent `sequence` again since the timeout, yet
            // the broker acknowledges it: the first transmissions arrived
            // (the broker keeps nothing past a gap) and only the ACK was
            // late, e.g. behind a slow fdatasync. Not a loss: restore the
            // window, and let the duplicate ACKs that the needless
            // retransmissions draw start no fast retransmit for a window.
            // (A frame that really was lost meanwhile shows as a gap: the
            // broker's duplicate ACKs or the timer send it again.)
            self.stats.spurious_timeouts += 1;
            flow.cwnd = cwnd;
            flow.ssthresh = ssthresh;
            flow.recover = flow.sent_high.max(sequence.saturating_add(cwnd));
            // The first transmissions after `sequence` are on their way
            // too: go on with new frames rather than send them all again.
            flow.send_next = flow.send_next.max(flow.sent_high + 1);
        }
        flow.broker_acked = sequence;
        if flow
            .overloaded_seq
            .is_some_and(|refused| sequence >= refused)
        {
            // The broker took what it refused: the overload episode is over.
            flow.overloaded_seq = None;
            flow.overload_backoff = Duration::ZERO;
            flow.paused_until = None;
        }
        flow.anchor = flow.ack;
        flow.ack = (sequence, offset);
        if flow.skip_to.is_some_and(|skip| sequence + 1 >= skip) {
            flow.skip_to = None;
        }
        let mut sample = None;
        let mut acked = 0;
        while self.flows[index].base <= sequence {
            let Some((ticket, seq, slot)) = self.pop_head(index) else {
                break;
            };
            acked += 1;
            if seq == sequence && slot.transmissions == 1 {
                sample = slot.sent_at.map(|sent| now.saturating_duration_since(sent));
            }
            self.stats.messages_acked += 1;
            if slot.tracked {
                let delivery = Delivery {
                    sequence: seq,
                    offset: Self::offset_of(&self.flows[index], seq),
                    level,
                };
                self.events
                    .push_back(ProducerEvent::Delivered { ticket, delivery });
            }
            self.recycle(slot.payload);
        }
        let config = &self.config;
        let flow = &mut self.flows[index];
        flow.send_next = flow.send_next.max(flow.base);
        flow.on_acked(acked, config);
        match sample {
            Some(sample) => flow.sample_rtt(sample, config),
            None => flow.rto = flow.computed_rto(config),
        }
        if !flow.probing {
            flow.timer = flow.in_flight().then(|| now + flow.rto);
        }
        if flow.slots.is_empty() {
            flow.flushing = false;
        }
        self.resolve_head(index);
    }

    /// Renumber a flow's messages to follow `acked` (the broker's cumulative
    /// ACK) and send them all as new.
    fn restart_numbering(flow: &mut Flow, acked: u64, offset: u64) {
        flow.before_timeout = None;
        flow.broker_acked = acked;
        flow.base = acked + 1;
        flow.send_next = flow.base;
        flow.sent_high = acked;
        flow.recover = acked;
        flow.skip_to = None;
        flow.timer = None;
        flow.ack = (acked, offset);
        flow.anchor = (acked, NO_OFFSET);
        flow.paused_until = None;
        flow.overload_backoff = Duration::ZERO;
        flow.overloaded_seq = None;
        for slot in &mut flow.slots {
            slot.transmissions = 0;
            slot.sent_at = None;
            slot.rejected = None;
        }
    }

    /// The exact stream offset of `seq` (just acknowledged), if it can be known.
    fn offset_of(flow: &Flow, seq: u64) -> Option<u64> {
        let (ack_seq, ack_offset) = flow.ack;
        if ack_offset == NO_OFFSET {
            return None;
        }
        if seq == ack_seq {
            return Some(ack_offset);
        }
        // Dense offsets: if this ACK's range holds only our frames, offsets
        // advanced exactly as sequences did and can be counted back.
        let (prev_seq, prev_offset) = flow.anchor;
        let dense = prev_offset != NO_OFFSET
            && prev_seq < seq
            && ack_offset.checked_sub(prev_offset) == Some(ack_seq - prev_seq);
        dense.then(|| ack_offset - (ack_seq - seq))
    }

    /// A `not_leader` ERROR about `stream_id` (with routes): move its shard
    /// to the leader the message names, or to the next bootstrap broker.
    fn handle_not_leader(&mut self, now: Instant, stream_id: u32, current: bool, message: &[u8]) {
        let routes = self.routes.as_mut().expect("called with routes only");
        if !current || !self.by_stream.contains_key(&stream_id) {
            // From a former destination (its other rejections of frames
            // sent before the move), or about a stream we do not write.
            self.stats.stale_replies += 1;
            return;
        }
        let shard = routes.shard_of(stream_id);
        let route = *routes.route(shard);
        let leader = parse_leader_hint(message).flatten();
        let hold = match leader {
            Some(leader) if leader != route.addr => {
                self.stats.redirects += 1;
                routes
                    .redirect(shard, leader, now)
                    .expect("a different address is a move")
            }
            // No leader named (or itself, which it is not): another broker.
            _ => {
                if route.hold_until.is_some_and(|until| now < until) {
                    // The shard just moved; more rejections of the same
                    // datagram, or of frames sent before the move.
                    self.stats.stale_replies += 1;
                    return;
                }
                self.stats.rotations += 1;
                routes.rotate(shard, now)
            }
        };
        self.retarget(shard, hold);
    }

    /// Every flow of `shard` starts over at its new destination: frames
    /// from `base` are sent again (at once, led by a HEARTBEAT with `base`,
    /// when `hold` is `None`; else after the hold, once a HEARTBEAT probe
    /// was acknowledged). Nothing is renumbered.
    fn retarget(&mut self, shard: usize, hold: Option<Instant>) {
        let Some(routes) = self.routes.as_ref() else {
            return;
        };
        let config = &self.config;
        for flow in &mut self.flows {
            if routes.shard_of(flow.stream_id) != shard {
                continue;
            }
            flow.timer = None;
            flow.rto = flow.computed_rto(config);
            // The overload was the old destination's.
            flow.paused_until = None;
            flow.overload_backoff = Duration::ZERO;
            flow.overloaded_seq = None;
            match flow.phase {
                Phase::Opening => {
                    flow.probe_outstanding = false;
                    flow.heartbeat_due = !flow.slots.is_empty();
                }
                Phase::Open => {
                    flow.send_next = flow.base;
                    // Duplicate ACKs of the resent range start no fast retransmit.
                    flow.recover = flow.sent_high;
                    flow.heartbeat_due = !flow.slots.is_empty() || flow.skip_to.is_some();
                    flow.probing = hold.is_some() && flow.heartbeat_due;
                }
            }
        }
    }

    /// The shard hold of `stream_id`'s route: nothing goes out before it.
    fn hold_of(routes: Option<&Routes>, stream_id: u32) -> Option<Instant> {
        routes.and_then(|routes| routes.route(routes.shard_of(stream_id)).hold_until)
    }

    fn handle_error(
        &mut self,
        now: Instant,
        stream_id: u32,
        sequence: u64,
        code: ErrorCode,
        detail: u32,
    ) {
        let Some(&index) = self.by_stream.get(&stream_id) else {
            self.stats.stale_replies += 1;
            return;
        };
        let flow = &mut self.flows[index];
        flow.last_heard = now;
        if flow.phase == Phase::Opening {
            if is_permanent(code) {
                // The flow cannot open (unknown stream, not leader...): fail
                // what waits; a later send tries to open it again.
                flow.probe_outstanding = false;
                flow.timer = None;
                self.fail_all(index, code, detail);
            }
            return;
        }
        if sequence < flow.base || sequence >= flow.end() {
            self.stats.stale_replies += 1;
            return;
        }
        if code == ErrorCode::Overloaded {
            self.stats.overloads += 1;
            Self::back_off(flow, now, sequence, &self.config);
            return;
        }
        if is_permanent(code) {
            flow.slots[(sequence - flow.base) as usize].rejected = Some((code, detail));
            self.resolve_head(index);
        } else {
            // Dropped in transit or outside the window: send it again, and
            // ask for the current window.
            flow.send_next = flow.send_next.min(sequence);
            flow.heartbeat_due = true;
            if code == ErrorCode::OutOfWindow {
                // Wait for the next ACK's credit before sending it again.
                flow.credit = (sequence - 1).saturating_sub(flow.broker_acked);
            }
        }
    }

    /// The broker refused `sequence` because its storage is behind: send
    /// again from there, after a backoff that doubles with each refused
    /// retry. Replies to frames sent before the pause (a refusal of the same
    /// retry, the broker's duplicate ACKs) do not extend it.
    fn back_off(flow: &mut Flow, now: Instant, sequence: u64, config: &ProducerConfig) {
        flow.send_next = flow.send_next.min(sequence);
        flow.overloaded_seq = Some(flow.overloaded_seq.map_or(sequence, |s| s.min(sequence)));
        if flow.paused_until.is_some_and(|until| now < until) {
            return;
        }
        flow.overload_backoff =
            (flow.overload_backoff * 2).clamp(OVERLOAD_BACKOFF_MIN, OVERLOAD_BACKOFF_MAX);
        flow.paused_until = Some(now + flow.overload_backoff);
        // Nothing is sent during the pause: the retransmission timer would
        // only shrink the window; it is armed again by the next transmission.
        flow.timer = None;
        if flow.base > flow.recover {
            // A congestion signal: shrink the window once per episode, as
            // for a loss, and let the duplicate ACKs of the refused frames
            // start no fast retransmit.
            flow.on_loss(false, config);
            flow.recover = flow.sent_high;
        }
    }

    /// Remove the head message of a flow; the flow's base and numbering
    /// move past it. Returns its ticket, sequence and slot.
    fn pop_head(&mut self, index: usize) -> Option<(Ticket, u64, Slot)> {
        let flow = &mut self.flows[index];
        let slot = flow.slots.pop_front()?;
        let ticket = Ticket {
            stream_id: flow.stream_id,
            number: flow.first_number,
        };
        let sequence = flow.base;
        flow.base += 1;
        flow.first_number += 1;
        self.buffered_frames -= 1;
        self.buffered_bytes -= slot.payload.len() + HEADER_LEN;
        Some((ticket, sequence, slot))
    }

    /// Keep a payload buffer for reuse (bounded by the buffer's frame limit).
    fn recycle(&mut self, payload: Vec<u8>) {
        if self.pool.len() < self.config.buffer_frames_max {
            self.pool.push(payload);
        }
    }

    /// Fail the head message of a flow with `code`; false when the flow is empty.
    fn fail_head(&mut self, index: usize, code: ErrorCode, detail: u32) -> bool {
        let open = self.flows[index].phase == Phase::Open;
        let Some((ticket, sequence, slot)) = self.pop_head(index) else {
            return false;
        };
        self.stats.messages_failed += 1;
        self.events.push_back(ProducerEvent::Failed {
            ticket,
            sequence: open.then_some(sequence),
            code,
            detail,
        });
        self.recycle(slot.payload);
        true
    }

    /// Fail and skip rejected messages at the head of a flow.
    fn resolve_head(&mut self, index: usize) {
        let mut skipped = false;
        while let Some((code, detail)) = self.flows[index]
            .slots
            .front()
            .and_then(|slot| slot.rejected)
        {
            self.fail_head(index, code, detail);
            skipped = true;
        }
        if skipped {
            // The broker still expects the rejected sequence and dropped what
            // followed it: tell it to skip, then send the rest again.
            let flow = &mut self.flows[index];
            flow.skip_to = Some(flow.base);
            flow.heartbeat_due = true;
            flow.send_next = flow.base;
            // Skipped sequences have no offsets: do not count offsets across them.
            flow.ack.1 = NO_OFFSET;
            if flow.slots.is_empty() {
                flow.flushing = false;
            }
        }
    }

    fn fail_all(&mut self, index: usize, code: ErrorCode, detail: u32) {
        while self.fail_head(index, code, detail) {}
        let flow = &mut self.flows[index];
        flow.flushing = false;
        flow.timer = None;
        if flow.phase == Phase::Open {
            flow.send_next = flow.base;
            flow.skip_to = Some(flow.base);
            flow.heartbeat_due = true;
        }
    }

    /// The next moment [`ProducerState::handle_timeout`] should run (or a
    /// datagram can be transmitted); `None` when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let config = &self.config;
        let routes = self.routes.as_ref();
        self.flows
            .iter()
            .filter_map(|flow| {
                let due = flow.heartbeat_due.then_some(flow.last_heard);
                let next = [
                    due,
                    flow.timer,
                    flow.data_deadline(config),
                    flow.heartbeat_deadline(config.heartbeat_interval),
                ]
                .into_iter()
                .flatten()
                .min()?;
                Some(Self::hold_of(routes, flow.stream_id).map_or(next, |hold| next.max(hold)))
            })
            .min()
    }

    /// Run the timers: retransmission (go-back-N with exponential backoff),
    /// the opening probe's retry, and heartbeats after silence. Call when
    /// `now >= poll_timeout()`; calling it early does no harm.
    pub fn handle_timeout(&mut self, now: Instant) {
        let config = &self.config;
        let mut silent_shard = None;
        for flow in &mut self.flows {
            if flow.timer.is_some_and(|deadline| now >= deadline) {
                flow.timer = None;
                flow.rto = (flow.rto * 2).min(config.retransmit_timeout_max);
                if let Some(routes) = self.routes.as_mut() {
                    let shard = routes.shard_of(flow.stream_id);
                    let several = routes.brokers().len() > 1;
                    let route = routes.route_mut(shard);
                    route.silent_timeouts += 1;
                    if several && route.silent_timeouts >= config.rotate_after_timeouts {
                        silent_shard = Some(shard);
                    }
                }
                match flow.phase {
                    Phase::Opening => {
                        flow.probe_outstanding = false;
                        flow.heartbeat_due = !flow.slots.is_empty();
                    }
                    Phase::Open if flow.probing => {
                        // The probe went unanswered: probe again.
                        flow.heartbeat_due = true;
                    }
                    Phase::Open => {
                        self.stats.timeouts += 1;
                        flow.before_timeout
                            .get_or_insert((flow.cwnd, flow.ssthresh));
                        flow.on_loss(true, config);
                        flow.send_next = flow.base;
                        flow.recover = flow.sent_high;
                    }
                }
            }
            if flow
                .heartbeat_deadline(config.heartbeat_interval)
                .is_some_and(|deadline| now >= deadline)
            {
                flow.heartbeat_due = true;
            }
        }
        // Destinations silent for `rotate_after_timeouts` timeouts in a row:
        // try the next broker (a rotation starts the shard's count over).
        while let Some(shard) = silent_shard.take() {
            let routes = self.routes.as_mut().expect("counted with routes only");
            self.stats.rotations += 1;
            let hold = routes.rotate(shard, now);
            self.retarget(shard, hold);
            let routes = self.routes.as_ref().expect("still there");
            let threshold = self.config.rotate_after_timeouts;
            silent_shard = self.flows.iter().find_map(|flow| {
                let shard = routes.shard_of(flow.stream_id);
                (routes.route(shard).silent_timeouts >= threshold).then_some(shard)
            });
        }
    }

    /// Write the next datagram to send into `buf` (which must hold
    /// `config.datagram_len_max` bytes). Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let count = self.flows.len();
        for step in 0..count {
            let index = (self.next_flow + step) % count;
            if let Some(transmit) = self.transmit_flow(index, now, buf) {
                self.next_flow = (index + 1) % count;
                return Some(transmit);
            }
        }
        None
    }

    fn transmit_flow(&mut self, index: usize, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let config = &self.config;
        let producer_id = config.producer_id;
        let flow = &mut self.flows[index];
        if Self::hold_of(self.routes.as_ref(), flow.stream_id).is_some_and(|hold| now < hold) {
            return None;
        }
        let limit = config.datagram_len_max;
        let mut builder = DatagramBuilder::new(&mut buf[..limit]);
        let skipping = flow.skip_to.is_some();
        let data_ready = flow
            .data_deadline(config)
            .is_some_and(|deadline| now >= deadline);
        if !(flow.heartbeat_due || data_ready) {
            return None;
        }
        if flow.heartbeat_due || (skipping && data_ready) {
            let sequence = match flow.phase {
                Phase::Opening => OPENING_SEQUENCE,
                Phase::Open => flow.base,
            };
            let fields = FrameFields {
                kind: FrameKind::Heartbeat,
                flags: 0,
                stream_id: flow.stream_id,
                producer_id,
                sequence,
                timestamp_ns: 0,
            };
            builder
                .push(&fields, &[])
                .expect("a datagram holds at least two headers (config validated)");
            flow.heartbeat_due = false;
            flow.last_heartbeat = Some(now);
            self.stats.heartbeats_sent += 1;
            if flow.phase == Phase::Opening {
                flow.probe_outstanding = true;
                flow.timer = Some(now + flow.rto);
            } else if flow.probing && flow.timer.is_none() {
                flow.timer = Some(now + flow.rto);
            }
        }
        if data_ready {
            let window_end = flow.window_end();
            let mut frames = 0;
            while flow.send_next < flow.end()
                && flow.send_next <= window_end
                && frames < config.batch_frames_max
            {
                let seq = flow.send_next;
                let slot = &mut flow.slots[(seq - flow.base) as usize];
                if slot.rejected.is_none() {
                    let retransmit = seq <= flow.sent_high;
                    let fields = FrameFields {
                        flags: if retransmit { flags::RETRANSMIT } else { 0 },
                        ..FrameFields::data(flow.stream_id, producer_id, seq, slot.timestamp_ns)
                    };
                    if builder.push(&fields, &slot.payload).is_err() {
                        break;
                    }
                    slot.sent_at = Some(now);
                    slot.transmissions += 1;
                    frames += 1;
                    if retransmit {
                        self.stats.frames_retransmitted += 1;
                    } else {
                        self.stats.frames_sent += 1;
                    }
                }
                flow.send_next += 1;
                flow.sent_high = flow.sent_high.max(seq);
            }
            if frames > 0 && flow.timer.is_none() {
                flow.timer = Some(now + flow.rto);
            }
        }
        if builder.is_empty() {
            return None;
        }
        self.stats.datagrams_sent += 1;
        Some(Transmit {
            stream_id: flow.stream_id,
            len: builder.len(),
            frames: builder.frame_count(),
        })
    }

    /// The next event for the application, oldest first.
    pub fn poll_event(&mut self) -> Option<ProducerEvent> {
        self.events.pop_front()
    }
}
