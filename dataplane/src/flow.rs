//! Per-flow state: duplicate detection, the credit window and cumulative ACK
//! bookkeeping for each `(producer_id, stream_id)`.
//!
//! Sans-IO and single-threaded: the shard that owns the stream owns its
//! flows. The table is sized at start-up; a new flow is the only event that
//! may grow it.
//!
//! Rules (see docs/protocol.md, "Reliable produce"):
//! - the broker expects sequence 1 from a flow it has never seen, or the
//!   successor of the last sequence it recovered from its log;
//! - `seq < expected` is a duplicate: never appended, answered with the
//!   current cumulative ACK;
//! - `seq == expected` is appended;
//! - `expected < seq <= acked + window` is a gap: dropped and answered at
//!   once with the current ACK (go-back-N: the producer retransmits);
//! - `seq > acked + window` is out of the window: an ERROR frame;
//! - a producer HEARTBEAT carries its lowest unacknowledged sequence; when
//!   that is ahead of `expected` (the broker lost memory-level data in a
//!   restart) the flow skips ahead to it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use kaelix_protocol::DurabilityLevel;

use crate::backend::Peer;
use crate::counters::StreamCounts;

/// Identifies a flow: one producer writing one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Producer id.
    pub producer_id: u32,
    /// Stream id.
    pub stream_id: u32,
}

impl FlowKey {
    fn packed(self) -> u64 {
        (u64::from(self.producer_id) << 32) | u64::from(self.stream_id)
    }
}

/// What to do with a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Append it: it is the next expected sequence.
    Append,
    /// Already appended; do not append again, answer with the current ACK.
    Duplicate,
    /// A sequence is missing before it; drop it and answer with the current ACK.
    Gap {
        /// The sequence the broker is waiting for.
        expected: u64,
    },
    /// Beyond the credit window; reject with an ERROR frame.
    OutOfWindow {
        /// The highest sequence the producer may send now.
        limit: u64,
    },
}

/// A point in the log an ACK can be given for once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPoint {
    /// Log position the batch ends at; durable when the log's durable position reaches it.
    pub end_position: u64,
    /// Highest sequence appended by then.
    pub sequence: u64,
    /// Stream offset of the record holding `sequence`.
    pub offset: u64,
    /// Producer timestamp of that frame (echoed in the ACK).
    pub timestamp_ns: u64,
    /// Shard clock (monotonic ns) of the cycle that received the oldest
    /// batch folded into this point (for the append-to-ACK latency).
    pub received_ns: u64,
}

/// [`AckPoint::received_ns`] of a point recovered from the log (not timed).
const RECOVERED: u64 = u64::MAX;

/// What [`FlowState::poll_ack_timed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckPoll {
    /// An ACK should be sent now.
    pub due: bool,
    /// When new data is acknowledged: the receive time (shard clock) of the
    /// oldest batch it newly covers.
    pub received_ns: Option<u64>,
}

/// State of one flow.
#[derive(Debug, Clone, Copy)]
pub struct FlowState {
    /// Next sequence the broker will append.
    pub expected: u64,
    /// Highest sequence acknowledged so far (0 = none).
    pub acked: u64,
    /// Stream offset of the record holding `acked` (`u64::MAX` = none).
    pub acked_offset: u64,
    /// Timestamp of the acknowledged frame.
    pub acked_timestamp_ns: u64,
    /// Where replies go: the peer the newest frame came from.
    pub peer: Peer,
    /// Durability level ACKs wait for.
    pub level: DurabilityLevel,
    /// The oldest appended point still waiting to become durable.
    pub waiting: Option<AckPoint>,
    /// The newest appended point (replaces `waiting` once that one is acked).
    pub newest: Option<AckPoint>,
    /// An ACK should go out this cycle even if nothing new became durable
    /// (duplicate, gap or heartbeat seen).
    pub ack_due: bool,
    /// Listed in the shard's dirty list this cycle.
    pub listed: bool,
}

impl FlowState {
    fn new(
        peer: Peer,
        level: DurabilityLevel,
        last_recovered: Option<(u64, u64)>,
        pending_until: Option<u64>,
    ) -> Self {
        let (last, last_offset) = last_recovered.unwrap_or((0, u64::MAX));
        let mut flow = Self {
            expected: last + 1,
            acked: last,
            acked_offset: last_offset,
            acked_timestamp_ns: 0,
            peer,
            level,
            waiting: None,
            newest: None,
            ack_due: false,
            listed: false,
        };
        if let (Some(end_position), Some(_)) = (pending_until, last_recovered) {
            // Recovered from a log whose end may not be durable at the
            // flow's level yet (a replica that just took the lead): the
            // recovered sequence is acknowledged only once it is.
            flow.acked = 0;
            flow.acked_offset = u64::MAX;
            flow.waiting = Some(AckPoint {
                end_position,
                sequence: last,
                offset: last_offset,
                timestamp_ns: 0,
                received_ns: RECOVERED,
            });
        }
        flow
    }

    /// Decide what to do with DATA frame `seq` given a credit `window`.
    pub fn admit(&self, seq: u64, window: u64) -> Admission {
        if seq < self.expected {
            return Admission::Duplicate;
        }
        let limit = self.acked.saturating_add(window);
        if seq > limit {
            return Admission::OutOfWindow { limit };
        }
        if seq > self.expected {
            return Admission::Gap {
                expected: self.expected,
            };
        }
        Admission::Append
    }

    /// Accept `seq` (it was admitted as [`Admission::Append`] and pushed into
    /// the log); the ACK point is recorded by [`FlowState::batch_committed`].
    pub fn accept(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.expected);
        self.expected = seq + 1;
    }

    /// The storage batch holding this flow's frames up to `seq` (at stream
    /// `offset`) was committed and ends at log `end_position`; it was
    /// received in the cycle whose shard clock read `received_ns`.
    pub fn batch_committed(
        &mut self,
        seq: u64,
        offset: u64,
        timestamp_ns: u64,
        end_position: u64,
        received_ns: u64,
    ) {
        debug_assert!(seq < self.expected);
        let mut point = AckPoint {
            end_position,
            sequence: seq,
            offset,
            timestamp_ns,
            received_ns,
        };
        if self.waiting.is_none() {
            self.waiting = Some(point);
        } else {
            // Folded into the newest point: keep the oldest receive time.
            if let Some(newest) = self.newest {
                point.received_ns = newest.received_ns.min(received_ns);
            }
            self.newest = Some(point);
        }
    }

    /// A producer heartbeat says its lowest unacknowledged sequence is `lowest_unacked`.
    /// Returns true when the flow skipped ahead.
    pub fn heartbeat(&mut self, lowest_unacked: u64) -> bool {
        self.ack_due = true;
        if lowest_unacked > self.expected && self.waiting.is_none() {
            self.expected = lowest_unacked;
            self.acked = lowest_unacked - 1;
            return true;
        }
        false
    }

    /// Advance the acknowledgement given the durable log position for this
    /// flow's level. Returns true when an ACK should be sent now.
    pub fn poll_ack(&mut self, durable_position: u64) -> bool {
        self.poll_ack_timed(durable_position).due
    }

    /// [`FlowState::poll_ack`], also saying when the oldest batch newly
    /// acknowledged was received.
    pub fn poll_ack_timed(&mut self, durable_position: u64) -> AckPoll {
        let mut received_ns = None;
        let mut moved = false;
        while let Some(point) = self.waiting {
            if point.end_position > durable_position {
                break;
            }
            self.acked = point.sequence;
            self.acked_offset = point.offset;
            self.acked_timestamp_ns = point.timestamp_ns;
            self.waiting = self.newest.take();
            moved = true;
            if point.received_ns != RECOVERED {
                received_ns.get_or_insert(point.received_ns);
            }
        }
        let due = moved || self.ack_due;
        self.ack_due = false;
        AckPoll { due, received_ns }
    }

    /// True while appended data waits for durability.
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }
}

/// A fast hasher for the packed 64-bit flow key (Fibonacci hashing).
#[derive(Default, Clone, Copy)]
pub struct FlowHasher(u64);

impl Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedKey(u64);

/// All flows of one shard.
#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<PackedKey, FlowState, BuildHasherDefault<FlowHasher>>,
    recovered: HashMap<PackedKey, (u64, u64), BuildHasherDefault<FlowHasher>>,
    /// Recovered sequences are acknowledged only once the log is durable up
    /// to here ([`FlowTable::recover_pending`]).
    pending_until: Option<u64>,
    /// Counts per stream: one entry per stream this shard has that saw a
    /// frame (so at most the shard's registered streams; removed with the stream).
    streams: HashMap<u32, StreamCounts, BuildHasherDefault<FlowHasher>>,
    max_flows: usize,
}

/// The flow table is full; the frame is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow table full: {max_flows} producer/stream flows already tracked")]
pub struct FlowTableFull {
    /// The configured limit.
    pub max_flows: usize,
}

impl FlowTable {
    /// A table for up to `max_flows` flows, with room for `initial` allocated now.
    pub fn new(initial: usize, max_flows: usize) -> Self {
        Self {
            flows: HashMap::with_capacity_and_hasher(initial, Default::default()),
            recovered: HashMap::default(),
            pending_until: None,
            streams: HashMap::with_capacity_and_hasher(initial.min(1024), Default::default()),
            max_flows,
        }
    }

    /// The counts of a stream the shard has, created on first use (call
    /// only for streams the log knows, which bounds the table).
    #[inline]
    pub fn stream_counts_mut(&mut self, stream_id: u32) -> &mut StreamCounts {
        self.streams.entry(stream_id).or_default()
    }

    /// The counts of a stream, if it has any yet.
    #[inline]
    pub fn existing_stream_counts_mut(&mut self, stream_id: u32) -> Option<&mut StreamCounts> {
        self.streams.get_mut(&stream_id)
    }

    /// Every stream's counts, in no particular order.
    pub fn stream_counts(&self) -> impl Iterator<Item = (u32, &StreamCounts)> + '_ {
        self.streams.iter().map(|(id, counts)| (*id, counts))
    }

    /// Remember the last sequence (and its stream offset) a flow had in the
    /// log when the broker started, so a retransmit after a restart is not
    /// appended twice.
    pub fn recover(&mut self, key: FlowKey, sequence: u64, offset: u64) {
        let entry = self
            .recovered
            .entry(PackedKey(key.packed()))
            .or_insert((0, u64::MAX));
        if sequence >= entry.0 {
            *entry = (sequence, offset);
        }
    }

    /// The recovered sequences are not acknowledged before the log is
    /// durable (at each flow's level) up to `position`: for a log another
    /// leader wrote, whose tail a quorum may not have yet.
    pub fn recover_pending(&mut self, position: u64) {
        self.pending_until = Some(position);
    }

    /// Number of flows recovered from the log.
    pub fn recovered_len(&self) -> usize {
        self.recovered.len()
    }

    /// The flow's state, created on first use.
    pub fn get_or_insert(
        &mut self,
        key: FlowKey,
        peer: Peer,
        level: DurabilityLevel,
    ) -> Result<&mut FlowState, FlowTableFull> {
        let packed = PackedKey(key.packed());
        if !self.flows.contains_key(&packed) && self.flows.len() >= self.max_flows {
            return Err(FlowTableFull {
                max_flows: self.max_flows,
            });
        }
        let recovered = self.recovered.get(&packed).copied();
        Ok(self
            .flows
            .entry(packed)
            .or_insert_with(|| FlowState::new(peer, level, recovered, self.pending_until)))
    }

    /// The flow's state, if it exists.
    pub fn get_mut(&mut self, key: FlowKey) -> Option<&mut FlowState> {
        self.flows.get_mut(&PackedKey(key.packed()))
    }

    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// True when no flow exists.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Forget every flow and every recovered sequence (the log was written
    /// by another leader meanwhile; recover from it again).
    pub fn forget_flows(&mut self) {
        self.flows.clear();
        self.recovered.clear();
        self.pending_until = None;
    }

    /// Forget every flow of a deleted stream.
    pub fn remove_stream(&mut self, stream_id: u32) {
        self.flows.retain(|key, _| key.0 as u32 != stream_id);
        self.recovered.retain(|key, _| key.0 as u32 != stream_id);
        self.streams.remove(&stream_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer::Udp("127.0.0.1:1".parse().unwrap())
    }

    fn key() -> FlowKey {
        FlowKey {
            producer_id: 1,
            stream_id: 2,
        }
    }

    #[test]
    fn in_order_duplicate_gap_window() {
        let mut table = FlowTable::new(4, 4);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Memory)
            .unwrap();
        assert_eq!(flow.admit(1, 10), Admission::Append);
        flow.accept(1);
        flow.batch_committed(1, 0, 0, 100, 0);
        assert_eq!(flow.admit(1, 10), Admission::Duplicate);
        assert_eq!(flow.admit(3, 10), Admission::Gap { expected: 2 });
        assert_eq!(flow.admit(11, 10), Admission::OutOfWindow { limit: 10 });
        assert!(flow.poll_ack(100));
        assert_eq!(flow.acked, 1);
        assert_eq!(flow.admit(11, 10), Admission::Gap { expected: 2 });
        assert_eq!(flow.admit(12, 10), Admission::OutOfWindow { limit: 11 });
    }

    #[test]
    fn acks_wait_for_durability_and_never_starve() {
        let mut table = FlowTable::new(4, 4);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Fsync)
            .unwrap();
        flow.accept(1);
        flow.batch_committed(1, 0, 0, 100, 0);
        flow.accept(2);
        flow.batch_committed(2, 1, 0, 200, 0);
        assert!(!flow.poll_ack(50));
        assert!(flow.poll_ack(150));
        assert_eq!(flow.acked, 1);
        // More appends keep arriving; the ack still advances each time durability does.
        flow.accept(3);
        flow.batch_committed(3, 2, 0, 300, 0);
        assert!(flow.poll_ack(250));
        assert_eq!(flow.acked, 2);
        assert!(flow.poll_ack(300));
        assert_eq!(flow.acked, 3);
        assert!(!flow.is_waiting());
        assert!(!flow.poll_ack(300));
    }

    #[test]
    fn acks_report_the_receive_time_of_the_oldest_batch_they_cover() {
        let mut table = FlowTable::new(4, 4);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Fsync)
            .unwrap();
        for (seq, received_ns) in [(1, 10), (2, 20), (3, 30)] {
            flow.accept(seq);
            flow.batch_committed(seq, seq - 1, 0, seq * 100, received_ns);
        }
        let poll = flow.poll_ack_timed(100);
        assert_eq!((poll.due, poll.received_ns), (true, Some(10)));
        // Batches 2 and 3 were folded into one point: it keeps batch 2's time.
        let poll = flow.poll_ack_timed(300);
        assert_eq!((poll.due, poll.received_ns), (true, Some(20)));
        assert_eq!(flow.acked, 3);
        let poll = flow.poll_ack_timed(300);
        assert_eq!((poll.due, poll.received_ns), (false, None));
        // A duplicate makes an ACK due without new data: no latency.
        flow.ack_due = true;
        assert_eq!(flow.poll_ack_timed(300).received_ns, None);
        table.stream_counts_mut(2).duplicates += 1;
        assert_eq!(table.stream_counts().count(), 1);
        table.remove_stream(2);
        assert_eq!(
            table.stream_counts().count(),
            0,
            "counts go with the stream"
        );
    }

    #[test]
    fn recovered_flows_resume_after_the_logged_sequence() {
        let mut table = FlowTable::new(4, 4);
        table.recover(key(), 41, 7);
        table.recover(key(), 40, 6);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Flush)
            .unwrap();
        assert_eq!(flow.admit(41, 100), Admission::Duplicate);
        assert_eq!(flow.admit(42, 100), Admission::Append);
        assert_eq!(flow.acked_offset, 7);
    }

    #[test]
    fn a_pending_recovery_acknowledges_only_once_durable() {
        let mut table = FlowTable::new(4, 4);
        table.recover(key(), 9, 20);
        table.recover_pending(5000);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Replicated)
            .unwrap();
        // A retransmit is still a duplicate, but its ACK says nothing new
        // until the log is durable up to the recovery point.
        assert_eq!(flow.admit(9, 100), Admission::Duplicate);
        assert_eq!(flow.acked, 0);
        let poll = flow.poll_ack_timed(4999);
        assert_eq!(flow.acked, 0);
        assert!(!poll.due);
        let poll = flow.poll_ack_timed(5000);
        assert!(poll.due, "the ACK goes out once durable");
        assert_eq!(poll.received_ns, None, "not timed");
        assert_eq!((flow.acked, flow.acked_offset), (9, 20));
        assert_eq!(flow.admit(10, 100), Admission::Append);
    }

    #[test]
    fn forgotten_flows_start_again_from_what_is_recovered_next() {
        let mut table = FlowTable::new(4, 4);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Memory)
            .unwrap();
        assert_eq!(flow.admit(1, 100), Admission::Append);
        table.forget_flows();
        assert!(table.is_empty());
        assert_eq!(table.recovered_len(), 0);
        // Another leader appended up to 9 meanwhile.
        table.recover(key(), 9, 20);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Memory)
            .unwrap();
        assert_eq!(flow.admit(9, 100), Admission::Duplicate);
        assert_eq!(flow.admit(10, 100), Admission::Append);
    }

    #[test]
    fn heartbeat_skips_ahead_only_forward() {
        let mut table = FlowTable::new(4, 4);
        let flow = table
            .get_or_insert(key(), peer(), DurabilityLevel::Memory)
            .unwrap();
        assert!(flow.heartbeat(50));
        assert_eq!(flow.admit(50, 10), Admission::Append);
        assert!(!flow.heartbeat(10));
        assert_eq!(flow.expected, 50);
    }

    #[test]
    fn table_limit_is_enforced() {
        let mut table = FlowTable::new(1, 1);
        table
            .get_or_insert(key(), peer(), DurabilityLevel::Memory)
            .unwrap();
        let other = FlowKey {
            producer_id: 9,
            stream_id: 9,
        };
        assert_eq!(
            table
                .get_or_insert(other, peer(), DurabilityLevel::Memory)
                .unwrap_err(),
            FlowTableFull { max_flows: 1 }
        );
        table.remove_stream(2);
        assert!(table.is_empty());
        table
            .get_or_insert(other, peer(), DurabilityLevel::Memory)
            .unwrap();
    }
}
