//! The remote source: fetch requests over one blocking TCP connection, to
//! one broker of a list: when the connection fails (or the broker does not
//! serve the stream) the next broker is tried, from the same position.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kaelix_protocol::fetch::{FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN, FETCH_WAIT_MS_MAX};
use kaelix_protocol::{FetchErrorCode, FetchRequest, FetchResponseHeader};

use super::{ConsumeError, Record};

/// Slack on top of a request's wait before the socket read gives up.
const READ_SLACK: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause when a replica that was switched to is behind the position
/// (it serves up to its commit position, which may lag the former broker's).
const LAGGING_REPLICA_PAUSE: Duration = Duration::from_millis(20);

/// Send one request and read the response header.
fn exchange(
    socket: &mut TcpStream,
    request: &[u8],
    head: &mut [u8],
    timeout: Duration,
) -> std::io::Result<()> {
    socket.set_read_timeout(Some(timeout))?;
    socket.write_all(request)?;
    socket.read_exact(head)
}

/// Fetches one stream from a broker's fetch port, keeping the last
/// response's frames until they are consumed.
#[derive(Debug)]
pub struct RemoteFetcher {
    /// The brokers' fetch addresses, tried in turn.
    addrs: Vec<SocketAddr>,
    /// Index in `addrs` of the broker fetched from.
    current: usize,
    /// `addrs[current]`.
    addr: SocketAddr,
    /// Times the fetcher moved to another broker.
    failovers: u64,
    /// One past the highest offset any broker served: a position up to
    /// here is legitimate even where a replica does not serve it yet.
    served_end: u64,
    stream_id: u32,
    socket: Option<TcpStream>,
    request_id: u32,
    /// Frames of the last response.
    body: Vec<u8>,
    /// Byte in `body` where the unconsumed frames start.
    cursor: usize,
    /// Offset of the frame at `cursor`.
    offset: u64,
    /// Unconsumed frames in `body`.
    left: u32,
}

impl RemoteFetcher {
    /// Connect to the fetch port at `addr` for `stream_id`.
    pub fn connect(addr: SocketAddr, stream_id: u32) -> Result<Self, ConsumeError> {
        Self::connect_any(&[addr], stream_id)
    }

    /// Connect to the first of `addrs` (fetch ports of a cluster's brokers)
    /// that accepts, for `stream_id`. Later failures move to the next one.
    pub fn connect_any(addrs: &[SocketAddr], stream_id: u32) -> Result<Self, ConsumeError> {
        let mut list: Vec<SocketAddr> = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if !list.contains(&addr) {
                list.push(addr);
            }
        }
        let addr = *list.first().ok_or(ConsumeError::NoFetchAddress)?;
        let mut fetcher = Self {
            addrs: list,
            current: 0,
            addr,
            failovers: 0,
            served_end: 0,
            stream_id,
            socket: None,
            request_id: 0,
            body: Vec::new(),
            cursor: 0,
            offset: 0,
            left: 0,
        };
        let mut tries = fetcher.addrs.len();
        loop {
            match fetcher.socket() {
                Ok(_) => return Ok(fetcher),
                Err(err) if tries <= 1 => return Err(err),
                Err(_) => {
                    tries -= 1;
                    fetcher.fail_over();
                }
            }
        }
    }

    /// The fetch address in use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Times the fetcher moved to another broker.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Move to the next broker of the list (a new connection next time).
    fn fail_over(&mut self) {
        self.socket = None;
        self.discard();
        self.current = (self.current + 1) % self.addrs.len();
        self.addr = self.addrs[self.current];
        self.failovers += 1;
    }

    fn io_error(&mut self, source: std::io::Error) -> ConsumeError {
        // The connection's byte stream is in an unknown state: start afresh next time.
        self.socket = None;
        ConsumeError::Io {
            addr: self.addr,
            source,
        }
    }

    fn socket(&mut self) -> Result<&mut TcpStream, ConsumeError> {
        if self.socket.is_none() {
            let socket = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)
                .and_then(|socket| socket.set_nodelay(true).map(|()| socket))
                .map_err(|source| ConsumeError::Io {
                    addr: self.addr,
                    source,
                })?;
            self.socket = Some(socket);
        }
        Ok(self.socket.as_mut().expect("connected above"))
    }

    /// Forget buffered frames (after a seek).
    pub fn discard(&mut self) {
        self.left = 0;
        self.body.clear();
        self.cursor = 0;
    }

    /// One request/response exchange with a broker that serves the stream:
    /// on a failed connection, a garbled answer, or `not_leader` /
    /// `unknown_stream` (a broker without a replica of it), the next broker
    /// is asked, each at most once per call. The last outcome is returned
    /// when none serves.
    fn fetch(
        &mut self,
        from_offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<FetchResponseHeader, ConsumeError> {
        let mut tries = self.addrs.len();
        loop {
            let outcome = self.fetch_once(from_offset, max_bytes, wait);
            let elsewhere = match &outcome {
                Err(ConsumeError::Io { .. } | ConsumeError::Protocol { .. }) => true,
                Ok(header) => matches!(
                    header.error,
                    Some(FetchErrorCode::NotLeader | FetchErrorCode::UnknownStream)
                ),
                Err(_) => false,
            };
            if !elsewhere || tries <= 1 {
                return outcome;
            }
            tries -= 1;
            self.fail_over();
        }
    }

    /// One request/response exchange; the frames land in `self.body`.
    fn fetch_once(
        &mut self,
        from_offset: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<FetchResponseHeader, ConsumeError> {
        self.request_id = self.request_id.wrapping_add(1);
        let request = FetchRequest {
            request_id: self.request_id,
            stream_id: self.stream_id,
            from_offset,
            max_bytes,
            max_wait_ms: wait.as_millis().min(u128::from(FETCH_WAIT_MS_MAX)) as u32,
        };
        let mut request_bytes = [0u8; FETCH_REQUEST_LEN];
        request.encode(&mut request_bytes);
        let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
        let socket = self.socket()?;
        if let Err(source) = exchange(socket, &request_bytes, &mut head, wait + READ_SLACK) {
            return Err(self.io_error(source));
        }
        let header = FetchResponseHeader::decode(&head).map_err(|err| {
            self.socket = None;
            ConsumeError::Protocol {
                addr: self.addr,
                reason: err.to_string(),
            }
        })?;
        if header.request_id != request.request_id || header.stream_id != self.stream_id {
            self.socket = None;
            return Err(ConsumeError::Protocol {
                addr: self.addr,
                reason: format!(
                    "answer for request {} of stream {}, expected request {} of stream {}",
                    header.request_id, header.stream_id, request.request_id, self.stream_id
                ),
            });
        }
        self.body.clear();
        self.body.resize(header.byte_len as usize, 0);
        let socket = self.socket.as_mut().expect("the exchange kept it");
        if let Err(source) = socket.read_exact(&mut self.body) {
            return Err(self.io_error(source));
        }
        self.cursor = 0;
        self.offset = header.first_offset;
        self.left = header.record_count;
        Ok(header)
    }

    /// Make frames from `position` available: the buffered ones if they
    /// start there, else a new fetch (waiting up to `wait`).
    pub fn prepare(
        &mut self,
        position: u64,
        max_bytes: u32,
        wait: Duration,
    ) -> Result<(), ConsumeError> {
        if self.left > 0 && self.offset == position {
            return Ok(());
        }
        let header = self.fetch(position, max_bytes, wait)?;
        match header.error {
            None => {
                self.served_end = self
                    .served_end
                    .max(header.first_offset + u64::from(header.record_count));
                Ok(())
            }
            Some(FetchErrorCode::OffsetOutOfRange)
                if position > header.high_watermark && position <= self.served_end =>
            {
                // Another broker served up to here: this replica's commit
                // position is behind. Nothing to read yet.
                std::thread::sleep(wait.min(LAGGING_REPLICA_PAUSE));
                Ok(())
            }
            Some(FetchErrorCode::OffsetOutOfRange) if position < header.log_start => {
                Err(ConsumeError::Retained {
                    stream_id: self.stream_id,
                    requested: position,
                    log_start: header.log_start,
                })
            }
            Some(FetchErrorCode::OffsetOutOfRange) => Err(ConsumeError::BeyondEnd {
                stream_id: self.stream_id,
                requested: position,
                high_watermark: header.high_watermark,
            }),
            Some(code) => Err(ConsumeError::Broker {
                stream_id: self.stream_id,
                offset: position,
                code,
            }),
        }
    }

    /// The oldest stored offset and one past the newest readable one, as
    /// the broker reports them for an out-of-range fetch.
    pub fn watermarks(&mut self) -> Result<(u64, u64), ConsumeError> {
        self.discard();
        let header = self.fetch(u64::MAX, 0, Duration::ZERO)?;
        match header.error {
            None | Some(FetchErrorCode::OffsetOutOfRange) => {
                Ok((header.log_start, header.high_watermark))
            }
            Some(code) => Err(ConsumeError::Broker {
                stream_id: self.stream_id,
                offset: u64::MAX,
                code,
            }),
        }
    }

    /// The buffered frames from `position` (set up by `prepare`).
    pub(super) fn records(&mut self, position: u64) -> RemoteRecords<'_> {
        if self.offset != position {
            self.left = 0;
        }
        RemoteRecords {
            body: &self.body,
            cursor: &mut self.cursor,
            offset: &mut self.offset,
            left: &mut self.left,
        }
    }
}

/// Walks the buffered response, moving the fetcher's cursor along.
#[derive(Debug)]
pub(super) struct RemoteRecords<'a> {
    body: &'a [u8],
    cursor: &'a mut usize,
    offset: &'a mut u64,
    left: &'a mut u32,
}

impl<'a> Iterator for RemoteRecords<'a> {
    type Item = Result<Record<'a>, ConsumeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if *self.left == 0 {
            return None;
        }
        let body: &'a [u8] = self.body;
        match Record::parse(*self.offset, &body[*self.cursor..]) {
            Ok((record, len)) => {
                *self.cursor += len;
                *self.offset += 1;
                *self.left -= 1;
                Some(Ok(record))
            }
            Err(err) => {
                // Do not serve the rest of a response that failed a check.
                *self.left = 0;
                Some(Err(err))
            }
        }
    }
}
