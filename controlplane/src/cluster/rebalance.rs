//! Replica sets that follow the Raft membership: the failover controller
//! ([`super::shards`], on the Raft leader) moves a shard's replicas off a
//! node that left the cluster and onto one that joined.
//!
//! One node at a time, add before remove (`SetShardReplicas`, applied only
//! at the epoch and replica set it was decided on):
//!
//! 1. **Grow.** A replica that is no longer a Raft member leaves the set
//!    short of current members; the controller adds a live registered member
//!    outside the set (the one in the fewest replica sets, lowest id on a
//!    tie). The shard's leader serves it and catches it up; from then on the
//!    leader's quorum is a majority of the grown set. A set smaller than
//!    `replication_factor` grows the same way.
//! 2. **Evidence.** Every current replica other than the leader reports
//!    that its log agrees with the leader's epoch (the added one can only
//!    do so after the leader accepted its session, so after the leader's
//!    replication started serving the grown set). Seen in one round, the
//!    leader's appended position reported in a *later* round becomes the
//!    catch-up target: everything acknowledged under the old, smaller
//!    quorum is below it.
//! 3. **Shrink.** The departed node is dropped once a majority of the set
//!    without it (the leader included) holds the log up to the target (at
//!    the current epoch). An acknowledged write below the target is then on
//!    a majority of the new set; one above it was acknowledged by a majority
//!    of the grown set, of which at most the departed node is gone. Both are
//!    what the failover rule ([`super::shards::choose_leader`]) needs.
//!
//! A shard whose leader left (or is silent) is not changed: the failover
//! path (or a planned transfer) moves the leadership first. A departed node
//! with no free member to replace it stays in the set (its copy counts as
//! missing; the quorum is unchanged). The controller's memory of a target
//! is lost when the Raft leader changes; the next controller finds the
//! evidence again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::node::ShardPosition;
use super::{ClusterMetadata, ClusterNode, MetadataCommand, MetadataResponse, NodeId};
use super::{ShardAssignment, metadata::SHARD_REPLICAS_MAX};

/// What the controller last heard from one node about one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Report {
    /// It answered within `failover_after_ms`.
    pub live: bool,
    /// The epoch its log of the shard is known to agree with.
    pub epoch: u64,
    /// Where its log of the shard ends.
    pub appended: u64,
}

/// The controller's next move for one shard's replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to change.
    Keep,
    /// A change is due but cannot be made yet, for this reason.
    Wait(&'static str),
    /// Add this member to the set.
    Add(NodeId),
    /// Every current replica follows the leader at the current epoch; with
    /// that seen in an earlier round, take the leader's appended position
    /// as the catch-up target.
    Target,
    /// Drop this departed node from the set.
    Remove(NodeId),
}

/// The next step for `assignment`, given the registered Raft `members`
/// (each with the number of replica sets it is in), what the controller
/// heard this round (`reports`, by node) and the catch-up `target` recorded
/// for this very set and epoch. Pure: every input is explicit.
pub(crate) fn step(
    assignment: &ShardAssignment,
    factor: usize,
    members: &BTreeMap<NodeId, usize>,
    reports: &BTreeMap<NodeId, Report>,
    target: Option<u64>,
) -> Step {
    let (leader, epoch) = (assignment.leader, assignment.epoch);
    let departed: Vec<NodeId> = assignment
        .replicas
        .iter()
        .copied()
        .filter(|id| !members.contains_key(id))
        .collect();
    let current = assignment.replicas.len() - departed.len();
    if departed.is_empty() && current >= factor {
        return Step::Keep;
    }
    if departed.contains(&leader) {
        return Step::Wait("the leader left: leadership moves first");
    }
    let following = |id: &NodeId| reports.get(id).is_some_and(|r| r.live && r.epoch == epoch);
    if !following(&leader) {
        return Step::Wait("the leader is silent or does not confirm the epoch");
    }
    if current < factor {
        if assignment.replicas.len() >= SHARD_REPLICAS_MAX {
            return Step::Wait("the replica set is at its largest");
        }
        let free = members
            .iter()
            .filter(|(id, _)| !assignment.replicas.contains(id))
            .filter(|(id, _)| reports.get(id).is_some_and(|r| r.live))
            .min_by_key(|(id, load)| (**load, **id));
        return match free {
            Some((id, _)) => Step::Add(*id),
            None if departed.is_empty() => Step::Wait("no free live member to add"),
            None => Step::Wait("no free live member to replace the departed one"),
        };
    }
    // Enough current members: drop a departed node once it is safe.
    let Some(&gone) = departed.first() else {
        return Step::Keep;
    };
    let connected = assignment
        .replicas
        .iter()
        .filter(|id| **id != leader && members.contains_key(id))
        .all(following);
    if !connected {
        return Step::Wait("a current replica does not follow the leader yet");
    }
    let Some(target) = target else {
        return Step::Target;
    };
    let kept: Vec<NodeId> = assignment
        .replicas
        .iter()
        .copied()
        .filter(|id| *id != gone)
        .collect();
    let caught_up = kept
        .iter()
        .filter(|id| {
            **id == leader
                || reports
                    .get(id)
                    .is_some_and(|r| r.live && r.epoch == epoch && r.appended >= target)
        })
        .count();
    let majority = kept.len() / 2 + 1;
    if caught_up >= majority {
        Step::Remove(gone)
    } else {
        Step::Wait("the new replicas are catching up")
    }
}

/// A catch-up target for one shard, valid for the set and epoch it was
/// taken at.
#[derive(Debug, Clone)]
struct CatchUp {
    epoch: u64,
    replicas: Vec<NodeId>,
    /// The round the evidence was first seen in.
    seen_in: u64,
    target: Option<u64>,
}

/// The controller's replica-set mover: its rounds and catch-up targets.
#[derive(Debug, Default)]
pub(crate) struct ReplicaMover {
    rounds: u64,
    catch_up: BTreeMap<u32, CatchUp>,
}

impl ReplicaMover {
    /// One round, after the controller asked every member where its logs
    /// end (`heard`: when each last answered and what it said; a node is
    /// live when that is less than `limit` ago). Proposes at most one
    /// change per shard.
    pub(crate) async fn tick(
        &mut self,
        node: &ClusterNode,
        metadata: &ClusterMetadata,
        heard: &BTreeMap<NodeId, (Instant, Vec<ShardPosition>)>,
        limit: Duration,
        factor: usize,
        round_began: Instant,
    ) {
        self.rounds += 1;
        let round = self.rounds;
        let mut members: BTreeMap<NodeId, usize> = metadata
            .nodes
            .keys()
            .filter(|id| metadata.members.contains_key(id))
            .map(|id| (*id, 0))
            .collect();
        for assignment in metadata.shards.values() {
            for id in &assignment.replicas {
                if let Some(load) = members.get_mut(id) {
                    *load += 1;
                }
            }
        }
        self.catch_up.retain(|shard, c| {
            metadata
                .shards
                .get(shard)
                .is_some_and(|a| a.epoch == c.epoch && a.replicas == c.replicas)
        });
        let live: BTreeSet<NodeId> = heard
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < limit)
            .map(|(id, _)| *id)
            .collect();
        for (&shard, assignment) in &metadata.shards {
            let reports: BTreeMap<NodeId, Report> = heard
                .iter()
                .filter_map(|(id, (_, positions))| {
                    let p = positions.iter().find(|p| p.shard == shard)?;
                    Some((
                        *id,
                        Report {
                            live: live.contains(id),
                            epoch: p.epoch,
                            appended: p.appended,
                        },
                    ))
                })
                .collect();
            let target = self.catch_up.get(&shard).and_then(|c| c.target);
            let replicas = match step(assignment, factor, &members, &reports, target) {
                Step::Keep | Step::Wait(_) => continue,
                Step::Target => {
                    let entry = self.catch_up.entry(shard).or_insert_with(|| CatchUp {
                        epoch: assignment.epoch,
                        replicas: assignment.replicas.clone(),
                        seen_in: round,
                        target: None,
                    });
                    // The leader's own answer of this round: an older one
                    // may predate its serving the grown set, and writes
                    // the old quorum acknowledged could lie above it.
                    let fresh = heard
                        .get(&assignment.leader)
                        .is_some_and(|(at, _)| *at >= round_began);
                    if entry.seen_in < round && fresh {
                        let appended = reports.get(&assignment.leader).map(|r| r.appended);
                        entry.target = appended;
                        tracing::info!(
                            shard,
                            replicas = ?assignment.replicas,
                            target = ?appended,
                            "replica set change: waiting for the new replicas to reach the leader's position"
                        );
                    }
                    continue;
                }
                Step::Add(id) => {
                    tracing::info!(shard, node = id, from = ?assignment.replicas, "replica set change: adding a replica");
                    let mut grown = assignment.replicas.clone();
                    grown.push(id);
                    if let Some(load) = members.get_mut(&id) {
                        *load += 1;
                    }
                    grown
                }
                Step::Remove(id) => {
                    tracing::info!(shard, node = id, from = ?assignment.replicas, "replica set change: dropping a departed replica");
                    assignment
                        .replicas
                        .iter()
                        .copied()
                        .filter(|r| *r != id)
                        .collect()
                }
            };
            let command = MetadataCommand::SetShardReplicas {
                shard,
                epoch: assignment.epoch,
                from: assignment.replicas.clone(),
                replicas,
            };
            match node.propose(command).await {
                Ok((_, MetadataResponse::Ok)) => {}
                Ok((_, MetadataResponse::Rejected(reason))) => {
                    tracing::info!(shard, %reason, "replica set change refused (the metadata moved on)");
                }
                Err(err) => tracing::warn!(shard, error = %err, "proposing a replica set change"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(replicas: &[NodeId], leader: NodeId, epoch: u64) -> ShardAssignment {
        ShardAssignment {
            replicas: replicas.to_vec(),
            leader,
            epoch,
        }
    }

    fn members(ids: &[(NodeId, usize)]) -> BTreeMap<NodeId, usize> {
        ids.iter().copied().collect()
    }

    fn at(epoch: u64, appended: u64) -> Report {
        Report {
            live: true,
            epoch,
            appended,
        }
    }

    #[test]
    fn a_departed_follower_is_replaced_add_first_then_dropped_once_caught_up() {
        // Nodes 1, 2, 3 hold shard 0 (1 leads at epoch 2); 3 left, 4 joined.
        let members = members(&[(1, 1), (2, 1), (4, 0)]);
        let mut reports = BTreeMap::from([(1, at(2, 1000)), (2, at(2, 900)), (4, at(0, 0))]);
        let set = assignment(&[1, 2, 3], 1, 2);
        assert_eq!(step(&set, 3, &members, &reports, None), Step::Add(4));
        // Grown: the new replica has not connected yet.
        let grown = assignment(&[1, 2, 3, 4], 1, 2);
        assert_eq!(
            step(&grown, 3, &members, &reports, None),
            Step::Wait("a current replica does not follow the leader yet")
        );
        // Connected (its log agrees with epoch 2): take a target.
        reports.insert(4, at(2, 10));
        assert_eq!(step(&grown, 3, &members, &reports, None), Step::Target);
        // Node 4 below the target, node 2 at it: 1 and 2 are a majority of
        // {1, 2, 4}, so the departed 3 can go.
        assert_eq!(
            step(&grown, 3, &members, &reports, Some(900)),
            Step::Remove(3)
        );
        // Neither follower there yet: wait.
        assert_eq!(
            step(&grown, 3, &members, &reports, Some(1000)),
            Step::Wait("the new replicas are catching up")
        );
        reports.insert(4, at(2, 1000));
        assert_eq!(
            step(&grown, 3, &members, &reports, Some(1000)),
            Step::Remove(3)
        );
        // A position at another epoch does not count.
        reports.insert(4, at(1, 5000));
        reports.insert(2, at(2, 10));
        assert_eq!(
            step(&grown, 3, &members, &reports, Some(1000)),
            Step::Wait("a current replica does not follow the leader yet")
        );
        // Done: three current members.
        let done = assignment(&[1, 2, 4], 1, 2);
        assert_eq!(step(&done, 3, &members, &reports, None), Step::Keep);
    }

    #[test]
    fn a_departed_leader_waits_for_leadership_to_move_and_sets_grow_to_the_factor() {
        let members = members(&[(2, 1), (3, 1), (4, 0), (5, 2)]);
        let reports =
            BTreeMap::from([(2, at(1, 10)), (3, at(1, 10)), (4, at(0, 0)), (5, at(0, 0))]);
        // Leader 1 left: nothing until it is moved.
        let led_by_gone = assignment(&[1, 2, 3], 1, 1);
        assert!(matches!(
            step(&led_by_gone, 3, &members, &reports, None),
            Step::Wait(_)
        ));
        // After the failover to 2 at epoch 2 (3 not yet reconnected).
        let moved = assignment(&[1, 2, 3], 2, 2);
        let mut after = reports.clone();
        after.insert(2, at(2, 10));
        // The least loaded free member is chosen (4: no sets; 5: two).
        assert_eq!(step(&moved, 3, &members, &after, None), Step::Add(4));
        // A silent leader: wait (the failover path acts).
        let mut silent = after.clone();
        silent.insert(
            2,
            Report {
                live: false,
                ..at(2, 10)
            },
        );
        assert!(matches!(
            step(&moved, 3, &members, &silent, None),
            Step::Wait(_)
        ));
        // A set below the factor grows with live members only.
        let small = assignment(&[2], 2, 2);
        let mut dead_free = after.clone();
        dead_free.insert(
            4,
            Report {
                live: false,
                ..at(0, 0)
            },
        );
        assert_eq!(step(&small, 3, &members, &dead_free, None), Step::Add(3));
        // No free member: a departed node stays (its copy counts as missing).
        let full = members_only(&[2, 3]);
        assert_eq!(
            step(&moved, 3, &full, &after, None),
            Step::Wait("no free live member to replace the departed one")
        );
        // Nothing departed, the set at the factor: keep.
        assert_eq!(
            step(&assignment(&[2, 3, 4], 2, 2), 3, &members, &after, None),
            Step::Keep
        );
    }

    fn members_only(ids: &[NodeId]) -> BTreeMap<NodeId, usize> {
        ids.iter().map(|id| (*id, 1)).collect()
    }

    /// The safety argument of the module, checked exhaustively on small
    /// sets: whatever a majority acknowledged, the failover rule (a
    /// majority of the set live at the epoch, the furthest one wins) finds
    /// it, also during a change: while the leader still uses the old
    /// quorum after the set grew, and after a departed node is dropped once
    /// a majority of the new set reached the target.
    #[test]
    fn the_failover_rule_finds_every_acknowledged_write_across_one_node_changes() {
        use crate::cluster::shards::choose_leader;
        // Replica i holds the write iff bit i of `holders` is set; node 0
        // leads. The write is found when, for every live set the rule
        // accepts (the leader dead), the chosen replica holds it. Logs are
        // prefixes of the leader's, so "furthest" = holds it if any live one does.
        fn found(set: usize, holders: u32) -> bool {
            let majority = set / 2 + 1;
            (0u32..1 << set).filter(|live| live & 1 == 0).all(|live| {
                let candidates: Vec<(NodeId, u64)> = (1..set)
                    .filter(|i| live & (1 << i) != 0)
                    .map(|i| (i as NodeId, u64::from(holders & (1 << i) != 0)))
                    .collect();
                match choose_leader(&candidates, majority) {
                    None => true,
                    Some(chosen) => holders & (1 << chosen) != 0,
                }
            })
        }
        // The checker finds losses: a write on the leader alone, or on the
        // leader and the departed node 2 of {0, 1, 2} after 2 was dropped
        // from {0, 1, 2, 3} before 3 caught up (why the target is needed).
        assert!(!found(3, 0b001), "on the leader alone");
        assert!(found(4, 0b101), "grown to {{0, 1, 2, 3}}, 2 still there");
        // 2 dropped: {0, 1, 3} (renumbered 0, 1, 2) holds it on 0 only.
        assert!(!found(3, 0b001), "dropped before the new replica caught up");
        // Majorities of a set of n that include the leader (bit 0).
        let quorums = |n: usize| {
            let majority = n / 2 + 1;
            (0u32..1 << n).filter(move |h| h & 1 != 0 && h.count_ones() as usize >= majority)
        };
        for old in 1..=5usize {
            // Acknowledged by a majority of the old set (the leader among them);
            // the set grows by one (bit `old`, empty): still found.
            for holders in quorums(old) {
                assert!(found(old, holders), "set {old}, holders {holders:b}");
                assert!(
                    found(old + 1, holders),
                    "grown to {}, holders {holders:b}",
                    old + 1
                );
            }
            // Acknowledged by a majority of the grown set; the departed node
            // `gone` dropped: found in the new set.
            let grown = old + 1;
            for holders in quorums(grown) {
                for gone in 1..grown {
                    let low = holders & ((1 << gone) - 1);
                    let high = (holders >> (gone + 1)) << gone;
                    assert!(
                        found(old, low | high),
                        "{grown} -> {old} without {gone}, {holders:b}"
                    );
                }
            }
        }
    }
}
