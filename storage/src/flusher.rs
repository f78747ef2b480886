//! The flusher: copies the live log to its disk copy and fsyncs it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::FlushError;
use crate::log::{SegmentHandle, Shared};
use crate::mem::Slot;
use crate::registry;

/// What one [`Flusher::poll`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushProgress {
    /// Appended position seen by this poll.
    pub appended: u64,
    /// Written position published after this poll.
    pub written: u64,
    /// Synced position published after this poll.
    pub synced: u64,
    /// Bytes copied to the disk copy by this poll.
    pub bytes_written: u64,
    /// True when this poll ran fdatasync.
    pub synced_now: bool,
}

impl FlushProgress {
    /// True when the poll found nothing to do (the caller may back off).
    pub fn is_idle(&self) -> bool {
        self.bytes_written == 0 && !self.synced_now
    }
}

/// Copies `[written, appended)` of the live log to the disk copy with
/// `pwrite`, fdatasyncs when an fsync-level batch waits or the flush
/// interval is due, and publishes the written and synced positions.
///
/// `Send`: drive it from a thread the caller owns by calling [`Flusher::poll`]
/// in a loop (back off when [`FlushProgress::is_idle`]). The writer never
/// waits for it. There is one flusher per log.
#[derive(Debug)]
pub struct Flusher {
    shared: Arc<Shared>,
    interval_ns: u64,
    written: u64,
    synced: u64,
    last_sync_ns: Option<u64>,
    current: Option<(Arc<SegmentHandle>, File)>,
    /// Set by [`Flusher::sync_everything`]: sync whatever is written, due or not.
    sync_all: bool,
}

impl Flusher {
    pub(crate) fn new(shared: Arc<Shared>, interval_ns: u64, start: u64) -> Self {
        let written = shared.meta.load(Slot::Written).max(start);
        let synced = shared.meta.load(Slot::Synced).max(start).min(written);
        Self {
            shared,
            interval_ns,
            written,
            synced,
            last_sync_ns: None,
            current: None,
            sync_all: false,
        }
    }

    /// From now on, every poll also syncs everything written (due or not):
    /// call before the final polls at shutdown, when the interval syncs
    /// were handed to a [`Syncer`] that no longer runs.
    pub fn sync_everything(&mut self) {
        self.sync_all = true;
    }

    /// Copy what was appended since the last poll and sync if due. On error
    /// nothing past the last good write is published; the next poll retries.
    pub fn poll(&mut self, now_ns: u64) -> Result<FlushProgress, FlushError> {
        let size = self.shared.segment_size;
        let appended = self.shared.meta.load(Slot::Appended);
        let mut progress = FlushProgress {
            appended,
            ..FlushProgress::default()
        };
        // Before the first sync the interval counts from time 0: a flusher
        // whose first poll is the final one at shutdown (a broker stopped
        // right after it started) must still sync, not wait an interval
        // that its stop-time clock never lets pass.
        let last_sync = self.last_sync_ns.unwrap_or(0);
        while self.written < appended {
            let number = self.written / size;
            let offset = self.written % size;
            let (handle, file) = self.open_segment(number)?;
            let sealed = appended >= (number + 1) * size;
            let end = if sealed {
                handle
                    .seal
                    .get()
                    .map(|seal| seal.len)
                    .ok_or_else(|| FlushError::Write {
                        path: handle.disk_path.clone(),
                        offset,
                        bytes: 0,
                        source: std::io::Error::other(
                            "segment passed by the appended position is not sealed",
                        ),
                    })?
            } else {
                appended - number * size
            };
            if end > offset {
                let bytes = handle
                    .mem
                    .slice(offset as usize, end as usize)
                    .ok_or_else(|| FlushError::Write {
                        path: handle.disk_path.clone(),
                        offset,
                        bytes: (end - offset) as usize,
                        source: std::io::Error::other("range is not published in the live segment"),
                    })?;
                file.write_all_at(bytes, offset)
                    .map_err(|source| FlushError::Write {
                        path: handle.disk_path.clone(),
                        offset,
                        bytes: bytes.len(),
                        source,
                    })?;
                progress.bytes_written += end - offset;
            }
            if !sealed {
                self.written = number * size + end;
                break;
            }
            // A sealed segment is synced before the next one is started, so
            // after a crash a later segment on disk means this one is complete.
            file.sync_data().map_err(|source| FlushError::Sync {
                path: handle.disk_path.clone(),
                source,
            })?;
            // Built here, off the writer thread, by the same index code;
            // not synced: a lost or torn index file is rebuilt by scanning.
            let index_error = |reason: String| FlushError::Create {
                path: handle.index_path.clone(),
                source: std::io::Error::other(reason),
            };
            let bytes =
                crate::reader::segment_index_file(&handle.mem, number, size, end, &self.shared)
                    .map_err(|err| index_error(err.to_string()))?;
            registry::write_atomic(&handle.index_path, &bytes, false).map_err(|source| {
                FlushError::Create {
                    path: handle.index_path.clone(),
                    source,
                }
            })?;
            self.current = None;
            self.written = (number + 1) * size;
            self.synced = self.written;
            progress.synced_now = true;
            self.shared.meta.store(Slot::Written, self.written);
            self.shared.meta.fetch_max(Slot::Synced, self.synced);
        }
        self.shared.meta.store(Slot::Written, self.written);
        // A [`Syncer`] may have synced further meanwhile.
        self.synced = self.synced.max(self.shared.meta.load(Slot::Synced));
        let request = self.shared.meta.load(Slot::SyncRequest);
        // With a syncer taken, interval syncs are its job: the writes (and
        // the ACKs at `flush` level) do not wait behind its fdatasync.
        let due = self.sync_all
            || (!self.shared.syncer_taken.load(Ordering::Acquire)
                && now_ns.saturating_sub(last_sync) >= self.interval_ns);
        if self.synced < self.written && (request > self.synced || due) {
            if let Some((handle, file)) = &self.current {
                file.sync_data().map_err(|source| FlushError::Sync {
                    path: handle.disk_path.clone(),
                    source,
                })?;
            }
            self.synced = self.written;
            self.last_sync_ns = Some(now_ns);
            progress.synced_now = true;
            self.shared.meta.fetch_max(Slot::Synced, self.synced);
        } else if due {
            self.last_sync_ns = Some(now_ns);
        }
        // Map the next live segment ahead of the roll, so the writer does not
        // pay for creating and prefaulting it.
        if progress.is_idle() || appended % size > size / 2 {
            self.shared.prepare_next();
        }
        progress.written = self.written;
        progress.synced = self.synced;
        Ok(progress)
    }

    /// The positions as this flusher last published them.
    pub fn positions(&self) -> crate::Positions {
        self.shared.positions()
    }

    fn open_segment(&mut self, number: u64) -> Result<(Arc<SegmentHandle>, &File), FlushError> {
        if self
            .current
            .as_ref()
            .is_none_or(|(handle, _)| handle.number != number)
        {
            let handle = self
                .shared
                .lock_list()
                .iter()
                .find(|handle| handle.number == number)
                .cloned();
            let path = self.shared.disk_path(number);
            let Some(handle) = handle else {
                return Err(FlushError::Create {
                    path,
                    source: std::io::Error::other("segment is not in the log"),
                });
            };
            let existed = path.exists();
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|source| FlushError::Create {
                    path: path.clone(),
                    source,
                })?;
            if !existed {
                registry::sync_parent(&path).map_err(|source| FlushError::Sync {
                    path: path.clone(),
                    source,
                })?;
            }
            self.current = Some((handle, file));
        }
        let (handle, file) = self.current.as_ref().expect("set above");
        Ok((handle.clone(), file))
    }
}

/// Syncs the disk copy on the flush interval, from a thread of its own.
///
/// Without one, the [`Flusher`] runs the interval's fdatasync itself, and
/// nothing is written (so nothing is acknowledged at `flush` level) while it
/// waits for the disk: tens of milliseconds every interval under load, long
/// enough for producers to drain their windows and time out. With one taken
/// ([`crate::ShardLog::syncer`]), the flusher only writes, syncs sealed
/// segments and serves `fsync`-level requests (group commit); this syncs
/// what was written, once per interval.
///
/// What it syncs is safe to call synced: it reads the written position
/// (acquire), fdatasyncs the disk copy of the segment holding its last byte
/// (the flusher syncs every segment before it writes past it), then raises
/// the synced position to what it read. Dropping it hands the interval
/// syncs back to the flusher.
#[derive(Debug)]
pub struct Syncer {
    shared: Arc<Shared>,
    interval_ns: u64,
    last_sync_ns: Option<u64>,
    /// The disk copy last synced: (segment number, file).
    current: Option<(u64, File)>,
}

impl Syncer {
    pub(crate) fn new(shared: Arc<Shared>, interval_ns: u64) -> Self {
        Self {
            shared,
            interval_ns,
            last_sync_ns: None,
            current: None,
        }
    }

    /// Sync what was written if the interval is due (counted from 0 before
    /// the first sync). Returns the synced position when this poll synced.
    pub fn poll(&mut self, now_ns: u64) -> Result<Option<u64>, FlushError> {
        let last_sync = self.last_sync_ns.unwrap_or(0);
        if now_ns.saturating_sub(last_sync) < self.interval_ns {
            return Ok(None);
        }
        self.last_sync_ns = Some(now_ns);
        let written = self.shared.meta.load(Slot::Written);
        if self.shared.meta.load(Slot::Synced) >= written {
            return Ok(None);
        }
        let number = (written - 1) / self.shared.segment_size;
        let path = self.shared.disk_path(number);
        if self.current.as_ref().is_none_or(|(n, _)| *n != number) {
            self.current = None;
            match File::open(&path) {
                Ok(file) => self.current = Some((number, file)),
                // Sealed, synced and deleted by retention meanwhile.
                Err(_) if self.shared.meta.load(Slot::Synced) >= written => return Ok(None),
                Err(source) => return Err(FlushError::Sync { path, source }),
            }
        }
        let (_, file) = self.current.as_ref().expect("set above");
        file.sync_data()
            .map_err(|source| FlushError::Sync { path, source })?;
        self.shared.meta.fetch_max(Slot::Synced, written);
        Ok(Some(written))
    }

    /// When the next sync is due, on the caller's clock.
    pub fn next_due_ns(&self) -> u64 {
        self.last_sync_ns
            .unwrap_or(0)
            .saturating_add(self.interval_ns)
    }
}

impl Drop for Syncer {
    /// Hands the interval syncs back to the flusher.
    fn drop(&mut self) {
        self.shared.syncer_taken.store(false, Ordering::Release);
    }
}
