//! The busy-poll loop of one shard: receive a batch, validate, deduplicate,
//! append, acknowledge. Written once against [`Backend`] and [`LogSink`].
//!
//! One cycle:
//! 1. drain at most [`COMMANDS_PER_CYCLE`] control commands;
//! 2. `recv_batch`: every frame of every datagram is validated (protocol
//!    crate), admitted or rejected by its flow ([`crate::flow`]) and appended;
//!    consecutive frames of one flow form one storage batch;
//! 3. flows whose data became durable at their level get a cumulative ACK;
//!    rejected frames get ERROR frames; everything goes out in one `flush_tx`;
//! 4. counters are published once; housekeeping runs about once a second;
//! 5. when nothing happened, the idle strategy decides to spin, yield or park.
//!
//! Per message there is no allocation, lock, system call or log line: the
//! clock is read once per cycle (and once more when ACKs of new data are
//! queued, for their latency), replies are written into the backend's
//! buffers, counters are summed locally and published per cycle. Per-stream
//! counts live in the flow table, updated once per storage batch (and per
//! duplicate, gap, retransmit or rejection); an entry is created the first
//! time a stream the log knows sees a frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, TryRecvError};
use kaelix_protocol::{
    AckBody, Datagram, DatagramBuilder, DurabilityLevel, ErrorBody, ErrorCode, Frame, FrameKind,
    flags,
};
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, Peer};
use crate::counters::{BatchCounts, ShardCounters};
use crate::flow::{Admission, FlowKey, FlowTable};
use crate::idle::{IdleAction, IdleStrategy, Idler};
use crate::sink::{LogSink, SinkBatch, SinkError};
use crate::tunables::{ShardRole, ShardTunables};

/// Control commands drained per cycle (keeps a flood of commands from starving traffic).
pub const COMMANDS_PER_CYCLE: usize = 16;
/// Rejections answered per cycle; more are counted but not answered.
const ERROR_REPLIES_MAX: usize = 256;

/// Settings of one shard's loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// Frames a producer may have unacknowledged per flow (the credit in ACKs).
    pub credit_window: u32,
    /// Flows (producer, stream pairs) tracked at most; more are rejected.
    pub max_flows: usize,
    /// Flows allocated for at start.
    pub initial_flows: usize,
    /// What an idle shard does.
    pub idle: IdleStrategy,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            credit_window: 8192,
            max_flows: 1 << 20,
            initial_flows: 4096,
            idle: IdleStrategy::default(),
        }
    }
}

/// A command run on the shard's own thread, with the log in hand.
pub type ShardTask<S> = Box<dyn FnOnce(&mut S, &mut FlowTable) + Send>;

/// Why a shard stopped with an error (as opposed to being asked to stop).
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The backend failed.
    #[error("shard {shard}: backend failed: {source}")]
    Backend {
        /// Shard id.
        shard: u32,
        /// The failure.
        #[source]
        source: BackendError,
    },
}

/// A rejected frame waiting for its ERROR reply.
#[derive(Debug, Clone, Copy)]
struct Rejection {
    peer: Peer,
    stream_id: u32,
    producer_id: u32,
    sequence: u64,
    code: ErrorCode,
    detail: u32,
    /// The stream exists in the log (its per-stream error count may be created).
    known_stream: bool,
}

/// Everything the receive path touches apart from the backend and the log,
/// kept apart so it can be used while a storage batch borrows the log.
struct Book {
    flows: FlowTable,
    window: u64,
    now_ns: u64,
    /// Monotonic shard clock of this cycle (ns since the shard started).
    mono_ns: u64,
    /// Flows that need their ACK state looked at (listed once each).
    dirty: Vec<FlowKey>,
    rejections: Vec<Rejection>,
    counts: BatchCounts,
    /// The shard's role ([`ShardTunables::set_role`]): a following shard
    /// rejects DATA and HEARTBEAT frames with `not_leader` and this hint.
    role: ShardRole,
}

impl Book {
    fn reject(&mut self, rejection: Rejection) {
        self.counts.error(rejection.code);
        let stream = if rejection.known_stream {
            Some(self.flows.stream_counts_mut(rejection.stream_id))
        } else {
            self.flows.existing_stream_counts_mut(rejection.stream_id)
        };
        if let Some(stream) = stream {
            stream.errors[rejection.code.index()] += 1;
        }
        if self.rejections.len() < ERROR_REPLIES_MAX {
            self.rejections.push(rejection);
        } else {
            self.counts.replies_dropped += 1;
        }
    }

    /// Reject a frame of a stream the log may not have (counted per stream
    /// only if the stream already has counts).
    fn reject_frame(&mut self, frame: &Frame<'_>, peer: &Peer, code: ErrorCode, detail: u32) {
        self.reject_frame_of(frame, peer, code, detail, false);
    }

    /// Reject a frame of a stream the log has.
    fn reject_known(&mut self, frame: &Frame<'_>, peer: &Peer, code: ErrorCode, detail: u32) {
        self.reject_frame_of(frame, peer, code, detail, true);
    }

    fn reject_frame_of(
        &mut self,
        frame: &Frame<'_>,
        peer: &Peer,
        code: ErrorCode,
        detail: u32,
        known_stream: bool,
    ) {
        self.reject(Rejection {
            peer: *peer,
            stream_id: frame.stream_id(),
            producer_id: frame.producer_id(),
            sequence: frame.sequence(),
            code,
            detail,
            known_stream,
        });
    }

    fn mark_dirty(&mut self, key: FlowKey) {
        if let Some(flow) = self.flows.get_mut(key)
            && !flow.listed
        {
            flow.listed = true;
            self.dirty.push(key);
        }
    }

    /// Decide on a DATA frame of a stream that exists at `level`: true when
    /// it is the next sequence and must be appended; otherwise the duplicate,
    /// gap or rejection is recorded here.
    fn admit(&mut self, frame: &Frame<'_>, peer: &Peer, level: DurabilityLevel) -> bool {
        let key = flow_key(frame);
        if frame.flags() & flags::RETRANSMIT != 0 {
            self.counts.retransmits_seen += 1;
            self.flows.stream_counts_mut(key.stream_id).retransmits_seen += 1;
        }
        let flow = match self.flows.get_or_insert(key, *peer, level) {
            Ok(flow) => flow,
            Err(full) => {
                let detail = u32::try_from(full.max_flows).unwrap_or(u32::MAX);
                self.reject_known(frame, peer, ErrorCode::StorageError, detail);
                return false;
            }
        };
        flow.peer = *peer;
        flow.level = level;
        match flow.admit(frame.sequence(), self.window) {
            Admission::Append => return true,
            Admission::Duplicate => {
                flow.ack_due = true;
                self.counts.duplicates += 1;
                self.flows.stream_counts_mut(key.stream_id).duplicates += 1;
            }
            Admission::Gap { .. } => {
                flow.ack_due = true;
                self.counts.gaps += 1;
                self.flows.stream_counts_mut(key.stream_id).gaps += 1;
            }
            Admission::OutOfWindow { limit } => {
                let detail = u32::try_from(limit.saturating_sub(flow.acked)).unwrap_or(u32::MAX);
                self.reject_known(frame, peer, ErrorCode::OutOfWindow, detail);
                return false;
            }
        }
        self.mark_dirty(key);
        false
    }

    fn on_heartbeat(&mut self, frame: &Frame<'_>, peer: &Peer, level: Option<DurabilityLevel>) {
        self.counts.heartbeats += 1;
        let Some(level) = level else {
            self.reject_frame(frame, peer, ErrorCode::UnknownStream, 0);
            return;
        };
        let key = flow_key(frame);
        if let Ok(flow) = self.flows.get_or_insert(key, *peer, level) {
            flow.peer = *peer;
            if flow.heartbeat(frame.sequence()) {
                self.counts.flow_resyncs += 1;
            }
            self.mark_dirty(key);
        }
    }
}

fn flow_key(frame: &Frame<'_>) -> FlowKey {
    FlowKey {
        producer_id: frame.producer_id(),
        stream_id: frame.stream_id(),
    }
}

/// The log and the bookkeeping of the receive path.
struct Ingest<S> {
    shard: u32,
    sink: S,
    book: Book,
}

impl<S: LogSink> Ingest<S> {
    fn on_datagram(&mut self, bytes: &[u8], peer: &Peer) {
        let book = &mut self.book;
        let sink = &mut self.sink;
        book.counts.datagrams += 1;
        let mut frames = Datagram::new(bytes).frames().peekable();
        while let Some(result) = frames.next() {
            let frame = match result {
                Ok(frame) => frame,
                Err(err) => {
                    // The rest of the datagram has no known length: iteration ends here.
                    book.reject(Rejection {
                        peer: *peer,
                        stream_id: 0,
                        producer_id: 0,
                        sequence: 0,
                        code: err.code(),
                        detail: err.offset() as u32,
                        known_stream: false,
                    });
                    continue;
                }
            };
            match frame.kind() {
                FrameKind::Data | FrameKind::Heartbeat if book.role != ShardRole::Leading => {
                    book.reject_frame(&frame, peer, ErrorCode::NotLeader, 0);
                    continue;
                }
                FrameKind::Data => {}
                FrameKind::Heartbeat => {
                    book.on_heartbeat(&frame, peer, sink.stream_level(frame.stream_id()));
                    continue;
                }
                FrameKind::Ack | FrameKind::Error => {
                    book.reject_frame(&frame, peer, ErrorCode::UnexpectedKind, frame.kind() as u32);
                    continue;
                }
            }
            let Some(level) = sink.stream_level(frame.stream_id()) else {
                book.reject_frame(&frame, peer, ErrorCode::UnknownStream, 0);
                continue;
            };
            if !book.admit(&frame, peer, level) {
                continue;
            }
            // One storage batch per run of consecutive frames of one flow.
            let key = flow_key(&frame);
            let mut batch = match sink.begin(key.stream_id, book.now_ns) {
                Ok(batch) => batch,
                Err(err) => {
                    book.reject_known(&frame, peer, sink_error_code(&err), 0);
                    continue;
                }
            };
            let first_sequence = frame.sequence();
            let mut last: Option<(u64, u64, u64)> = None;
            let mut current = frame;
            let (mut frames_pushed, mut bytes_pushed) = (0u64, 0u64);
            loop {
                match batch.push(current.as_bytes()) {
                    Ok(offset) => {
                        if let Some(flow) = book.flows.get_mut(key) {
                            flow.accept(current.sequence());
                        }
                        last = Some((current.sequence(), offset, current.timestamp_ns()));
                        frames_pushed += 1;
                        bytes_pushed += current.len() as u64;
                    }
                    Err(err) => {
                        book.reject_known(&current, peer, sink_error_code(&err), 0);
                        break;
                    }
                }
                let next = match frames.peek() {
                    Some(Ok(next)) if next.kind() == FrameKind::Data && flow_key(next) == key => {
                        *next
                    }
                    _ => break,
                };
                frames.next();
                if !book.admit(&next, peer, level) {
                    break;
                }
                current = next;
            }
            let Some((sequence, offset, timestamp_ns)) = last else {
                continue; // nothing pushed: the batch is dropped, which discards it
            };
            match batch.commit() {
                Ok(end_position) => {
                    book.counts.frames_appended += frames_pushed;
                    book.counts.bytes_appended += bytes_pushed;
                    let stream = book.flows.stream_counts_mut(key.stream_id);
                    stream.frames_appended += frames_pushed;
                    stream.bytes_appended += bytes_pushed;
                    if let Some(flow) = book.flows.get_mut(key) {
                        flow.batch_committed(
                            sequence,
                            offset,
                            timestamp_ns,
                            end_position,
                            book.mono_ns,
                        );
                    }
                    book.mark_dirty(key);
                }
                Err(err) => {
                    // A failed commit discards the whole batch: rewind the
                    // flow so the producer's retransmits are appended.
                    if let Some(flow) = book.flows.get_mut(key) {
                        flow.expected = first_sequence;
                    }
                    book.reject(Rejection {
                        peer: *peer,
                        stream_id: key.stream_id,
                        producer_id: key.producer_id,
                        sequence,
                        code: sink_error_code(&err),
                        detail: 0,
                        known_stream: true,
                    });
                }
            }
        }
    }
}

fn sink_error_code(err: &SinkError) -> ErrorCode {
    match err {
        SinkError::UnknownStream { .. } => ErrorCode::UnknownStream,
        SinkError::Full { .. } => ErrorCode::StorageFull,
        SinkError::Overloaded { .. } => ErrorCode::Overloaded,
        SinkError::Failed { .. } => ErrorCode::StorageError,
    }
}

/// How the control plane reaches a running shard: commands in, a stop flag, counters out.
pub struct ShardLinks<S> {
    /// Commands run on the shard's thread (bounded queue).
    pub commands: Receiver<ShardTask<S>>,
    /// Set to stop the loop.
    pub stop: Arc<AtomicBool>,
    /// The shard's counters.
    pub counters: Arc<ShardCounters>,
}

/// One shard: a backend, a log, and the loop between them.
pub struct Shard<B, S> {
    backend: B,
    ingest: Ingest<S>,
    idler: Idler,
    commands: Receiver<ShardTask<S>>,
    stop: Arc<AtomicBool>,
    counters: Arc<ShardCounters>,
    /// Flows with data waiting for durability, carried across cycles.
    waiting: Vec<FlowKey>,
    next_housekeeping: Instant,
    /// Origin of the shard clock (`Book::mono_ns`).
    epoch: Instant,
    /// Hot-reloadable settings, applied between cycles when their generation moves.
    tunables: Arc<ShardTunables>,
    tunables_seen: u64,
}

impl<B: Backend, S: LogSink> Shard<B, S> {
    /// Assemble a shard. `flows` may carry flow state recovered from the log.
    pub fn new(
        shard: u32,
        backend: B,
        sink: S,
        flows: FlowTable,
        config: &ShardConfig,
        links: ShardLinks<S>,
    ) -> Self {
        let ShardLinks {
            commands,
            stop,
            counters,
        } = links;
        Self {
            backend,
            ingest: Ingest {
                shard,
                sink,
                book: Book {
                    flows,
                    window: u64::from(config.credit_window.max(1)),
                    now_ns: 0,
                    mono_ns: 0,
                    dirty: Vec::with_capacity(config.initial_flows),
                    rejections: Vec::with_capacity(ERROR_REPLIES_MAX),
                    counts: BatchCounts::default(),
                    role: ShardRole::Leading,
                },
            },
            idler: Idler::new(config.idle),
            commands,
            stop,
            counters,
            waiting: Vec::with_capacity(config.initial_flows),
            next_housekeeping: Instant::now(),
            epoch: Instant::now(),
            tunables: Arc::new(ShardTunables::new(config)),
            tunables_seen: 0,
        }
    }

    /// The settings the control plane may change while the loop runs.
    pub fn tunables(&self) -> Arc<ShardTunables> {
        self.tunables.clone()
    }

    /// Run until the stop flag is set or the backend fails. The shard (and so
    /// its log) stays alive: drop it, or take the log with [`Shard::into_sink`],
    /// once the flusher has caught up.
    pub fn run(&mut self) -> Result<(), ShardError> {
        while !self.stop.load(Ordering::Acquire) {
            let worked = self.poll_once()?;
            if worked {
                self.idler.busy();
                continue;
            }
            self.counters.idle_cycles.fetch_add(1, Ordering::Relaxed);
            // ACKs waiting for the flusher (or replication): let it have the cpu.
            let action = if self.waiting.is_empty() {
                self.idler.idle()
            } else {
                self.idler.idle_waiting()
            };
            match action {
                IdleAction::Spin => std::hint::spin_loop(),
                IdleAction::Yield => std::thread::yield_now(),
                IdleAction::Park(timeout) => {
                    // Data waiting for a flush, and a following shard's
                    // replication commands, must not wait a whole park.
                    let timeout =
                        if self.waiting.is_empty() && self.ingest.book.role == ShardRole::Leading {
                            timeout
                        } else {
                            timeout.min(Duration::from_micros(50))
                        };
                    self.backend
                        .wait_readable(timeout)
                        .map_err(|source| ShardError::Backend {
                            shard: self.ingest.shard,
                            source,
                        })?;
                }
            }
        }
        Ok(())
    }

    /// One cycle; true when anything was received, acknowledged or run.
    pub fn poll_once(&mut self) -> Result<bool, ShardError> {
        let shard = self.ingest.shard;
        let backend_error = |source| ShardError::Backend { shard, source };
        let now = Instant::now();
        self.ingest.book.mono_ns = self.mono_ns(now);
        self.ingest.book.now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut worked = self.run_commands();
        let generation = self.tunables.generation();
        if generation != self.tunables_seen {
            self.tunables_seen = generation;
            self.ingest.book.window = u64::from(self.tunables.credit_window().max(1));
            self.ingest.book.role = self.tunables.role();
            self.idler = Idler::new(self.tunables.idle());
        }

        let ingest = &mut self.ingest;
        let received = self
            .backend
            .recv_batch(&mut |bytes, peer| ingest.on_datagram(bytes, peer))
            .map_err(backend_error)?;
        worked |= received > 0;

        worked |= self.queue_replies()?;
        self.backend.flush_tx().map_err(backend_error)?;
        self.counters.publish(&mut self.ingest.book.counts);

        if now >= self.next_housekeeping {
            self.next_housekeeping = now + Duration::from_secs(1);
            // Retention failures are reported by the sink's own counters; the
            // loop keeps serving.
            let _ = self.ingest.sink.housekeeping(self.ingest.book.now_ns);
        }
        Ok(worked)
    }

    /// The shard clock at `at`: nanoseconds since the shard started.
    fn mono_ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn run_commands(&mut self) -> bool {
        let mut ran = false;
        for _ in 0..COMMANDS_PER_CYCLE {
            match self.commands.try_recv() {
                Ok(task) => {
                    task(&mut self.ingest.sink, &mut self.ingest.book.flows);
                    ran = true;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        ran
    }

    /// Queue ACKs for flows whose data became durable (or that asked), and
    /// ERROR frames for rejected frames. True when anything was queued.
    fn queue_replies(&mut self) -> Result<bool, ShardError> {
        let shard = self.ingest.shard;
        let mut queued = false;
        let positions = DurabilityLevel::ALL.map(|level| self.ingest.sink.durable_position(level));
        let ingest = &mut self.ingest.book;
        let window = u32::try_from(ingest.window).unwrap_or(u32::MAX);
        // Flows touched this cycle first, then flows still waiting from before.
        self.waiting.append(&mut ingest.dirty);
        // Read when the first ACK of new data goes out (latency), once per cycle.
        let mut queued_ns: Option<u64> = None;
        let epoch = self.epoch;
        let mut index = 0;
        while index < self.waiting.len() {
            let key = self.waiting[index];
            let Some(flow) = ingest.flows.get_mut(key) else {
                self.waiting.swap_remove(index);
                continue;
            };
            flow.listed = false;
            let poll = flow.poll_ack_timed(positions[flow.level as usize]);
            if poll.due {
                let header_seq = flow.acked;
                let body = AckBody::new(window, flow.level, flow.acked_offset);
                let timestamp = flow.acked_timestamp_ns;
                let peer = flow.peer;
                let sent = self
                    .backend
                    .queue_tx(&peer, &mut |buf| {
                        let mut builder = DatagramBuilder::new(buf);
                        match builder.push_ack(
                            key.stream_id,
                            key.producer_id,
                            header_seq,
                            timestamp,
                            &body,
                        ) {
                            Ok(()) => builder.len(),
                            Err(_) => 0,
                        }
                    })
                    .map_err(|source| ShardError::Backend { shard, source })?;
                if sent {
                    ingest.counts.acks_sent += 1;
                    if let Some(received_ns) = poll.received_ns {
                        let now_ns = *queued_ns.get_or_insert_with(|| {
                            u64::try_from(
                                Instant::now().saturating_duration_since(epoch).as_nanos(),
                            )
                            .unwrap_or(u64::MAX)
                        });
                        ingest.counts.ack_latency[flow.level as usize]
                            .record(now_ns.saturating_sub(received_ns));
                    }
                } else {
                    ingest.counts.replies_dropped += 1;
                }
                queued = true;
            }
            if flow.is_waiting() {
                flow.listed = true;
                index += 1;
            } else {
                self.waiting.swap_remove(index);
            }
        }
        for rejection in ingest.rejections.drain(..) {
            let body = ErrorBody::new(rejection.code, rejection.detail);
            let message = match (rejection.code, &ingest.role) {
                (ErrorCode::NotLeader, ShardRole::Following(hint)) => hint.as_bytes(),
                _ => rejection.code.name().as_bytes(),
            };
            let sent = self
                .backend
                .queue_tx(&rejection.peer, &mut |buf| {
                    let mut builder = DatagramBuilder::new(buf);
                    match builder.push_error(
                        rejection.stream_id,
                        rejection.producer_id,
                        rejection.sequence,
                        &body,
                        message,
                    ) {
                        Ok(()) => builder.len(),
                        Err(_) => 0,
                    }
                })
                .map_err(|source| ShardError::Backend { shard, source })?;
            if sent {
                ingest.counts.errors_sent += 1;
            } else {
                ingest.counts.replies_dropped += 1;
            }
            queued = true;
        }
        Ok(queued)
    }

    /// Give up the loop and keep the log (the backend is closed).
    pub fn into_sink(self) -> S {
        self.ingest.sink
    }

    /// The log, for inspection in tests.
    pub fn sink(&self) -> &S {
        &self.ingest.sink
    }

    /// The flow table, for inspection in tests.
    pub fn flows(&self) -> &FlowTable {
        &self.ingest.book.flows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{SocketBackend, SocketConfig};
    use kaelix_protocol::{FrameFields, MAX_DATAGRAM_LEN};
    use std::collections::HashMap;
    use std::net::UdpSocket;

    /// A log in a Vec: enough to test the loop's decisions.
    #[derive(Default)]
    struct MemorySink {
        streams: HashMap<u32, (DurabilityLevel, u64)>,
        records: Vec<(u32, u64, Vec<u8>)>,
        position: u64,
        durable: u64,
        fail_pushes_after: Option<usize>,
        /// Failing pushes report storage that is behind, not full.
        overloaded: bool,
    }

    struct MemoryBatch<'a> {
        sink: &'a mut MemorySink,
        stream_id: u32,
        pending: Vec<Vec<u8>>,
    }

    impl SinkBatch for MemoryBatch<'_> {
        fn push(&mut self, frame: &[u8]) -> Result<u64, SinkError> {
            let stored = self.sink.records.len() + self.pending.len();
            if self.sink.fail_pushes_after.is_some_and(|n| stored >= n) {
                if self.sink.overloaded {
                    return Err(SinkError::Overloaded {
                        live_bytes: 2,
                        limit_bytes: 2,
                    });
                }
                return Err(SinkError::Full {
                    detail: "test".into(),
                });
            }
            self.pending.push(frame.to_vec());
            Ok(self.sink.streams[&self.stream_id].1 + self.pending.len() as u64 - 1)
        }

        fn commit(self) -> Result<u64, SinkError> {
            let stream = self
                .sink
                .streams
                .get_mut(&self.stream_id)
                .expect("stream exists");
            for frame in self.pending {
                self.sink.position += frame.len() as u64;
                self.sink.records.push((self.stream_id, stream.1, frame));
                stream.1 += 1;
            }
            Ok(self.sink.position)
        }
    }

    impl LogSink for MemorySink {
        type Batch<'a> = MemoryBatch<'a>;

        fn stream_level(&self, stream_id: u32) -> Option<DurabilityLevel> {
            self.streams.get(&stream_id).map(|s| s.0)
        }
        fn begin(&mut self, stream_id: u32, _now_ns: u64) -> Result<MemoryBatch<'_>, SinkError> {
            Ok(MemoryBatch {
                sink: self,
                stream_id,
                pending: Vec::new(),
            })
        }
        fn durable_position(&self, level: DurabilityLevel) -> u64 {
            if level == DurabilityLevel::Memory {
                self.position
            } else {
                self.durable
            }
        }
        fn housekeeping(&mut self, _now_ns: u64) -> Result<(), SinkError> {
            Ok(())
        }
    }

    struct Harness {
        shard: Shard<SocketBackend, MemorySink>,
        client: UdpSocket,
        broker: std::net::SocketAddr,
        _commands: crossbeam_channel::Sender<ShardTask<MemorySink>>,
    }

    fn harness(streams: &[(u32, DurabilityLevel)]) -> Harness {
        let backend =
            SocketBackend::bind("127.0.0.1:0".parse().unwrap(), &SocketConfig::default()).unwrap();
        let broker = backend.local_addr().unwrap();
        let mut sink = MemorySink::default();
        for (id, level) in streams {
            sink.streams.insert(*id, (*level, 0));
        }
        let (tx, rx) = crossbeam_channel::bounded(8);
        let config = ShardConfig {
            credit_window: 100,
            ..ShardConfig::default()
        };
        let shard = Shard::new(
            0,
            backend,
            sink,
            FlowTable::new(16, 16),
            &config,
            ShardLinks {
                commands: rx,
                stop: Arc::new(AtomicBool::new(false)),
                counters: Arc::new(ShardCounters::default()),
            },
        );
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Harness {
            shard,
            client,
            broker,
            _commands: tx,
        }
    }

    impl Harness {
        fn send(&self, frames: &[(u32, u32, u64)]) {
            let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
            let mut builder = DatagramBuilder::new(&mut buf);
            for (stream, producer, seq) in frames {
                builder
                    .push(
                        &FrameFields::data(*stream, *producer, *seq, *seq * 10),
                        &seq.to_le_bytes(),
                    )
                    .unwrap();
            }
            self.client
                .send_to(builder.as_bytes(), self.broker)
                .unwrap();
        }

        /// Poll the shard until a reply arrives; return its frames as (kind, stream, seq, code).
        fn reply(&mut self) -> Vec<(FrameKind, u32, u64, Option<ErrorCode>)> {
            self.client.set_nonblocking(true).unwrap();
            let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                self.shard.poll_once().unwrap();
                if let Ok(n) = self.client.recv(&mut buf) {
                    return Datagram::new(&buf[..n])
                        .frames()
                        .map(|f| {
                            let f = f.unwrap();
                            let code = f.error().and_then(|(body, _)| body.error_code());
                            (f.kind(), f.stream_id(), f.sequence(), code)
                        })
                        .collect();
                }
                assert!(Instant::now() < deadline, "no reply from the shard");
            }
        }
    }

    #[test]
    fn appends_in_order_and_acks_cumulatively() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        h.send(&[(1, 7, 1), (1, 7, 2), (1, 7, 3)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 3, None)]);
        assert_eq!(h.shard.sink().records.len(), 3);
        let offsets: Vec<u64> = h.shard.sink().records.iter().map(|r| r.1).collect();
        assert_eq!(offsets, vec![0, 1, 2]);
        assert_eq!(h.shard.counters.frames_appended.load(Ordering::Relaxed), 3);
        // One ACK of new data: one latency observation, at the memory level.
        let memory = h.shard.counters.ack_latency[DurabilityLevel::Memory as usize].snapshot();
        assert_eq!(memory.count, 1);
        assert!(memory.sum_ns < 5_000_000_000, "{memory:?}");
        let fsync = h.shard.counters.ack_latency[DurabilityLevel::Fsync as usize].snapshot();
        assert_eq!(fsync.count, 0);
    }

    #[test]
    fn duplicates_are_acked_not_appended_and_gaps_dropped() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        h.send(&[(1, 7, 1), (1, 7, 2)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 2, None)]);
        h.send(&[(1, 7, 2)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 2, None)]);
        h.send(&[(1, 7, 4)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 2, None)]);
        h.send(&[(1, 7, 3), (1, 7, 4)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 4, None)]);
        let seqs: Vec<u64> = h
            .shard
            .sink()
            .records
            .iter()
            .map(|r| Frame::parse(&r.2).unwrap().sequence())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        assert_eq!(h.shard.counters.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(h.shard.counters.gaps.load(Ordering::Relaxed), 1);
        let streams: Vec<(u32, crate::counters::StreamCounts)> = h
            .shard
            .flows()
            .stream_counts()
            .map(|(id, counts)| (id, *counts))
            .collect();
        assert_eq!(streams.len(), 1);
        let (id, counts) = streams[0];
        assert_eq!(id, 1);
        assert_eq!(
            (counts.frames_appended, counts.duplicates, counts.gaps),
            (4, 1, 1)
        );
        assert_eq!(
            counts.bytes_appended,
            4 * (kaelix_protocol::HEADER_LEN as u64 + 8)
        );
        // Only ACKs of new data are timed (the duplicate's and the gap's are not).
        let memory = h.shard.counters.ack_latency[DurabilityLevel::Memory as usize].snapshot();
        assert_eq!(memory.count, 2);
    }

    #[test]
    fn a_following_shard_answers_not_leader_with_the_hint_and_appends_nothing() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        let leader: std::net::SocketAddr = "127.0.0.9:7101".parse().unwrap();
        let hint = kaelix_protocol::LeaderHint::new(Some(leader));
        h.shard.tunables().set_role(ShardRole::Following(hint));
        h.send(&[(1, 7, 1), (1, 7, 2)]);
        // One ERROR datagram per rejected frame.
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 1, 1, Some(ErrorCode::NotLeader))]
        );
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 1, 2, Some(ErrorCode::NotLeader))]
        );
        assert!(h.shard.sink().records.is_empty());
        // The message names the leader.
        h.send(&[(1, 7, 1)]);
        h.client.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        let deadline = Instant::now() + Duration::from_secs(5);
        let n = loop {
            h.shard.poll_once().unwrap();
            if let Ok(n) = h.client.recv(&mut buf) {
                break n;
            }
            assert!(Instant::now() < deadline, "no reply from the shard");
        };
        let frame = Datagram::new(&buf[..n]).frames().next().unwrap().unwrap();
        let (_, message) = frame.error().unwrap();
        assert_eq!(
            kaelix_protocol::parse_leader_hint(message),
            Some(Some(leader))
        );
        // Leading again: the same frames are appended and acknowledged.
        h.shard.tunables().set_role(ShardRole::Leading);
        h.send(&[(1, 7, 1), (1, 7, 2)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 2, None)]);
        assert_eq!(h.shard.sink().records.len(), 2);
    }

    #[test]
    fn unknown_stream_bad_crc_and_window_get_errors() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        h.send(&[(9, 7, 1)]);
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 9, 1, Some(ErrorCode::UnknownStream))]
        );
        h.send(&[(1, 7, 101)]);
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 1, 101, Some(ErrorCode::OutOfWindow))]
        );
        let mut buf = [0u8; 64];
        let n = kaelix_protocol::encode_frame(&mut buf, &FrameFields::data(1, 7, 1, 0), b"abc")
            .unwrap();
        buf[n - 1] ^= 1;
        h.client.send_to(&buf[..n], h.broker).unwrap();
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 0, 0, Some(ErrorCode::CrcMismatch))]
        );
        h.client
            .send_to(b"garbage that is not a frame at all.......", h.broker)
            .unwrap();
        assert_eq!(
            h.reply(),
            vec![(FrameKind::Error, 0, 0, Some(ErrorCode::BadMagic))]
        );
        assert_eq!(h.shard.counters.error_count(ErrorCode::CrcMismatch), 1);
        assert_eq!(h.shard.counters.total_errors(), 4);
        assert!(h.shard.sink().records.is_empty());
        // Per stream: the window error belongs to stream 1; frames of the
        // unknown stream 9 and unparsable ones are counted per shard only.
        let streams: Vec<(u32, crate::counters::StreamCounts)> = h
            .shard
            .flows()
            .stream_counts()
            .map(|(id, counts)| (id, *counts))
            .collect();
        assert_eq!(streams.len(), 1, "{streams:?}");
        assert_eq!(streams[0].0, 1);
        assert_eq!(streams[0].1.errors[ErrorCode::OutOfWindow.index()], 1);
        assert_eq!(streams[0].1.errors.iter().sum::<u64>(), 1);
        // Valid traffic still flows afterwards.
        h.send(&[(1, 7, 1)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 1, None)]);
    }

    #[test]
    fn durable_levels_wait_for_the_durable_position() {
        let mut h = harness(&[(2, DurabilityLevel::Fsync)]);
        h.send(&[(2, 7, 1)]);
        for _ in 0..50 {
            h.shard.poll_once().unwrap();
        }
        h.client.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        assert!(
            h.client.recv(&mut buf).is_err(),
            "no ack before the data is durable"
        );
        let position = h.shard.sink().position;
        std::thread::sleep(Duration::from_millis(2));
        h.shard.ingest.sink.durable = position;
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 2, 1, None)]);
        // Timed from the receive to the ACK, at the fsync level.
        let fsync = h.shard.counters.ack_latency[DurabilityLevel::Fsync as usize].snapshot();
        assert_eq!(fsync.count, 1);
        assert!(fsync.sum_ns >= 2_000_000, "{fsync:?}");
        let over_1ms: u64 = fsync.buckets[crate::counters::ACK_LATENCY_BUCKETS_NS
            .iter()
            .position(|&b| b == 1_000_000)
            .unwrap()
            + 1..]
            .iter()
            .sum();
        assert_eq!(over_1ms, 1);
    }

    #[test]
    fn frames_of_several_flows_in_one_datagram() {
        let mut h = harness(&[(1, DurabilityLevel::Memory), (2, DurabilityLevel::Memory)]);
        h.send(&[(1, 7, 1), (2, 7, 1), (1, 8, 1), (1, 7, 2)]);
        let mut replies = h.reply();
        while replies.len() < 3 {
            replies.extend(h.reply());
        }
        replies.sort_by_key(|r| (r.1, r.2));
        assert_eq!(h.shard.sink().records.len(), 4);
        assert_eq!(h.shard.flows().len(), 3);
    }

    #[test]
    fn storage_full_rejects_and_rewinds() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        h.shard.ingest.sink.fail_pushes_after = Some(1);
        h.send(&[(1, 7, 1), (1, 7, 2)]);
        let mut replies = h.reply();
        if replies.len() < 2 {
            replies.extend(h.reply());
        }
        assert!(
            replies.contains(&(FrameKind::Ack, 1, 1, None)),
            "{replies:?}"
        );
        assert!(
            replies.contains(&(FrameKind::Error, 1, 2, Some(ErrorCode::StorageFull))),
            "{replies:?}"
        );
        h.shard.ingest.sink.fail_pushes_after = None;
        h.send(&[(1, 7, 2)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 2, None)]);
    }

    #[test]
    fn overloaded_storage_rejects_and_appends_the_retransmit_once() {
        let mut h = harness(&[(1, DurabilityLevel::Memory)]);
        h.shard.ingest.sink.fail_pushes_after = Some(1);
        h.shard.ingest.sink.overloaded = true;
        let overloaded = (FrameKind::Error, 1, 2, Some(ErrorCode::Overloaded));
        h.send(&[(1, 7, 1), (1, 7, 2), (1, 7, 3)]);
        let mut replies = h.reply();
        while !(replies.contains(&overloaded) && replies.contains(&(FrameKind::Ack, 1, 1, None))) {
            replies.extend(h.reply());
        }
        // Still behind: the retransmit is refused again at the same sequence.
        h.send(&[(1, 7, 2), (1, 7, 3)]);
        let mut replies = h.reply();
        while !replies.contains(&overloaded) {
            replies.extend(h.reply());
        }
        assert_eq!(h.shard.counters.error_count(ErrorCode::Overloaded), 2);
        assert_eq!(h.shard.sink().records.len(), 1);
        // Caught up: the retransmit is appended, once, even if sent twice.
        h.shard.ingest.sink.fail_pushes_after = None;
        h.send(&[(1, 7, 2), (1, 7, 3)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 3, None)]);
        h.send(&[(1, 7, 2), (1, 7, 3)]);
        assert_eq!(h.reply(), vec![(FrameKind::Ack, 1, 3, None)]);
        let seqs: Vec<u64> = h
            .shard
            .sink()
            .records
            .iter()
            .map(|r| Frame::parse(&r.2).unwrap().sequence())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
}
