//! The state machine: applies committed [`MetadataCommand`]s to
//! [`ClusterMetadata`], builds snapshots of it, and installs snapshots sent
//! by the leader.
//!
//! A snapshot is the JSON of [`SnapshotFile`] (metadata, last applied log id,
//! last membership) in `dir/snapshot`, replaced atomically. On start the
//! state machine loads it; openraft then re-applies the committed log after
//! it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::log_store::write_atomic;
use super::{
    ClusterMetadata, Entry, LogId, MemberAddr, MetadataResponse, NodeId, StorageError, TypeConfig,
};

const SNAPSHOT_FILE: &str = "snapshot";

/// What a snapshot holds, and the state machine's whole state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// The last applied log id when the snapshot was taken.
    pub last_applied: Option<LogId>,
    /// The last applied membership.
    pub membership: StoredMembership<NodeId, MemberAddr>,
    /// The metadata.
    pub metadata: ClusterMetadata,
    /// The snapshot's id (unique per build).
    pub snapshot_id: String,
}

struct Inner {
    dir: PathBuf,
    state: SnapshotFile,
    builds: u64,
}

/// The metadata state machine. Clones share state (the snapshot builder is
/// one), and [`StateMachineStore::metadata`] reads it from outside openraft.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Mutex<Inner>>,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl StateMachineStore {
    /// Open the state machine in `dir`, loading the last snapshot if any.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let state = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(invalid)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => SnapshotFile::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                dir,
                state,
                builds: 0,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("state machine mutex poisoned")
    }

    /// A copy of the current metadata.
    pub fn metadata(&self) -> ClusterMetadata {
        self.lock().state.metadata.clone()
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        self.lock().state.last_applied
    }
}

fn members_of(
    membership: &StoredMembership<NodeId, MemberAddr>,
) -> std::collections::BTreeMap<NodeId, MemberAddr> {
    membership
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.clone()))
        .collect()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut inner = self.lock();
        inner.builds += 1;
        let last = inner.state.last_applied;
        inner.state.snapshot_id = match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.builds),
            None => format!("none-{}", inner.builds),
        };
        let bytes = serde_json::to_vec(&inner.state)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        write_atomic(&inner.dir, SNAPSHOT_FILE, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: inner.state.membership.clone(),
            snapshot_id: inner.state.snapshot_id.clone(),
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, MemberAddr>), StorageError> {
        let inner = self.lock();
        Ok((inner.state.last_applied, inner.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetadataResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for entry in entries {
            inner.state.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => MetadataResponse::Ok,
                EntryPayload::Normal(command) => inner.state.metadata.apply(&command),
                EntryPayload::Membership(membership) => {
                    inner.state.membership = StoredMembership::new(Some(entry.log_id), membership);
                    inner.state.metadata.members = members_of(&inner.state.membership);
                    MetadataResponse::Ok
                }
            };
            out.push(response);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MemberAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let mut state: SnapshotFile = serde_json::from_slice(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // The meta is authoritative for what the snapshot covers.
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.metadata.members = members_of(&state.membership);
        state.snapshot_id = meta.snapshot_id.clone();
        let stored = serde_json::to_vec(&state)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let mut inner = self.lock();
        write_atomic(&inner.dir, SNAPSHOT_FILE, &stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        inner.state = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.lock();
        let bytes = match std::fs::read(inner.dir.join(SNAPSHOT_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let stored: SnapshotFile =
            serde_json::from_slice(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        // A state machine that never built a snapshot has no id yet.
        if stored.snapshot_id.is_empty() {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta: SnapshotMeta {
                last_log_id: stored.last_applied,
                last_membership: stored.membership,
                snapshot_id: stored.snapshot_id,
            },
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}
