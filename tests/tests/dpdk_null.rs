//! The DPDK backend on DPDK's null PMD (`net_null`, no network needed) and
//! its typed errors when the EAL or the port cannot start.
//!
//! Each test runs the EAL in a child process (see `dpdk_support`): the EAL
//! starts once per process.
#![cfg(feature = "dpdk")]

mod dpdk_support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use dpdk_support::{Child, child_role, dpdk_lock, get, report, runtime_dir_of};
use kaelix_dataplane::dpdk::{DpdkBackend, DpdkConfig, DpdkError, HugepageMode};
use kaelix_dataplane::{Backend, LinkPeer, Peer};

const CHILD_TIMEOUT: Duration = Duration::from_secs(60);

fn null_config(extra: &[&str]) -> DpdkConfig {
    let mut config = DpdkConfig {
        hugepages: HugepageMode::Off,
        ..DpdkConfig::default()
    };
    config
        .eal_args
        .extend(extra.iter().map(|arg| (*arg).to_owned()));
    config
}

#[test]
fn dpdk_null_port_bursts_and_shuts_down_clean() {
    const REPLIES: u64 = 10_000;
    if child_role().is_some() {
        let mut backend =
            DpdkBackend::open(&null_config(&["--vdev=net_null0"])).expect("open net_null0");
        assert!(!backend.hugepages(), "hugepages = off means --no-huge");
        let (_, in_use_at_start) = backend.pool_usage();

        // RX: the null PMD returns a full burst of zero-filled 64-byte mbufs
        // on every call; none is IPv4 or ARP, so nothing is delivered.
        let mut delivered = 0;
        for _ in 0..1000 {
            delivered += backend
                .recv_batch(&mut |_, _| panic!("a zero frame is not UDP"))
                .expect("recv_batch");
        }
        let counters = backend.counters();

        // TX: replies built by swapping addresses, sent in bursts.
        let peer = Peer::Link(LinkPeer {
            remote_mac: [2, 0, 0, 0, 0, 1],
            local_mac: backend.mac_address(),
            remote_ip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1)),
            local_ip: IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)),
            remote_port: 40_000,
            local_port: 7000,
            queue: 0,
        });
        let mut queued = 0u64;
        for i in 0..REPLIES {
            if backend
                .queue_tx(&peer, &mut |buf| {
                    buf[..8].copy_from_slice(&i.to_le_bytes());
                    8
                })
                .expect("queue_tx")
            {
                queued += 1;
            }
            if i % 32 == 31 {
                backend.flush_tx().expect("flush_tx");
            }
        }
        backend.flush_tx().expect("flush_tx");
        // A cancelled reply (fill returns 0) is not sent and not a drop.
        assert!(backend.queue_tx(&peer, &mut |_| 0).expect("queue_tx"));
        assert_eq!(backend.flush_tx().expect("flush_tx"), 0);
        // A kernel-socket peer is a caller bug, reported as an error.
        assert!(
            backend
                .queue_tx(&Peer::Udp("10.0.0.1:1".parse().unwrap()), &mut |_| 1)
                .is_err()
        );

        let stats = backend.stats();
        let port = backend.port_stats().expect("port stats");
        let (_, in_use_at_end) = backend.pool_usage();
        report(&[
            ("event", "done".to_owned()),
            ("delivered", delivered.to_string()),
            ("rx_frames", counters.rx_frames.to_string()),
            ("rx_other", counters.rx_other.to_string()),
            ("queued", queued.to_string()),
            ("tx_packets", stats.tx_packets.to_string()),
            ("tx_dropped", stats.tx_dropped.to_string()),
            ("port_rx", port.rx_packets.to_string()),
            ("port_tx", port.tx_packets.to_string()),
            ("in_use_start", in_use_at_start.to_string()),
            ("in_use_end", in_use_at_end.to_string()),
        ]);
        backend.close().expect("clean shutdown");
        return;
    }

    let _lock = dpdk_lock();
    let mut child = Child::spawn(
        "dpdk_null_port_bursts_and_shuts_down_clean",
        "null",
        None,
        &[],
    );
    let pid = child.pid();
    let done = child.wait_report("done", CHILD_TIMEOUT);
    child.finish(CHILD_TIMEOUT);

    assert_eq!(get::<u64>(&done, "delivered"), 0);
    let rx_frames: u64 = get(&done, "rx_frames");
    assert_eq!(rx_frames, 1000 * 32, "1000 bursts of 32 from net_null");
    assert_eq!(get::<u64>(&done, "rx_other"), rx_frames);
    assert_eq!(get::<u64>(&done, "queued"), REPLIES);
    assert_eq!(get::<u64>(&done, "tx_packets"), REPLIES);
    assert_eq!(get::<u64>(&done, "tx_dropped"), 0);
    assert_eq!(get::<u64>(&done, "port_rx"), rx_frames);
    assert_eq!(get::<u64>(&done, "port_tx"), REPLIES);
    assert_eq!(
        get::<u32>(&done, "in_use_end"),
        get::<u32>(&done, "in_use_start"),
        "every mbuf received or sent went back to the pool"
    );
    assert!(
        !runtime_dir_of(pid).exists(),
        "the EAL runtime directory was removed"
    );
}

#[test]
fn dpdk_eal_failure_is_a_typed_error() {
    if child_role().is_some() {
        let config = null_config(&["--vdev=net_null0", "--no-such-eal-option"]);
        let error = DpdkBackend::open(&config).expect_err("the EAL refuses unknown options");
        let DpdkError::EalInit {
            errno,
            hint,
            ref args,
            ..
        } = error
        else {
            panic!("expected EalInit, got {error:?}");
        };
        assert!(
            args.iter().any(|arg| arg == "--no-such-eal-option"),
            "{args:?}"
        );
        assert!(!hint.is_empty());
        // The EAL cannot be started twice in one process, even after a failure.
        let again = DpdkBackend::open(&config).expect_err("second EAL start");
        assert!(matches!(again, DpdkError::EalAlreadyStarted), "{again:?}");
        report(&[
            ("event", "done".to_owned()),
            ("errno", errno.to_string()),
            ("message", error.to_string().replace(' ', "_")),
        ]);
        return;
    }
    let _lock = dpdk_lock();
    let mut child = Child::spawn("dpdk_eal_failure_is_a_typed_error", "eal-error", None, &[]);
    let pid = child.pid();
    let done = child.wait_report("done", CHILD_TIMEOUT);
    child.finish(CHILD_TIMEOUT);
    assert!(get::<i32>(&done, "errno") > 0);
    assert!(
        !runtime_dir_of(pid).exists(),
        "a failed EAL start leaves no runtime directory"
    );
}

#[test]
fn dpdk_missing_port_is_a_typed_error() {
    if child_role().is_some() {
        // The EAL starts, but the vdev fails to probe (DPDK >= 22.11 only
        // logs that), so there is no port 0.
        let config = null_config(&["--vdev=net_af_packet0,iface=kx-no-such-if"]);
        let error = DpdkBackend::open(&config).expect_err("no port");
        let DpdkError::NoPort {
            available,
            ref devices,
            ..
        } = error
        else {
            panic!("expected NoPort, got {error:?}");
        };
        assert_eq!(devices, &["--vdev=net_af_packet0,iface=kx-no-such-if"]);
        assert!(error.to_string().contains("iface=<name> exists"), "{error}");
        report(&[
            ("event", "done".to_owned()),
            ("available", available.to_string()),
        ]);
        return;
    }
    let _lock = dpdk_lock();
    let mut child = Child::spawn("dpdk_missing_port_is_a_typed_error", "no-port", None, &[]);
    let pid = child.pid();
    let done = child.wait_report("done", CHILD_TIMEOUT);
    child.finish(CHILD_TIMEOUT);
    assert_eq!(get::<u16>(&done, "available"), 0);
    assert!(
        !runtime_dir_of(pid).exists(),
        "the EAL was cleaned up after the port error"
    );
}

#[test]
fn dpdk_hugepages_on_uses_them_or_refuses_clearly() {
    if child_role().is_some() {
        let config = DpdkConfig {
            hugepages: HugepageMode::On,
            eal_args: vec![
                "--no-pci".to_owned(),
                "--no-telemetry".to_owned(),
                "--vdev=net_null0".to_owned(),
            ],
            ..DpdkConfig::default()
        };
        match DpdkBackend::open(&config) {
            Ok(backend) => {
                assert!(backend.hugepages());
                report(&[
                    ("event", "done".to_owned()),
                    ("outcome", "hugepages".to_owned()),
                ]);
                backend.close().expect("clean shutdown");
            }
            Err(DpdkError::NoHugepages {
                free_bytes,
                needed_bytes,
            }) => {
                assert!(free_bytes < needed_bytes);
                report(&[
                    ("event", "done".to_owned()),
                    ("outcome", "refused".to_owned()),
                ]);
            }
            Err(other) => panic!("expected hugepages or NoHugepages, got {other}"),
        }
        return;
    }
    let _lock = dpdk_lock();
    let mut child = Child::spawn(
        "dpdk_hugepages_on_uses_them_or_refuses_clearly",
        "hugepages",
        None,
        &[],
    );
    let pid = child.pid();
    let done = child.wait_report("done", CHILD_TIMEOUT);
    child.finish(CHILD_TIMEOUT);
    let outcome: String = get(&done, "outcome");
    eprintln!("hugepages = on: {outcome}");
    assert!(outcome == "hugepages" || outcome == "refused");
    assert!(!runtime_dir_of(pid).exists());
}

#[test]
fn dpdk_null_two_queues_on_two_threads() {
    if child_role().is_some() {
        let config = DpdkConfig {
            queues: 2,
            ..null_config(&["--vdev=net_null0"])
        };
        // `open` is for one queue only.
        assert!(matches!(
            DpdkBackend::open(&config),
            Err(DpdkError::InvalidConfig { key: "queues", .. })
        ));
        let backends = DpdkBackend::open_queues(&config).expect("open two queues");
        assert_eq!(backends.len(), 2);
        // Each backend moves to its own thread (as each shard does) and
        // bursts on its own queue.
        let threads: Vec<_> = backends
            .into_iter()
            .map(|mut backend| {
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        backend.recv_batch(&mut |_, _| {}).expect("recv_batch");
                    }
                    (backend.queue(), backend.counters().rx_frames, backend)
                })
            })
            .collect();
        let mut frames = Vec::new();
        let mut backends = Vec::new();
        for thread in threads {
            let (queue, rx_frames, backend) = thread.join().expect("queue thread");
            frames.push(format!("{queue}:{rx_frames}"));
            backends.push(backend);
        }
        report(&[("event", "done".to_owned()), ("frames", frames.join(","))]);
        // Closing all but the last leaves the port up; the last shuts it down.
        for backend in backends {
            backend.close().expect("clean shutdown");
        }
        return;
    }
    let _lock = dpdk_lock();
    let mut child = Child::spawn("dpdk_null_two_queues_on_two_threads", "queues", None, &[]);
    let pid = child.pid();
    let done = child.wait_report("done", CHILD_TIMEOUT);
    child.finish(CHILD_TIMEOUT);
    let mut frames: Vec<String> = get::<String>(&done, "frames")
        .split(',')
        .map(str::to_owned)
        .collect();
    frames.sort();
    assert_eq!(
        frames,
        ["0:3200", "1:3200"],
        "100 bursts of 32 on each queue"
    );
    assert!(!runtime_dir_of(pid).exists());
}
