//! The local source: the broker's log mapped read-only through a
//! [`kaelix_storage::Follower`], no broker round trip and no copy.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{Follower, ReadBatch, ReadError};

use super::{ConsumeError, Record};

/// File a shard's log directory holds for followers (see kaelix-storage).
const LIVE_INFO_FILE: &str = "live.path";
/// Spins on the published positions before sleeping between looks.
const SPINS: u32 = 64;
/// Sleep between looks at the published positions while waiting.
const NAP: Duration = Duration::from_micros(100);

/// The log directory holding `stream_id` under `data_dir`: `data_dir` itself
/// when it is a log directory, else `data_dir/shard-{stream_id % shards}`
/// for a broker data directory with `shards` shard directories.
pub fn log_dir_for(data_dir: &Path, stream_id: u32) -> Result<PathBuf, ConsumeError> {
    if data_dir.join(LIVE_INFO_FILE).exists() {
        return Ok(data_dir.to_path_buf());
    }
    let shards = (0u32..)
        .take_while(|shard| data_dir.join(format!("shard-{shard}")).is_dir())
        .count() as u32;
    if shards == 0 {
        return Err(ConsumeError::Local {
            dir: data_dir.to_path_buf(),
            reason: format!(
                "neither a shard log directory (no {LIVE_INFO_FILE}) nor a broker data directory (no shard-0)"
            ),
        });
    }
    Ok(data_dir.join(format!("shard-{}", stream_id % shards)))
}

/// Reads one stream from a broker's log on this host.
#[derive(Debug)]
pub struct LocalReader {
    dir: PathBuf,
    stream_id: u32,
    follower: Follower,
}

impl LocalReader {
    /// Attach to the log holding `stream_id` under `data_dir` (see [`log_dir_for`]).
    pub fn open(data_dir: &Path, stream_id: u32) -> Result<Self, ConsumeError> {
        let dir = log_dir_for(data_dir, stream_id)?;
        let follower = Follower::open(&dir).map_err(|err| ConsumeError::Local {
            dir: dir.clone(),
            reason: err.to_string(),
        })?;
        Ok(Self {
            dir,
            stream_id,
            follower,
        })
    }

    /// The shard log directory followed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The oldest stored offset and one past the newest appended one.
    pub fn watermarks(&mut self, _level: DurabilityLevel) -> Result<(u64, u64), ConsumeError> {
        self.follower.poll()?;
        Ok(self
            .follower
            .stream_offsets(self.stream_id)
            .unwrap_or((0, 0)))
    }

    /// True when a frame at or after `position` is readable at `level`.
    fn readable(&mut self, position: u64, level: DurabilityLevel) -> Result<bool, ConsumeError> {
        let (log_start, end) = self.watermarks(level)?;
        if position < log_start {
            return Err(ConsumeError::Retained {
                stream_id: self.stream_id,
                requested: position,
                log_start,
            });
        }
        if position > end {
            return Err(ConsumeError::BeyondEnd {
                stream_id: self.stream_id,
                requested: position,
                high_watermark: end,
            });
        }
        if position == end {
            return Ok(false);
        }
        if level == DurabilityLevel::Memory {
            return Ok(true);
        }
        let limit = self.follower.positions().durable(level);
        let mut batch = self
            .follower
            .read(self.stream_id, position, 1, limit)
            .map_err(|err| retained(self.stream_id, err))?;
        Ok(batch.next().is_some())
    }

    /// Wait up to `wait` for something readable at `position`.
    pub fn prepare(
        &mut self,
        position: u64,
        _max_bytes: u32,
        wait: Duration,
        level: DurabilityLevel,
    ) -> Result<(), ConsumeError> {
        let deadline = Instant::now() + wait;
        let mut spins = 0;
        loop {
            let seen = self.follower.positions();
            if self.readable(position, level)? || Instant::now() >= deadline {
                return Ok(());
            }
            // Two atomic loads per look; read the log again only once it moved.
            while self.follower.positions() == seen && Instant::now() < deadline {
                if spins < SPINS {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::sleep(NAP);
                }
            }
        }
    }

    /// The readable frames from `position`, straight from the mapping.
    pub(super) fn records(
        &mut self,
        stream_id: u32,
        position: u64,
        max_bytes: u32,
        level: DurabilityLevel,
    ) -> Result<LocalRecords<'_>, ConsumeError> {
        let limit = self.follower.positions().durable(level);
        let batch = self
            .follower
            .read(stream_id, position, max_bytes as usize, limit)
            .map_err(|err| retained(stream_id, err))?;
        Ok(LocalRecords { batch })
    }
}

fn retained(stream_id: u32, err: ReadError) -> ConsumeError {
    match err {
        ReadError::OffsetRetained {
            requested,
            first_available,
            ..
        } => ConsumeError::Retained {
            stream_id,
            requested,
            log_start: first_available,
        },
        other => ConsumeError::Read(other),
    }
}

/// Frames of one local read, checked as they are yielded.
pub(super) struct LocalRecords<'a> {
    batch: ReadBatch<'a>,
}

impl std::fmt::Debug for LocalRecords<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRecords")
            .field("batch", &self.batch)
            .finish()
    }
}

impl<'a> Iterator for LocalRecords<'a> {
    type Item = Result<Record<'a>, ConsumeError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(match self.batch.next()? {
            Ok(stored) => Record::parse(stored.offset, stored.bytes).map(|(record, _)| record),
            Err(err) => Err(ConsumeError::Read(err)),
        })
    }
}
