//! Starting and stopping a single-node broker: one log, one busy-poll thread
//! and one flusher thread per shard, plus the TCP fetch server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Sender, bounded};
use kaelix_dataplane::af_xdp::{AfXdpBackend, AfXdpInfo};
use kaelix_dataplane::flow::{FlowKey, FlowTable};
use kaelix_dataplane::pinning::{self, PinPlan};
use kaelix_dataplane::{
    Backend, BackendError, Shard, ShardCounters, ShardLinks, ShardTask, SocketBackend,
};
use kaelix_storage::{Flusher, LogConfig, LogReader, ShardLog, StreamConfig, Syncer};

use crate::config::{BackendKind, Config};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A shard's log could not be opened (recovery refused, bad files, no memory...).
    #[error("shard {shard}: cannot open its log: {source}")]
    Log {
        /// Shard id.
        shard: u32,
        /// The storage error.
        #[source]
        source: kaelix_storage::OpenError,
    },
    /// A configured stream could not be created.
    #[error("shard {shard}: cannot create stream {stream_id}: {message}")]
    Stream {
        /// Shard id.
        shard: u32,
        /// Stream id.
        stream_id: u32,
        /// The storage error.
        message: String,
    },
    /// The core selection cannot be applied.
    #[error("data-plane cores: {source}")]
    Pinning {
        /// The pinning error.
        #[source]
        source: kaelix_dataplane::PinError,
    },
    /// The backend could not start (and fallback was not allowed).
    #[error("shard {shard}: backend: {source}")]
    Backend {
        /// Shard id.
        shard: u32,
        /// The backend error.
        #[source]
        source: kaelix_dataplane::BackendError,
    },
    /// A thread could not be spawned.
    #[error("cannot spawn thread {name}: {source}")]
    Spawn {
        /// Thread name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running shard as the control plane sees it.
pub struct ShardHandle {
    /// Shard id.
    pub id: u32,
    /// Its UDP data address.
    pub data_addr: SocketAddr,
    /// Backend name in use.
    pub backend: &'static str,
    /// The core its thread is pinned to, if any.
    pub cpu: Option<usize>,
    /// Its counters.
    pub counters: Arc<ShardCounters>,
    /// Its hot-reloadable loop settings (credit window, idle strategy).
    pub tunables: Arc<kaelix_dataplane::ShardTunables>,
    /// A reader of its log (clone freely).
    pub reader: LogReader,
    commands: Sender<ShardTask<ShardLog>>,
    stop: Arc<AtomicBool>,
    /// The loop thread hands its log back when it stops, so the log is
    /// dropped only after the flusher wrote and synced everything.
    loop_thread: Option<JoinHandle<(Result<(), kaelix_dataplane::ShardError>, ShardLog)>>,
    flusher_thread: Option<JoinHandle<()>>,
}

impl ShardHandle {
    /// Run `task` on the shard's thread with its log in hand (bounded queue;
    /// fails when the shard is gone or its queue is full).
    pub fn submit(&self, task: ShardTask<ShardLog>) -> Result<(), String> {
        self.commands
            .try_send(task)
            .map_err(|err| format!("shard {} does not take commands: {err}", self.id))
    }

    /// [`ShardHandle::submit`] that hands the task back when the queue is
    /// full (for callers that retry).
    pub fn offer(
        &self,
        task: ShardTask<ShardLog>,
    ) -> Result<(), crate::replication::SubmitRefused> {
        use crate::replication::SubmitRefused;
        use crossbeam_channel::TrySendError;
        self.commands.try_send(task).map_err(|err| match err {
            TrySendError::Full(task) => SubmitRefused::Full(task),
            TrySendError::Disconnected(_) => {
                SubmitRefused::Gone(format!("shard {} stopped", self.id))
            }
        })
    }

    /// True while the shard's loop thread runs.
    pub fn is_running(&self) -> bool {
        self.loop_thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

/// A running broker.
pub struct Broker {
    shards: Vec<ShardHandle>,
    data_dir: PathBuf,
    temporary_dir: Option<tempfile::TempDir>,
    warnings: Vec<String>,
    flusher_stop: Arc<AtomicBool>,
    xdp: Option<AfXdpInfo>,
    pin_plan: PinPlan,
}

/// The data-plane backends opened at start.
enum Backends {
    Socket,
    AfXdp(Vec<AfXdpBackend>, AfXdpInfo),
    /// One DPDK backend per shard (one queue pair each).
    #[cfg(feature = "dpdk")]
    Dpdk(Vec<kaelix_dataplane::dpdk::DpdkBackend>),
}

impl Backends {
    fn interface(&self) -> Option<&str> {
        match self {
            Self::Socket => None,
            Self::AfXdp(_, info) => Some(&info.interface),
            #[cfg(feature = "dpdk")]
            Self::Dpdk(_) => None,
        }
    }
}

/// What every shard start needs besides its backend.
struct ShardParts<'a> {
    config: &'a Config,
    shard: u32,
    data_dir: &'a Path,
    flusher_stop: &'a Arc<AtomicBool>,
    cpu: Option<usize>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Broker {
    /// Open (or recover) every shard's log, create the configured streams,
    /// bind the data ports and start the threads.
    pub fn start(config: &Config) -> Result<Self, StartError> {
        let (data_dir, temporary_dir) = match &config.broker.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
                    path: dir.clone(),
                    source,
                })?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("kaelix-data-")
                    .tempdir()
                    .map_err(|source| StartError::DataDir {
                        path: std::env::temp_dir(),
                        source,
                    })?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let mut warnings = Vec::new();
        let mut backends = Self::open_backends(config, &mut warnings)?;
        let plan = pinning::plan(
            backends.interface(),
            config.broker.shards as usize,
            &config.dataplane.cores,
        )
        .map_err(|source| StartError::Pinning { source })?;
        tracing::info!(reason = %plan.reason, "data-plane cores");
        let flusher_stop = Arc::new(AtomicBool::new(false));
        let mut shards = Vec::new();
        for shard in 0..config.broker.shards {
            let cpu = plan.assignments.get(shard as usize).copied().flatten();
            let parts = ShardParts {
                config,
                shard,
                data_dir: &data_dir,
                flusher_stop: &flusher_stop,
                cpu,
            };
            let handle = match &mut backends {
                Backends::Socket => {
                    let addr = config.shard_data_addr(shard);
                    let backend = SocketBackend::bind(addr, &config.dataplane.socket)
                        .map_err(|source| StartError::Backend { shard, source })?;
                    let addr = backend
                        .local_addr()
                        .map_err(|source| StartError::Backend { shard, source })?;
                    Self::start_shard(parts, backend, addr, &mut warnings)?
                }
                Backends::AfXdp(queues, _) => {
                    let backend = queues.remove(0);
                    Self::start_shard(parts, backend, config.shard_data_addr(shard), &mut warnings)?
                }
                #[cfg(feature = "dpdk")]
                Backends::Dpdk(queues) => {
                    let backend = queues.remove(0);
                    Self::start_shard(parts, backend, config.broker.data_addr, &mut warnings)?
                }
            };
            shards.push(handle);
        }
        let xdp = match backends {
            Backends::AfXdp(_, info) => Some(info),
            Backends::Socket => None,
            #[cfg(feature = "dpdk")]
            Backends::Dpdk(_) => None,
        };
        Ok(Self {
            shards,
            data_dir,
            temporary_dir,
            warnings,
            flusher_stop,
            xdp,
            pin_plan: plan,
        })
    }

    /// The configured backend, or the socket backend when it cannot be used
    /// here and `dataplane.required` is off (with one warning).
    fn open_backends(config: &Config, warnings: &mut Vec<String>) -> Result<Backends, StartError> {
        let fallback = |warnings: &mut Vec<String>, reason: String| {
            if config.dataplane.required {
                return Err(StartError::Backend {
                    shard: 0,
                    source: BackendError::Unavailable {
                        backend: "broker",
                        reason: format!("{reason} (dataplane.required = true)"),
                    },
                });
            }
            warnings.push(format!("{reason}; using the socket backend"));
            Ok(Backends::Socket)
        };
        match config.dataplane.backend {
            BackendKind::Socket => Ok(Backends::Socket),
            BackendKind::Dpdk => Self::open_dpdk(config, warnings, fallback),
            BackendKind::AfXdp => {
                let mut af_xdp = config.dataplane.af_xdp.clone();
                if config.broker.data_addr.port() != 0 {
                    af_xdp.data_port = config.broker.data_addr.port();
                }
                match AfXdpBackend::open(&af_xdp) {
                    Ok((queues, info)) => {
                        if queues.len() != config.broker.shards as usize {
                            return Err(StartError::Backend {
                                shard: 0,
                                source: BackendError::Unavailable {
                                    backend: "af_xdp",
                                    reason: format!(
                                        "interface {} serves {} RX queue(s) {:?} but broker.shards = {}: \
                                         set broker.shards to the number of queues, or \
                                         dataplane.af_xdp.queues to as many queues as shards",
                                        info.interface,
                                        queues.len(),
                                        info.queues,
                                        config.broker.shards
                                    ),
                                },
                            });
                        }
                        tracing::info!(
                            interface = %info.interface,
                            queues = ?info.queues,
                            xdp_mode = ?info.xdp_mode,
                            zero_copy = info.zero_copy,
                            hugepages = info.hugepages,
                            busy_poll = info.busy_poll,
                            mtu = info.mtu,
                            "af_xdp backend ready"
                        );
                        Ok(Backends::AfXdp(queues, info))
                    }
                    Err(err) if err.is_unavailable() => {
                        fallback(warnings, format!("af_xdp is unavailable: {err}"))
                    }
                    Err(err) => Err(StartError::Backend {
                        shard: 0,
                        source: err.into(),
                    }),
                }
            }
        }
    }

    /// Start DPDK's EAL and the port with one queue pair per shard. Every
    /// shard takes `broker.data_addr`'s port; the device spreads flows over
    /// the queues (RSS), so one producer socket stays on one shard.
    #[cfg(feature = "dpdk")]
    fn open_dpdk(
        config: &Config,
        warnings: &mut Vec<String>,
        fallback: impl Fn(&mut Vec<String>, String) -> Result<Backends, StartError>,
    ) -> Result<Backends, StartError> {
        let mut dpdk = config.dataplane.dpdk.clone();
        dpdk.queues = u16::try_from(config.broker.shards).unwrap_or(u16::MAX);
        let data_addr = config.broker.data_addr;
        if dpdk.data_port.is_none() && data_addr.port() != 0 {
            dpdk.data_port = Some(data_addr.port());
        }
        if let (None, std::net::IpAddr::V4(ip)) = (dpdk.local_ipv4, data_addr.ip())
            && !ip.is_unspecified()
        {
            dpdk.local_ipv4 = Some(ip);
        }
        match kaelix_dataplane::dpdk::DpdkBackend::open_queues(&dpdk) {
            Ok(queues) => {
                let first = &queues[0];
                tracing::info!(
                    port = first.port_id(),
                    queues = queues.len(),
                    mac = ?first.mac_address(),
                    hugepages = first.hugepages(),
                    "dpdk backend ready"
                );
                Ok(Backends::Dpdk(queues))
            }
            Err(err) => fallback(warnings, format!("dpdk is unavailable: {err}")),
        }
    }

    #[cfg(not(feature = "dpdk"))]
    fn open_dpdk(
        _config: &Config,
        warnings: &mut Vec<String>,
        fallback: impl Fn(&mut Vec<String>, String) -> Result<Backends, StartError>,
    ) -> Result<Backends, StartError> {
        fallback(
            warnings,
            "the dpdk backend needs a build with the `dpdk` feature".to_string(),
        )
    }

    fn start_shard<B: Backend + 'static>(
        parts: ShardParts<'_>,
        backend: B,
        data_addr: SocketAddr,
        warnings: &mut Vec<String>,
    ) -> Result<ShardHandle, StartError> {
        let ShardParts {
            config,
            shard,
            data_dir,
            flusher_stop,
            cpu,
        } = parts;
        let log_config = shard_log_config(config, data_dir, shard);
        let (mut log, report) =
            ShardLog::open(log_config).map_err(|source| StartError::Log { shard, source })?;
        warnings.extend(
            report
                .warnings
                .iter()
                .map(|w| format!("shard {shard}: {w}")),
        );
        for stream in config
            .streams
            .iter()
            .filter(|s| s.id % config.broker.shards == shard)
        {
            match log.stream_info(stream.id) {
                Some(info) if info.durability == stream.durability => {}
                Some(info) => warnings.push(format!(
                    "stream {} keeps durability {} from its log; changing it to {} is not supported yet",
                    stream.id, info.durability, stream.durability
                )),
                None => {
                    let wanted = StreamConfig {
                        durability: stream.durability,
                    };
                    log.create_stream(stream.id, wanted).map_err(|err| StartError::Stream {
                        shard,
                        stream_id: stream.id,
                        message: err.to_string(),
                    })?;
                }
            }
        }
        // Rebuild duplicate detection from what the log holds.
        let mut reader = log.reader();
        let mut flows = FlowTable::new(
            config.dataplane.shard.initial_flows,
            config.dataplane.shard.max_flows,
        );
        let streams: Vec<u32> = log.streams().map(|info| info.stream_id).collect();
        recover_flows(&mut reader, &streams, &mut flows);

        let backend_name = backend.name();
        let flusher = log
            .flusher()
            .expect("a freshly opened log hands out its flusher");
        let syncer = log
            .syncer()
            .expect("a freshly opened log hands out its syncer");
        let (commands, command_rx) = bounded(64);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ShardCounters::default());
        let links = ShardLinks {
            commands: command_rx,
            stop: stop.clone(),
            counters: counters.clone(),
        };
        let mut shard_loop = Shard::new(shard, backend, log, flows, &config.dataplane.shard, links);
        let tunables = shard_loop.tunables();
        if config
            .cluster
            .as_ref()
            .is_some_and(|cluster| cluster.replication_factor > 0)
        {
            // Replicated: no shard takes writes before the cluster names it
            // leader (controlplane::cluster::shards).
            tunables.set_role(kaelix_dataplane::ShardRole::Following(
                kaelix_protocol::LeaderHint::default(),
            ));
        }
        let name = format!("kaelix-shard-{shard}");
        let loop_thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(err) = pinning::pin_current_thread(cpu)
                {
                    tracing::warn!(shard, cpu, error = %err, "could not pin the shard thread; running unpinned");
                }
                let result = shard_loop.run();
                (result, shard_loop.into_sink())
            })
            .map_err(|source| StartError::Spawn { name, source })?;
        let name = format!("kaelix-flush-{shard}");
        let stop_flusher = flusher_stop.clone();
        let flusher_thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run_flusher_and_syncer(shard, flusher, syncer, &stop_flusher))
            .map_err(|source| StartError::Spawn { name, source })?;
        Ok(ShardHandle {
            id: shard,
            data_addr,
            backend: backend_name,
            cpu,
            counters,
            tunables,
            reader,
            commands,
            stop,
            loop_thread: Some(loop_thread),
            flusher_thread: Some(flusher_thread),
        })
    }

    /// The running shards.
    pub fn shards(&self) -> &[ShardHandle] {
        &self.shards
    }

    /// The shard owning `stream_id`.
    pub fn shard_of(&self, stream_id: u32) -> &ShardHandle {
        &self.shards[stream_id as usize % self.shards.len()]
    }

    /// Where the logs are.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// True when the data directory is temporary (removed at shutdown).
    pub fn data_dir_is_temporary(&self) -> bool {
        self.temporary_dir.is_some()
    }

    /// The AF_XDP backend's interface, mode and XDP program, when in use.
    pub fn xdp(&self) -> Option<&AfXdpInfo> {
        self.xdp.as_ref()
    }

    /// How shards were placed on cores, and why.
    pub fn pin_plan(&self) -> &PinPlan {
        &self.pin_plan
    }

    /// Warnings from start-up (fallbacks, normal pages instead of hugepages...).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Stop the loops, then the flushers (which write and sync everything
    /// appended), wait for all threads, and close the logs (their live
    /// segment files are removed once the disk copy has everything).
    pub fn shutdown(mut self) -> Result<(), String> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> Result<(), String> {
        let mut problems = Vec::new();
        for shard in &self.shards {
            shard.stop.store(true, Ordering::Release);
        }
        let mut logs = Vec::new();
        for shard in &mut self.shards {
            if let Some(thread) = shard.loop_thread.take() {
                match thread.join() {
                    Ok((result, log)) => {
                        logs.push(log);
                        if let Err(err) = result {
                            problems.push(err.to_string());
                        }
                    }
                    Err(_) => problems.push(format!("shard {} panicked", shard.id)),
                }
            }
        }
        self.flusher_stop.store(true, Ordering::Release);
        for shard in &mut self.shards {
            if let Some(thread) = shard.flusher_thread.take()
                && thread.join().is_err()
            {
                problems.push(format!("flusher {} panicked", shard.id));
            }
        }
        drop(logs);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for Broker {
    /// A broker dropped without [`Broker::shutdown`] (a test that panicked,
    /// an early return) still stops its threads and closes its logs.
    fn drop(&mut self) {
        if let Err(problems) = self.stop_all() {
            tracing::error!(%problems, "broker stopped with errors");
        }
    }
}

/// The flusher thread of shard `shard`'s log: write and sync appended data;
/// on stop, write and sync everything that was appended before returning.
/// Also runs the flusher of a replica's log (controlplane::replication).
pub(crate) fn run_flusher(shard: u32, mut flusher: Flusher, stop: &AtomicBool) {
    let mut failures = 0u64;
    let mut idle_polls = 0u32;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if stopping {
            // A syncer, if any, stops with us: the final polls sync it all.
            flusher.sync_everything();
        }
        // On stop, a time far ahead makes the interval due: everything is synced.
        let now = if stopping { u64::MAX / 2 } else { now_ns() };
        match flusher.poll(now) {
            Ok(progress) => {
                failures = 0;
                if stopping {
                    if progress.synced >= progress.appended {
                        return;
                    }
                    continue;
                }
                // Back off while idle (50 µs doubling to 2 ms) so an idle
                // broker costs little; under load the loop never sleeps.
                if progress.is_idle() {
                    idle_polls = idle_polls.saturating_add(1);
                    let sleep_us = (50u64 << idle_polls.min(6)).min(2_000);
                    std::thread::sleep(Duration::from_micros(sleep_us));
                } else {
                    idle_polls = 0;
                }
            }
            Err(err) => {
                failures += 1;
                // Log state changes, not every retry.
                if failures == 1 || failures.is_power_of_two() {
                    tracing::error!(shard, error = %err, failures, "flush failed; retrying");
                }
                if stopping && failures > 100 {
                    tracing::error!(shard, "giving up the final flush");
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The log configuration of shard `shard` under `data_dir`.
pub fn shard_log_config(config: &Config, data_dir: &Path, shard: u32) -> LogConfig {
    let mut log_config = LogConfig::new(data_dir.join(format!("shard-{shard}")));
    log_config.segment_size_bytes = config.storage.segment_size_mib * 1024 * 1024;
    log_config.flush_interval_ns = config.storage.flush_interval_ms * 1_000_000;
    log_config.retention_bytes = config.storage.retention_mib.map(|mib| mib * 1024 * 1024);
    log_config.retention_age_ns = config.storage.retention_age_secs.map(|s| s * 1_000_000_000);
    log_config.shared = config.storage.shared;
    log_config.live_memory_max_bytes = config.storage.live_memory_max_bytes();
    log_config
}

/// Forget every flow and rebuild them from the log (a shard that followed
/// another leader and now leads: the log holds the other leader's appends).
pub(crate) fn reload_flows(log: &mut ShardLog, flows: &mut FlowTable) {
    flows.forget_flows();
    // What the log holds may not be on a quorum yet: retransmits of it are
    // duplicates, acknowledged once the log is durable up to its end.
    flows.recover_pending(log.positions().appended);
    let mut reader = log.reader();
    let streams: Vec<u32> = log.streams().map(|info| info.stream_id).collect();
    recover_flows(&mut reader, &streams, flows);
}

/// [`run_flusher`], with the log's interval syncs on a thread of their own
/// (`kaelix-sync-<shard>`), so the flusher's writes, and the ACKs at `flush`
/// level, never wait for an fdatasync. Returns when both have stopped.
fn run_flusher_and_syncer(shard: u32, flusher: Flusher, mut syncer: Syncer, stop: &AtomicBool) {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name(format!("kaelix-sync-{shard}"))
            .spawn_scoped(scope, move || {
                let mut failures = 0u64;
                while !stop.load(Ordering::Acquire) {
                    match syncer.poll(now_ns()) {
                        Ok(_) => failures = 0,
                        Err(err) => {
                            failures += 1;
                            if failures == 1 || failures.is_power_of_two() {
                                tracing::error!(shard, error = %err, failures, "interval sync failed; retrying");
                            }
                        }
                    }
                    // Wake for the next sync, and at least every 10 ms to see the stop.
                    let wait_ns = syncer.next_due_ns().saturating_sub(now_ns());
                    std::thread::sleep(Duration::from_nanos(wait_ns.clamp(100_000, 10_000_000)));
                }
            });
        if let Err(err) = spawned {
            // The syncer was dropped with the closure, which hands the
            // interval syncs back to the flusher: the writes wait for them
            // as before, nothing else changes.
            tracing::error!(shard, error = %err, "could not start the sync thread; the flusher syncs");
        }
        run_flusher(shard, flusher, stop);
    });
}

/// Rebuild each flow's last appended sequence from the log, so a producer's
/// retransmit after a broker restart is recognised as a duplicate.
fn recover_flows(reader: &mut LogReader, streams: &[u32], flows: &mut FlowTable) {
    for &stream_id in streams {
        let mut offset = match reader.stream_offsets(stream_id) {
            Ok(Some((first, _next))) => first,
            _ => continue,
        };
        while let Ok(batch) = reader.read(stream_id, offset, 4 << 20, u64::MAX) {
            let mut read_any = false;
            for record in batch {
                // Damage is reported by the log's own recovery; stop at it here.
                let Ok(record) = record else { break };
                read_any = true;
                if let Ok(frame) = kaelix_protocol::Frame::parse(record.bytes) {
                    let key = FlowKey {
                        producer_id: frame.producer_id(),
                        stream_id,
                    };
                    flows.recover(key, frame.sequence(), record.offset);
                }
                offset = record.offset + 1;
            }
            if !read_any {
                break;
            }
        }
    }
}
