//! Three `kaelix serve` processes on loopback with data replication
//! (`cluster.replication_factor = 3`) and stream 1 at the `replicated`
//! durability level. A producer that knows all three brokers sends at a
//! steady rate; the shard's leader is killed with SIGKILL; the controller
//! moves the shard to a follower, the producer follows the `not_leader`
//! redirects and goes on; every acknowledged message is then read back from
//! the new leader exactly once, in order. The time from the kill to the next
//! acknowledgement is printed (not asserted: performance is measured in
//! benchmarks, not tests).
//!
//! Each broker lives in its own temporary directory on ports the OS picks,
//! and is stopped on drop (SIGTERM, then SIGKILL), on failure too.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kaelix_client::consumer::{Consumer, ConsumerConfig};
use kaelix_client::producer::Producer;
use kaelix_controlplane::cluster::shard_positions;
use kaelix_tests::kaelix_bin;

const STREAM: u32 = 1;

struct Node {
    id: u64,
    child: Child,
    admin: String,
    raft: String,
    data: SocketAddr,
    fetch: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(bin: &Path, id: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kaelix-failover-{id}-"))
            .tempdir()
            .expect("a temporary directory");
        let config = dir.path().join("kaelix.toml");
        std::fs::File::create(&config)
            .and_then(|mut f| f.write_all(b"[[streams]]\nid = 1\ndurability = \"replicated\"\n"))
            .expect("writing the configuration");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--data-addr",
                "127.0.0.1:0",
                "--fetch-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
                "--set",
                "metrics.enabled=false",
                "--set",
                "reload.watch=false",
                "--set",
                "storage.segment_size_mib=2",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("KAELIX__CLUSTER__NODE_ID", id.to_string())
            .env("KAELIX__CLUSTER__ADDR", "127.0.0.1:0")
            .env("KAELIX__CLUSTER__REPLICATION_FACTOR", "3")
            .env("KAELIX__CLUSTER__REPLICATION_ADDR", "127.0.0.1:0")
            .env("KAELIX__CLUSTER__HEARTBEAT_MS", "20")
            .env("KAELIX__CLUSTER__ELECTION_TIMEOUT_MIN_MS", "60")
            .env("KAELIX__CLUSTER__ELECTION_TIMEOUT_MAX_MS", "100")
            .env("KAELIX__CLUSTER__FAILOVER_AFTER_MS", "150")
            .env("KAELIX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting kaelix serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let (mut admin, mut raft, mut data, mut fetch) = (None, None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while admin.is_none() || raft.is_none() || data.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("node {id}: kaelix serve did not print its addresses"));
            if let Some(rest) = line.strip_prefix("kaelix broker ready: data ") {
                let mut words = rest.split_whitespace();
                data = words.next().and_then(|a| a.parse().ok());
                fetch = rest
                    .split("fetch ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.strip_prefix("kaelix admin ready: grpc ") {
                admin = rest.split(',').next().map(str::to_string);
            }
            if let Some(rest) = line.strip_prefix(&format!("kaelix cluster ready: node {id} raft "))
            {
                raft = rest.split_whitespace().next().map(str::to_string);
            }
        }
        Self {
            id,
            child,
            admin: admin.unwrap(),
            raft: raft.unwrap(),
            data: data.unwrap(),
            fetch: fetch.expect("the fetch address"),
            _dir: dir,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kaelix_tests::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

fn kaelix_ok(bin: &Path, args: &[&str]) {
    let child = Command::new(bin)
        .args(args)
        .env("KAELIX_LOG", "warn")
        .env_remove("KAELIX_ADMIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kaelix");
    let out = kaelix_tests::output_within(child, Duration::from_secs(30), &format!("{args:?}"));
    assert!(
        out.status.success(),
        "kaelix {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The node leading shard 0 (asked over the cluster RPC), if one says so.
fn leader_of_shard0(runtime: &tokio::runtime::Runtime, nodes: &[Node]) -> Option<usize> {
    nodes.iter().position(|node| {
        runtime
            .block_on(shard_positions(&node.raft, Duration::from_secs(1)))
            .is_ok_and(|positions| positions.iter().any(|p| p.shard == 0 && p.leading))
    })
}

#[test]
fn replicated_acks_survive_killing_the_shard_leader() {
    let bin = kaelix_bin();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::start(&bin, id)).collect();
    kaelix_ok(&bin, &["cluster", "init", "--admin", &nodes[0].admin]);
    let first_admin = nodes[0].admin.clone();
    for node in &nodes[1..] {
        kaelix_ok(
            &bin,
            &["cluster", "join", &first_admin, "--admin", &node.admin],
        );
    }

    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    // The first ACK needs the shard assigned and a follower caught up.
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let warmup = b"warmup".to_vec();
    producer
        .send_and_wait(STREAM, &warmup, Duration::from_secs(60))
        .expect("the first replicated ACK");
    sent.push(warmup);
    let leader = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    eprintln!("shard 0 led by node {}", nodes[leader].id);

    // Steady load, then SIGKILL the leader in the middle of it.
    let total = 3000u64;
    let mut killed_at = None;
    let mut acked_at_kill = 0;
    let mut first_ack_after = None;
    for n in 0..total {
        let payload = format!("message {n:06}").into_bytes();
        producer.send(STREAM, &payload).expect("send");
        sent.push(payload);
        if n == total / 3 {
            acked_at_kill = producer.flow_ack(STREAM).map_or(0, |a| a.sequence);
            let _ = nodes[leader].child.kill();
            let _ = nodes[leader].child.wait();
            killed_at = Some(Instant::now());
        }
        if let Some(at) = killed_at
            && first_ack_after.is_none()
            && producer
                .flow_ack(STREAM)
                .is_some_and(|a| a.sequence > acked_at_kill + 1)
        {
            first_ack_after = Some(at.elapsed());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("every message acknowledged after the failover");
    let failover = first_ack_after.map_or("after the last send".to_string(), |d| format!("{d:?}"));
    eprintln!("kill -9 of the shard leader to the next ACK: {failover}");
    let stats = producer.stats();
    eprintln!("producer: {stats:?}");
    assert!(producer.take_errors().is_empty(), "no message failed");

    let new_leader = leader_of_shard0(&runtime, &nodes).expect("a new shard leader");
    assert_ne!(new_leader, leader, "the leader moved");
    let mut consumer = Consumer::remote(
        nodes[new_leader].fetch,
        ConsumerConfig {
            wait: Duration::from_millis(100),
            ..ConsumerConfig::new(STREAM)
        },
    )
    .expect("a consumer of the new leader");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 0usize;
    let producer_id = producer.producer_id();
    while next < sent.len() {
        assert!(
            Instant::now() < deadline,
            "only {next} of {} acknowledged messages on the new leader",
            sent.len()
        );
        for record in consumer.poll(4096).expect("poll") {
            let record = record.expect("a valid record");
            assert_eq!(record.producer_id, producer_id);
            assert_eq!(
                record.payload,
                sent[next].as_slice(),
                "record {next}: exactly once, in order"
            );
            next += 1;
        }
    }
    // Nothing after the last acknowledged message.
    let records: Vec<_> = consumer
        .poll(16)
        .expect("poll")
        .into_iter()
        .collect::<Vec<_>>();
    assert!(records.is_empty(), "no duplicate after the last message");
}
