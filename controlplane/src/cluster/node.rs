//! [`ClusterNode`]: one member of the metadata Raft group, with its cluster
//! gRPC server. Start it, `init` the first members once, `join`/`leave` to
//! change membership (openraft's joint consensus), `propose` metadata
//! commands (forwarded to the leader), read `status` and `metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::log_store::LogStore;
use super::network::{self, MESSAGE_BYTES_MAX, NetworkFactory, RaftService};
use super::pb::cluster_raft_server::ClusterRaftServer;
use super::pb::{JoinRequest, LeaveRequest, MembershipReply};
use super::state_machine::StateMachineStore;
use super::{ClusterMetadata, LogId, MemberAddr, MetadataCommand, MetadataResponse, NodeId, Raft};

/// How to start a [`ClusterNode`].
#[derive(Debug, Clone)]
pub struct ClusterNodeConfig {
    /// This node's id (unique in the cluster, never reused).
    pub id: NodeId,
    /// Address the cluster gRPC server binds (port 0 picks a free port).
    pub raft_bind: SocketAddr,
    /// `host:port` the other members dial; `None`: the bound address.
    pub advertise_addr: Option<String>,
    /// This node's data-plane address, published to the cluster.
    pub data_addr: String,
    /// Directory for the Raft log, vote and snapshots.
    pub dir: PathBuf,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout range, lower bound (randomized by openraft per term).
    pub election_timeout_min_ms: u64,
    /// Election timeout range, upper bound.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept in the log after a snapshot (lagging followers read them
    /// instead of receiving the snapshot).
    pub logs_kept_after_snapshot: u64,
}

impl ClusterNodeConfig {
    /// Defaults for node `id` with its files in `dir`: loopback port 0,
    /// 50 ms heartbeats, 150-300 ms election timeouts, a snapshot every
    /// 5000 entries.
    pub fn new(id: NodeId, dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            raft_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_addr: None,
            data_addr: String::new(),
            dir: dir.into(),
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            snapshot_after_logs: 5000,
            logs_kept_after_snapshot: 1000,
        }
    }
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The Raft configuration is invalid (e.g. heartbeat not below the
    /// election timeout).
    #[error("invalid raft config: {0}")]
    Config(String),
    /// Opening the log or state machine, or binding the server, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// openraft refused to start (storage error while loading state).
    #[error("raft start: {0}")]
    Raft(String),
}

/// Why a proposal or membership change failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    /// This node is not the leader; retry at `leader_addr` if known.
    #[error("not the leader; leader is {leader_id:?} at {leader_addr:?}")]
    NotLeader {
        /// The leader this node knows of.
        leader_id: Option<NodeId>,
        /// The leader's cluster address.
        leader_addr: Option<String>,
    },
    /// The leader could not be reached for forwarding.
    #[error("leader at {addr} unreachable: {message}")]
    Unreachable {
        /// The address tried.
        addr: String,
        /// The transport error.
        message: String,
    },
    /// A membership change was refused (e.g. another one in progress, or a
    /// node that is not a learner yet).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Raft stopped on this node (shut down or a storage failure).
    #[error("raft stopped: {0}")]
    Fatal(String),
}

fn from_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, MemberAddr>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader {
            leader_id: f.leader_id,
            leader_addr: f.leader_node.map(|n| n.raft_addr),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            ProposeError::Membership(c.to_string())
        }
        RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
    }
}

/// How long a membership change waits for an earlier one to commit (a new
/// leader's initial membership is uncommitted until its first entry commits).
const MEMBERSHIP_IN_PROGRESS_WAIT: Duration = Duration::from_secs(3);

/// Run a membership change, retrying while another one is still being
/// committed, up to [`MEMBERSHIP_IN_PROGRESS_WAIT`].
async fn retry_in_progress<F, Fut>(mut change: F) -> Result<(), ProposeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<
            Output = Result<
                openraft::raft::ClientWriteResponse<super::TypeConfig>,
                RaftError<NodeId, ClientWriteError<NodeId, MemberAddr>>,
            >,
        >,
{
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_IN_PROGRESS_WAIT;
    loop {
        match change().await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(from_write_error(e)),
        }
    }
}

/// This node's Raft as the API and the gRPC service use it: proposals,
/// membership changes (both answer `NotLeader` off the leader) and status.
pub(crate) struct Local {
    pub(crate) id: NodeId,
    pub(crate) raft: Raft,
    /// This node's published addresses.
    pub(crate) addr: MemberAddr,
    /// The applied metadata (streams and config for `Status`).
    pub(crate) state_machine: StateMachineStore,
    /// Where this broker's shard logs end (set once data replication runs).
    pub(crate) positions: std::sync::OnceLock<PositionSource>,
    /// Planned leadership transfers of shards led here (set once data
    /// replication runs).
    pub(crate) transfers: std::sync::OnceLock<TransferQueue>,
}

/// A planned move of a shard's leadership (`kaelix cluster transfer`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransferRequest {
    /// Shard id.
    pub shard: u32,
    /// The new leader (one of the shard's followers); `None`: the follower
    /// whose log goes furthest.
    pub to: Option<NodeId>,
    /// Already forwarded once (a member that does not lead the shard
    /// forwards to the one the metadata names, which must serve it).
    #[serde(default)]
    pub forwarded: bool,
}

/// What a planned transfer did, with its timings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransferReport {
    /// Shard id.
    pub shard: u32,
    /// The former leader.
    pub from: NodeId,
    /// The new leader.
    pub to: NodeId,
    /// The new leader's epoch.
    pub epoch: u64,
    /// Where the shard's log ended when the old leader stopped taking
    /// writes (the new leader had all of it before the switch).
    pub position: u64,
    /// From the request to the new leader having the whole log (ms).
    pub caught_up_ms: f64,
    /// From the request to the new leader recorded in the metadata (ms).
    pub recorded_ms: f64,
    /// From the request to the new leader taking writes (ms; `None` if it
    /// did not say so within 2 s).
    pub leading_ms: Option<f64>,
}

/// How the cluster RPC hands a transfer to the broker's replication task.
pub type TransferQueue = tokio::sync::mpsc::Sender<(
    TransferRequest,
    tokio::sync::oneshot::Sender<Result<TransferReport, String>>,
)>;

/// Where one shard's log ends on a node, as the failover controller asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardPosition {
    /// Shard id.
    pub shard: u32,
    /// The log's appended position.
    pub appended: u64,
    /// The node leads the shard now.
    pub leading: bool,
    /// The leader epoch this node's log of the shard is known to agree
    /// with: the epoch it leads, or the last epoch whose leader it followed
    /// (a session accepted by that leader); 0 since it started otherwise.
    /// Only replicas at the shard's current epoch may take over.
    #[serde(default)]
    pub epoch: u64,
}

/// Reads a broker's [`ShardPosition`]s; the argument says whether the
/// question comes from the failover controller (which renews the shard
/// leaders' leases) or from anybody else (which must not).
pub type PositionSource = std::sync::Arc<dyn Fn(bool) -> Vec<ShardPosition> + Send + Sync>;

/// A `ShardPositions` question (JSON; `null`, as older callers send, is a
/// question that renews nothing).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PositionsQuery {
    /// Asked by the failover controller of the current Raft leader, which
    /// confirmed its leadership this round: renews the leader lease.
    #[serde(default)]
    pub renew_lease: bool,
}

impl Local {
    /// Serve a transfer here when this node leads the shard (per the
    /// applied metadata); otherwise forward it once to the leader.
    pub(crate) async fn transfer_shard(
        &self,
        request: TransferRequest,
    ) -> Result<TransferReport, String> {
        let metadata = self.state_machine.metadata();
        let shard = request.shard;
        let assignment = metadata.shards.get(&shard).ok_or_else(|| {
            format!(
                "shard {shard} has no replica set (cluster.replication_factor is 0, or the shard \
                 is not assigned yet)"
            )
        })?;
        if assignment.leader == self.id {
            let queue = self.transfers.get().ok_or_else(|| {
                "this broker does not run data replication (cluster.replication_factor)".to_string()
            })?;
            let (reply, answer) = tokio::sync::oneshot::channel();
            queue
                .send((request, reply))
                .await
                .map_err(|_| "the broker is stopping".to_string())?;
            return answer
                .await
                .map_err(|_| "the broker stopped during the transfer".to_string())?;
        }
        if request.forwarded {
            return Err(format!(
                "shard {shard}: this node ({}) does not lead it (node {} does at epoch {}); \
                 leadership moved meanwhile: try again",
                self.id, assignment.leader, assignment.epoch
            ));
        }
        let leader = metadata.members.get(&assignment.leader).ok_or_else(|| {
            format!(
                "shard {shard}: its leader, node {}, is no member",
                assignment.leader
            )
        })?;
        forward_transfer(
            &leader.raft_addr,
            TransferRequest {
                forwarded: true,
                ..request
            },
        )
        .await
    }
}

impl Local {
    /// Propose on this node; fails with `NotLeader` unless it leads.
    pub(crate) async fn propose(
        &self,
        command: MetadataCommand,
    ) -> Result<(LogId, MetadataResponse), ProposeError> {
        let reply = self
            .raft
            .client_write(command)
            .await
            .map_err(from_write_error)?;
        // Tell the followers the entry is committed now rather than with
        // the next heartbeat: a shard's new leader (on another node) takes
        // writes once it applied the change. Metadata changes are rare.
        let _ = self.raft.trigger().heartbeat().await;
        Ok((reply.log_id, reply.data))
    }

    /// Form a new cluster of `members` (voters).
    pub(crate) async fn init(
        &self,
        members: BTreeMap<NodeId, MemberAddr>,
    ) -> Result<(), ProposeError> {
        if members.is_empty() {
            return Err(ProposeError::Membership(
                "init needs at least one member".into(),
            ));
        }
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(api) => ProposeError::Membership(api.to_string()),
            RaftError::Fatal(f) => ProposeError::Fatal(f.to_string()),
        })
    }

    /// Add `id` as a learner, wait for it to catch up, make it a voter.
    pub(crate) async fn join(&self, id: NodeId, addr: MemberAddr) -> Result<(), ProposeError> {
        retry_in_progress(|| self.raft.add_learner(id, addr.clone(), true)).await?;
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await
    }

    /// Remove `id` from the voters, then from the members.
    pub(crate) async fn leave(&self, id: NodeId) -> Result<(), ProposeError> {
        // openraft accepts removing an unknown node as a no-op; the leader
        // says so instead (followers forward, so the leader's view decides).
        let status = self.status();
        if status.leader == Some(self.id) && !status.members.contains_key(&id) {
            return Err(ProposeError::Membership(format!(
                "node {id} is not a member"
            )));
        }
        self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await?;
        self.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])))
            .await
    }

    pub(crate) async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, MemberAddr>,
    ) -> Result<(), ProposeError> {
        retry_in_progress(|| self.raft.change_membership(change.clone(), false)).await
    }

    /// The leader's address when `e` says another node leads and names it.
    pub(crate) fn leader_elsewhere<'e>(&self, e: &'e ProposeError) -> Option<&'e str> {
        match e {
            ProposeError::NotLeader {
                leader_id: Some(leader),
                leader_addr: Some(addr),
            } if *leader != self.id => Some(addr),
            _ => None,
        }
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let last = m.last_log_index.unwrap_or(0);
        let followers = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .filter(|(id, _)| **id != self.id)
                    .map(|(id, matched)| {
                        let matched_index = matched.map(|l| l.index);
                        FollowerProgress {
                            id: *id,
                            matched_index,
                            lag: matched_index.map_or(last + 1, |i| last.saturating_sub(i)),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let membership = m.membership_config.membership();
        ClusterStatus {
            id: self.id,
            state: state_name(m.state).to_string(),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            members: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            followers,
        }
    }
}

/// One follower's replication progress, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerProgress {
    /// The follower (voter or learner).
    pub id: NodeId,
    /// Highest log index known to match the leader's log.
    pub matched_index: Option<u64>,
    /// Entries the follower is behind the leader's last log index.
    pub lag: u64,
}

/// A node's view of the cluster.
#[derive(Debug, Clone)]
pub struct ClusterStatus {
    /// This node.
    pub id: NodeId,
    /// Leader, Follower, Candidate, Learner or Shutdown.
    pub state: String,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last index in this node's log.
    pub last_log_index: Option<u64>,
    /// Last index applied to this node's state machine.
    pub applied_index: Option<u64>,
    /// Voters of the effective membership (both halves while joint).
    pub voters: BTreeSet<NodeId>,
    /// Every member, voters and learners.
    pub members: BTreeMap<NodeId, MemberAddr>,
    /// Replication progress per follower; filled on the leader only.
    pub followers: Vec<FollowerProgress>,
}

/// A running member of the metadata Raft group.
pub struct ClusterNode {
    id: NodeId,
    raft: Raft,
    state_machine: StateMachineStore,
    local: Arc<Local>,
    addr: MemberAddr,
    server_stop: Mutex<Option<oneshot::Sender<()>>>,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl ClusterNode {
    /// Open the node's files in `config.dir`, start Raft and the cluster
    /// gRPC server. A node restarted from its directory resumes with its
    /// log, vote and last snapshot.
    pub async fn start(config: ClusterNodeConfig) -> Result<Self, StartError> {
        let raft_config = Config {
            cluster_name: "kaelix".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_logs),
            max_in_snapshot_log_to_keep: config.logs_kept_after_snapshot,
            ..Config::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;
        let io = |what: &str| {
            let what = format!("{what} in {}", config.dir.display());
            move |source| StartError::Io { what, source }
        };
        let log_store = LogStore::open(config.dir.join("raft")).map_err(io("open raft log"))?;
        let state_machine =
            StateMachineStore::open(config.dir.join("state")).map_err(io("open state machine"))?;
        let listener = TcpListener::bind(config.raft_bind)
            .await
            .map_err(io(&format!("bind {}", config.raft_bind)))?;
        let bound = listener.local_addr().map_err(io("local address"))?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            NetworkFactory,
            log_store,
            state_machine.clone(),
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let addr = MemberAddr {
            raft_addr: config
                .advertise_addr
                .clone()
                .unwrap_or_else(|| bound.to_string()),
            data_addr: config.data_addr.clone(),
        };
        let local = Arc::new(Local {
            id: config.id,
            raft: raft.clone(),
            addr: addr.clone(),
            state_machine: state_machine.clone(),
            positions: std::sync::OnceLock::new(),
            transfers: std::sync::OnceLock::new(),
        });
        let service = ClusterRaftServer::new(RaftService::new(local.clone()))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let (stop_tx, stop_rx) = oneshot::channel();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let id = config.id;
        let server = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(node = id, error = %e, "cluster gRPC server failed");
            }
        });
        Ok(Self {
            id: config.id,
            raft,
            state_machine,
            local,
            addr,
            server_stop: Mutex::new(Some(stop_tx)),
            server: Mutex::new(Some(server)),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// This node's published addresses (the advertised cluster address,
    /// else the bound one).
    pub fn addr(&self) -> &MemberAddr {
        &self.addr
    }

    /// The cluster RPCs (Raft, forwarding and the admin calls of `kaelix
    /// cluster`) as a service to add to another gRPC server, such as the
    /// broker's admin API.
    pub fn service(&self) -> ClusterRaftServer<RaftService> {
        ClusterRaftServer::new(RaftService::new(self.local.clone()))
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The openraft handle, for what this API does not cover.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Form a new cluster of `members` (voters). Call once, on one node, on
    /// a fresh cluster; every member must be started.
    pub async fn init(&self, members: BTreeMap<NodeId, MemberAddr>) -> Result<(), ProposeError> {
        self.local.init(members).await
    }

    /// Add node `id` as a learner, wait until it has caught up, then make it
    /// a voter (joint consensus). On a follower it is forwarded to the leader.
    pub async fn join(&self, id: NodeId, addr: MemberAddr) -> Result<(), ProposeError> {
        match self.local.join(id, addr.clone()).await {
            Err(e) => match self.local.leader_elsewhere(&e) {
                Some(leader) => forward_join(leader, id, &addr).await,
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// Add node `id` as a non-voting learner and wait for it to catch up.
    /// Call on the leader.
    pub async fn add_learner(&self, id: NodeId, addr: MemberAddr) -> Result<(), ProposeError> {
        retry_in_progress(|| self.raft.add_learner(id, addr.clone(), true)).await
    }

    /// Remove node `id` from the voters and the members. On a follower it is
    /// forwarded to the leader. The removed node keeps running until it is
    /// shut down; it no longer counts for any quorum.
    pub async fn leave(&self, id: NodeId) -> Result<(), ProposeError> {
        match self.local.leave(id).await {
            Err(e) => match self.local.leader_elsewhere(&e) {
                Some(leader) => forward_leave(leader, id).await,
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// Apply a membership change through joint consensus. Call on the leader.
    pub async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, MemberAddr>,
    ) -> Result<(), ProposeError> {
        self.local.change_membership(change).await
    }

    /// Propose a metadata command; on a follower it is forwarded to the
    /// leader. Returns once the command is committed and applied on the
    /// leader, with the log id it got and the state machine's answer.
    pub async fn propose(
        &self,
        command: MetadataCommand,
    ) -> Result<(LogId, MetadataResponse), ProposeError> {
        match self.local.propose(command.clone()).await {
            Err(e) => match self.local.leader_elsewhere(&e) {
                Some(leader) => forward_propose(leader, &command).await,
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// Answer `ShardPositions` from `source` (once; later calls are ignored).
    pub fn set_position_source(&self, source: PositionSource) {
        let _ = self.local.positions.set(source);
    }

    /// Serve `TransferShard` for the shards led here through `queue` (once).
    pub(crate) fn set_transfer_queue(&self, queue: TransferQueue) {
        let _ = self.local.transfers.set(queue);
    }

    /// Move `request.shard`'s leadership as planned: served by the shard's
    /// leader (asked through the cluster RPC when that is another member).
    pub async fn transfer_shard(&self, request: TransferRequest) -> Result<TransferReport, String> {
        self.local.transfer_shard(request).await
    }

    /// A copy of this node's applied metadata.
    pub fn metadata(&self) -> ClusterMetadata {
        self.state_machine.metadata()
    }

    /// This node's view: state, leader, term, last log and applied indexes,
    /// membership and (on the leader) each follower's progress.
    pub fn status(&self) -> ClusterStatus {
        self.local.status()
    }

    /// Wait until this node knows a leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let waited = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await;
        waited.ok().and_then(|m| m.current_leader)
    }

    /// Stop Raft and the cluster server. The files stay for a restart.
    /// A second call does nothing.
    pub async fn shutdown(&self) {
        let stop = lock(&self.server_stop).take();
        let server = lock(&self.server).take();
        let Some(mut server) = server else {
            return;
        };
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node = self.id, error = %e, "raft shutdown");
        }
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        // Graceful shutdown waits for open HTTP/2 connections; peers keep
        // theirs open, so give it a moment, then drop the server.
        if tokio::time::timeout(Duration::from_millis(200), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each guarded value is taken whole, so it is consistent after a panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "Leader",
        ServerState::Follower => "Follower",
        ServerState::Candidate => "Candidate",
        ServerState::Learner => "Learner",
        ServerState::Shutdown => "Shutdown",
    }
}

fn unreachable(addr: &str, message: impl ToString) -> ProposeError {
    ProposeError::Unreachable {
        addr: addr.to_string(),
        message: message.to_string(),
    }
}

/// Send a proposal to the leader at `addr`.
pub(crate) async fn forward_propose(
    addr: &str,
    command: &MetadataCommand,
) -> Result<(LogId, MetadataResponse), ProposeError> {
    let mut client = network::client(addr).map_err(|e| unreachable(addr, e))?;
    let request = network::encode(command).map_err(|e| unreachable(addr, e))?;
    let reply = client
        .propose(request)
        .await
        .map_err(|s| unreachable(addr, s))?;
    network::decode(reply.get_ref())
        .map_err(|e| unreachable(addr, format!("undecodable reply: {e}")))?
}

/// Ask the leader at `addr` to add node `id`.
pub(crate) async fn forward_join(
    addr: &str,
    id: NodeId,
    member: &MemberAddr,
) -> Result<(), ProposeError> {
    let mut client = network::client(addr).map_err(|e| unreachable(addr, e))?;
    let request = JoinRequest {
        id,
        raft_addr: member.raft_addr.clone(),
        data_addr: member.data_addr.clone(),
        forwarded: true,
    };
    let reply = client
        .join(request)
        .await
        .map_err(|s| unreachable(addr, s))?;
    membership_result(reply.into_inner())
}

/// Ask the leader at `addr` to remove node `id`.
pub(crate) async fn forward_leave(addr: &str, id: NodeId) -> Result<(), ProposeError> {
    let mut client = network::client(addr).map_err(|e| unreachable(addr, e))?;
    let reply = client
        .leave(LeaveRequest {
            id,
            forwarded: true,
        })
        .await
        .map_err(|s| unreachable(addr, s))?;
    membership_result(reply.into_inner())
}

/// A membership outcome as its reply message.
pub(crate) fn membership_reply(result: Result<(), ProposeError>) -> MembershipReply {
    match result {
        Ok(()) => MembershipReply::default(),
        Err(e) => {
            let (leader_id, leader_addr) = match &e {
                ProposeError::NotLeader {
                    leader_id,
                    leader_addr,
                } => (*leader_id, leader_addr.clone().unwrap_or_default()),
                _ => (None, String::new()),
            };
            MembershipReply {
                error: e.to_string(),
                leader_id,
                leader_addr,
            }
        }
    }
}

fn membership_result(reply: MembershipReply) -> Result<(), ProposeError> {
    if reply.error.is_empty() {
        Ok(())
    } else if reply.leader_id.is_some() || !reply.leader_addr.is_empty() {
        Err(ProposeError::NotLeader {
            leader_id: reply.leader_id,
            leader_addr: Some(reply.leader_addr).filter(|a| !a.is_empty()),
        })
    } else {
        Err(ProposeError::Membership(reply.error))
    }
}

/// Send a transfer to the shard's leader at `addr` (its cluster address).
async fn forward_transfer(addr: &str, request: TransferRequest) -> Result<TransferReport, String> {
    let mut client = network::client(addr).map_err(|e| format!("leader at {addr}: {e}"))?;
    let message = network::encode(&request).map_err(|e| e.to_string())?;
    let reply = client
        .transfer_shard(message)
        .await
        .map_err(|status| format!("leader at {addr}: {}", status.message()))?;
    network::decode::<Result<TransferReport, String>>(reply.get_ref())
        .map_err(|e| format!("leader at {addr}: undecodable reply: {e}"))?
}

/// Ask the node at `addr` (its cluster address) where its shard logs end.
pub async fn shard_positions(
    addr: &str,
    timeout: Duration,
) -> Result<Vec<ShardPosition>, ProposeError> {
    ask_shard_positions(addr, timeout, false)
        .await
        .map_err(|(_, err)| err)
}

/// [`shard_positions`], the error paired with whether the connection was
/// refused: nothing listens at `addr`, so the node's process is gone (or
/// stopping: a broker stops its data replication before its cluster
/// listener, so a refusing node commits nothing).
pub(crate) async fn ask_shard_positions(
    addr: &str,
    timeout: Duration,
    renew_lease: bool,
) -> Result<Vec<ShardPosition>, (bool, ProposeError)> {
    let call = async {
        let mut client = network::client(addr).map_err(|e| (false, unreachable(addr, e)))?;
        let request = network::encode(&PositionsQuery { renew_lease })
            .map_err(|e| (false, unreachable(addr, e)))?;
        let reply = client
            .shard_positions(request)
            .await
            .map_err(|s| (connection_refused(&s), unreachable(addr, s)))?;
        network::decode::<Vec<ShardPosition>>(reply.get_ref())
            .map_err(|e| (false, unreachable(addr, format!("undecodable reply: {e}"))))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| {
        (
            false,
            unreachable(addr, format!("no answer within {timeout:?}")),
        )
    })?
}

/// Whether `err` (or an error it wraps) is a refused TCP connection.
fn connection_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_refused_and_a_silent_one_is_not() {
        // Nothing listens: refused (the failover controller's fast path).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let err = ask_shard_positions(&addr, Duration::from_secs(2), false)
            .await
            .expect_err("nothing listens");
        assert!(err.0, "a closed port is a refused connection: {:?}", err.1);
        // Something accepts and never answers: silent, not refused.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
            }
        });
        let err = ask_shard_positions(&addr, Duration::from_millis(200), false)
            .await
            .expect_err("no answer");
        assert!(!err.0, "a silent peer is not refused: {:?}", err.1);
    }

    #[test]
    fn refusal_is_found_anywhere_in_the_error_chain() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "transport error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let refused = Wrapper(std::io::ErrorKind::ConnectionRefused.into());
        assert!(connection_refused(&refused));
        let reset = Wrapper(std::io::ErrorKind::ConnectionReset.into());
        assert!(!connection_refused(&reset));
    }
}
