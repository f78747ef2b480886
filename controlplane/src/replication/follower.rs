//! The follower side: one task per followed shard, owning that shard's
//! log (and its flusher thread), connecting to the leader, appending what
//! it receives and acknowledging its positions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kaelix_dataplane::ShardTask;
use kaelix_storage::{
    CommitPositions, LogConfig, OpenError, Positions, ReplicaError, ReplicaTail, ShardLog,
    StreamConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::wire::{self, Message, Plan};
use super::{ReplicationConfig, SessionError, pause};

/// What a follower replicates, and from where.
#[derive(Debug, Clone)]
pub struct FollowerConfig {
    /// This broker's node id (the leader checks it against the replica set).
    pub node_id: u64,
    /// The shard.
    pub shard: u32,
    /// The leader's replication address.
    pub leader: SocketAddr,
    /// The follower's own log of the shard.
    pub log: LogConfig,
    /// Streams to register in the log when missing (the metadata's
    /// streams of this shard), before anything is received.
    pub streams: Vec<(u32, StreamConfig)>,
}

/// Why a follower stopped for good (session failures are retried).
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// Opening the log failed.
    #[error("opening the replica log in {dir}: {source}")]
    Open {
        /// The log directory.
        dir: PathBuf,
        /// The failure.
        source: OpenError,
    },
    /// Registering a stream failed.
    #[error("creating stream {stream_id} in the replica log: {reason}")]
    Stream {
        /// The stream.
        stream_id: u32,
        /// The failure.
        reason: String,
    },
    /// Truncating the log failed.
    #[error("truncating the replica log: {0}")]
    Truncate(ReplicaError),
    /// The follower task panicked or was cancelled.
    #[error("follower task: {0}")]
    Task(String),
    /// The log's tail differs from the leader's and must be truncated, which
    /// a log in use by its shard cannot be: restart the broker (it truncates
    /// before it opens its shards).
    #[error(
        "shard {shard}: the log has a tail the leader does not (from segment {segment}); \
         restart the broker to truncate it"
    )]
    Divergent {
        /// The shard.
        shard: u32,
        /// The first segment to drop.
        segment: u64,
    },
    /// The shard's thread does not take commands any more.
    #[error("shard {shard}: {reason}")]
    Shard {
        /// The shard.
        shard: u32,
        /// Why.
        reason: String,
    },
}

/// How a follower reaches a log that a running shard owns: it runs its
/// appends on the shard's thread (one command per received read).
pub type ShardSubmit = Arc<dyn Fn(ShardTask<ShardLog>) -> Result<(), SubmitRefused> + Send + Sync>;

/// Why a shard did not take a command.
pub enum SubmitRefused {
    /// Its queue is full: here is the command back, try again.
    Full(ShardTask<ShardLog>),
    /// The shard stopped.
    Gone(String),
}

/// A follower's state, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FollowerStatus {
    /// A session with the leader is open.
    pub connected: bool,
    /// The log's appended position.
    pub appended: u64,
    /// The log's fsynced position.
    pub synced: u64,
    /// The leader's commit position (`replicated`) as last received.
    pub commit: u64,
    /// Truncations done to catch up.
    pub truncations: u64,
    /// Sessions opened.
    pub sessions: u64,
    /// The last session failure.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    connected: AtomicBool,
    appended: AtomicU64,
    synced: AtomicU64,
    commit: AtomicU64,
    truncations: AtomicU64,
    sessions: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Follows one shard from its leader.
#[derive(Debug)]
pub struct ReplicaFollower {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), FollowerError>>,
}

impl ReplicaFollower {
    /// Open the follower's log (creating missing streams) and start
    /// following. Call within a tokio runtime.
    pub async fn start(
        config: FollowerConfig,
        replication: ReplicationConfig,
    ) -> Result<Self, FollowerError> {
        let log = open_log(config.shard, config.log.clone(), config.streams.clone()).await?;
        Ok(Self::spawn(
            config,
            replication,
            FollowerLog::Owned(Box::new(log)),
        ))
    }

    /// Follow into the log of a running shard (its appends run on the
    /// shard's thread through `submit`; `commit` is that log's
    /// [`ShardLog::commit_positions`]). The caller has created the shard's
    /// streams and set the shard to follow. A divergent tail cannot be
    /// truncated here: the follower stops with [`FollowerError::Divergent`].
    pub fn start_on_shard(
        config: FollowerConfig,
        replication: ReplicationConfig,
        submit: ShardSubmit,
        commit: CommitPositions,
    ) -> Self {
        // Consumers of a replica never see beyond the leader's commit. A
        // freshly opened log knows no commit (standalone, its replicated
        // levels are its own positions): from 0, or its recovered tail
        // would count as committed if it took the lead (simulation seed 624).
        let own = commit.positions();
        if commit.is_attached() {
            commit.attach(own.replicated.min(own.appended), own.replicated_synced);
        } else {
            commit.attach(0, 0);
        }
        Self::spawn(
            config,
            replication,
            FollowerLog::Shard(ShardLogAccess {
                submit,
                commit,
                buffer: Some(Vec::new()),
            }),
        )
    }

    fn spawn(config: FollowerConfig, replication: ReplicationConfig, log: FollowerLog) -> Self {
        let shared = Arc::new(Shared::default());
        log.publish_status(&shared);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(config, replication, log, shared.clone(), stop_rx));
        Self { shared, stop, task }
    }

    /// True once the follower stopped (on its own: see [`ReplicaFollower::shutdown`]'s result).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Where the follower is.
    pub fn status(&self) -> FollowerStatus {
        let shared = &self.shared;
        FollowerStatus {
            connected: shared.connected.load(Ordering::Acquire),
            appended: shared.appended.load(Ordering::Acquire),
            synced: shared.synced.load(Ordering::Acquire),
            commit: shared.commit.load(Ordering::Acquire),
            truncations: shared.truncations.load(Ordering::Acquire),
            sessions: shared.sessions.load(Ordering::Acquire),
            last_error: shared
                .last_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }

    /// Stop: close the session, sync and close the log (its directory can
    /// be opened again afterwards).
    pub async fn shutdown(self) -> Result<(), FollowerError> {
        let _ = self.stop.send(true);
        self.task
            .await
            .map_err(|err| FollowerError::Task(err.to_string()))?
    }
}

/// Ask the leader at `leader` how a replica of `shard` whose log ends at
/// `tail` would catch up, without following (the connection is closed
/// once the plan arrives).
pub async fn ask_plan(
    leader: SocketAddr,
    shard: u32,
    node_id: u64,
    tail: ReplicaTail,
) -> Result<Plan, String> {
    let session = async {
        let stream = TcpStream::connect(leader)
            .await
            .map_err(|e| format!("connecting to {leader}: {e}"))?;
        let (mut rd, mut wr) = stream.into_split();
        let mut out = Vec::with_capacity(64);
        wire::encode_hello(&mut out, shard, node_id, tail.position, tail.last_record);
        wr.write_all(&out)
            .await
            .map_err(|e| format!("sending HELLO to {leader}: {e}"))?;
        let mut inbuf = Vec::with_capacity(64 * 1024);
        loop {
            if let Some((message, _)) = wire::decode(&inbuf).map_err(|e| e.to_string())? {
                return match message {
                    Message::Plan(plan) => Ok(plan),
                    _ => Err(format!("{leader} did not answer with a plan")),
                };
            }
            let read = rd
                .read_buf(&mut inbuf)
                .await
                .map_err(|e| format!("reading from {leader}: {e}"))?;
            if read == 0 {
                return Err(format!("{leader} closed the connection"));
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), session)
        .await
        .map_err(|_| format!("{leader} gave no plan within 5 s"))?
}

/// The log a follower writes: its own, or a running shard's.
enum FollowerLog {
    Owned(Box<OwnedLog>),
    Shard(ShardLogAccess),
}

/// A running shard's log, reached through its command queue.
struct ShardLogAccess {
    submit: ShardSubmit,
    commit: CommitPositions,
    /// The copy of received records handed to the shard's thread and back.
    buffer: Option<Vec<u8>>,
}

impl ShardLogAccess {
    /// Run `work` on the shard's thread and wait for its answer (retrying
    /// while the shard's queue is full).
    async fn call<T: Send + 'static>(
        &self,
        shard: u32,
        work: impl FnOnce(&mut ShardLog) -> T + Send + 'static,
    ) -> Result<T, FollowerError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut task: ShardTask<ShardLog> = Box::new(move |log, _flows| {
            let _ = tx.send(work(log));
        });
        loop {
            match (self.submit)(task) {
                Ok(()) => break,
                Err(SubmitRefused::Full(back)) => {
                    task = back;
                    tokio::time::sleep(std::time::Duration::from_micros(100)).await;
                }
                Err(SubmitRefused::Gone(reason)) => {
                    return Err(FollowerError::Shard { shard, reason });
                }
            }
        }
        rx.await.map_err(|_| FollowerError::Shard {
            shard,
            reason: "the shard stopped before running a replication command".into(),
        })
    }
}

impl FollowerLog {
    fn publish_status(&self, shared: &Shared) {
        let positions = self.positions();
        shared.appended.store(positions.appended, Ordering::Release);
        shared.synced.store(positions.synced, Ordering::Release);
    }

    fn positions(&self) -> Positions {
        match self {
            Self::Owned(owned) => owned.log.positions(),
            Self::Shard(access) => access.commit.positions(),
        }
    }

    fn commit_positions(&self) -> CommitPositions {
        match self {
            Self::Owned(owned) => owned.log.commit_positions(),
            Self::Shard(access) => access.commit.clone(),
        }
    }

    async fn replica_tail(&mut self, shard: u32) -> Result<ReplicaTail, SessionError> {
        match self {
            Self::Owned(owned) => Ok(owned.log.replica_tail()),
            Self::Shard(access) => access
                .call(shard, |log| log.replica_tail())
                .await
                .map_err(|err| SessionError::Protocol(err.to_string())),
        }
    }

    async fn append_replica(
        &mut self,
        shard: u32,
        position: u64,
        records: &[u8],
        sync: bool,
    ) -> Result<(), SessionError> {
        match self {
            Self::Owned(owned) => {
                owned.log.append_replica(position, records, sync)?;
                Ok(())
            }
            Self::Shard(access) => {
                let mut buffer = access.buffer.take().unwrap_or_default();
                buffer.clear();
                buffer.extend_from_slice(records);
                let (buffer, appended) = access
                    .call(shard, move |log| {
                        let appended = log.append_replica(position, &buffer, sync).map(|_| ());
                        (buffer, appended)
                    })
                    .await
                    .map_err(|err| SessionError::Protocol(err.to_string()))?;
                access.buffer = Some(buffer);
                appended?;
                Ok(())
            }
        }
    }

    fn close(self) {
        if let Self::Owned(owned) = self {
            owned.close();
        }
    }
}

/// The follower's log with its flusher thread.
struct OwnedLog {
    log: ShardLog,
    config: LogConfig,
    flusher_stop: Arc<AtomicBool>,
    flusher: Option<JoinHandle<()>>,
}

impl OwnedLog {
    /// Stop the flusher after it synced everything, then close the log.
    fn close(mut self) -> LogConfig {
        self.flusher_stop.store(true, Ordering::Release);
        if let Some(thread) = self.flusher.take() {
            let _ = thread.join();
        }
        self.config.clone()
    }
}

async fn open_log(
    shard: u32,
    config: LogConfig,
    streams: Vec<(u32, StreamConfig)>,
) -> Result<OwnedLog, FollowerError> {
    tokio::task::spawn_blocking(move || open_log_blocking(shard, config, &streams))
        .await
        .map_err(|err| FollowerError::Task(err.to_string()))?
}

fn open_log_blocking(
    shard: u32,
    config: LogConfig,
    streams: &[(u32, StreamConfig)],
) -> Result<OwnedLog, FollowerError> {
    let (mut log, report) =
        ShardLog::open(config.clone()).map_err(|source| FollowerError::Open {
            dir: config.dir.clone(),
            source,
        })?;
    for warning in &report.warnings {
        tracing::warn!(dir = %config.dir.display(), "{warning}");
    }
    for (stream_id, stream) in streams {
        if log.stream_info(*stream_id).is_none() {
            log.create_stream(*stream_id, *stream)
                .map_err(|err| FollowerError::Stream {
                    stream_id: *stream_id,
                    reason: err.to_string(),
                })?;
        }
    }
    // Consumers of a replica never see beyond the leader's commit.
    log.commit_positions().attach(0, 0);
    let flusher = log.flusher().expect("a freshly opened log has its flusher");
    let flusher_stop = Arc::new(AtomicBool::new(false));
    let stop = flusher_stop.clone();
    let thread = std::thread::Builder::new()
        .name("kaelix-replica-flush".into())
        .spawn(move || crate::broker::run_flusher(shard, flusher, &stop))
        .map_err(|err| FollowerError::Task(format!("spawning the flusher: {err}")))?;
    Ok(OwnedLog {
        log,
        config,
        flusher_stop,
        flusher: Some(thread),
    })
}

enum Outcome {
    Stopped,
    Truncate(u64),
}

async fn run(
    config: FollowerConfig,
    replication: ReplicationConfig,
    mut log: FollowerLog,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), FollowerError> {
    // The first retry comes soon (a new leader may be rebinding its
    // listener), then they space out to `reconnect_delay`.
    let mut delay = replication.reconnect_delay / 16;
    let result = loop {
        if *stop.borrow() {
            break Ok(());
        }
        shared.sessions.fetch_add(1, Ordering::AcqRel);
        let outcome = session(&config, &replication, &mut log, &shared, &mut stop).await;
        if shared.connected.swap(false, Ordering::AcqRel) {
            delay = replication.reconnect_delay / 16;
        }
        match outcome {
            Ok(Outcome::Stopped) => break Ok(()),
            Ok(Outcome::Truncate(segment)) => {
                let owned = match log {
                    FollowerLog::Owned(owned) => owned,
                    FollowerLog::Shard(_) => {
                        shared.truncations.fetch_add(1, Ordering::AcqRel);
                        return Err(FollowerError::Divergent {
                            shard: config.shard,
                            segment,
                        });
                    }
                };
                tracing::info!(shard = config.shard, segment, "truncating the replica log");
                let streams = config.streams.clone();
                let shard = config.shard;
                let truncated = tokio::task::spawn_blocking(move || {
                    let log_config = owned.close();
                    let dropped =
                        kaelix_storage::replica::truncate_segments(&log_config.dir, segment)
                            .map_err(FollowerError::Truncate);
                    let reopened = open_log_blocking(shard, log_config, &streams);
                    (dropped, reopened)
                })
                .await
                .map_err(|err| FollowerError::Task(err.to_string()));
                match truncated {
                    Ok((Ok(_), Ok(reopened))) => {
                        log = FollowerLog::Owned(Box::new(reopened));
                        log.publish_status(&shared);
                        shared.truncations.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok((Err(err), _)) | Ok((_, Err(err))) | Err(err) => return Err(err),
                }
            }
            Err(err) => {
                tracing::info!(shard = config.shard, error = %err, "replication session failed");
                *shared
                    .last_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err.to_string());
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2)
                    .max(Duration::from_millis(1))
                    .min(replication.reconnect_delay);
            }
        }
    };
    let _ = tokio::task::spawn_blocking(move || log.close()).await;
    result
}

async fn session(
    config: &FollowerConfig,
    replication: &ReplicationConfig,
    log: &mut FollowerLog,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Result<Outcome, SessionError> {
    let stream = tokio::select! {
        _ = stop.changed() => return Ok(Outcome::Stopped),
        connected = TcpStream::connect(config.leader) => connected?,
    };
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut out = Vec::with_capacity(256);
    let tail = log.replica_tail(config.shard).await?;
    wire::encode_hello(
        &mut out,
        config.shard,
        config.node_id,
        tail.position,
        tail.last_record,
    );
    wr.write_all(&out).await?;
    let mut inbuf: Vec<u8> = Vec::with_capacity(replication.chunk_bytes * 2 + 64 * 1024);
    // The plan.
    let plan = loop {
        if let Some((message, used)) = wire::decode(&inbuf)? {
            let Message::Plan(plan) = message else {
                return Err(SessionError::Protocol(
                    "leader did not answer with a plan".into(),
                ));
            };
            inbuf.drain(..used);
            break plan;
        }
        tokio::select! {
            _ = stop.changed() => return Ok(Outcome::Stopped),
            read = rd.read_buf(&mut inbuf) => if read? == 0 {
                return Err(SessionError::Protocol("leader closed the connection".into()));
            },
        }
    };
    match plan {
        Plan::Resume(from) if from == tail.position => {}
        Plan::Resume(from) => {
            return Err(SessionError::Protocol(format!(
                "leader resumes at {from}, the log ends at {}",
                tail.position
            )));
        }
        Plan::Truncate(segment) => return Ok(Outcome::Truncate(segment)),
        other => return Err(SessionError::Protocol(format!("leader refused: {other:?}"))),
    }
    shared.connected.store(true, Ordering::Release);
    tracing::info!(
        shard = config.shard,
        from = tail.position,
        "following the leader"
    );
    let commit = log.commit_positions();
    let mut acked = (u64::MAX, u64::MAX);
    let mut last_activity = Instant::now();
    loop {
        // Everything complete in the buffer (DATA may have come with the plan).
        let mut at = 0;
        while let Some((message, used)) = wire::decode(&inbuf[at..])? {
            let Message::Data {
                position,
                commit: replicated,
                commit_synced,
                records,
            } = message
            else {
                return Err(SessionError::Protocol(
                    "leader sent something else than data".into(),
                ));
            };
            if !records.is_empty() {
                log.append_replica(config.shard, position, records, replication.follower_sync)
                    .await?;
            }
            commit.publish(replicated, commit_synced);
            shared.commit.store(replicated, Ordering::Release);
            at += used;
        }
        if at > 0 {
            inbuf.drain(..at);
            last_activity = Instant::now();
        }
        // Room for the next frame (a large batch record may need more).
        let want = match inbuf.get(..4) {
            Some(len) => 4 + u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
            None => 0,
        };
        let room = want.max(inbuf.len() + 64 * 1024);
        if inbuf.capacity() < room {
            inbuf.reserve(room - inbuf.len());
        }
        let positions = log.positions();
        let now = (positions.appended, positions.synced);
        if now != acked {
            out.clear();
            wire::encode_ack(&mut out, now.0, now.1);
            wr.write_all(&out).await?;
            acked = now;
            shared.appended.store(now.0, Ordering::Release);
            shared.synced.store(now.1, Ordering::Release);
        }
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(Outcome::Stopped),
            read = rd.read_buf(&mut inbuf) => {
                if read? == 0 {
                    return Err(SessionError::Protocol("leader closed the connection".into()));
                }
            }
            // The flusher's synced position moves on its own.
            _ = pause(replication, last_activity) => {}
        }
    }
}
