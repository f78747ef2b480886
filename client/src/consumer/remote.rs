//! The remote source: fetch requests over one blocking TCP connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use kaelix_protocol::fetch::{FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN, FETCH_WAIT_MS_MAX};
use kaelix_protocol::{FetchErrorCode, FetchRequest, FetchResponseHeader};

use super::{ConsumeError, Record};

/// Slack on top of a request's wait before the socket read gives up.
const READ_SLACK: Duration = Duration::from_secs(30);

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
    addr: SocketAddr,
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
        let mut fetcher = Self {
            addr,
            stream_id,
            socket: None,
            request_id: 0,
            body: Vec::new(),
            cursor: 0,
            offset: 0,
            left: 0,
        };
        fetcher.socket()?;
        Ok(fetcher)
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
            let socket = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))
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

    /// One request/response exchange; the frames land in `self.body`.
    fn fetch(
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
            None => Ok(()),
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
