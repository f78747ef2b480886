//! Shared by the `xdp_*` tests: the root check, a veth pair between two
//! network namespaces the test creates (removed on every exit path), running
//! code inside a namespace, and synthetic frames.
//!
//! Traffic only ever flows between the two ends of the pair, whose 10.x
//! addresses exist only inside those namespaces.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kaelix_dataplane::LinkPeer;
use kaelix_dataplane::af_xdp::packet;
use kaelix_ebpf::attached_program_id;

/// True when running as root; otherwise prints one loud line naming the test and returns false.
pub fn require_root(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "SKIPPED {test}: needs root (BPF, AF_XDP, network namespaces); CI runs as root, so it runs there"
    );
    false
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("running {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `ip` with arguments; panics with its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    String::from_utf8_lossy(&run(Command::new("ip").args(args)).stdout).into_owned()
}

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair: `a` (the client side,
/// 10.213.N.1) and `b` (the broker side, 10.213.N.2). Dropping it deletes
/// both namespaces, which deletes the pair.
#[derive(Debug)]
pub struct VethPair {
    /// Namespace of the client end.
    pub ns_a: String,
    /// Namespace of the broker end.
    pub ns_b: String,
    /// Interface in `ns_a`.
    pub if_a: String,
    /// Interface in `ns_b`.
    pub if_b: String,
    /// Address of `if_a`.
    pub ip_a: Ipv4Addr,
    /// Address of `if_b`.
    pub ip_b: Ipv4Addr,
    created: Vec<String>,
}

impl VethPair {
    /// Create the namespaces and the pair, addressed and up. Names are unique
    /// per process and call.
    pub fn create() -> Self {
        let n = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let subnet = u8::try_from(n % 250).expect("below 250");
        let mut pair = VethPair {
            ns_a: format!("kx{pid}-{n}a"),
            ns_b: format!("kx{pid}-{n}b"),
            if_a: format!("kxa{pid}x{n}"),
            if_b: format!("kxb{pid}x{n}"),
            ip_a: Ipv4Addr::new(10, 213, subnet, 1),
            ip_b: Ipv4Addr::new(10, 213, subnet, 2),
            created: Vec::new(),
        };
        assert!(
            pair.if_a.len() < 16,
            "interface name {} too long",
            pair.if_a
        );
        for ns in [pair.ns_a.clone(), pair.ns_b.clone()] {
            ip(&["netns", "add", &ns]);
            pair.created.push(ns);
        }
        let (ns_a, ns_b, if_a, if_b) = (&pair.ns_a, &pair.ns_b, &pair.if_a, &pair.if_b);
        ip(&[
            "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
        ]);
        ip(&[
            "-n",
            ns_a,
            "addr",
            "add",
            &format!("{}/24", pair.ip_a),
            "dev",
            if_a,
        ]);
        ip(&[
            "-n",
            ns_b,
            "addr",
            "add",
            &format!("{}/24", pair.ip_b),
            "dev",
            if_b,
        ]);
        for (ns, ifname) in [(ns_a, if_a), (ns_b, if_b)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", ifname, "up"]);
        }
        pair
    }

    /// Set the MTU of both ends.
    pub fn set_mtu(&self, mtu: u32) {
        let mtu = mtu.to_string();
        ip(&["-n", &self.ns_a, "link", "set", &self.if_a, "mtu", &mtu]);
        ip(&["-n", &self.ns_b, "link", "set", &self.if_b, "mtu", &mtu]);
    }

    /// Run a shell command inside a namespace (`ip netns exec`, which also
    /// remounts /sys for it).
    pub fn sh(&self, ns: &str, script: &str) -> String {
        String::from_utf8_lossy(
            &run(Command::new("ip").args(["netns", "exec", ns, "sh", "-c", script])).stdout,
        )
        .into_owned()
    }

    /// `ip -d link show` of the broker end.
    pub fn link_b(&self) -> String {
        ip(&["-d", "-n", &self.ns_b, "link", "show", "dev", &self.if_b])
    }

    /// Run `f` on a new thread that has moved into namespace `ns`.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{ns}");
        thread::spawn(move || {
            enter_netns(&path);
            f()
        })
    }

    /// Run `f` inside namespace `ns` and wait for it.
    pub fn in_ns<T: Send + 'static>(&self, ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(ns, f)
            .join()
            .expect("namespace thread panicked")
    }
}

/// Move the calling thread into the network namespace bound at `path`.
pub fn enter_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|err| panic!("opening {path}: {err}"));
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|err| panic!("setns({path}): {err}"));
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            let status = Command::new("ip").args(["netns", "del", &ns]).status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("warning: could not delete network namespace {ns}: {status:?}");
            }
        }
    }
}

/// A producer's addresses for synthetic frames (IPv4).
pub fn producer_v4() -> LinkPeer {
    LinkPeer {
        remote_mac: [0x02, 0, 0, 0, 0, 0x02],
        local_mac: [0x02, 0, 0, 0, 0, 0x01],
        remote_ip: Ipv4Addr::new(10, 213, 250, 2).into(),
        local_ip: Ipv4Addr::new(10, 213, 250, 1).into(),
        remote_port: 7000,
        local_port: 40_000,
        queue: 0,
    }
}

/// The same with IPv6 addresses (used only in BPF_PROG_TEST_RUN, never sent).
pub fn producer_v6() -> LinkPeer {
    LinkPeer {
        remote_ip: "fd00:6b78::2".parse::<std::net::Ipv6Addr>().unwrap().into(),
        local_ip: "fd00:6b78::1".parse::<std::net::Ipv6Addr>().unwrap().into(),
        ..producer_v4()
    }
}

/// An Ethernet frame carrying `payload` over UDP from `from.local_*` to `from.remote_*`.
pub fn udp_frame(from: &LinkPeer, payload: &[u8]) -> Vec<u8> {
    let headers = packet::headers_len(from);
    let mut frame = vec![0u8; headers + payload.len()];
    frame[headers..].copy_from_slice(payload);
    let len = packet::write_udp_headers(&mut frame, from, payload.len(), 1).expect("frame fits");
    frame.truncate(len);
    frame
}

/// A datagram of `count` DATA frames with `payload_len`-byte payloads,
/// sequences from `first_sequence`.
pub fn data_datagram(
    stream_id: u32,
    producer_id: u32,
    first_sequence: u64,
    count: usize,
    payload_len: usize,
) -> Vec<u8> {
    let mut buf = vec![0u8; count * (kaelix_protocol::HEADER_LEN + payload_len)];
    let mut builder = kaelix_protocol::DatagramBuilder::new(&mut buf);
    for i in 0..count {
        let sequence = first_sequence + i as u64;
        let payload: Vec<u8> = (0..payload_len)
            .map(|b| (sequence as usize + b) as u8)
            .collect();
        builder
            .push_data(stream_id, producer_id, sequence, sequence * 1000, &payload)
            .expect("sized for these frames");
    }
    let len = builder.len();
    buf.truncate(len);
    buf
}

/// The message of a panic payload.
pub fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// ICMP echo from the calling thread's namespace to `target` over a raw socket.
pub fn ping(target: Ipv4Addr) {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw ICMP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let ident: u16 = 0x6b78;
    let mut request = [
        8u8,
        0,
        0,
        0,
        (ident >> 8) as u8,
        ident as u8,
        0,
        1,
        b'k',
        b'x',
        b'p',
        b'g',
    ];
    let checksum = kaelix_dataplane::packet::internet_checksum(&request, 0);
    request[2..4].copy_from_slice(&checksum.to_be_bytes());
    socket
        .send_to(
            &request,
            &SocketAddr::V4(SocketAddrV4::new(target, 0)).into(),
        )
        .expect("sending the echo request");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while Instant::now() < deadline {
        let (len, _) = socket.recv_from(&mut buf).expect("no ICMP echo reply");
        // SAFETY: recv_from initialised the first `len` bytes.
        let packet: Vec<u8> = buf[..len]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        let icmp = &packet[ihl..];
        if icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == ident {
            return;
        }
    }
    panic!("no ICMP echo reply from {target}");
}

/// TCP from `ns_a` to a listener on `port` in `ns_b` still works (with or
/// without an XDP program attached).
pub fn tcp_round_trip(pair: &VethPair, port: u16) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let ip_b = pair.ip_b;
    let server = pair.spawn_in(&pair.ns_b, move || {
        let listener = TcpListener::bind(SocketAddrV4::new(ip_b, port)).expect("TCP listen");
        ready_tx.send(()).unwrap();
        let (mut stream, _) = listener.accept().expect("TCP accept");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("TCP server ready");
    let echoed = pair.in_ns(&pair.ns_a, move || {
        let mut stream = TcpStream::connect_timeout(
            &SocketAddr::V4(SocketAddrV4::new(ip_b, port)),
            Duration::from_secs(5),
        )
        .expect("TCP connect to the broker namespace");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        buf
    });
    server.join().expect("TCP server");
    assert_eq!(&echoed, b"hello");
}

/// Wait (up to 5 s: link release is asynchronous) until `ifindex` in the
/// broker namespace has no XDP program.
pub fn assert_no_program_left(pair: &VethPair, ifindex: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attached = pair.in_ns(&pair.ns_b, move || {
            attached_program_id(ifindex).expect("XDP query")
        });
        if attached.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "XDP program {attached:?} still attached: {}",
            pair.link_b()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let link = pair.link_b();
    assert!(
        !link.contains("prog/xdp"),
        "ip link still shows a program: {link}"
    );
}

/// This executable run again under `ip netns exec` (so with the namespace's
/// own /sys), its stdout read line by line. Killed (SIGKILL) and reaped when
/// dropped, so a failing test leaves no process behind.
pub struct NsChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl NsChild {
    /// Run this executable with `args` and `env` in namespace `ns`.
    pub fn spawn(ns: &str, args: &[&str], env: &[(&str, &str)]) -> NsChild {
        let exe = std::env::current_exe().expect("path of this executable");
        // `ip netns exec` execs the command, so the child's pid is ours to kill.
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a child in the namespace");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        NsChild {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// Run the ignored test `test` of this test binary in `ns`.
    pub fn spawn_test(ns: &str, test: &str, env: &[(&str, &str)]) -> NsChild {
        let args = [
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ];
        Self::spawn(ns, &args, env)
    }

    /// The first stdout line containing `marker`, from `marker` on (the test
    /// harness prints "test <name> ... " in front of it without a newline).
    /// Kills the child and panics when none comes within `timeout`.
    pub fn line(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(at) = line.find(marker) {
                        return line[at..].to_owned();
                    }
                }
                Err(_) => panic!(
                    "no {marker:?} line from the child within {timeout:?} (child: {:?})",
                    self.kill()
                ),
            }
        }
    }

    /// SIGKILL it now; how it ended.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reaping the child")
    }

    /// Close its stdin (the stop signal of a child that reads it), read the
    /// line with `marker`, and wait for a successful exit.
    pub fn finish(mut self, marker: &str) -> String {
        drop(self.stdin.take());
        let line = self.line(marker, Duration::from_secs(60));
        let status = self.child.wait().expect("waiting for the child");
        assert!(status.success(), "child failed: {status:?}");
        line
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}
