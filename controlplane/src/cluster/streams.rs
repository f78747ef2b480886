//! Streams created at runtime in a cluster with data replication: the Raft
//! metadata says which streams exist, and every replica of a stream's shard
//! holds them.
//!
//! `kaelix stream create` on any member records the stream in the metadata
//! with its shard's replica set (`cluster::admin::create_replicated_stream`)
//! and creates it on that member when it is a replica; [`reconcile`], run by
//! [`super::shards::run`] on every member once per tick (before the shards'
//! roles, so a broker taking the lead of a shard already has its streams),
//! creates on this broker every stream of the metadata whose shard it holds
//! a copy of and that it lacks (also after a restart), and deletes the
//! streams the metadata deleted ([`super::ClusterMetadata::deleted_streams`]).
//!
//! A replica creates a stream with [`kaelix_storage::ShardLog::adopt_stream`]:
//! the leader may have appended records of it (and sent them here) before
//! this broker learned of the stream; they are stored and indexed like any
//! other records of the shard log, served by no fetch until the stream is
//! created (`unknown_stream`), and served from offset 0 (or the end of the
//! last incarnation deleted here) once it is. Nothing a leader sends is
//! refused for an unknown stream.
//!
//! Streams from a broker's own `[[streams]]` configuration are not in the
//! metadata and are left alone.

use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{StreamConfig, StreamError, StreamInfo, StreamRetention};

use super::{ClusterMetadata, ClusterNode, NodeId};
use crate::broker::Broker;
use crate::shard_call::{ShardCallError, StreamOpError};

/// One change to this broker's streams that the metadata asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Create the stream here.
    Create {
        /// Stream id.
        stream_id: u32,
        /// Its durability level.
        durability: DurabilityLevel,
        /// Its own retention.
        retention: StreamRetention,
    },
    /// Delete it here.
    Delete {
        /// Stream id.
        stream_id: u32,
    },
}

/// Why a stream of the metadata could not be put in place here.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReconcileError {
    /// The metadata names a level this broker does not know.
    #[error(
        "stream {stream_id}: the cluster metadata gives durability {name:?}, which is not a level \
         (allowed: memory, flush, fsync, replicated, replicated_fsync)"
    )]
    UnknownDurability {
        /// Stream id.
        stream_id: u32,
        /// The name found.
        name: String,
    },
    /// The shard did not run the command.
    #[error("stream {stream_id}: {source}")]
    Shard {
        /// Stream id.
        stream_id: u32,
        /// Why.
        #[source]
        source: ShardCallError,
    },
    /// The shard log refused.
    #[error("stream {stream_id}: {source}")]
    Log {
        /// Stream id.
        stream_id: u32,
        /// Why.
        #[source]
        source: StreamError,
    },
}

/// A durability level from its name (`DurabilityLevel::name`).
pub(crate) fn durability_named(name: &str) -> Option<DurabilityLevel> {
    DurabilityLevel::ALL
        .into_iter()
        .find(|level| level.name() == name)
}

/// The nodes that hold a copy of `stream` (its shard's replica set when
/// the shard has one, else the replicas recorded with the stream).
pub(crate) fn holders<'a>(
    metadata: &'a ClusterMetadata,
    stream: &'a super::StreamInfo,
    shard_count: usize,
) -> &'a [NodeId] {
    let shard = (stream.stream_id as usize % shard_count.max(1)) as u32;
    metadata
        .shards
        .get(&shard)
        .map_or(stream.replicas.as_slice(), |assignment| {
            assignment.replicas.as_slice()
        })
}

/// What node `me` (with `shard_count` shards, `has(id)` telling whether a
/// stream exists here) must change to match `metadata`: create the
/// streams whose shard it holds a copy of and lacks, delete the deleted
/// ones it still has. A stream with an unknown durability comes back as an
/// error (the others are planned anyway).
pub(crate) fn plan(
    metadata: &ClusterMetadata,
    me: NodeId,
    shard_count: usize,
    has: impl Fn(u32) -> bool,
) -> Vec<Result<Action, ReconcileError>> {
    let mut actions = Vec::new();
    for (&stream_id, stream) in &metadata.streams {
        if !holders(metadata, stream, shard_count).contains(&me) || has(stream_id) {
            continue;
        }
        actions.push(match durability_named(&stream.durability) {
            Some(durability) => Ok(Action::Create {
                stream_id,
                durability,
                retention: StreamRetention {
                    bytes: stream.retention_bytes,
                    age_ns: stream.retention_age_ns,
                },
            }),
            None => Err(ReconcileError::UnknownDurability {
                stream_id,
                name: stream.durability.clone(),
            }),
        });
    }
    for &stream_id in &metadata.deleted_streams {
        if !metadata.streams.contains_key(&stream_id) && has(stream_id) {
            actions.push(Ok(Action::Delete { stream_id }));
        }
    }
    actions
}

/// Create `stream_id` on this broker as a replica of its shard (see
/// [`kaelix_storage::ShardLog::adopt_stream`]). A shard this broker leads
/// rebuilds its flows when the stream already has records (a retransmit of
/// them is then recognised).
pub(crate) async fn adopt(
    broker: &Broker,
    stream_id: u32,
    durability: DurabilityLevel,
    retention: StreamRetention,
) -> Result<StreamInfo, StreamOpError> {
    let shard = broker.shard_of(stream_id);
    let leading = shard.tunables.role() == kaelix_dataplane::ShardRole::Leading;
    let created = crate::shard_call::call(shard, move |log, flows| {
        let created = log.adopt_stream(stream_id, StreamConfig { durability }, retention);
        if let Ok(info) = &created
            && leading
            && info.next_offset > info.first_offset
        {
            crate::broker::reload_flows(log, flows);
        }
        created
    })
    .await?;
    Ok(created?)
}

/// Bring this broker's streams in line with `metadata` (see [`plan`]).
/// Failures are logged and retried on the next call.
pub(crate) async fn reconcile(broker: &Broker, node: &ClusterNode, metadata: &ClusterMetadata) {
    let has = |stream_id: u32| {
        broker
            .shard_of(stream_id)
            .reader
            .stream_level(stream_id)
            .is_some()
    };
    for action in plan(metadata, node.id(), broker.shards().len(), has) {
        let done = match action {
            Err(err) => Err(err),
            Ok(Action::Create {
                stream_id,
                durability,
                retention,
            }) => match adopt(broker, stream_id, durability, retention).await {
                Ok(info) => {
                    tracing::info!(
                        stream = stream_id,
                        durability = %durability,
                        first_offset = info.first_offset,
                        next_offset = info.next_offset,
                        "stream created here from the cluster metadata"
                    );
                    Ok(())
                }
                // Created meanwhile (by the admin API).
                Err(StreamOpError::Log(StreamError::Exists { .. })) => Ok(()),
                Err(err) => Err(op_error(stream_id, err)),
            },
            Ok(Action::Delete { stream_id }) => match broker.delete_stream(stream_id).await {
                Ok(()) => {
                    tracing::info!(
                        stream = stream_id,
                        "stream deleted here: the cluster metadata deleted it"
                    );
                    Ok(())
                }
                Err(StreamOpError::Log(StreamError::Unknown { .. })) => Ok(()),
                Err(err) => Err(op_error(stream_id, err)),
            },
        };
        if let Err(err) = done {
            tracing::warn!(error = %err, "applying the cluster's streams on this broker; retrying next tick");
        }
    }
}

fn op_error(stream_id: u32, err: StreamOpError) -> ReconcileError {
    match err {
        StreamOpError::Shard(source) => ReconcileError::Shard { stream_id, source },
        StreamOpError::Log(source) => ReconcileError::Log { stream_id, source },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::cluster::{MetadataCommand, MetadataResponse};

    fn create(stream_id: u32, replicas: Vec<NodeId>) -> MetadataCommand {
        MetadataCommand::CreateStream {
            stream_id,
            durability: "replicated".into(),
            replication_factor: replicas.len() as u32,
            replicas,
            retention_bytes: Some(4096),
            retention_age_ns: None,
        }
    }

    /// Metadata with two shards: shard 0 on nodes 1, 2, 3 and shard 1 on 2, 3.
    fn metadata() -> ClusterMetadata {
        let mut md = ClusterMetadata::default();
        for (shard, replicas) in [(0, vec![1, 2, 3]), (1, vec![2, 3])] {
            let assign = MetadataCommand::AssignShard { shard, replicas };
            assert_eq!(md.apply(&assign), MetadataResponse::Ok);
        }
        md
    }

    fn creates(actions: &[Result<Action, ReconcileError>]) -> Vec<u32> {
        actions
            .iter()
            .filter_map(|a| match a {
                Ok(Action::Create { stream_id, .. }) => Some(*stream_id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_replica_of_the_shard_creates_the_stream_it_lacks() {
        let mut md = metadata();
        // Stream 4 is on shard 0, 5 on shard 1 (recorded with one replica:
        // the shard's replica set counts).
        assert_eq!(md.apply(&create(4, vec![1, 2, 3])), MetadataResponse::Ok);
        assert_eq!(md.apply(&create(5, vec![2])), MetadataResponse::Ok);
        let none = |_| false;
        let plan1 = plan(&md, 1, 2, none);
        assert_eq!(creates(&plan1), vec![4]);
        assert_eq!(
            plan1[0].as_ref().unwrap(),
            &Action::Create {
                stream_id: 4,
                durability: DurabilityLevel::Replicated,
                retention: StreamRetention {
                    bytes: Some(4096),
                    age_ns: None
                },
            }
        );
        assert_eq!(creates(&plan(&md, 3, 2, none)), vec![4, 5]);
        // What exists here already is left alone.
        assert!(plan(&md, 3, 2, |id| id == 4 || id == 5).is_empty());
        assert_eq!(creates(&plan(&md, 3, 2, |id| id == 4)), vec![5]);
        // A node holding no copy of either shard creates nothing.
        assert!(plan(&md, 9, 2, none).is_empty());
    }

    #[test]
    fn a_stream_of_an_unassigned_shard_goes_to_its_recorded_replicas() {
        let mut md = ClusterMetadata::default();
        assert_eq!(md.apply(&create(2, vec![7])), MetadataResponse::Ok);
        assert_eq!(creates(&plan(&md, 7, 4, |_| false)), vec![2]);
        assert!(plan(&md, 1, 4, |_| false).is_empty());
    }

    #[test]
    fn deleted_streams_go_on_every_node_that_still_has_them_until_created_again() {
        let mut md = metadata();
        assert_eq!(md.apply(&create(4, vec![1, 2, 3])), MetadataResponse::Ok);
        let delete = MetadataCommand::DeleteStream { stream_id: 4 };
        assert_eq!(md.apply(&delete), MetadataResponse::Ok);
        // A node that still has it (down when it was deleted) deletes it.
        let actions = plan(&md, 2, 2, |id| id == 4);
        assert!(matches!(
            actions.as_slice(),
            [Ok(Action::Delete { stream_id: 4 })]
        ));
        assert!(plan(&md, 2, 2, |_| false).is_empty());
        // A stream never in the metadata (from [[streams]]) is left alone.
        assert!(plan(&md, 2, 2, |id| id == 6).is_empty());
        // Created again: created where missing, never deleted.
        assert_eq!(md.apply(&create(4, vec![1, 2, 3])), MetadataResponse::Ok);
        assert!(plan(&md, 2, 2, |id| id == 4).is_empty());
        assert_eq!(creates(&plan(&md, 2, 2, |_| false)), vec![4]);
        assert_eq!(md.deleted_streams, BTreeSet::new());
    }

    #[test]
    fn an_unknown_durability_is_an_error_for_that_stream_only() {
        let mut md = metadata();
        let odd = MetadataCommand::CreateStream {
            stream_id: 2,
            durability: "carved_in_stone".into(),
            replication_factor: 3,
            replicas: vec![1, 2, 3],
            retention_bytes: None,
            retention_age_ns: None,
        };
        assert_eq!(md.apply(&odd), MetadataResponse::Ok);
        assert_eq!(md.apply(&create(4, vec![1, 2, 3])), MetadataResponse::Ok);
        let actions = plan(&md, 1, 2, |_| false);
        assert_eq!(actions.len(), 2);
        let err = actions[0].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("stream 2") && err.contains("carved_in_stone"),
            "{err}"
        );
        assert_eq!(creates(&actions), vec![4]);
        for level in DurabilityLevel::ALL {
            assert_eq!(durability_named(level.name()), Some(level));
        }
        assert_eq!(durability_named("replicated+fsync"), None);
    }
}
