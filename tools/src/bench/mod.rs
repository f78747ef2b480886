//! `kaelix bench`: producer load against a running broker, with throughput
//! and produce→ack latency percentiles.
//!
//! Each producer is a thread with its own kaelix-client [`ProducerState`]
//! (handshake, sequences, batching, credit window, retransmission) and its
//! own sender: a kernel UDP socket (GSO sends, `recvmmsg`) or the data
//! plane's AF_XDP socket used from the client side. Latency goes into one
//! HdrHistogram per thread; the histograms are merged after the run. A
//! progress bar runs on stderr when it is a terminal; the result is a table,
//! or JSON with `--json`.
//!
//! With `--fetch ADDR` one remote consumer per stream (kaelix-client's TCP
//! fetch consumer) reads what the producers write and end-to-end
//! (produce→consume) latency is measured too: every frame carries its
//! intended send time, on the benchmark's clock. With `--local DATA_DIR`
//! (on the broker's host) one local consumer per stream follows the broker's
//! log through its shared-memory mapping instead of fetching, and
//! produce→visible latency is measured the same way; both options together
//! compare the two consumers on the same messages.
//!
//! With `--brokers` the producers drive a cluster: each starts at
//! `--broker`, follows `not_leader` redirects to its shards' leaders and
//! rotates through the brokers when a destination is silent or knows no
//! leader (kaelix-client's routes, as `ProducerBuilder::brokers`). The
//! report then names each stream's final destination, the producers'
//! redirects and rotations, and the longest silence between ACKs with its
//! end on the wall clock, so a script that kills a shard leader can compute
//! the time from the kill to the first ACK of the new leader.

mod consume;
mod load;
mod report;
mod socket;
mod xdp;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{ArgAction, Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kaelix_client::producer::Routes;
use kaelix_client::{ProducerConfig, ProducerState};
use kaelix_protocol::DurabilityLevel;

use load::{Link, Plan, ProducerReport, Progress};
pub use report::Summary;

/// Which sender moves the datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SenderKind {
    /// Kernel UDP socket: GSO sends and recvmmsg (quinn-udp), one per producer.
    Socket,
    /// AF_XDP socket on `--xdp-interface` (root; one producer).
    AfXdp,
}

impl SenderKind {
    fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::AfXdp => "af_xdp",
        }
    }
}

/// Options of `kaelix bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The broker's UDP data address (shard 0).
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub broker: SocketAddr,
    /// The other brokers of a cluster (their UDP data addresses, shard 0),
    /// comma-separated: producers start at --broker, follow `not_leader`
    /// redirects to each shard's leader and move to the next broker of
    /// --broker,--brokers when theirs is silent (socket sender only).
    #[arg(long, value_delimiter = ',')]
    pub brokers: Vec<SocketAddr>,
    /// Data-plane shards of the broker: stream s is sent to port + s % shards.
    #[arg(long, default_value_t = 1)]
    pub shards: u16,
    /// Payload bytes per message (each frame adds a 40-byte header).
    #[arg(long, default_value_t = 64)]
    pub message_size: usize,
    /// Producer threads, each with its own socket and producer id.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Streams to write, round robin (comma-separated). Default: the stream
    /// of --durability in the broker's default configuration.
    #[arg(long, value_delimiter = ',')]
    pub streams: Vec<u32>,
    /// Durability level to measure; picks stream 1 (memory), 2 (flush) or 3
    /// (fsync) of the default configuration unless --streams is given.
    #[arg(long, default_value = "memory")]
    pub durability: DurabilityLevel,
    /// Most frames per datagram.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Largest datagram in bytes (default 1472; with af-xdp the interface MTU - 28).
    #[arg(long)]
    pub datagram_size: Option<usize>,
    /// How long a message may wait for others to fill its datagram, microseconds.
    #[arg(long, default_value_t = 0)]
    pub linger_us: u64,
    /// Unacknowledged messages per producer at most.
    #[arg(long, default_value_t = 8192)]
    pub inflight: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop offering after this many messages in all (split among the
    /// producers, warm-up included); the window then ends with the last ACK.
    #[arg(long)]
    pub count: Option<u64>,
    /// Warm-up seconds: sent and acknowledged, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Fixed rate in messages per second (all producers together). Latency
    /// is then measured from each message's intended send time, so a
    /// stalled broker is not hidden (coordinated omission corrected).
    /// Default: as fast as the in-flight limit and the credit window allow.
    #[arg(long)]
    pub rate: Option<f64>,
    /// The sender.
    #[arg(long, value_enum, default_value_t = SenderKind::Socket)]
    pub sender: SenderKind,
    /// Batch datagrams into UDP GSO sends (socket sender).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub gso: bool,
    /// Pin producer i to cpu CPUS[i % len] (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub cpus: Vec<usize>,
    /// AF_XDP sender: interface to send on.
    #[arg(long)]
    pub xdp_interface: Option<String>,
    /// AF_XDP sender: the broker's MAC address (default: from the ARP table).
    #[arg(long, value_parser = xdp::mac_from_str)]
    pub xdp_broker_mac: Option<[u8; 6]>,
    /// AF_XDP sender: our UDP port (the XDP program steers ACKs sent to it).
    #[arg(long, default_value_t = 7100)]
    pub xdp_local_port: u16,
    /// The broker's TCP fetch address: also consume every stream written
    /// (one remote consumer each) and measure produce->consume latency.
    #[arg(long)]
    pub fetch: Option<SocketAddr>,
    /// The broker's data directory on this host (`kaelix serve --data-dir`):
    /// also follow every stream written through the shared-memory mapping
    /// of the broker's log (one kaelix-client local consumer each, records
    /// served once durable at --durability) and measure produce->visible
    /// latency. With --fetch too, both consumers read the same messages.
    #[arg(long)]
    pub local: Option<PathBuf>,
    /// Local consumers poll without waiting (a busy loop on a cpu each)
    /// instead of the client's wait when caught up (64 spins, then 100 us
    /// naps).
    #[arg(long, requires = "local")]
    pub local_spin: bool,
    /// Seconds to wait for outstanding ACKs after the last message.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// A label for the report (scripts use it to tell runs apart).
    #[arg(long)]
    pub label: Option<String>,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The stream of `level` in the embedded default configuration (which has
/// no replicated streams: those are named with `--stream`).
fn default_stream(level: DurabilityLevel) -> u32 {
    match level {
        DurabilityLevel::Memory | DurabilityLevel::Replicated => 1,
        DurabilityLevel::Flush => 2,
        DurabilityLevel::Fsync | DurabilityLevel::ReplicatedFsync => 3,
    }
}

fn check(args: &BenchArgs) -> anyhow::Result<()> {
    if args.producers == 0 {
        bail!("--producers must be at least 1");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        bail!("--warmup must be zero or a positive number of seconds");
    }
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate.is_finite())
    {
        bail!("--rate must be a positive number of messages per second");
    }
    if args.count == Some(0) {
        bail!("--count must be at least 1");
    }
    if args.inflight == 0 {
        bail!("--inflight must be at least 1");
    }
    if args.sender == SenderKind::AfXdp {
        if args.xdp_interface.is_none() {
            bail!("--sender af-xdp needs --xdp-interface");
        }
        if args.producers != 1 {
            bail!("--sender af-xdp runs one producer (one AF_XDP socket on queue 0)");
        }
        if !args.brokers.is_empty() {
            bail!("--brokers needs --sender socket (the AF_XDP sender talks to one broker)");
        }
    }
    Ok(())
}

/// Run the benchmark and print its result.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let summary = measure(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary.to_json())?);
    } else {
        print!("{}", summary.table());
    }
    for warning in summary.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// Run the benchmark; the figures, not printed.
pub fn measure(args: &BenchArgs) -> anyhow::Result<Summary> {
    check(args)?;
    let streams = if args.streams.is_empty() {
        vec![default_stream(args.durability)]
    } else {
        args.streams.clone()
    };

    // Links first: their set-up (XDP attach, ARP) is not measured.
    let mut links: Vec<Box<dyn Link + Send>> = Vec::with_capacity(args.producers);
    let mut sender_detail = String::new();
    let datagram_len = match args.sender {
        SenderKind::Socket => {
            let datagram_len = args.datagram_size.unwrap_or(1472);
            for _ in 0..args.producers {
                let link = socket::SocketLink::bind(
                    args.broker,
                    args.shards,
                    datagram_len,
                    args.gso,
                    !args.brokers.is_empty(),
                )
                .context("binding the producer's UDP socket")?;
                sender_detail = format!(
                    "kernel UDP socket, {} datagrams per sendmsg at most (GSO {})",
                    link.max_segments(),
                    if link.max_segments() > 1 { "on" } else { "off" }
                );
                links.push(Box::new(link));
            }
            datagram_len
        }
        SenderKind::AfXdp => {
            let options = xdp::XdpOptions {
                interface: args.xdp_interface.clone().expect("checked"),
                broker: args.broker,
                broker_mac: args.xdp_broker_mac,
                local_port: args.xdp_local_port,
            };
            let link = xdp::XdpLink::open(&options)?;
            let limit = link.datagram_len_max();
            let datagram_len = args.datagram_size.unwrap_or(limit);
            if datagram_len > limit {
                bail!(
                    "--datagram-size {datagram_len} exceeds what the interface carries ({limit} = MTU - 28)"
                );
            }
            sender_detail = link.describe();
            links.push(Box::new(link));
            datagram_len
        }
    };

    let producer_config = |index: usize| ProducerConfig {
        datagram_len_max: datagram_len,
        batch_frames_max: args.batch.max(1),
        linger: Duration::from_micros(args.linger_us),
        buffer_frames_max: args.inflight,
        buffer_bytes_max: (args.inflight * (args.message_size + kaelix_protocol::HEADER_LEN))
            .max(datagram_len),
        producer_id: kaelix_client::producer::random_producer_id()
            .wrapping_add(index as u32)
            .max(1),
        ..ProducerConfig::default()
    };
    let config = producer_config(0);
    config
        .validate()
        .map_err(|err| anyhow::anyhow!("invalid producer settings: {err}"))?;
    if args.message_size > config.payload_len_max() {
        bail!(
            "--message-size {} does not fit a {datagram_len}-byte datagram (at most {})",
            args.message_size,
            config.payload_len_max()
        );
    }

    let routes = if args.brokers.is_empty() {
        None
    } else {
        let mut bootstrap = vec![args.broker];
        bootstrap.extend_from_slice(&args.brokers);
        Some(
            Routes::new(&bootstrap, args.shards)
                .map_err(|err| anyhow::anyhow!("--broker/--brokers: {err}"))?,
        )
    };
    let cores: Vec<ProducerState> = (0..links.len())
        .map(|index| match &routes {
            Some(routes) => ProducerState::with_routes(producer_config(index), routes.clone()),
            None => ProducerState::new(producer_config(index)),
        })
        .collect();
    let producer_ids: Vec<u32> = cores.iter().map(ProducerState::producer_id).collect();
    // (remote?, consumer) for every stream and consumer kind asked for.
    let mut consumers = Vec::new();
    let sources = [
        args.fetch.map(consume::Source::Remote),
        args.local.clone().map(|data_dir| consume::Source::Local {
            data_dir,
            level: args.durability,
            spin: args.local_spin,
        }),
    ];
    for source in sources.iter().flatten() {
        for &stream in &streams {
            let remote = matches!(source, consume::Source::Remote(_));
            consumers.push((remote, consume::connect(source, stream)?));
        }
    }

    let warmup_ns = (args.warmup * 1e9) as u64;
    let end_ns = warmup_ns + (args.duration * 1e9) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    let start_unix_ns = (SystemTime::now() + Duration::from_millis(20))
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    let plan = Plan {
        start,
        message_size: args.message_size,
        streams: streams.clone(),
        rate: args.rate.map(|rate| rate / args.producers as f64),
        warmup_ns,
        end_ns,
        count: args
            .count
            .map(|count| count.div_ceil(args.producers as u64)),
        inflight: args.inflight,
        drain: Duration::from_secs_f64(args.drain.max(0.0)),
        start_unix_ns,
    };
    let progress = Arc::new(Progress::default());
    let producers_done = AtomicBool::new(false);
    let consume_deadline = start
        + Duration::from_nanos(end_ns)
        + Duration::from_secs_f64(args.drain.max(0.0) * 2.0 + 1.0);

    let (reports, consumed) = std::thread::scope(|scope| {
        let consumer_handles: Vec<_> = consumers
            .into_iter()
            .map(|(remote, consumer)| {
                let (plan, ids, done) = (&plan, &producer_ids, &producers_done);
                let handle = scope.spawn(move || {
                    consume::run_consumer(consumer, ids, plan, done, consume_deadline)
                });
                (remote, handle)
            })
            .collect();
        let handles: Vec<_> = links
            .into_iter()
            .zip(cores)
            .enumerate()
            .map(|(index, (mut link, core))| {
                let plan = plan.clone();
                let progress = Arc::clone(&progress);
                let cpu = (!args.cpus.is_empty()).then(|| args.cpus[index % args.cpus.len()]);
                std::thread::Builder::new()
                    .name(format!("kaelix-bench-{index}"))
                    .spawn_scoped(scope, move || {
                        if let Some(cpu) = cpu {
                            kaelix_dataplane::pinning::pin_current_thread(cpu).with_context(
                                || format!("pinning producer {index} to cpu {cpu}"),
                            )?;
                        }
                        while Instant::now() < plan.start {
                            std::hint::spin_loop();
                        }
                        let result = load::run_producer(link.as_mut(), core, &plan, &progress);
                        if result.is_err() {
                            progress
                                .stop
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        result.with_context(|| format!("producer {index}"))
                    })
                    .expect("spawning a producer thread")
            })
            .collect();
        show_progress(&handles, &plan, args, &progress);
        let reports: Vec<anyhow::Result<ProducerReport>> = handles
            .into_iter()
            .map(|handle| match handle.join() {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("a producer thread panicked")),
            })
            .collect();
        producers_done.store(true, Ordering::Release);
        let consumed: Vec<anyhow::Result<(bool, consume::ConsumeReport)>> = consumer_handles
            .into_iter()
            .map(|(remote, handle)| match handle.join() {
                Ok(result) => result.map(|report| (remote, report)).context(if remote {
                    "remote consumer"
                } else {
                    "local consumer"
                }),
                Err(_) => Err(anyhow::anyhow!("a consumer thread panicked")),
            })
            .collect();
        (reports, consumed)
    });
    let reports = reports.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let (remote, local): (Vec<_>, Vec<_>) = consumed
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .partition(|(remote, _)| *remote);
    let reports_of = |consumed: Vec<(bool, consume::ConsumeReport)>| -> Vec<_> {
        consumed.into_iter().map(|(_, report)| report).collect()
    };
    Ok(Summary::new(
        args,
        &streams,
        datagram_len,
        (args.sender.name(), sender_detail),
        &plan,
        reports,
        report::Consumed {
            remote: args.fetch.is_some().then(|| reports_of(remote)),
            local: args.local.is_some().then(|| reports_of(local)),
        },
    ))
}

/// A progress bar on stderr while the producers run (only on a terminal).
fn show_progress<T>(
    handles: &[std::thread::ScopedJoinHandle<'_, T>],
    plan: &Plan,
    args: &BenchArgs,
    progress: &Progress,
) {
    let all_done = || handles.iter().all(|handle| handle.is_finished());
    if !std::io::stderr().is_terminal() {
        while !all_done() {
            std::thread::sleep(Duration::from_millis(50));
        }
        return;
    }
    let total_ms = plan.end_ns / 1_000_000;
    let bar = ProgressBar::new(total_ms);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("constant template")
            .progress_chars("=> "),
    );
    let warmup_ms = plan.warmup_ns / 1_000_000;
    let mut last = (Instant::now(), 0u64);
    while !all_done() {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        let acked = progress.acked.load(Ordering::Relaxed);
        let elapsed_ms = now.saturating_duration_since(plan.start).as_millis() as u64;
        let rate = (acked - last.1.min(acked)) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, acked);
        let phase = if elapsed_ms < warmup_ms {
            "warm-up"
        } else if elapsed_ms < total_ms {
            "measuring"
        } else {
            "draining"
        };
        bar.set_position(elapsed_ms.min(total_ms));
        bar.set_message(format!(
            "{phase}: {} acked, {:.0} msgs/s ({} sender, {} producer(s))",
            acked,
            rate,
            args.sender.name(),
            args.producers
        ));
    }
    bar.finish_and_clear();
}
