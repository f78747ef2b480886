//! Puts the committed cluster metadata into force on this broker: each
//! cluster-wide configuration entry (`MetadataCommand::SetConfig`, from
//! `kaelix config set --cluster`) is applied to the local configuration as
//! if set with `kaelix config set`, once per new value, as it commits here.
//! At start the entries already in the state machine are applied, so a
//! restarted node takes the cluster's values back.
//!
//! Streams are not created here: a clustered broker creates a stream's log
//! on the node that owns it when the admin call commits (data replication,
//! which would open replicas on other nodes, is not implemented yet).

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::ClusterNode;
use crate::server::ControlState;

/// Apply configuration entries as they commit, until `stop` turns true.
pub(crate) async fn run(
    state: Arc<ControlState>,
    node: Arc<ClusterNode>,
    mut stop: watch::Receiver<bool>,
) {
    let mut metrics = node.raft().metrics();
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_index = None;
    loop {
        let last_applied = metrics.borrow_and_update().last_applied;
        if last_applied != seen_index {
            seen_index = last_applied;
            let wanted = node.metadata().config;
            for (key, value) in wanted {
                if applied.get(&key) == Some(&value) {
                    continue;
                }
                apply_entry(&state, &key, &value).await;
                // Recorded even when refused, so a bad entry is reported
                // once, not on every commit.
                applied.insert(key, value);
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            changed = metrics.changed() => {
                if changed.is_err() {
                    // Raft stopped.
                    return;
                }
            }
        }
    }
}

async fn apply_entry(state: &Arc<ControlState>, key: &str, value: &str) {
    let task_state = state.clone();
    let (task_key, task_value) = (key.to_string(), value.to_string());
    let outcome = tokio::task::spawn_blocking(move || {
        task_state
            .config
            .set(&task_state.broker, &task_key, &task_value)
    })
    .await;
    match outcome {
        Ok(Ok(_)) => tracing::info!(key, value, "cluster configuration entry in force"),
        Ok(Err(err)) => tracing::error!(
            key,
            value,
            error = %err,
            "cluster configuration entry refused on this node"
        ),
        Err(err) => tracing::error!(key, error = %err, "applying a cluster configuration entry"),
    }
}
