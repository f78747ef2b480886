//! Cluster metadata replicated with Raft (openraft 0.9, `storage-v2`).
//!
//! A Raft group across the brokers whose state machine ([`ClusterMetadata`])
//! holds the members, the streams (durability, replication factor, replica
//! set, leader) and cluster-wide configuration entries. Message data never goes
//! through Raft: entries are small metadata commands ([`MetadataCommand`]).
//!
//! - [`log_store::LogStore`]: the durable Raft log and vote, files in one
//!   directory (append-only log with a CRC32 per record, vote written
//!   atomically with fsync).
//! - [`state_machine::StateMachineStore`]: applies commands; snapshots are the
//!   serialized state, written and installed atomically.
//! - [`network`]: openraft's RPCs (append entries, vote, install snapshot) and
//!   proposal forwarding over tonic (`proto/cluster.proto`).
//! - [`node::ClusterNode`]: start a node, initialize, join and leave, propose,
//!   status.
//!
//! - `admin` (crate-private): stream creation and cluster-wide configuration
//!   through the Raft metadata, for the admin API of a cluster member.
//! - `apply` (crate-private): puts committed cluster-wide configuration
//!   entries into force on the local broker.
//! - `streams` (crate-private): with data replication, every replica of a
//!   shard creates and deletes the metadata's streams of that shard.
//!
//! A broker with a `[cluster]` section starts a node in `kaelix serve`; its
//! admin API serves the same RPCs (the `kaelix cluster` CLI uses them).
//! Not here yet: stream data replication, the `replicated` durability level
//! and data failover.

pub(crate) mod admin;
pub(crate) mod apply;
pub mod log_store;
pub mod metadata;
pub mod network;
pub mod node;
pub mod pb;
pub(crate) mod rebalance;
pub(crate) mod shards;
pub(crate) mod streams;
pub use shards::catch_up_before_start;
pub mod state_machine;
#[cfg(test)]
mod storage_suite_tests;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use metadata::{
    ClusterMetadata, MetadataCommand, MetadataResponse, NodeEndpoints, ShardAssignment, StreamInfo,
};
pub use node::{
    ClusterNode, ClusterNodeConfig, ClusterStatus, FollowerProgress, PositionSource, ProposeError,
    ShardPosition, TransferReport, TransferRequest, shard_positions,
};

/// A node's identifier in the Raft group.
pub type NodeId = u64;

/// What the cluster knows about one member: where its Raft/admin endpoint and
/// its data port listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddr {
    /// `host:port` of the node's cluster gRPC server (Raft RPCs, forwarding).
    pub raft_addr: String,
    /// `host:port` of the node's data plane (producers and consumers).
    pub data_addr: String,
}

impl fmt::Display for MemberAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} data={}", self.raft_addr, self.data_addr)
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the metadata group.
    pub TypeConfig:
        D = MetadataCommand,
        R = MetadataResponse,
        NodeId = NodeId,
        Node = MemberAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle for the metadata group.
pub type Raft = openraft::Raft<TypeConfig>;
/// A Raft log entry of the metadata group.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (term, leader, index) of the metadata group.
pub type LogId = openraft::LogId<NodeId>;
/// Storage error of the metadata group.
pub type StorageError = openraft::StorageError<NodeId>;
