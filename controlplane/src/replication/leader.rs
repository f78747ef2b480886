//! The leader side: a TCP listener for the shards this broker leads, one
//! task per connected follower, quorum positions published into each
//! shard log's [`CommitPositions`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kaelix_storage::{CatchUp, CommitPositions, RawReader, ReplicaTail, ShardLog};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::wire::{self, Message, Plan};
use super::{ReplicationConfig, SessionError, kth_largest, pause};

/// Most replicas in a shard's replica set (the leader included).
const REPLICAS_MAX: usize = 16;
/// A follower has this long to say HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A shard this broker leads, and its followers' node ids.
#[derive(Debug)]
pub struct LeaderShard {
    shard: u32,
    raw: RawReader,
    commit: CommitPositions,
    followers: Vec<u64>,
}

impl LeaderShard {
    /// Lead `shard` whose log is `log`, replicating to the nodes
    /// `followers` (the replica set is them and this broker). Call before
    /// the log moves to its shard thread.
    ///
    /// # Panics
    /// With more than 15 followers.
    pub fn new(shard: u32, log: &ShardLog, followers: &[u64]) -> Self {
        Self::from_parts(shard, log.raw_reader(), log.commit_positions(), followers)
    }

    /// [`LeaderShard::new`] from a log's [`ShardLog::raw_reader`] and
    /// [`ShardLog::commit_positions`] (taken on the shard's thread of a
    /// running broker).
    ///
    /// # Panics
    /// With more than 15 followers.
    pub fn from_parts(
        shard: u32,
        raw: RawReader,
        commit: CommitPositions,
        followers: &[u64],
    ) -> Self {
        assert!(
            followers.len() < REPLICAS_MAX,
            "at most {} followers",
            REPLICAS_MAX - 1
        );
        Self {
            shard,
            raw,
            commit,
            followers: followers.to_vec(),
        }
    }
}

/// What the leader knows of one follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerProgress {
    /// Its node id.
    pub node_id: u64,
    /// A session is open.
    pub connected: bool,
    /// Its appended position as last acknowledged.
    pub appended: u64,
    /// Its fsynced position as last acknowledged.
    pub synced: u64,
}

#[derive(Debug)]
struct Slot {
    node_id: u64,
    appended: AtomicU64,
    synced: AtomicU64,
    connected: AtomicBool,
    /// Bumped by each new session; an older session seeing a newer one ends.
    session: AtomicU64,
}

#[derive(Debug)]
struct ShardState {
    raw: Mutex<RawReader>,
    commit: CommitPositions,
    slots: Vec<Slot>,
    quorum: usize,
    lease: Option<super::Lease>,
    /// Woken by the shard's writer after an append, when a session idles.
    appends: Arc<tokio::sync::Notify>,
}

impl ShardState {
    /// Publish the quorum of the leader's and the followers' positions
    /// (while the lease, if any, holds).
    fn recompute(&self) {
        if self.lease.as_ref().is_some_and(|lease| !lease.is_valid()) {
            return;
        }
        let own = self.commit.positions();
        let mut memory = [0u64; REPLICAS_MAX];
        let mut synced = [0u64; REPLICAS_MAX];
        memory[0] = own.appended;
        synced[0] = own.synced;
        for (i, slot) in self.slots.iter().enumerate() {
            memory[i + 1] = slot.appended.load(Ordering::Acquire);
            synced[i + 1] = slot.synced.load(Ordering::Acquire);
        }
        let n = self.slots.len() + 1;
        let replicated = kth_largest(&mut memory[..n], self.quorum);
        let replicated_synced = kth_largest(&mut synced[..n], self.quorum);
        self.commit.publish(replicated, replicated_synced);
    }
}

type Shards = Arc<HashMap<u32, Arc<ShardState>>>;

/// Attach replication to a log this broker starts leading, at the commit
/// positions it knows a quorum has. A log that followed (or led) until now
/// keeps the commit it learned; a log with no followers is a replica set of
/// one and everything it holds is committed. A freshly opened log with
/// followers (a restarted broker) knows nothing: its tail may be on no
/// other replica, so it starts at 0 and the quorum of its followers' ACKs
/// moves it (counting the recovered tail as committed let a minority
/// commit: found by `sim_tests`).
pub(super) fn attach_as_leader(commit: &CommitPositions, followers: usize) {
    let own = commit.positions();
    if commit.is_attached() {
        commit.attach(own.replicated, own.replicated_synced);
    } else if followers == 0 {
        commit.attach(own.appended, own.synced);
    } else {
        commit.attach(0, 0);
    }
}

/// Serves the shards this broker leads to their followers.
#[derive(Debug)]
pub struct ReplicationLeader {
    addr: SocketAddr,
    shards: Shards,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplicationLeader {
    /// Bind `bind` (port 0 allowed), attach replication to each shard's log
    /// (from now on its replicated levels follow the quorum, starting from
    /// the commit the log knows a quorum has: 0 for a freshly opened log
    /// with followers) and serve
    /// followers. Call within a tokio runtime.
    pub async fn start(
        bind: SocketAddr,
        shards: Vec<LeaderShard>,
        config: ReplicationConfig,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let mut map = HashMap::new();
        for shard in shards {
            attach_as_leader(&shard.commit, shard.followers.len());
            let replicas = shard.followers.len() + 1;
            let appends = Arc::new(tokio::sync::Notify::new());
            let wake = appends.clone();
            shard
                .commit
                .wake_on_append(Some(Arc::new(move || wake.notify_waiters())));
            let state = Arc::new(ShardState {
                raw: Mutex::new(shard.raw),
                commit: shard.commit,
                slots: shard
                    .followers
                    .iter()
                    .map(|&node_id| Slot {
                        node_id,
                        appended: AtomicU64::new(0),
                        synced: AtomicU64::new(0),
                        connected: AtomicBool::new(false),
                        session: AtomicU64::new(0),
                    })
                    .collect(),
                quorum: replicas / 2 + 1,
                lease: config.lease.clone(),
                appends,
            });
            map.insert(shard.shard, state);
        }
        let shards: Shards = Arc::new(map);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shards.clone(), config, stop_rx));
        tracing::info!(%addr, shards = shards.len(), "replication leader listening");
        Ok(Self {
            addr,
            shards,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The followers of `shard` as last heard, `None` for a shard not led here.
    pub fn progress(&self, shard: u32) -> Option<Vec<FollowerProgress>> {
        let state = self.shards.get(&shard)?;
        Some(
            state
                .slots
                .iter()
                .map(|slot| FollowerProgress {
                    node_id: slot.node_id,
                    connected: slot.connected.load(Ordering::Acquire),
                    appended: slot.appended.load(Ordering::Acquire),
                    synced: slot.synced.load(Ordering::Acquire),
                })
                .collect(),
        )
    }

    /// Close the listener and every session. The shards' commit positions
    /// stay where they are (they no longer advance).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        for state in self.shards.values() {
            state.commit.wake_on_append(None);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shards: Shards,
    config: ReplicationConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shards = shards.clone();
                    let config = config.clone();
                    let stop = stop.clone();
                    sessions.spawn(async move {
                        if let Err(err) = serve(stream, &shards, &config, stop).await {
                            tracing::info!(%peer, error = %err, "replication session ended");
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    sessions.shutdown().await;
}

/// Read until one frame decodes; returns the bytes it took.
async fn read_frame<'a>(
    stream: &mut (impl AsyncReadExt + Unpin),
    buf: &'a mut Vec<u8>,
) -> Result<(Message<'a>, usize), SessionError> {
    loop {
        // Decode on a reborrow first; only return the borrow once complete.
        if let Some((_, used)) = wire::decode(buf)? {
            let (message, _) = wire::decode(buf)?.expect("decoded above");
            return Ok((message, used));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(SessionError::Protocol("connection closed".into()));
        }
    }
}

async fn serve(
    stream: TcpStream,
    shards: &Shards,
    config: &ReplicationConfig,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf = Vec::with_capacity(64 * 1024);
    let mut out = Vec::with_capacity(config.chunk_bytes * 2 + 256);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd, &mut inbuf))
        .await
        .map_err(|_| SessionError::Protocol("no hello in time".into()))??;
    let (
        Message::Hello {
            shard,
            node_id,
            position,
            last_record,
        },
        used,
    ) = hello
    else {
        return Err(SessionError::Protocol("first frame is not a hello".into()));
    };
    inbuf.drain(..used);
    let Some(state) = shards.get(&shard) else {
        wire::encode_plan(&mut out, Plan::UnknownShard);
        wr.write_all(&out).await?;
        return Err(SessionError::Protocol(
            "hello for a shard not led here".into(),
        ));
    };
    let Some(slot) = state.slots.iter().find(|slot| slot.node_id == node_id) else {
        wire::encode_plan(&mut out, Plan::NotAReplica);
        wr.write_all(&out).await?;
        return Err(SessionError::Protocol(
            "hello from a node outside the replica set".into(),
        ));
    };
    let mut raw = state
        .raw
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    let tail = ReplicaTail {
        position,
        last_record,
    };
    let commit = state.commit.positions().replicated;
    let plan = match raw.catch_up_plan(&tail, commit) {
        CatchUp::Resume { from } => Plan::Resume(from),
        CatchUp::Truncate { segment } => Plan::Truncate(segment),
        CatchUp::Unavailable { first_position } => Plan::Unavailable(first_position),
    };
    if let Plan::Truncate(segment) = plan {
        // The follower drops its segments from `segment` (a restarted one
        // before its shard opens, possibly ones it acknowledged): what it
        // acknowledged there no longer counts towards the quorum.
        let kept = segment.saturating_mul(raw.segment_size());
        slot.appended.fetch_min(kept, Ordering::AcqRel);
        slot.synced.fetch_min(kept, Ordering::AcqRel);
    }
    wire::encode_plan(&mut out, plan);
    wr.write_all(&out).await?;
    let Plan::Resume(from) = plan else {
        tracing::info!(
            shard,
            node_id,
            ?plan,
            "replica must truncate or cannot catch up"
        );
        return Ok(());
    };
    let session = slot.session.fetch_add(1, Ordering::AcqRel) + 1;
    // A new session restarts the follower's positions (a truncated
    // follower is behind what it acknowledged before); the commit
    // positions never go back.
    slot.appended.store(from, Ordering::Release);
    slot.synced.store(0, Ordering::Release);
    slot.connected.store(true, Ordering::Release);
    tracing::info!(shard, node_id, from, "replica connected");
    let result = stream_records(
        &mut rd, &mut wr, &mut raw, state, slot, session, from, inbuf, out, config, &mut stop,
    )
    .await;
    if slot.session.load(Ordering::Acquire) == session {
        slot.connected.store(false, Ordering::Release);
    }
    result
}

/// Between polls of a session with nothing to send: yield while data moved
/// recently ([`pause`]), else wait for the next append (the writer wakes
/// us) or `idle_poll`, whichever comes first (the commit moves with the
/// followers' ACKs and the leader's syncs, which this also polls for).
/// With the follower's window full, or the log's end not readable yet
/// (`wake_on_append` false), an append does not help: poll.
async fn idle(
    config: &ReplicationConfig,
    state: &ShardState,
    last_activity: Instant,
    next: u64,
    wake_on_append: bool,
) {
    if !wake_on_append || last_activity.elapsed() < config.spin {
        return pause(config, last_activity).await;
    }
    let appended = state.appends.notified();
    tokio::pin!(appended);
    appended.as_mut().enable();
    state.commit.want_append_wake();
    if state.commit.positions().appended > next {
        return;
    }
    tokio::select! {
        _ = appended => {}
        _ = tokio::time::sleep(config.idle_poll) => {}
    }
}

#[allow(clippy::too_many_arguments)]
async fn stream_records(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    raw: &mut RawReader,
    state: &ShardState,
    slot: &Slot,
    session: u64,
    from: u64,
    mut inbuf: Vec<u8>,
    mut out: Vec<u8>,
    config: &ReplicationConfig,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let mut next = from;
    let mut acked = from;
    let mut sent_commit = (u64::MAX, u64::MAX);
    let mut last_activity = Instant::now();
    loop {
        if *stop.borrow() || slot.session.load(Ordering::Acquire) != session {
            return Ok(());
        }
        out.clear();
        let positions = state.commit.positions();
        let commit = (positions.replicated, positions.replicated_synced);
        // Appended but not readable yet (a segment being rolled): poll.
        let mut unreadable = false;
        while next < positions.appended
            && next - acked.min(next) < config.window_bytes
            && out.len() < config.chunk_bytes
        {
            let Some(chunk) = raw.read_chunk(next, config.chunk_bytes)? else {
                unreadable = true;
                break;
            };
            wire::encode_data(&mut out, chunk.position, commit.0, commit.1, chunk.bytes);
            next = chunk.next;
        }
        if out.is_empty() && commit != sent_commit {
            wire::encode_data(&mut out, next, commit.0, commit.1, &[]);
        }
        if !out.is_empty() {
            sent_commit = commit;
            wr.write_all(&out).await?;
            last_activity = Instant::now();
        }
        // Only then can an append give this session something to send.
        let wake_on_append = !unreadable && next - acked.min(next) < config.window_bytes;
        tokio::select! {
            biased;
            read = rd.read_buf(&mut inbuf) => {
                if read? == 0 {
                    return Err(SessionError::Protocol("follower closed the connection".into()));
                }
                let mut at = 0;
                while let Some((message, used)) = wire::decode(&inbuf[at..])? {
                    let Message::Ack { appended, synced } = message else {
                        return Err(SessionError::Protocol("follower sent something else than an ack".into()));
                    };
                    // A newer session of this follower owns the slot (it
                    // may have lowered it after a truncation): drop ours.
                    if slot.session.load(Ordering::Acquire) != session {
                        return Ok(());
                    }
                    slot.appended.store(appended, Ordering::Release);
                    slot.synced.store(synced, Ordering::Release);
                    acked = appended;
                    at += used;
                }
                inbuf.drain(..at);
                if inbuf.capacity() - inbuf.len() < 1024 {
                    inbuf.reserve(4096);
                }
                last_activity = Instant::now();
            }
            _ = idle(config, state, last_activity, next, wake_on_append) => {}
        }
        // The leader's own positions move too (its flusher syncs).
        state.recompute();
    }
}
