#![allow(dead_code)] // each test binary uses part of the support module
//! Clusters of `kaelix serve` processes on loopback with data replication
//! (`cluster.replication_factor = 3`) and stream 1 at the `replicated`
//! durability level, for `cluster_failover.rs` and `cluster_membership.rs`.
//! Each broker lives in its own temporary directory (kept across its
//! restarts) on a cluster port picked free at the start, and is stopped on
//! drop (SIGTERM, then SIGKILL, after SIGCONT), on failure too.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kaelix_client::consumer::{Consumer, ConsumerConfig};
use kaelix_client::producer::Producer;
use kaelix_controlplane::cluster::shard_positions;

pub const STREAM: u32 = 1;
/// Raft and failover timings of a test cluster (milliseconds).
#[derive(Clone, Copy)]
pub struct Timings {
    pub heartbeat: u64,
    pub election_min: u64,
    pub election_max: u64,
    pub failover_after: u64,
}

/// Tuned for fast failover (what the kill tests measure).
pub const TUNED: Timings = Timings {
    heartbeat: 20,
    election_min: 60,
    election_max: 100,
    failover_after: 150,
};

/// The defaults: no needless elections or shard moves on a loaded machine.
pub const DEFAULTS: Timings = Timings {
    heartbeat: 50,
    election_min: 150,
    election_max: 300,
    failover_after: 1000,
};

pub struct Node {
    pub id: u64,
    pub child: Child,
    pub admin: String,
    pub raft: String,
    pub data: SocketAddr,
    pub fetch: SocketAddr,
    pub dir: std::path::PathBuf,
    pub cluster_port: u16,
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Node {
    /// Start node `id` with its files in `dir` and its cluster RPCs on
    /// `cluster_port` (the same across restarts: the Raft membership keeps it).
    pub fn start(bin: &Path, id: u64, dir: &Path, cluster_port: u16) -> Self {
        Self::start_with(bin, id, dir, cluster_port, TUNED)
    }

    /// [`Node::start`] with these timings.
    pub fn start_with(
        bin: &Path,
        id: u64,
        dir: &Path,
        cluster_port: u16,
        timings: Timings,
    ) -> Self {
        // A restarted node keeps its data address (as a deployment with a
        // fixed configuration does): the producers only know the addresses
        // they were given and those the brokers' redirects name.
        let port_file = dir.join("data-port");
        let data_addr = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|port| port.trim().parse::<u16>().ok())
            .map_or_else(
                || "127.0.0.1:0".to_string(),
                |port| format!("127.0.0.1:{port}"),
            );
        let config = dir.join("kaelix.toml");
        std::fs::File::create(&config)
            .and_then(|mut f| f.write_all(b"[[streams]]\nid = 1\ndurability = \"replicated\"\n"))
            .expect("writing the configuration");
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--data-addr", &data_addr])
            .args([
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
            .arg(dir.join("data"))
            .env("KAELIX__CLUSTER__NODE_ID", id.to_string())
            .env("KAELIX__CLUSTER__ADDR", format!("127.0.0.1:{cluster_port}"))
            .env("KAELIX__CLUSTER__REPLICATION_FACTOR", "3")
            .env("KAELIX__CLUSTER__REPLICATION_ADDR", "127.0.0.1:0")
            .env(
                "KAELIX__CLUSTER__HEARTBEAT_MS",
                timings.heartbeat.to_string(),
            )
            .env(
                "KAELIX__CLUSTER__ELECTION_TIMEOUT_MIN_MS",
                timings.election_min.to_string(),
            )
            .env(
                "KAELIX__CLUSTER__ELECTION_TIMEOUT_MAX_MS",
                timings.election_max.to_string(),
            )
            .env(
                "KAELIX__CLUSTER__FAILOVER_AFTER_MS",
                timings.failover_after.to_string(),
            )
            .env(
                "KAELIX_LOG",
                std::env::var("KAELIX_TEST_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting kaelix serve");
        let rx = kaelix_tests::stdout_lines(&mut child);
        let ready = kaelix_tests::serve_addresses(&rx, id);
        let data = ready.data;
        std::fs::write(&port_file, data.port().to_string()).expect("noting the data port");
        Self {
            id,
            child,
            admin: ready.admin,
            raft: ready.raft,
            data,
            fetch: ready.fetch,
            dir: dir.to_path_buf(),
            cluster_port,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} node {}", self.id);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        kaelix_tests::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// The directories of `count` nodes (declared before the nodes, so that
/// they outlive them).
pub fn node_dirs(count: u64) -> Vec<tempfile::TempDir> {
    (1..=count)
        .map(|id| {
            tempfile::Builder::new()
                .prefix(&format!("kaelix-failover-{id}-"))
                .tempdir()
                .expect("a temporary directory")
        })
        .collect()
}

/// One node in each of `dirs` (ids from 1) formed into a cluster.
pub fn cluster(bin: &Path, dirs: &[tempfile::TempDir], timings: Timings) -> Vec<Node> {
    let nodes: Vec<Node> = dirs
        .iter()
        .zip(1..)
        .map(|(dir, id)| Node::start_with(bin, id, dir.path(), free_port(), timings))
        .collect();
    kaelix_ok(bin, &["cluster", "init", "--admin", &nodes[0].admin]);
    for node in &nodes[1..] {
        kaelix_ok(
            bin,
            &["cluster", "join", &nodes[0].admin, "--admin", &node.admin],
        );
    }
    nodes
}

/// Shard 0's position on `node`, if it answers.
pub fn shard0(
    runtime: &tokio::runtime::Runtime,
    node: &Node,
) -> Option<kaelix_controlplane::cluster::ShardPosition> {
    runtime
        .block_on(shard_positions(&node.raft, Duration::from_secs(1)))
        .ok()?
        .into_iter()
        .find(|p| p.shard == 0)
}

/// `kaelix ARGS` (30 s at most): its status and output.
pub fn kaelix_output(bin: &Path, args: &[&str]) -> std::process::Output {
    let child = Command::new(bin)
        .args(args)
        .env("KAELIX_LOG", "warn")
        .env_remove("KAELIX_ADMIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kaelix");
    kaelix_tests::output_within(child, Duration::from_secs(30), &format!("{args:?}"))
}

/// `kaelix ARGS`, which must succeed; its stdout.
pub fn kaelix_ok(bin: &Path, args: &[&str]) -> String {
    let out = kaelix_output(bin, args);
    assert!(
        out.status.success(),
        "kaelix {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kaelix ARGS`, which must fail; its stderr.
pub fn kaelix_fails(bin: &Path, args: &[&str]) -> String {
    let out = kaelix_output(bin, args);
    assert!(!out.status.success(), "kaelix {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The node leading shard 0 (asked over the cluster RPC), if one says so.
pub fn leader_of_shard0(runtime: &tokio::runtime::Runtime, nodes: &[Node]) -> Option<usize> {
    nodes
        .iter()
        .position(|node| shard0(runtime, node).is_some_and(|p| p.leading))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every message of `sent` (all acknowledged, by producer `producer_id`)
/// read back from the shard leader's fetch address `fetch`: exactly once,
/// in order, nothing after.
pub fn assert_read_back(fetch: SocketAddr, producer_id: u32, sent: &[Vec<u8>]) {
    assert_read_back_of(fetch, STREAM, producer_id, sent);
}

/// [`assert_read_back`] of stream `stream`.
pub fn assert_read_back_of(fetch: SocketAddr, stream: u32, producer_id: u32, sent: &[Vec<u8>]) {
    let mut consumer = Consumer::remote(
        fetch,
        ConsumerConfig {
            wait: Duration::from_millis(100),
            ..ConsumerConfig::new(stream)
        },
    )
    .expect("a consumer of the leader");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 0usize;
    while next < sent.len() {
        assert!(
            Instant::now() < deadline,
            "only {next} of {} acknowledged messages on the leader",
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
    let after = consumer.poll(16).expect("poll").count();
    assert_eq!(after, 0, "no duplicate after the last message");
}

/// Shard 0's replica set, leader and epoch in `node`'s applied metadata.
pub fn shard0_assignment(
    runtime: &tokio::runtime::Runtime,
    node: &Node,
) -> Option<kaelix_controlplane::cluster::pb::ClusterShard> {
    use kaelix_controlplane::cluster::pb::StatusRequest;
    use kaelix_controlplane::cluster::pb::cluster_raft_client::ClusterRaftClient;
    runtime.block_on(async {
        let call = async {
            let mut client = ClusterRaftClient::connect(format!("http://{}", node.raft))
                .await
                .ok()?;
            let reply = client.status(StatusRequest {}).await.ok()?.into_inner();
            reply.shards.into_iter().find(|s| s.shard == 0)
        };
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()
            .flatten()
    })
}

/// `kaelix cluster join|leave ...` on a thread of its own (it must succeed:
/// the thread's result says). Retried, as an operator would, while the Raft
/// group has no leader or the target does not answer in time (a loaded
/// machine); a retried `leave` whose first attempt went through finds the
/// node gone.
pub fn kaelix_in_background(bin: &Path, args: &[&str]) -> std::thread::JoinHandle<()> {
    let bin = bin.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        for attempt in 1.. {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kaelix_output(&bin, &refs);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || (attempt > 1 && stderr.contains("is not a member")) {
                return;
            }
            let transient = stderr.contains("leader is None") || stderr.contains("no answer");
            assert!(
                transient && attempt < 5,
                "kaelix {args:?} failed (attempt {attempt}): {stderr}"
            );
            eprintln!("kaelix {args:?}: {stderr}retrying");
            std::thread::sleep(Duration::from_millis(500));
        }
    })
}

/// A steady load: one message every half millisecond, each remembered.
pub struct Load<'a> {
    pub producer: &'a Producer,
    pub sent: Vec<Vec<u8>>,
}

impl<'a> Load<'a> {
    /// A load on `producer` once its first message (remembered) was
    /// acknowledged: the shard assigned and a follower caught up.
    pub fn after_first_ack(producer: &'a Producer) -> Self {
        let warmup = b"warmup".to_vec();
        producer
            .send_and_wait(STREAM, &warmup, Duration::from_secs(60))
            .expect("the first replicated ACK");
        Self {
            producer,
            sent: vec![warmup],
        }
    }

    pub fn send(&mut self, phase: &str) {
        let payload = format!("{phase} message {:06}", self.sent.len()).into_bytes();
        self.producer.send(STREAM, &payload).expect("send");
        self.sent.push(payload);
        std::thread::sleep(Duration::from_micros(500));
    }

    /// Produce until `done` (asked every 20 messages) holds; panics after
    /// `limit`, naming `phase`.
    pub fn until(&mut self, phase: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            for _ in 0..20 {
                self.send(phase);
            }
            if done() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{phase}: not done within {limit:?}"
            );
        }
    }
}
