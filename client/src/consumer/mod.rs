//! Consumers: read a stream by offset, remotely over the TCP fetch protocol
//! or locally from the broker's mapped log, behind one API.
//!
//! ```text
//! let mut consumer = Consumer::remote(fetch_addr, ConsumerConfig::new(stream))?;
//! loop {
//!     for record in consumer.poll(100)? {
//!         let record = record?;
//!         // record.offset, record.producer_id, record.sequence, record.payload ...
//!     }
//! }
//! ```
//!
//! [`Consumer::poll`] returns at most `max` records borrowed from the
//! consumer (the remote response buffer, or the log mapping itself for a
//! local consumer: no copy). Each frame's CRC is checked as it is yielded.
//! The position advances record by record as the iterator is consumed, so
//! stopping early loses nothing. When nothing is readable, `poll` waits up
//! to `config.wait` (long-poll) and returns an empty batch.

#[cfg(test)]
mod cluster_tests;
mod local;
mod remote;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kaelix_protocol::{DurabilityLevel, FetchErrorCode, Frame, FrameError, FrameKind};

pub use local::LocalReader;
pub use remote::RemoteFetcher;

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartOffset {
    /// The oldest record still stored.
    #[default]
    Earliest,
    /// After the newest record (only what arrives from now on).
    Latest,
    /// This offset.
    At(u64),
}

/// Settings of a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Stream to read.
    pub stream_id: u32,
    /// Where to start.
    pub start: StartOffset,
    /// How long `poll` waits for data when caught up (zero: never wait).
    pub wait: Duration,
    /// Most frame bytes fetched or read at once.
    pub fetch_bytes_max: u32,
    /// Local consumers: serve records once durable at this level (remote
    /// consumers get what the broker serves: durable at the stream's level).
    pub level: DurabilityLevel,
    /// When the position was removed by retention, jump to the oldest
    /// stored record (counted in [`Consumer::skipped`]) instead of failing.
    pub reset_when_retained: bool,
}

impl ConsumerConfig {
    /// Defaults for `stream_id`: from the earliest record, waiting 500 ms per
    /// poll when caught up, 1 MiB per fetch.
    pub fn new(stream_id: u32) -> Self {
        Self {
            stream_id,
            start: StartOffset::Earliest,
            wait: Duration::from_millis(500),
            fetch_bytes_max: 1024 * 1024,
            level: DurabilityLevel::Memory,
            reset_when_retained: true,
        }
    }
}

/// One record of a stream, borrowed from the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Stream offset.
    pub offset: u64,
    /// Stream id.
    pub stream_id: u32,
    /// Producer that sent it.
    pub producer_id: u32,
    /// The producer's sequence for it.
    pub sequence: u64,
    /// The producer's timestamp, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// The message.
    pub payload: &'a [u8],
}

impl<'a> Record<'a> {
    /// Check the stored frame at the start of `bytes` (CRC included) and
    /// view it as a record; also returns the frame's length.
    fn parse(offset: u64, bytes: &'a [u8]) -> Result<(Self, usize), ConsumeError> {
        let frame =
            Frame::parse(bytes).map_err(|source| ConsumeError::Corrupt { offset, source })?;
        debug_assert_eq!(frame.kind(), FrameKind::Data);
        let record = Self {
            offset,
            stream_id: frame.stream_id(),
            producer_id: frame.producer_id(),
            sequence: frame.sequence(),
            timestamp_ns: frame.timestamp_ns(),
            payload: frame.payload(),
        };
        Ok((record, frame.len()))
    }
}

/// Why a consumer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// Connecting to or talking with the broker failed.
    #[error("fetch connection to {addr} failed")]
    Io {
        /// The broker's fetch address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The broker's answer did not decode.
    #[error("bad fetch response from {addr}: {reason}")]
    Protocol {
        /// The broker's fetch address.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The broker answered with an error.
    #[error("broker refused to serve stream {stream_id} from offset {offset}: {code}")]
    Broker {
        /// The stream.
        stream_id: u32,
        /// The offset asked for.
        offset: u64,
        /// The broker's reason.
        code: FetchErrorCode,
    },
    /// The position is past the stream's end (it shrank, or a seek went too far).
    #[error(
        "offset {requested} is beyond the end of stream {stream_id} (high watermark {high_watermark})"
    )]
    BeyondEnd {
        /// The stream.
        stream_id: u32,
        /// The offset asked for.
        requested: u64,
        /// One past the last readable offset.
        high_watermark: u64,
    },
    /// The position was removed by retention (and `reset_when_retained` is off).
    #[error(
        "offset {requested} of stream {stream_id} was removed by retention; oldest is {log_start}"
    )]
    Retained {
        /// The stream.
        stream_id: u32,
        /// The offset asked for.
        requested: u64,
        /// The oldest offset stored.
        log_start: u64,
    },
    /// A stored frame failed its check (CRC, length...).
    #[error("record at offset {offset} is corrupt")]
    Corrupt {
        /// Its offset.
        offset: u64,
        /// What was wrong.
        #[source]
        source: FrameError,
    },
    /// The local log could not be opened.
    #[error("local log {dir}: {reason}")]
    Local {
        /// The data directory.
        dir: std::path::PathBuf,
        /// What failed.
        reason: String,
    },
    /// Reading the local log failed.
    #[error("reading the local log failed")]
    Read(#[from] kaelix_storage::ReadError),
    /// A remote consumer was given no fetch address.
    #[error("no fetch address given: a remote consumer needs at least one")]
    NoFetchAddress,
}

/// Where a consumer's records come from.
#[derive(Debug)]
enum Source {
    Remote(RemoteFetcher),
    Local(LocalReader),
}

/// Reads one stream by offset; see the module docs.
#[derive(Debug)]
pub struct Consumer {
    source: Source,
    config: ConsumerConfig,
    position: u64,
    started: bool,
    skipped: u64,
}

impl Consumer {
    /// A consumer fetching over TCP from the broker's fetch port at `addr`.
    pub fn remote(addr: SocketAddr, config: ConsumerConfig) -> Result<Self, ConsumeError> {
        Self::remote_cluster(&[addr], config)
    }

    /// A consumer fetching over TCP from a cluster: `addrs` are the fetch
    /// ports of its brokers (leaders and followers serve fetches, a
    /// follower up to the commit position). It connects to the first that
    /// accepts; when the connection fails, or a broker answers `not_leader`
    /// or `unknown_stream`, the next one is asked, from the next offset not
    /// yet returned (each broker at most once per poll; when none serves,
    /// `poll` returns the last error and the next `poll` starts over).
    pub fn remote_cluster(
        addrs: &[SocketAddr],
        config: ConsumerConfig,
    ) -> Result<Self, ConsumeError> {
        let fetcher = RemoteFetcher::connect_any(addrs, config.stream_id)?;
        Ok(Self::with_source(Source::Remote(fetcher), config))
    }

    /// The fetch address a remote consumer reads from now (`None` for a local one).
    pub fn fetch_addr(&self) -> Option<SocketAddr> {
        match &self.source {
            Source::Remote(fetcher) => Some(fetcher.addr()),
            Source::Local(_) => None,
        }
    }

    /// Times a remote consumer moved to another broker.
    pub fn failovers(&self) -> u64 {
        match &self.source {
            Source::Remote(fetcher) => fetcher.failovers(),
            Source::Local(_) => 0,
        }
    }

    /// A consumer reading the broker's log on this host directly: the
    /// broker's data directory (`shard-N` subdirectories are resolved to the
    /// stream's shard) or one shard's log directory.
    pub fn local(data_dir: &Path, config: ConsumerConfig) -> Result<Self, ConsumeError> {
        let reader = LocalReader::open(data_dir, config.stream_id)?;
        Ok(Self::with_source(Source::Local(reader), config))
    }

    fn with_source(source: Source, config: ConsumerConfig) -> Self {
        Self {
            position: match config.start {
                StartOffset::At(offset) => offset,
                _ => 0,
            },
            started: matches!(config.start, StartOffset::At(_)),
            source,
            config,
            skipped: 0,
        }
    }

    /// The offset the next record will have (once the start was resolved).
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Records jumped over because retention removed them.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The stream read.
    pub fn stream_id(&self) -> u32 {
        self.config.stream_id
    }

    /// Continue from `offset`.
    pub fn seek(&mut self, offset: u64) {
        self.position = offset;
        self.started = true;
        if let Source::Remote(fetcher) = &mut self.source {
            fetcher.discard();
        }
    }

    /// The oldest stored offset and one past the newest readable one.
    pub fn watermarks(&mut self) -> Result<(u64, u64), ConsumeError> {
        match &mut self.source {
            Source::Remote(fetcher) => fetcher.watermarks(),
            Source::Local(reader) => reader.watermarks(self.config.level),
        }
    }

    /// Up to `max` records from the position on, waiting up to
    /// `config.wait` when none is readable yet (then the batch is empty).
    pub fn poll(&mut self, max: usize) -> Result<Records<'_>, ConsumeError> {
        self.poll_wait(max, self.config.wait)
    }

    /// [`Consumer::poll`] with an explicit wait.
    pub fn poll_wait(&mut self, max: usize, wait: Duration) -> Result<Records<'_>, ConsumeError> {
        if !self.started {
            let (log_start, high_watermark) = self.watermarks()?;
            self.position = match self.config.start {
                StartOffset::Latest => high_watermark,
                _ => log_start,
            };
            self.started = true;
        }
        let stream_id = self.config.stream_id;
        let max_bytes = self.config.fetch_bytes_max;
        // At most two tries: the second after jumping over retained records.
        for _ in 0..2 {
            let outcome = match &mut self.source {
                Source::Remote(fetcher) => fetcher.prepare(self.position, max_bytes, wait),
                Source::Local(reader) => {
                    reader.prepare(self.position, max_bytes, wait, self.config.level)
                }
            };
            match outcome {
                Err(ConsumeError::Retained { log_start, .. })
                    if self.config.reset_when_retained && log_start > self.position =>
                {
                    self.skipped += log_start - self.position;
                    self.position = log_start;
                }
                Err(err) => return Err(err),
                Ok(()) => break,
            }
        }
        let inner = match &mut self.source {
            Source::Remote(fetcher) => RecordsInner::Remote(fetcher.records(self.position)),
            Source::Local(reader) => RecordsInner::Local(reader.records(
                stream_id,
                self.position,
                max_bytes,
                self.config.level,
            )?),
        };
        Ok(Records {
            inner,
            position: &mut self.position,
            remaining: max,
            done: false,
        })
    }
}

#[derive(Debug)]
enum RecordsInner<'a> {
    Remote(remote::RemoteRecords<'a>),
    Local(local::LocalRecords<'a>),
}

/// The records of one [`Consumer::poll`], borrowed from the consumer.
/// Consuming a record moves the consumer's position past it.
#[derive(Debug)]
pub struct Records<'a> {
    inner: RecordsInner<'a>,
    position: &'a mut u64,
    remaining: usize,
    done: bool,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, ConsumeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.remaining == 0 {
            return None;
        }
        let next = match &mut self.inner {
            RecordsInner::Remote(records) => records.next(),
            RecordsInner::Local(records) => records.next(),
        };
        match next {
            Some(Ok(record)) => {
                debug_assert!(record.offset >= *self.position);
                *self.position = record.offset + 1;
                self.remaining -= 1;
                Some(Ok(record))
            }
            Some(Err(err)) => {
                self.done = true;
                Some(Err(err))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}
