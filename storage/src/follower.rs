//! [`Follower`]: a read-only view of a log from another process on the same host.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{FollowerError, ReadError};
use crate::index::LogIndex;
use crate::layout::SEGMENT_HEADER_LEN;
use crate::live::segment_file_name;
use crate::log::Positions;
use crate::mem::{MetaPage, SegmentMemory, Slot};
use crate::reader::{ReadBatch, SegmentSource, catch_up, start_entry};
use crate::recovery::{LIVE_INFO_FILE, META_MAGIC, META_VERSION};

#[derive(Debug)]
struct Mapped {
    size: u64,
    maps: BTreeMap<u64, Arc<SegmentMemory>>,
}

impl SegmentSource for Mapped {
    fn segment_size(&self) -> u64 {
        self.size
    }

    fn memory(&self, number: u64) -> Option<&SegmentMemory> {
        self.maps.get(&number).map(|mem| &**mem)
    }

    fn next_number(&self, number: u64) -> Option<u64> {
        self.maps.range(number + 1..).next().map(|(next, _)| *next)
    }
}

/// Follows a log written by another process: maps its segment files
/// read-only and the shared meta page, and reads streams zero-copy.
///
/// In the steady state [`Follower::poll`] is two atomic loads; it makes
/// syscalls only to map a segment that appeared since the last poll.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    live_dir: PathBuf,
    segments_dir: PathBuf,
    meta: MetaPage,
    mapped: Mapped,
    index: LogIndex<()>,
    followed: u64,
    first_number: u64,
    newest: u64,
}

impl Follower {
    /// Attach to the log whose data directory is `dir` (its writer has it open, or had).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, FollowerError> {
        let dir = dir.as_ref().to_path_buf();
        let info_path = dir.join(LIVE_INFO_FILE);
        let info = fs::read_to_string(&info_path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => FollowerError::NotShared {
                path: dir.clone(),
                reason: format!(
                    "{} is missing (anonymous live memory, or never opened)",
                    info_path.display()
                ),
            },
            _ => FollowerError::Io {
                action: "reading",
                path: info_path.clone(),
                source,
            },
        })?;
        let mut lines = info.lines();
        let (Some(live_dir), Some(meta_path)) = (lines.next(), lines.next()) else {
            return Err(FollowerError::NotShared {
                path: dir.clone(),
                reason: format!("{} is malformed", info_path.display()),
            });
        };
        let (live_dir, meta_path) = (PathBuf::from(live_dir), PathBuf::from(meta_path));
        let meta_file = File::open(&meta_path).map_err(|source| FollowerError::Io {
            action: "opening",
            path: meta_path.clone(),
            source,
        })?;
        let meta =
            MetaPage::map_file_read_only(&meta_file).map_err(|source| FollowerError::Io {
                action: "mapping",
                path: meta_path.clone(),
                source,
            })?;
        if meta.load(Slot::Magic) != META_MAGIC || meta.load(Slot::Version) != META_VERSION {
            return Err(FollowerError::NotShared {
                path: dir.clone(),
                reason: format!("{} is not a meta page of this version", meta_path.display()),
            });
        }
        let size = meta.load(Slot::SegmentSize);
        let first_number = meta.load(Slot::FirstSegment);
        let index_interval = 4096;
        let mut follower = Self {
            segments_dir: dir.join("segments"),
            dir,
            live_dir,
            meta,
            mapped: Mapped {
                size,
                maps: BTreeMap::new(),
            },
            index: LogIndex::new(size, index_interval, 1024 * 1024),
            followed: first_number * size + SEGMENT_HEADER_LEN as u64,
            first_number,
            newest: first_number,
        };
        follower.poll().map_err(|err| FollowerError::NotShared {
            path: follower.dir.clone(),
            reason: err.to_string(),
        })?;
        Ok(follower)
    }

    /// The writer's published positions (atomic loads, no syscall).
    pub fn positions(&self) -> Positions {
        crate::replica::load_positions(&self.meta)
    }

    /// Catch up with the writer: map new segments, drop deleted ones, index
    /// new batches. Returns the appended position followed.
    pub fn poll(&mut self) -> Result<u64, ReadError> {
        let appended = self.meta.load(Slot::Appended);
        let first = self.meta.load(Slot::FirstSegment);
        let size = self.mapped.size;
        if first > self.first_number {
            self.mapped.maps.retain(|number, _| *number >= first);
            self.index.trim_before(first * size);
            self.followed = self.followed.max(first * size + SEGMENT_HEADER_LEN as u64);
            self.first_number = first;
        }
        let newest = appended / size;
        let from = self
            .mapped
            .maps
            .keys()
            .next_back()
            .map_or(self.first_number, |last| *last);
        for number in from..=newest {
            if !self.mapped.maps.contains_key(&number)
                && let Some(mem) = self.map_segment(number)?
            {
                self.mapped.maps.insert(number, mem);
            }
        }
        // Everything below `appended` is immutable; segments before the newest are complete.
        for (number, mem) in self.mapped.maps.range(self.newest..) {
            let upto = if *number < newest {
                mem.len()
            } else {
                (appended - number * size) as usize
            };
            if mem.kind() == crate::mem::MapKind::ReadOnly && mem.published() < upto {
                mem.advance_foreign(upto);
            }
        }
        self.newest = newest;
        catch_up(&self.mapped, &mut self.index, &mut self.followed, appended)?;
        Ok(appended)
    }

    fn map_segment(&self, number: u64) -> Result<Option<Arc<SegmentMemory>>, ReadError> {
        let live = segment_file_name(&self.live_dir, number);
        let disk = segment_file_name(&self.segments_dir, number);
        for (path, complete) in [(live, false), (disk, true)] {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => {
                    return Err(ReadError::Map {
                        path,
                        reason: err.to_string(),
                    });
                }
            };
            let len = file
                .metadata()
                .map_err(|err| ReadError::Map {
                    path: path.clone(),
                    reason: err.to_string(),
                })?
                .len();
            let published = if complete { len } else { 0 };
            let mem = SegmentMemory::map_read_only(&file, len, published).map_err(|err| {
                ReadError::Map {
                    path: path.clone(),
                    reason: err.to_string(),
                }
            })?;
            return Ok(Some(Arc::new(mem)));
        }
        Ok(None)
    }

    /// Frames of `stream_id` from `from_offset` (see [`crate::LogReader::read`]).
    /// Polls first.
    pub fn read(
        &mut self,
        stream_id: u32,
        from_offset: u64,
        max_bytes: usize,
        up_to_position: u64,
    ) -> Result<ReadBatch<'_>, ReadError> {
        let appended = self.poll()?;
        let limit = up_to_position.min(appended);
        let Some(slot) = self.index.streams.get(&stream_id) else {
            return Ok(ReadBatch::new(
                &self.mapped,
                &[],
                stream_id,
                from_offset,
                max_bytes,
                limit,
            ));
        };
        let entries = match start_entry(stream_id, &slot.index, from_offset)? {
            Some(at) => &slot.index.entries[at..],
            None => &[],
        };
        Ok(ReadBatch::new(
            &self.mapped,
            entries,
            stream_id,
            from_offset,
            max_bytes,
            limit,
        ))
    }

    /// The first offset of `stream_id` and one past its last, as followed so far.
    pub fn stream_offsets(&self, stream_id: u32) -> Option<(u64, u64)> {
        self.index
            .streams
            .get(&stream_id)
            .map(|slot| (slot.index.first_offset(), slot.index.next_offset))
    }
}
