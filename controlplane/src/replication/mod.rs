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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// Leader: commit positions move only while this lease is valid (the
    /// cluster renews it while the failover controller hears from this
    /// broker); `None` commits whenever a quorum has the data.
    pub lease: Option<Lease>,
}

/// A leader's right to commit, renewed from outside and valid for a fixed
/// time after each renewal. The failover controller moves a shard only
/// after its leader was silent for longer than the lease lasts, so an old
/// leader cut off from the controller stops committing (and acknowledging
/// replicated writes) before a new one starts.
#[derive(Debug, Clone)]
pub struct Lease {
    base: Instant,
    length: Duration,
    /// Nanoseconds after `base` until which the lease holds.
    until_ns: Arc<AtomicU64>,
}

impl Lease {
    /// A lease lasting `length` after each renewal, not yet valid.
    pub fn new(length: Duration) -> Self {
        Self {
            base: Instant::now(),
            length,
            until_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Valid for `length` from now.
    pub fn renew(&self) {
        self.renew_since(Instant::now());
    }

    /// Valid for `length` from `at` (when the evidence for it was asked).
    pub fn renew_since(&self, at: Instant) {
        let since =
            u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let until = since.saturating_add(u64::try_from(self.length.as_nanos()).unwrap_or(u64::MAX));
        self.until_ns.fetch_max(until, Ordering::AcqRel);
    }

    /// End it now (e.g. the shard is no longer led here).
    pub fn revoke(&self) {
        self.until_ns.store(0, Ordering::Release);
    }

    /// True while the last renewal is less than `length` old.
    pub fn is_valid(&self) -> bool {
        self.now_ns() < self.until_ns.load(Ordering::Acquire)
    }
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
            lease: None,
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
    fn a_lease_holds_for_its_length_after_each_renewal() {
        use std::time::Duration;
        let long = super::Lease::new(Duration::from_secs(600));
        assert!(!long.is_valid(), "not valid before the first renewal");
        long.renew();
        assert!(long.is_valid());
        long.revoke();
        assert!(!long.is_valid());
        let short = super::Lease::new(Duration::from_millis(1));
        short.renew();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!short.is_valid(), "expired");
    }

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
