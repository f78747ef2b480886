//! What the admin API does differently on a cluster member: streams and
//! cluster-wide configuration entries are recorded in the Raft metadata
//! before (streams) or instead of (configuration) changing only this broker.
//! Failures come back as gRPC statuses that say what to do (see
//! `proto/admin.proto`).

use kaelix_protocol::DurabilityLevel;
use tonic::Status;

use super::{ClusterNode, MetadataCommand, MetadataResponse, ProposeError};
use crate::broker::Broker;

/// A failed proposal as a status: no leader or no quorum is worth a retry.
fn propose_status(what: &str, err: ProposeError) -> Status {
    match err {
        ProposeError::NotLeader { .. } | ProposeError::Unreachable { .. } => Status::unavailable(
            format!("{what}: no reachable Raft leader ({err}); retry once the cluster has one"),
        ),
        ProposeError::Membership(_) => Status::failed_precondition(format!("{what}: {err}")),
        ProposeError::Fatal(_) => Status::internal(format!("{what}: {err}")),
    }
}

/// Record stream `stream_id` in the cluster metadata with this node as its
/// only replica. Refused when this broker or any member already has it.
pub(crate) async fn propose_stream(
    node: &ClusterNode,
    broker: &Broker,
    stream_id: u32,
    durability: DurabilityLevel,
) -> Result<(), Status> {
    if let Ok(Some(_)) = broker.stream(stream_id).await {
        return Err(Status::already_exists(format!(
            "stream {stream_id} exists on this broker"
        )));
    }
    let command = MetadataCommand::CreateStream {
        stream_id,
        durability: durability.name().to_string(),
        replication_factor: 1,
        replicas: vec![node.id()],
    };
    let what = format!("recording stream {stream_id} in the cluster metadata");
    match node.propose(command).await {
        Ok((_, MetadataResponse::Ok)) => Ok(()),
        Ok((_, MetadataResponse::Rejected(reason))) => {
            match node.metadata().streams.get(&stream_id) {
                Some(existing) => Err(Status::already_exists(format!(
                    "stream {stream_id} exists in the cluster (replicas {:?})",
                    existing.replicas
                ))),
                None => Err(Status::failed_precondition(format!("{what}: {reason}"))),
            }
        }
        Err(err) => Err(propose_status(&what, err)),
    }
}

/// Refuse to delete a stream the cluster places on another node.
pub(crate) fn check_stream_here(node: &ClusterNode, stream_id: u32) -> Result<(), Status> {
    let metadata = node.metadata();
    let Some(stream) = metadata.streams.get(&stream_id) else {
        return Ok(());
    };
    if stream.replicas.contains(&node.id()) {
        return Ok(());
    }
    let owner = stream.leader.or(stream.replicas.first().copied());
    let at = owner
        .and_then(|id| metadata.members.get(&id))
        .map_or(String::new(), |m| format!(" (data {})", m.data_addr));
    Err(Status::failed_precondition(format!(
        "stream {stream_id} lives on node {}{at}; delete it there",
        owner.map_or("?".to_string(), |id| id.to_string())
    )))
}

/// Remove stream `stream_id` from the cluster metadata if this node holds
/// it there (after a local delete, or to undo a create that failed here).
/// Best effort: a failure is logged.
pub(crate) async fn withdraw_stream(node: &ClusterNode, stream_id: u32) {
    let held_here = node
        .metadata()
        .streams
        .get(&stream_id)
        .is_some_and(|s| s.replicas.contains(&node.id()));
    if !held_here {
        return;
    }
    match node
        .propose(MetadataCommand::DeleteStream { stream_id })
        .await
    {
        Ok((_, MetadataResponse::Ok)) => {}
        Ok((_, MetadataResponse::Rejected(reason))) => {
            tracing::warn!(stream = stream_id, %reason, "removing the stream from the cluster metadata");
        }
        Err(err) => {
            tracing::warn!(stream = stream_id, error = %err, "removing the stream from the cluster metadata");
        }
    }
}

/// Propose a cluster-wide configuration entry (checked by the caller).
pub(crate) async fn propose_config(
    node: &ClusterNode,
    key: &str,
    value: &str,
) -> Result<(), Status> {
    let command = MetadataCommand::SetConfig {
        key: key.to_string(),
        value: value.to_string(),
    };
    let what = format!("setting {key} cluster-wide");
    match node.propose(command).await {
        Ok((_, MetadataResponse::Ok)) => Ok(()),
        Ok((_, MetadataResponse::Rejected(reason))) => {
            Err(Status::failed_precondition(format!("{what}: {reason}")))
        }
        Err(err) => Err(propose_status(&what, err)),
    }
}
