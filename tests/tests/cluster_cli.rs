//! Three `kaelix serve` processes on loopback formed into a cluster with the
//! `kaelix cluster` CLI: init on one, join the other two (one through a
//! follower), status shows three voters and one leader; a cluster-wide
//! config entry and a stream created through the admin API reach every node
//! within 1 s; the Raft leader killed with SIGKILL is replaced and status
//! reports the new one; `leave` removes the dead node and the two left still
//! commit. Every broker is stopped on drop (SIGTERM, then SIGKILL), on
//! failure too, and lives in its own temporary directory on ports the OS
//! picks.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kaelix_controlplane::cluster::pb::StatusRequest;
use kaelix_controlplane::cluster::pb::cluster_raft_client::ClusterRaftClient;
use kaelix_controlplane::pb;
use kaelix_tests::kaelix_bin;
use serde_json::Value;

/// One `kaelix serve` with `[cluster]` set through the environment.
struct Node {
    id: u64,
    child: Child,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(bin: &Path, id: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("kaelix-cluster-cli-{id}-"))
            .tempdir()
            .expect("a temporary directory");
        let mut child = Command::new(bin)
            .args([
                "serve",
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
            .arg(dir.path())
            .env("KAELIX__CLUSTER__NODE_ID", id.to_string())
            .env("KAELIX__CLUSTER__ADDR", "127.0.0.1:0")
            .env("KAELIX_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting kaelix serve");
        let rx = kaelix_tests::stdout_lines(&mut child);
        let ready = kaelix_tests::serve_addresses(&rx, id);
        Self {
            id,
            child,
            admin: ready.admin,
            _dir: dir,
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kaelix_tests::stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// Run `kaelix ARGS` (at most 30 s).
fn kaelix(bin: &Path, args: &[&str]) -> Output {
    let child = Command::new(bin)
        .args(args)
        .env("KAELIX_LOG", "warn")
        .env_remove("KAELIX_ADMIN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kaelix");
    kaelix_tests::output_within(child, Duration::from_secs(30), &format!("kaelix {args:?}"))
}

/// `kaelix ARGS`, which must succeed; its stdout.
fn ok(bin: &Path, args: &[&str]) -> String {
    let out = kaelix(bin, args);
    assert!(
        out.status.success(),
        "kaelix {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `kaelix ARGS`, which must fail with one line on stderr; that line.
fn fails(bin: &Path, args: &[&str]) -> String {
    let out = kaelix(bin, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "kaelix {args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("kaelix: "), "{stderr:?}");
    stderr
}

fn status(bin: &Path, node: &Node) -> Value {
    let text = ok(
        bin,
        &[
            "cluster",
            "status",
            "--json",
            "--admin",
            node.admin.as_str(),
        ],
    );
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON {text:?}: {e}"))
}

fn voters(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter(|m| m["voter"] == Value::Bool(true))
        .map(|m| m["id"].as_u64().expect("member id"))
        .collect()
}

/// Poll `check` on every node's admin API until it holds everywhere; the
/// time it took, or a panic after `limit`.
fn until_everywhere<F, Fut>(nodes: &[&Node], limit: Duration, what: &str, check: F) -> Duration
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = Instant::now();
    runtime.block_on(async {
        loop {
            let mut all = true;
            for node in nodes {
                if !check(node.admin.clone()).await {
                    all = false;
                    break;
                }
            }
            if all {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "{what}: not on every node after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

async fn config_value(admin: String, key: &str) -> Option<String> {
    let mut client = pb::config_client::ConfigClient::connect(format!("http://{admin}"))
        .await
        .ok()?;
    let reply = client
        .get(pb::ConfigGetRequest { key: key.into() })
        .await
        .ok()?
        .into_inner();
    reply.entries.first().map(|e| e.value.clone())
}

async fn raft_status(admin: String) -> Option<kaelix_controlplane::cluster::pb::StatusReply> {
    let mut client = ClusterRaftClient::connect(format!("http://{admin}"))
        .await
        .ok()?;
    Some(client.status(StatusRequest {}).await.ok()?.into_inner())
}

#[test]
fn cluster_cli_forms_a_three_node_cluster_propagates_metadata_and_fails_over() {
    let bin = kaelix_bin();
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::start(&bin, id)).collect();
    let admin: Vec<String> = nodes.iter().map(|n| n.admin.clone()).collect();

    // Before init: a member of nothing.
    let fresh = status(&bin, &nodes[0]);
    assert_eq!(fresh["members"].as_array().map(Vec::len), Some(0));

    ok(&bin, &["cluster", "init", "--admin", &admin[0]]);
    let again = fails(&bin, &["cluster", "init", "--admin", &admin[0]]);
    assert!(again.contains("already in a cluster"), "{again}");
    // Node 2 joins through node 1, node 3 through node 2 (a follower, which
    // forwards to the leader).
    ok(&bin, &["cluster", "join", &admin[0], "--admin", &admin[1]]);
    ok(&bin, &["cluster", "join", &admin[1], "--admin", &admin[2]]);

    let mut leader = None;
    for node in &nodes {
        let s = status(&bin, node);
        assert_eq!(voters(&s), vec![1, 2, 3], "{s}");
        let roles: Vec<&str> = s["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["role"].as_str().expect("role"))
            .collect();
        assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{s}");
        let l = s["leader"].as_u64().expect("a leader");
        assert_eq!(
            *leader.get_or_insert(l),
            l,
            "every node names the same leader"
        );
        // Lag comes from the leader; all caught up after the joins.
        assert!(
            s["members"]
                .as_array()
                .expect("members")
                .iter()
                .all(|m| m["lag"].as_u64().is_some()),
            "{s}"
        );
        assert!(s["term"].as_u64().expect("term") >= 1);
        let last_log = s["last_log_index"].as_u64().expect("last log index");
        assert!(
            last_log >= s["applied_index"].as_u64().expect("applied index"),
            "{s}"
        );
    }
    let leader = leader.expect("a leader");
    let table = ok(&bin, &["cluster", "status", "--admin", &admin[2]]);
    assert!(table.contains("NODE") && table.contains("LAG"), "{table}");
    let leader_rows = table
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("leader"))
        .count();
    assert_eq!(leader_rows, 1, "{table}");
    let follower = nodes
        .iter()
        .position(|n| n.id != leader)
        .expect("a follower");

    // A cluster-wide config entry, set through a follower, on every node.
    let started = Instant::now();
    ok(
        &bin,
        &[
            "config",
            "set",
            "log.level",
            "debug",
            "--cluster",
            "--admin",
            &admin[follower],
        ],
    );
    let committed = started.elapsed();
    let everyone: Vec<&Node> = nodes.iter().collect();
    let spread = until_everywhere(
        &everyone,
        Duration::from_secs(1),
        "log.level",
        |a| async move { config_value(a, "log.level").await.as_deref() == Some("\"debug\"") },
    );
    println!(
        "config: committed after {committed:?} (CLI included), on every node {spread:?} later"
    );

    // A stream created through the admin API is in every node's metadata.
    let started = Instant::now();
    ok(
        &bin,
        &["stream", "create", "4242", "--admin", &admin[follower]],
    );
    let committed = started.elapsed();
    let spread = until_everywhere(
        &everyone,
        Duration::from_secs(1),
        "stream 4242",
        |a| async move {
            raft_status(a)
                .await
                .is_some_and(|s| s.streams.iter().any(|st| st.stream_id == 4242))
        },
    );
    println!("stream: created after {committed:?} (CLI included), on every node {spread:?} later");
    ok(
        &bin,
        &["stream", "describe", "4242", "--admin", &admin[follower]],
    );
    let other = (follower + 1) % 3;
    let exists = fails(
        &bin,
        &["stream", "create", "4242", "--admin", &admin[other]],
    );
    assert!(exists.contains("exists"), "{exists}");
    let refused = fails(
        &bin,
        &[
            "stream",
            "create",
            "4243",
            "--replication-factor",
            "3",
            "--admin",
            &admin[other],
        ],
    );
    assert!(refused.contains("replication"), "{refused}");

    // Kill the Raft leader; the two others elect a new one.
    let dead = nodes
        .iter()
        .position(|n| n.id == leader)
        .expect("the leader's process");
    nodes[dead].kill9();
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id != leader).collect();
    let elected = until_everywhere(
        &survivors,
        Duration::from_secs(10),
        "a new leader",
        |a| async move {
            raft_status(a)
                .await
                .is_some_and(|s| s.leader.is_some_and(|l| l != leader) && s.state != "Candidate")
        },
    );
    println!("failover: new leader known to both survivors {elected:?} after SIGKILL");
    let s = status(&bin, survivors[0]);
    let new_leader = s["leader"].as_u64().expect("new leader");
    assert_ne!(new_leader, leader, "{s}");
    assert!(s["lag_from_leader"].as_bool().expect("flag"), "{s}");
    let s1 = status(&bin, survivors[1]);
    assert_eq!(s1["leader"].as_u64(), Some(new_leader), "{s1}");
    assert!(s1["term"].as_u64() > Some(1), "{s1}");
    let dead_admin = nodes[dead].admin.clone();
    let unreachable = fails(
        &bin,
        &[
            "cluster",
            "status",
            "--admin",
            &dead_admin,
            "--timeout",
            "2",
        ],
    );
    assert!(unreachable.contains(&dead_admin), "{unreachable}");

    // Remove the dead node through a survivor; the two left still commit.
    let dead_id = leader.to_string();
    ok(
        &bin,
        &[
            "cluster",
            "leave",
            "--node",
            &dead_id,
            "--admin",
            &survivors[1].admin,
        ],
    );
    for node in &survivors {
        let s = status(&bin, node);
        let mut expected: Vec<u64> = survivors.iter().map(|n| n.id).collect();
        expected.sort();
        assert_eq!(voters(&s), expected, "{s}");
    }
    let not_member = fails(
        &bin,
        &[
            "cluster",
            "leave",
            "--node",
            &dead_id,
            "--admin",
            &survivors[0].admin,
        ],
    );
    assert!(not_member.contains("not a member"), "{not_member}");
    ok(
        &bin,
        &[
            "config",
            "set",
            "log.level",
            "info",
            "--cluster",
            "--admin",
            &survivors[0].admin,
        ],
    );
    until_everywhere(
        &survivors,
        Duration::from_secs(1),
        "log.level info",
        |a| async move { config_value(a, "log.level").await.as_deref() == Some("\"info\"") },
    );
}
