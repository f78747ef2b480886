//! Storage benchmarks: append of 64-byte-payload frames in batches of 64 at
//! the memory, flush and fsync levels; read throughput; and the memory an
//! idle stream costs at 1,000,000 streams (printed, measured with a
//! counting allocator).
#![allow(missing_docs)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kaelix_protocol::{FrameFields, HEADER_LEN, encode_frame};
use kaelix_storage::{DurabilityLevel, LiveMemory, LogConfig, ShardLog, StreamConfig};

/// Counts live heap bytes, for the memory-per-stream figure.
struct Counting;

static HEAP: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HEAP.fetch_add(new_size, Ordering::Relaxed);
        HEAP.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BATCH: usize = 64;
const FRAME_LEN: usize = HEADER_LEN + 64;

/// 64 frames of stream `stream` with 64-byte payloads, back to back (one datagram's worth).
fn datagram(stream: u32) -> Vec<u8> {
    let mut buf = vec![0u8; BATCH * FRAME_LEN];
    for i in 0..BATCH {
        let at = i * FRAME_LEN;
        encode_frame(
            &mut buf[at..at + FRAME_LEN],
            &FrameFields::data(stream, 1, i as u64 + 1, 0),
            &[0x5A; 64],
        )
        .unwrap();
    }
    buf
}

fn config(dir: &std::path::Path, segment: u64) -> LogConfig {
    LogConfig {
        segment_size_bytes: segment,
        live_memory: LiveMemory::Anonymous,
        shared: false,
        populate: true,
        // The variant without a flusher keeps every segment live; the limit
        // (a backpressure path) is not what these benchmarks measure.
        live_memory_max_bytes: u64::MAX,
        ..LogConfig::new(dir)
    }
}

fn append_batch(log: &mut ShardLog, stream: u32, frames: &[u8], now: u64) -> u64 {
    let mut batch = log.begin_batch(stream, now).unwrap();
    for frame in frames.chunks_exact(FRAME_LEN) {
        batch.push(frame).unwrap();
    }
    batch.commit().unwrap().end_position
}

/// A flusher polled by its own thread until the returned flag is set.
fn spawn_flusher(log: &ShardLog) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let mut flusher = log.flusher().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let epoch = Instant::now();
    let thread = std::thread::spawn(move || {
        while !stop_flag.load(Ordering::Relaxed) {
            let progress = flusher.poll(epoch.elapsed().as_nanos() as u64).unwrap();
            if progress.is_idle() {
                std::thread::yield_now();
            }
        }
    });
    (stop, thread)
}

/// Memory level, one appending thread. Variants: one big prefaulted segment
/// (the append path alone); 64 MiB segments with rolls creating the next
/// segment on the writer thread (no flusher); 64 MiB segments with a flusher
/// thread that copies to disk and prepares the next segment ahead of the roll.
fn append_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage_append_memory");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(20);
    let frames = datagram(1);
    for (name, segment, flusher) in [
        ("64x64B_no_roll", 0u64, false),
        ("64x64B_64MiB_segments_rolls_on_writer", 64 << 20, false),
        ("64x64B_64MiB_segments_with_flusher", 64 << 20, true),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                // Each sample gets a fresh log, so memory stays bounded.
                let segment = if segment == 0 {
                    (iters * (BATCH * FRAME_LEN) as u64 * 2).next_multiple_of(2 << 20)
                } else {
                    segment
                };
                let (mut log, _) = ShardLog::open(config(dir.path(), segment)).unwrap();
                log.create_stream(1, StreamConfig::default()).unwrap();
                let background = flusher.then(|| spawn_flusher(&log));
                std::thread::sleep(Duration::from_millis(if flusher { 100 } else { 0 }));
                let start = Instant::now();
                for i in 0..iters {
                    black_box(append_batch(&mut log, 1, &frames, i));
                }
                let elapsed = start.elapsed();
                if let Some((stop, thread)) = background {
                    stop.store(true, Ordering::Relaxed);
                    thread.join().unwrap();
                }
                elapsed
            })
        });
    }
    group.finish();
}

/// Flush and fsync levels: append `iters` batches while a flusher thread
/// polls; the time runs until the last batch is durable at the level.
fn append_durable(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage_append_durable");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    let frames = datagram(1);
    for level in [DurabilityLevel::Flush, DurabilityLevel::Fsync] {
        group.bench_function(format!("64x64B_{level}"), |b| {
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().unwrap();
                let cfg = LogConfig {
                    flush_interval_ns: 10_000_000,
                    ..config(dir.path(), 64 << 20)
                };
                let (mut log, _) = ShardLog::open(cfg).unwrap();
                log.create_stream(1, StreamConfig { durability: level })
                    .unwrap();
                let (stop, thread) = spawn_flusher(&log);
                let start = Instant::now();
                let mut end = 0;
                for i in 0..iters {
                    end = append_batch(&mut log, 1, &frames, i);
                }
                while log.durable_position(level) < end {
                    std::thread::yield_now();
                }
                let elapsed = start.elapsed();
                stop.store(true, Ordering::Relaxed);
                thread.join().unwrap();
                elapsed
            })
        });
    }
    group.finish();
}

/// Read throughput: one stream, and 16 interleaved streams.
fn read(c: &mut Criterion) {
    let mut group = c.benchmark_group("storage_read");
    group.sample_size(20);
    const BATCHES: u64 = 20_000;
    for streams in [1u32, 16] {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = ShardLog::open(config(dir.path(), 256 << 20)).unwrap();
        let mut datagrams = Vec::new();
        for stream in 1..=streams {
            log.create_stream(stream, StreamConfig::default()).unwrap();
            datagrams.push(datagram(stream));
        }
        for i in 0..BATCHES {
            let stream = (i % u64::from(streams)) as u32 + 1;
            append_batch(&mut log, stream, &datagrams[stream as usize - 1], i);
        }
        let per_stream = BATCHES / u64::from(streams) * BATCH as u64;
        group.throughput(Throughput::Elements(per_stream));
        let mut reader = log.reader();
        group.bench_function(format!("64B_frames_one_of_{streams}_streams"), |b| {
            b.iter(|| {
                let mut next = 0;
                let mut bytes = 0usize;
                while next < per_stream {
                    let mut batch = reader.read(1, next, 1 << 20, u64::MAX).unwrap();
                    for record in batch.by_ref() {
                        bytes += record.unwrap().bytes.len();
                    }
                    next = batch.next_offset();
                }
                black_box(bytes)
            })
        });
    }
    group.finish();
}

/// Memory per idle stream at 1,000,000 streams, and append cost at that scale.
fn many_streams(c: &mut Criterion) {
    const STREAMS: u32 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = ShardLog::open(config(dir.path(), 256 << 20)).unwrap();
    let before = HEAP.load(Ordering::Relaxed);
    let streams: Vec<(u32, StreamConfig)> = (0..STREAMS)
        .map(|id| (id, StreamConfig::default()))
        .collect();
    log.create_streams(&streams).unwrap();
    drop(streams);
    let registered = HEAP.load(Ordering::Relaxed);
    // Every stream gets one frame, then stays idle.
    let mut frame = [0u8; FRAME_LEN];
    for id in 0..STREAMS {
        encode_frame(&mut frame, &FrameFields::data(id, 1, 1, 0), &[1; 64]).unwrap();
        log.append(id, &[&frame], 0).unwrap();
    }
    let writer = HEAP.load(Ordering::Relaxed);
    let mut reader = log.reader();
    let _ = reader.read(0, 0, 1, u64::MAX).unwrap().count();
    let with_reader = HEAP.load(Ordering::Relaxed);
    let per = |bytes: usize| bytes as f64 / f64::from(STREAMS);
    println!(
        "storage_idle_stream_memory: {STREAMS} streams: registered {:.0} B/stream, with one batch each {:.0} B/stream (writer), \
         shared reader index {:.0} B/stream more; total heap {:.1} MiB; no file or mapping per stream",
        per(registered - before),
        per(writer - before),
        per(with_reader - writer),
        (with_reader - before) as f64 / (1 << 20) as f64
    );
    assert!(
        per(writer - before) <= 1024.0,
        "an idle stream costs more than 1 KiB"
    );

    let mut group = c.benchmark_group("storage_1M_streams");
    group.throughput(Throughput::Elements(1));
    group.sample_size(20);
    let mut i = 0u32;
    group.bench_function("append_1x64B_random_stream", |b| {
        b.iter(|| {
            i = i.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let id = i % STREAMS;
            frame[16..20].copy_from_slice(&id.to_le_bytes());
            // The CRC is not checked on append (the data plane validated the frame).
            let mut batch = log.begin_batch(id, 0).unwrap();
            batch.push(&frame).unwrap();
            black_box(batch.commit().unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, append_memory, append_durable, read, many_streams);
criterion_main!(benches);
