//! What the admin API does differently on a cluster member: streams and
//! cluster-wide configuration entries are recorded in the Raft metadata
//! before (streams) or instead of (configuration) changing only this broker.
//! With data replication, a stream is recorded with its shard's replica set
//! and every replica creates (and deletes) it.
//! Failures come back as gRPC statuses that say what to do (see
//! `proto/admin.proto`).

use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{StreamError, StreamInfo, StreamRetention};
use tonic::Status;

use super::{ClusterNode, MetadataCommand, MetadataResponse, ProposeError};
use crate::broker::Broker;
use crate::shard_call::StreamOpError;

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
    let replicas = vec![node.id()];
    let retention = StreamRetention::default();
    propose_stream_on(node, broker, stream_id, durability, replicas, retention).await
}

/// Record stream `stream_id` in the cluster metadata on `replicas`.
/// Refused when this broker or any member already has it.
async fn propose_stream_on(
    node: &ClusterNode,
    broker: &Broker,
    stream_id: u32,
    durability: DurabilityLevel,
    replicas: Vec<super::NodeId>,
    retention: StreamRetention,
) -> Result<(), Status> {
    if let Ok(Some(_)) = broker.stream(stream_id).await {
        return Err(Status::already_exists(format!(
            "stream {stream_id} exists on this broker"
        )));
    }
    let command = MetadataCommand::CreateStream {
        stream_id,
        durability: durability.name().to_string(),
        replication_factor: replicas.len() as u32,
        replicas,
        retention_bytes: retention.bytes,
        retention_age_ns: retention.age_ns,
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

/// `kaelix stream create` on a member of a cluster with data replication
/// (`cluster.replication_factor` = `cluster_factor` > 0): record the stream
/// in the metadata with its shard's replica set, then create it here when
/// this broker is one of them; the other replicas create it as they apply
/// the entry (`cluster::streams::reconcile`). Returns the stream as this
/// broker has it (or, on a broker holding no copy, as it will start) and
/// its number of copies.
pub(crate) async fn create_replicated_stream(
    node: &ClusterNode,
    broker: &Broker,
    stream_id: u32,
    durability: DurabilityLevel,
    retention: StreamRetention,
    requested_factor: Option<u32>,
    cluster_factor: u32,
) -> Result<(StreamInfo, u32), Status> {
    let shard = broker.shard_of(stream_id).id;
    let Some(assignment) = node.metadata().shards.get(&shard).cloned() else {
        return Err(Status::unavailable(format!(
            "stream {stream_id}: its shard {shard} has no replica set yet (shards get one once \
             {cluster_factor} members registered their data endpoints; see kaelix cluster \
             status); retry"
        )));
    };
    let copies = assignment.replicas.len() as u32;
    if let Some(factor) = requested_factor
        && factor != copies
    {
        return Err(Status::failed_precondition(format!(
            "replication_factor: {factor}: the streams of shard {shard} have {copies} copies \
             (nodes {:?}; cluster.replication_factor {cluster_factor}); leave it out or pass \
             {copies}",
            assignment.replicas
        )));
    }
    let replicas = assignment.replicas.clone();
    propose_stream_on(node, broker, stream_id, durability, replicas, retention).await?;
    if !assignment.replicas.contains(&node.id()) {
        let info = StreamInfo {
            stream_id,
            durability,
            first_offset: 0,
            next_offset: 0,
            retention,
        };
        return Ok((info, copies));
    }
    let created = match super::streams::adopt(broker, stream_id, durability, retention).await {
        // The reconciler was faster.
        Err(StreamOpError::Log(StreamError::Exists { .. })) => broker
            .stream(stream_id)
            .await
            .map_err(StreamOpError::Shard)
            .and_then(|info| info.ok_or(StreamOpError::Log(StreamError::Unknown { stream_id }))),
        other => other,
    };
    match created {
        Ok(info) => Ok((info, copies)),
        Err(err) => {
            // Undo: the other replicas delete it again.
            withdraw_stream(node, stream_id).await;
            Err(Status::unavailable(format!(
                "creating stream {stream_id} on this broker: {err} (withdrawn from the cluster \
                 metadata; retry)"
            )))
        }
    }
}

/// `kaelix stream delete` on a member of a cluster with data replication:
/// a stream of the metadata is deleted there first (every replica deletes
/// it as it applies the entry, a replica that was down when it restarts),
/// then here. Returns `false` when the metadata does not have the stream
/// (a stream of this broker's `[[streams]]`: the caller deletes it here
/// only, as without a cluster).
pub(crate) async fn delete_replicated_stream(
    node: &ClusterNode,
    broker: &Broker,
    stream_id: u32,
) -> Result<bool, Status> {
    if !node.metadata().streams.contains_key(&stream_id) {
        return Ok(false);
    }
    let what = format!("deleting stream {stream_id} from the cluster metadata");
    match node
        .propose(MetadataCommand::DeleteStream { stream_id })
        .await
    {
        Ok((_, MetadataResponse::Ok)) => {}
        Ok((_, MetadataResponse::Rejected(reason))) => {
            return Err(Status::not_found(format!("{what}: {reason}")));
        }
        Err(err) => return Err(propose_status(&what, err)),
    }
    match broker.delete_stream(stream_id).await {
        Ok(()) | Err(StreamOpError::Log(StreamError::Unknown { .. })) => Ok(true),
        Err(err) => Err(Status::unavailable(format!(
            "stream {stream_id} is deleted from the cluster metadata, but deleting it on this \
             broker failed: {err} (retried within a tick)"
        ))),
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
