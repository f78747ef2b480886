//! The hugepage path (root only; skipped loudly otherwise): reserve a few
//! 2 MiB pages, mount hugetlbfs in a temporary directory if none is mounted,
//! open a log there and check that its live segments took hugepages.
//! Everything is restored on every exit path by a Drop guard.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kaelix_protocol::{FrameFields, HEADER_LEN, encode_frame};
use kaelix_storage::{
    DurabilityLevel, Follower, LiveBacking, LiveMemory, LogConfig, ShardLog, StreamConfig,
    find_hugetlbfs_mount, meminfo_value,
};

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const SEGMENT: u64 = 4 * 1024 * 1024;

/// Restores `nr_hugepages` and unmounts what the test mounted.
struct Guard {
    old_pages: u64,
    mounted: Option<PathBuf>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(dir) = self.mounted.take() {
            let _ = Command::new("umount").arg(&dir).status();
        }
        let _ = fs::write(NR_HUGEPAGES, self.old_pages.to_string());
    }
}

fn free_pages() -> u64 {
    meminfo_value("HugePages_Free").unwrap_or(0)
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn frame(offset: u64) -> Vec<u8> {
    let mut buf = vec![0u8; HEADER_LEN + 64];
    encode_frame(
        &mut buf,
        &FrameFields::data(1, 1, offset, 0),
        &[offset as u8; 64],
    )
    .unwrap();
    buf
}

#[test]
fn storage_hugepages_back_the_live_segments() {
    if !is_root() || fs::metadata(NR_HUGEPAGES).is_err() {
        eprintln!(
            "SKIPPED storage_hugepages_back_the_live_segments: needs root and {NR_HUGEPAGES} to reserve hugepages"
        );
        return;
    }
    let old_pages: u64 = fs::read_to_string(NR_HUGEPAGES)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut guard = Guard {
        old_pages,
        mounted: None,
    };
    let base = tempfile::tempdir().unwrap();
    let wanted = old_pages + 8;
    fs::write(NR_HUGEPAGES, wanted.to_string()).unwrap();
    let total = meminfo_value("HugePages_Total").unwrap_or(0);
    if total < wanted || free_pages() < 4 {
        eprintln!(
            "SKIPPED storage_hugepages_back_the_live_segments: the kernel reserved only {total} of {wanted} hugepages"
        );
        return;
    }
    let mount = match find_hugetlbfs_mount() {
        Some(mount) => mount,
        None => {
            let dir = base.path().join("hugetlbfs");
            fs::create_dir(&dir).unwrap();
            let status = Command::new("mount")
                .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "kaelix-test"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "mount hugetlbfs");
            guard.mounted = Some(dir.clone());
            dir
        }
    };
    let live_dir = mount.join(format!("kaelix-test-{}", std::process::id()));
    let data = base.path().join("data");
    let config = LogConfig {
        segment_size_bytes: SEGMENT,
        live_memory: LiveMemory::Hugetlbfs(live_dir.clone()),
        shared: true,
        populate: true,
        ..LogConfig::new(&data)
    };
    let free_before = free_pages();
    let result = std::panic::catch_unwind(|| run(&config, &data, free_before));
    let _ = fs::remove_dir_all(&live_dir);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(
        free_pages(),
        free_before,
        "hugepages given back after the log closed"
    );
    drop(guard);
}

fn run(config: &LogConfig, data: &Path, free_before: u64) {
    let (mut log, report) = ShardLog::open(config.clone()).unwrap();
    assert_eq!(report.live_backing, LiveBacking::Hugetlbfs);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let used = free_before - free_pages();
    assert!(
        used >= SEGMENT / (2 << 20),
        "HugePages_Free dropped by {used}, expected at least 2"
    );
    log.create_stream(
        1,
        StreamConfig {
            durability: DurabilityLevel::Memory,
        },
    )
    .unwrap();
    let mut flusher = log.flusher().unwrap();
    // Fill more than one segment so a roll maps a second hugepage segment.
    for offset in 0..60_000u64 {
        log.append(1, &[&frame(offset)], offset).unwrap();
    }
    let mut follower = Follower::open(data).unwrap();
    let count = follower.read(1, 0, usize::MAX, u64::MAX).unwrap().count();
    assert_eq!(count, 60_000);
    let mut now = 1u64 << 40;
    while flusher.positions().synced < log.positions().appended {
        now += 1 << 30;
        flusher.poll(now).unwrap();
    }
    drop(follower);
    drop(log);
    let (log, report) = ShardLog::open(config.clone()).unwrap();
    assert!(report.corruptions.is_empty());
    assert_eq!(log.stream_info(1).unwrap().next_offset, 60_000);
    let mut flusher = log.flusher().unwrap();
    while flusher.positions().synced < log.positions().appended {
        now += 1 << 30;
        flusher.poll(now).unwrap();
    }
}
