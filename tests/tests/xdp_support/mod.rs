//! Shared by the `xdp_*` tests: the root check, a veth pair between two
//! network namespaces the test creates (removed on every exit path), running
//! code inside a namespace, and synthetic frames.
//!
//! Traffic only ever flows between the two ends of the pair, whose 10.x
//! addresses exist only inside those namespaces.
#![allow(dead_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};

use kaelix_dataplane::LinkPeer;
use kaelix_dataplane::af_xdp::packet;

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
