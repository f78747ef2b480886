//! Live segment files left behind by a process killed with a temporary log
//! directory (which then disappeared) are removed by the next log opened
//! beside them; live files of logs whose directory still exists are kept.

use kaelix_storage::{LiveMemory, LogConfig, ShardLog, StreamConfig};

fn open(log_dir: &std::path::Path, live_dir: std::path::PathBuf) -> ShardLog {
    let mut config = LogConfig::new(log_dir);
    config.segment_size_bytes = 2 * 1024 * 1024;
    config.live_memory = LiveMemory::Shm(live_dir);
    config.populate = false;
    ShardLog::open(config).unwrap().0
}

fn frame(seq: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 104];
    let fields = kaelix_protocol::FrameFields::data(1, 1, seq, 0);
    let n = kaelix_protocol::encode_frame(&mut buf, &fields, &[1; 64]).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn storage_orphaned_live_directories_are_collected() {
    let base = tempfile::tempdir().unwrap();
    let gone = tempfile::tempdir().unwrap();
    let alive = tempfile::tempdir().unwrap();
    let gone_live = base.path().join("kaelix-gone");
    let alive_live = base.path().join("kaelix-alive");

    // Two logs that "crash": never closed, so their live files stay.
    for (dir, live) in [(gone.path(), &gone_live), (alive.path(), &alive_live)] {
        let mut log = open(dir, live.clone());
        log.create_stream(1, StreamConfig::default()).unwrap();
        log.append(1, &[&frame(1)], 1).unwrap();
        std::mem::forget(log);
        assert!(live.exists());
    }
    // The first one's temporary log directory goes away.
    let gone_path = gone.path().to_path_buf();
    drop(gone);
    assert!(!gone_path.exists());

    let third = tempfile::tempdir().unwrap();
    let log = open(third.path(), base.path().join("kaelix-third"));
    assert!(!gone_live.exists(), "orphaned live files are removed");
    assert!(
        alive_live.exists(),
        "a log directory that exists keeps its live files"
    );
    drop(log);
    assert!(
        !base.path().join("kaelix-third").exists(),
        "a clean close removes its live directory"
    );
}
