//! The remote consumer against fake fetch servers on loopback playing a
//! cluster's brokers: one dies mid-stream, one lags behind the position.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use kaelix_protocol::fetch::{FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN};
use kaelix_protocol::{DatagramBuilder, FetchErrorCode, FetchRequest, FetchResponseHeader};

use super::{Consumer, ConsumerConfig, StartOffset};

const STREAM: u32 = 3;
/// Records per response (small, so a stream takes several fetches).
const BATCH: u64 = 7;

fn frame(offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 256];
    let mut builder = DatagramBuilder::new(&mut buf);
    let payload = format!("record {offset}");
    builder
        .push_data(STREAM, 5, offset + 1, 0, payload.as_bytes())
        .unwrap();
    let len = builder.len();
    buf.truncate(len);
    buf
}

struct Shared {
    /// Serves offsets below this.
    high_watermark: AtomicU64,
    /// Responses left before the server dies (u64::MAX: never).
    responses_left: AtomicU64,
    alive: AtomicBool,
    stop: AtomicBool,
}

/// A fetch server holding `STREAM`'s records 0..1000 (each the same on
/// every replica), serving those below its high watermark.
struct FakeFetchServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeFetchServer {
    fn spawn(high_watermark: u64, dies_after: Option<u64>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            high_watermark: AtomicU64::new(high_watermark),
            responses_left: AtomicU64::new(dies_after.unwrap_or(u64::MAX)),
            alive: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || serve(listener, &shared))
        };
        Self {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    fn set_high_watermark(&self, high_watermark: u64) {
        self.shared
            .high_watermark
            .store(high_watermark, Ordering::Release);
    }
}

impl Drop for FakeFetchServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: TcpListener, shared: &Shared) {
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::Acquire) {
        let Some(accepting) = &listener else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        match accepting.accept() {
            Ok((socket, _)) => {
                serve_connection(socket, shared);
                if !shared.alive.load(Ordering::Acquire) {
                    // Dead: nobody connects any more.
                    listener = None;
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
}

fn serve_connection(mut socket: TcpStream, shared: &Shared) {
    socket.set_nonblocking(false).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut request = [0u8; FETCH_REQUEST_LEN];
    let mut have = 0;
    while !shared.stop.load(Ordering::Acquire) {
        match socket.read(&mut request[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(_) => return,
        }
        if have < FETCH_REQUEST_LEN {
            continue;
        }
        have = 0;
        if shared.responses_left.load(Ordering::Acquire) == 0 {
            // The process dies: the connection closes unanswered.
            shared.alive.store(false, Ordering::Release);
            return;
        }
        shared.responses_left.fetch_sub(1, Ordering::AcqRel);
        let request = FetchRequest::decode(&request).unwrap();
        let high_watermark = shared.high_watermark.load(Ordering::Acquire);
        let from = request.from_offset;
        let (header, body) = if from > high_watermark {
            let header = FetchResponseHeader::error(
                &request,
                FetchErrorCode::OffsetOutOfRange,
                high_watermark,
                0,
            );
            (header, Vec::new())
        } else {
            let end = high_watermark.min(from + BATCH);
            let body: Vec<u8> = (from..end).flat_map(frame).collect();
            let header = FetchResponseHeader::ok(
                &request,
                from,
                (end - from) as u32,
                body.len() as u32,
                high_watermark,
                0,
            );
            (header, body)
        };
        let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
        header.encode(&mut head);
        if socket
            .write_all(&head)
            .and_then(|()| socket.write_all(&body))
            .is_err()
        {
            return;
        }
    }
}

fn config() -> ConsumerConfig {
    ConsumerConfig {
        start: StartOffset::Earliest,
        wait: Duration::ZERO,
        ..ConsumerConfig::new(STREAM)
    }
}

/// Poll until the position reaches `until`, checking every record is the
/// next offset with its own payload. Returns the empty polls seen.
fn read_until(consumer: &mut Consumer, next: &mut u64, until: u64) -> u64 {
    let mut empty = 0;
    while *next < until {
        assert!(empty < 10_000, "stuck at {next}");
        let mut got = 0;
        for record in consumer.poll(100).expect("poll") {
            let record = record.expect("a valid record");
            assert_eq!(record.offset, *next, "each offset once, in order");
            assert_eq!(record.payload, format!("record {next}").as_bytes());
            *next += 1;
            got += 1;
        }
        if got == 0 {
            empty += 1;
        }
    }
    empty
}

#[test]
fn a_broker_dying_mid_stream_is_replaced_by_the_next_from_the_next_offset() {
    // The first broker answers 4 fetches (the start's watermark query and
    // three batches of 7), then dies: the next request goes unanswered.
    let first = FakeFetchServer::spawn(100, Some(4));
    let second = FakeFetchServer::spawn(100, None);
    let mut consumer = Consumer::remote_cluster(&[first.addr, second.addr], config()).unwrap();
    assert_eq!(consumer.fetch_addr(), Some(first.addr));
    let mut next = 0;
    read_until(&mut consumer, &mut next, 100);
    assert_eq!(consumer.fetch_addr(), Some(second.addr));
    assert_eq!(consumer.failovers(), 1);
}

#[test]
fn a_dead_first_broker_is_skipped_at_connect() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let live = FakeFetchServer::spawn(20, None);
    let mut consumer = Consumer::remote_cluster(&[dead_addr, live.addr], config()).unwrap();
    assert_eq!(consumer.fetch_addr(), Some(live.addr));
    let mut next = 0;
    read_until(&mut consumer, &mut next, 20);
    // Alone, the dead broker is an error naming it.
    let err = Consumer::remote_cluster(&[dead_addr], config()).unwrap_err();
    assert!(err.to_string().contains(&dead_addr.to_string()), "{err}");
    assert!(matches!(
        Consumer::remote_cluster(&[], config()),
        Err(super::ConsumeError::NoFetchAddress)
    ));
}

#[test]
fn a_replica_behind_the_position_is_waited_for_not_an_error() {
    // The leader served 0..50 and dies; the follower's commit is at 30.
    let leader = FakeFetchServer::spawn(50, Some(1 + 50_u64.div_ceil(BATCH)));
    let follower = FakeFetchServer::spawn(30, None);
    let mut consumer = Consumer::remote_cluster(&[leader.addr, follower.addr], config()).unwrap();
    let mut next = 0;
    read_until(&mut consumer, &mut next, 50);
    // Position 50 is beyond the follower's 30: empty polls, no error, no rewind.
    for _ in 0..3 {
        assert_eq!(consumer.poll(100).expect("poll").count(), 0);
    }
    assert_eq!(consumer.fetch_addr(), Some(follower.addr));
    assert_eq!(consumer.position(), 50);
    follower.set_high_watermark(80);
    read_until(&mut consumer, &mut next, 80);
}
