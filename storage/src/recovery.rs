//! Opening a log: recovery of segments from the disk copy and surviving
//! live copies, index loading or rebuilding, and setting up the live memory.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

use zerocopy::IntoBytes;

use crate::config::{LogConfig, RecoveryPolicy, VerifyOnOpen};
use crate::error::{Corruption, OpenError};
use crate::index::LogIndex;
use crate::layout::{
    BATCH_HEADER_LEN, BATCH_MAGIC, BatchHeader, Record, RecordFault, SEGMENT_HEADER_LEN,
    SegmentHeader, check_record,
};
use crate::live::{Live, LiveBacking, dir_id, list_segments, segment_file_name};
use crate::log::{Active, Seal, SegmentHandle, ShardLog, Shared, WriterStream};
use crate::mem::{self, MetaPage, SegmentMemory, SegmentWriter, Slot};
use crate::registry;

/// File in the data directory naming the live directory and the meta page.
pub(crate) const LIVE_INFO_FILE: &str = "live.path";
pub(crate) const META_MAGIC: u64 = u64::from_le_bytes(*b"KXMETA01");
pub(crate) const META_VERSION: u64 = 1;
pub(crate) const STATE_OPEN: u64 = 1;
pub(crate) const STATE_CLOSED: u64 = 2;
const REGISTRY_FILE: &str = "streams.reg";

/// What opening found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments kept.
    pub segments: usize,
    /// Batches found in them.
    pub batches: u64,
    /// Registered streams.
    pub streams: usize,
    /// Segments whose index file was loaded.
    pub indexes_loaded: usize,
    /// Segments scanned and whose index file was (re)written.
    pub indexes_rebuilt: usize,
    /// Segments completed from a live copy that outlived a crash.
    pub live_copies_used: usize,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    /// Log position where a torn tail was cut.
    pub torn_tail_position: Option<u64>,
    /// Damage with valid data after it (only under [`RecoveryPolicy::Salvage`]; under
    /// [`RecoveryPolicy::Fail`] the first one is the error).
    pub corruptions: Vec<Corruption>,
    /// Counter of damaged records found (torn tails excluded).
    pub corrupt_records: u64,
    /// What backs the live segments now.
    pub live_backing: LiveBacking,
    /// Warnings for the operator (at most one about pages).
    pub warnings: Vec<String>,
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> OpenError + 'a {
    move |source| OpenError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// How far the records of a segment image check out.
#[derive(Debug)]
struct Scan {
    header: Result<(), String>,
    /// End of the last valid data record (at least the header length when the header is fine).
    valid_len: usize,
    /// An end marker sits at `valid_len`.
    sealed: bool,
    /// Where and why the walk stopped, when not sealed.
    fault: Option<(usize, RecordFault)>,
}

impl Scan {
    fn usable_len(&self) -> usize {
        if self.header.is_err() {
            0
        } else {
            self.valid_len + if self.sealed { BATCH_HEADER_LEN } else { 0 }
        }
    }
}

fn scan(bytes: &[u8], number: u64, size: u64) -> Scan {
    if let Err(reason) = SegmentHeader::check(bytes, number, size) {
        return Scan {
            header: Err(reason),
            valid_len: 0,
            sealed: false,
            fault: None,
        };
    }
    let mut at = SEGMENT_HEADER_LEN;
    loop {
        match check_record(&bytes[at..]) {
            Ok(Record::Data(header)) => at += header.record_len(),
            Ok(Record::End(_)) => {
                return Scan {
                    header: Ok(()),
                    valid_len: at,
                    sealed: true,
                    fault: None,
                };
            }
            Err(fault) => {
                return Scan {
                    header: Ok(()),
                    valid_len: at,
                    sealed: false,
                    fault: Some((at, fault)),
                };
            }
        }
    }
}

/// Is there a valid record (or end marker) anywhere after byte `from`?
fn valid_record_after(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut at = from + 1;
    while at + BATCH_HEADER_LEN <= bytes.len() {
        if bytes[at] == magic[0] && bytes[at..at + 4] == magic && check_record(&bytes[at..]).is_ok()
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

fn map_whole(file: &File, path: &Path) -> Result<SegmentMemory, OpenError> {
    let len = file
        .metadata()
        .map_err(io_err("reading metadata of", path))?
        .len();
    SegmentMemory::map_read_only(file, len, len).map_err(io_err("mapping", path))
}

impl ShardLog {
    /// Open (or create) the log in `config.dir`: recover, rebuild what is
    /// missing, start a fresh active segment. Takes an exclusive lock on the
    /// directory. May make syscalls and allocate freely.
    pub fn open(config: LogConfig) -> Result<(ShardLog, RecoveryReport), OpenError> {
        config.validate()?;
        let dir = config.dir.clone();
        let segments_dir = dir.join("segments");
        fs::create_dir_all(&segments_dir).map_err(io_err("creating", &segments_dir))?;
        let lock_path = dir.join("lock");
        let lock = mem::lock_dir(&lock_path).map_err(|err| match err {
            mem::DirLockError::Open(source) => io_err("opening", &lock_path)(source),
            mem::DirLockError::Held => OpenError::Locked {
                path: lock_path.clone(),
            },
        })?;

        let registry_path = dir.join(REGISTRY_FILE);
        let (segment_size, entries) = match fs::read(&registry_path) {
            Ok(bytes) => registry::decode(&bytes).map_err(|reason| OpenError::BadFile {
                path: registry_path.clone(),
                reason,
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                (config.segment_size_bytes, Vec::new())
            }
            Err(source) => {
                return Err(OpenError::Io {
                    action: "reading",
                    path: registry_path,
                    source,
                });
            }
        };
        let mut warnings = Vec::new();
        if segment_size != config.segment_size_bytes {
            warnings.push(format!(
                "the log keeps its segment size of {segment_size} bytes (config asks for {})",
                config.segment_size_bytes
            ));
        }
        let id = dir_id(&dir);
        let (live, page_warning) = Live::resolve(&config, segment_size, id)?;
        warnings.extend(page_warning);
        if let Some(live_dir) = &live.dir {
            crate::live::claim_and_collect(live_dir, &dir).map_err(io_err("claiming", live_dir))?;
        }

        // Live copies of the previous run (kill -9 leaves hugetlbfs and tmpfs files behind).
        let info_path = dir.join(LIVE_INFO_FILE);
        let old_live_dir = fs::read_to_string(&info_path)
            .ok()
            .and_then(|text| text.lines().next().map(PathBuf::from));
        let old_live: Vec<u64> = match &old_live_dir {
            Some(old) => list_segments(old).map_err(io_err("listing", old))?,
            None => Vec::new(),
        };
        let disk: Vec<u64> =
            list_segments(&segments_dir).map_err(io_err("listing", &segments_dir))?;
        let numbers: Vec<u64> = disk
            .iter()
            .chain(old_live.iter())
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();

        let mut index: LogIndex<WriterStream> = LogIndex::new(
            segment_size,
            config.index_interval_bytes,
            config.time_index_interval_bytes,
        );
        let mut report = RecoveryReport {
            segments: 0,
            batches: 0,
            streams: 0,
            indexes_loaded: 0,
            indexes_rebuilt: 0,
            live_copies_used: 0,
            truncated_bytes: 0,
            torn_tail_position: None,
            corruptions: Vec::new(),
            corrupt_records: 0,
            live_backing: live.backing,
            warnings,
        };
        let shared_stub = Stub {
            segments_dir: segments_dir.clone(),
        };
        let mut handles: VecDeque<Arc<SegmentHandle>> = VecDeque::new();
        for (i, &number) in numbers.iter().enumerate() {
            let is_last = i + 1 == numbers.len();
            let old_live_path = old_live_dir
                .as_ref()
                .filter(|_| old_live.contains(&number))
                .map(|dir| segment_file_name(dir, number));
            let recovered = recover_segment(
                &config,
                segment_size,
                number,
                is_last,
                &shared_stub,
                old_live_path.as_deref(),
                &mut index,
                &mut report,
            )?;
            if let Some(handle) = recovered {
                handles.push_back(Arc::new(handle));
            }
        }
        // Everything is in the disk copy now: drop the old live copies.
        if let Some(old) = &old_live_dir {
            for number in &old_live {
                let _ = fs::remove_file(segment_file_name(old, *number));
            }
        }

        // Streams: registry settings, offsets never below the saved floors.
        for entry in &entries {
            let slot = index.streams.entry(entry.stream_id).or_default();
            slot.meta = WriterStream {
                registered: !entry.deleted,
                durability: entry.durability,
                first_offset: entry.first_offset,
                retention: entry.retention,
            };
            slot.index.next_offset = slot.index.next_offset.max(entry.floor);
            slot.index.start_at(entry.first_offset);
        }
        report.streams = index
            .streams
            .values()
            .filter(|slot| slot.meta.registered)
            .count();
        report.segments = handles.len();

        // Live memory and the meta page.
        if let Some(live_dir) = &live.dir {
            fs::create_dir_all(live_dir).map_err(io_err("creating", live_dir))?;
            for stale in list_segments(live_dir).map_err(io_err("listing", live_dir))? {
                let _ = fs::remove_file(segment_file_name(live_dir, stale));
            }
            // Segments a crashed flusher prepared ahead hold nothing.
            if let Ok(entries) = fs::read_dir(live_dir) {
                for entry in entries.flatten() {
                    if entry.path().extension().is_some_and(|ext| ext == "next") {
                        let _ = fs::remove_file(entry.path());
                    }
                }
            }
        }
        let mut shared_files = Vec::new();
        let meta = if live.backing.is_shared() {
            let live_dir = live.dir.as_ref().expect("shared backings have a dir");
            let meta_path = if live.backing == LiveBacking::Shm {
                live_dir.join("meta")
            } else if Path::new("/dev/shm").is_dir() {
                PathBuf::from(format!("/dev/shm/kaelix-{id:016x}.meta"))
            } else {
                dir.join("live.meta")
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&meta_path)
                .map_err(io_err("opening", &meta_path))?;
            let meta = MetaPage::map_file_rw(&file).map_err(io_err("mapping", &meta_path))?;
            let text = format!("{}\n{}\n", live_dir.display(), meta_path.display());
            registry::write_atomic(&info_path, text.as_bytes(), true)
                .map_err(io_err("writing", &info_path))?;
            shared_files.push(meta_path);
            meta
        } else {
            match fs::remove_file(&info_path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(OpenError::Io {
                        action: "removing",
                        path: info_path,
                        source,
                    });
                }
            }
            MetaPage::anonymous().map_err(|err| OpenError::LiveMemory {
                path: None,
                bytes: 4096,
                reason: err.to_string(),
            })?
        };

        // A fresh active segment after the last recovered one.
        let number = handles.back().map_or(0, |handle| handle.number + 1);
        let (mem, live_path) =
            live.create_segment(number, segment_size)
                .map_err(|(path, err)| OpenError::LiveMemory {
                    path: path.or_else(|| live.dir.clone()),
                    bytes: segment_size,
                    reason: err.to_string(),
                })?;
        let mut writer =
            SegmentWriter::take(mem.clone()).expect("a new writable mapping has no writer yet");
        writer.write(0, SegmentHeader::new(number, segment_size, 0).as_bytes());
        writer.publish(SEGMENT_HEADER_LEN);
        handles.push_back(Arc::new(SegmentHandle {
            number,
            mem,
            live_path,
            disk_path: segment_file_name(&segments_dir, number),
            index_path: segments_dir.join(format!("{number:020}.idx")),
            seal: OnceLock::new(),
        }));
        let first_number = handles.front().map_or(number, |handle| handle.number);
        let base = number * segment_size;
        meta.store(Slot::Magic, META_MAGIC);
        meta.store(Slot::Version, META_VERSION);
        meta.store(Slot::SegmentSize, segment_size);
        meta.store(Slot::Backing, live.backing.code());
        meta.store(Slot::FirstSegment, first_number);
        meta.store(Slot::ActiveSegment, number);
        meta.store(Slot::Written, base);
        meta.store(Slot::Synced, base);
        meta.store(Slot::SyncRequest, 0);
        meta.store(Slot::Appended, base + SEGMENT_HEADER_LEN as u64);
        meta.store(Slot::WriterPid, u64::from(std::process::id()));
        meta.store(Slot::State, STATE_OPEN);
        crate::replica::reset_meta(&meta);

        // Validation checked the limit against the configured segment size;
        // a log that keeps another size gets at least the minimum.
        let live_min = config.live_segments_max as u64 + 1;
        let mut live_limit_segments = config.live_memory_max_bytes / segment_size;
        if live_limit_segments < live_min {
            report.warnings.push(format!(
                "live_memory_max_bytes {} holds {live_limit_segments} segments of the log's \
                 {segment_size} bytes; using {live_min} (live_segments_max + 1)",
                config.live_memory_max_bytes
            ));
            live_limit_segments = live_min;
        }
        let live_segments = handles
            .iter()
            .filter(|handle| handle.mem.kind() != mem::MapKind::ReadOnly)
            .count() as u64;
        let shared = Arc::new(Shared {
            segments_dir,
            segment_size,
            meta,
            list: Mutex::new(handles),
            generation: AtomicU64::new(0),
            flusher_taken: AtomicBool::new(false),
            syncer_taken: AtomicBool::new(false),
            index_interval_bytes: config.index_interval_bytes,
            time_interval_bytes: config.time_index_interval_bytes,
            live: live.clone(),
            prepared: Mutex::new(None),
            catalog: Mutex::new(HashMap::new()),
            catalog_generation: AtomicU64::new(0),
            live_segments: AtomicU64::new(live_segments),
            live_limit_segments,
            append_signal: Default::default(),
        });
        let log = ShardLog {
            shared,
            config,
            live,
            index,
            active: Active { number, writer },
            registry_path,
            reader_state: None,
            shared_files,
            live_released_at: None,
            retention_marks: HashMap::new(),
            _lock: lock,
        };
        log.publish_catalog();
        if !log.registry_path.exists() || !log.shared.lock_list().is_empty() {
            // Persist the geometry (and the floors) right away.
            registry::write_atomic(&log.registry_path, &log.registry_bytes(), true).map_err(
                |source| OpenError::Io {
                    action: "writing",
                    path: log.registry_path.clone(),
                    source,
                },
            )?;
        }
        Ok((log, report))
    }
}

struct Stub {
    segments_dir: PathBuf,
}

/// Recover segment `number`: returns its handle (mapped read-only from the
/// sealed disk copy), or `None` when it held nothing and was removed.
#[allow(clippy::too_many_arguments)]
fn recover_segment(
    config: &LogConfig,
    size: u64,
    number: u64,
    is_last: bool,
    stub: &Stub,
    old_live: Option<&Path>,
    index: &mut LogIndex<WriterStream>,
    report: &mut RecoveryReport,
) -> Result<Option<SegmentHandle>, OpenError> {
    let disk_path = segment_file_name(&stub.segments_dir, number);
    let index_path = stub.segments_dir.join(format!("{number:020}.idx"));
    let base = number * size;
    let disk_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&disk_path)
        .map_err(io_err("opening", &disk_path))?;
    let disk_len = disk_file
        .metadata()
        .map_err(io_err("reading metadata of", &disk_path))?
        .len();

    // Fast path: a sealed segment with a valid index file.
    if config.verify == VerifyOnOpen::Tail
        && disk_len >= (SEGMENT_HEADER_LEN + BATCH_HEADER_LEN) as u64
        && let Ok(bytes) = fs::read(&index_path)
    {
        let disk = map_whole(&disk_file, &disk_path)?;
        let whole = disk
            .slice(0, disk_len as usize)
            .expect("read-only mapping is published");
        let end_at = disk_len as usize - BATCH_HEADER_LEN;
        let sealed = SegmentHeader::check(whole, number, size).is_ok()
            && matches!(check_record(&whole[end_at..]), Ok(Record::End(_)));
        if sealed && index.apply_segment(&bytes, number, disk_len).is_ok() {
            report.indexes_loaded += 1;
            report.batches += index
                .segments
                .back()
                .filter(|segment| segment.number == number)
                .map_or(0, |segment| segment.batches);
            return Ok(Some(handle_for(
                number, disk, disk_path, index_path, disk_len,
            )));
        }
    }

    let mut disk_scan = {
        let disk = map_whole(&disk_file, &disk_path)?;
        scan(
            disk.slice(0, disk_len as usize).expect("published"),
            number,
            size,
        )
    };
    // A live copy that outlived the writer may hold more than the disk copy.
    if let Some(live_path) = old_live
        && let Ok(live_file) = File::open(live_path)
    {
        let live = map_whole(&live_file, live_path)?;
        let live_bytes = live.slice(0, live.published()).expect("published");
        let live_scan = scan(live_bytes, number, size);
        if live_scan.usable_len() > disk_scan.usable_len() {
            let from = if disk_scan.header.is_ok() {
                disk_scan.valid_len
            } else {
                0
            };
            let to = live_scan.usable_len();
            disk_file
                .write_all_at(&live_bytes[from..to], from as u64)
                .map_err(io_err("repairing from the live copy", &disk_path))?;
            disk_file
                .set_len(to as u64)
                .map_err(io_err("truncating", &disk_path))?;
            disk_file
                .sync_data()
                .map_err(io_err("syncing", &disk_path))?;
            report.live_copies_used += 1;
            let disk = map_whole(&disk_file, &disk_path)?;
            disk_scan = scan(disk.slice(0, to).expect("published"), number, size);
        }
    }
    let disk_len = disk_file
        .metadata()
        .map_err(io_err("reading metadata of", &disk_path))?
        .len();
    let disk = map_whole(&disk_file, &disk_path)?;
    let bytes = disk.slice(0, disk_len as usize).expect("published");

    let corruption = |offset: usize, reason: String| Corruption {
        path: disk_path.clone(),
        segment: number,
        offset: offset as u64,
        position: base + offset as u64,
        reason,
    };
    if let Err(reason) = &disk_scan.header {
        if is_last && valid_record_after(bytes, 0).is_none() {
            // A segment the crash cut before its header was complete: nothing in it.
            drop(disk);
            report.truncated_bytes += disk_len;
            report.torn_tail_position.get_or_insert(base);
            fs::remove_file(&disk_path).map_err(io_err("removing", &disk_path))?;
            let _ = fs::remove_file(&index_path);
            return Ok(None);
        }
        report.corrupt_records += 1;
        let damage = corruption(0, format!("segment header: {reason}"));
        if config.recovery == RecoveryPolicy::Fail {
            return Err(OpenError::Corrupt(damage));
        }
        report.corruptions.push(damage);
        return Ok(None);
    }
    let mut seal_at = disk_scan.valid_len;
    if !disk_scan.sealed {
        let (at, fault) = disk_scan
            .fault
            .clone()
            .unwrap_or((disk_scan.valid_len, RecordFault::Zero));
        let follows = valid_record_after(bytes, at).is_some() || !is_last;
        if follows {
            report.corrupt_records += 1;
            let reason = if is_last {
                fault.to_string()
            } else {
                format!("{fault}; the segment is not sealed but later segments exist")
            };
            let damage = corruption(at, reason);
            if config.recovery == RecoveryPolicy::Fail {
                return Err(OpenError::Corrupt(damage));
            }
            report.corruptions.push(damage);
        } else if (disk_len as usize) > at {
            report.truncated_bytes += disk_len - at as u64;
            report.torn_tail_position = Some(base + at as u64);
        }
        seal_at = at;
    }
    drop(disk);
    let sealed_len = (seal_at + BATCH_HEADER_LEN) as u64;
    if !disk_scan.sealed {
        disk_file
            .set_len(seal_at as u64)
            .map_err(io_err("truncating", &disk_path))?;
        disk_file
            .write_all_at(BatchHeader::end(0).as_bytes(), seal_at as u64)
            .map_err(io_err("sealing", &disk_path))?;
        disk_file
            .sync_data()
            .map_err(io_err("syncing", &disk_path))?;
    }
    let disk = SegmentMemory::map_read_only(&disk_file, sealed_len, sealed_len)
        .map_err(io_err("mapping", &disk_path))?;
    // Index the records (headers only: they were checked by the scan).
    let mut at = SEGMENT_HEADER_LEN;
    let bytes = disk.slice(0, sealed_len as usize).expect("published");
    while at < seal_at {
        let header = BatchHeader::peek(&bytes[at..]).expect("scanned record");
        index.observe(&header, base + at as u64);
        report.batches += 1;
        at += header.record_len();
    }
    let file_bytes = index.encode_segment(number, sealed_len);
    registry::write_atomic(&index_path, &file_bytes, false)
        .map_err(io_err("writing", &index_path))?;
    report.indexes_rebuilt += 1;
    Ok(Some(handle_for(
        number, disk, disk_path, index_path, sealed_len,
    )))
}

fn handle_for(
    number: u64,
    mem: SegmentMemory,
    disk_path: PathBuf,
    index_path: PathBuf,
    len: u64,
) -> SegmentHandle {
    SegmentHandle {
        number,
        mem: Arc::new(mem),
        live_path: None,
        disk_path,
        index_path,
        seal: OnceLock::from(Seal { len }),
    }
}
