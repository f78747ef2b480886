//! Streams created at runtime in a cluster with data replication: three
//! `kaelix serve` processes on loopback (`cluster.replication_factor = 3`,
//! tuned timeouts), no `[[streams]]` in their configuration.
//!
//! `kaelix stream create` on a broker that does not lead the shard creates
//! the stream on all three; a producer that knows the three brokers sends
//! with `replicated` acks; the shard leader is killed with SIGKILL while it
//! sends; every acknowledged message is read back from the new leader once,
//! in order. A stream created while a broker is down exists on it once it
//! restarts, and a delete through any broker reaches all three.
//!
//! Each broker lives in its own temporary directory and is stopped on drop
//! (SIGTERM, then SIGKILL), on failure too.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kaelix_client::producer::Producer;
use kaelix_controlplane::cluster::shard_positions;
use kaelix_tests::kaelix_bin;

mod failover_support;
use failover_support::{kaelix_ok, kaelix_output as kaelix};

/// Created at runtime; on shard 0 (one shard per broker). Not one of the
/// default configuration's `[[streams]]` (1, 2, 3).
const STREAM: u32 = 10;
/// Created while a broker is down, then deleted.
const LATE: u32 = 11;

/// One `kaelix serve` with the addresses it printed.
struct Broker {
    id: u64,
    child: Child,
    admin: String,
    raft: String,
    data: SocketAddr,
    fetch: SocketAddr,
    cluster_port: u16,
}

impl Broker {
    /// Start node `id` with its files in `dir`, its cluster RPCs on
    /// `cluster_port` (kept across restarts: the Raft membership has it).
    fn start(bin: &Path, id: u64, dir: &Path, cluster_port: u16) -> Self {
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--data-addr", "127.0.0.1:0", "--fetch-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args([
                "--set",
                "metrics.enabled=false",
                "--set",
                "reload.watch=false",
            ])
            .args(["--set", "storage.segment_size_mib=2"])
            .env("KAELIX__CLUSTER__NODE_ID", id.to_string())
            .env("KAELIX__CLUSTER__ADDR", format!("127.0.0.1:{cluster_port}"))
            .env("KAELIX__CLUSTER__REPLICATION_FACTOR", "3")
            .env("KAELIX__CLUSTER__REPLICATION_ADDR", "127.0.0.1:0")
            .env("KAELIX__CLUSTER__HEARTBEAT_MS", "20")
            .env("KAELIX__CLUSTER__ELECTION_TIMEOUT_MIN_MS", "60")
            .env("KAELIX__CLUSTER__ELECTION_TIMEOUT_MAX_MS", "100")
            .env("KAELIX__CLUSTER__FAILOVER_AFTER_MS", "150")
            .env(
                "KAELIX_LOG",
                std::env::var("KAELIX_TEST_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting kaelix serve");
        let lines = kaelix_tests::stdout_lines(&mut child);
        let ready = kaelix_tests::serve_addresses(&lines, id);
        Self {
            id,
            child,
            admin: ready.admin,
            raft: ready.raft,
            data: ready.data,
            fetch: ready.fetch,
            cluster_port,
        }
    }

    /// Whether this broker leads shard 0, if it answers.
    fn leads_shard0(&self, runtime: &tokio::runtime::Runtime) -> Option<bool> {
        let positions = runtime
            .block_on(shard_positions(&self.raft, Duration::from_secs(1)))
            .ok()?;
        positions.iter().find(|p| p.shard == 0).map(|p| p.leading)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        kaelix_tests::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// Whether `broker` has stream `id` (asked through `kaelix stream describe`).
fn has_stream(bin: &Path, broker: &Broker, id: u32) -> bool {
    let id = id.to_string();
    kaelix(bin, &["stream", "describe", &id, "--admin", &broker.admin])
        .status
        .success()
}

/// Poll `check` every 50 ms until it holds; panic naming `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn a_stream_created_at_runtime_is_replicated_and_survives_a_leader_kill() {
    let bin = kaelix_bin();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dirs: Vec<tempfile::TempDir> = (1..=3)
        .map(|id| {
            tempfile::Builder::new()
                .prefix(&format!("kaelix-runtime-streams-{id}-"))
                .tempdir()
                .expect("a temporary directory")
        })
        .collect();
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let mut nodes: Vec<Broker> = dirs
        .iter()
        .zip(1..=3)
        .map(|(dir, id)| Broker::start(&bin, id, dir.path(), free_port()))
        .collect();
    kaelix_ok(&bin, &["cluster", "init", "--admin", &nodes[0].admin]);
    for node in &nodes[1..] {
        kaelix_ok(
            &bin,
            &["cluster", "join", &nodes[0].admin, "--admin", &node.admin],
        );
    }
    // The shard gets its replica set once the three brokers registered.
    let leader_of = |nodes: &[Broker]| {
        nodes
            .iter()
            .position(|n| n.leads_shard0(&runtime) == Some(true))
    };
    wait_for(Duration::from_secs(60), "a shard 0 leader", || {
        leader_of(&nodes).is_some()
    });
    let leader = leader_of(&nodes).unwrap();
    let creator = (leader + 1) % 3;

    // A factor other than the shard's copies is refused, with the reason.
    let id = STREAM.to_string();
    let refused = kaelix(
        &bin,
        &[
            "stream",
            "create",
            &id,
            "--replication-factor",
            "2",
            "--admin",
            &nodes[creator].admin,
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("3 copies"),
        "factor 2 refused: {stderr}"
    );
    // Created through a broker that does not lead the shard.
    let started = Instant::now();
    let created = kaelix_ok(
        &bin,
        &[
            "stream",
            "create",
            &id,
            "--durability",
            "replicated",
            "--replication-factor",
            "3",
            "--retention-mib",
            "64",
            "--json",
            "--admin",
            &nodes[creator].admin,
        ],
    );
    let cli = started.elapsed();
    assert!(
        created.contains("\"replication_factor\": 3")
            || created.contains("\"replication_factor\":3"),
        "{created}"
    );
    assert!(has_stream(&bin, &nodes[creator], STREAM));
    let everywhere = wait_for(Duration::from_secs(5), "stream on every broker", || {
        nodes.iter().all(|n| has_stream(&bin, n, STREAM))
    });
    eprintln!("stream create: CLI {cli:?}, on every broker {everywhere:?} later");
    let again = kaelix(
        &bin,
        &["stream", "create", &id, "--admin", &nodes[leader].admin],
    );
    assert!(!again.status.success(), "a second create is refused");

    let brokers: Vec<SocketAddr> = nodes.iter().map(|n| n.data).collect();
    let producer = Producer::builder(brokers[creator])
        .brokers(brokers)
        .connect()
        .expect("a producer");
    let mut sent: Vec<Vec<u8>> = vec![b"warmup".to_vec()];
    producer
        .send_and_wait(STREAM, &sent[0], Duration::from_secs(30))
        .expect("the first replicated ACK");
    let total = 900u64;
    let mut killed_at = None;
    for n in 0..total {
        let payload = format!("message {n:06}").into_bytes();
        producer.send(STREAM, &payload).expect("send");
        sent.push(payload);
        if n == total / 3 {
            nodes[leader].child.kill().expect("SIGKILL");
            nodes[leader].child.wait().expect("reaping");
            killed_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    producer
        .flush(Duration::from_secs(60))
        .expect("every message acknowledged after the failover");
    assert!(producer.take_errors().is_empty(), "no message failed");
    eprintln!(
        "kill -9 to the last ACK: {:?}; producer: {:?}",
        killed_at.map(|at| at.elapsed()),
        producer.stats()
    );
    let live: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let new_leader = *live
        .iter()
        .find(|i| nodes[**i].leads_shard0(&runtime) == Some(true))
        .expect("a new shard leader");

    // Every acknowledged message once, in order, from the new leader.
    failover_support::assert_read_back_of(
        nodes[new_leader].fetch,
        STREAM,
        producer.producer_id(),
        &sent,
    );

    // Created while the killed broker is down: it has the stream once it
    // restarts; deleted through another broker: gone everywhere.
    let late = LATE.to_string();
    kaelix_ok(
        &bin,
        &[
            "stream",
            "create",
            &late,
            "--admin",
            &nodes[new_leader].admin,
        ],
    );
    let (id, port) = (nodes[leader].id, nodes[leader].cluster_port);
    nodes[leader] = Broker::start(&bin, id, dirs[leader].path(), port);
    wait_for(
        Duration::from_secs(10),
        "the restarted broker has the stream created while it was down",
        || has_stream(&bin, &nodes[leader], LATE) && has_stream(&bin, &nodes[leader], STREAM),
    );
    let other = live.iter().copied().find(|i| *i != new_leader).unwrap();
    kaelix_ok(
        &bin,
        &["stream", "delete", &late, "--admin", &nodes[other].admin],
    );
    wait_for(
        Duration::from_secs(5),
        "the stream deleted on every broker",
        || nodes.iter().all(|n| !has_stream(&bin, n, LATE)),
    );
    assert!(nodes.iter().all(|n| has_stream(&bin, n, STREAM)));
}
