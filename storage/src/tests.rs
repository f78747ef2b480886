//! Tests of the whole log against a simple in-memory model (no root needed:
//! live memory is anonymous or a private tmpfs directory).

use std::collections::HashMap;
use std::path::Path;

use kaelix_protocol::{DurabilityLevel, Frame, FrameFields, HEADER_LEN, encode_frame};
use proptest::prelude::*;

use crate::{
    AppendError, Follower, LiveMemory, LogConfig, OpenError, ReadError, RecoveryPolicy, ShardLog,
    StreamConfig, VerifyOnOpen,
};

const MIB2: u64 = 2 * 1024 * 1024;

pub(crate) fn frame(stream: u32, seq: u64, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len)
        .map(|i| (seq as usize * 31 + i) as u8)
        .collect();
    let mut buf = vec![0u8; HEADER_LEN + payload_len];
    encode_frame(&mut buf, &FrameFields::data(stream, 7, seq, seq), &payload).unwrap();
    buf
}

pub(crate) fn config(dir: &Path) -> LogConfig {
    LogConfig {
        segment_size_bytes: MIB2,
        live_memory: LiveMemory::Anonymous,
        shared: false,
        populate: false,
        ..LogConfig::new(dir)
    }
}

fn shm_config(dir: &Path, live: &Path) -> LogConfig {
    LogConfig {
        live_memory: LiveMemory::Shm(live.to_path_buf()),
        shared: true,
        ..config(dir)
    }
}

/// Model: per stream, the frames in offset order.
type Model = HashMap<u32, Vec<Vec<u8>>>;

fn read_all(log: &mut ShardLog, stream: u32, from: u64) -> Vec<(u64, Vec<u8>)> {
    let mut reader = log.reader();
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let batch = reader.read(stream, next, 64 * 1024, u64::MAX).unwrap();
        let before = out.len();
        for record in batch {
            let record = record.unwrap();
            out.push((record.offset, record.bytes.to_vec()));
        }
        if out.len() == before {
            return out;
        }
        next = out.last().unwrap().0 + 1;
    }
}

fn check_model(log: &mut ShardLog, model: &Model) {
    for (stream, frames) in model {
        let got = read_all(log, *stream, 0);
        assert_eq!(got.len(), frames.len(), "stream {stream}");
        for (i, (offset, bytes)) in got.iter().enumerate() {
            assert_eq!(*offset, i as u64);
            assert_eq!(bytes, &frames[i], "stream {stream} offset {offset}");
            Frame::parse(bytes).expect("stored frame is valid");
        }
    }
}

pub(crate) fn flush_all(log: &ShardLog, flusher: &mut crate::Flusher) {
    let mut now = 1u64 << 40;
    while flusher.positions().synced < log.positions().appended {
        now += 1 << 30;
        flusher.poll(now).unwrap();
    }
}

#[test]
fn a_first_poll_at_the_stop_time_still_syncs_everything() {
    // A broker stopped right after it started: the flusher's first poll is
    // the final one, with the far-future clock run_flusher uses on stop. A
    // memory-level stream asks for no sync, so only the interval makes one.
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    log.create_stream(
        1,
        StreamConfig {
            durability: DurabilityLevel::Memory,
        },
    )
    .unwrap();
    let data = frame(1, 1, 100);
    log.append(1, &[data.as_slice()], 5).unwrap();
    let mut flusher = log.flusher().unwrap();
    let progress = flusher.poll(u64::MAX / 2).unwrap();
    assert_eq!(progress.synced, log.positions().appended);
    assert_eq!(flusher.positions().synced, log.positions().appended);
}

#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new();
    {
        let (mut log, report) = ShardLog::open(config(dir.path())).unwrap();
        assert_eq!(report.segments, 0);
        assert_eq!(
            report.warnings.len(),
            usize::from(!log.live_backing().is_huge())
        );
        for stream in 1..=3 {
            log.create_stream(
                stream,
                StreamConfig {
                    durability: DurabilityLevel::Flush,
                },
            )
            .unwrap();
        }
        let mut flusher = log.flusher().unwrap();
        assert!(log.flusher().is_none());
        for i in 0..3000u64 {
            let stream = (i % 3 + 1) as u32;
            let frames: Vec<Vec<u8>> = (0..(i % 5 + 1))
                .map(|k| frame(stream, i * 10 + k, (i * 7 % 900) as usize))
                .collect();
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            let outcome = log.append(stream, &refs, i).unwrap();
            let list = model.entry(stream).or_default();
            assert_eq!(outcome.first_offset, list.len() as u64);
            assert_eq!(outcome.last_offset, (list.len() + frames.len() - 1) as u64);
            list.extend(frames);
            if i % 97 == 0 {
                flusher.poll(i).unwrap();
            }
        }
        assert!(log.active.number >= 2, "rolled at least twice");
        check_model(&mut log, &model);
        flush_all(&log, &mut flusher);
        check_model(&mut log, &model);
    }
    let (mut log, report) = ShardLog::open(config(dir.path())).unwrap();
    assert!(report.corruptions.is_empty());
    assert_eq!(report.streams, 3);
    check_model(&mut log, &model);
    for (stream, frames) in &model {
        assert_eq!(
            log.stream_info(*stream).unwrap().next_offset,
            frames.len() as u64
        );
    }
}

#[test]
fn batch_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    assert!(matches!(
        log.begin_batch(9, 0),
        Err(AppendError::UnknownStream { stream_id: 9 })
    ));
    log.create_stream(1, StreamConfig::default()).unwrap();
    assert!(log.create_stream(1, StreamConfig::default()).is_err());
    let mut batch = log.begin_batch(1, 0).unwrap();
    assert!(matches!(
        batch.push(&frame(2, 1, 3)),
        Err(AppendError::StreamMismatch {
            expected: 1,
            found: 2
        })
    ));
    let good = frame(1, 1, 10);
    assert!(matches!(
        batch.push(&good[..good.len() - 1]),
        Err(AppendError::BadFrame { .. })
    ));
    assert!(matches!(
        batch.push(&good[..10]),
        Err(AppendError::BadFrame { .. })
    ));
    assert!(matches!(
        batch.commit(),
        Err(AppendError::EmptyBatch { stream_id: 1 })
    ));
    // A batch larger than a segment is refused, what was pushed stays committable.
    let big = frame(1, 1, 60_000);
    let mut batch = log.begin_batch(1, 0).unwrap();
    let mut pushed = 0;
    let err = loop {
        match batch.push(&big) {
            Ok(()) => pushed += 1,
            Err(err) => break err,
        }
    };
    assert!(matches!(err, AppendError::BatchTooLarge { .. }), "{err}");
    let outcome = batch.commit().unwrap();
    assert_eq!(outcome.last_offset + 1, pushed);
    // A dropped batch leaves nothing behind.
    let mut batch = log.begin_batch(1, 0).unwrap();
    batch.push(&good).unwrap();
    drop(batch);
    assert_eq!(log.stream_info(1).unwrap().next_offset, pushed);
    assert_eq!(read_all(&mut log, 1, 0).len() as u64, pushed);
}

#[test]
fn follower_sees_appends_through_shared_memory() {
    let dir = tempfile::tempdir().unwrap();
    let live = tempfile::tempdir_in("/dev/shm").unwrap();
    // One live segment kept: older ones move to their disk copy while the follower reads.
    let cfg = LogConfig {
        live_segments_max: 1,
        ..shm_config(dir.path(), live.path())
    };
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    log.create_stream(5, StreamConfig::default()).unwrap();
    let mut flusher = log.flusher().unwrap();
    let mut follower = Follower::open(dir.path()).unwrap();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    let mut next = 0;
    for round in 0..4u64 {
        for i in 0..2000u64 {
            let f = frame(5, round * 2000 + i, 700);
            log.append(5, &[&f], i).unwrap();
            expected.push(f);
        }
        flush_all(&log, &mut flusher);
        loop {
            let records: Vec<_> = follower
                .read(5, next, 100_000, u64::MAX)
                .unwrap()
                .map(|r| r.unwrap().bytes.to_vec())
                .collect();
            if records.is_empty() {
                break;
            }
            next += records.len() as u64;
            got.extend(records);
        }
    }
    assert!(log.active.number >= 2, "the follower followed across rolls");
    let live_files = std::fs::read_dir(live.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "seg")
        })
        .count();
    assert!(
        live_files <= 2,
        "old live copies were released ({live_files} left)"
    );
    assert_eq!(got, expected);
    assert_eq!(follower.positions().appended, log.positions().appended);
    // A follower attached late reads everything too (disk copies and live segment).
    let mut late = Follower::open(dir.path()).unwrap();
    assert_eq!(
        late.read(5, 0, usize::MAX, u64::MAX).unwrap().count(),
        expected.len()
    );
    assert_eq!(late.stream_offsets(5), Some((0, expected.len() as u64)));
}

#[test]
fn time_index_finds_offsets_and_age_retention() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_age_ns: Some(1_000),
        time_index_interval_bytes: 4096,
        ..config(dir.path())
    };
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    log.create_stream(1, StreamConfig::default()).unwrap();
    log.create_stream(2, StreamConfig::default()).unwrap();
    let mut flusher = log.flusher().unwrap();
    // Time t = 10 * i for offset i of stream 1; stream 2 every 7th batch.
    for i in 0..3000u64 {
        log.append(1, &[&frame(1, i, 2000)], 10 * i).unwrap();
        if i % 7 == 0 {
            log.append(2, &[&frame(2, i, 10)], 10 * i).unwrap();
        }
    }
    let mut reader = log.reader();
    assert_eq!(reader.offset_for_time(1, 0).unwrap(), Some(0));
    assert_eq!(reader.offset_for_time(1, 12_345).unwrap(), Some(1235));
    assert_eq!(reader.offset_for_time(2, 12_345).unwrap(), Some(177)); // batch i = 1239
    assert_eq!(reader.offset_for_time(1, 10 * 3000).unwrap(), None);
    flush_all(&log, &mut flusher);
    // Everything but the last segment is older than 1 us at t = 30_000 + 10_000.
    let report = log.enforce_retention(40_000).unwrap();
    assert!(report.segments_deleted >= 2, "{report:?}");
    let first = log.stream_info(1).unwrap().first_offset;
    assert!(first > 0);
    assert_eq!(reader.offset_for_time(1, 0).unwrap(), Some(first));
}

#[test]
fn retention_keeps_offsets_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention_bytes: Some(3 * MIB2),
        ..config(dir.path())
    };
    {
        let (mut log, _) = ShardLog::open(cfg.clone()).unwrap();
        log.create_stream(1, StreamConfig::default()).unwrap();
        log.create_stream(2, StreamConfig::default()).unwrap();
        let mut flusher = log.flusher().unwrap();
        log.append(2, &[&frame(2, 1, 100)], 0).unwrap();
        for i in 0..400u64 {
            log.append(1, &[&frame(1, i, 30_000)], i).unwrap();
        }
        flush_all(&log, &mut flusher);
        let report = log.enforce_retention(1000).unwrap();
        assert!(report.segments_deleted >= 2, "{report:?}");
        let err = log
            .reader()
            .read(1, 0, 1000, u64::MAX)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, ReadError::OffsetRetained { .. }), "{err}");
        assert!(matches!(
            log.reader().read(2, 0, 1000, u64::MAX).map(|_| ()),
            Err(ReadError::OffsetRetained {
                first_available: 1,
                ..
            })
        ));
        assert_eq!(log.stream_info(2).unwrap().next_offset, 1);
    }
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    assert_eq!(
        log.stream_info(2).unwrap().next_offset,
        1,
        "offsets of a fully retained stream are not reused"
    );
    assert_eq!(
        log.append(2, &[&frame(2, 2, 10)], 0).unwrap().first_offset,
        1
    );
    assert_eq!(log.stream_info(1).unwrap().next_offset, 400);
}

#[test]
fn deleted_stream_recreated_continues_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    log.create_stream(1, StreamConfig::default()).unwrap();
    log.append(1, &[&frame(1, 1, 1), &frame(1, 2, 1)], 0)
        .unwrap();
    log.delete_stream(1).unwrap();
    assert!(log.stream_info(1).is_none());
    assert!(matches!(
        log.append(1, &[&frame(1, 3, 1)], 0),
        Err(AppendError::UnknownStream { .. })
    ));
    log.create_stream(1, StreamConfig::default()).unwrap();
    assert_eq!(
        log.append(1, &[&frame(1, 3, 1)], 0).unwrap().first_offset,
        2
    );
    assert_eq!(read_all(&mut log, 1, 2).len(), 1);
    let mut flusher = log.flusher().unwrap();
    flush_all(&log, &mut flusher);
    drop(log);
    let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
    assert_eq!(log.stream_info(1).unwrap().first_offset, 2);
    let got = read_all(&mut log, 1, 2);
    assert_eq!(got.len(), 1);
    assert!(matches!(
        log.reader().read(1, 0, 100, u64::MAX).map(|_| ()),
        Err(ReadError::OffsetRetained {
            first_available: 2,
            ..
        })
    ));
}

#[test]
fn tail_flip_truncates_middle_flip_fails() {
    let dir = tempfile::tempdir().unwrap();
    let f = frame(1, 1, 1000);
    {
        let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
        log.create_stream(1, StreamConfig::default()).unwrap();
        let mut flusher = log.flusher().unwrap();
        for i in 0..10 {
            log.append(1, &[&f], i).unwrap();
        }
        flush_all(&log, &mut flusher);
    }
    // Segment 0 is the one written above (unsealed on disk: the writer was dropped).
    let seg = dir.path().join("segments").join(format!("{:020}.seg", 0));
    let record = 40 + f.len();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[64 + 3 * record + 100] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let _ = std::fs::remove_file(seg.with_extension("idx"));
    let err = ShardLog::open(config(dir.path())).unwrap_err();
    assert!(
        matches!(err, OpenError::Corrupt(ref c) if c.offset == (64 + 3 * record) as u64),
        "{err}"
    );
    let salvage = LogConfig {
        recovery: RecoveryPolicy::Salvage,
        verify: VerifyOnOpen::Full,
        ..config(dir.path())
    };
    let (mut log, report) = ShardLog::open(salvage).unwrap();
    assert_eq!(report.corruptions.len(), 1);
    assert_eq!(report.corrupt_records, 1);
    assert_eq!(read_all(&mut log, 1, 0).len(), 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn prop_model(ops in proptest::collection::vec((0u32..6, 1usize..6, 0usize..3000, any::<bool>()), 1..250)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig { index_interval_bytes: 2000, ..config(dir.path()) };
        let mut model = Model::new();
        {
            let (mut log, _) = ShardLog::open(cfg.clone()).unwrap();
            let streams: Vec<(u32, StreamConfig)> = (0..6).map(|s| (s, StreamConfig::default())).collect();
            log.create_streams(&streams).unwrap();
            let mut flusher = log.flusher().unwrap();
            for (i, (stream, count, len, flush)) in ops.iter().enumerate() {
                let list = model.entry(*stream).or_default();
                let frames: Vec<Vec<u8>> = (0..*count).map(|k| frame(*stream, (i * 10 + k) as u64, *len)).collect();
                let mut batch = log.begin_batch(*stream, i as u64).unwrap();
                for f in &frames { batch.push(f).unwrap(); }
                let outcome = batch.commit().unwrap();
                prop_assert_eq!(outcome.first_offset, list.len() as u64);
                list.extend(frames);
                if *flush { flusher.poll(i as u64).unwrap(); }
            }
            check_model(&mut log, &model);
            flush_all(&log, &mut flusher);
        }
        let (mut log, report) = ShardLog::open(cfg).unwrap();
        prop_assert!(report.corruptions.is_empty());
        check_model(&mut log, &model);
    }
}

/// A small log with a sealed segment (and its index file) and an unsealed last one.
fn damaged_log_fixture() -> (tempfile::TempDir, Vec<u8>, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = ShardLog::open(config(dir.path())).unwrap();
        log.create_stream(1, StreamConfig::default()).unwrap();
        log.create_stream(2, StreamConfig::default()).unwrap();
        let mut flusher = log.flusher().unwrap();
        for i in 0..60u64 {
            let stream = (i % 2 + 1) as u32;
            log.append(
                stream,
                &[&frame(stream, i, 40_000), &frame(stream, i, 10)],
                i,
            )
            .unwrap();
        }
        flush_all(&log, &mut flusher);
    }
    let seg = |n: u64, ext: &str| dir.path().join("segments").join(format!("{n:020}.{ext}"));
    let sealed = std::fs::read(seg(0, "seg")).unwrap();
    let index = std::fs::read(seg(0, "idx")).unwrap();
    let last = std::fs::read(seg(1, "seg")).unwrap();
    (dir, sealed, index, last)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any damage to segment and index files: opening never panics; what opens reads back valid frames in order.
    #[test]
    fn prop_damaged_files_never_panic(
        flips in proptest::collection::vec((0usize..3, any::<prop::sample::Index>(), 1u8..=255), 0..6),
        cut in proptest::option::of((0usize..3, any::<prop::sample::Index>())),
        full in any::<bool>(),
    ) {
        let (dir, sealed, index, last) = damaged_log_fixture();
        let mut files = [sealed, index, last];
        for (file, at, xor) in &flips {
            let len = files[*file].len();
            let at = at.index(len);
            files[*file][at] ^= xor;
        }
        if let Some((file, at)) = cut {
            let len = files[file].len();
            files[file].truncate(at.index(len));
        }
        let seg = |n: u64, ext: &str| dir.path().join("segments").join(format!("{n:020}.{ext}"));
        std::fs::write(seg(0, "seg"), &files[0]).unwrap();
        std::fs::write(seg(0, "idx"), &files[1]).unwrap();
        std::fs::write(seg(1, "seg"), &files[2]).unwrap();
        let verify = if full { VerifyOnOpen::Full } else { VerifyOnOpen::Tail };
        match ShardLog::open(LogConfig { verify, ..config(dir.path()) }) {
            Ok(_) | Err(OpenError::Corrupt(_)) => {}
            Err(other) => prop_assert!(false, "unexpected error kind: {}", other),
        }
        let salvage = LogConfig { verify, recovery: RecoveryPolicy::Salvage, ..config(dir.path()) };
        let (mut log, _) = ShardLog::open(salvage).unwrap();
        let mut reader = log.reader();
        for stream in [1u32, 2] {
            let mut next = 0;
            loop {
                let batch = match reader.read(stream, next, 1 << 20, u64::MAX) {
                    Ok(batch) => batch,
                    Err(ReadError::OffsetRetained { first_available, .. }) => { next = first_available; continue; }
                    Err(err) => { prop_assert!(false, "read: {}", err); unreachable!() }
                };
                let mut got = 0;
                for record in batch {
                    let record = record.unwrap();
                    prop_assert!(record.offset >= next);
                    next = record.offset + 1;
                    // Without Full verification a trusted sealed segment is not re-checked frame by frame.
                    if full { Frame::parse(record.bytes).unwrap(); }
                    got += 1;
                }
                if got == 0 { break; }
            }
        }
    }
}

/// Live memory files (segments and the one prepared ahead) in a live directory.
fn live_files(live: &Path) -> usize {
    std::fs::read_dir(live)
        .unwrap()
        .filter(|e| {
            let path = e.as_ref().unwrap().path();
            path.extension().is_some_and(|x| x == "seg" || x == "next")
        })
        .count()
}

#[test]
fn live_memory_limit_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        live_segments_max: 2,
        live_memory_max_bytes: 3 * MIB2 - 1,
        ..config(dir.path())
    };
    let err = ShardLog::open(cfg).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Config {
                key: "live_memory_max_bytes",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("live_segments_max (2) + 1"),
        "{err}"
    );
}

#[test]
fn live_memory_full_holds_appends_back_until_the_flusher_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let live = tempfile::tempdir_in("/dev/shm").unwrap();
    let cfg = LogConfig {
        live_segments_max: 1,
        live_memory_max_bytes: 3 * MIB2,
        ..shm_config(dir.path(), live.path())
    };
    let (mut log, _) = ShardLog::open(cfg).unwrap();
    log.create_stream(1, StreamConfig::default()).unwrap();
    // Taken but stalled: not polled until the log is full.
    let mut flusher = log.flusher().unwrap();
    let mut acked: Vec<Vec<u8>> = Vec::new();
    let mut seq = 0u64;
    // Two-frame batches: a batch whose second frame needs the refused roll
    // must leave nothing behind.
    let err = loop {
        let (a, b) = (frame(1, seq, 3000), frame(1, seq + 1, 3000));
        match log.append(1, &[&a, &b], seq) {
            Ok(outcome) => {
                assert_eq!(outcome.first_offset, acked.len() as u64);
                acked.extend([a, b]);
                seq += 2;
            }
            Err(err) => break err,
        }
        assert!(seq < 100_000, "the limit never held the writer back");
    };
    let positions = log.positions();
    match err {
        AppendError::LiveMemoryFull {
            live_bytes,
            limit_bytes,
            appended,
            synced,
        } => {
            assert_eq!(limit_bytes, 3 * MIB2);
            assert_eq!(live_bytes, 3 * MIB2);
            assert_eq!(appended, positions.appended);
            assert_eq!(synced, 0);
        }
        other => panic!("expected LiveMemoryFull, got {other}"),
    }
    assert_eq!(log.active.number, 2, "three live segments: 0, 1 and 2");
    assert_eq!(log.stream_info(1).unwrap().next_offset, acked.len() as u64);
    assert_eq!(live_files(live.path()), 3);
    let usage = log.live_memory();
    assert_eq!((usage.segments, usage.bytes), (3, 3 * MIB2));
    // The flusher was asked to sync everything appended.
    assert_eq!(
        log.shared.meta.load(crate::mem::Slot::SyncRequest),
        positions.appended
    );
    // Retrying while the flusher is stalled keeps failing, and changes nothing.
    for _ in 0..3 {
        let (a, b) = (frame(1, seq, 3000), frame(1, seq + 1, 3000));
        let err = log.append(1, &[&a, &b], seq).unwrap_err();
        assert!(matches!(err, AppendError::LiveMemoryFull { .. }), "{err}");
    }
    assert_eq!(log.positions(), positions);
    // The flusher catches up, but prepares nothing ahead: no room until
    // the writer's next roll releases the synced copies.
    flush_all(&log, &mut flusher);
    assert_eq!(
        live_files(live.path()),
        3,
        "nothing prepared beyond the limit"
    );
    // Caught up: the roll releases the synced copies and appends go on,
    // across several more rolls with the flusher keeping up.
    for _ in 0..2000 {
        let (a, b) = (frame(1, seq, 3000), frame(1, seq + 1, 3000));
        let outcome = log.append(1, &[&a, &b], seq).unwrap();
        assert_eq!(outcome.first_offset, acked.len() as u64);
        acked.extend([a, b]);
        seq += 2;
        if seq.is_multiple_of(64) {
            flush_all(&log, &mut flusher);
        }
        assert!(live_files(live.path()) <= 3);
    }
    assert!(log.active.number >= 6, "rolled on after the stall");
    flush_all(&log, &mut flusher);
    let read: Vec<Vec<u8>> = read_all(&mut log, 1, 0)
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    assert_eq!(read.len(), acked.len());
    assert!(read == acked, "every acknowledged frame, once, in order");
    drop(flusher);
    drop(log);
    let (mut log, _) = ShardLog::open(shm_config(dir.path(), live.path())).unwrap();
    let read = read_all(&mut log, 1, 0);
    assert_eq!(read.len(), acked.len());
    assert!(read.iter().map(|(_, bytes)| bytes).eq(acked.iter()));
}
