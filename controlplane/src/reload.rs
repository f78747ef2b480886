//! The configuration in force and how it changes while the broker runs.
//!
//! A change (file edited, SIGHUP, `kaelix config reload`, `kaelix config
//! set`) rebuilds the whole configuration from its layers and validates it
//! first; on any problem nothing changes and the error is kept for `kaelix
//! broker status`. A valid configuration is split: the hot keys are applied
//! to the running broker, the others are reported as waiting for a restart
//! and keep their running values.
//!
//! How each hot key reaches the data plane without dropping or duplicating
//! a message:
//! - `dataplane.shard.credit_window`, `dataplane.shard.idle`: stored in the
//!   shard's [`kaelix_dataplane::ShardTunables`]; the loop reads them
//!   between cycles.
//! - `storage.retention_mib`, `storage.retention_age_secs`: a command on
//!   each shard's queue, run between batches with the log in hand.
//! - `log.level`: the process's log filter ([`crate::logging`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::broker::Broker;
use crate::config::{Apply, Config, ConfigError, KeyChange, apply_of, diff, key_spec};
use crate::layers::{ConfigLayers, Entry, Resolved, parse_value};

/// What a reload or a set did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Hot keys now in force.
    pub applied: Vec<KeyChange>,
    /// Keys whose new value waits for a restart (all of them, not only this change's).
    pub restart_required: Vec<KeyChange>,
}

/// Why a change was not made. The configuration in force is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The new configuration is invalid (every problem listed).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// `config set` of a key that does not exist.
    #[error("unknown key {key:?}")]
    UnknownKey {
        /// The key.
        key: String,
    },
    /// `config set` of a key that only a restart changes.
    #[error("{key} needs a restart: change it in the file (or with a flag) and restart the broker")]
    RestartOnly {
        /// The key.
        key: String,
    },
    /// The broker did not take the change (a shard did not answer).
    #[error("applying {key}: {message}")]
    Apply {
        /// The key being applied.
        key: String,
        /// What went wrong.
        message: String,
    },
}

/// Reload counters (for the metrics).
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Changes applied.
    pub applied: AtomicU64,
    /// Changes rejected.
    pub rejected: AtomicU64,
    /// Nanoseconds spent in the last change, applied or rejected.
    pub last_duration_ns: AtomicU64,
}

/// The configuration in force, its layers, and what waits for a restart.
pub struct ConfigManager {
    layers: Mutex<ConfigLayers>,
    running: ArcSwap<Resolved>,
    pending_restart: Mutex<Vec<KeyChange>>,
    last_error: Mutex<Option<String>>,
    /// Counters for the metrics.
    pub stats: ReloadStats,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every guarded value is replaced whole, so it is consistent after a panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConfigManager {
    /// Start with the configuration the broker was started with.
    pub fn new(layers: ConfigLayers, resolved: Resolved) -> Self {
        Self {
            layers: Mutex::new(layers),
            running: ArcSwap::from_pointee(resolved),
            pending_restart: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            stats: ReloadStats::default(),
        }
    }

    /// The configuration in force (lock-free).
    pub fn current(&self) -> Arc<Resolved> {
        self.running.load_full()
    }

    /// Every key in force with its value, source and reload behaviour.
    pub fn entries(&self) -> Vec<Entry> {
        self.current().entries()
    }

    /// The configuration file, if any.
    pub fn file(&self) -> Option<std::path::PathBuf> {
        lock(&self.layers).file().map(|p| p.to_path_buf())
    }

    /// Keys changed in the file (or by flags) that wait for a restart.
    pub fn pending_restart(&self) -> Vec<KeyChange> {
        lock(&self.pending_restart).clone()
    }

    /// Why the newest change was rejected, if it was.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Re-read the file (the other layers stay) and apply what changed.
    /// Blocking: call it off the async runtime.
    pub fn reload(&self, broker: &Broker) -> Result<ApplyOutcome, ApplyError> {
        let mut layers = lock(&self.layers);
        let candidate = layers.clone();
        self.change(broker, &mut layers, candidate)
    }

    /// Set one hot key (`kaelix config set`); it stays set until the broker
    /// stops, above the file, the environment and the flags.
    /// Blocking: call it off the async runtime.
    pub fn set(&self, broker: &Broker, key: &str, value: &str) -> Result<ApplyOutcome, ApplyError> {
        self.check_key(key)?;
        let mut layers = lock(&self.layers);
        let mut candidate = layers.clone();
        candidate.set_admin(key, parse_value(value));
        self.change(broker, &mut layers, candidate)
    }

    /// What [`ConfigManager::set`] would say about `key = value`, without
    /// applying anything (a cluster-wide change is checked before it is
    /// proposed to the other members).
    pub fn check_set(&self, key: &str, value: &str) -> Result<(), ApplyError> {
        self.check_key(key)?;
        let mut candidate = lock(&self.layers).clone();
        candidate.set_admin(key, parse_value(value));
        candidate.resolve()?;
        Ok(())
    }

    /// A key `set` takes: known and hot.
    fn check_key(&self, key: &str) -> Result<(), ApplyError> {
        let known = key_spec(key).is_some()
            || crate::config::flatten(&self.current().config).contains_key(key);
        if !known {
            return Err(ApplyError::UnknownKey {
                key: key.to_string(),
            });
        }
        if apply_of(key) == Apply::Restart {
            return Err(ApplyError::RestartOnly {
                key: key.to_string(),
            });
        }
        Ok(())
    }

    /// Validate `candidate`, apply its hot keys, record what waits for a
    /// restart, and adopt its layers. `layers` is held locked throughout, so
    /// changes are applied one at a time.
    fn change(
        &self,
        broker: &Broker,
        layers: &mut ConfigLayers,
        candidate: ConfigLayers,
    ) -> Result<ApplyOutcome, ApplyError> {
        let started = Instant::now();
        let result = self.resolve_and_apply(broker, &candidate);
        self.stats
            .last_duration_ns
            .store(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match &result {
            Ok(outcome) => {
                *layers = candidate;
                *lock(&self.last_error) = None;
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                for change in &outcome.applied {
                    tracing::info!(key = %change.key, old = %change.old, new = %change.new, "configuration applied");
                }
                for change in &outcome.restart_required {
                    tracing::warn!(key = %change.key, running = %change.old, wanted = %change.new, "configuration change waits for a restart");
                }
            }
            Err(err) => {
                *lock(&self.last_error) = Some(err.to_string());
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, "configuration change rejected; the running configuration is unchanged");
            }
        }
        result
    }

    fn resolve_and_apply(
        &self,
        broker: &Broker,
        candidate: &ConfigLayers,
    ) -> Result<ApplyOutcome, ApplyError> {
        let wanted = candidate.resolve()?;
        let running = self.current();
        let next = running.config.with_hot_values_of(&wanted.config);
        let applied = diff(&running.config, &next);
        apply_hot(broker, &running.config, &next)?;
        let restart_required = diff(&next, &wanted.config);
        let restart_keys: Vec<String> = restart_required.iter().map(|c| c.key.clone()).collect();
        let sources = wanted.sources.keeping(&restart_keys, &running.sources);
        self.running.store(Arc::new(Resolved {
            config: next,
            sources,
        }));
        *lock(&self.pending_restart) = restart_required.clone();
        Ok(ApplyOutcome {
            applied,
            restart_required,
        })
    }
}

/// Put the hot keys of `next` that differ from `running` into force.
fn apply_hot(broker: &Broker, running: &Config, next: &Config) -> Result<(), ApplyError> {
    if running.log.level != next.log.level {
        crate::logging::set_level(&next.log.level).map_err(|message| ApplyError::Apply {
            key: "log.level".into(),
            message,
        })?;
    }
    let (old_shard, new_shard) = (&running.dataplane.shard, &next.dataplane.shard);
    if old_shard.credit_window != new_shard.credit_window || old_shard.idle != new_shard.idle {
        for shard in broker.shards() {
            shard.tunables.set(new_shard.credit_window, new_shard.idle);
        }
    }
    if running.storage.retention_mib != next.storage.retention_mib
        || running.storage.retention_age_secs != next.storage.retention_age_secs
    {
        broker
            .set_retention_blocking(
                next.storage.retention_mib.map(|mib| mib * 1024 * 1024),
                next.storage.retention_age_secs.map(|s| s * 1_000_000_000),
            )
            .map_err(|err| ApplyError::Apply {
                key: "storage.retention".into(),
                message: err.to_string(),
            })?;
    }
    Ok(())
}
