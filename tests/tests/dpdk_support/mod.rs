//! Shared by the `dpdk_*` tests.
//!
//! DPDK's EAL starts once per process and cannot be restarted, so every test
//! that starts it runs its DPDK side in a child process: this test binary
//! run again with `--exact <test>` and [`ROLE_ENV`] set, optionally inside a
//! network namespace (`ip netns exec`). The child prints `KX key=value ...`
//! lines on stdout; the parent reads them with [`Child::report`] and asserts.
//!
//! Producer and receiver here speak the kaelix protocol the way the client
//! and the broker do: DATA frames with consecutive sequences, cumulative
//! ACKs with a credit window, HEARTBEATs to ask for the current ACK state.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kaelix_dataplane::{Backend, Peer};
use kaelix_protocol::{
    AckBody, Datagram, DatagramBuilder, DurabilityLevel, FrameFields, FrameKind,
};

/// Environment variable naming the role of a child process.
pub const ROLE_ENV: &str = "KX_DPDK_ROLE";
/// Stream and producer of the test traffic.
pub const STREAM_ID: u32 = 1;
/// Producer id of the test traffic.
pub const PRODUCER_ID: u32 = 7;
/// Bytes of payload per DATA frame.
pub const PAYLOAD_LEN: usize = 24;

/// The role this process was started in, if it is a child.
pub fn child_role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// A required environment variable of a child, parsed.
pub fn env<T: std::str::FromStr>(name: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    let value = std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"));
    value
        .parse()
        .unwrap_or_else(|err| panic!("{name}={value}: {err:?}"))
}

/// Print one report line for the parent. The first pair must be `event`.
pub fn report(pairs: &[(&str, String)]) {
    assert_eq!(pairs.first().map(|(key, _)| *key), Some("event"));
    let line: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    println!("KX {}", line.join(" "));
}

/// Serialises the DPDK tests of one binary: two EALs (and two traffic
/// generators) at once on a two-core machine measure nothing and race for
/// /var/run/dpdk.
pub fn dpdk_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A child process running one role of `test`; killed when dropped.
#[derive(Debug)]
pub struct Child {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Everything the child printed so far (for failure messages).
    pub output: Vec<String>,
    reports: Vec<HashMap<String, String>>,
}

impl Child {
    /// Run this test binary's `test` with `role`, inside `netns` when given,
    /// with extra environment `envs`.
    pub fn spawn(test: &str, role: &str, netns: Option<&str>, envs: &[(&str, String)]) -> Self {
        let exe = std::env::current_exe().expect("test binary path");
        let mut command = match netns {
            Some(ns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", ns]).arg(&exe);
                command
            }
            None => Command::new(&exe),
        };
        command
            .args([
                "--exact",
                test,
                "--nocapture",
                "--include-ignored",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, role)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawning {command:?}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            output: Vec::new(),
            reports: Vec::new(),
        }
    }

    /// The process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `timeout` for a report line whose first key is `first_key`.
    pub fn wait_report(&mut self, first_key: &str, timeout: Duration) -> HashMap<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .reports
                .iter()
                .position(|report| report.get("event").is_some_and(|event| event == first_key))
            {
                return self.reports.remove(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.take_line(line),
                Err(_) => panic!(
                    "child {} sent no `{first_key}` report within {timeout:?}; its output:\n{}",
                    self.child.id(),
                    self.output.join("\n")
                ),
            }
        }
    }

    fn take_line(&mut self, line: String) {
        // libtest may print "test <name> ... " in front of the child's first line.
        if let Some(at) = line.find("KX event=") {
            let rest = &line[at + 3..];
            let report = rest
                .split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            self.reports.push(report);
        }
        self.output.push(line);
    }

    /// Wait for the child to exit (killing it after `timeout`); panics when
    /// it failed, with its output.
    pub fn finish(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the child") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("reaping the killed child");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF; collect what it has.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.take_line(line);
        }
        assert!(
            status.success(),
            "child {} failed ({status}); its output:\n{}",
            self.child.id(),
            self.output.join("\n")
        );
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The EAL runtime directory a child used (as root: `/var/run/dpdk/kaelix-<pid>`).
pub fn runtime_dir_of(pid: u32) -> std::path::PathBuf {
    std::path::Path::new("/var/run/dpdk").join(format!("kaelix-{pid}"))
}

/// One run against a DPDK child: spawn `role` of `test` inside network
/// namespace `ns` with `envs`, wait for its `ready` report, run `produce`
/// (the producer, in the other namespace), wait for its `event` report and
/// its exit, and check its EAL runtime directory is gone. Returns what the
/// producer did and the child's report.
pub fn run_against_child(
    test: &str,
    role: &str,
    ns: &str,
    envs: &[(&str, String)],
    event: &str,
    produce: impl FnOnce() -> Sent,
) -> (Sent, HashMap<String, String>) {
    const TIMEOUT: Duration = Duration::from_secs(120);
    let mut child = Child::spawn(test, role, Some(ns), envs);
    child.wait_report("ready", TIMEOUT);
    let sent = produce();
    let report = child.wait_report(event, TIMEOUT);
    child.finish(TIMEOUT);
    let runtime_dir = runtime_dir_of(child.pid());
    assert!(
        !runtime_dir.exists(),
        "{} was left behind",
        runtime_dir.display()
    );
    (sent, report)
}

/// The windowed producer: bind `from`, send HEARTBEATs until `to` answers
/// (ARP gets resolved on the way), then send `count` frames, one per
/// datagram, at most `window` unacknowledged.
pub fn produce_windowed(from: SocketAddr, to: SocketAddr, count: u64, window: u64) -> Sent {
    let socket = UdpSocket::bind(from).expect("producer socket");
    wait_for_receiver(&socket, to, Duration::from_secs(10));
    send_windowed(&socket, to, count, 1, window, Duration::from_secs(10))
}

/// A report value, parsed.
pub fn get<T: std::str::FromStr>(report: &HashMap<String, String>, key: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    let value = report
        .get(key)
        .unwrap_or_else(|| panic!("report {report:?} has no {key}"));
    value
        .parse()
        .unwrap_or_else(|err| panic!("{key}={value}: {err:?}"))
}

/// Pin the calling thread to `cpu` (when the machine has it).
pub fn pin_to(cpu: usize) {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) <= cpu {
        return;
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).expect("sched_setaffinity");
}

/// The payload of DATA frame `sequence`: derived from it, so the receiver
/// can check it beyond the CRC.
pub fn payload_of(sequence: u64) -> [u8; PAYLOAD_LEN] {
    let mut payload = [0u8; PAYLOAD_LEN];
    payload[..8].copy_from_slice(&sequence.to_le_bytes());
    payload[8..16].copy_from_slice(&(!sequence).to_le_bytes());
    payload[16..].copy_from_slice(&sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    payload
}

/// What a receiver saw.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Valid DATA frames (with duplicates).
    pub frames: u64,
    /// DATA frames whose sequence was seen before.
    pub duplicates: u64,
    /// Frames that failed to parse (CRC, length) or carried the wrong payload.
    pub bad: u64,
    /// Datagrams delivered by the backend.
    pub datagrams: u64,
    /// HEARTBEAT frames among them.
    pub heartbeats: u64,
    /// Highest sequence up to which every frame arrived.
    pub contiguous: u64,
    /// ACK datagrams sent.
    pub acks_sent: u64,
    /// From the first to the last datagram.
    pub elapsed: Duration,
}

/// How [`receive`] runs.
#[derive(Debug, Clone, Copy)]
pub struct ReceiveSpec {
    /// Sequences `1..=expected` are expected.
    pub expected: u64,
    /// Answer progress with cumulative ACKs granting this credit. HEARTBEATs
    /// are always answered (credit 0 without a window).
    pub ack_window: Option<u32>,
    /// Once every frame arrived, keep receiving this long (to catch duplicates).
    pub linger: Duration,
    /// Stop when traffic has started and then paused this long (open-loop runs).
    pub idle_end: Option<Duration>,
    /// Stop after this long in any case.
    pub timeout: Duration,
}

/// Receive DATA frames through `backend`, checking each frame's CRC (the
/// protocol parser does) and payload and counting duplicates; see
/// [`ReceiveSpec`] for acknowledgements and when it returns.
pub fn receive<B: Backend>(backend: &mut B, spec: ReceiveSpec) -> Received {
    let expected = spec.expected;
    let words = usize::try_from(expected / 64 + 1).expect("fits memory");
    let mut seen = vec![0u64; words];
    let mut got = Received::default();
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut peer: Option<Peer> = None;
    loop {
        let mut heartbeat = false;
        let before = got.contiguous;
        let frames_before = got.frames;
        let delivered = backend
            .recv_batch(&mut |payload, from| {
                got.datagrams += 1;
                peer = Some(*from);
                for frame in Datagram::new(payload).frames() {
                    let Ok(frame) = frame else {
                        got.bad += 1;
                        continue;
                    };
                    match frame.kind() {
                        FrameKind::Data => {
                            let sequence = frame.sequence();
                            if sequence == 0
                                || sequence > expected
                                || frame.payload() != payload_of(sequence)
                            {
                                got.bad += 1;
                                continue;
                            }
                            got.frames += 1;
                            let (word, bit) = ((sequence / 64) as usize, sequence % 64);
                            if seen[word] & (1 << bit) != 0 {
                                got.duplicates += 1;
                            }
                            seen[word] |= 1 << bit;
                        }
                        FrameKind::Heartbeat => {
                            heartbeat = true;
                            got.heartbeats += 1;
                        }
                        FrameKind::Ack | FrameKind::Error => got.bad += 1,
                    }
                }
            })
            .expect("recv_batch");
        let now = Instant::now();
        if got.frames > frames_before {
            first.get_or_insert(now);
            last = now;
        }
        while got.contiguous < expected {
            let next = got.contiguous + 1;
            if seen[(next / 64) as usize] & (1 << (next % 64)) == 0 {
                break;
            }
            got.contiguous = next;
        }
        let progress = spec.ack_window.is_some() && got.contiguous > before;
        if let Some(to) = peer
            && (heartbeat || progress)
        {
            let window = spec.ack_window.unwrap_or(0);
            let contiguous = got.contiguous;
            let queued = backend
                .queue_tx(&to, &mut |buf| {
                    let mut builder = DatagramBuilder::new(buf);
                    builder
                        .push_ack(
                            STREAM_ID,
                            PRODUCER_ID,
                            contiguous,
                            0,
                            &AckBody::new(window, DurabilityLevel::Memory, u64::MAX),
                        )
                        .expect("an ACK fits any reply buffer");
                    builder.len()
                })
                .expect("queue_tx");
            if queued {
                got.acks_sent += 1;
            }
            backend.flush_tx().expect("flush_tx");
        }
        let complete = got.contiguous == expected && now.duration_since(last) >= spec.linger;
        let paused = spec
            .idle_end
            .is_some_and(|idle| first.is_some() && now.duration_since(last) >= idle);
        if complete || paused || now.duration_since(started) >= spec.timeout {
            break;
        }
        if delivered == 0 {
            std::hint::spin_loop();
        }
    }
    got.elapsed = first.map_or(Duration::ZERO, |first| last.duration_since(first));
    got
}

/// Report lines for what a receiver saw (`event` first).
pub fn received_report(event: &str, got: &Received) -> Vec<(&'static str, String)> {
    vec![
        ("event", event.to_owned()),
        ("frames", got.frames.to_string()),
        ("duplicates", got.duplicates.to_string()),
        ("bad", got.bad.to_string()),
        ("datagrams", got.datagrams.to_string()),
        ("heartbeats", got.heartbeats.to_string()),
        ("contiguous", got.contiguous.to_string()),
        ("acks_sent", got.acks_sent.to_string()),
        ("elapsed_us", got.elapsed.as_micros().to_string()),
    ]
}

/// What a producer did.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// DATA frames sent.
    pub frames: u64,
    /// Datagrams sent.
    pub datagrams: u64,
    /// Highest sequence acknowledged.
    pub acked: u64,
    /// From the first DATA frame to the last ACK (windowed) or the last send (open loop).
    pub elapsed: Duration,
}

fn ack_of(buf: &[u8]) -> Option<u64> {
    Datagram::new(buf)
        .frames()
        .filter_map(Result::ok)
        .filter(|frame| frame.kind() == FrameKind::Ack && frame.producer_id() == PRODUCER_ID)
        .map(|frame| frame.sequence())
        .max()
}

/// Send HEARTBEATs to `to` until something answers with an ACK (this also
/// gets ARP resolved before any data is sent). Panics after `timeout`.
pub fn wait_for_receiver(socket: &UdpSocket, to: SocketAddr, timeout: Duration) {
    let mut buf = [0u8; 2048];
    let mut heartbeat = [0u8; 64];
    let fields = FrameFields {
        kind: FrameKind::Heartbeat,
        ..FrameFields::data(STREAM_ID, PRODUCER_ID, 0, 0)
    };
    let len = kaelix_protocol::encode_frame(&mut heartbeat, &fields, &[]).expect("heartbeat fits");
    socket.set_nonblocking(true).expect("nonblocking socket");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        socket
            .send_to(&heartbeat[..len], to)
            .expect("sending a heartbeat");
        let wait_until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < wait_until {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if ack_of(&buf[..n]).is_some() => return,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(err) => panic!("receiving from {to}: {err}"),
            }
        }
    }
    panic!("no ACK from {to} within {timeout:?}");
}

/// Send DATA frames `1..=count`, `per_datagram` to a datagram, keeping at
/// most `window` frames beyond the acknowledged one in flight; returns when
/// all are acknowledged. Panics when the ACKs stop advancing for `stall`.
pub fn send_windowed(
    socket: &UdpSocket,
    to: SocketAddr,
    count: u64,
    per_datagram: u64,
    window: u64,
    stall: Duration,
) -> Sent {
    socket.set_nonblocking(true).expect("nonblocking socket");
    let mut out = vec![0u8; 65_536];
    let mut buf = [0u8; 2048];
    let mut sent = Sent::default();
    let mut next = 1u64;
    let started = Instant::now();
    let mut progress = Instant::now();
    while sent.acked < count {
        if next <= count && next - 1 - sent.acked + per_datagram <= window {
            let mut builder = DatagramBuilder::new(&mut out);
            let last = (next + per_datagram - 1).min(count);
            for sequence in next..=last {
                builder
                    .push_data(STREAM_ID, PRODUCER_ID, sequence, 0, &payload_of(sequence))
                    .expect("frame fits");
            }
            socket
                .send_to(builder.as_bytes(), to)
                .expect("sending data");
            sent.frames += last + 1 - next;
            sent.datagrams += 1;
            next = last + 1;
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => {
                if let Some(acked) = ack_of(&buf[..n])
                    && acked > sent.acked
                {
                    sent.acked = acked;
                    progress = Instant::now();
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    progress.elapsed() < stall,
                    "ACKs stalled at {} with {} frames sent (nothing retransmits: a lost frame is a failure)",
                    sent.acked,
                    sent.frames
                );
                std::thread::yield_now();
            }
            Err(err) => panic!("receiving ACKs: {err}"),
        }
    }
    sent.elapsed = started.elapsed();
    sent
}

/// Send DATA frames as fast as the socket takes them for `duration`,
/// `per_datagram` to a datagram, 64 datagrams per `sendmmsg`, without
/// waiting for ACKs.
pub fn send_open_loop(
    socket: &UdpSocket,
    to: SocketAddr,
    per_datagram: u64,
    duration: Duration,
) -> Sent {
    use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, sendmmsg};
    use std::io::IoSlice;

    const BATCH: usize = 64;
    socket.connect(to).expect("connecting the producer socket");
    socket.set_nonblocking(false).expect("blocking socket");
    let datagram_len =
        usize::try_from(per_datagram).expect("small") * (kaelix_protocol::HEADER_LEN + PAYLOAD_LEN);
    let mut out = vec![0u8; BATCH * datagram_len];
    let mut sent = Sent::default();
    let mut next = 1u64;
    let started = Instant::now();
    while started.elapsed() < duration {
        let mut first_of_batch = next;
        for chunk in out.chunks_exact_mut(datagram_len) {
            let mut builder = DatagramBuilder::new(chunk);
            for sequence in first_of_batch..first_of_batch + per_datagram {
                builder
                    .push_data(STREAM_ID, PRODUCER_ID, sequence, 0, &payload_of(sequence))
                    .expect("frame fits");
            }
            first_of_batch += per_datagram;
        }
        let iovs: Vec<[IoSlice<'_>; 1]> = out
            .chunks_exact(datagram_len)
            .map(|chunk| [IoSlice::new(chunk)])
            .collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..BATCH).map(|_| SendAncillaryBuffer::default()).collect();
        let mut messages: Vec<MMsgHdr<'_>> = iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, control)| MMsgHdr::new(iov, control))
            .collect();
        match sendmmsg(socket, &mut messages, SendFlags::empty()) {
            Ok(count) => {
                // Datagrams past `count` were not sent: their sequences are reused.
                let count = count as u64;
                sent.frames += count * per_datagram;
                sent.datagrams += count;
                next += count * per_datagram;
            }
            // The veth has no qdisc: a full peer backlog refuses datagrams.
            Err(err) if err == rustix::io::Errno::NOBUFS || err == rustix::io::Errno::AGAIN => {}
            Err(err) => panic!("sendmmsg: {err}"),
        }
    }
    sent.elapsed = started.elapsed();
    sent
}
