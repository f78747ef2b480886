//! The blocking UDP driver: a [`ProducerState`] behind a mutex, one
//! background thread for receiving and timers, and application threads that
//! queue messages and transmit full batches themselves.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaelix_protocol::{ErrorCode, MAX_DATAGRAM_LEN};

use super::config::ProducerConfig;
use super::route::Routes;
use super::state::{
    Delivery, FlowAck, ProducerEvent, ProducerState, ProducerStats, SendError, Ticket,
};

/// Failures remembered for [`Producer::take_errors`] before the oldest are dropped.
const ERRORS_KEPT_MAX: usize = 1024;
/// Longest the driver thread sleeps with nothing scheduled.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Shortest socket read timeout the driver asks for.
const MIN_WAIT: Duration = Duration::from_micros(50);

/// What can go wrong producing through a [`Producer`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProduceError {
    /// The broker rejected the message with an ERROR frame; it was not
    /// appended and will not be retransmitted.
    #[error("broker rejected message {number} of stream {stream_id} (sequence {sequence:?}): {code} (detail {detail})", stream_id = ticket.stream_id, number = ticket.number)]
    Rejected {
        /// The message.
        ticket: Ticket,
        /// Its sequence, if it was numbered.
        sequence: Option<u64>,
        /// The broker's reason.
        code: ErrorCode,
        /// The ERROR frame's detail field.
        detail: u32,
    },
    /// The wait ended before the broker acknowledged; the messages stay
    /// buffered and are still retransmitted.
    #[error(
        "no acknowledgement within {waited:?}: {unacked} messages still unacknowledged (is the broker at {broker} running?)"
    )]
    Timeout {
        /// How long was waited.
        waited: Duration,
        /// Messages still buffered.
        unacked: usize,
        /// The broker's address (the first bootstrap broker's).
        broker: SocketAddr,
    },
    /// The buffer stayed full for the whole blocking time.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The producer was closed, or its driver thread stopped on an error.
    #[error("producer closed: {reason}")]
    Closed {
        /// Why.
        reason: String,
    },
}

/// A message the broker rejected, as kept for [`Producer::take_errors`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedMessage {
    /// The message.
    pub ticket: Ticket,
    /// Its sequence, if it was numbered.
    pub sequence: Option<u64>,
    /// The broker's reason.
    pub code: ErrorCode,
    /// The ERROR frame's detail field.
    pub detail: u32,
}

type ErrorCallback = Box<dyn Fn(&FailedMessage) + Send + Sync>;

struct Shared {
    core: ProducerState,
    /// Results of tracked messages someone waits for (`None` until known).
    waiters: HashMap<Ticket, Option<Result<Delivery, ProduceError>>>,
    errors: VecDeque<FailedMessage>,
    errors_dropped: u64,
    /// When the driver thread will wake by itself (`None` while it runs).
    io_wake_at: Option<Instant>,
    tx_buf: Vec<u8>,
    send_errors: u64,
    closed: Option<String>,
}

struct Inner {
    socket: UdpSocket,
    /// The first bootstrap broker (for messages).
    broker: SocketAddr,
    local: SocketAddr,
    shared: Mutex<Shared>,
    changed: Condvar,
    stop: AtomicBool,
    on_error: Option<ErrorCallback>,
}

/// Builds a [`Producer`].
pub struct ProducerBuilder {
    broker: SocketAddr,
    brokers: Vec<SocketAddr>,
    config: ProducerConfig,
    shards: u16,
    block_timeout: Duration,
    on_error: Option<ErrorCallback>,
}

impl std::fmt::Debug for ProducerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerBuilder")
            .field("broker", &self.broker)
            .field("brokers", &self.brokers)
            .field("config", &self.config)
            .field("shards", &self.shards)
            .field("block_timeout", &self.block_timeout)
            .finish_non_exhaustive()
    }
}

impl ProducerBuilder {
    /// Replace the whole producer configuration.
    pub fn config(mut self, config: ProducerConfig) -> Self {
        self.config = config;
        self
    }

    /// Set the producer id (default: random).
    pub fn producer_id(mut self, producer_id: u32) -> Self {
        self.config.producer_id = producer_id;
        self
    }

    /// Largest datagram to send (default 1472; up to 65507 on loopback).
    pub fn datagram_len_max(mut self, bytes: usize) -> Self {
        self.config.datagram_len_max = bytes;
        self
    }

    /// How long a message may wait for company in its datagram.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.config.linger = linger;
        self
    }

    /// The broker runs `shards` data-plane shards on consecutive ports from
    /// the broker address's port; stream `s` is sent to port `port + s % shards`.
    pub fn shards(mut self, shards: u16) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// The other brokers of a cluster (their base data addresses, the port
    /// of shard 0; each shard's address on them is derived as for the
    /// builder's broker). Every shard starts at the builder's broker and
    /// follows `not_leader` redirects; when a shard's destination names no
    /// leader or stays silent for `rotate_after_timeouts` retransmission
    /// timeouts, the shard moves to the next broker of the list (the
    /// builder's broker first, then these in order, round and round).
    pub fn brokers(mut self, brokers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.brokers = brokers.into_iter().collect();
        self
    }

    /// How long `send` blocks while the buffer is full before failing
    /// (default 30 s).
    pub fn block_timeout(mut self, timeout: Duration) -> Self {
        self.block_timeout = timeout;
        self
    }

    /// Call `callback` on the driver thread for every message the broker
    /// rejects (it must not block).
    pub fn on_error(mut self, callback: impl Fn(&FailedMessage) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Box::new(callback));
        self
    }

    /// Bind a UDP socket and start the driver thread. A bad setting or
    /// broker list is an `InvalidInput` error wrapping a
    /// [`super::ConfigError`] or [`super::RouteError`].
    pub fn connect(self) -> io::Result<Producer> {
        self.config
            .validate()
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let mut bootstrap = Vec::with_capacity(1 + self.brokers.len());
        bootstrap.push(self.broker);
        bootstrap.extend_from_slice(&self.brokers);
        let routes = Routes::new(&bootstrap, self.shards)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let bind: SocketAddr = if self.broker.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        let mut local = socket.local_addr()?;
        if local.ip().is_unspecified() {
            local.set_ip(if self.broker.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let inner = Arc::new(Inner {
            socket,
            broker: self.broker,
            local,
            shared: Mutex::new(Shared {
                tx_buf: vec![0; self.config.datagram_len_max],
                core: ProducerState::with_routes(self.config, routes),
                waiters: HashMap::new(),
                errors: VecDeque::new(),
                errors_dropped: 0,
                io_wake_at: None,
                send_errors: 0,
                closed: None,
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            on_error: self.on_error,
        });
        let thread = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("kaelix-producer".into())
                .spawn(move || inner.run())?
        };
        Ok(Producer {
            inner,
            block_timeout: self.block_timeout,
            thread: Some(thread),
        })
    }
}

/// A producer sending to one broker over UDP.
///
/// All methods take `&self`; share it between threads with an `Arc`.
/// Dropping it stops the driver thread without waiting for
/// acknowledgements: call [`Producer::flush`] first.
pub struct Producer {
    inner: Arc<Inner>,
    block_timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("broker", &self.inner.broker)
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

impl Producer {
    /// A builder for a producer sending to `broker` (the data port).
    pub fn builder(broker: SocketAddr) -> ProducerBuilder {
        ProducerBuilder {
            broker,
            brokers: Vec::new(),
            config: ProducerConfig::default(),
            shards: 1,
            block_timeout: Duration::from_secs(30),
            on_error: None,
        }
    }

    /// A producer with default settings sending to `broker`.
    pub fn connect(broker: SocketAddr) -> io::Result<Self> {
        Self::builder(broker).connect()
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u32 {
        self.inner.lock().core.producer_id()
    }

    /// The local address the producer sends from.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Where frames of `stream_id` go now (its shard's current destination:
    /// the leader it was redirected to, or a bootstrap broker).
    pub fn destination(&self, stream_id: u32) -> SocketAddr {
        self.inner
            .lock()
            .core
            .destination(stream_id)
            .expect("the driver's core has routes")
    }

    /// Fire and forget: queue `payload` for `stream_id` and return at once
    /// (blocking only while the buffer is full). A rejection is reported
    /// through [`Producer::take_errors`] and the `on_error` callback.
    pub fn send(&self, stream_id: u32, payload: &[u8]) -> Result<Ticket, ProduceError> {
        self.enqueue(stream_id, payload, false)
    }

    /// Queue `payload` and remember its outcome for [`Producer::wait`].
    pub fn send_tracked(&self, stream_id: u32, payload: &[u8]) -> Result<Ticket, ProduceError> {
        self.enqueue(stream_id, payload, true)
    }

    /// Send `payload` at once and wait for its acknowledgement (at most
    /// `timeout`); returns its sequence, stream offset and durability level.
    pub fn send_and_wait(
        &self,
        stream_id: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Delivery, ProduceError> {
        let ticket = self.enqueue(stream_id, payload, true)?;
        {
            let mut shared = self.inner.lock();
            shared.core.flush();
            self.inner.pump(&mut shared, Instant::now());
        }
        self.wait(ticket, timeout)
    }

    /// Wait (at most `timeout`) for the outcome of a message sent with
    /// [`Producer::send_tracked`] or [`Producer::send_and_wait`]. On timeout
    /// the message stays buffered, and `wait` may be called again.
    pub fn wait(&self, ticket: Ticket, timeout: Duration) -> Result<Delivery, ProduceError> {
        self.wait_until(timeout, |shared| match shared.waiters.get(&ticket) {
            Some(Some(_)) => shared.waiters.remove(&ticket).flatten(),
            Some(None) => None,
            None => Some(Err(ProduceError::Closed {
                reason: format!("ticket {ticket:?} is not tracked or was already waited for"),
            })),
        })?
    }

    /// Send everything buffered at once and wait (at most `timeout`) until
    /// every message was acknowledged or rejected.
    pub fn flush(&self, timeout: Duration) -> Result<(), ProduceError> {
        {
            let mut shared = self.inner.lock();
            shared.core.flush();
            self.inner.pump(&mut shared, Instant::now());
        }
        self.wait_until(timeout, |shared| shared.core.is_idle().then_some(()))
    }

    /// Block until `done` returns `Some`, the producer closes, or `timeout` passes.
    fn wait_until<R>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&mut Shared) -> Option<R>,
    ) -> Result<R, ProduceError> {
        let deadline = Instant::now() + timeout;
        let mut shared = self.inner.lock();
        loop {
            if let Some(result) = done(&mut shared) {
                return Ok(result);
            }
            if let Some(reason) = &shared.closed {
                return Err(ProduceError::Closed {
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProduceError::Timeout {
                    waited: timeout,
                    unacked: shared.core.buffered_frames(),
                    broker: self.inner.broker,
                });
            }
            shared = self.inner.wait_changed(shared, deadline - now);
        }
    }

    /// Rejections since the last call, oldest first (at most 1024 are kept;
    /// see [`Producer::errors_dropped`]).
    pub fn take_errors(&self) -> Vec<FailedMessage> {
        self.inner.lock().errors.drain(..).collect()
    }

    /// Rejections not kept because more than 1024 were waiting.
    pub fn errors_dropped(&self) -> u64 {
        self.inner.lock().errors_dropped
    }

    /// Counters of the sans-IO core.
    pub fn stats(&self) -> ProducerStats {
        self.inner.lock().core.stats()
    }

    /// Failed `send_to` calls (datagrams then count as lost and are retransmitted).
    pub fn send_errors(&self) -> u64 {
        self.inner.lock().send_errors
    }

    /// The latest acknowledgement of `stream_id`'s flow.
    pub fn flow_ack(&self, stream_id: u32) -> Option<FlowAck> {
        self.inner.lock().core.flow_ack(stream_id)
    }

    /// Messages buffered, not yet acknowledged.
    pub fn buffered(&self) -> usize {
        self.inner.lock().core.buffered_frames()
    }

    /// Flush (at most `timeout`), then stop the driver thread.
    pub fn close(mut self, timeout: Duration) -> Result<(), ProduceError> {
        let flushed = self.flush(timeout);
        self.shutdown();
        flushed
    }

    fn shutdown(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn enqueue(
        &self,
        stream_id: u32,
        payload: &[u8],
        tracked: bool,
    ) -> Result<Ticket, ProduceError> {
        let timestamp_ns = wall_clock_ns();
        let deadline = Instant::now() + self.block_timeout;
        let mut shared = self.inner.lock();
        loop {
            if let Some(reason) = &shared.closed {
                return Err(ProduceError::Closed {
                    reason: reason.clone(),
                });
            }
            let now = Instant::now();
            match shared
                .core
                .send(now, stream_id, payload, timestamp_ns, tracked)
            {
                Ok(ticket) => {
                    if tracked {
                        shared.waiters.insert(ticket, None);
                    }
                    self.inner.pump(&mut shared, now);
                    return Ok(ticket);
                }
                Err(SendError::BufferFull { .. }) if now < deadline => {
                    shared.core.flush();
                    self.inner.pump(&mut shared, now);
                    shared = self.inner.wait_changed(shared, deadline - now);
                }
                Err(err) => return Err(err.into()),
            }
        }
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn wait_changed<'a>(
        &self,
        guard: MutexGuard<'a, Shared>,
        timeout: Duration,
    ) -> MutexGuard<'a, Shared> {
        self.changed
            .wait_timeout(guard, timeout)
            .unwrap_or_else(|poison| poison.into_inner())
            .0
    }

    /// Wake the driver thread out of its socket wait (a 0-byte datagram to itself).
    fn wake(&self) {
        let _ = self.socket.send_to(&[], self.local);
    }

    /// Run due timers, transmit what is ready, and hand out events. Called
    /// with the lock held, by the driver thread and by application threads.
    fn pump(&self, shared: &mut Shared, now: Instant) {
        if shared.core.poll_timeout().is_some_and(|at| at <= now) {
            shared.core.handle_timeout(now);
        }
        let Shared { core, tx_buf, .. } = shared;
        while let Some(transmit) = core.poll_transmit(now, tx_buf) {
            let to = core
                .destination(transmit.stream_id)
                .expect("the driver's core has routes");
            if self.socket.send_to(&tx_buf[..transmit.len], to).is_err() {
                shared.send_errors += 1;
            }
        }
        let mut changed = false;
        while let Some(event) = shared.core.poll_event() {
            changed = true;
            match event {
                ProducerEvent::Delivered { ticket, delivery } => {
                    if let Some(slot) = shared.waiters.get_mut(&ticket) {
                        *slot = Some(Ok(delivery));
                    }
                }
                ProducerEvent::Failed {
                    ticket,
                    sequence,
                    code,
                    detail,
                } => {
                    let failed = FailedMessage {
                        ticket,
                        sequence,
                        code,
                        detail,
                    };
                    if let Some(callback) = &self.on_error {
                        callback(&failed);
                    }
                    if let Some(slot) = shared.waiters.get_mut(&ticket) {
                        *slot = Some(Err(ProduceError::Rejected {
                            ticket,
                            sequence,
                            code,
                            detail,
                        }));
                    } else {
                        if shared.errors.len() == ERRORS_KEPT_MAX {
                            shared.errors.pop_front();
                            shared.errors_dropped += 1;
                        }
                        shared.errors.push_back(failed);
                    }
                }
            }
        }
        if changed || shared.core.is_idle() {
            self.changed.notify_all();
        }
        // Someone added work the sleeping driver thread does not know about.
        let next = shared.core.poll_timeout();
        if let (Some(next), Some(wake_at)) = (next, shared.io_wake_at)
            && next < wake_at
        {
            shared.io_wake_at = Some(next);
            self.wake();
        }
    }

    fn run(&self) {
        let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
        let mut received = 0;
        let mut from = self.local;
        loop {
            let wait = {
                let mut shared = self.lock();
                let now = Instant::now();
                shared.io_wake_at = None;
                if received > 0 {
                    shared
                        .core
                        .handle_datagram_from(now, from, &buf[..received]);
                    // Acknowledgements free buffer room that blocked senders wait for.
                    self.changed.notify_all();
                }
                self.pump(&mut shared, now);
                if self.stop.load(Ordering::Acquire) {
                    shared.closed = Some("the producer was closed".into());
                    self.changed.notify_all();
                    return;
                }
                let next = shared
                    .core
                    .poll_timeout()
                    .unwrap_or(now + IDLE_WAIT)
                    .clamp(now + MIN_WAIT, now + IDLE_WAIT);
                shared.io_wake_at = Some(next);
                next - now
            };
            received = 0;
            if let Err(err) = self.socket.set_read_timeout(Some(wait)) {
                self.fail(err);
                return;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((len, peer)) => {
                    received = len;
                    from = peer;
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(err) => {
                    self.fail(err);
                    return;
                }
            }
        }
    }

    fn fail(&self, err: io::Error) {
        let mut shared = self.lock();
        shared.closed = Some(format!("producer socket failed: {err}"));
        self.changed.notify_all();
    }
}
