//! The [`crate::Syncer`]: interval syncs off the flusher's thread.

use kaelix_protocol::DurabilityLevel;

use crate::tests::{config, frame};
use crate::{ShardLog, StreamConfig};

const INTERVAL_NS: u64 = 100_000_000;

fn log_with(dir: &std::path::Path, streams: &[(u32, DurabilityLevel)]) -> ShardLog {
    let (mut log, _) = ShardLog::open(config(dir)).unwrap();
    for &(stream_id, durability) in streams {
        log.create_stream(stream_id, StreamConfig { durability })
            .unwrap();
    }
    log
}

#[test]
fn with_a_syncer_the_flusher_writes_without_waiting_for_the_interval_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), &[(1, DurabilityLevel::Flush)]);
    let mut flusher = log.flusher().unwrap();
    let mut syncer = log.syncer().unwrap();
    assert!(log.syncer().is_none(), "one syncer per log");

    let data = frame(1, 1, 100);
    let end = log.append(1, &[data.as_slice()], 5).unwrap().end_position;
    // Far past the interval: without a syncer this poll would fdatasync.
    let progress = flusher.poll(10 * INTERVAL_NS).unwrap();
    assert_eq!(progress.written, end);
    assert!(!progress.synced_now, "the interval sync is the syncer's");
    assert!(log.positions().synced < end);
    assert_eq!(log.durable_position(DurabilityLevel::Flush), end);

    // The syncer syncs what was written, once per interval.
    assert_eq!(syncer.poll(10 * INTERVAL_NS).unwrap(), Some(end));
    assert_eq!(log.positions().synced, end);
    let more = frame(1, 2, 100);
    let end2 = log.append(1, &[more.as_slice()], 6).unwrap().end_position;
    flusher.poll(10 * INTERVAL_NS + 1).unwrap();
    assert_eq!(syncer.poll(10 * INTERVAL_NS + 1).unwrap(), None, "not due");
    assert_eq!(syncer.next_due_ns(), 11 * INTERVAL_NS);
    assert_eq!(syncer.poll(11 * INTERVAL_NS).unwrap(), Some(end2));
    assert_eq!(log.positions().synced, end2);
    // Nothing new written: due, but nothing to sync.
    assert_eq!(syncer.poll(20 * INTERVAL_NS).unwrap(), None);
}

#[test]
fn fsync_requests_are_still_synced_by_the_flusher() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), &[(3, DurabilityLevel::Fsync)]);
    let mut flusher = log.flusher().unwrap();
    let _syncer = log.syncer().unwrap();
    let data = frame(3, 1, 100);
    let end = log.append(3, &[data.as_slice()], 5).unwrap().end_position;
    // Not due at all (time 1), yet an fsync-level batch waits: group commit.
    let progress = flusher.poll(1).unwrap();
    assert!(progress.synced_now);
    assert_eq!(log.durable_position(DurabilityLevel::Fsync), end);
}

#[test]
fn at_shutdown_the_flusher_syncs_everything_despite_a_syncer() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), &[(1, DurabilityLevel::Flush)]);
    let mut flusher = log.flusher().unwrap();
    let syncer = log.syncer().unwrap();
    let data = frame(1, 1, 100);
    let end = log.append(1, &[data.as_slice()], 5).unwrap().end_position;
    assert!(!flusher.poll(u64::MAX / 2).unwrap().synced_now);

    // At shutdown: sync everything, due or not.
    flusher.sync_everything();
    let progress = flusher.poll(1).unwrap();
    assert!(progress.synced_now);
    assert_eq!(progress.synced, end);

    drop(syncer);
}

#[test]
fn a_dropped_syncer_hands_the_interval_syncs_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), &[(1, DurabilityLevel::Flush)]);
    let mut flusher = log.flusher().unwrap();
    let syncer = log.syncer().unwrap();
    let data = frame(1, 1, 100);
    let end = log.append(1, &[data.as_slice()], 5).unwrap().end_position;
    assert!(!flusher.poll(u64::MAX / 2).unwrap().synced_now);
    drop(syncer);
    let progress = flusher.poll(u64::MAX / 2).unwrap();
    assert!(progress.synced_now);
    assert_eq!(progress.synced, end);
    assert!(log.syncer().is_some(), "and a new one can be taken");
}

#[test]
fn the_syncer_follows_the_flusher_across_segment_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log_with(dir.path(), &[(1, DurabilityLevel::Flush)]);
    let mut flusher = log.flusher().unwrap();
    let mut syncer = log.syncer().unwrap();
    let size = log.segment_size();
    let payload = 4000;
    let mut now = INTERVAL_NS;
    let mut seq = 1;
    // Three segments' worth, the syncer running every interval.
    while log.positions().appended < 3 * size {
        let data = frame(1, seq, payload);
        log.append(1, &[data.as_slice()], seq).unwrap();
        seq += 1;
        if seq % 64 == 0 {
            flusher.poll(now).unwrap();
            let positions = log.positions();
            if let Some(synced) = syncer.poll(now).unwrap() {
                assert_eq!(synced, positions.written);
            }
            let after = log.positions();
            assert!(after.synced <= after.written);
            assert!(after.synced >= positions.synced, "synced never goes back");
            now += INTERVAL_NS;
        }
    }
    flusher.poll(now).unwrap();
    syncer.poll(now + INTERVAL_NS).unwrap();
    let positions = log.positions();
    assert_eq!(positions.synced, positions.written);
    assert_eq!(positions.written, positions.appended);
}
