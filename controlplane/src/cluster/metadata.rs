//! The replicated metadata: commands proposed through Raft and the state they
//! build. Applying is deterministic: every node reaches the same state from
//! the same log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{MemberAddr, NodeId};

/// A change to the cluster metadata, proposed on the leader and applied by
/// every node once committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// Create a stream; fails (in the response) if the id exists.
    CreateStream {
        /// Stream id.
        stream_id: u32,
        /// Durability policy name (`memory`, `interval`, `fsync`, ...).
        durability: String,
        /// Number of copies wanted.
        replication_factor: u32,
        /// Nodes holding a copy, leader first (with data replication: its
        /// shard's replica set).
        replicas: Vec<NodeId>,
        /// The stream's own retention by size (bytes), if any.
        #[serde(default)]
        retention_bytes: Option<u64>,
        /// The stream's own retention by age (nanoseconds), if any.
        #[serde(default)]
        retention_age_ns: Option<u64>,
    },
    /// Record a new leader for a stream (must be one of its replicas).
    SetStreamLeader {
        /// Stream id.
        stream_id: u32,
        /// New leader.
        leader: NodeId,
    },
    /// Delete a stream (its id is remembered in
    /// [`ClusterMetadata::deleted_streams`] until created again).
    DeleteStream {
        /// Stream id.
        stream_id: u32,
    },
    /// Set a cluster-wide configuration entry.
    SetConfig {
        /// Key, e.g. `retention.max_age_s`.
        key: String,
        /// Value as text.
        value: String,
    },
    /// Where a member serves data replication and its shards' data ports
    /// (each broker registers itself, and again when they change).
    RegisterNode {
        /// The member.
        node_id: NodeId,
        /// Its endpoints.
        endpoints: NodeEndpoints,
    },
    /// Give a shard its replica set; its first replica leads, at epoch 1.
    /// Refused when the shard already has one.
    AssignShard {
        /// Shard id.
        shard: u32,
        /// Nodes holding a copy, leader first.
        replicas: Vec<NodeId>,
    },
    /// Move a shard's leadership (failover or transfer). Applied only when
    /// `epoch` is the shard's epoch plus one, so of two controllers racing on
    /// the same old epoch only the first wins.
    SetShardLeader {
        /// Shard id.
        shard: u32,
        /// New leader (one of the replicas).
        leader: NodeId,
        /// The new epoch.
        epoch: u64,
    },
    /// Change a shard's replica set by one node: add one (it catches up
    /// from the leader and counts towards the quorum from then on) or remove
    /// one other than the leader. Applied only while the shard is at `epoch`
    /// with exactly the replicas `from`, so a decision made on an older
    /// state (a failover or another change since) is refused. The epoch
    /// stays: the leader and its log's history do not change, and the
    /// replicas known to agree with it remain eligible for failover.
    SetShardReplicas {
        /// Shard id.
        shard: u32,
        /// The shard's epoch the change was decided at.
        epoch: u64,
        /// The replica set it was decided on.
        from: Vec<NodeId>,
        /// The new replica set: `from` with one node added or one removed.
        replicas: Vec<NodeId>,
    },
}

/// Most nodes in a shard's replica set (the replication leader serves at
/// most this many, itself included).
pub const SHARD_REPLICAS_MAX: usize = 16;

/// Why `from` -> `to` is not a valid one-node change of a replica set
/// whose leader is `leader`.
fn replica_set_step_error(from: &[NodeId], to: &[NodeId], leader: NodeId) -> Option<String> {
    if let Some(error) = replica_set_error(to) {
        return Some(error);
    }
    if !to.contains(&leader) {
        return Some(format!("the leader {leader} is not in {to:?}"));
    }
    let added = to.iter().filter(|id| !from.contains(id)).count();
    let removed = from.iter().filter(|id| !to.contains(id)).count();
    if added + removed != 1 {
        return Some(format!(
            "{from:?} -> {to:?} changes {} nodes, not one",
            added + removed
        ));
    }
    None
}

/// Why `replicas` is not a valid replica set: empty, too large, a node twice.
fn replica_set_error(replicas: &[NodeId]) -> Option<String> {
    if replicas.is_empty() {
        return Some("no replicas".into());
    }
    if replicas.len() > SHARD_REPLICAS_MAX {
        return Some(format!(
            "{} replicas, at most {SHARD_REPLICAS_MAX}",
            replicas.len()
        ));
    }
    let mut unique = replicas.to_vec();
    unique.sort_unstable();
    unique.dedup();
    (unique.len() != replicas.len()).then(|| format!("a node appears twice in {replicas:?}"))
}

/// A member's data endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEndpoints {
    /// `host:port` of its replication listener (followers connect there).
    pub replication_addr: String,
    /// `host:port` of each of its shards' data ports (index = shard id).
    pub shard_data_addrs: Vec<String>,
}

/// A shard's replica set and leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAssignment {
    /// Nodes holding a copy.
    pub replicas: Vec<NodeId>,
    /// The replica accepting writes.
    pub leader: NodeId,
    /// Bumped by every leader change; a leader's term of office.
    pub epoch: u64,
}

/// The result of applying one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataResponse {
    /// The entry was applied (also for membership and blank entries).
    Ok,
    /// The command was valid Raft input but rejected by the state machine.
    Rejected(String),
}

/// One stream as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Stream id.
    pub stream_id: u32,
    /// Durability policy name.
    pub durability: String,
    /// Number of copies wanted.
    pub replication_factor: u32,
    /// Nodes holding a copy.
    pub replicas: Vec<NodeId>,
    /// The replica accepting writes.
    pub leader: Option<NodeId>,
    /// Its own retention by size (bytes), if any.
    #[serde(default)]
    pub retention_bytes: Option<u64>,
    /// Its own retention by age (nanoseconds), if any.
    #[serde(default)]
    pub retention_age_ns: Option<u64>,
}

/// The state machine's data: everything the metadata log describes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMetadata {
    /// Members from the last applied membership (voters and learners).
    pub members: BTreeMap<NodeId, MemberAddr>,
    /// Streams by id.
    pub streams: BTreeMap<u32, StreamInfo>,
    /// Cluster-wide configuration entries.
    pub config: BTreeMap<String, String>,
    /// Members' data endpoints.
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, NodeEndpoints>,
    /// Shards' replica sets and leaders (when data replication is on).
    #[serde(default)]
    pub shards: BTreeMap<u32, ShardAssignment>,
    /// Streams deleted and not created again since: a replica that still
    /// has one (it was down, or behind) deletes it too.
    #[serde(default)]
    pub deleted_streams: BTreeSet<u32>,
}

impl ClusterMetadata {
    /// Apply one command. Call in log order, once per committed entry.
    pub fn apply(&mut self, command: &MetadataCommand) -> MetadataResponse {
        match command {
            MetadataCommand::CreateStream {
                stream_id,
                durability,
                replication_factor,
                replicas,
                retention_bytes,
                retention_age_ns,
            } => {
                if self.streams.contains_key(stream_id) {
                    return MetadataResponse::Rejected(format!("stream {stream_id} exists"));
                }
                if *replication_factor == 0 || replicas.len() != *replication_factor as usize {
                    return MetadataResponse::Rejected(format!(
                        "stream {stream_id}: replication factor {replication_factor} but {} replicas",
                        replicas.len()
                    ));
                }
                self.streams.insert(
                    *stream_id,
                    StreamInfo {
                        stream_id: *stream_id,
                        durability: durability.clone(),
                        replication_factor: *replication_factor,
                        replicas: replicas.clone(),
                        leader: replicas.first().copied(),
                        retention_bytes: *retention_bytes,
                        retention_age_ns: *retention_age_ns,
                    },
                );
                self.deleted_streams.remove(stream_id);
                MetadataResponse::Ok
            }
            MetadataCommand::SetStreamLeader { stream_id, leader } => {
                match self.streams.get_mut(stream_id) {
                    None => MetadataResponse::Rejected(format!("no stream {stream_id}")),
                    Some(s) if !s.replicas.contains(leader) => MetadataResponse::Rejected(format!(
                        "node {leader} is not a replica of stream {stream_id}"
                    )),
                    Some(s) => {
                        s.leader = Some(*leader);
                        MetadataResponse::Ok
                    }
                }
            }
            MetadataCommand::DeleteStream { stream_id } => {
                if self.streams.remove(stream_id).is_some() {
                    self.deleted_streams.insert(*stream_id);
                    MetadataResponse::Ok
                } else {
                    MetadataResponse::Rejected(format!("no stream {stream_id}"))
                }
            }
            MetadataCommand::SetConfig { key, value } => {
                self.config.insert(key.clone(), value.clone());
                MetadataResponse::Ok
            }
            MetadataCommand::RegisterNode { node_id, endpoints } => {
                self.nodes.insert(*node_id, endpoints.clone());
                MetadataResponse::Ok
            }
            MetadataCommand::AssignShard { shard, replicas } => {
                if self.shards.contains_key(shard) {
                    return MetadataResponse::Rejected(format!("shard {shard} is assigned"));
                }
                if let Some(error) = replica_set_error(replicas) {
                    return MetadataResponse::Rejected(format!("shard {shard}: {error}"));
                }
                let Some(&leader) = replicas.first() else {
                    return MetadataResponse::Rejected(format!("shard {shard}: no replicas"));
                };
                self.shards.insert(
                    *shard,
                    ShardAssignment {
                        replicas: replicas.clone(),
                        leader,
                        epoch: 1,
                    },
                );
                MetadataResponse::Ok
            }
            MetadataCommand::SetShardLeader {
                shard,
                leader,
                epoch,
            } => match self.shards.get_mut(shard) {
                None => MetadataResponse::Rejected(format!("shard {shard} is not assigned")),
                Some(s) if !s.replicas.contains(leader) => MetadataResponse::Rejected(format!(
                    "node {leader} is not a replica of shard {shard}"
                )),
                Some(s) if *epoch != s.epoch + 1 => MetadataResponse::Rejected(format!(
                    "shard {shard} is at epoch {}, not {}",
                    s.epoch,
                    epoch.saturating_sub(1)
                )),
                Some(s) => {
                    s.leader = *leader;
                    s.epoch = *epoch;
                    MetadataResponse::Ok
                }
            },
            MetadataCommand::SetShardReplicas {
                shard,
                epoch,
                from,
                replicas,
            } => match self.shards.get_mut(shard) {
                None => MetadataResponse::Rejected(format!("shard {shard} is not assigned")),
                Some(s) if *epoch != s.epoch => MetadataResponse::Rejected(format!(
                    "shard {shard} is at epoch {}, not {epoch}",
                    s.epoch
                )),
                Some(s) if *from != s.replicas => MetadataResponse::Rejected(format!(
                    "shard {shard} has the replicas {:?}, not {from:?}",
                    s.replicas
                )),
                Some(s) => match replica_set_step_error(from, replicas, s.leader) {
                    Some(error) => MetadataResponse::Rejected(format!("shard {shard}: {error}")),
                    None => {
                        s.replicas = replicas.clone();
                        MetadataResponse::Ok
                    }
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_leaders_move_one_epoch_at_a_time_among_the_replicas() {
        let mut md = ClusterMetadata::default();
        let assign = MetadataCommand::AssignShard {
            shard: 0,
            replicas: vec![2, 3, 1],
        };
        assert_eq!(md.apply(&assign), MetadataResponse::Ok);
        assert_eq!(
            md.shards[&0],
            ShardAssignment {
                replicas: vec![2, 3, 1],
                leader: 2,
                epoch: 1
            }
        );
        assert!(matches!(md.apply(&assign), MetadataResponse::Rejected(_)));
        let twice = MetadataCommand::AssignShard {
            shard: 1,
            replicas: vec![1, 1],
        };
        assert!(matches!(md.apply(&twice), MetadataResponse::Rejected(_)));
        let move_to = |leader, epoch| MetadataCommand::SetShardLeader {
            shard: 0,
            leader,
            epoch,
        };
        // A stale or skipping epoch, or a non-replica, is refused.
        assert!(matches!(
            md.apply(&move_to(3, 1)),
            MetadataResponse::Rejected(_)
        ));
        assert!(matches!(
            md.apply(&move_to(3, 3)),
            MetadataResponse::Rejected(_)
        ));
        assert!(matches!(
            md.apply(&move_to(4, 2)),
            MetadataResponse::Rejected(_)
        ));
        assert_eq!(md.apply(&move_to(3, 2)), MetadataResponse::Ok);
        // The loser of a race on epoch 1 -> 2 is refused.
        assert!(matches!(
            md.apply(&move_to(1, 2)),
            MetadataResponse::Rejected(_)
        ));
        assert_eq!((md.shards[&0].leader, md.shards[&0].epoch), (3, 2));
        // Snapshots written before these fields existed still load.
        let old = r#"{"members":{},"streams":{},"config":{}}"#;
        let loaded: ClusterMetadata = serde_json::from_str(old).unwrap();
        assert!(loaded.shards.is_empty() && loaded.nodes.is_empty());
    }

    #[test]
    fn replica_sets_change_one_node_at_a_time_at_the_current_epoch_and_state() {
        let mut md = ClusterMetadata::default();
        let assign = MetadataCommand::AssignShard {
            shard: 0,
            replicas: vec![1, 2, 3],
        };
        assert_eq!(md.apply(&assign), MetadataResponse::Ok);
        let change =
            |epoch, from: &[NodeId], replicas: &[NodeId]| MetadataCommand::SetShardReplicas {
                shard: 0,
                epoch,
                from: from.to_vec(),
                replicas: replicas.to_vec(),
            };
        let rejected = |md: &mut ClusterMetadata, command: &MetadataCommand| {
            let before = md.clone();
            let outcome = md.apply(command);
            assert!(
                matches!(outcome, MetadataResponse::Rejected(_)),
                "{command:?}: {outcome:?}"
            );
            assert_eq!(
                *md, before,
                "a refused change leaves the metadata as it was"
            );
        };
        // Grow by one: applied, the epoch and leader stay.
        assert_eq!(
            md.apply(&change(1, &[1, 2, 3], &[1, 2, 3, 4])),
            MetadataResponse::Ok
        );
        assert_eq!(
            md.shards[&0],
            ShardAssignment {
                replicas: vec![1, 2, 3, 4],
                leader: 1,
                epoch: 1
            }
        );
        // Decided on the old set (a lost update), or at another epoch.
        rejected(&mut md, &change(1, &[1, 2, 3], &[1, 2, 4]));
        rejected(&mut md, &change(2, &[1, 2, 3, 4], &[1, 2, 4]));
        rejected(&mut md, &change(0, &[1, 2, 3, 4], &[1, 2, 4]));
        // Two nodes at once, a swap, the leader removed, a node twice, empty.
        rejected(&mut md, &change(1, &[1, 2, 3, 4], &[1, 2]));
        rejected(&mut md, &change(1, &[1, 2, 3, 4], &[1, 2, 3, 5]));
        rejected(&mut md, &change(1, &[1, 2, 3, 4], &[2, 3, 4]));
        rejected(&mut md, &change(1, &[1, 2, 3, 4], &[1, 2, 3, 4, 4]));
        rejected(&mut md, &change(1, &[1, 2, 3, 4], &[]));
        // An unassigned shard.
        rejected(
            &mut md,
            &MetadataCommand::SetShardReplicas {
                shard: 9,
                epoch: 1,
                from: vec![1],
                replicas: vec![1, 2],
            },
        );
        // Shrink by one (the departed node 3).
        assert_eq!(
            md.apply(&change(1, &[1, 2, 3, 4], &[1, 2, 4])),
            MetadataResponse::Ok
        );
        assert_eq!(md.shards[&0].replicas, vec![1, 2, 4]);
        // A failover afterwards needs the next epoch and a member of the new set.
        let to_3 = MetadataCommand::SetShardLeader {
            shard: 0,
            leader: 3,
            epoch: 2,
        };
        rejected(&mut md, &to_3);
        let to_4 = MetadataCommand::SetShardLeader {
            shard: 0,
            leader: 4,
            epoch: 2,
        };
        assert_eq!(md.apply(&to_4), MetadataResponse::Ok);
        // A change decided before that failover is now stale.
        rejected(&mut md, &change(1, &[1, 2, 4], &[1, 2, 4, 5]));
        assert_eq!(
            md.apply(&change(2, &[1, 2, 4], &[1, 2, 4, 5])),
            MetadataResponse::Ok
        );
        // No set beyond what a replication leader serves.
        let mut big = ClusterMetadata::default();
        let many: Vec<NodeId> = (1..=SHARD_REPLICAS_MAX as NodeId + 1).collect();
        rejected(
            &mut big,
            &MetadataCommand::AssignShard {
                shard: 0,
                replicas: many.clone(),
            },
        );
        let full = &many[..SHARD_REPLICAS_MAX];
        assert_eq!(
            big.apply(&MetadataCommand::AssignShard {
                shard: 0,
                replicas: full.to_vec(),
            }),
            MetadataResponse::Ok
        );
        rejected(&mut big, &change(1, full, &many));
    }

    #[test]
    fn create_stream_twice_is_rejected_and_leader_must_be_a_replica() {
        let mut md = ClusterMetadata::default();
        let create = MetadataCommand::CreateStream {
            stream_id: 7,
            durability: "fsync".into(),
            replication_factor: 2,
            replicas: vec![1, 2],
            retention_bytes: Some(1 << 20),
            retention_age_ns: None,
        };
        assert_eq!(md.apply(&create), MetadataResponse::Ok);
        assert_eq!(md.streams[&7].leader, Some(1));
        assert_eq!(md.streams[&7].retention_bytes, Some(1 << 20));
        assert!(matches!(md.apply(&create), MetadataResponse::Rejected(_)));
        let bad = MetadataCommand::SetStreamLeader {
            stream_id: 7,
            leader: 3,
        };
        assert!(matches!(md.apply(&bad), MetadataResponse::Rejected(_)));
        let good = MetadataCommand::SetStreamLeader {
            stream_id: 7,
            leader: 2,
        };
        assert_eq!(md.apply(&good), MetadataResponse::Ok);
        assert_eq!(md.streams[&7].leader, Some(2));
        let wrong_factor = MetadataCommand::CreateStream {
            stream_id: 8,
            durability: "memory".into(),
            replication_factor: 3,
            replicas: vec![1],
            retention_bytes: None,
            retention_age_ns: None,
        };
        assert!(matches!(
            md.apply(&wrong_factor),
            MetadataResponse::Rejected(_)
        ));
        // A deleted id is remembered until it is created again.
        let delete = MetadataCommand::DeleteStream { stream_id: 7 };
        assert_eq!(md.apply(&delete), MetadataResponse::Ok);
        assert!(md.deleted_streams.contains(&7) && !md.streams.contains_key(&7));
        assert!(matches!(md.apply(&delete), MetadataResponse::Rejected(_)));
        assert_eq!(md.apply(&create), MetadataResponse::Ok);
        assert!(md.deleted_streams.is_empty());
        // Commands logged before the retention fields existed still load.
        let old = r#"{"CreateStream":{"stream_id":9,"durability":"memory","replication_factor":1,"replicas":[1]}}"#;
        let loaded: MetadataCommand = serde_json::from_str(old).unwrap();
        assert!(matches!(
            loaded,
            MetadataCommand::CreateStream {
                retention_bytes: None,
                retention_age_ns: None,
                ..
            }
        ));
    }
}
