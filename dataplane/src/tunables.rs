//! Shard settings the control plane may change while the loop runs.
//!
//! The control plane stores new values, then bumps a generation with a
//! release store. The loop compares the generation (one acquire load) once
//! per cycle and, when it moved, reads the values and applies them between
//! batches, so a change never lands in the middle of a datagram and no frame
//! is dropped or appended twice because of it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use kaelix_protocol::LeaderHint;

use crate::idle::IdleStrategy;
use crate::shard::ShardConfig;

/// The hot-reloadable part of [`ShardConfig`]: the credit window and the
/// idle strategy; and the shard's role in a cluster (whether it leads, and
/// where its leader is when it does not).
#[derive(Debug)]
pub struct ShardTunables {
    generation: AtomicU64,
    credit_window: AtomicU32,
    idle_spin: AtomicBool,
    spin_cycles: AtomicU32,
    yield_cycles: AtomicU32,
    park_us: AtomicU32,
    leading: AtomicBool,
    leader_hint: Mutex<LeaderHint>,
}

/// A shard's role: leading (it accepts PRODUCE frames), or following a
/// leader it names in its `not_leader` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardRole {
    /// Accept PRODUCE frames (the default, and a broker outside a cluster).
    Leading,
    /// Reject PRODUCE frames with `not_leader` and this hint.
    Following(LeaderHint),
}

impl ShardTunables {
    /// Start with the values of `config` at generation 0.
    pub fn new(config: &ShardConfig) -> Self {
        let tunables = Self {
            generation: AtomicU64::new(0),
            credit_window: AtomicU32::new(0),
            idle_spin: AtomicBool::new(false),
            spin_cycles: AtomicU32::new(0),
            yield_cycles: AtomicU32::new(0),
            park_us: AtomicU32::new(0),
            leading: AtomicBool::new(true),
            leader_hint: Mutex::new(LeaderHint::default()),
        };
        tunables.store(config.credit_window, config.idle);
        tunables.generation.store(0, Ordering::Release);
        tunables
    }

    /// Publish new values (one writer at a time: the control plane
    /// serializes its reloads). The loop picks them up on its next cycle.
    pub fn set(&self, credit_window: u32, idle: IdleStrategy) {
        self.store(credit_window, idle);
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn store(&self, credit_window: u32, idle: IdleStrategy) {
        self.credit_window.store(credit_window, Ordering::Relaxed);
        match idle {
            IdleStrategy::Spin => self.idle_spin.store(true, Ordering::Relaxed),
            IdleStrategy::Adaptive {
                spin_cycles,
                yield_cycles,
                park_us,
            } => {
                self.spin_cycles.store(spin_cycles, Ordering::Relaxed);
                self.yield_cycles.store(yield_cycles, Ordering::Relaxed);
                self.park_us.store(park_us, Ordering::Relaxed);
                self.idle_spin.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Change the shard's role; the loop applies it between batches, on its
    /// next cycle.
    pub fn set_role(&self, role: ShardRole) {
        match role {
            ShardRole::Leading => self.leading.store(true, Ordering::Relaxed),
            ShardRole::Following(hint) => {
                *self
                    .leader_hint
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = hint;
                self.leading.store(false, Ordering::Relaxed);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The role in force (read by the loop when the generation moved).
    pub fn role(&self) -> ShardRole {
        if self.leading.load(Ordering::Relaxed) {
            ShardRole::Leading
        } else {
            ShardRole::Following(
                *self
                    .leader_hint
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            )
        }
    }

    /// Bumped by every [`ShardTunables::set`] and [`ShardTunables::set_role`]; load it once per cycle and
    /// read the values only when it changed.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Frames a producer may have unacknowledged per flow.
    pub fn credit_window(&self) -> u32 {
        self.credit_window.load(Ordering::Relaxed)
    }

    /// What an idle shard does.
    pub fn idle(&self) -> IdleStrategy {
        if self.idle_spin.load(Ordering::Relaxed) {
            IdleStrategy::Spin
        } else {
            IdleStrategy::Adaptive {
                spin_cycles: self.spin_cycles.load(Ordering::Relaxed),
                yield_cycles: self.yield_cycles.load(Ordering::Relaxed),
                park_us: self.park_us.load(Ordering::Relaxed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_publishes_new_values_under_a_new_generation() {
        let tunables = ShardTunables::new(&ShardConfig::default());
        assert_eq!(tunables.generation(), 0);
        assert_eq!(tunables.credit_window(), 8192);
        assert_eq!(tunables.idle(), IdleStrategy::default());
        tunables.set(64, IdleStrategy::Spin);
        assert_eq!(tunables.generation(), 1);
        assert_eq!(tunables.credit_window(), 64);
        assert_eq!(tunables.idle(), IdleStrategy::Spin);
        let adaptive = IdleStrategy::Adaptive {
            spin_cycles: 1,
            yield_cycles: 2,
            park_us: 3,
        };
        tunables.set(128, adaptive);
        assert_eq!(tunables.generation(), 2);
        assert_eq!(tunables.idle(), adaptive);
        assert_eq!(tunables.role(), ShardRole::Leading);
        let hint = LeaderHint::new(Some("127.0.0.2:7101".parse().unwrap()));
        tunables.set_role(ShardRole::Following(hint));
        assert_eq!(tunables.generation(), 3);
        assert_eq!(tunables.role(), ShardRole::Following(hint));
        assert_eq!(tunables.credit_window(), 128);
        tunables.set_role(ShardRole::Leading);
        assert_eq!(tunables.role(), ShardRole::Leading);
    }
}
