//! The only module with `unsafe`: segment mappings, the single-writer
//! capability over them, the shared meta page of atomics, and `flock`.
//!
//! Soundness rests on one rule that this module enforces itself: a mapping
//! has a *published* length; bytes below it are immutable and may be handed
//! out as `&[u8]` to any thread, bytes at or above it are written only
//! through the one [`SegmentWriter`] of that mapping and never handed out.
//! The published length only grows, with release ordering; readers load it
//! with acquire ordering before they slice.
//!
//! Read-only mappings of files written by *another* process (followers) rely
//! on that process keeping the same rule (it is this crate's writer); such a
//! mapping's published length is advanced from the shared meta page.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::layout::HUGE_PAGE_BYTES;

/// How a segment mapping is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapKind {
    /// Writable shared mapping of a file (hugetlbfs or tmpfs or any file).
    SharedFile,
    /// Writable private anonymous memory (optionally MAP_HUGETLB).
    Anonymous,
    /// Read-only shared mapping of a file.
    ReadOnly,
}

/// One mapped segment (live copy or a read-only view of a file).
#[derive(Debug)]
pub(crate) struct SegmentMemory {
    map: MmapRaw,
    kind: MapKind,
    published: AtomicUsize,
    writer_taken: AtomicBool,
}

impl SegmentMemory {
    /// Map `file` (already sized to `len`, a multiple of 2 MiB) shared and writable.
    pub(crate) fn map_file_rw(file: &File, len: u64, populate: bool) -> io::Result<Self> {
        assert!(
            len.is_multiple_of(HUGE_PAGE_BYTES),
            "mapping length {len} is not a multiple of 2 MiB"
        );
        let mut options = MmapOptions::new();
        options.len(to_usize(len)?);
        if populate {
            options.populate();
        }
        let map = options.map_raw(file)?;
        Ok(Self::new(map, MapKind::SharedFile, 0))
    }

    /// Private anonymous memory of `len` bytes (a multiple of 2 MiB), on
    /// 2 MiB pages when `huge` (fails with ENOMEM when none are reserved).
    pub(crate) fn map_anonymous(len: u64, huge: bool, populate: bool) -> io::Result<Self> {
        assert!(
            len.is_multiple_of(HUGE_PAGE_BYTES),
            "mapping length {len} is not a multiple of 2 MiB"
        );
        let mut options = MmapOptions::new();
        options.len(to_usize(len)?);
        if huge {
            options.huge(Some(21));
        }
        if populate {
            options.populate();
        }
        let map = MmapRaw::from(options.map_anon()?);
        Ok(Self::new(map, MapKind::Anonymous, 0))
    }

    /// Map `len` bytes of `file` read-only. `published` bytes are immutable
    /// from now on (a sealed disk copy: its whole length).
    pub(crate) fn map_read_only(file: &File, len: u64, published: u64) -> io::Result<Self> {
        let published = to_usize(published.min(len))?;
        if len == 0 {
            // mmap rejects empty mappings; an empty view needs none.
            let map = MmapOptions::new().len(1).map_anon()?;
            return Ok(Self::new(MmapRaw::from(map), MapKind::ReadOnly, 0));
        }
        let map = MmapOptions::new()
            .len(to_usize(len)?)
            .map_raw_read_only(file)?;
        Ok(Self::new(map, MapKind::ReadOnly, published))
    }

    fn new(map: MmapRaw, kind: MapKind, published: usize) -> Self {
        Self {
            map,
            kind,
            published: AtomicUsize::new(published),
            writer_taken: AtomicBool::new(false),
        }
    }

    /// Mapping length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// How this mapping is backed.
    pub(crate) fn kind(&self) -> MapKind {
        self.kind
    }

    /// Bytes `[0, published)` are immutable.
    pub(crate) fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    /// The immutable bytes `[start, end)`, or `None` if any of them is not published.
    #[inline]
    pub(crate) fn slice(&self, start: usize, end: usize) -> Option<&[u8]> {
        if start > end || end > self.published() {
            return None;
        }
        // SAFETY: `end <= published <= len`, so the range lies inside the live
        // mapping, which `self.map` keeps mapped for as long as `&self` lives.
        // Bytes below `published` are never written again: the only writer is
        // the unique `SegmentWriter`, which refuses offsets below it (for
        // read-only mappings, the writer process keeps the same rule), and the
        // acquire load above pairs with the writer's release store, so the
        // bytes are initialised and visible.
        Some(unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(start), end - start) })
    }

    /// Advance the published length of a read-only mapping of a file another
    /// process writes (the follower learns it from the meta page).
    pub(crate) fn advance_foreign(&self, upto: usize) {
        assert_eq!(
            self.kind,
            MapKind::ReadOnly,
            "only read-only mappings follow a foreign writer"
        );
        self.published
            .fetch_max(upto.min(self.len()), Ordering::AcqRel);
    }
}

/// The single write capability over a writable [`SegmentMemory`].
#[derive(Debug)]
pub(crate) struct SegmentWriter {
    mem: std::sync::Arc<SegmentMemory>,
    published: usize,
    base: *mut u8,
    len: usize,
}

// SAFETY: the raw pointer is only an address inside `mem`, which the Arc keeps
// mapped; the writer is the unique owner of the unpublished bytes, wherever it
// runs.
unsafe impl Send for SegmentWriter {}

impl SegmentWriter {
    /// Take the write capability; `None` if it was taken before or the mapping is read-only.
    pub(crate) fn take(mem: std::sync::Arc<SegmentMemory>) -> Option<Self> {
        if mem.kind == MapKind::ReadOnly || mem.writer_taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        let published = mem.published();
        let base = mem.map.as_mut_ptr();
        let len = mem.map.len();
        Some(Self {
            mem,
            published,
            base,
            len,
        })
    }

    /// Copy `bytes` to `offset`, which must be at or above the published length.
    #[inline]
    pub(crate) fn write(&mut self, offset: usize, bytes: &[u8]) {
        let end = offset
            .checked_add(bytes.len())
            .expect("offset + len fits in usize");
        assert!(
            offset >= self.published && end <= self.len,
            "write [{offset}, {end}) outside [{}, {})",
            self.published,
            self.len
        );
        // SAFETY: `[offset, end)` lies inside the mapping (checked above) and at
        // or above the published length, so no `&[u8]` to it exists anywhere
        // (`slice` only hands out published bytes) and only this unique writer
        // writes there; `bytes` cannot overlap it because it is a shared
        // borrow, which the unpublished range never is.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(offset), bytes.len())
        };
    }

    /// Read back unpublished bytes this writer wrote (before publishing them).
    pub(crate) fn unpublished(&self, offset: usize, len: usize) -> &[u8] {
        let end = offset.checked_add(len).expect("offset + len fits in usize");
        assert!(
            end <= self.len,
            "read [{offset}, {end}) beyond {}",
            self.len
        );
        // SAFETY: in bounds (checked). Writes need `&mut self`, so none can
        // happen while this borrow of `self` lives; published bytes are
        // immutable anyway.
        unsafe { std::slice::from_raw_parts(self.base.add(offset), len) }
    }

    /// Make `[0, upto)` immutable and visible to readers (release).
    #[inline]
    pub(crate) fn publish(&mut self, upto: usize) {
        assert!(
            upto >= self.published && upto <= self.len,
            "publish {upto} outside [{}, {}]",
            self.published,
            self.len
        );
        self.published = upto;
        self.mem.published.store(upto, Ordering::Release);
    }

    /// The published length.
    pub(crate) fn published(&self) -> usize {
        self.published
    }
}

/// Slots of the shared meta page, one `AtomicU64` per 128-byte line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub(crate) enum Slot {
    Magic = 0,
    Version = 1,
    SegmentSize = 2,
    Backing = 3,
    FirstSegment = 4,
    ActiveSegment = 5,
    Appended = 6,
    Written = 7,
    Synced = 8,
    SyncRequest = 9,
    WriterPid = 10,
    State = 11,
    /// 0: no replication layer attached (a replica set of one: the
    /// replicated levels follow `Appended` and `Synced`); 1: they follow
    /// the two slots below (see `crate::replica`).
    ReplicaMode = 12,
    /// Replication commit position: a quorum holds everything below in memory.
    Replicated = 13,
    /// Replication commit position: a quorum has everything below fsynced.
    ReplicatedSynced = 14,
}

/// Bytes of the meta page (one 4 KiB page).
pub(crate) const META_LEN: usize = 4096;
const SLOT_STRIDE: usize = 128;
const _: () = assert!((Slot::ReplicatedSynced as usize + 1) * SLOT_STRIDE <= META_LEN);

/// The page of positions the writer publishes: in a shared file for
/// followers, or anonymous memory when the log is not shared.
#[derive(Debug)]
pub(crate) struct MetaPage {
    map: MmapRaw,
    writable: bool,
}

impl MetaPage {
    /// Map `file` (resized to one page) shared and writable.
    pub(crate) fn map_file_rw(file: &File) -> io::Result<Self> {
        if file.metadata()?.len() != META_LEN as u64 {
            file.set_len(META_LEN as u64)?;
        }
        // Reserve the page now: an unbacked page of a full tmpfs would be a
        // SIGBUS on first touch instead of an error here.
        allocate(file, META_LEN as u64)?;
        let map = MmapOptions::new().len(META_LEN).map_raw(file)?;
        Ok(Self {
            map,
            writable: true,
        })
    }

    /// Private anonymous meta page.
    pub(crate) fn anonymous() -> io::Result<Self> {
        let map = MmapRaw::from(MmapOptions::new().len(META_LEN).map_anon()?);
        Ok(Self {
            map,
            writable: true,
        })
    }

    /// Map a meta file read-only (a follower).
    pub(crate) fn map_file_read_only(file: &File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        if len < META_LEN as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("meta file is {len} bytes, expected {META_LEN}"),
            ));
        }
        let map = MmapOptions::new().len(META_LEN).map_raw_read_only(file)?;
        Ok(Self {
            map,
            writable: false,
        })
    }

    #[inline]
    fn slot(&self, slot: Slot) -> &AtomicU64 {
        let offset = slot as usize * SLOT_STRIDE;
        // SAFETY: `offset + 8 <= META_LEN` (const assertion above) and the
        // mapping is page aligned, so the address is in bounds and 8-byte
        // aligned for the lifetime of `&self`. The page is only ever accessed
        // through atomics, by this process and by others mapping the same
        // file, so there are no non-atomic races. Loads from a read-only
        // mapping are allowed for lock-free atomics of this size.
        unsafe { &*(self.map.as_ptr().add(offset) as *const AtomicU64) }
    }

    /// Load a slot (acquire).
    #[inline]
    pub(crate) fn load(&self, slot: Slot) -> u64 {
        self.slot(slot).load(Ordering::Acquire)
    }

    /// Store a slot (release). Panics on a read-only page: that is a bug in this crate.
    #[inline]
    pub(crate) fn store(&self, slot: Slot, value: u64) {
        assert!(self.writable, "store to a read-only meta page");
        self.slot(slot).store(value, Ordering::Release);
    }

    /// Raise a slot to `value` if it is below (acq-rel); several threads
    /// may publish into the same slot.
    #[inline]
    pub(crate) fn fetch_max(&self, slot: Slot, value: u64) {
        assert!(self.writable, "store to a read-only meta page");
        self.slot(slot).fetch_max(value, Ordering::AcqRel);
    }
}

/// Why the lock file of a log directory could not be taken.
#[derive(Debug)]
pub(crate) enum DirLockError {
    /// The lock file could not be opened or created.
    Open(io::Error),
    /// Another process (or handle) holds it.
    Held,
}

/// Open `lock_path` (created if missing) and take an exclusive,
/// non-blocking `flock` on it; the lock holds while the file stays open.
pub(crate) fn lock_dir(lock_path: &std::path::Path) -> Result<File, DirLockError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path)
        .map_err(DirLockError::Open)?;
    // SAFETY: `flock` only reads the descriptor number, which `file` keeps open.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(file)
    } else {
        Err(DirLockError::Held)
    }
}

/// Reserve `len` bytes of `file` up front (tmpfs, hugetlbfs), so running out
/// of memory is an error now rather than a SIGBUS on first touch. Falls back
/// to `set_len` where the filesystem has no `fallocate`.
pub(crate) fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len_off = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length exceeds off_t"))?;
    // SAFETY: `fallocate` only reads the descriptor number, which `file` keeps open.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len_off) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return file.set_len(len);
    }
    Err(err)
}

fn to_usize(len: u64) -> io::Result<usize> {
    usize::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping length exceeds usize"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn writer_publishes_and_readers_only_see_published() {
        let mem = Arc::new(SegmentMemory::map_anonymous(HUGE_PAGE_BYTES, false, false).unwrap());
        let mut writer = SegmentWriter::take(mem.clone()).unwrap();
        assert!(SegmentWriter::take(mem.clone()).is_none());
        writer.write(0, b"hello");
        assert_eq!(mem.slice(0, 5), None);
        assert_eq!(writer.unpublished(0, 5), b"hello");
        writer.publish(5);
        assert_eq!(mem.slice(0, 5), Some(&b"hello"[..]));
        assert_eq!(mem.slice(3, 6), None);
        assert_eq!(mem.slice(4, 3), None);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn writer_refuses_published_bytes() {
        let mem = Arc::new(SegmentMemory::map_anonymous(HUGE_PAGE_BYTES, false, false).unwrap());
        let mut writer = SegmentWriter::take(mem).unwrap();
        writer.write(0, b"abc");
        writer.publish(3);
        writer.write(1, b"x");
    }

    #[test]
    fn meta_page_round_trip() {
        let meta = MetaPage::anonymous().unwrap();
        meta.store(Slot::Appended, 42);
        assert_eq!(meta.load(Slot::Appended), 42);
        assert_eq!(meta.load(Slot::Synced), 0);
    }
}
