//! The metadata Raft group (kaelix-controlplane `cluster`): three nodes in one
//! process on loopback, each with its own directory. Election, proposal
//! forwarding, replication to every state machine, leader loss, restart and
//! catch-up (from the log and from a snapshot), and removal from membership.
//!
//! Election timeouts are drawn from a seed; set `KAELIX_CLUSTER_SEED` to
//! replay one. The seed is printed when a test fails.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use kaelix_controlplane::cluster::{
    ClusterNode, ClusterNodeConfig, MemberAddr, MetadataCommand, MetadataResponse, NodeId,
};

const TEST_TIMEOUT: Duration = Duration::from_secs(30);
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(1);
const ELECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Prints the seed if the test panics.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "cluster test failed with seed {0}; replay with KAELIX_CLUSTER_SEED={0}",
                self.0
            );
        }
    }
}

fn seed() -> SeedGuard {
    let seed = std::env::var("KAELIX_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64
        });
    eprintln!("cluster test seed {seed}");
    SeedGuard(seed)
}

/// splitmix64: a small seeded generator for timings.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn config(id: NodeId, root: &Path, rng: &mut Rng) -> ClusterNodeConfig {
    let mut c = ClusterNodeConfig::new(id, root.join(format!("node-{id}")));
    c.data_addr = format!("127.0.0.1:{}", 7100 + id);
    c.heartbeat_ms = 50;
    c.election_timeout_min_ms = 200 + rng.next() % 100;
    c.election_timeout_max_ms = c.election_timeout_min_ms + 150;
    c
}

/// Start nodes 1..=3 and initialize the cluster from node 1.
async fn start_three(
    root: &Path,
    rng: &mut Rng,
    tweak: impl Fn(&mut ClusterNodeConfig),
) -> (Vec<Option<ClusterNode>>, Vec<ClusterNodeConfig>) {
    let mut nodes = Vec::new();
    let mut configs = Vec::new();
    for id in 1..=3 {
        let mut c = config(id, root, rng);
        tweak(&mut c);
        let node = ClusterNode::start(c.clone()).await.expect("start node");
        // Restarts reuse the bound port: peers know the node by it.
        c.raft_bind = node.addr().raft_addr.parse().expect("bound address");
        configs.push(c);
        nodes.push(Some(node));
    }
    let members: BTreeMap<NodeId, MemberAddr> = nodes
        .iter()
        .flatten()
        .map(|n| (n.id(), n.addr().clone()))
        .collect();
    nodes[0]
        .as_ref()
        .expect("node 1")
        .init(members)
        .await
        .expect("init");
    (nodes, configs)
}

/// Start node `id` again from its directory and port.
async fn restart(nodes: &mut [Option<ClusterNode>], configs: &[ClusterNodeConfig], id: NodeId) {
    let index = (id - 1) as usize;
    assert!(nodes[index].is_none(), "node {id} is running");
    nodes[index] = Some(
        ClusterNode::start(configs[index].clone())
            .await
            .expect("restart"),
    );
}

/// Stop node `id`, keeping its directory.
async fn stop(nodes: &mut [Option<ClusterNode>], id: NodeId) {
    nodes[(id - 1) as usize]
        .take()
        .expect("running node")
        .shutdown()
        .await;
}

async fn shutdown_all(nodes: Vec<Option<ClusterNode>>) {
    for n in nodes.into_iter().flatten() {
        n.shutdown().await;
    }
}

async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until every running node names the same leader, one of the running nodes.
async fn agreed_leader(nodes: &[Option<ClusterNode>]) -> NodeId {
    agreed_leader_among(nodes, &[1, 2, 3]).await
}

/// Wait until the running nodes among `ids` name the same leader, one of them.
async fn agreed_leader_among(nodes: &[Option<ClusterNode>], ids: &[NodeId]) -> NodeId {
    let mut leader = None;
    let agreed = wait_until(ELECTION_TIMEOUT, || {
        let running: Vec<&ClusterNode> = nodes
            .iter()
            .flatten()
            .filter(|n| ids.contains(&n.id()))
            .collect();
        let views: Vec<Option<NodeId>> = running.iter().map(|n| n.status().leader).collect();
        let first = views[0];
        let ok = first.is_some()
            && views.iter().all(|v| *v == first)
            && running
                .iter()
                .any(|n| Some(n.id()) == first && n.status().state == "Leader");
        leader = first;
        ok
    })
    .await;
    assert!(agreed, "no agreed leader within {ELECTION_TIMEOUT:?}");
    leader.expect("agreed leader")
}

fn node(nodes: &[Option<ClusterNode>], id: NodeId) -> &ClusterNode {
    nodes[(id - 1) as usize].as_ref().expect("running node")
}

fn create_stream(stream_id: u32, replicas: Vec<NodeId>) -> MetadataCommand {
    MetadataCommand::CreateStream {
        stream_id,
        durability: "fsync".into(),
        replication_factor: replicas.len() as u32,
        replicas,
        retention_bytes: None,
        retention_age_ns: None,
    }
}

/// Run one test with a seeded generator and a fresh directory, bounded in
/// time; the seed is printed if it fails.
async fn run_seeded<F, Fut>(test: F)
where
    F: FnOnce(Rng, tempfile::TempDir) -> Fut,
    Fut: Future<Output = ()>,
{
    let guard = seed();
    let root = tempfile::tempdir().expect("tempdir");
    tokio::time::timeout(TEST_TIMEOUT, test(Rng(guard.0), root))
        .await
        .expect("test took over 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_elects_replicates_fails_over_and_restarted_node_catches_up() {
    run_seeded(|mut rng, root| async move {
        let (mut nodes, configs) = start_three(root.path(), &mut rng, |_| {}).await;
        let leader = agreed_leader(&nodes).await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");

        // Proposed on a follower: forwarded to the leader.
        let (_, response) = node(&nodes, follower)
            .propose(create_stream(1, vec![1, 2, 3]))
            .await
            .expect("propose via follower");
        assert_eq!(response, MetadataResponse::Ok);
        let started = Instant::now();
        let seen = wait_until(REPLICATION_TIMEOUT, || {
            nodes
                .iter()
                .flatten()
                .all(|n| n.metadata().streams.contains_key(&1))
        })
        .await;
        assert!(
            seen,
            "stream 1 not on every node within {REPLICATION_TIMEOUT:?}"
        );
        eprintln!("stream 1 on all nodes {:?} after commit", started.elapsed());
        let (_, again) = node(&nodes, leader)
            .propose(create_stream(1, vec![1]))
            .await
            .expect("propose duplicate");
        assert!(matches!(again, MetadataResponse::Rejected(_)), "{again:?}");

        // Every node sees the members with both addresses.
        for n in nodes.iter().flatten() {
            let md = n.metadata();
            assert_eq!(md.members.len(), 3);
            assert_eq!(md.members[&2].data_addr, "127.0.0.1:7102");
        }
        // The leader reports its followers' progress.
        let caught_up = wait_until(REPLICATION_TIMEOUT, || {
            let s = node(&nodes, leader).status();
            s.followers.len() == 2 && s.followers.iter().all(|f| f.lag == 0)
        })
        .await;
        assert!(
            caught_up,
            "followers not caught up: {:?}",
            node(&nodes, leader).status()
        );

        // Stop the leader: the other two elect a new one and carry on.
        let old_leader = leader;
        stop(&mut nodes, old_leader).await;
        let leader = agreed_leader(&nodes).await;
        assert_ne!(leader, old_leader);
        let proposer = nodes
            .iter()
            .flatten()
            .find(|n| n.id() != leader)
            .expect("follower");
        proposer
            .propose(create_stream(2, vec![leader]))
            .await
            .expect("propose after failover");
        proposer
            .propose(MetadataCommand::SetConfig {
                key: "retention.max_age_s".into(),
                value: "3600".into(),
            })
            .await
            .expect("set config");
        let seen = wait_until(REPLICATION_TIMEOUT, || {
            nodes.iter().flatten().all(|n| {
                let md = n.metadata();
                md.streams.contains_key(&2)
                    && md.config.get("retention.max_age_s").map(String::as_str) == Some("3600")
            })
        })
        .await;
        assert!(seen, "stream 2 and config not on both remaining nodes");
        let term_before = node(&nodes, leader).status().term;

        // Restart the old leader from its directory: it catches up.
        restart(&mut nodes, &configs, old_leader).await;
        let seen = wait_until(ELECTION_TIMEOUT, || {
            let md = node(&nodes, old_leader).metadata();
            md.streams.contains_key(&1)
                && md.streams.contains_key(&2)
                && md.config.contains_key("retention.max_age_s")
        })
        .await;
        assert!(
            seen,
            "restarted node did not catch up: {:?}",
            node(&nodes, old_leader).status()
        );
        let status = node(&nodes, old_leader).status();
        assert!(status.term >= term_before);
        assert_eq!(status.leader, Some(leader));
        shutdown_all(nodes).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lagging_node_catches_up_from_a_snapshot() {
    run_seeded(|mut rng, root| async move {
        let (mut nodes, configs) = start_three(root.path(), &mut rng, |c| {
            c.snapshot_after_logs = 5;
            c.logs_kept_after_snapshot = 0;
        })
        .await;
        let leader = agreed_leader(&nodes).await;
        let lagging = (1..=3).find(|id| *id != leader).expect("a follower");
        stop(&mut nodes, lagging).await;

        // Enough entries for the leader to snapshot and purge its log.
        for i in 0..30 {
            node(&nodes, leader)
                .propose(MetadataCommand::SetConfig {
                    key: format!("key.{i}"),
                    value: i.to_string(),
                })
                .await
                .expect("propose");
        }
        let purged = wait_until(ELECTION_TIMEOUT, || {
            node(&nodes, leader)
                .raft()
                .metrics()
                .borrow()
                .purged
                .is_some_and(|p| p.index >= 20)
        })
        .await;
        assert!(purged, "leader did not snapshot and purge");

        restart(&mut nodes, &configs, lagging).await;
        let seen = wait_until(ELECTION_TIMEOUT, || {
            node(&nodes, lagging).metadata().config.len() == 30
        })
        .await;
        assert!(
            seen,
            "lagging node did not catch up: {:?}",
            node(&nodes, lagging).status()
        );
        let snapshot = node(&nodes, lagging).raft().metrics().borrow().snapshot;
        assert!(
            snapshot.is_some_and(|s| s.index >= 20),
            "no snapshot installed: {snapshot:?}"
        );
        assert_eq!(
            node(&nodes, lagging).metadata(),
            node(&nodes, leader).metadata()
        );
        shutdown_all(nodes).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_removed_node_no_longer_votes() {
    run_seeded(|mut rng, root| async move {
        let (mut nodes, configs) = start_three(root.path(), &mut rng, |_| {}).await;
        let leader = agreed_leader(&nodes).await;
        let mut others = (1..=3).filter(|id| *id != leader);
        let removed = others.next().expect("follower");
        let remaining = others.next().expect("follower");

        node(&nodes, leader).leave(removed).await.expect("leave");
        let status = node(&nodes, leader).status();
        assert_eq!(status.voters, [leader, remaining].into_iter().collect());
        assert!(!status.members.contains_key(&removed));
        let gone = wait_until(REPLICATION_TIMEOUT, || {
            !node(&nodes, remaining)
                .metadata()
                .members
                .contains_key(&removed)
        })
        .await;
        assert!(gone, "member list on node {remaining} still has {removed}");

        // With the other voter down, the removed node (still running) cannot
        // make a quorum: nothing commits.
        stop(&mut nodes, remaining).await;
        let stuck = tokio::time::timeout(
            Duration::from_millis(1500),
            node(&nodes, leader).propose(create_stream(9, vec![leader])),
        )
        .await;
        assert!(
            !matches!(stuck, Ok(Ok(_))),
            "committed without a quorum of the new membership: {stuck:?}"
        );
        assert!(!node(&nodes, removed).metadata().streams.contains_key(&9));

        // The voter comes back: the cluster commits again.
        restart(&mut nodes, &configs, remaining).await;
        let leader = agreed_leader_among(&nodes, &[leader, remaining]).await;
        assert_ne!(leader, removed);
        let proposer = node(&nodes, remaining);
        proposer
            .propose(create_stream(10, vec![leader]))
            .await
            .expect("propose after restart");
        let seen = wait_until(REPLICATION_TIMEOUT, || {
            node(&nodes, remaining).metadata().streams.contains_key(&10)
        })
        .await;
        assert!(seen);
        assert!(!node(&nodes, removed).metadata().streams.contains_key(&10));
        shutdown_all(nodes).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_admin_rpcs_join_status_and_leave_through_any_member() {
    use kaelix_controlplane::cluster::network;
    use kaelix_controlplane::cluster::pb::{
        InitRequest, JoinRequest, LeaveRequest, Member, StatusRequest,
    };

    run_seeded(|mut rng, root| async move {
        let mut nodes = Vec::new();
        for id in 1..=3 {
            let c = config(id, root.path(), &mut rng);
            nodes.push(Some(ClusterNode::start(c).await.expect("start")));
        }
        // A two-node cluster, formed over the Init RPC; node 3 runs but is
        // not a member yet.
        let members = [1, 2]
            .iter()
            .map(|id| {
                let addr = node(&nodes, *id).addr();
                Member {
                    id: *id,
                    raft_addr: addr.raft_addr.clone(),
                    data_addr: addr.data_addr.clone(),
                    voter: true,
                }
            })
            .collect();
        let mut on_node_1 = network::client(&node(&nodes, 1).addr().raft_addr).expect("client");
        let reply = on_node_1
            .init(InitRequest { members })
            .await
            .expect("init rpc")
            .into_inner();
        assert_eq!(reply.error, "", "{reply:?}");
        let again = on_node_1
            .init(InitRequest {
                members: Vec::new(),
            })
            .await
            .expect("init rpc")
            .into_inner();
        assert!(!again.error.is_empty(), "empty init accepted");
        let leader = agreed_leader_among(&nodes, &[1, 2]).await;
        let follower = if leader == 1 { 2 } else { 1 };
        let mut via_follower =
            network::client(&node(&nodes, follower).addr().raft_addr).expect("client");

        // Join through the follower: forwarded to the leader.
        let third = node(&nodes, 3).addr().clone();
        let reply = via_follower
            .join(JoinRequest {
                id: 3,
                raft_addr: third.raft_addr.clone(),
                data_addr: third.data_addr.clone(),
                forwarded: false,
            })
            .await
            .expect("join rpc")
            .into_inner();
        assert_eq!(reply.error, "", "{reply:?}");
        let mut on_leader =
            network::client(&node(&nodes, leader).addr().raft_addr).expect("client");
        let status = on_leader
            .status(StatusRequest {})
            .await
            .expect("status rpc")
            .into_inner();
        assert_eq!(status.leader, Some(leader));
        assert_eq!(status.state, "Leader");
        assert!(status.term >= 1);
        let voters: Vec<u64> = status
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect();
        assert_eq!(voters, vec![1, 2, 3]);
        assert_eq!(status.followers.len(), 2);
        let synced = wait_until(REPLICATION_TIMEOUT, || {
            node(&nodes, 3).status().leader == Some(leader)
        })
        .await;
        assert!(synced, "node 3 does not follow the leader");

        // Leave through the follower.
        let reply = via_follower
            .leave(LeaveRequest {
                id: 3,
                forwarded: false,
            })
            .await
            .expect("leave rpc")
            .into_inner();
        assert_eq!(reply.error, "", "{reply:?}");
        let status = on_leader
            .status(StatusRequest {})
            .await
            .expect("status rpc")
            .into_inner();
        let ids: Vec<u64> = status.members.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2]);

        // Leaving a node that is not a member is refused with a reason.
        let reply = via_follower
            .leave(LeaveRequest {
                id: 9,
                forwarded: false,
            })
            .await
            .expect("leave rpc")
            .into_inner();
        assert!(!reply.error.is_empty());
        stop(&mut nodes, 3).await;
        shutdown_all(nodes).await;
    })
    .await;
}
