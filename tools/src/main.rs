//! `kaelix`: the MemoryStreamer operator CLI.
#![forbid(unsafe_code)]

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kaelix_protocol::{Datagram, DatagramBuilder, MAX_DATAGRAM_LEN};

mod admin;
mod bench;
mod cluster;
mod serve;

mod consume;
mod produce;

/// MemoryStreamer operator CLI.
#[derive(Parser)]
#[command(name = "kaelix", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker (socket backend on the embedded defaults unless configured).
    ///
    /// Examples:
    ///   kaelix serve
    ///   kaelix serve --config /etc/kaelix/broker.toml
    ///   kaelix serve --data-dir /var/lib/kaelix --data-addr 127.0.0.1:7100
    ///   KAELIX__STORAGE__RETENTION_MIB=4096 kaelix serve --set log.level=debug
    #[command(verbatim_doc_comment)]
    Serve(serve::ServeArgs),
    /// Send lines of stdin (or whole files) to a stream and wait for the acknowledgements.
    ///
    /// Examples:
    ///   printf 'one\ntwo\n' | kaelix produce --broker 127.0.0.1:7000 --stream 1
    ///   kaelix produce --stream 1 --file report.json --durability-wait fsync
    #[command(verbatim_doc_comment)]
    Produce(produce::ProduceArgs),
    /// Print a stream's messages, over the fetch port or from the local log.
    ///
    /// Examples:
    ///   kaelix consume --fetch 127.0.0.1:7001 --stream 1
    ///   kaelix consume --fetch 127.0.0.1:7001 --stream 1 --from latest --follow
    ///   kaelix consume --local /var/lib/kaelix --stream 1 --count 10
    #[command(verbatim_doc_comment)]
    Consume(consume::ConsumeArgs),
    /// Create, delete, list and describe streams on a running broker.
    Stream(admin::StreamArgs),
    /// The running broker's health, shards, XDP and pending configuration.
    Broker(admin::BrokerArgs),
    /// Get, set, reload or check the configuration.
    Config(admin::ConfigArgs),
    /// Form and inspect a cluster of brokers: init, join, leave, status.
    Cluster(cluster::ClusterArgs),
    /// Producer load against a running broker: throughput and produce->ack latency.
    ///
    /// Examples:
    ///   kaelix bench --duration 10 --message-size 64
    ///   kaelix bench --rate 200000 --durability fsync --json
    ///   kaelix bench --sender af-xdp --xdp-interface veth0 --broker 10.0.0.2:7000
    #[command(verbatim_doc_comment)]
    Bench(bench::BenchArgs),
    /// Encode frames into one datagram, send it over loopback UDP to ourselves,
    /// decode and verify every frame, and print what arrived.
    ProtocolDemo {
        /// Number of frames to pack into the datagram.
        #[arg(long, default_value_t = 8)]
        frames: u64,
    },
}

fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Serve(args) => serve::run(args),
        Command::Produce(args) => produce::run(args),
        Command::Consume(args) => consume::run(args),
        Command::Stream(args) => admin::stream(args),
        Command::Broker(args) => admin::broker(args),
        Command::Config(args) => admin::config(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Bench(args) => bench::run(args),
        Command::ProtocolDemo { frames } => protocol_demo(frames),
    }
}

/// Human logs on stderr; `KAELIX_LOG` (or `RUST_LOG`) sets the filter,
/// `KAELIX_LOG_FORMAT=json` switches to JSON lines; `kaelix serve` then
/// applies the configuration's `[log]` and changes the filter on reload.
fn init_logging() {
    kaelix_controlplane::logging::init_from_env();
}

fn protocol_demo(frames: u64) -> anyhow::Result<()> {
    let rx = UdpSocket::bind("127.0.0.1:0").context("binding the receiving socket")?;
    rx.set_read_timeout(Some(Duration::from_secs(2)))?;
    let tx = UdpSocket::bind("127.0.0.1:0").context("binding the sending socket")?;
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    let mut builder = DatagramBuilder::new(&mut buf);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    for seq in 1..=frames {
        let payload = format!("message {seq}");
        builder
            .push_data(1, 42, seq, now, payload.as_bytes())
            .with_context(|| format!("frame {seq} does not fit in one datagram"))?;
    }
    let sent = tx.send_to(builder.as_bytes(), rx.local_addr()?)?;
    println!("sent one datagram of {sent} bytes carrying {frames} frames");
    let mut recv = vec![0u8; MAX_DATAGRAM_LEN];
    let (len, from) = rx
        .recv_from(&mut recv)
        .context("waiting for the datagram")?;
    let mut count = 0;
    for frame in Datagram::new(&recv[..len]).frames() {
        let frame = frame.context("decoding a frame")?;
        println!(
            "  stream {} producer {} seq {:>3} crc ok  {:?}",
            frame.stream_id(),
            frame.producer_id(),
            frame.sequence(),
            String::from_utf8_lossy(frame.payload())
        );
        count += 1;
    }
    if count != frames {
        bail!("expected {frames} frames from {from}, decoded {count}");
    }
    println!("all {count} frames decoded and verified");
    Ok(())
}
