//! `kaelix consume`: print a stream's messages, remotely or from the local log.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use kaelix_client::{Consumer, ConsumerConfig, Record, StartOffset};

/// Arguments of `kaelix consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// The broker's TCP fetch address (default 127.0.0.1:7001).
    #[arg(long, conflicts_with = "local")]
    fetch: Option<SocketAddr>,
    /// Read the broker's log on this host directly from its data directory
    /// (needs the broker's `storage.shared` setting), instead of `--fetch`.
    #[arg(long, value_name = "DATA_DIR")]
    local: Option<PathBuf>,
    /// Stream to read.
    #[arg(long)]
    stream: u32,
    /// Where to start: an offset, `earliest` or `latest`.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    from: StartOffset,
    /// Keep waiting for new messages instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// What to print per message.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// `offset<TAB>payload`.
    Text,
    /// The payload alone.
    Raw,
    /// `offset<TAB>producer_id<TAB>sequence<TAB>timestamp_ns<TAB>payload`.
    Meta,
}

fn parse_start(text: &str) -> Result<StartOffset, String> {
    match text {
        "earliest" => Ok(StartOffset::Earliest),
        "latest" => Ok(StartOffset::Latest),
        offset => offset
            .parse()
            .map(StartOffset::At)
            .map_err(|_| format!("{offset:?} is not an offset, `earliest` or `latest`")),
    }
}

/// The broker's default fetch address.
const DEFAULT_FETCH: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 7001);
/// Records asked for per poll.
const POLL_RECORDS: usize = 1024;
/// How long one poll waits in follow mode before polling again.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);

/// Run `kaelix consume`: on failure, print one line to stderr and exit with status 1.
pub fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    if let Err(err) = consume(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
    Ok(())
}

fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut config = ConsumerConfig::new(args.stream);
    config.start = args.from;
    config.wait = if args.follow {
        FOLLOW_WAIT
    } else {
        Duration::ZERO
    };
    let mut consumer = match &args.local {
        Some(dir) => Consumer::local(dir, config)?,
        None => {
            let addr = args.fetch.unwrap_or(DEFAULT_FETCH);
            Consumer::remote(addr, config)?
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    while printed < limit {
        let want = (limit - printed).min(POLL_RECORDS as u64) as usize;
        let mut batch = 0;
        for record in consumer.poll(want)? {
            print_record(&mut out, args.format, &record?)?;
            batch += 1;
        }
        printed += batch;
        if flush_output(&mut out)? {
            return Ok(());
        }
        if batch == 0 && !args.follow {
            let (_, end) = consumer.watermarks()?;
            if consumer.position() >= end {
                break;
            }
            // Appended but not yet durable at the stream's level: look again shortly.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if consumer.skipped() > 0 {
        eprintln!(
            "skipped {} messages removed by retention",
            consumer.skipped()
        );
    }
    Ok(())
}

/// Write one record; a closed stdout (`| head`) ends the program quietly.
fn print_record(out: &mut impl Write, format: Format, record: &Record<'_>) -> anyhow::Result<()> {
    let written = match format {
        Format::Text => write!(out, "{}\t", record.offset),
        Format::Raw => Ok(()),
        Format::Meta => write!(
            out,
            "{}\t{}\t{}\t{}\t",
            record.offset, record.producer_id, record.sequence, record.timestamp_ns
        ),
    }
    .and_then(|()| out.write_all(record.payload))
    .and_then(|()| out.write_all(b"\n"));
    match written {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => Ok(other.context("writing to stdout")?),
    }
}

/// Flush stdout; true when the reader went away.
fn flush_output(out: &mut impl Write) -> anyhow::Result<bool> {
    match out.flush() {
        Ok(()) => Ok(false),
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(err) => Err(err).context("writing to stdout"),
    }
}
