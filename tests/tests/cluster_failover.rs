//! Three `kaelix serve` processes on loopback with data replication
//! (`cluster.replication_factor = 3`) and stream 1 at the `replicated`
//! durability level.
//!
//! - A producer that knows all three brokers sends at a steady rate; the
//!   shard's leader is killed with SIGKILL; the controller moves the shard
//!   to a follower and the producer follows the `not_leader` redirects. The
//!   killed broker is restarted (it drops the tail the new leader lacks and
//!   catches up), and this is repeated three times. Every acknowledged
//!   message is then read back from the last leader exactly once, in order.
//!   The time from each kill to the next acknowledgement is printed (not
//!   asserted: performance is measured in benchmarks, not tests).
//! - Node add/remove under load: a fourth broker joins (`kaelix cluster
//!   join`) while the producer writes, a follower replica of the shard
//!   leaves (`kaelix cluster leave`) and is stopped; the controller adds the
//!   new node to the replica set, and drops the departed one once the new
//!   replica caught up. Then the shard leader is killed: a replica of the new
//!   set takes over and every acknowledged message is read back once, in
//!   order.
//! - With both followers stopped (SIGSTOP) the leader, a minority, commits
//!   nothing; once they continue, everything is acknowledged.
//!
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
use kaelix_tests::kaelix_bin;

const STREAM: u32 = 1;
/// Raft and failover timings of a test cluster (milliseconds).
#[derive(Clone, Copy)]
struct Timings {
    heartbeat: u64,
    election_min: u64,
    election_max: u64,
    failover_after: u64,
}

/// Tuned for fast failover (what the kill tests measure).
const TUNED: Timings = Timings {
    heartbeat: 20,
    election_min: 60,
    election_max: 100,
    failover_after: 150,
};

/// The defaults: no needless elections or shard moves on a loaded machine.
const DEFAULTS: Timings = Timings {
    heartbeat: 50,
    election_min: 150,
    election_max: 300,
    failover_after: 1000,
};

struct Node {
    id: u64,
    child: Child,
    admin: String,
    raft: String,
    data: SocketAddr,
    fetch: SocketAddr,
    dir: std::path::PathBuf,
    cluster_port: u16,
}

/// A loopback port free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Node {
    /// Start node `id` with its files in `dir` and its cluster RPCs on
    /// `cluster_port` (the same across restarts: the Raft membership keeps it).
    fn start(bin: &Path, id: u64, dir: &Path, cluster_port: u16) -> Self {
        Self::start_with(bin, id, dir, cluster_port, TUNED)
    }

    /// [`Node::start`] with these timings.
    fn start_with(bin: &Path, id: u64, dir: &Path, cluster_port: u16, timings: Timings) -> Self {
        let config = dir.join("kaelix.toml");
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
            dir: dir.to_path_buf(),
            cluster_port,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
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
fn node_dirs(count: u64) -> Vec<tempfile::TempDir> {
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
fn cluster(bin: &Path, dirs: &[tempfile::TempDir], timings: Timings) -> Vec<Node> {
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
fn shard0(
    runtime: &tokio::runtime::Runtime,
    node: &Node,
) -> Option<kaelix_controlplane::cluster::ShardPosition> {
    runtime
        .block_on(shard_positions(&node.raft, Duration::from_secs(1)))
        .ok()?
        .into_iter()
        .find(|p| p.shard == 0)
}

/// `kaelix ARGS`, which must succeed; its stdout.
fn kaelix_ok(bin: &Path, args: &[&str]) -> String {
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node leading shard 0 (asked over the cluster RPC), if one says so.
fn leader_of_shard0(runtime: &tokio::runtime::Runtime, nodes: &[Node]) -> Option<usize> {
    nodes
        .iter()
        .position(|node| shard0(runtime, node).is_some_and(|p| p.leading))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn replicated_acks_survive_repeated_leader_kills_and_restarts() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(3);
    let mut nodes = cluster(&bin, &dirs, TUNED);
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

    let per_round = 1500u64;
    let mut failovers = Vec::new();
    for round in 0..3u64 {
        let leader = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
        let epoch = shard0(&runtime, &nodes[leader]).map_or(0, |p| p.epoch);
        eprintln!(
            "round {round}: shard 0 led by node {} at epoch {epoch}",
            nodes[leader].id
        );
        // Steady load; SIGKILL the leader in the middle of it.
        let mut killed_at = None;
        let mut sent_at_kill = 0;
        let mut first_ack_after = None;
        for n in 0..per_round {
            let payload = format!("round {round} message {n:06}").into_bytes();
            producer.send(STREAM, &payload).expect("send");
            sent.push(payload);
            if n == per_round / 3 {
                // Sequences count messages from 1: everything above this
                // was sent after the kill.
                sent_at_kill = sent.len() as u64;
                nodes[leader].kill9();
                killed_at = Some(Instant::now());
            }
            if let Some(at) = killed_at
                && first_ack_after.is_none()
                && producer
                    .flow_ack(STREAM)
                    .is_some_and(|a| a.sequence > sent_at_kill)
            {
                first_ack_after = Some(at.elapsed());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        if let Err(err) = producer.flush(Duration::from_secs(60)) {
            let positions: Vec<_> = nodes.iter().map(|n| (n.id, shard0(&runtime, n))).collect();
            panic!(
                "round {round}: not every message acknowledged after the failover: {err}; \
                 producer {:?} sends to {:?}; shard 0 on the nodes: {positions:?}",
                producer.stats(),
                producer.destination(STREAM),
            );
        }
        let took = first_ack_after.unwrap_or_else(|| killed_at.unwrap().elapsed());
        eprintln!("round {round}: kill -9 of the shard leader to the next ACK: {took:?}");
        failovers.push(took);
        let new_leader = leader_of_shard0(&runtime, &nodes).expect("a new shard leader");
        assert_ne!(new_leader, leader, "the leader moved");
        let new_epoch = shard0(&runtime, &nodes[new_leader]).map_or(0, |p| p.epoch);
        assert!(new_epoch > epoch, "a failover starts a new epoch");

        // Restart the killed broker; it must catch up with the new leader
        // (its log agreeing with the new epoch) before the next round.
        let (id, dir, port) = {
            let old = &nodes[leader];
            (old.id, old.dir.clone(), old.cluster_port)
        };
        nodes[leader] = Node::start(&bin, id, &dir, port);
        // (The current epoch, in case a loaded machine moved the shard
        // again meanwhile.)
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let here = shard0(&runtime, &nodes[leader]);
            let current = leader_of_shard0(&runtime, &nodes)
                .and_then(|l| shard0(&runtime, &nodes[l]))
                .map(|p| p.epoch);
            if here.is_some_and(|p| Some(p.epoch) == current && p.epoch >= new_epoch) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not catch up with epoch {current:?}: {here:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let stats = producer.stats();
    eprintln!("failovers: {failovers:?}; producer: {stats:?}");
    assert!(producer.take_errors().is_empty(), "no message failed");

    let last = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    assert_read_back(nodes[last].fetch, producer.producer_id(), &sent);
}

/// Every message of `sent` (all acknowledged, by producer `producer_id`)
/// read back from the shard leader's fetch address `fetch`: exactly once,
/// in order, nothing after.
fn assert_read_back(fetch: SocketAddr, producer_id: u32, sent: &[Vec<u8>]) {
    let mut consumer = Consumer::remote(
        fetch,
        ConsumerConfig {
            wait: Duration::from_millis(100),
            ..ConsumerConfig::new(STREAM)
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
fn shard0_assignment(
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
fn kaelix_in_background(bin: &Path, args: &[&str]) -> std::thread::JoinHandle<()> {
    let bin = bin.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        for attempt in 1.. {
            let out = kaelix_tests::output_within(
                Command::new(&bin)
                    .args(&args)
                    .env("KAELIX_LOG", "warn")
                    .env_remove("KAELIX_ADMIN")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("starting kaelix"),
                Duration::from_secs(30),
                &format!("{args:?}"),
            );
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
struct Load<'a> {
    producer: &'a Producer,
    sent: Vec<Vec<u8>>,
}

impl Load<'_> {
    fn send(&mut self, phase: &str) {
        let payload = format!("{phase} message {:06}", self.sent.len()).into_bytes();
        self.producer.send(STREAM, &payload).expect("send");
        self.sent.push(payload);
        std::thread::sleep(Duration::from_micros(500));
    }

    /// Produce until `done` (asked every 20 messages) holds; panics after
    /// `limit`, naming `phase`.
    fn until(&mut self, phase: &str, limit: Duration, mut done: impl FnMut() -> bool) {
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

#[test]
fn replica_sets_follow_a_node_joining_and_a_follower_leaving_under_load() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(4);
    // Default timings: the tuned ones (150 ms failover, 60-100 ms
    // elections) move shards and hold elections needlessly on a loaded
    // machine (seen: no Raft leader for seconds at load 9 on 2 cores), and
    // this test is about planned changes, not failover time.
    let mut nodes = cluster(&bin, &dirs[..3], DEFAULTS);
    // Node 4 runs from the start (the producer knows its data address) but
    // joins under load.
    nodes.push(Node::start_with(
        &bin,
        4,
        dirs[3].path(),
        free_port(),
        DEFAULTS,
    ));
    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    let mut load = Load {
        producer: &producer,
        sent: Vec::new(),
    };
    let warmup = b"warmup".to_vec();
    producer
        .send_and_wait(STREAM, &warmup, Duration::from_secs(60))
        .expect("the first replicated ACK");
    load.sent.push(warmup);

    // Node 4 joins while the producer writes.
    let join = kaelix_in_background(
        &bin,
        &[
            "cluster",
            "join",
            &nodes[0].admin,
            "--admin",
            &nodes[3].admin,
        ],
    );
    load.until("join", Duration::from_secs(60), || join.is_finished());
    join.join().expect("kaelix cluster join succeeded");
    // Settled: every replica follows the leader at the current epoch.
    let mut before = None;
    load.until("settle", Duration::from_secs(30), || {
        before = shard0_assignment(&runtime, &nodes[0]).filter(|a| {
            a.replicas.iter().all(|id| {
                nodes
                    .iter()
                    .find(|n| n.id == *id)
                    .and_then(|n| shard0(&runtime, n))
                    .is_some_and(|p| p.epoch == a.epoch && p.leading == (*id == a.leader))
            })
        });
        before.is_some()
    });
    let before = before.expect("shard 0 is assigned");
    eprintln!("after the join: shard 0 {before:?}");
    assert_eq!(
        before.replicas.len(),
        3,
        "a full replica set stays as it is: {before:?}"
    );

    // A follower replica of shard 0 leaves the cluster under load and is
    // stopped; the set must become {leader, other follower, 4}.
    let gone = *before
        .replicas
        .iter()
        .find(|id| **id != before.leader)
        .expect("a follower");
    let via = nodes
        .iter()
        .find(|n| n.id != gone && n.id != 4)
        .expect("another member")
        .admin
        .clone();
    let gone_id = gone.to_string();
    let leave = kaelix_in_background(
        &bin,
        &["cluster", "leave", "--node", &gone_id, "--admin", &via],
    );
    load.until("leave", Duration::from_secs(60), || leave.is_finished());
    leave.join().expect("kaelix cluster leave succeeded");
    let gone_at = nodes.iter().position(|n| n.id == gone).expect("the node");
    kaelix_tests::stop_child(&mut nodes[gone_at].child, Duration::from_secs(20));
    let mut expected: Vec<u64> = before
        .replicas
        .iter()
        .copied()
        .filter(|id| *id != gone)
        .chain([4])
        .collect();
    expected.sort_unstable();
    let asked = nodes
        .iter()
        .position(|n| n.id == before.leader)
        .expect("the leader");
    let started = Instant::now();
    let mut after = None;
    load.until("replace", Duration::from_secs(60), || {
        after = shard0_assignment(&runtime, &nodes[asked]).filter(|a| {
            let mut replicas = a.replicas.clone();
            replicas.sort_unstable();
            replicas == expected
        });
        after.is_some()
    });
    let after = after.expect("the new replica set");
    eprintln!(
        "node {gone} left: shard 0 {after:?} {:?} after the leave",
        started.elapsed()
    );
    assert_eq!(
        after.leader, before.leader,
        "a follower left: the leader stays"
    );
    // What the operator sees.
    let status = kaelix_ok(
        &bin,
        &[
            "cluster",
            "status",
            "--json",
            "--admin",
            &nodes[asked].admin,
        ],
    );
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let shard = &status["shards"][0];
    assert_eq!(shard["shard"], 0, "{status}");
    let mut shown: Vec<u64> = shard["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .collect();
    shown.sort_unstable();
    assert_eq!(shown, expected, "{status}");
    assert_eq!(shard["leader"].as_u64(), Some(after.leader), "{status}");
    assert_eq!(
        after.epoch, before.epoch,
        "a replica set change keeps the epoch"
    );
    // Node 4 follows the leader at that epoch and has caught up: it reaches
    // where the leader's log ended when the set changed.
    let leader_at = shard0(&runtime, &nodes[asked])
        .expect("the leader answers")
        .appended;
    load.until("catch-up", Duration::from_secs(30), || {
        shard0(&runtime, &nodes[3])
            .is_some_and(|p| p.epoch == after.epoch && p.appended >= leader_at)
    });
    // More load on the new set, all acknowledged.
    for _ in 0..500 {
        load.send("steady");
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("everything acknowledged by the new replica set");

    // Kill the shard leader: a replica of the new set (node 4 or the
    // follower that stayed) takes over with everything acknowledged.
    nodes[asked].kill9();
    for _ in 0..1000 {
        load.send("failover");
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("everything acknowledged after the failover");
    assert!(producer.take_errors().is_empty(), "no message failed");
    let live: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.id != gone && n.id != before.leader)
        .collect();
    let last = live
        .iter()
        .find(|n| shard0(&runtime, n).is_some_and(|p| p.leading))
        .expect("a new shard leader among the remaining replicas");
    assert!(
        after.replicas.contains(&last.id),
        "the new leader {} is in the new replica set {:?}",
        last.id,
        after.replicas
    );
    eprintln!(
        "shard 0 now led by node {}; {} messages; producer {:?}",
        last.id,
        load.sent.len(),
        producer.stats()
    );
    assert_read_back(last.fetch, producer.producer_id(), &load.sent);
}

#[test]
fn a_leader_cut_off_from_both_followers_commits_nothing() {
    let bin = kaelix_bin();
    let runtime = runtime();
    let dirs = node_dirs(3);
    let nodes = cluster(&bin, &dirs, TUNED);
    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[0])
        .brokers(brokers.clone())
        .connect()
        .expect("a producer");
    producer
        .send_and_wait(STREAM, b"warmup", Duration::from_secs(60))
        .expect("the first replicated ACK");
    let leader = leader_of_shard0(&runtime, &nodes).expect("a shard leader");
    let followers: Vec<&Node> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, n)| n)
        .collect();
    for follower in &followers {
        follower.signal("-STOP");
    }
    let acked = producer.flow_ack(STREAM).map_or(0, |a| a.sequence);
    for n in 0..100u64 {
        producer
            .send(STREAM, format!("cut off {n}").as_bytes())
            .expect("send");
    }
    // A second is long enough for the leader's own appends; only a quorum
    // is missing.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        producer.flow_ack(STREAM).map_or(0, |a| a.sequence),
        acked,
        "nothing is acknowledged without a quorum"
    );
    let position = shard0(&runtime, &nodes[leader]).expect("the leader answers");
    assert!(position.leading, "the leader still leads");
    for follower in &followers {
        follower.signal("-CONT");
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("everything acknowledged once the followers are back");
    assert!(producer.take_errors().is_empty(), "no message failed");
}
