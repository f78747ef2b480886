//! The replicated metadata: commands proposed through Raft and the state they
//! build. Applying is deterministic: every node reaches the same state from
//! the same log.

use std::collections::BTreeMap;

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
        /// Nodes holding a copy, leader first.
        replicas: Vec<NodeId>,
    },
    /// Record a new leader for a stream (must be one of its replicas).
    SetStreamLeader {
        /// Stream id.
        stream_id: u32,
        /// New leader.
        leader: NodeId,
    },
    /// Delete a stream.
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
                    },
                );
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
                let Some(&leader) = replicas.first() else {
                    return MetadataResponse::Rejected(format!("shard {shard}: no replicas"));
                };
                let mut unique = replicas.clone();
                unique.sort_unstable();
                unique.dedup();
                if unique.len() != replicas.len() {
                    return MetadataResponse::Rejected(format!(
                        "shard {shard}: a node appears twice in {replicas:?}"
                    ));
                }
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
                    epoch - 1
                )),
                Some(s) => {
                    s.leader = *leader;
                    s.epoch = *epoch;
                    MetadataResponse::Ok
                }
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
    fn create_stream_twice_is_rejected_and_leader_must_be_a_replica() {
        let mut md = ClusterMetadata::default();
        let create = MetadataCommand::CreateStream {
            stream_id: 7,
            durability: "fsync".into(),
            replication_factor: 2,
            replicas: vec![1, 2],
        };
        assert_eq!(md.apply(&create), MetadataResponse::Ok);
        assert_eq!(md.streams[&7].leader, Some(1));
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
        };
        assert!(matches!(
            md.apply(&wrong_factor),
            MetadataResponse::Rejected(_)
        ));
    }
}
