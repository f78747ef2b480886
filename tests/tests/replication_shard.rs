//! Stream data replication in one process over loopback TCP: a leader
//! shard log and two followers, each with its own `ShardLog` in a temporary
//! directory. Quorum positions advance with 2 of 3, not with 1 of 3;
//! followers hold the leader's records at the same positions; a restarted
//! follower catches up; a divergent tail is truncated; a shard acknowledges
//! a `replicated` frame only once the quorum has it.

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use kaelix_controlplane::replication::{
    FollowerConfig, LeaderShard, ReplicaFollower, ReplicationConfig, ReplicationLeader,
};
use kaelix_dataplane::flow::FlowTable;
use kaelix_dataplane::{
    Shard, ShardConfig, ShardCounters, ShardLinks, SocketBackend, SocketConfig,
};
use kaelix_protocol::{
    Datagram, DatagramBuilder, FrameFields, FrameKind, HEADER_LEN, MAX_DATAGRAM_LEN, encode_frame,
};
use kaelix_storage::{DurabilityLevel, Flusher, LiveMemory, LogConfig, ShardLog, StreamConfig};

const STREAM: u32 = 5;
const SEGMENT: u64 = 2 * 1024 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn config(dir: &Path) -> LogConfig {
    LogConfig {
        segment_size_bytes: SEGMENT,
        live_memory: LiveMemory::Anonymous,
        shared: false,
        populate: false,
        ..LogConfig::new(dir)
    }
}

fn streams() -> Vec<(u32, StreamConfig)> {
    vec![(
        STREAM,
        StreamConfig {
            durability: DurabilityLevel::Replicated,
        },
    )]
}

fn open_leader(dir: &Path) -> ShardLog {
    let (mut log, _) = ShardLog::open(config(dir)).unwrap();
    for (id, stream) in streams() {
        if log.stream_info(id).is_none() {
            log.create_stream(id, stream).unwrap();
        }
    }
    log
}

fn frame(seq: u64, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..len).map(|i| (seq as usize * 7 + i) as u8).collect();
    let mut buf = vec![0u8; HEADER_LEN + len];
    encode_frame(&mut buf, &FrameFields::data(STREAM, 1, seq, seq), &payload).unwrap();
    buf
}

/// Append `batches` batches of 16 frames of 1 KiB; returns the end position.
fn append(log: &mut ShardLog, seq: &mut u64, batches: usize) -> u64 {
    let mut end = 0;
    for _ in 0..batches {
        let frames: Vec<Vec<u8>> = (0..16)
            .map(|_| {
                *seq += 1;
                frame(*seq, 1024)
            })
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        end = log.append(STREAM, &refs, *seq).unwrap().end_position;
    }
    end
}

fn flush_all(log: &ShardLog, flusher: &mut Flusher) {
    let mut now = 1u64 << 40;
    while flusher.positions().synced < log.positions().appended {
        now += 1 << 30;
        flusher.poll(now).unwrap();
    }
}

/// The leader's flusher on a thread, polled until stopped.
struct FlushThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Flusher>>,
}

impl FlushThread {
    fn start(mut flusher: Flusher) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                flusher.poll(start.elapsed().as_nanos() as u64).unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
            flusher
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Flusher {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.take().unwrap().join().unwrap()
    }
}

fn replication() -> ReplicationConfig {
    ReplicationConfig {
        // Small chunks: many DATA frames per segment.
        chunk_bytes: 64 * 1024,
        reconnect_delay: Duration::from_millis(20),
        ..ReplicationConfig::default()
    }
}

async fn follower(node_id: u64, dir: &Path, leader: SocketAddr) -> ReplicaFollower {
    ReplicaFollower::start(
        FollowerConfig {
            node_id,
            shard: 0,
            leader,
            log: config(dir),
            streams: streams(),
        },
        replication(),
    )
    .await
    .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Segment files, records compared byte for byte; the segment header's
/// creation time (and its CRC) left out: a follower's segment made fresh by
/// opening its log has time 0 where the leader's roll stamped its clock.
fn segment_records(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .map(|path| {
            let mut bytes = fs::read(&path).unwrap();
            bytes[8..12].fill(0);
            bytes[32..64].fill(0);
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
            )
        })
        .collect();
    files.sort();
    files
}

/// Frames of the stream readable below `limit`.
fn readable(log: &mut ShardLog, limit: u64) -> u64 {
    let mut reader = log.reader();
    let mut next = 0;
    loop {
        let batch = reader.read(STREAM, next, 1 << 20, limit).unwrap();
        let mut count = 0;
        for record in batch {
            record.unwrap();
            count += 1;
        }
        if count == 0 {
            return next;
        }
        next += count;
    }
}

/// The leader's log of shard 0 in `dir`, its flusher thread, and a
/// replication leader serving it to followers 2 and 3 on a free port.
async fn lead_shard_0(dir: &Path) -> (ShardLog, FlushThread, ReplicationLeader) {
    let log = open_leader(dir);
    let flusher = FlushThread::start(log.flusher().unwrap());
    let leader = ReplicationLeader::start(
        "127.0.0.1:0".parse().unwrap(),
        vec![LeaderShard::new(0, &log, &[2, 3])],
        replication(),
    )
    .await
    .unwrap();
    (log, flusher, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_commits_with_a_quorum_and_followers_catch_up() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut log, flusher, leader) = lead_shard_0(dirs[0].path()).await;
    let addr = leader.local_addr();
    let mut f2 = Some(follower(2, dirs[1].path(), addr).await);
    let mut f3 = Some(follower(3, dirs[2].path(), addr).await);

    // Three segments' worth, with both followers: all committed, everywhere.
    let mut seq = 0;
    let end = append(&mut log, &mut seq, 300);
    wait_until("quorum commit", || {
        log.durable_position(DurabilityLevel::Replicated) >= end
    })
    .await;
    wait_until("both followers", || {
        [&f2, &f3]
            .iter()
            .all(|f| f.as_ref().unwrap().status().appended == end)
    })
    .await;
    wait_until("quorum fsync", || {
        log.durable_position(DurabilityLevel::ReplicatedFsync) >= end
    })
    .await;
    let limit = log.positions().replicated;
    assert_eq!(readable(&mut log, limit), seq);

    // One follower down: 2 of 3 still commit.
    f3.take().unwrap().shutdown().await.unwrap();
    let end = append(&mut log, &mut seq, 40);
    wait_until("commit with 2 of 3", || {
        log.durable_position(DurabilityLevel::Replicated) >= end
    })
    .await;

    // Both down: the leader alone is no quorum, and consumers capped at
    // the commit position do not see the new data.
    f2.take().unwrap().shutdown().await.unwrap();
    let committed = log.durable_position(DurabilityLevel::Replicated);
    let committed_seq = seq;
    let end = append(&mut log, &mut seq, 40);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        log.durable_position(DurabilityLevel::Replicated),
        committed,
        "no quorum, no commit"
    );
    assert!(log.positions().appended == end && end > committed);
    let limit = log.positions().replicated;
    assert_eq!(readable(&mut log, limit), committed_seq);
    assert_eq!(readable(&mut log, u64::MAX), seq);

    // A follower restarted from its directory catches up (its last segment
    // was sealed by its own recovery: dropped and received again); the
    // commit moves with it.
    let f2_again = follower(2, dirs[1].path(), addr).await;
    wait_until("restarted follower commits", || {
        log.durable_position(DurabilityLevel::Replicated) >= end
    })
    .await;
    assert!(
        f2_again.status().truncations >= 1,
        "{:?}",
        f2_again.status()
    );
    let f3_again = follower(3, dirs[2].path(), addr).await;
    let end = append(&mut log, &mut seq, 100);
    wait_until("all caught up", || {
        f2_again.status().appended == end && f3_again.status().appended == end
    })
    .await;
    wait_until("followers learned the commit", || {
        f2_again.status().commit == end && f3_again.status().commit == end
    })
    .await;
    // The leader learns a follower's position from its ACK, which can still
    // be on the way when the follower's own status shows the append.
    wait_until("the leader saw every follower's ACK", || {
        leader
            .progress(0)
            .unwrap()
            .iter()
            .all(|p| p.connected && p.appended == end)
    })
    .await;
    assert!(leader.progress(1).is_none());

    f2_again.shutdown().await.unwrap();
    f3_again.shutdown().await.unwrap();
    leader.shutdown().await;
    let mut flusher = flusher.stop();
    flush_all(&log, &mut flusher);
    let leader_records = segment_records(dirs[0].path());
    assert!(leader_records.len() >= 4);
    for dir in &dirs[1..] {
        assert!(
            segment_records(dir.path()) == leader_records,
            "a follower's segments differ from the leader's"
        );
    }
    // A follower's log reopened on its own serves the same stream.
    drop((log, flusher));
    let (mut replica, _) = ShardLog::open(config(dirs[1].path())).unwrap();
    assert_eq!(readable(&mut replica, u64::MAX), seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_divergent_follower_tail_is_truncated_first() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // The follower's log holds data the leader never had (another leader's
    // uncommitted tail): same stream, other bytes, further than the leader.
    {
        let (mut other, _) = ShardLog::open(config(dirs[1].path())).unwrap();
        other.create_stream(STREAM, streams()[0].1).unwrap();
        let mut other_seq = 1_000_000;
        append(&mut other, &mut other_seq, 150);
    }
    let mut log = open_leader(dirs[0].path());
    let flusher = FlushThread::start(log.flusher().unwrap());
    let mut seq = 0;
    append(&mut log, &mut seq, 20);
    let leader = ReplicationLeader::start(
        "127.0.0.1:0".parse().unwrap(),
        vec![LeaderShard::new(0, &log, &[2])],
        replication(),
    )
    .await
    .unwrap();
    let f2 = follower(2, dirs[1].path(), leader.local_addr()).await;
    let end = append(&mut log, &mut seq, 100);
    wait_until("follower replaced its tail", || f2.status().appended == end).await;
    assert!(f2.status().truncations >= 1);
    f2.shutdown().await.unwrap();
    leader.shutdown().await;
    let mut flusher = flusher.stop();
    flush_all(&log, &mut flusher);
    assert!(segment_records(dirs[1].path()) == segment_records(dirs[0].path()));
}

#[test]
fn a_replicated_frame_is_acked_only_once_the_quorum_has_it() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let log = open_leader(dirs[0].path());
    let leader_shard = LeaderShard::new(0, &log, &[2, 3]);
    let commit = log.commit_positions();
    let backend =
        SocketBackend::bind("127.0.0.1:0".parse().unwrap(), &SocketConfig::default()).unwrap();
    let broker = backend.local_addr().unwrap();
    let (_commands, rx) = crossbeam_channel::bounded(8);
    let mut shard = Shard::new(
        0,
        backend,
        log,
        FlowTable::new(16, 16),
        &ShardConfig::default(),
        ShardLinks {
            commands: rx,
            stop: Arc::new(AtomicBool::new(false)),
            counters: Arc::new(ShardCounters::default()),
        },
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let leader = runtime
        .block_on(ReplicationLeader::start(
            "127.0.0.1:0".parse().unwrap(),
            vec![leader_shard],
            replication(),
        ))
        .unwrap();
    assert!(commit.is_attached());

    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let send = |seq: u64| {
        let mut out = vec![0u8; MAX_DATAGRAM_LEN];
        let mut builder = DatagramBuilder::new(&mut out);
        builder
            .push(&FrameFields::data(STREAM, 9, seq, seq), b"replicate me")
            .unwrap();
        client.send_to(builder.as_bytes(), broker).unwrap();
    };
    // Poll the shard until an ACK arrives or `limit` passes; its (seq, level).
    let mut ack = |shard: &mut Shard<SocketBackend, ShardLog>, limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            shard.poll_once().unwrap();
            if let Ok(n) = client.recv(&mut buf) {
                let frame = Datagram::new(&buf[..n]).frames().next().unwrap().unwrap();
                assert_eq!(frame.kind(), FrameKind::Ack);
                let body = frame.ack().unwrap();
                return Some((frame.sequence(), body.level));
            }
        }
        None
    };

    // No follower yet: appended, not acknowledged.
    send(1);
    assert_eq!(ack(&mut shard, Duration::from_millis(300)), None);
    let appended = shard.sink().positions().appended;
    assert!(commit.positions().replicated < appended);
    // One follower makes a quorum of two: now it is.
    let f2 = runtime.block_on(follower(2, dirs[1].path(), leader.local_addr()));
    assert_eq!(
        ack(&mut shard, WAIT),
        Some((1, DurabilityLevel::Replicated as u8))
    );
    assert!(commit.positions().replicated >= appended);
    // And the next one too, while the follower runs.
    send(2);
    assert_eq!(
        ack(&mut shard, WAIT),
        Some((2, DurabilityLevel::Replicated as u8))
    );
    // Follower gone: the next frame waits again.
    runtime.block_on(f2.shutdown()).unwrap();
    send(3);
    assert_eq!(ack(&mut shard, Duration::from_millis(300)), None);
    let f3 = runtime.block_on(follower(3, dirs[2].path(), leader.local_addr()));
    assert_eq!(
        ack(&mut shard, WAIT),
        Some((3, DurabilityLevel::Replicated as u8))
    );
    runtime.block_on(f3.shutdown()).unwrap();
    runtime.block_on(leader.shutdown());
}

/// Simulation seeds 25 and 161 (`controlplane/src/replication/sim_tests.rs`):
/// a restarted follower told to truncate drops segments it acknowledged,
/// and its old ACK must stop counting; otherwise the leader later commits
/// (with another follower's ACK, or once its lease is renewed) records that
/// only it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_told_to_truncate_no_longer_counts_at_its_old_position() {
    use kaelix_controlplane::replication::{ask_plan, wire::Plan};
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut log, flusher, leader) = lead_shard_0(dirs[0].path()).await;
    let addr = leader.local_addr();
    let f2 = follower(2, dirs[1].path(), addr).await;
    let mut seq = 0;
    let end = append(&mut log, &mut seq, 200);
    let acked = |leader: &ReplicationLeader| {
        leader
            .progress(0)
            .unwrap()
            .iter()
            .find(|p| p.node_id == 2)
            .unwrap()
            .appended
    };
    wait_until("the leader saw follower 2's ACK", || acked(&leader) == end).await;
    f2.shutdown().await.unwrap();
    // Restarted: its recovery sealed its last segment, which proves nothing.
    let tail = ShardLog::open(config(dirs[1].path()))
        .unwrap()
        .0
        .replica_tail();
    let Plan::Truncate(segment) = ask_plan(addr, 0, 2, tail).await.unwrap() else {
        panic!("a log ending in a recovery seal is truncated");
    };
    assert!(segment * SEGMENT < end, "it drops records it acknowledged");
    assert!(
        acked(&leader) <= segment * SEGMENT,
        "follower 2 still counts at {} after being told to drop segment {segment} on",
        acked(&leader)
    );
    leader.shutdown().await;
    drop(flusher.stop());
}
