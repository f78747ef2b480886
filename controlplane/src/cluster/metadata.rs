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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
