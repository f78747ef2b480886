//! A reference broker for the produce protocol, for tests (feature `testing`).
//!
//! [`ModelBroker`] is a sans-IO model of what the broker's data plane does
//! with producer frames, written from the protocol description and kept
//! small enough to read at a glance: per `(stream, producer)` flow it keeps
//! the next expected sequence, appends in order, drops duplicates and gaps,
//! answers with cumulative ACKs and a credit window, and rejects with ERROR
//! frames. [`UdpModelBroker`] serves it on a loopback UDP socket with
//! optional loss, duplication and reordering, so client tests run without
//! the real broker. Several [`UdpModelBroker`]s can serve one model, each
//! in a [`Role`]: the leader appends, a follower answers `not_leader` with a
//! leader hint ([`not_leader_replies`]), a dead one answers nothing; the
//! shared model stands for the replicated log and producer state.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kaelix_protocol::{
    AckBody, Datagram, DatagramBuilder, DurabilityLevel, ErrorBody, ErrorCode, FrameKind,
    LeaderHint, MAX_DATAGRAM_LEN,
};
use zerocopy::little_endian::{U16, U32, U64};

/// One appended frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Producer id of the frame.
    pub producer_id: u32,
    /// Its sequence.
    pub sequence: u64,
    /// Its timestamp.
    pub timestamp_ns: u64,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The whole frame as received.
    pub frame: Vec<u8>,
}

#[derive(Debug, Default)]
struct FlowModel {
    expected: u64,
    last_offset: Option<u64>,
}

#[derive(Debug, Default)]
struct StreamModel {
    records: Vec<StoredRecord>,
    flows: HashMap<u32, FlowModel>,
}

/// The produce side of a broker, as a model. See the module docs.
#[derive(Debug)]
pub struct ModelBroker {
    streams: HashMap<u32, StreamModel>,
    credit: u32,
    level: DurabilityLevel,
    reject: Vec<(Vec<u8>, ErrorCode)>,
    frames_rejected: u64,
    overloads_left: u64,
}

impl ModelBroker {
    /// A broker granting `credit` frames of window, with no streams.
    pub fn new(credit: u32) -> Self {
        Self {
            streams: HashMap::new(),
            credit,
            level: DurabilityLevel::Memory,
            reject: Vec::new(),
            frames_rejected: 0,
            overloads_left: 0,
        }
    }

    /// Create a stream.
    pub fn add_stream(&mut self, stream_id: u32) {
        self.streams.entry(stream_id).or_default();
    }

    /// Change the credit granted from now on.
    pub fn set_credit(&mut self, credit: u32) {
        self.credit = credit;
    }

    /// Reject with `code` every DATA frame whose payload starts with `prefix`.
    pub fn reject_payloads(&mut self, prefix: &[u8], code: ErrorCode) {
        self.reject.push((prefix.to_vec(), code));
    }

    /// Refuse the next `frames` DATA frames that would be appended with
    /// `overloaded`, as a broker whose storage is behind does (the frames
    /// after a refused one in its datagram are gaps).
    pub fn overload_next(&mut self, frames: u64) {
        self.overloads_left = frames;
    }

    /// As if the broker had recovered the flow from its log: it expects
    /// `last_sequence + 1` next.
    pub fn recover_flow(&mut self, stream_id: u32, producer_id: u32, last_sequence: u64) {
        let stream = self.streams.entry(stream_id).or_default();
        stream.flows.insert(
            producer_id,
            FlowModel {
                expected: last_sequence + 1,
                last_offset: None,
            },
        );
    }

    /// A restart that lost every flow's state (memory-level data is kept here).
    pub fn forget_flows(&mut self) {
        for stream in self.streams.values_mut() {
            stream.flows.clear();
        }
    }

    /// The records of a stream, in offset order.
    pub fn records(&self, stream_id: u32) -> &[StoredRecord] {
        self.streams
            .get(&stream_id)
            .map_or(&[], |stream| stream.records.as_slice())
    }

    /// Frames rejected with an ERROR so far.
    pub fn frames_rejected(&self) -> u64 {
        self.frames_rejected
    }

    /// Process one datagram from `producer`; the reply datagram (possibly
    /// empty) is written into `reply`, its length returned.
    pub fn handle_datagram(&mut self, bytes: &[u8], reply: &mut [u8]) -> usize {
        let mut builder = DatagramBuilder::new(reply);
        let mut touched: Vec<(u32, u32)> = Vec::new();
        for frame in Datagram::new(bytes).frames() {
            let Ok(frame) = frame else {
                break;
            };
            let (stream_id, producer_id, sequence) =
                (frame.stream_id(), frame.producer_id(), frame.sequence());
            let Some(stream) = self.streams.get_mut(&stream_id) else {
                self.frames_rejected += 1;
                push_error(&mut builder, &frame_key(&frame), ErrorCode::UnknownStream);
                continue;
            };
            let flow = stream.flows.entry(producer_id).or_insert(FlowModel {
                expected: sequence,
                last_offset: None,
            });
            match frame.kind() {
                FrameKind::Heartbeat => {
                    flow.expected = flow.expected.max(sequence);
                }
                FrameKind::Data => {
                    if sequence > flow.expected.saturating_sub(1) + u64::from(self.credit) {
                        self.frames_rejected += 1;
                        push_error(&mut builder, &frame_key(&frame), ErrorCode::OutOfWindow);
                        continue;
                    }
                    if sequence == flow.expected {
                        let rejected = self
                            .reject
                            .iter()
                            .find(|(prefix, _)| frame.payload().starts_with(prefix));
                        if let Some((_, code)) = rejected {
                            self.frames_rejected += 1;
                            push_error(&mut builder, &frame_key(&frame), *code);
                            continue;
                        }
                        if self.overloads_left > 0 {
                            self.overloads_left -= 1;
                            self.frames_rejected += 1;
                            push_error(&mut builder, &frame_key(&frame), ErrorCode::Overloaded);
                            continue;
                        }
                        flow.last_offset = Some(stream.records.len() as u64);
                        flow.expected += 1;
                        stream.records.push(StoredRecord {
                            producer_id,
                            sequence,
                            timestamp_ns: frame.timestamp_ns(),
                            payload: frame.payload().to_vec(),
                            frame: frame.as_bytes().to_vec(),
                        });
                    }
                }
                FrameKind::Ack | FrameKind::Error => {
                    push_error(&mut builder, &frame_key(&frame), ErrorCode::UnexpectedKind);
                    continue;
                }
            }
            if !touched.contains(&(stream_id, producer_id)) {
                touched.push((stream_id, producer_id));
            }
        }
        for (stream_id, producer_id) in touched {
            let flow = &self.streams[&stream_id].flows[&producer_id];
            let body = AckBody {
                credit: U32::new(self.credit),
                level: self.level as u8,
                reserved: [0; 3],
                last_offset: U64::new(flow.last_offset.unwrap_or(u64::MAX)),
            };
            // A reply datagram of 64 KiB holds far more ACKs than a datagram has frames.
            let _ = builder.push_ack(
                stream_id,
                producer_id,
                flow.expected.saturating_sub(1),
                0,
                &body,
            );
        }
        builder.len()
    }
}

fn frame_key(frame: &kaelix_protocol::Frame<'_>) -> (u32, u32, u64) {
    (frame.stream_id(), frame.producer_id(), frame.sequence())
}

fn push_error(builder: &mut DatagramBuilder<'_>, key: &(u32, u32, u64), code: ErrorCode) {
    let body = ErrorBody {
        code: U16::new(code as u16),
        reserved: U16::ZERO,
        detail: U32::ZERO,
    };
    let _ = builder.push_error(key.0, key.1, key.2, &body, b"");
}

/// What a broker that follows a shard answers to a produce datagram: one
/// ERROR datagram per DATA or HEARTBEAT frame, code `not_leader`, the
/// message a [`LeaderHint`] naming `leader` (or none), as the data plane does.
pub fn not_leader_replies(bytes: &[u8], leader: Option<SocketAddr>) -> Vec<Vec<u8>> {
    let hint = LeaderHint::new(leader);
    let body = ErrorBody {
        code: U16::new(ErrorCode::NotLeader as u16),
        reserved: U16::ZERO,
        detail: U32::ZERO,
    };
    let mut replies = Vec::new();
    for frame in Datagram::new(bytes).frames() {
        let Ok(frame) = frame else {
            break;
        };
        if !matches!(frame.kind(), FrameKind::Data | FrameKind::Heartbeat) {
            continue;
        }
        let mut reply = vec![0u8; 256];
        let mut builder = DatagramBuilder::new(&mut reply);
        let (stream_id, producer_id, sequence) = frame_key(&frame);
        builder
            .push_error(stream_id, producer_id, sequence, &body, hint.as_bytes())
            .expect("an ERROR with a hint fits 256 bytes");
        let len = builder.len();
        reply.truncate(len);
        replies.push(reply);
    }
    replies
}

/// The part a served broker plays for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Appends to the model and acknowledges.
    Leading,
    /// Rejects DATA and HEARTBEAT frames with `not_leader` naming this
    /// leader (`None`: no leader known).
    Following(Option<SocketAddr>),
    /// Answers nothing, as a dead process.
    Silent,
}

/// Faults a [`UdpModelBroker`] injects, as probabilities in parts per
/// thousand, from a seeded generator (so a failing run can be repeated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Drop an incoming datagram.
    pub drop_in_permille: u32,
    /// Drop a reply.
    pub drop_out_permille: u32,
    /// Process an incoming datagram twice.
    pub duplicate_permille: u32,
    /// Hold an incoming datagram back and process it after the next one.
    pub reorder_permille: u32,
    /// Seed of the generator.
    pub seed: u64,
}

/// A small deterministic generator (SplitMix64), enough for fault injection.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `permille / 1000`.
    pub fn chance(&mut self, permille: u32) -> bool {
        self.next_u64() % 1000 < u64::from(permille)
    }
}

/// State a served broker shares with its handle.
#[derive(Debug)]
struct Served {
    model: Arc<Mutex<ModelBroker>>,
    role: Mutex<Role>,
    stop: AtomicBool,
    received: AtomicU64,
}

/// A [`ModelBroker`] served on a loopback UDP socket by one thread.
#[derive(Debug)]
pub struct UdpModelBroker {
    addr: SocketAddr,
    served: Arc<Served>,
    thread: Option<JoinHandle<()>>,
}

impl UdpModelBroker {
    /// Serve `model` on 127.0.0.1 (an ephemeral port) with `faults`.
    pub fn spawn(model: ModelBroker, faults: Faults) -> std::io::Result<Self> {
        Self::serve_shared(Arc::new(Mutex::new(model)), Role::Leading, faults)
    }

    /// Another broker on its own port serving the same model (the
    /// replicated log and producer state) in `role`, without faults.
    pub fn replica(&self, role: Role) -> std::io::Result<Self> {
        Self::serve_shared(Arc::clone(&self.served.model), role, Faults::default())
    }

    fn serve_shared(
        model: Arc<Mutex<ModelBroker>>,
        role: Role,
        faults: Faults,
    ) -> std::io::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        let addr = socket.local_addr()?;
        let served = Arc::new(Served {
            model,
            role: Mutex::new(role),
            stop: AtomicBool::new(false),
            received: AtomicU64::new(0),
        });
        let thread = {
            let served = Arc::clone(&served);
            std::thread::Builder::new()
                .name("model-broker".into())
                .spawn(move || serve(&socket, &served, faults))?
        };
        Ok(Self {
            addr,
            served,
            thread: Some(thread),
        })
    }

    /// The data port's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Play `role` from the next datagram on.
    pub fn set_role(&self, role: Role) {
        *self
            .served
            .role
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = role;
    }

    /// Datagrams received so far (in any role).
    pub fn datagrams_received(&self) -> u64 {
        self.served.received.load(Ordering::Relaxed)
    }

    /// The model, to inspect or change between datagrams.
    pub fn model(&self) -> MutexGuard<'_, ModelBroker> {
        self.served
            .model
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl Drop for UdpModelBroker {
    fn drop(&mut self) {
        self.served.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(socket: &UdpSocket, served: &Served, faults: Faults) {
    let model = &*served.model;
    let mut rng = SplitMix::new(faults.seed);
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut reply = vec![0u8; MAX_DATAGRAM_LEN];
    let mut held: Option<(Vec<u8>, SocketAddr)> = None;
    while !served.stop.load(Ordering::Relaxed) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        served.received.fetch_add(1, Ordering::Relaxed);
        let role = *served
            .role
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        match role {
            Role::Leading => {}
            Role::Following(leader) => {
                for reply in not_leader_replies(&buf[..len], leader) {
                    let _ = socket.send_to(&reply, peer);
                }
                continue;
            }
            Role::Silent => continue,
        }
        if rng.chance(faults.drop_in_permille) {
            continue;
        }
        if held.is_none() && rng.chance(faults.reorder_permille) {
            held = Some((buf[..len].to_vec(), peer));
            continue;
        }
        let copies = 1 + usize::from(rng.chance(faults.duplicate_permille));
        let mut process = |bytes: &[u8], peer: SocketAddr, rng: &mut SplitMix| {
            let n = model
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .handle_datagram(bytes, &mut reply);
            if n > 0 && !rng.chance(faults.drop_out_permille) {
                let _ = socket.send_to(&reply[..n], peer);
            }
        };
        for _ in 0..copies {
            process(&buf[..len], peer, &mut rng);
        }
        if let Some((bytes, peer)) = held.take() {
            process(&bytes, peer, &mut rng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(seq: u64) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        let mut builder = DatagramBuilder::new(&mut buf);
        builder.push_data(1, 9, seq, 0, b"x").unwrap();
        let n = builder.len();
        buf.truncate(n);
        buf
    }

    fn ack_of(reply: &[u8]) -> u64 {
        let frame = Datagram::new(reply).frames().last().unwrap().unwrap();
        assert_eq!(frame.kind(), FrameKind::Ack);
        frame.sequence()
    }

    #[test]
    fn model_appends_in_order_and_drops_duplicates_and_gaps() {
        let mut broker = ModelBroker::new(100);
        broker.add_stream(1);
        let mut reply = [0u8; 1024];
        let n = broker.handle_datagram(&data(1), &mut reply);
        assert_eq!(ack_of(&reply[..n]), 1);
        let n = broker.handle_datagram(&data(3), &mut reply);
        assert_eq!(
            ack_of(&reply[..n]),
            1,
            "gap answered with the contiguous ack"
        );
        let n = broker.handle_datagram(&data(1), &mut reply);
        assert_eq!(
            ack_of(&reply[..n]),
            1,
            "duplicate answered with the current ack"
        );
        let n = broker.handle_datagram(&data(2), &mut reply);
        assert_eq!(ack_of(&reply[..n]), 2);
        assert_eq!(broker.records(1).len(), 2);
        let n = broker.handle_datagram(&data(500), &mut reply);
        let frame = Datagram::new(&reply[..n]).frames().next().unwrap().unwrap();
        let (body, _) = frame.error().unwrap();
        assert_eq!(body.code.get(), ErrorCode::OutOfWindow as u16);
    }

    #[test]
    fn split_mix_is_deterministic_and_spread() {
        let mut a = SplitMix::new(7);
        let mut b = SplitMix::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let hits = (0..10_000).filter(|_| a.chance(100)).count();
        assert!((800..1200).contains(&hits), "{hits} hits for 10 %");
    }
}
