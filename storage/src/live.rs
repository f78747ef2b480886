//! Choosing and creating the live (in-memory) copy of segments: hugetlbfs,
//! tmpfs (`/dev/shm`) or anonymous memory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{LiveMemory, LogConfig};
use crate::error::OpenError;
use crate::layout::HUGE_PAGE_BYTES;
use crate::mem::{self, SegmentMemory};

/// What backs the live segments of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveBacking {
    /// Files on a hugetlbfs mount: 2 MiB pages, shareable.
    Hugetlbfs,
    /// Files on tmpfs (normally `/dev/shm`): 4 KiB pages, shareable.
    Shm,
    /// Anonymous memory on 2 MiB pages (MAP_HUGETLB): not shareable.
    AnonymousHuge,
    /// Anonymous memory on 4 KiB pages: not shareable.
    Anonymous,
}

impl LiveBacking {
    /// True when followers in other processes can map the live segments.
    pub fn is_shared(self) -> bool {
        matches!(self, Self::Hugetlbfs | Self::Shm)
    }

    /// True when the live segments sit on 2 MiB pages.
    pub fn is_huge(self) -> bool {
        matches!(self, Self::Hugetlbfs | Self::AnonymousHuge)
    }

    pub(crate) fn code(self) -> u64 {
        match self {
            Self::Hugetlbfs => 1,
            Self::Shm => 2,
            Self::AnonymousHuge => 3,
            Self::Anonymous => 4,
        }
    }
}

/// A live segment mapping and its file (shared backings).
pub(crate) type LiveSegment = (Arc<SegmentMemory>, Option<PathBuf>);
/// Why a live segment could not be created, and the file involved.
pub(crate) type LiveError = (Option<PathBuf>, io::Error);

/// The resolved live memory of a log.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub backing: LiveBacking,
    /// Directory of live segment files (shared backings only).
    pub dir: Option<PathBuf>,
    pub populate: bool,
}

impl Live {
    /// Resolve the config; the string is the one warning when no hugepages are used.
    pub fn resolve(
        config: &LogConfig,
        segment_size: u64,
        id: u64,
    ) -> Result<(Self, Option<String>), OpenError> {
        let populate = config.populate;
        let enough_pages = free_huge_pages() * HUGE_PAGE_BYTES >= 2 * segment_size;
        let with = |backing: LiveBacking, dir: Option<PathBuf>| Self {
            backing,
            dir,
            populate,
        };
        let shm = |dir: PathBuf| {
            let warning = normal_pages_warning(&format!("tmpfs files in {}", dir.display()));
            (with(LiveBacking::Shm, Some(dir)), Some(warning))
        };
        let anonymous = || {
            if enough_pages {
                (with(LiveBacking::AnonymousHuge, None), None)
            } else {
                (
                    with(LiveBacking::Anonymous, None),
                    Some(normal_pages_warning("anonymous memory")),
                )
            }
        };
        match &config.live_memory {
            LiveMemory::Hugetlbfs(dir) => {
                if !is_hugetlbfs(dir) {
                    return Err(OpenError::LiveMemory {
                        path: Some(dir.clone()),
                        bytes: segment_size,
                        reason: "not on a hugetlbfs mount".into(),
                    });
                }
                Ok((with(LiveBacking::Hugetlbfs, Some(dir.clone())), None))
            }
            LiveMemory::Shm(dir) => Ok(shm(dir.clone())),
            LiveMemory::Anonymous => Ok(anonymous()),
            LiveMemory::Auto => {
                let tag = format!("kaelix-{id:016x}");
                if enough_pages && let Some(mount) = find_hugetlbfs_mount() {
                    return Ok((with(LiveBacking::Hugetlbfs, Some(mount.join(&tag))), None));
                }
                if config.shared {
                    return Ok(shm(Path::new("/dev/shm").join(&tag)));
                }
                Ok(anonymous())
            }
        }
    }

    /// Path of live segment `number` (shared backings).
    pub fn segment_path(&self, number: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|dir| segment_file_name(dir, number))
    }

    /// Create and map live segment `number` of `size` bytes.
    pub fn create_segment(&self, number: u64, size: u64) -> Result<LiveSegment, LiveError> {
        self.create(number, size, false)
    }

    /// Create live segment `number` ahead of its roll, under a `.next` name
    /// (renamed when the writer takes it), so it never clashes with a segment
    /// the writer creates itself.
    pub fn create_segment_ahead(&self, number: u64, size: u64) -> Result<LiveSegment, LiveError> {
        self.create(number, size, true)
    }

    fn create(&self, number: u64, size: u64, ahead: bool) -> Result<LiveSegment, LiveError> {
        match self.backing {
            LiveBacking::Hugetlbfs | LiveBacking::Shm => {
                let path = self
                    .segment_path(number)
                    .expect("shared backings have a dir");
                let path = if ahead {
                    path.with_extension("next")
                } else {
                    path
                };
                // Ahead of a roll the file must be new: between taking the
                // prepared segment and renaming it, the writer's segment still
                // has this name, and truncating it would leave the writer's
                // mapping beyond the end of the file (SIGBUS on its next write).
                let file =
                    create_sized(&path, size, ahead).map_err(|err| (Some(path.clone()), err))?;
                let mem =
                    SegmentMemory::map_file_rw(&file, size, self.populate).map_err(|err| {
                        let _ = fs::remove_file(&path);
                        (Some(path.clone()), err)
                    })?;
                Ok((Arc::new(mem), Some(path)))
            }
            LiveBacking::AnonymousHuge | LiveBacking::Anonymous => {
                let huge = self.backing == LiveBacking::AnonymousHuge;
                let mem = SegmentMemory::map_anonymous(size, huge, self.populate)
                    .map_err(|err| (None, err))?;
                Ok((Arc::new(mem), None))
            }
        }
    }
}

/// Create `path` with `size` bytes reserved; with `exclusive`, fail with
/// `AlreadyExists` rather than reuse a file of that name.
fn create_sized(path: &Path, size: u64, exclusive: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if exclusive {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let file = options.open(path)?;
    if let Err(err) = mem::allocate(&file, size) {
        let _ = fs::remove_file(path);
        return Err(err);
    }
    Ok(file)
}

fn normal_pages_warning(what: &str) -> String {
    format!(
        "live segments use {what} on normal 4 KiB pages: no hugetlbfs mount with enough free 2 MiB pages was found \
         (reserve pages with vm.nr_hugepages and mount hugetlbfs, or set LiveMemory::Hugetlbfs)"
    )
}

/// `<dir>/<number, 20 digits>.seg`
pub(crate) fn segment_file_name(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.seg"))
}

/// Segment numbers of the `*.seg` files in `dir`, sorted.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let name = entry?.file_name();
                let name = name.to_string_lossy();
                if let Some(stem) = name.strip_suffix(".seg")
                    && stem.len() == 20
                    && let Ok(number) = stem.parse::<u64>()
                {
                    numbers.push(number);
                }
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// `HugePages_Free` from `/proc/meminfo` (0 when unknown).
pub fn free_huge_pages() -> u64 {
    meminfo_value("HugePages_Free").unwrap_or(0)
}

/// A field of `/proc/meminfo` (the number, without unit).
pub fn meminfo_value(field: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The first writable hugetlbfs mount with 2 MiB pages in `/proc/mounts`.
pub fn find_hugetlbfs_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/mounts").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype, options) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let two_mib = options.split(',').all(|opt| {
            !opt.starts_with("pagesize=") || opt == "pagesize=2M" || opt == "pagesize=2048k"
        });
        let writable = options.split(',').any(|opt| opt == "rw");
        (fstype == "hugetlbfs" && two_mib && writable)
            .then(|| PathBuf::from(unescape_mount(target)))
    })
}

fn is_hugetlbfs(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    text.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(target), Some(fstype)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        fstype == "hugetlbfs" && dir.starts_with(unescape_mount(target))
    })
}

fn unescape_mount(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// FNV-1a of the canonical data directory: names the live directory of a log.
/// File in a live directory naming the log directory that owns it, so live
/// files left by a crashed process whose log directory is gone can be found.
pub(crate) const OWNER_FILE: &str = "owner";

/// Mark `live_dir` as belonging to `log_dir`, after removing the live
/// directories beside it whose owning log directory no longer exists (a
/// killed process's temporary log: nothing can ever recover from them, and
/// on tmpfs or hugetlbfs they hold memory until reboot).
pub(crate) fn claim_and_collect(live_dir: &Path, log_dir: &Path) -> io::Result<()> {
    if let Some(base) = live_dir.parent() {
        collect_orphans(base, live_dir);
    }
    fs::create_dir_all(live_dir)?;
    let owner = fs::canonicalize(log_dir).unwrap_or_else(|_| log_dir.to_path_buf());
    // A symlink (hugetlbfs files cannot be written with write(2)), made
    // under a temporary name and renamed, so a concurrent collector never
    // sees a partial one.
    let temporary = live_dir.join(format!("{OWNER_FILE}.{}", std::process::id()));
    // Best effort: where the file system refuses (hugetlbfs answers EINVAL
    // here), the directory is simply not collected as an orphan later.
    let _ = fs::remove_file(&temporary);
    if std::os::unix::fs::symlink(&owner, &temporary).is_ok()
        && fs::rename(&temporary, live_dir.join(OWNER_FILE)).is_err()
    {
        let _ = fs::remove_file(&temporary);
    }
    Ok(())
}

fn collect_orphans(base: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = entry.file_name().to_string_lossy().starts_with("kaelix-");
        if !is_ours || path == keep {
            continue;
        }
        // No owner file: not made by this version; leave it alone.
        let Ok(owner) = fs::read_link(path.join(OWNER_FILE)) else {
            continue;
        };
        if !owner.as_os_str().is_empty() && !owner.exists() {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

pub(crate) fn dir_id(dir: &Path) -> u64 {
    let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .to_string_lossy()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_prepared_ahead_never_reuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let live = Live {
            backing: LiveBacking::Shm,
            dir: Some(dir.path().to_path_buf()),
            populate: false,
        };
        let size = HUGE_PAGE_BYTES;
        let (first, path) = live.create_segment_ahead(7, size).unwrap();
        let path = path.expect("a shared backing has a file");
        let mut writer = crate::mem::SegmentWriter::take(first.clone()).unwrap();
        writer.write(0, b"written by the log's writer");
        writer.publish(27);

        // The flusher preparing the same number again (the race with the
        // writer's rename) fails instead of truncating the writer's file.
        let (_, err) = live.create_segment_ahead(7, size).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        assert_eq!(
            first.slice(0, 27),
            Some(&b"written by the log's writer"[..])
        );

        // The writer's own creation (under the final name) is unaffected.
        let (_, own) = live.create_segment(7, size).unwrap();
        assert_eq!(fs::metadata(own.unwrap()).unwrap().len(), size);
    }
}
