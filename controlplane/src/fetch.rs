//! The TCP fetch server: remote consumers read streams by offset.
//!
//! Speaks the protocol of [`kaelix_protocol::fetch`] (documented byte by
//! byte there and in `docs/protocol.md`): one request in, one response out,
//! in order, per connection. Frames come from a [`kaelix_storage::LogReader`]
//! of the shard owning the stream, found through a [`FetchSource`] the broker
//! implements, and never from beyond the position the source calls readable
//! (durable at the stream's level, or committed by replication).
//!
//! A request that finds nothing to read at its offset waits (long-poll) up
//! to its `max_wait_ms`, checking the log's published positions every
//! `poll_interval` (two atomic loads; the log is only read again when they
//! moved), and is answered as soon as something is readable.
//!
//! Payload bytes are copied once, from the log mapping into the
//! connection's response buffer (reused from request to request), which is
//! then written to the socket.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kaelix_protocol::fetch::{
    FETCH_BYTES_MAX, FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN, FETCH_WAIT_MS_MAX,
};
use kaelix_protocol::{DurabilityLevel, FetchErrorCode, FetchRequest, FetchResponseHeader};
use kaelix_storage::{LogReader, ReadError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where the fetch server finds a stream's data. The broker implements it.
pub trait FetchSource: Send + Sync + 'static {
    /// A reader of the log holding `stream_id`, or `None` when this broker
    /// has no such stream. Called once per stream per connection; the reader
    /// is kept for the connection's life.
    fn reader(&self, stream_id: u32) -> Option<LogReader>;

    /// True while the broker has `stream_id` (asked before every read, so a
    /// stream deleted while a connection follows it becomes unknown). The
    /// default: every stream exists.
    fn has_stream(&self, stream_id: u32) -> bool {
        let _ = stream_id;
        true
    }

    /// The log position below which `stream_id`'s frames may be served:
    /// durable at the stream's level, or committed by replication. The
    /// default serves everything appended (the `memory` level).
    fn readable_position(&self, stream_id: u32, reader: &LogReader) -> u64 {
        let _ = stream_id;
        reader.positions().appended
    }
}

/// One log for every stream, served at the `memory` level (tests, single-shard tools).
impl FetchSource for LogReader {
    fn reader(&self, _stream_id: u32) -> Option<LogReader> {
        Some(self.clone())
    }
}

/// The broker's layout: streams spread over shard logs by `stream_id %
/// shards`, each stream served once durable at its own level.
///
/// `level_of(stream_id)` gives a stream's durability, or `None` for a
/// stream the broker does not have (answered with `unknown_stream`).
pub struct ShardedLogs<F> {
    readers: Vec<LogReader>,
    level_of: F,
}

impl<F> ShardedLogs<F>
where
    F: Fn(u32) -> Option<DurabilityLevel> + Send + Sync + 'static,
{
    /// One reader per shard, in shard order.
    ///
    /// # Panics
    /// If `readers` is empty.
    pub fn new(readers: Vec<LogReader>, level_of: F) -> Self {
        assert!(!readers.is_empty(), "a broker has at least one shard");
        Self { readers, level_of }
    }
}

impl<F> FetchSource for ShardedLogs<F>
where
    F: Fn(u32) -> Option<DurabilityLevel> + Send + Sync + 'static,
{
    fn reader(&self, stream_id: u32) -> Option<LogReader> {
        (self.level_of)(stream_id)?;
        Some(self.readers[stream_id as usize % self.readers.len()].clone())
    }

    fn has_stream(&self, stream_id: u32) -> bool {
        (self.level_of)(stream_id).is_some()
    }

    fn readable_position(&self, stream_id: u32, reader: &LogReader) -> u64 {
        // A stream gone since the check serves nothing rather than guessing a level.
        (self.level_of)(stream_id).map_or(0, |level| reader.positions().durable(level))
    }
}

/// The broker's shard logs, each stream served once durable at the level
/// its log registers for it, streams created or deleted at runtime included;
/// a stream no log has is answered with `unknown_stream`.
pub fn broker_logs(
    readers: Vec<LogReader>,
) -> ShardedLogs<impl Fn(u32) -> Option<DurabilityLevel> + Send + Sync + 'static> {
    let catalogs = readers.clone();
    ShardedLogs::new(readers, move |stream_id| {
        catalogs[stream_id as usize % catalogs.len()].stream_level(stream_id)
    })
}

/// Settings of the fetch server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchServerConfig {
    /// Largest response body served, whatever the request asks (bytes; at
    /// least one frame is always served).
    pub response_bytes_max: u32,
    /// How often a waiting request checks for new data.
    pub poll_interval: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub connections_max: usize,
}

impl Default for FetchServerConfig {
    fn default() -> Self {
        Self {
            response_bytes_max: 4 * 1024 * 1024,
            poll_interval: Duration::from_millis(1),
            connections_max: 1024,
        }
    }
}

/// Counters of a fetch server (relaxed atomics; read them any time).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Frames served.
    pub records: AtomicU64,
    /// Frame bytes served.
    pub bytes: AtomicU64,
    /// Requests that waited for data.
    pub long_polls: AtomicU64,
    /// Error responses sent.
    pub errors: AtomicU64,
}

/// A running fetch server on a tokio runtime the caller owns.
#[derive(Debug)]
pub struct FetchServer {
    local_addr: SocketAddr,
    stats: Arc<FetchStats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl FetchServer {
    /// Bind `addr` and serve fetches from `source` on the current tokio runtime.
    pub async fn bind(
        addr: SocketAddr,
        source: Arc<dyn FetchSource>,
        config: FetchServerConfig,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let stats = Arc::new(FetchStats::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            source,
            Arc::new(config),
            Arc::clone(&stats),
            stopped,
        ));
        Ok(Self {
            local_addr,
            stats,
            stop,
            task,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.stats
    }

    /// Stop accepting, end every connection (waiting requests are answered
    /// at once), and wait for the accept loop to finish.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A fetch server on its own thread and tokio runtime, for callers without
/// one (the broker's start-up code is plain threads).
#[derive(Debug)]
pub struct FetchServerThread {
    local_addr: SocketAddr,
    stats: Arc<FetchStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FetchServerThread {
    /// Start a runtime with `worker_threads` workers on a new thread, bind
    /// `addr` and serve `source`. Returns once the listener is bound.
    pub fn spawn(
        addr: SocketAddr,
        source: Arc<dyn FetchSource>,
        config: FetchServerConfig,
        worker_threads: usize,
    ) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("kaelix-fetch")
            .enable_all()
            .build()?;
        let server = runtime.block_on(FetchServer::bind(addr, source, config))?;
        let (local_addr, stats) = (server.local_addr(), Arc::clone(server.stats()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kaelix-fetch-main".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = stopped.await;
                    server.shutdown().await;
                });
            })?;
        Ok(Self {
            local_addr,
            stats,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<FetchStats> {
        &self.stats
    }

    /// Stop serving and wait for the thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FetchServerThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

async fn accept_loop(
    listener: TcpListener,
    source: Arc<dyn FetchSource>,
    config: Arc<FetchServerConfig>,
    stats: Arc<FetchStats>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(config.connections_max));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stopped.changed() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        let Ok((socket, peer)) = accepted else {
            // Out of file descriptors or similar: back off a little.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let connection = Connection {
            source: Arc::clone(&source),
            config: Arc::clone(&config),
            stats: Arc::clone(&stats),
            stopped: stopped.clone(),
            readers: HashMap::new(),
            out: Vec::new(),
        };
        connections.spawn(async move {
            if let Err(err) = connection.run(socket).await {
                tracing::debug!(%peer, error = %err, "fetch connection ended");
            }
            drop(permit);
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Readers kept per connection before the cache is emptied.
const READERS_MAX: usize = 64;

struct Connection {
    source: Arc<dyn FetchSource>,
    config: Arc<FetchServerConfig>,
    stats: Arc<FetchStats>,
    stopped: watch::Receiver<bool>,
    readers: HashMap<u32, LogReader>,
    /// The response being built: header, then frames. Reused.
    out: Vec<u8>,
}

/// What one attempt to fill a response found.
enum Fill {
    /// Frames (maybe none) and the header describing them.
    Done(FetchResponseHeader),
    /// Nothing readable at the offset yet: the consumer is caught up.
    CaughtUp { high_watermark: u64, log_start: u64 },
}

impl Connection {
    async fn run(mut self, mut socket: TcpStream) -> io::Result<()> {
        socket.set_nodelay(true)?;
        let mut request_bytes = [0u8; FETCH_REQUEST_LEN];
        loop {
            let read = tokio::select! {
                read = socket.read_exact(&mut request_bytes) => read,
                _ = self.stopped.changed() => return Ok(()),
            };
            match read {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err),
            }
            let request = match FetchRequest::decode(&request_bytes) {
                Ok(request) => request,
                Err(err) => {
                    // The byte stream cannot be trusted after a bad request:
                    // answer, then close.
                    let request = FetchRequest {
                        request_id: 0,
                        stream_id: 0,
                        from_offset: 0,
                        max_bytes: 0,
                        max_wait_ms: 0,
                    };
                    let header =
                        FetchResponseHeader::error(&request, FetchErrorCode::BadRequest, 0, 0);
                    self.write_header_only(&header);
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    socket.write_all(&self.out).await?;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, err));
                }
            };
            self.serve(&request).await;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            socket.write_all(&self.out).await?;
        }
    }

    /// Build the response to `request` in `self.out`, waiting for data if
    /// the consumer is caught up.
    async fn serve(&mut self, request: &FetchRequest) {
        let wait = Duration::from_millis(u64::from(request.max_wait_ms.min(FETCH_WAIT_MS_MAX)));
        let deadline = Instant::now() + wait;
        let mut waited = false;
        let mut seen_positions = None;
        loop {
            let positions = match self.reader(request.stream_id) {
                Some(reader) => {
                    let positions = reader.positions();
                    (positions.appended, positions.written, positions.synced)
                }
                None => {
                    self.respond_error(request, FetchErrorCode::UnknownStream, 0, 0);
                    return;
                }
            };
            // Read again only when the log moved since the last look.
            if seen_positions != Some(positions) {
                seen_positions = Some(positions);
                match self.fill(request) {
                    Ok(Fill::Done(header)) => {
                        self.finish(&header);
                        return;
                    }
                    Ok(Fill::CaughtUp {
                        high_watermark,
                        log_start,
                    }) => {
                        if Instant::now() >= deadline || *self.stopped.borrow() {
                            let header = FetchResponseHeader::ok(
                                request,
                                request.from_offset,
                                0,
                                0,
                                high_watermark,
                                log_start,
                            );
                            self.finish(&header);
                            return;
                        }
                    }
                    Err((code, high_watermark, log_start)) => {
                        self.respond_error(request, code, high_watermark, log_start);
                        return;
                    }
                }
            } else if Instant::now() >= deadline || *self.stopped.borrow() {
                // Positions unchanged since the last read found nothing.
                seen_positions = None;
                continue;
            }
            if !waited {
                waited = true;
                self.stats.long_polls.fetch_add(1, Ordering::Relaxed);
            }
            let sleep = self.config.poll_interval.min(deadline - Instant::now());
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.stopped.changed() => {}
            }
        }
    }

    fn reader(&mut self, stream_id: u32) -> Option<&mut LogReader> {
        if !self.source.has_stream(stream_id) {
            // Deleted since this connection looked it up.
            self.readers.remove(&stream_id);
            return None;
        }
        if !self.readers.contains_key(&stream_id) {
            let reader = self.source.reader(stream_id)?;
            if self.readers.len() >= READERS_MAX {
                self.readers.clear();
            }
            self.readers.insert(stream_id, reader);
        }
        self.readers.get_mut(&stream_id)
    }

    /// One read attempt: copy readable frames from the offset into `out`.
    fn fill(&mut self, request: &FetchRequest) -> Result<Fill, (FetchErrorCode, u64, u64)> {
        let budget = request
            .max_bytes
            .min(self.config.response_bytes_max)
            .min(FETCH_BYTES_MAX) as usize;
        let stream_id = request.stream_id;
        let from = request.from_offset;
        let source = Arc::clone(&self.source);
        let out = &mut self.out;
        let reader = self
            .readers
            .get_mut(&stream_id)
            .expect("serve looked the reader up first");
        let limit = source.readable_position(stream_id, reader);
        let appended = reader.positions().appended;
        let (log_start, end) = reader
            .stream_offsets(stream_id)
            .map_err(|err| storage_error(stream_id, &err))?
            .unwrap_or((0, 0));
        if from < log_start || from > end {
            return Err((FetchErrorCode::OffsetOutOfRange, end, log_start));
        }
        out.clear();
        out.resize(FETCH_RESPONSE_HEADER_LEN, 0);
        let mut count = 0u32;
        let mut first = from;
        {
            let batch = reader
                .read(stream_id, from, budget, limit)
                .map_err(|err| read_error(stream_id, &err, end))?;
            for record in batch {
                let record = record.map_err(|err| read_error(stream_id, &err, end))?;
                if count == 0 {
                    first = record.offset;
                } else if record.offset != first + u64::from(count) {
                    // A hole (offsets never written): the next response starts after it.
                    break;
                }
                debug_assert!(kaelix_protocol::Frame::parse(record.bytes).is_ok());
                out.extend_from_slice(record.bytes);
                count += 1;
            }
        }
        if count == 0 {
            return Ok(Fill::CaughtUp {
                high_watermark: from.min(end),
                log_start,
            });
        }
        let next = first + u64::from(count);
        // Everything appended is readable: the stream's end is the watermark.
        // Otherwise the readable end is not known in offsets without another
        // read; report what was reached when nothing more is readable.
        let high_watermark = if limit >= appended {
            end
        } else {
            let more = reader
                .read(stream_id, next, 1, limit)
                .map_err(|err| read_error(stream_id, &err, end))?
                .next()
                .is_some();
            if more { end } else { next }
        };
        let byte_len = (out.len() - FETCH_RESPONSE_HEADER_LEN) as u32;
        Ok(Fill::Done(FetchResponseHeader::ok(
            request,
            first,
            count,
            byte_len,
            high_watermark.max(next),
            log_start,
        )))
    }

    /// Write `header` at the front of `out` (frames already follow it) and count.
    fn finish(&mut self, header: &FetchResponseHeader) {
        if header.record_count == 0 {
            self.out.clear();
            self.out.resize(FETCH_RESPONSE_HEADER_LEN, 0);
        }
        debug_assert_eq!(
            self.out.len(),
            FETCH_RESPONSE_HEADER_LEN + header.byte_len as usize
        );
        let head: &mut [u8; FETCH_RESPONSE_HEADER_LEN] = (&mut self.out
            [..FETCH_RESPONSE_HEADER_LEN])
            .try_into()
            .expect("out starts with a header's worth of bytes");
        header.encode(head);
        self.stats
            .records
            .fetch_add(u64::from(header.record_count), Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(u64::from(header.byte_len), Ordering::Relaxed);
    }

    fn respond_error(
        &mut self,
        request: &FetchRequest,
        code: FetchErrorCode,
        high_watermark: u64,
        log_start: u64,
    ) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let header = FetchResponseHeader::error(request, code, high_watermark, log_start);
        self.write_header_only(&header);
    }

    fn write_header_only(&mut self, header: &FetchResponseHeader) {
        self.out.clear();
        self.out.resize(FETCH_RESPONSE_HEADER_LEN, 0);
        self.finish(header);
    }
}

fn storage_error(stream_id: u32, err: &ReadError) -> (FetchErrorCode, u64, u64) {
    tracing::warn!(stream_id, error = %err, "fetch: reading the log failed");
    (FetchErrorCode::StorageError, 0, 0)
}

fn read_error(stream_id: u32, err: &ReadError, end: u64) -> (FetchErrorCode, u64, u64) {
    match err {
        ReadError::OffsetRetained {
            first_available, ..
        } => (FetchErrorCode::OffsetOutOfRange, end, *first_available),
        other => storage_error(stream_id, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaelix_protocol::{FrameFields, HEADER_LEN, encode_frame};
    use kaelix_storage::{LogConfig, ShardLog, StreamConfig};
    use std::io::{Read, Write};

    fn frame(stream_id: u32, sequence: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        encode_frame(
            &mut buf,
            &FrameFields::data(stream_id, 1, sequence, 0),
            payload,
        )
        .unwrap();
        buf
    }

    fn open_log(dir: &std::path::Path) -> ShardLog {
        let mut config = LogConfig::new(dir);
        config.segment_size_bytes = 2 * 1024 * 1024;
        let (mut log, _) = ShardLog::open(config).unwrap();
        log.create_stream(
            1,
            StreamConfig {
                durability: kaelix_protocol::DurabilityLevel::Memory,
            },
        )
        .unwrap();
        log
    }

    fn append(log: &mut ShardLog, stream_id: u32, payloads: &[&[u8]], first_sequence: u64) {
        let frames: Vec<Vec<u8>> = payloads
            .iter()
            .enumerate()
            .map(|(i, payload)| frame(stream_id, first_sequence + i as u64, payload))
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        log.append(stream_id, &refs, 0).unwrap();
    }

    /// A blocking client: send one request, read the header and body.
    fn fetch(
        socket: &mut std::net::TcpStream,
        request: &FetchRequest,
    ) -> (FetchResponseHeader, Vec<u8>) {
        let mut bytes = [0u8; FETCH_REQUEST_LEN];
        request.encode(&mut bytes);
        socket.write_all(&bytes).unwrap();
        let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
        socket.read_exact(&mut head).unwrap();
        let header = FetchResponseHeader::decode(&head).unwrap();
        let mut body = vec![0u8; header.byte_len as usize];
        socket.read_exact(&mut body).unwrap();
        (header, body)
    }

    /// A server for `source` on an ephemeral loopback port, and a connection to it.
    fn serve<S: FetchSource>(source: S) -> (FetchServerThread, std::net::TcpStream) {
        let server = FetchServerThread::spawn(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(source),
            FetchServerConfig::default(),
            1,
        )
        .unwrap();
        let socket = std::net::TcpStream::connect(server.local_addr()).unwrap();
        (server, socket)
    }

    fn request(from_offset: u64, max_bytes: u32, max_wait_ms: u32) -> FetchRequest {
        FetchRequest {
            request_id: 42,
            stream_id: 1,
            from_offset,
            max_bytes,
            max_wait_ms,
        }
    }

    fn payloads_of(header: &FetchResponseHeader, body: &[u8]) -> Vec<(u64, Vec<u8>)> {
        header
            .records(body)
            .map(|item| {
                let (offset, frame) = item.unwrap();
                (offset, frame.payload().to_vec())
            })
            .collect()
    }

    #[test]
    fn serves_frames_by_offset_with_byte_limit_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open_log(dir.path());
        append(&mut log, 1, &[b"a", b"bb", b"ccc"], 1);
        append(&mut log, 1, &[b"dddd"], 4);
        let (server, mut socket) = serve(log.reader());

        let (header, body) = fetch(&mut socket, &request(0, 1 << 20, 0));
        assert_eq!(header.error, None);
        assert_eq!(header.request_id, 42);
        assert_eq!((header.first_offset, header.next_offset), (0, 4));
        assert_eq!((header.high_watermark, header.log_start), (4, 0));
        let records = payloads_of(&header, &body);
        assert_eq!(records[3], (3, b"dddd".to_vec()));

        // A small budget still returns one frame, then stays within it.
        let (header, body) = fetch(&mut socket, &request(1, 1, 0));
        assert_eq!(payloads_of(&header, &body), [(1, b"bb".to_vec())]);
        let (header, _) = fetch(&mut socket, &request(1, 2 * (HEADER_LEN as u32 + 3), 0));
        assert_eq!(header.record_count, 2);

        // Caught up with no wait: an empty answer at once.
        let (header, _) = fetch(&mut socket, &request(4, 1 << 20, 0));
        assert_eq!(
            (header.error, header.record_count, header.next_offset),
            (None, 0, 4)
        );

        // Beyond the end and unknown streams are errors.
        let (header, _) = fetch(&mut socket, &request(9, 1 << 20, 0));
        assert_eq!(header.error, Some(FetchErrorCode::OffsetOutOfRange));
        assert_eq!(header.high_watermark, 4);
        let unknown = FetchRequest {
            stream_id: 77,
            ..request(0, 100, 0)
        };
        let (header, _) = fetch(&mut socket, &unknown);
        assert_eq!(
            (header.error, header.record_count),
            (None, 0),
            "a stream with no data yet is empty"
        );

        assert_eq!(server.stats().requests.load(Ordering::Relaxed), 6);
        server.shutdown();
    }

    #[test]
    fn long_poll_answers_when_data_arrives_or_the_wait_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open_log(dir.path());
        append(&mut log, 1, &[b"first"], 1);
        let (server, mut socket) = serve(log.reader());

        let started = std::time::Instant::now();
        let (header, _) = fetch(&mut socket, &request(1, 1 << 20, 50));
        assert_eq!(header.record_count, 0);
        assert!(started.elapsed() >= Duration::from_millis(50));

        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            append(&mut log, 1, &[b"second"], 2);
            log
        });
        let started = std::time::Instant::now();
        let (header, body) = fetch(&mut socket, &request(1, 1 << 20, 10_000));
        let waited = started.elapsed();
        assert_eq!(payloads_of(&header, &body), [(1, b"second".to_vec())]);
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(server.stats().long_polls.load(Ordering::Relaxed), 2);
        drop(writer.join().unwrap());
        server.shutdown();
    }

    #[test]
    fn never_serves_beyond_the_readable_position() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open_log(dir.path());
        append(&mut log, 1, &[b"not yet written to disk"], 1);
        let reader = log.reader();
        let (server, mut socket) = serve(ShardedLogs::new(vec![reader], |stream| {
            (stream == 1).then_some(kaelix_protocol::DurabilityLevel::Flush)
        }));
        let (header, _) = fetch(&mut socket, &request(0, 1 << 20, 20));
        assert_eq!((header.record_count, header.high_watermark), (0, 0));
        let unknown = FetchRequest {
            stream_id: 2,
            ..request(0, 100, 0)
        };
        let (header, _) = fetch(&mut socket, &unknown);
        assert_eq!(header.error, Some(FetchErrorCode::UnknownStream));
        let mut flusher = log.flusher().unwrap();
        flusher.poll(0).unwrap();
        let (header, body) = fetch(&mut socket, &request(0, 1 << 20, 1000));
        assert_eq!(payloads_of(&header, &body).len(), 1);
        server.shutdown();
    }

    #[test]
    fn broker_logs_follow_streams_created_at_runtime_at_their_level() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open_log(dir.path());
        let (server, mut socket) = serve(broker_logs(vec![log.reader()]));
        let stream_5 = |from_offset| FetchRequest {
            stream_id: 5,
            ..request(from_offset, 1 << 20, 0)
        };
        // Not created yet: unknown, not an empty stream.
        let (header, _) = fetch(&mut socket, &stream_5(0));
        assert_eq!(header.error, Some(FetchErrorCode::UnknownStream));
        let (header, _) = fetch(
            &mut socket,
            &FetchRequest {
                stream_id: 77,
                ..request(0, 100, 0)
            },
        );
        assert_eq!(header.error, Some(FetchErrorCode::UnknownStream));

        // Created at runtime at the fsync level: served only once synced.
        log.create_stream(
            5,
            StreamConfig {
                durability: kaelix_protocol::DurabilityLevel::Fsync,
            },
        )
        .unwrap();
        append(&mut log, 5, &[b"durable only after fsync"], 1);
        append(&mut log, 1, &[b"memory level"], 1);
        let (header, _) = fetch(&mut socket, &stream_5(0));
        assert_eq!(
            (header.error, header.record_count),
            (None, 0),
            "appended but not synced: nothing served"
        );
        let (header, body) = fetch(&mut socket, &request(0, 1 << 20, 0));
        assert_eq!(payloads_of(&header, &body).len(), 1, "stream 1 is memory");
        let mut flusher = log.flusher().unwrap();
        flusher.poll(u64::MAX / 2).unwrap();
        assert!(log.positions().synced >= log.positions().appended);
        let (header, body) = fetch(&mut socket, &stream_5(0));
        assert_eq!(
            payloads_of(&header, &body),
            [(0, b"durable only after fsync".to_vec())]
        );

        // Deleted: unknown again.
        log.delete_stream(5).unwrap();
        let (header, _) = fetch(&mut socket, &stream_5(0));
        assert_eq!(header.error, Some(FetchErrorCode::UnknownStream));
        server.shutdown();
    }

    #[test]
    fn a_bad_request_is_answered_and_the_connection_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open_log(dir.path());
        let (server, mut socket) = serve(log.reader());
        socket.write_all(&[0xAB; FETCH_REQUEST_LEN]).unwrap();
        let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
        socket.read_exact(&mut head).unwrap();
        let header = FetchResponseHeader::decode(&head).unwrap();
        assert_eq!(header.error, Some(FetchErrorCode::BadRequest));
        let mut rest = Vec::new();
        assert_eq!(
            socket.read_to_end(&mut rest).unwrap(),
            0,
            "closed after the answer"
        );
        server.shutdown();
    }
}
