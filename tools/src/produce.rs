//! `kaelix produce`: send lines of stdin, or whole files, to a stream.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kaelix_client::{FailedMessage, Producer};
use kaelix_protocol::DurabilityLevel;

/// Arguments of `kaelix produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The broker's UDP data address (shard 0's port when it runs several shards).
    #[arg(long, default_value = "127.0.0.1:7000")]
    broker: SocketAddr,
    /// Stream to write to.
    #[arg(long)]
    stream: u32,
    /// Producer id (default: random). Reuse one only after the previous
    /// producer with it finished.
    #[arg(long)]
    producer_id: Option<u32>,
    /// Fail unless the broker acknowledged at least at this level
    /// (memory, flush or fsync; the stream's durability decides the level).
    #[arg(long, value_name = "LEVEL", default_value = "memory")]
    durability_wait: DurabilityLevel,
    /// Send this file's whole content as one message (repeatable). Without
    /// it, every line of stdin is a message.
    #[arg(long = "file", value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Data-plane shards of the broker: stream s goes to port + s % shards.
    #[arg(long, default_value_t = 1)]
    shards: u16,
    /// Largest datagram, bytes (1472 fits a 1500 MTU; up to 65507 on loopback).
    #[arg(long, default_value_t = kaelix_client::producer::DATAGRAM_LEN_DEFAULT)]
    datagram_bytes: usize,
    /// How long to wait for the acknowledgement of everything sent, seconds.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
}

/// Rejections printed before the rest are only counted.
const REJECTIONS_SHOWN: usize = 10;

/// Run `kaelix produce`: on failure, print one line to stderr and exit with status 1.
pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    if let Err(err) = produce(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let mut builder = Producer::builder(args.broker)
        .datagram_len_max(args.datagram_bytes)
        .shards(args.shards);
    if let Some(producer_id) = args.producer_id {
        builder = builder.producer_id(producer_id);
    }
    let producer = builder
        .connect()
        .with_context(|| format!("cannot start a producer for {}", args.broker))?;
    let started = Instant::now();
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let mut send = |payload: &[u8]| -> anyhow::Result<()> {
        producer
            .send(args.stream, payload)
            .with_context(|| format!("message {} not sent", messages + 1))?;
        messages += 1;
        bytes += payload.len() as u64;
        Ok(())
    };
    if args.files.is_empty() {
        let stdin = std::io::stdin();
        let mut line = Vec::new();
        let mut input = stdin.lock();
        loop {
            line.clear();
            if input
                .read_until(b'\n', &mut line)
                .context("reading stdin")?
                == 0
            {
                break;
            }
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            send(text.strip_suffix(b"\r").unwrap_or(text))?;
        }
    } else {
        for path in &args.files {
            let content =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            send(&content).with_context(|| format!("file {}", path.display()))?;
        }
    }
    let timeout = Duration::from_secs(args.timeout_secs);
    producer.flush(timeout)?;
    let elapsed = started.elapsed();
    let rejected = producer.take_errors();
    report_rejections(&rejected, producer.errors_dropped());
    let acked = messages - rejected.len() as u64 - producer.errors_dropped();
    let ack = producer.flow_ack(args.stream);
    let level = ack.map_or(DurabilityLevel::Memory, |ack| ack.level);
    let offset = ack
        .and_then(|ack| ack.offset)
        .map_or_else(|| "-".to_string(), |offset| offset.to_string());
    eprintln!(
        "sent {messages} message{} ({bytes} bytes) to stream {} in {:.1} ms as producer {}: {acked} acknowledged at level {level}, last offset {offset}{}",
        if messages == 1 { "" } else { "s" },
        args.stream,
        elapsed.as_secs_f64() * 1000.0,
        producer.producer_id(),
        if rejected.is_empty() {
            String::new()
        } else {
            format!(", {} rejected", messages - acked)
        },
    );
    if acked < messages {
        bail!(
            "the broker rejected {} of {messages} messages",
            messages - acked
        );
    }
    if messages > 0 && level < args.durability_wait {
        bail!(
            "acknowledged at level {level}, but --durability-wait asks for {} (the stream's durability decides the level)",
            args.durability_wait
        );
    }
    Ok(())
}

fn report_rejections(rejected: &[FailedMessage], dropped: u64) {
    for failed in rejected.iter().take(REJECTIONS_SHOWN) {
        eprintln!(
            "rejected: message {} (sequence {}): {}",
            failed.ticket.number,
            failed
                .sequence
                .map_or_else(|| "-".to_string(), |sequence| sequence.to_string()),
            failed.code
        );
    }
    let more = rejected.len().saturating_sub(REJECTIONS_SHOWN) as u64 + dropped;
    if more > 0 {
        eprintln!("rejected: {more} more");
    }
}
