//! The gRPC admin API (`proto/admin.proto`): streams, broker status,
//! configuration, served over a running broker. The generated code is in
//! [`crate::pb`].
//!
//! Every handler answers with a status code that says what to do about a
//! failure (see the table at the top of the proto file) and a message that
//! names the field or key at fault.

use std::sync::Arc;
use std::time::Instant;

use kaelix_protocol::DurabilityLevel;
use kaelix_storage::{StreamError, StreamInfo, StreamRetention};
use tonic::{Request, Response, Status};

use crate::config::KeyChange;
use crate::pb;
use crate::reload::{ApplyError, ApplyOutcome};
use crate::server::ControlState;
use crate::shard_call::{ShardCallError, StreamOpError};

/// The three services over one shared state.
#[derive(Clone)]
pub struct AdminService {
    state: Arc<ControlState>,
}

impl AdminService {
    /// Serve `state`.
    pub fn new(state: Arc<ControlState>) -> Self {
        Self { state }
    }

    /// Count and time one request.
    fn observe<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.state.telemetry.record(|| {
            metrics::counter!("kaelix_admin_requests_total", "method" => method, "code" => format!("{code:?}"))
                .increment(1);
            metrics::histogram!("kaelix_admin_request_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
        });
    }
}

fn durability_to_pb(level: DurabilityLevel) -> pb::Durability {
    match level {
        DurabilityLevel::Memory => pb::Durability::Memory,
        DurabilityLevel::Flush => pb::Durability::Flush,
        DurabilityLevel::Fsync => pb::Durability::Fsync,
        DurabilityLevel::Replicated => pb::Durability::Replicated,
        DurabilityLevel::ReplicatedFsync => pb::Durability::ReplicatedFsync,
    }
}

fn durability_from_pb(value: i32) -> Result<DurabilityLevel, Status> {
    match pb::Durability::try_from(value) {
        Ok(pb::Durability::Unspecified | pb::Durability::Memory) => Ok(DurabilityLevel::Memory),
        Ok(pb::Durability::Flush) => Ok(DurabilityLevel::Flush),
        Ok(pb::Durability::Fsync) => Ok(DurabilityLevel::Fsync),
        Ok(pb::Durability::Replicated) => Ok(DurabilityLevel::Replicated),
        Ok(pb::Durability::ReplicatedFsync) => Ok(DurabilityLevel::ReplicatedFsync),
        Err(_) => Err(Status::invalid_argument(format!(
            "durability: {value} is not a durability level \
             (allowed: memory, flush, fsync, replicated, replicated_fsync)"
        ))),
    }
}

const MIB: u64 = 1024 * 1024;
const SECOND_NS: u64 = 1_000_000_000;

/// A stream's own retention from the request (0 or too large: INVALID_ARGUMENT).
fn retention_from_pb(
    retention_mib: Option<u64>,
    retention_age_secs: Option<u64>,
) -> Result<StreamRetention, Status> {
    let scale = |field: &str, value: Option<u64>, unit: u64, max: u64| match value {
        None => Ok(None),
        Some(value) if value == 0 || value > max => Err(Status::invalid_argument(format!(
            "{field}: {value} is out of range (allowed: 1 to {max}; leave it out for no limit)"
        ))),
        Some(value) => Ok(Some(value * unit)),
    };
    Ok(StreamRetention {
        bytes: scale("retention_mib", retention_mib, MIB, u64::MAX / MIB)?,
        age_ns: scale(
            "retention_age_secs",
            retention_age_secs,
            SECOND_NS,
            u64::MAX / SECOND_NS,
        )?,
    })
}

fn shard_status(err: ShardCallError) -> Status {
    match err {
        ShardCallError::Unavailable(message) => Status::unavailable(message),
        ShardCallError::Timeout { .. } => Status::deadline_exceeded(err.to_string()),
    }
}

fn stream_status(err: StreamOpError) -> Status {
    match err {
        StreamOpError::Shard(err) => shard_status(err),
        StreamOpError::Log(err @ StreamError::Exists { .. }) => {
            Status::already_exists(err.to_string())
        }
        StreamOpError::Log(err @ StreamError::Unknown { .. }) => Status::not_found(err.to_string()),
        StreamOpError::Log(err) => Status::internal(err.to_string()),
    }
}

fn change_to_pb(change: &KeyChange) -> pb::ConfigChange {
    pb::ConfigChange {
        key: change.key.clone(),
        old_value: change.old.clone(),
        new_value: change.new.clone(),
    }
}

fn outcome_to_pb(outcome: &ApplyOutcome) -> pb::ConfigApplyResponse {
    pb::ConfigApplyResponse {
        applied: outcome.applied.iter().map(change_to_pb).collect(),
        restart_required: outcome.restart_required.iter().map(change_to_pb).collect(),
    }
}

fn apply_status(err: ApplyError) -> Status {
    match err {
        ApplyError::Invalid(err) => Status::invalid_argument(err.to_string()),
        ApplyError::UnknownKey { .. } => {
            Status::not_found(format!("{err} (kaelix config get lists the keys)"))
        }
        ApplyError::RestartOnly { .. } => Status::failed_precondition(err.to_string()),
        ApplyError::Apply { .. } => Status::unavailable(err.to_string()),
    }
}

impl AdminService {
    fn stream_to_pb(&self, shard: u32, info: &StreamInfo) -> pb::StreamInfo {
        let rate = self
            .state
            .rates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&info.stream_id)
            .and_then(|sample| sample.rate_per_sec);
        let positions = self.state.broker.shards()[shard as usize]
            .reader
            .positions();
        pb::StreamInfo {
            stream_id: info.stream_id,
            durability: durability_to_pb(info.durability).into(),
            shard,
            first_offset: info.first_offset,
            next_offset: info.next_offset,
            stored_messages: info.next_offset.saturating_sub(info.first_offset),
            append_rate_per_sec: rate,
            shard_log_bytes: positions.appended,
            replication_factor: 1,
            retention_mib: info.retention.bytes.map(|bytes| bytes / MIB),
            retention_age_secs: info.retention.age_ns.map(|ns| ns / SECOND_NS),
        }
    }

    /// `cluster.replication_factor` when this broker is a member of a
    /// cluster with data replication (streams are then replicated).
    fn replication_factor(&self) -> Option<u32> {
        self.state.cluster.as_ref()?;
        let config = self.state.config.current();
        config
            .config
            .cluster
            .as_ref()
            .map(|section| section.replication_factor)
            .filter(|factor| *factor > 0)
    }

    /// `kaelix config set --cluster`: check the change here, propose it
    /// through the Raft metadata (every member applies it as it commits),
    /// and apply it here at once.
    async fn cluster_config_set(
        &self,
        request: pb::ConfigSetRequest,
    ) -> Result<pb::ConfigApplyResponse, Status> {
        let Some(node) = self.state.cluster.clone() else {
            return Err(Status::failed_precondition(
                "cluster: this broker is not a cluster member (no [cluster] section); \
                 leave out --cluster",
            ));
        };
        let state = self.state.clone();
        let (key, value) = (request.key.clone(), request.value.clone());
        tokio::task::spawn_blocking(move || state.config.check_set(&key, &value))
            .await
            .map_err(|err| Status::internal(format!("the configuration check panicked: {err}")))?
            .map_err(apply_status)?;
        crate::cluster::admin::propose_config(&node, &request.key, &request.value).await?;
        self.config_change(move |state| {
            state
                .config
                .set(&state.broker, &request.key, &request.value)
        })
        .await
    }

    /// Run a blocking configuration change off the runtime's workers.
    async fn config_change(
        &self,
        change: impl FnOnce(&ControlState) -> Result<ApplyOutcome, ApplyError> + Send + 'static,
    ) -> Result<pb::ConfigApplyResponse, Status> {
        let state = self.state.clone();
        let outcome = tokio::task::spawn_blocking(move || change(&state))
            .await
            .map_err(|err| Status::internal(format!("the configuration change panicked: {err}")))?
            .map_err(apply_status)?;
        Ok(outcome_to_pb(&outcome))
    }
}

#[tonic::async_trait]
impl pb::streams_server::Streams for AdminService {
    async fn create(
        &self,
        request: Request<pb::CreateStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let durability = durability_from_pb(request.durability)?;
            if let (Some(node), Some(factor)) = (&self.state.cluster, self.replication_factor()) {
                let retention =
                    retention_from_pb(request.retention_mib, request.retention_age_secs)?;
                let broker = &self.state.broker;
                let (info, copies) = crate::cluster::admin::create_replicated_stream(
                    node,
                    broker,
                    request.stream_id,
                    durability,
                    retention,
                    request.replication_factor,
                    factor,
                )
                .await?;
                tracing::info!(stream = request.stream_id, durability = %durability, copies, "stream created in the cluster");
                let mut reply = self.stream_to_pb(broker.shard_of(request.stream_id).id, &info);
                reply.replication_factor = copies;
                return Ok(Response::new(reply));
            }
            if let Some(factor) = request.replication_factor
                && factor != 1
            {
                let why = if self.state.cluster.is_some() {
                    "this cluster does not replicate stream data (cluster.replication_factor = 0)"
                } else {
                    "this broker runs one node"
                };
                return Err(Status::failed_precondition(format!(
                    "replication_factor: {factor}: {why} (allowed: 1)"
                )));
            }
            let retention = retention_from_pb(request.retention_mib, request.retention_age_secs)?;
            let broker = &self.state.broker;
            if let Some(node) = &self.state.cluster {
                crate::cluster::admin::propose_stream(node, broker, request.stream_id, durability)
                    .await?;
            }
            let created = broker
                .create_stream_retained(request.stream_id, durability, retention)
                .await;
            if created.is_err()
                && let Some(node) = &self.state.cluster
            {
                crate::cluster::admin::withdraw_stream(node, request.stream_id).await;
            }
            let info = created.map_err(stream_status)?;
            tracing::info!(stream = request.stream_id, durability = %durability, "stream created");
            Ok(Response::new(self.stream_to_pb(
                broker.shard_of(request.stream_id).id,
                &info,
            )))
        }
        .await;
        self.observe("stream_create", started, &result);
        result
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteStreamRequest>,
    ) -> Result<Response<pb::DeleteStreamResponse>, Status> {
        let started = Instant::now();
        let stream_id = request.into_inner().stream_id;
        let result = async {
            if let (Some(node), Some(_)) = (&self.state.cluster, self.replication_factor())
                && crate::cluster::admin::delete_replicated_stream(
                    node,
                    &self.state.broker,
                    stream_id,
                )
                .await?
            {
                tracing::info!(stream = stream_id, "stream deleted in the cluster");
                return Ok(Response::new(pb::DeleteStreamResponse { stream_id }));
            }
            if let Some(node) = &self.state.cluster {
                crate::cluster::admin::check_stream_here(node, stream_id)?;
            }
            self.state
                .broker
                .delete_stream(stream_id)
                .await
                .map_err(stream_status)?;
            tracing::info!(stream = stream_id, "stream deleted");
            if let Some(node) = &self.state.cluster {
                crate::cluster::admin::withdraw_stream(node, stream_id).await;
            }
            Ok(Response::new(pb::DeleteStreamResponse { stream_id }))
        }
        .await;
        self.observe("stream_delete", started, &result);
        result
    }

    async fn list(
        &self,
        _request: Request<pb::ListStreamsRequest>,
    ) -> Result<Response<pb::ListStreamsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let broker = &self.state.broker;
            let mut streams = Vec::new();
            for shard in broker.shards() {
                let infos = broker.shard_streams(shard).await.map_err(shard_status)?;
                streams.extend(infos.iter().map(|info| self.stream_to_pb(shard.id, info)));
            }
            streams.sort_by_key(|s| s.stream_id);
            Ok(Response::new(pb::ListStreamsResponse { streams }))
        }
        .await;
        self.observe("stream_list", started, &result);
        result
    }

    async fn describe(
        &self,
        request: Request<pb::DescribeStreamRequest>,
    ) -> Result<Response<pb::StreamInfo>, Status> {
        let started = Instant::now();
        let stream_id = request.into_inner().stream_id;
        let result = async {
            let broker = &self.state.broker;
            match broker.stream(stream_id).await.map_err(shard_status)? {
                Some(info) => Ok(Response::new(
                    self.stream_to_pb(broker.shard_of(stream_id).id, &info),
                )),
                None => Err(Status::not_found(format!("unknown stream {stream_id}"))),
            }
        }
        .await;
        self.observe("stream_describe", started, &result);
        result
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for AdminService {
    async fn status(
        &self,
        _request: Request<pb::BrokerStatusRequest>,
    ) -> Result<Response<pb::BrokerStatus>, Status> {
        let started = Instant::now();
        let state = &self.state;
        let broker = &state.broker;
        let shards: Vec<pb::ShardStatus> = broker
            .shards()
            .iter()
            .map(|shard| {
                let c = &shard.counters;
                let load =
                    |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
                let positions = shard.reader.positions();
                pb::ShardStatus {
                    id: shard.id,
                    backend: shard.backend.to_string(),
                    data_addr: shard.data_addr.to_string(),
                    core: shard.cpu.and_then(|cpu| u32::try_from(cpu).ok()),
                    frames_appended: load(&c.frames_appended),
                    bytes_appended: load(&c.bytes_appended),
                    datagrams: load(&c.datagrams),
                    duplicates: load(&c.duplicates),
                    gaps: load(&c.gaps),
                    retransmits_seen: load(&c.retransmits_seen),
                    errors: c.total_errors(),
                    acks_sent: load(&c.acks_sent),
                    appended_position: positions.appended,
                    written_position: positions.written,
                    synced_position: positions.synced,
                }
            })
            .collect();
        let xdp = match broker.xdp() {
            None => pb::XdpStatus {
                present: false,
                absent_reason: format!(
                    "no XDP program: the shards run the {} backend",
                    broker.shards().first().map_or("socket", |s| s.backend)
                ),
                ..Default::default()
            },
            Some(info) => match info.xdp.counters() {
                Ok(counts) => pb::XdpStatus {
                    present: true,
                    absent_reason: String::new(),
                    mode: info.xdp_mode.name().to_string(),
                    counters: kaelix_dataplane::af_xdp::Counter::ALL
                        .iter()
                        .map(|&reason| (reason.name().to_string(), counts.get(reason)))
                        .collect(),
                },
                Err(err) => pb::XdpStatus {
                    present: false,
                    absent_reason: format!(
                        "XDP program attached to {} ({}) but its counters cannot be read: {err}",
                        info.interface,
                        info.xdp_mode.name()
                    ),
                    mode: info.xdp_mode.name().to_string(),
                    counters: Default::default(),
                },
            },
        };
        let health = if broker.shards().iter().all(|s| s.is_running()) {
            "serving"
        } else {
            "degraded: a shard thread has stopped"
        };
        let result = Ok(Response::new(pb::BrokerStatus {
            health: health.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: state.started.elapsed().as_secs(),
            data_dir: broker.data_dir().display().to_string(),
            data_dir_temporary: broker.data_dir_is_temporary(),
            shards,
            xdp: Some(xdp),
            warnings: broker.warnings().to_vec(),
            pending_restart: state
                .config
                .pending_restart()
                .iter()
                .map(change_to_pb)
                .collect(),
            last_reload_error: state.config.last_error(),
            cores_available: std::thread::available_parallelism()
                .map_or(0, |n| u32::try_from(n.get()).unwrap_or(u32::MAX)),
        }));
        self.observe("broker_status", started, &result);
        result
    }
}

#[tonic::async_trait]
impl pb::config_server::Config for AdminService {
    async fn get(
        &self,
        request: Request<pb::ConfigGetRequest>,
    ) -> Result<Response<pb::ConfigGetResponse>, Status> {
        let started = Instant::now();
        let prefix = request.into_inner().key;
        let entries: Vec<pb::ConfigEntry> = self
            .state
            .config
            .entries()
            .into_iter()
            .filter(|entry| crate::config::key_is_under(&entry.key, &prefix))
            .map(|entry| pb::ConfigEntry {
                hot_reloadable: entry.apply == crate::config::Apply::Hot,
                source: entry.source.to_string(),
                key: entry.key,
                value: entry.value,
            })
            .collect();
        let result = if entries.is_empty() {
            Err(Status::not_found(format!(
                "unknown key {prefix:?} (kaelix config get lists the keys)"
            )))
        } else {
            Ok(Response::new(pb::ConfigGetResponse {
                entries,
                file: self
                    .state
                    .config
                    .file()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            }))
        };
        self.observe("config_get", started, &result);
        result
    }

    async fn set(
        &self,
        request: Request<pb::ConfigSetRequest>,
    ) -> Result<Response<pb::ConfigApplyResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        if request.cluster {
            let result = self.cluster_config_set(request).await.map(Response::new);
            self.observe("config_set", started, &result);
            return result;
        }
        let result = self
            .config_change(move |state| {
                state
                    .config
                    .set(&state.broker, &request.key, &request.value)
            })
            .await
            .map(Response::new);
        self.observe("config_set", started, &result);
        result
    }

    async fn reload(
        &self,
        _request: Request<pb::ConfigReloadRequest>,
    ) -> Result<Response<pb::ConfigApplyResponse>, Status> {
        let started = Instant::now();
        let result = self
            .config_change(|state| state.config.reload(&state.broker))
            .await
            .map(Response::new);
        self.observe("config_reload", started, &result);
        result
    }
}
