//! Stream data replication: the shard is the unit of replication.
//!
//! Message data never goes through Raft. Each shard's leader streams its
//! log's records, exactly as stored, to the shard's followers over TCP
//! ([`ReplicationLeader`], one listener for all shards a broker leads);
//! each follower ([`ReplicaFollower`], one per shard it follows) writes
//! them into its own `ShardLog` at the same positions, after checking
//! every CRC, and reports the positions it holds in memory and fsynced.
//! The leader takes the quorum of its own positions and the followers'
//! (a majority of the replica set, itself included) and publishes it
//! into the log's [`kaelix_storage::CommitPositions`]: the `replicated`
//! and `replicated_fsync` durability levels, which the shard's ACKs and
//! the fetch server read like the local levels.
//!
//! Transport ([`wire`]): a follower connects and says where its log ends
//! (HELLO); the leader answers with a plan (resume from there, or truncate
//! whole segments first, see [`kaelix_storage::replica`]), then sends DATA
//! frames back to back without waiting (at most
//! [`ReplicationConfig::window_bytes`] beyond the follower's last ACK),
//! each carrying whole records of one segment (up to
//! [`ReplicationConfig::chunk_bytes`]) and the commit positions. The
//! follower appends everything it read in one go, then sends one ACK.
//! No per-message work on either side: per chunk, one header check per
//! batch record; per read, one append call and one ACK.
//!
//! Waiting for new data is a poll of the log's appended position (an
//! atomic load): yielding to the runtime while data flowed within the last
//! [`ReplicationConfig::spin`], sleeping [`ReplicationConfig::idle_poll`]
//! otherwise, so the data plane never signals anyone.
//!
//! Not here yet: choosing leaders and replica sets from the Raft metadata,
//! starting these from `kaelix serve`, failover (see docs/cluster.md).

mod follower;
mod leader;
#[cfg(test)]
mod sim_tests;
pub mod wire;

use std::time::Duration;

pub use follower::{
    FollowerConfig, FollowerError, FollowerStatus, ReplicaFollower, ShardSubmit, SubmitRefused,
    ask_plan,
};
pub use leader::{FollowerProgress, LeaderShard, ReplicationLeader};

/// Settings of the replication transport, both roles.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Most record bytes per DATA frame (one larger batch record goes alone).
    pub chunk_bytes: usize,
    /// Bytes sent to a follower beyond its last acknowledged position
    /// before the leader waits for an ACK.
    pub window_bytes: u64,
    /// After data moved, poll for more by yielding (busy) this long before
    /// going back to sleeping between polls.
    pub spin: Duration,
    /// Sleep between polls while idle.
    pub idle_poll: Duration,
    /// Follower: pause before reconnecting after a failed session.
    pub reconnect_delay: Duration,
    /// Follower: ask its flusher to fdatasync everything received right
    /// away (what `replicated_fsync` waits for); otherwise the flusher
    /// syncs on its interval.
    pub follower_sync: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 256 * 1024,
            window_bytes: 16 * 1024 * 1024,
            spin: Duration::from_millis(2),
            idle_poll: Duration::from_millis(1),
            reconnect_delay: Duration::from_millis(50),
            follower_sync: true,
        }
    }
}

/// Why a session ended (the follower retries after a pause; the leader
/// waits for the follower to come back).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("wire: {0}")]
    Wire(#[from] wire::WireError),
    #[error("log: {0}")]
    Replica(#[from] kaelix_storage::ReplicaError),
    #[error("{0}")]
    Protocol(String),
}

/// Wait for the next poll: yield while recently active, else sleep.
async fn pause(config: &ReplicationConfig, last_activity: std::time::Instant) {
    if last_activity.elapsed() < config.spin {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(config.idle_poll).await;
    }
}

/// The `k`-th largest of `values` (k from 1), without allocating.
fn kth_largest(values: &mut [u64], k: usize) -> u64 {
    values.sort_unstable_by(|a, b| b.cmp(a));
    values[k - 1]
}

#[cfg(test)]
mod tests {
    use super::kth_largest;

    #[test]
    fn quorum_is_the_majority_position() {
        // Three replicas, quorum two: the second highest.
        assert_eq!(kth_largest(&mut [100, 40, 70], 2), 70);
        // One follower down (0): leader and the other still commit.
        assert_eq!(kth_largest(&mut [100, 0, 70], 2), 70);
        // Both down: nothing beyond what a follower had.
        assert_eq!(kth_largest(&mut [100, 0, 0], 2), 0);
        // Five replicas, quorum three.
        assert_eq!(kth_largest(&mut [5, 9, 1, 7, 3], 3), 5);
        // A replica set of one.
        assert_eq!(kth_largest(&mut [42], 1), 42);
    }
}
