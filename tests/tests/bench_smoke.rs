//! `kaelix bench` against a `kaelix serve` subprocess on loopback: a short
//! fixed-rate run with a consumer, and a count-bounded run at the fsync
//! level. Both are bounded in time (the broker is stopped with SIGTERM on
//! every exit path, so it removes its live segments from /dev/shm) and check
//! what the JSON report says, not how fast this machine is.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kaelix_tests::kaelix_bin;
use serde_json::Value;

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// `kaelix serve` on loopback with a temporary data directory; stopped on drop.
struct Broker {
    child: Child,
    data: SocketAddr,
    fetch: SocketAddr,
    dir: tempfile::TempDir,
}

impl Broker {
    fn start(bin: &PathBuf) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let fetch: SocketAddr = ([127, 0, 0, 1], free_tcp_port()).into();
        let mut child = Command::new(bin)
            .args(["serve", "--data-addr", "127.0.0.1:0", "--fetch-addr"])
            .arg(fetch.to_string())
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("KAELIX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kaelix serve");
        let lines = kaelix_tests::stdout_lines(&mut child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let data = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines
                .recv_timeout(left)
                .expect("kaelix serve printed its data address");
            if let Some(rest) = line.strip_prefix("kaelix broker ready: data ") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .expect("a socket address");
            }
        };
        Self {
            child,
            data,
            fetch,
            dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        kaelix_tests::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// Run `kaelix bench --json ARGS` (at most 60 s) and parse its report.
fn bench(bin: &PathBuf, broker: &Broker, args: &[&str]) -> Value {
    let child = Command::new(bin)
        .args(["bench", "--json", "--broker", &broker.data.to_string()])
        .args(args)
        .env("KAELIX_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kaelix bench");
    let output = kaelix_tests::output_within(
        child,
        Duration::from_secs(60),
        &format!("kaelix bench {args:?}"),
    );
    assert!(
        output.status.success(),
        "kaelix bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kaelix bench --json prints one JSON object")
}

#[test]
fn bench_measures_acks_and_consumption_against_a_served_broker() {
    let bin = kaelix_bin();
    let broker = Broker::start(&bin);

    // Fixed rate with both consumers (remote fetch, local mapped log): every
    // figure of the report is filled in.
    let fetch = broker.fetch.to_string();
    let data_dir = broker.dir.path().to_str().expect("a UTF-8 temporary path");
    let report = bench(
        &bin,
        &broker,
        &[
            "--rate",
            "20000",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--fetch",
            &fetch,
            "--local",
            data_dir,
        ],
    );
    assert_eq!(report["acked_level"], "memory", "{report}");
    assert_eq!(report["rejected"], 0, "{report}");
    assert!(report["msgs_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    let acked = report["acked"].as_u64().unwrap();
    assert_eq!(acked, report["offered"].as_u64().unwrap(), "{report}");
    let latency = &report["produce_ack_us"];
    assert!(latency["samples"].as_u64().unwrap() > 0, "{report}");
    let p50 = latency["p50"].as_f64().unwrap();
    let p99 = latency["p99"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99, "{report}");
    assert!(p99 <= latency["max"].as_f64().unwrap(), "{report}");
    let e2e = &report["end_to_end_us"];
    assert_eq!(e2e["consumed"].as_u64(), Some(acked), "{report}");
    assert!(e2e["samples"].as_u64().unwrap() > 0, "{report}");
    let local = &report["local_end_to_end_us"];
    assert_eq!(local["consumed"].as_u64(), Some(acked), "{report}");
    assert!(local["samples"].as_u64().unwrap() > 0, "{report}");
    let (p50, p99) = (
        local["p50"].as_f64().unwrap(),
        local["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{report}");

    // A count at the fsync level: exactly that many acknowledged, at fsync.
    let report = bench(
        &bin,
        &broker,
        &["--count", "5000", "--durability", "fsync", "--warmup", "0"],
    );
    assert_eq!(report["acked_level"], "fsync", "{report}");
    assert_eq!(report["acked"], 5000, "{report}");
    assert_eq!(report["unacked_at_end"], 0, "{report}");
    assert_eq!(report["streams"], serde_json::json!([3]), "{report}");
}
