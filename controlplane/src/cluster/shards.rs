//! Data replication in a running cluster: who leads each shard, and the
//! failover controller.
//!
//! Every member runs [`run`] when `cluster.replication_factor` > 0:
//!
//! - **Registration.** The broker records its replication listener and its
//!   shards' data addresses in the metadata (`RegisterNode`).
//! - **Reconciling roles.** For each of its shards the metadata names a
//!   leader (`shards`, with an epoch). A shard this broker leads accepts
//!   writes (its flows rebuilt from the log first, so retransmits of what
//!   another leader appended are recognised) and is served to its followers
//!   by one [`ReplicationLeader`]; a shard it follows rejects writes with a
//!   `not_leader` hint naming the leader's data address and appends what the
//!   leader sends ([`ReplicaFollower::start_on_shard`]). Until a shard is
//!   assigned, nobody takes writes for it.
//! - **Controller** (on the Raft leader only). Once `replication_factor`
//!   members have registered, it gives every unassigned shard a replica set
//!   (leaders spread round-robin). It asks every member where its shard logs
//!   end (`ShardPositions`) every third of `failover_after_ms`; a shard
//!   leader that has not answered for `failover_after_ms` loses its shards
//!   to the live replica whose log goes furthest, provided a majority of the
//!   replica set is live (an acknowledged `replicated` write is on a
//!   majority, so on at least one live replica, and the one that goes
//!   furthest has it).
//!
//! - **Streams** created at runtime (in the metadata) are created and
//!   deleted on every replica of their shard ([`super::streams::reconcile`],
//!   before the roles, so a new leader already has them).
//!
//! Limits (see docs/cluster.md): a former leader whose log has a tail the
//! new leader lacks must be restarted (it truncates that tail at start).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kaelix_dataplane::ShardRole;
use kaelix_protocol::LeaderHint;
use tokio::sync::watch;

use super::node::{ShardPosition, ask_shard_positions, shard_positions};
use super::{
    ClusterMetadata, ClusterNode, MetadataCommand, MetadataResponse, NodeEndpoints, NodeId,
    TransferReport, TransferRequest,
};
use crate::broker::Broker;
use crate::config::ClusterSection;
use crate::replication::{
    FollowerConfig, LeaderShard, Lease, ReplicaFollower, ReplicationConfig, ReplicationLeader,
    ShardSubmit,
};

/// What this broker does with one of its shards.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// No replica set yet, or not a replica: take no writes.
    Idle(Option<SocketAddr>),
    /// Lead at this epoch, with these followers.
    Lead { epoch: u64, followers: Vec<NodeId> },
    /// Follow this leader at this epoch.
    Follow {
        epoch: u64,
        leader: NodeId,
        replication: SocketAddr,
        hint: Option<SocketAddr>,
    },
}

struct Local {
    broker: Arc<Broker>,
    node: Arc<ClusterNode>,
    settings: ClusterSection,
    replication: ReplicationConfig,
    roles: Vec<Role>,
    followers: HashMap<u32, ReplicaFollower>,
    leader: Option<ReplicationLeader>,
    /// Where the replication listener is (its port stays across restarts).
    replication_addr: SocketAddr,
    /// Per shard, the epoch its log agrees with ([`ShardPosition::epoch`]).
    agreed: Arc<Vec<AtomicU64>>,
    /// Shards fenced by a transfer whose record's fate is unknown (shard ->
    /// the epoch it was led at).
    unresolved: BTreeMap<u32, u64>,
}

/// Run until `stop` turns true.
pub(crate) async fn run(
    broker: Arc<Broker>,
    node: Arc<ClusterNode>,
    settings: ClusterSection,
    mut stop: watch::Receiver<bool>,
) {
    let agreed: Arc<Vec<AtomicU64>> = Arc::new(
        (0..broker.shards().len())
            .map(|_| AtomicU64::new(0))
            .collect(),
    );
    // The shards led here commit only while the controller hears from this
    // broker: each of its questions renews the lease, which lasts half the
    // silence after which it moves the shards elsewhere.
    let lease = Lease::new(Duration::from_millis(settings.failover_after_ms / 2));
    // Weak: the node outlives this task, and the control plane's shutdown
    // waits for the last strong reference to the broker to go.
    let position_broker = Arc::downgrade(&broker);
    let position_epochs = agreed.clone();
    let position_lease = lease.clone();
    node.set_position_source(Arc::new(move |renew| {
        let Some(broker) = position_broker.upgrade() else {
            return Vec::new();
        };
        if renew {
            position_lease.renew();
        }
        positions(&broker, &position_epochs)
    }));
    let replication = ReplicationConfig {
        lease: Some(lease.clone()),
        ..ReplicationConfig::default()
    };
    // Bind the listener now so its address can be registered.
    let leader = match ReplicationLeader::start(
        settings.replication_addr,
        Vec::new(),
        replication.clone(),
    )
    .await
    {
        Ok(leader) => leader,
        Err(err) => {
            tracing::error!(
                addr = %settings.replication_addr,
                error = %err,
                "cluster.replication_addr cannot be bound: this broker takes no part in data replication"
            );
            return;
        }
    };
    let shards = broker.shards().len();
    let mut local = Local {
        replication_addr: leader.local_addr(),
        leader: Some(leader),
        broker,
        node,
        settings,
        replication,
        roles: vec![Role::Idle(None); shards],
        followers: HashMap::new(),
        agreed,
        unresolved: BTreeMap::new(),
    };
    let (transfer_queue, mut transfers) = tokio::sync::mpsc::channel(4);
    local.node.set_transfer_queue(transfer_queue);
    let mut controller = Controller::default();
    let tick = Duration::from_millis((local.settings.failover_after_ms / 3).max(5));
    let mut last_register = None::<Instant>;
    // Roles follow the metadata as soon as this node applies a change (a
    // failover's new leader takes writes, its followers reconnect); the
    // registration and the controller run every `tick`.
    let mut metrics = local.node.raft().metrics();
    let mut applied = None;
    let mut next_tick = tokio::time::Instant::now();
    loop {
        let now_applied = metrics.borrow_and_update().last_applied;
        let tick_due = tokio::time::Instant::now() >= next_tick;
        if tick_due || now_applied != applied {
            applied = now_applied;
            let metadata = local.node.metadata();
            if tick_due {
                next_tick = tokio::time::Instant::now() + tick;
                let endpoints = local.endpoints();
                if metadata.nodes.get(&local.node.id()) != Some(&endpoints)
                    && last_register
                        .is_none_or(|at: Instant| at.elapsed() > Duration::from_millis(500))
                {
                    last_register = Some(Instant::now());
                    let command = MetadataCommand::RegisterNode {
                        node_id: local.node.id(),
                        endpoints,
                    };
                    if let Err(err) = local.node.propose(command).await {
                        tracing::debug!(error = %err, "registering this broker's data endpoints; will retry");
                    }
                }
            }
            super::streams::reconcile(&local.broker, &local.node, &metadata).await;
            local.reconcile(&metadata).await;
            if tick_due && !local.unresolved.is_empty() {
                local.resolve_transfers(&metadata).await;
            }
            if tick_due {
                controller_tick(&mut controller, &local, &lease, &metadata).await;
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(next_tick) => {}
            changed = metrics.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some((request, reply)) = transfers.recv() => {
                let started = Instant::now();
                match local.transfer(&request, started).await {
                    // Waiting for the new leader to take writes is not this
                    // loop's business (the controller must keep asking).
                    Ok((report, target)) => {
                        tokio::spawn(async move {
                            let report = confirm_leading(report, target, started).await;
                            tracing::info!(?report, "shard leadership transferred");
                            let _ = reply.send(Ok(report));
                        });
                    }
                    Err(err) => {
                        tracing::warn!(shard = request.shard, error = %err, "shard leadership transfer refused or failed");
                        let _ = reply.send(Err(err));
                    }
                }
            }
        }
    }
    for (_, follower) in local.followers.drain() {
        let _ = follower.shutdown().await;
    }
    if let Some(leader) = local.leader.take() {
        leader.shutdown().await;
    }
}

/// Fill in when the new leader of a transfer took writes: its own answer
/// to `ShardPositions` (leading the shard at the new epoch), asked at the
/// cluster address `target` every 2 ms for up to 2 s.
async fn confirm_leading(
    mut report: TransferReport,
    target: Option<String>,
    started: Instant,
) -> TransferReport {
    let Some(addr) = target else {
        return report;
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let leads = shard_positions(&addr, Duration::from_millis(500))
            .await
            .is_ok_and(|positions| {
                positions
                    .iter()
                    .any(|p| p.shard == report.shard && p.leading && p.epoch == report.epoch)
            });
        if leads {
            report.leading_ms = Some(ms(started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    report
}

/// One controller round, on the Raft leader only.
async fn controller_tick(
    controller: &mut Controller,
    local: &Local,
    lease: &Lease,
    metadata: &ClusterMetadata,
) {
    let metrics = local.node.raft().metrics().borrow().clone();
    if metrics.current_leader != Some(local.node.id()) {
        *controller = Controller::default();
        return;
    }
    // The controller's own broker: its lease holds while a quorum of the
    // Raft group still follows this leader. A controller that lost its
    // quorum (a new Raft leader may be running one already) stops too: its
    // questions renew leases. Leadership is confirmed by a heartbeat round
    // to a quorum (openraft's metrics only report the time since the last
    // quorum ack when they are published, which can be long ago).
    let lease_ms = local.settings.failover_after_ms / 2;
    let asked = Instant::now();
    let confirmed = tokio::time::timeout(
        Duration::from_millis(lease_ms.max(1)),
        local.node.raft().get_read_log_id(),
    )
    .await
    .is_ok_and(|answer| answer.is_ok());
    // Unconfirmed: skip this tick (each tick asks everybody before it
    // judges anyone silent).
    if confirmed {
        lease.renew_since(asked);
        controller.tick(local, metadata).await;
    }
}

/// Where each shard's log ends here, whether this broker leads it, and the
/// epoch the log agrees with.
fn positions(broker: &Broker, agreed: &[AtomicU64]) -> Vec<ShardPosition> {
    broker
        .shards()
        .iter()
        .map(|shard| ShardPosition {
            shard: shard.id,
            appended: shard.reader.positions().appended,
            leading: shard.tunables.role() == ShardRole::Leading,
            epoch: agreed
                .get(shard.id as usize)
                .map_or(0, |e| e.load(Ordering::Acquire)),
        })
        .collect()
}

impl Local {
    fn endpoints(&self) -> NodeEndpoints {
        NodeEndpoints {
            replication_addr: self.replication_addr.to_string(),
            shard_data_addrs: self
                .broker
                .shards()
                .iter()
                .map(|shard| shard.data_addr.to_string())
                .collect(),
        }
    }

    /// The role the metadata gives shard `shard` on this broker.
    fn wanted(&self, metadata: &ClusterMetadata, shard: u32) -> Role {
        let me = self.node.id();
        let Some(assignment) = metadata.shards.get(&shard) else {
            return Role::Idle(None);
        };
        let leader_data = metadata
            .nodes
            .get(&assignment.leader)
            .and_then(|n| n.shard_data_addrs.get(shard as usize))
            .and_then(|addr| addr.parse().ok());
        if assignment.leader == me {
            return Role::Lead {
                epoch: assignment.epoch,
                followers: assignment
                    .replicas
                    .iter()
                    .copied()
                    .filter(|id| *id != me)
                    .collect(),
            };
        }
        if !assignment.replicas.contains(&me) {
            return Role::Idle(leader_data);
        }
        let replication = metadata
            .nodes
            .get(&assignment.leader)
            .and_then(|n| n.replication_addr.parse().ok());
        match replication {
            Some(replication) => Role::Follow {
                epoch: assignment.epoch,
                leader: assignment.leader,
                replication,
                hint: leader_data,
            },
            // The leader has not registered its endpoints yet.
            None => Role::Idle(leader_data),
        }
    }

    async fn reconcile(&mut self, metadata: &ClusterMetadata) {
        let mut leaders_changed = false;
        for index in 0..self.roles.len() {
            let shard = index as u32;
            // A follower whose session the leader accepted agrees with
            // that leader's epoch (kept when the leader dies: its log is a
            // prefix of that leader's).
            if let Role::Follow { epoch, .. } = &self.roles[index]
                && self
                    .followers
                    .get(&shard)
                    .is_some_and(|f| f.status().connected)
            {
                self.agreed[index].store(*epoch, Ordering::Release);
            }
            let wanted = self.wanted(metadata, shard);
            // A follower that stopped on its own (divergent log, shard gone)
            // is started again on the next change only; say why once.
            if let Some(follower) = self.followers.get(&shard)
                && follower.is_finished()
                && let Some(follower) = self.followers.remove(&shard)
                && let Err(err) = follower.shutdown().await
            {
                tracing::error!(shard, error = %err, "replication follower stopped");
            }
            if wanted == self.roles[index] {
                continue;
            }
            let handle = &self.broker.shards()[index];
            if let Some(follower) = self.followers.remove(&shard) {
                let _ = follower.shutdown().await;
            }
            if matches!(self.roles[index], Role::Lead { .. }) {
                leaders_changed = true;
            }
            // Still leading at the same epoch, only the followers changed
            // (a replica set following the membership): the flows and the
            // writes in flight stay; only the replication leader restarts.
            if let (Role::Lead { epoch: was, .. }, Role::Lead { epoch, .. }) =
                (&self.roles[index], &wanted)
                && was == epoch
            {
                self.roles[index] = wanted;
                continue;
            }
            match &wanted {
                Role::Idle(hint) => {
                    self.agreed[index].store(0, Ordering::Release);
                    handle
                        .tunables
                        .set_role(ShardRole::Following(LeaderHint::new(*hint)));
                }
                Role::Lead { epoch, .. } => {
                    // Rebuild duplicate detection from the log (it holds
                    // what the previous leader appended), then take writes.
                    let rebuilding = Instant::now();
                    if let Err(err) = crate::shard_call::call(handle, |log, flows| {
                        crate::broker::reload_flows(log, flows);
                    })
                    .await
                    {
                        tracing::error!(shard, error = %err, "taking the lead: rebuilding flows failed; retrying");
                        continue;
                    }
                    handle.tunables.set_role(ShardRole::Leading);
                    self.agreed[index].store(*epoch, Ordering::Release);
                    leaders_changed = true;
                    tracing::info!(
                        shard,
                        epoch,
                        flows_rebuilt_ms = ms(rebuilding.elapsed()),
                        "leading the shard"
                    );
                }
                Role::Follow {
                    epoch,
                    leader,
                    replication,
                    hint,
                } => {
                    handle
                        .tunables
                        .set_role(ShardRole::Following(LeaderHint::new(*hint)));
                    let commit = match crate::shard_call::call(handle, |log, _| {
                        log.commit_positions()
                    })
                    .await
                    {
                        Ok(commit) => commit,
                        Err(err) => {
                            tracing::error!(shard, error = %err, "following: the shard does not answer; retrying");
                            continue;
                        }
                    };
                    let broker = Arc::downgrade(&self.broker);
                    let submit: ShardSubmit = Arc::new(move |task| match broker.upgrade() {
                        Some(broker) => broker.shards()[index].offer(task),
                        None => Err(crate::replication::SubmitRefused::Gone(
                            "the broker is stopping".into(),
                        )),
                    });
                    let config = FollowerConfig {
                        node_id: self.node.id(),
                        shard,
                        leader: *replication,
                        log: kaelix_storage::LogConfig::new(self.broker.data_dir()),
                        streams: Vec::new(),
                    };
                    let follower = ReplicaFollower::start_on_shard(
                        config,
                        self.replication.clone(),
                        submit,
                        commit,
                    );
                    self.followers.insert(shard, follower);
                    tracing::info!(shard, epoch, leader, %replication, "following the shard's leader");
                }
            }
            self.roles[index] = wanted;
        }
        if leaders_changed {
            self.restart_leader().await;
        }
    }

    /// A planned move of `request.shard`'s leadership to a follower: stop
    /// taking writes (PRODUCE frames get `not_leader` naming the new
    /// leader), wait until the new leader's log has everything this one
    /// appended (so every acknowledged write is there, and what was in
    /// flight gets acknowledged here once it is), then record the new
    /// leader at the next epoch. On a failure before the record the shard
    /// takes writes again.
    /// Returns the report (but when the new leader takes writes) and the
    /// new leader's cluster address, to ask that with [`confirm_leading`].
    async fn transfer(
        &mut self,
        request: &TransferRequest,
        started: Instant,
    ) -> Result<(TransferReport, Option<String>), String> {
        const CATCH_UP: Duration = Duration::from_secs(2);
        let shard = request.shard;
        let me = self.node.id();
        let metadata = self.node.metadata();
        let Some(assignment) = metadata.shards.get(&shard) else {
            return Err(format!("shard {shard} has no replica set"));
        };
        let epoch = assignment.epoch;
        let index = shard as usize;
        let wanted = self.wanted(&metadata, shard);
        if !matches!(wanted, Role::Lead { .. }) || self.roles.get(index) != Some(&wanted) {
            return Err(format!(
                "shard {shard}: not led here at epoch {epoch} (node {} leads it); try again",
                assignment.leader
            ));
        }
        let progress: Vec<_> = self
            .leader
            .as_ref()
            .and_then(|leader| leader.progress(shard))
            .unwrap_or_default()
            .into_iter()
            .filter(|p| metadata.members.contains_key(&p.node_id))
            .collect();
        let target = match request.to {
            Some(to) => {
                if to == me {
                    return Err(format!("shard {shard}: node {to} leads it already"));
                }
                if !assignment.replicas.contains(&to) || !metadata.members.contains_key(&to) {
                    return Err(format!(
                        "shard {shard}: node {to} holds no replica (replicas {:?})",
                        assignment.replicas
                    ));
                }
                to
            }
            None => progress
                .iter()
                .filter(|p| p.connected)
                .max_by(|a, b| a.appended.cmp(&b.appended).then(b.node_id.cmp(&a.node_id)))
                .map(|p| p.node_id)
                .ok_or_else(|| format!("shard {shard}: no follower is connected"))?,
        };
        if !progress.iter().any(|p| p.node_id == target && p.connected) {
            return Err(format!(
                "shard {shard}: node {target} is not following (no replication session): \
                 it could not take over without a gap"
            ));
        }
        let hint = metadata
            .nodes
            .get(&target)
            .and_then(|n| n.shard_data_addrs.get(index))
            .and_then(|addr| addr.parse().ok());
        let handle = &self.broker.shards()[index];
        // Fence: nothing is appended after the shard reads the new role,
        // which it does before the call below runs.
        handle
            .tunables
            .set_role(ShardRole::Following(LeaderHint::new(hint)));
        let restore =
            |handle: &crate::broker::ShardHandle| handle.tunables.set_role(ShardRole::Leading);
        let end = match crate::shard_call::call(handle, |log, _| log.positions().appended).await {
            Ok(end) => end,
            Err(err) => {
                restore(handle);
                return Err(format!("shard {shard}: reading the log's end: {err}"));
            }
        };
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let at = self
                .leader
                .as_ref()
                .and_then(|leader| leader.progress(shard))
                .and_then(|p| p.into_iter().find(|p| p.node_id == target))
                .map_or(0, |p| p.appended);
            if at >= end {
                break;
            }
            if Instant::now() >= deadline {
                restore(handle);
                return Err(format!(
                    "shard {shard}: node {target} did not catch up within {CATCH_UP:?} \
                     (at {at} of {end}); the shard takes writes here again"
                ));
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let caught_up_ms = ms(started.elapsed());
        let command = MetadataCommand::SetShardLeader {
            shard,
            leader: target,
            epoch: epoch + 1,
        };
        let outcome = match tokio::time::timeout(PROPOSE_WAIT, self.node.propose(command)).await {
            Ok(Ok((_, MetadataResponse::Ok))) => Ok(()),
            Ok(Ok((_, MetadataResponse::Rejected(reason)))) => Err(reason),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {PROPOSE_WAIT:?}")),
        };
        if let Err(why) = outcome {
            // The record may still commit (a Raft leader change, a broken
            // forward): taking writes again at this epoch could then make
            // two leaders. This node claims the same next epoch instead; of
            // the two records only one can commit, and the roles follow it.
            self.unresolved.insert(shard, epoch);
            let state = self.claim_back(shard, epoch).await;
            return Err(format!(
                "shard {shard}: recording node {target} as leader: {why}; {state}"
            ));
        }
        let recorded_ms = ms(started.elapsed());
        // Follow the new leader now (this broker's roles come from the
        // metadata, which may not have applied the change here yet).
        let applied = self.node.metadata();
        self.reconcile(&applied).await;
        let raft_addr = applied.members.get(&target).map(|m| m.raft_addr.clone());
        let report = TransferReport {
            shard,
            from: me,
            to: target,
            epoch: epoch + 1,
            position: end,
            caught_up_ms,
            recorded_ms,
            leading_ms: None,
        };
        Ok((report, raft_addr))
    }

    /// After a transfer whose record may or may not commit: propose this
    /// node as the leader of `shard` at `epoch + 1` (a few tries) and
    /// follow whatever the metadata then says. Until one record is known
    /// the shard stays fenced (no writes): `unresolved` keeps it, and the
    /// loop tries again every tick. Says how it ended.
    async fn claim_back(&mut self, shard: u32, epoch: u64) -> String {
        let me = self.node.id();
        for _ in 0..3 {
            let command = MetadataCommand::SetShardLeader {
                shard,
                leader: me,
                epoch: epoch + 1,
            };
            let answer = tokio::time::timeout(PROPOSE_WAIT, self.node.propose(command)).await;
            if matches!(answer, Ok(Ok(_))) {
                // Committed (this node leads at the next epoch) or refused
                // (another record of that epoch committed): either way the
                // metadata decides now.
                self.unresolved.remove(&shard);
                let metadata = self.node.metadata();
                self.reconcile(&metadata).await;
                return match metadata.shards.get(&shard) {
                    Some(a) if a.epoch > epoch => {
                        format!("node {} leads it at epoch {}", a.leader, a.epoch)
                    }
                    _ => "the metadata is being applied here; the roles follow it".into(),
                };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        format!(
            "no record of epoch {} could be made: the shard takes no writes until one is \
             (retried every tick)",
            epoch + 1
        )
    }

    /// Transfers whose outcome is not known yet: claim the shards back.
    async fn resolve_transfers(&mut self, metadata: &ClusterMetadata) {
        let pending: Vec<(u32, u64)> = self.unresolved.iter().map(|(s, e)| (*s, *e)).collect();
        for (shard, epoch) in pending {
            if metadata.shards.get(&shard).is_some_and(|a| a.epoch > epoch) {
                self.unresolved.remove(&shard);
                continue;
            }
            let state = self.claim_back(shard, epoch).await;
            tracing::warn!(shard, epoch, %state, "an unfinished transfer");
        }
    }

    /// Serve the shards led now (the listener keeps its address).
    async fn restart_leader(&mut self) {
        if let Some(leader) = self.leader.take() {
            leader.shutdown().await;
        }
        // The old listener is closed; rebinding its port may take a moment.
        for attempt in 0..50 {
            // Taken again for every attempt: a failed start consumes them.
            let led = self.led_shards().await;
            match ReplicationLeader::start(self.replication_addr, led, self.replication.clone())
                .await
            {
                Ok(leader) => {
                    self.leader = Some(leader);
                    return;
                }
                Err(err) if attempt == 49 => {
                    tracing::error!(addr = %self.replication_addr, error = %err, "the replication listener cannot be bound again");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The shards led here, as the replication leader serves them.
    async fn led_shards(&self) -> Vec<LeaderShard> {
        let mut led = Vec::new();
        for (index, role) in self.roles.iter().enumerate() {
            let Role::Lead { followers, .. } = role else {
                continue;
            };
            let handle = &self.broker.shards()[index];
            match crate::shard_call::call(handle, |log, _| {
                (log.raw_reader(), log.commit_positions())
            })
            .await
            {
                Ok((raw, commit)) => {
                    led.push(LeaderShard::from_parts(
                        index as u32,
                        raw,
                        commit,
                        followers,
                    ));
                }
                Err(err) => {
                    tracing::error!(shard = index, error = %err, "cannot serve the shard to its followers");
                }
            }
        }
        led
    }
}

/// The failover controller's memory (reset whenever this node is not the
/// Raft leader, so a new controller gives every member a full grace period).
#[derive(Default)]
struct Controller {
    /// When each member last answered, and what it said.
    heard: BTreeMap<NodeId, (Instant, Vec<ShardPosition>)>,
    /// Members whose last answer was a refused connection.
    refused: std::collections::BTreeSet<NodeId>,
    started: Option<Instant>,
    /// When the last round ended.
    last_round_end: Option<Instant>,
    /// Replica sets following the membership (node add/remove).
    mover: super::rebalance::ReplicaMover,
}

impl Controller {
    async fn tick(&mut self, local: &Local, metadata: &ClusterMetadata) {
        // A controller that itself did not run for a whole failover time
        // (its broker stalled: a loaded machine, a long transfer) knows
        // nothing recent about anybody: it starts over with a full grace
        // period rather than blame the members for its own silence.
        // (From the end of the last round: a round itself may take up to a
        // failover time, asking a stopped member.)
        let limit = Duration::from_millis(local.settings.failover_after_ms);
        if self.last_round_end.is_some_and(|at| at.elapsed() > limit) {
            self.heard.clear();
            self.started = None;
        }
        self.round(local, metadata, limit).await;
        self.last_round_end = Some(Instant::now());
    }

    async fn round(&mut self, local: &Local, metadata: &ClusterMetadata, limit: Duration) {
        let round_began = Instant::now();
        let started = *self.started.get_or_insert_with(Instant::now);
        let me = local.node.id();
        let factor = local.settings.replication_factor as usize;
        // Assign shards once enough members registered.
        let registered: Vec<NodeId> = metadata
            .nodes
            .keys()
            .copied()
            .filter(|id| metadata.members.contains_key(id))
            .collect();
        if registered.len() >= factor {
            for shard in 0..local.roles.len() as u32 {
                if metadata.shards.contains_key(&shard) {
                    continue;
                }
                let replicas = place(&registered, shard, factor);
                let command = MetadataCommand::AssignShard { shard, replicas };
                if let Err(err) = local.node.propose(command).await {
                    tracing::warn!(shard, error = %err, "assigning the shard's replicas");
                }
            }
        }
        // Ask everybody where their logs end.
        let timeout = Duration::from_millis(local.settings.failover_after_ms / 2)
            .max(Duration::from_millis(5));
        let mut asks = tokio::task::JoinSet::new();
        for (id, member) in metadata.members.iter().filter(|(id, _)| **id != me) {
            let addr = member.raft_addr.clone();
            let id = *id;
            asks.spawn(async move { (id, ask_shard_positions(&addr, timeout, true).await) });
        }
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok((id, Ok(positions))) => {
                    self.refused.remove(&id);
                    self.heard.insert(id, (Instant::now(), positions));
                }
                Ok((id, Err((refused, _)))) => {
                    if refused {
                        self.refused.insert(id);
                    } else {
                        self.refused.remove(&id);
                    }
                }
                Err(_) => {}
            }
        }
        self.heard.insert(
            me,
            (Instant::now(), positions(&local.broker, &local.agreed)),
        );
        // Silent: not heard for `limit`. A member whose cluster port
        // refused the connection counts as silent once the lease its last
        // answer renewed has run out (half the limit, plus a margin for
        // clock rates), and at once when its replication port refuses too:
        // nothing listens on either, so its broker is gone (or stopping,
        // and a broker stops replicating first): it commits nothing.
        let mut gone = std::collections::BTreeSet::new();
        for id in &self.refused {
            let replication = metadata
                .nodes
                .get(id)
                .and_then(|n| n.replication_addr.parse::<SocketAddr>().ok());
            if let Some(addr) = replication
                && refuses(addr).await
            {
                gone.insert(*id);
            }
        }
        let lease_gone = limit / 2 + limit / 20;
        let silent = |id: &NodeId| {
            let quiet = match self.heard.get(id) {
                Some((at, _)) => at.elapsed(),
                None => started.elapsed(),
            };
            quiet >= limit
                || gone.contains(id)
                || (self.refused.contains(id) && quiet >= lease_gone)
        };
        for (shard, assignment) in &metadata.shards {
            if !silent(&assignment.leader) {
                continue;
            }
            let live: Vec<(NodeId, u64)> = assignment
                .replicas
                .iter()
                .filter(|id| **id != assignment.leader && !silent(id))
                .filter_map(|id| {
                    let (_, positions) = self.heard.get(id)?;
                    let position = positions.iter().find(|p| p.shard == *shard)?;
                    // A replica not known to agree with the current leader
                    // (restarted, or with a tail of its own) may lack data.
                    (position.epoch == assignment.epoch).then_some((*id, position.appended))
                })
                .collect();
            let majority = assignment.replicas.len() / 2 + 1;
            let Some(new_leader) = choose_leader(&live, majority) else {
                tracing::warn!(
                    shard,
                    leader = assignment.leader,
                    live = live.len(),
                    "the shard's leader is silent and no majority of its replicas is live: no failover"
                );
                continue;
            };
            let command = MetadataCommand::SetShardLeader {
                shard: *shard,
                leader: new_leader,
                epoch: assignment.epoch + 1,
            };
            tracing::warn!(
                shard,
                old = assignment.leader,
                new = new_leader,
                epoch = assignment.epoch + 1,
                "failover: the shard's leader is silent"
            );
            if let Err(err) = local.node.propose(command).await {
                tracing::warn!(shard, error = %err, "proposing the new shard leader");
            }
        }
        // Replica sets follow the membership (a shard whose leader is
        // silent waits for the failover above).
        // A member refusing connections is not live for the mover either
        // (a set grown with a dead node would need it for its quorum).
        let answering: BTreeMap<NodeId, (Instant, Vec<ShardPosition>)> = self
            .heard
            .iter()
            .filter(|(id, _)| !self.refused.contains(id))
            .map(|(id, heard)| (*id, heard.clone()))
            .collect();
        self.mover
            .tick(
                &local.node,
                metadata,
                &answering,
                limit,
                factor,
                round_began,
            )
            .await;
    }
}

/// Before a clustered broker with data replication opens its shards (its
/// Raft node `node` started): for every shard another member leads now
/// (asked over the cluster RPC, the members taken from the metadata this
/// node applied once it heard from a Raft leader), drop the tail of the
/// local log that leader does not have: a former leader killed before it
/// replicated its last appends, or the segment a restart sealed where the
/// leader went on writing. Whole segments go; the shard's follower fetches
/// them again. A running shard cannot truncate its log; this is when it
/// can. Best effort: what could not be done is returned as warnings, and
/// the broker then starts anyway (its follower reports a divergent log).
pub async fn catch_up_before_start(
    config: &crate::config::Config,
    node: &ClusterNode,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(section) = config
        .cluster
        .as_ref()
        .filter(|section| section.replication_factor > 0)
    else {
        return warnings;
    };
    let Some(data_dir) = config.broker.data_dir.as_deref() else {
        return warnings;
    };
    // The metadata this node applied once it hears from a Raft leader (a
    // node alone, or a cluster restarting as a whole, goes on without).
    let mut metrics = node.raft().metrics();
    let heard = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            // A restarted node first believes its own old vote: wait for a
            // leader that is someone else, or for this node to lead with a
            // quorum behind it.
            let now = metrics.borrow_and_update().clone();
            let me = now.id;
            let led =
                now.state == openraft::ServerState::Leader && now.millis_since_quorum_ack.is_some();
            if now.current_leader.is_some_and(|leader| leader != me) || led {
                return;
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    if heard.is_err() {
        return warnings;
    }
    // Apply what the Raft leader has applied (a restarted node's log may
    // lag behind by a failover or two; the leader may retry it slowly).
    let leader = metrics.borrow().current_leader;
    let leader_addr = leader.and_then(|id| {
        metrics
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|member| member.raft_addr.clone())
    });
    if let (Some(leader), Some(addr)) = (leader, leader_addr)
        && leader != section.node_id
    {
        let target = async {
            let mut client = super::network::client(&addr).ok()?;
            let reply = client.status(super::pb::StatusRequest {}).await.ok()?;
            reply.into_inner().applied_index
        };
        let target = tokio::time::timeout(Duration::from_secs(2), target)
            .await
            .ok()
            .flatten();
        if let Some(target) = target {
            let caught_up = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let applied = metrics.borrow_and_update().last_applied.map(|id| id.index);
                    if applied.is_some_and(|index| index >= target) {
                        return;
                    }
                    if metrics.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if caught_up.is_err() {
                warnings.push(format!(
                    "the Raft log did not catch up with the leader's (index {target}) within 5 s; \
                     the shard logs are compared with the metadata applied so far"
                ));
            }
        }
    }
    let metadata = node.metadata();
    let me = section.node_id;
    // The leader the applied metadata names for each shard, asked whether
    // it leads that shard at that very epoch: a member still claiming an
    // older epoch (cut off, not yet told) must never decide what this log
    // drops, and neither may anyone when the metadata names this node.
    let mut answers: BTreeMap<NodeId, Vec<ShardPosition>> = BTreeMap::new();
    for shard in 0..config.broker.shards {
        let Some(assignment) = metadata.shards.get(&shard) else {
            continue;
        };
        let (leader, epoch) = (assignment.leader, assignment.epoch);
        if leader == me || !assignment.replicas.contains(&me) {
            continue;
        }
        let Some(member) = metadata.members.get(&leader) else {
            continue;
        };
        let answer = match answers.entry(leader) {
            std::collections::btree_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => slot.insert(
                shard_positions(&member.raft_addr, Duration::from_secs(1))
                    .await
                    .unwrap_or_default(),
            ),
        };
        let confirmed = answer
            .iter()
            .any(|p| p.shard == shard && p.leading && p.epoch == epoch);
        if !confirmed {
            warnings.push(format!(
                "shard {shard}: leader {leader} does not confirm epoch {epoch}; the log is not compared before start"
            ));
            continue;
        }
        let Some(replication) = metadata
            .nodes
            .get(&leader)
            .and_then(|n| n.replication_addr.parse::<SocketAddr>().ok())
        else {
            warnings.push(format!(
                "shard {shard}: leader {leader} has no known replication address; not caught up before start"
            ));
            continue;
        };
        match truncate_to_leader(config, data_dir, me, shard, replication).await {
            Ok(None) => {}
            Ok(Some(segment)) => tracing::info!(
                shard,
                leader,
                epoch,
                segment,
                "dropped the log's tail the shard's leader does not have"
            ),
            Err(err) => warnings.push(format!(
                "shard {shard}: comparing the log with leader {leader} (epoch {epoch}) before start: {err}"
            )),
        }
    }
    warnings
}

/// Ask `leader` whether this replica's log of `shard` has a tail it lacks
/// and drop it (whole segments, from the one returned). The log is opened
/// only to read its end, and closed again: the shard opens it afterwards
/// and follows from there (catching up what the segments held).
async fn truncate_to_leader(
    config: &crate::config::Config,
    data_dir: &std::path::Path,
    me: NodeId,
    shard: u32,
    leader: SocketAddr,
) -> Result<Option<u64>, String> {
    let log_config = crate::broker::shard_log_config(config, data_dir, shard);
    let dir = log_config.dir.clone();
    let tail = tokio::task::spawn_blocking(move || {
        kaelix_storage::ShardLog::open(log_config)
            .map(|(log, _)| log.replica_tail())
            .map_err(|e| format!("opening {}: {e}", dir.display()))
    })
    .await
    .map_err(|e| e.to_string())??;
    match crate::replication::ask_plan(leader, shard, me, tail).await? {
        crate::replication::wire::Plan::Truncate(segment) => {
            let dir = crate::broker::shard_log_config(config, data_dir, shard).dir;
            tokio::task::spawn_blocking(move || {
                kaelix_storage::replica::truncate_segments(&dir, segment)
                    .map_err(|e| format!("truncating {}: {e}", dir.display()))
            })
            .await
            .map_err(|e| e.to_string())??;
            Ok(Some(segment))
        }
        _ => Ok(None),
    }
}

/// Whether a TCP connection to `addr` is refused (within 200 ms; a
/// connection made is closed at once).
async fn refuses(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// How long a transfer waits for a metadata record.
const PROPOSE_WAIT: Duration = Duration::from_secs(5);

/// A duration in milliseconds, for reports.
fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The replica set of `shard`: `factor` of the `nodes`, starting at a
/// different one for each shard so leaders spread.
pub(crate) fn place(nodes: &[NodeId], shard: u32, factor: usize) -> Vec<NodeId> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let start = shard as usize % nodes.len();
    (0..factor.min(nodes.len()))
        .map(|i| nodes[(start + i) % nodes.len()])
        .collect()
}

/// The new leader among the live replicas `(node, appended)` (the old
/// leader excluded): the one whose log goes furthest (lowest id on a tie),
/// and only when the live ones are at least `majority` of the replica set.
pub(crate) fn choose_leader(live: &[(NodeId, u64)], majority: usize) -> Option<NodeId> {
    if live.len() < majority {
        return None;
    }
    live.iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_sets_spread_leaders_and_never_repeat_a_node() {
        let nodes = [1, 2, 3];
        assert_eq!(place(&nodes, 0, 3), vec![1, 2, 3]);
        assert_eq!(place(&nodes, 1, 3), vec![2, 3, 1]);
        assert_eq!(place(&nodes, 2, 2), vec![3, 1]);
        assert_eq!(place(&nodes, 4, 5), vec![2, 3, 1]);
        assert!(place(&[], 0, 3).is_empty());
    }

    #[test]
    fn the_most_complete_live_replica_leads_and_only_with_a_majority() {
        // Three replicas, the leader dead: both others live -> furthest wins.
        assert_eq!(choose_leader(&[(2, 100), (3, 250)], 2), Some(3));
        // A tie goes to the lowest id.
        assert_eq!(choose_leader(&[(3, 7), (2, 7)], 2), Some(2));
        // Only one live replica of three: it may lack an acknowledged write.
        assert_eq!(choose_leader(&[(2, 100)], 2), None);
        assert_eq!(choose_leader(&[], 1), None);
    }
}
