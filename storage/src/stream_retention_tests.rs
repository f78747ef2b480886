//! A stream's own retention: its first offset moves forward, readers stop
//! serving what is below it, and that survives a restart; other streams of
//! the same log are untouched. The readers' stream catalog follows streams
//! created and deleted after the reader was made.

use kaelix_protocol::DurabilityLevel;

use crate::tests::{config, frame};
use crate::{ReadError, ShardLog, StreamConfig, StreamRetention};

const SECOND_NS: u64 = 1_000_000_000;

fn memory() -> StreamConfig {
    StreamConfig {
        durability: DurabilityLevel::Memory,
    }
}

/// Append `count` frames of 100 payload bytes to `stream`, one batch each, at `now_ns`.
fn append(log: &mut ShardLog, stream: u32, first_seq: u64, count: u64, now_ns: u64) {
    for seq in first_seq..first_seq + count {
        log.append(stream, &[&frame(stream, seq, 100)], now_ns)
            .unwrap();
    }
}

fn first_readable(log: &mut ShardLog, stream: u32) -> u64 {
    let mut reader = log.reader();
    let (first, _) = reader.stream_offsets(stream).unwrap().unwrap();
    first
}

#[test]
fn age_retention_hides_old_offsets_of_one_stream_only() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    let retention = StreamRetention {
        bytes: None,
        age_ns: Some(10 * SECOND_NS),
    };
    let info = log
        .create_stream_with_retention(1, memory(), retention)
        .unwrap();
    assert_eq!(info.retention, retention);
    log.create_stream(2, memory()).unwrap();
    let mut reader = log.reader();

    // t = 0 s: 5 frames; housekeeping notes where the stream is.
    append(&mut log, 1, 1, 5, 0);
    append(&mut log, 2, 1, 5, 0);
    assert_eq!(log.enforce_retention(SECOND_NS).unwrap().streams_trimmed, 0);
    // t = 5 s: 5 more; nothing is 10 s old yet.
    append(&mut log, 1, 6, 5, 5 * SECOND_NS);
    append(&mut log, 2, 6, 5, 5 * SECOND_NS);
    assert_eq!(
        log.enforce_retention(5 * SECOND_NS)
            .unwrap()
            .streams_trimmed,
        0
    );
    assert_eq!(log.stream_info(1).unwrap().first_offset, 0);

    // t = 12 s: what was there at t = 1 s (offsets 0..5) is older than 10 s.
    let report = log.enforce_retention(12 * SECOND_NS).unwrap();
    assert_eq!(report.streams_trimmed, 1);
    assert_eq!(log.stream_info(1).unwrap().first_offset, 5);
    assert_eq!(log.stream_info(2).unwrap().first_offset, 0, "untouched");
    assert_eq!(reader.stream_offsets(1).unwrap(), Some((5, 10)));
    match reader.read(1, 0, 1 << 20, u64::MAX) {
        Err(ReadError::OffsetRetained {
            first_available, ..
        }) => assert_eq!(first_available, 5),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("offset 0 is retained away but was served"),
    }
    let offsets: Vec<u64> = reader
        .read(1, 5, 1 << 20, u64::MAX)
        .unwrap()
        .map(|record| record.unwrap().offset)
        .collect();
    assert_eq!(offsets, vec![5, 6, 7, 8, 9]);
    assert_eq!(first_readable(&mut log, 2), 0);

    // After a restart the hidden offsets stay hidden and the setting stays.
    drop(reader);
    drop(log);
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    assert_eq!(log.stream_info(1).unwrap().first_offset, 5);
    assert_eq!(log.stream_info(1).unwrap().retention, retention);
    assert_eq!(first_readable(&mut log, 1), 5);
    assert_eq!(first_readable(&mut log, 2), 0);
}

#[test]
fn byte_retention_keeps_at_least_the_newest_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    log.create_stream(1, memory()).unwrap();
    append(&mut log, 1, 1, 10, 0);
    log.enforce_retention(0).unwrap();
    // Set afterwards: applies from the next housekeeping on.
    let retention = StreamRetention {
        bytes: Some(3_000),
        age_ns: None,
    };
    log.set_stream_retention(1, retention).unwrap();
    // Each batch is one frame of 100 payload bytes plus headers (> 100 bytes).
    log.enforce_retention(SECOND_NS).unwrap();
    assert_eq!(log.stream_info(1).unwrap().first_offset, 0);
    for round in 0..40u64 {
        append(&mut log, 1, 11 + round * 10, 10, round * SECOND_NS);
        log.enforce_retention((round + 2) * SECOND_NS).unwrap();
        let info = log.stream_info(1).unwrap();
        let mut reader = log.reader();
        let kept: usize = reader
            .read(1, info.first_offset, usize::MAX, u64::MAX)
            .unwrap()
            .map(|record| record.unwrap().bytes.len())
            .sum();
        assert!(
            kept >= 2_500,
            "round {round}: only {kept} frame bytes kept from offset {}",
            info.first_offset
        );
    }
    let info = log.stream_info(1).unwrap();
    assert!(info.first_offset > 300, "{info:?}");
    assert_eq!(info.next_offset, 410);
}

#[test]
fn the_reader_catalog_follows_creations_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    let reader = log.reader();
    assert_eq!(reader.stream_level(3), None);
    log.create_stream(
        3,
        StreamConfig {
            durability: DurabilityLevel::Fsync,
        },
    )
    .unwrap();
    assert_eq!(reader.stream_level(3), Some(DurabilityLevel::Fsync));
    log.delete_stream(3).unwrap();
    assert_eq!(reader.stream_level(3), None);
    // Recreated: the old incarnation's offsets are not served by an existing reader.
    log.create_stream(3, memory()).unwrap();
    append(&mut log, 3, 1, 2, 0);
    let mut reader = reader;
    assert_eq!(reader.stream_offsets(3).unwrap(), Some((0, 2)));
    log.delete_stream(3).unwrap();
    log.create_stream(3, memory()).unwrap();
    append(&mut log, 3, 1, 1, 0);
    assert_eq!(reader.stream_level(3), Some(DurabilityLevel::Memory));
    assert_eq!(reader.stream_offsets(3).unwrap(), Some((2, 3)));
}

#[test]
fn retention_marks_stay_bounded_and_never_hide_young_data() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    let age_ns = 1_500 * SECOND_NS;
    let retention = StreamRetention {
        bytes: None,
        age_ns: Some(age_ns),
    };
    log.create_stream_with_retention(1, memory(), retention)
        .unwrap();
    // One frame per second for 3000 s, housekeeping every second.
    for second in 0..3_000u64 {
        let now_ns = second * SECOND_NS;
        append(&mut log, 1, second + 1, 1, now_ns);
        log.enforce_retention(now_ns).unwrap();
        assert!(log.retention_marks[&1].len() <= super::log::RETENTION_MARKS_MAX);
        // Offset k was appended at second k: everything younger than the age is kept.
        let first = log.stream_info(1).unwrap().first_offset;
        let youngest_hidden_second = first.saturating_sub(1);
        assert!(
            first == 0 || now_ns - youngest_hidden_second * SECOND_NS > age_ns,
            "second {second}: first offset {first} hides data younger than the age"
        );
    }
    let first = log.stream_info(1).unwrap().first_offset;
    assert!(first >= 1_400, "old data is hidden in the end: {first}");
}
