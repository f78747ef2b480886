//! The durable Raft log and vote: files in one directory.
//!
//! ```text
//! log        append-only records, one per entry:
//!            [len: u32 LE][crc32(payload): u32 LE][payload: len bytes, JSON Entry]
//! vote       JSON Vote, replaced atomically (write tmp, fsync, rename, fsync dir)
//! committed  JSON LogId of the last committed entry, replaced the same way
//! purged     JSON LogId of the last purged entry, replaced the same way
//! ```
//!
//! Appends are written and fsynced before openraft is told they are durable.
//! On open, records are read until the first short or corrupt one (a torn
//! write at a crash) and the file is cut there. `truncate` cuts the file at
//! the first removed entry; `purge` records the purged id, then rewrites the
//! file without the purged entries. Entries must be contiguous: an append
//! that leaves a hole, or a log file with one, is an error. Appended entries
//! at or below the purge point are already covered by a snapshot and are
//! dropped.
//!
//! All I/O is serialized by one mutex; the whole (small) log is also kept in
//! memory for reads.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, RaftLogReader, StorageIOError, Vote};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Entry, LogId, NodeId, StorageError, TypeConfig};

const LOG_FILE: &str = "log";
const VOTE_FILE: &str = "vote";
const COMMITTED_FILE: &str = "committed";
const PURGED_FILE: &str = "purged";
const RECORD_HEADER_BYTES: usize = 8;
/// Upper bound on one record's payload; a larger length is corruption.
const RECORD_PAYLOAD_MAX_BYTES: usize = 64 << 20;

/// The Raft log and vote store. Clones share the same files and state (the
/// log reader handed to replication tasks is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    dir: PathBuf,
    file: File,
    /// index -> (file offset of its record, entry).
    entries: BTreeMap<u64, (u64, Entry)>,
    end_offset: u64,
    purged: Option<LogId>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
}

/// Write `bytes` to `dir/name` so that a crash leaves the old or the new
/// content, never a mix: tmp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn to_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn encode_record(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    let payload = to_json(entry)?;
    assert!(
        payload.len() <= RECORD_PAYLOAD_MAX_BYTES,
        "log entry of {} bytes",
        payload.len()
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Decode the records in `bytes`: the entries with their offsets, and the
/// length of the valid prefix (shorter than `bytes` after a torn write).
fn decode_records(bytes: &[u8]) -> (Vec<(u64, Entry)>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while bytes.len() - pos >= RECORD_HEADER_BYTES {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let start = pos + RECORD_HEADER_BYTES;
        if len > RECORD_PAYLOAD_MAX_BYTES || bytes.len() - start < len {
            break;
        }
        let payload = &bytes[start..start + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(entry) = serde_json::from_slice::<Entry>(payload) else {
            break;
        };
        out.push((pos as u64, entry));
        pos = start + len;
    }
    (out, pos)
}

fn hole(expected: u64, found: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log hole: expected index {expected}, found {found}"),
    )
}

impl Inner {
    /// The index the next appended entry must have, if any is required.
    fn next_index(&self) -> Option<u64> {
        match (self.entries.last_key_value(), self.purged) {
            (Some((i, _)), _) => Some(i + 1),
            (None, Some(p)) => Some(p.index + 1),
            (None, None) => None,
        }
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, (_, e))| e.log_id)
            .or(self.purged)
    }

    fn append(&mut self, entries: Vec<Entry>) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut next = self.next_index();
        let mut staged = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = entry.get_log_id().index;
            // Entries up to the purge point are covered by a snapshot and
            // would be purged again at once: drop them.
            if self.purged.is_some_and(|p| index <= p.index) {
                continue;
            }
            if let Some(expected) = next
                && index != expected
            {
                return Err(hole(expected, index));
            }
            next = Some(index + 1);
            let offset = self.end_offset + buf.len() as u64;
            encode_record(&entry, &mut buf)?;
            staged.push((index, offset, entry));
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cut what may have reached the file so a later append cannot
            // land behind a torn record (recovery would stop there).
            if let Err(cut) = self.file.set_len(self.end_offset) {
                tracing::error!(error = %cut, "raft log: cannot cut a failed append");
            }
            return Err(e);
        }
        self.end_offset += buf.len() as u64;
        for (index, offset, entry) in staged {
            self.entries.insert(index, (offset, entry));
        }
        Ok(())
    }

    fn truncate(&mut self, index: u64) -> io::Result<()> {
        let Some((&first, &(offset, _))) = self.entries.range(index..).next() else {
            return Ok(());
        };
        debug_assert!(first >= index);
        self.file.set_len(offset)?;
        self.file.sync_all()?;
        self.end_offset = offset;
        self.entries.split_off(&index);
        Ok(())
    }

    fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        if self.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        write_atomic(&self.dir, PURGED_FILE, &to_json(&log_id)?)?;
        self.purged = Some(log_id);
        let kept = self.entries.split_off(&(log_id.index + 1));
        self.entries = kept;
        // Rewrite the file with only the kept entries.
        let mut buf = Vec::new();
        let mut rewritten = BTreeMap::new();
        for (index, (_, entry)) in std::mem::take(&mut self.entries) {
            let offset = buf.len() as u64;
            encode_record(&entry, &mut buf)?;
            rewritten.insert(index, (offset, entry));
        }
        write_atomic(&self.dir, LOG_FILE, &buf)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))?;
        self.entries = rewritten;
        self.end_offset = buf.len() as u64;
        Ok(())
    }
}

impl LogStore {
    /// Open (or create) the log in `dir`, recovering from a torn tail.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, valid) = decode_records(&bytes);
        if valid < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                valid_bytes = valid,
                file_bytes = bytes.len(),
                "raft log: cutting torn or corrupt tail"
            );
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        let purged: Option<LogId> = read_json(&dir.join(PURGED_FILE))?;
        let mut entries = BTreeMap::new();
        let mut next: Option<u64> = None;
        for (offset, entry) in records {
            let index = entry.log_id.index;
            if let Some(expected) = next
                && index != expected
            {
                return Err(hole(expected, index));
            }
            next = Some(index + 1);
            // A crash between writing `purged` and rewriting the file leaves
            // purged entries in it; skip them.
            if purged.is_some_and(|p| index <= p.index) {
                continue;
            }
            entries.insert(index, (offset, entry));
        }
        if let (Some(p), Some((&first, _))) = (purged, entries.first_key_value())
            && first != p.index + 1
        {
            return Err(hole(p.index + 1, first));
        }
        let inner = Inner {
            vote: read_json(&dir.join(VOTE_FILE))?,
            committed: read_json(&dir.join(COMMITTED_FILE))?,
            dir,
            file,
            entries,
            end_offset: valid as u64,
            purged,
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the in-memory view unreliable;
        // the files stay the truth, so continuing would hide the failure.
        self.inner.lock().expect("raft log store mutex poisoned")
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let inner = self.lock();
        Ok(inner
            .entries
            .range(range)
            .map(|(_, (_, e))| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: inner.last_log_id(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let bytes = to_json(vote).map_err(|e| StorageIOError::write_vote(&e))?;
        write_atomic(&inner.dir, VOTE_FILE, &bytes).map_err(|e| StorageIOError::write_vote(&e))?;
        inner.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let mut inner = self.lock();
        let bytes = to_json(&committed).map_err(|e| StorageIOError::write(&e))?;
        write_atomic(&inner.dir, COMMITTED_FILE, &bytes).map_err(|e| StorageIOError::write(&e))?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = self.lock().append(entries.into_iter().collect());
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e).into();
                callback.log_io_completed(Err(e));
                Err(err)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .purge(log_id)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[test]
    fn reopen_cuts_a_torn_tail_and_keeps_whole_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = LogStore::open(dir.path()).expect("open");
            store
                .lock()
                .append(vec![entry(1, 0), entry(1, 1), entry(1, 2)])
                .expect("append");
        }
        // Tear the last record: drop its final byte.
        let path = dir.path().join(LOG_FILE);
        let len = fs::metadata(&path).expect("stat").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(len - 1)
            .expect("cut");
        let store = LogStore::open(dir.path()).expect("reopen");
        let inner = store.lock();
        assert_eq!(
            inner.entries.keys().copied().collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(fs::metadata(&path).expect("stat").len() < len - 1);
    }

    #[test]
    fn append_rejects_a_hole_and_a_corrupt_crc_ends_recovery() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path()).expect("open");
        store
            .lock()
            .append(vec![entry(1, 5), entry(1, 6)])
            .expect("append");
        assert!(store.lock().append(vec![entry(1, 8)]).is_err());
        assert!(store.lock().append(vec![entry(1, 7)]).is_ok());
        drop(store);
        // Flip a payload byte of the second record: recovery keeps only the first.
        let path = dir.path().join(LOG_FILE);
        let mut bytes = fs::read(&path).expect("read");
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().expect("4")) as usize;
        let second_payload = RECORD_HEADER_BYTES + first_len + RECORD_HEADER_BYTES;
        bytes[second_payload] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        let store = LogStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.lock().entries.keys().copied().collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn purge_and_truncate_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = LogStore::open(dir.path()).expect("open");
            let mut inner = store.lock();
            inner
                .append((0..10).map(|i| entry(1, i)).collect())
                .expect("append");
            inner
                .purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
                .expect("purge");
            inner.truncate(8).expect("truncate");
            inner
                .append(vec![entry(2, 8)])
                .expect("append after truncate");
        }
        let store = LogStore::open(dir.path()).expect("reopen");
        let inner = store.lock();
        assert_eq!(
            inner.entries.keys().copied().collect::<Vec<_>>(),
            vec![4, 5, 6, 7, 8]
        );
        assert_eq!(inner.entries[&8].1.log_id.leader_id.term, 2);
        assert_eq!(inner.purged.map(|p| p.index), Some(3));
    }

    #[test]
    fn crash_between_purge_marker_and_rewrite_skips_purged_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = LogStore::open(dir.path()).expect("open");
            store
                .lock()
                .append((0..5).map(|i| entry(1, i)).collect())
                .expect("append");
        }
        // The marker reached the disk, the rewrite did not.
        let purged = LogId::new(CommittedLeaderId::new(1, 1), 2);
        write_atomic(dir.path(), PURGED_FILE, &to_json(&purged).expect("json")).expect("marker");
        let store = LogStore::open(dir.path()).expect("reopen");
        let mut inner = store.lock();
        assert_eq!(
            inner.entries.keys().copied().collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(inner.last_log_id().map(|l| l.index), Some(4));
        assert!(inner.append(vec![entry(1, 6)]).is_err(), "hole accepted");
        inner.append(vec![entry(1, 5)]).expect("contiguous append");
    }
}
