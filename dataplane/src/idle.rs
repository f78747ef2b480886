//! What a shard does when a poll finds nothing: spin, or spin then yield then park.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How an idle shard waits for traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IdleStrategy {
    /// Busy-poll forever: lowest latency, one core at 100 % even when idle.
    Spin,
    /// Spin for `spin_cycles` empty polls, then `std::thread::yield_now` for
    /// `yield_cycles`, then block in the backend for up to `park_us`
    /// microseconds at a time. An idle broker costs a few percent of a core.
    Adaptive {
        /// Empty polls spent spinning.
        spin_cycles: u32,
        /// Empty polls spent yielding after that.
        yield_cycles: u32,
        /// Longest single park, in microseconds.
        park_us: u32,
    },
}

impl Default for IdleStrategy {
    fn default() -> Self {
        Self::Adaptive {
            spin_cycles: 20_000,
            yield_cycles: 200,
            park_us: 10_000,
        }
    }
}

/// What the loop should do after an empty poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleAction {
    /// Poll again at once.
    Spin,
    /// Yield the CPU, then poll again.
    Yield,
    /// Block in the backend for at most this long.
    Park(Duration),
}

/// Tracks consecutive empty polls and picks the next [`IdleAction`].
#[derive(Debug, Clone)]
pub struct Idler {
    strategy: IdleStrategy,
    empty: u32,
}

impl Idler {
    /// Start with no empty polls seen.
    pub fn new(strategy: IdleStrategy) -> Self {
        Self { strategy, empty: 0 }
    }

    /// The poll found work: reset.
    pub fn busy(&mut self) {
        self.empty = 0;
    }

    /// The poll found nothing while acknowledgements wait for another
    /// thread (the flusher writing or syncing, replication): what next.
    ///
    /// Spinning is replaced by yielding. The thread they wait for may share
    /// this cpu, and a busy-polling shard (at a real-time priority it never
    /// loses its cpu to a thread of the same priority) would otherwise hold
    /// it for the whole spin phase, so every ACK at those levels waits for
    /// the spin phase to run out (about 15 ms of empty polls). Yielding to
    /// nobody costs one syscall per empty poll, and only while waiting.
    pub fn idle_waiting(&mut self) -> IdleAction {
        match self.idle() {
            IdleAction::Spin => IdleAction::Yield,
            action => action,
        }
    }

    /// The poll found nothing: what next.
    pub fn idle(&mut self) -> IdleAction {
        self.empty = self.empty.saturating_add(1);
        match self.strategy {
            IdleStrategy::Spin => IdleAction::Spin,
            IdleStrategy::Adaptive {
                spin_cycles,
                yield_cycles,
                park_us,
            } => {
                if self.empty <= spin_cycles {
                    IdleAction::Spin
                } else if self.empty <= spin_cycles.saturating_add(yield_cycles) {
                    IdleAction::Yield
                } else {
                    IdleAction::Park(Duration::from_micros(u64::from(park_us.max(1))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_goes_spin_yield_park_and_resets() {
        let mut idler = Idler::new(IdleStrategy::Adaptive {
            spin_cycles: 2,
            yield_cycles: 1,
            park_us: 500,
        });
        assert_eq!(idler.idle(), IdleAction::Spin);
        assert_eq!(idler.idle(), IdleAction::Spin);
        assert_eq!(idler.idle(), IdleAction::Yield);
        assert_eq!(idler.idle(), IdleAction::Park(Duration::from_micros(500)));
        idler.busy();
        assert_eq!(idler.idle(), IdleAction::Spin);
    }

    #[test]
    fn waiting_for_another_thread_yields_instead_of_spinning() {
        let mut idler = Idler::new(IdleStrategy::Adaptive {
            spin_cycles: 2,
            yield_cycles: 1,
            park_us: 500,
        });
        assert_eq!(idler.idle_waiting(), IdleAction::Yield);
        assert_eq!(idler.idle_waiting(), IdleAction::Yield);
        assert_eq!(idler.idle_waiting(), IdleAction::Yield);
        // Past the spin and yield phases it still parks (briefly, see Shard::run).
        assert_eq!(
            idler.idle_waiting(),
            IdleAction::Park(Duration::from_micros(500))
        );
        let mut spin = Idler::new(IdleStrategy::Spin);
        for _ in 0..1000 {
            assert_eq!(spin.idle_waiting(), IdleAction::Yield);
        }
    }

    #[test]
    fn spin_never_parks() {
        let mut idler = Idler::new(IdleStrategy::Spin);
        for _ in 0..1000 {
            assert_eq!(idler.idle(), IdleAction::Spin);
        }
    }
}
