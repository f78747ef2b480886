//! Broker configuration: the schema, its validation, and which keys can
//! change while the broker runs.
//!
//! Every key has a default (see `config/default.toml`, embedded in the
//! binary), so an empty file is a valid configuration. Unknown keys are
//! errors. [`Config::validate`] reports every problem at once, each naming
//! the key, the value and what is allowed. Layering (file, then
//! `KAELIX__SECTION__KEY` environment variables, then flags) and the source
//! of each value live in [`crate::layers`].
//!
//! [`KEYS`] lists every key with [`Apply::Hot`] (applied to the running
//! broker on reload) or [`Apply::Restart`] (reported as waiting for a
//! restart); [`flatten`] and [`diff`] work on those keys.
//!
//! Validation is written out by hand rather than with garde: most fields
//! are types of `kaelix-dataplane` (which would need garde derives of its
//! own), and the rules that matter are across fields (retention against
//! segment size, ports against shard count), which garde would run as
//! custom functions anyway.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kaelix_dataplane::{ShardConfig, SocketConfig};
use kaelix_protocol::DurabilityLevel;
use serde::{Deserialize, Serialize};

/// The defaults, as a commented TOML file (also what `kaelix config defaults` prints).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../config/default.toml");

/// The whole broker configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Addresses, data directory, shards.
    #[serde(default)]
    pub broker: BrokerSection,
    /// Backend and loop settings.
    #[serde(default)]
    pub dataplane: DataplaneSection,
    /// Log settings.
    #[serde(default)]
    pub storage: StorageSection,
    /// Streams created at start (existing ones keep their data).
    #[serde(default)]
    pub streams: Vec<StreamSection>,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// The gRPC admin API.
    #[serde(default)]
    pub admin: AdminSection,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Reloading the file when it changes.
    #[serde(default)]
    pub reload: ReloadSection,
    /// Membership of a cluster (the metadata Raft group). Absent: the broker
    /// runs alone, as a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterSection>,
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str(DEFAULT_CONFIG_TOML)
            .expect("the embedded default configuration parses (checked by a unit test)")
    }
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// Where the logs live. Unset: a fresh temporary directory, removed at exit.
    pub data_dir: Option<PathBuf>,
    /// UDP data port of shard 0; shard N listens on this port + N.
    pub data_addr: SocketAddr,
    /// TCP address of the fetch protocol for remote consumers.
    pub fetch_addr: SocketAddr,
    /// Data-plane shards (one busy-poll thread and one log each). A stream
    /// belongs to shard `stream_id % shards`.
    pub shards: u32,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            data_dir: None,
            data_addr: "127.0.0.1:7000".parse().expect("valid literal"),
            fetch_addr: "127.0.0.1:7001".parse().expect("valid literal"),
            shards: 1,
        }
    }
}

/// Which receive/transmit backend the data plane uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Kernel UDP sockets (works everywhere).
    #[default]
    Socket,
    /// AF_XDP sockets with the XDP program attached to an interface.
    AfXdp,
    /// DPDK (builds with the `dpdk` feature only).
    Dpdk,
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataplaneSection {
    /// The backend.
    pub backend: BackendKind,
    /// Fail at start instead of falling back to sockets when the backend cannot be used.
    pub required: bool,
    /// The busy-poll loop.
    pub shard: ShardConfig,
    /// Socket backend settings.
    pub socket: SocketConfig,
    /// Cores for the shard threads: "auto" (NIC-local, leaving the first
    /// core to the OS), "none", or `{ list = [1, 2] }`.
    pub cores: kaelix_dataplane::CoreSelection,
    /// AF_XDP backend settings (`interface` is required with `backend = "af_xdp"`).
    pub af_xdp: kaelix_dataplane::af_xdp::AfXdpConfig,
    /// DPDK backend settings (`backend = "dpdk"`, builds with the `dpdk` feature;
    /// see docs/dpdk.md). `queues` follows `broker.shards`; `data_port` and
    /// `local_ipv4` default to `broker.data_addr`.
    pub dpdk: kaelix_dataplane::dpdk::DpdkConfig,
}

/// `[storage]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Segment size in MiB (an even number: segments are made of 2 MiB pages).
    pub segment_size_mib: u64,
    /// The flush level's fsync interval in milliseconds.
    pub flush_interval_ms: u64,
    /// Delete the oldest segments while a shard's log is larger than this many MiB.
    pub retention_mib: Option<u64>,
    /// Delete segments whose newest record is older than this many seconds.
    pub retention_age_secs: Option<u64>,
    /// Let local consumers in other processes map the log (`kaelix consume --local`).
    pub shared: bool,
    /// Live memory (hugepages or /dev/shm) of each shard's log at most, in
    /// MiB; beyond it producers get `overloaded` until the flusher catches
    /// up. Unset: [`LIVE_SEGMENTS_DEFAULT`] segments.
    pub live_memory_max_mib: Option<u64>,
}

/// Segments of live memory per shard when `storage.live_memory_max_mib` is
/// unset (1 GiB with the default 64 MiB segments).
pub const LIVE_SEGMENTS_DEFAULT: u64 = 16;

impl StorageSection {
    /// The live memory limit of each shard's log, in bytes.
    pub fn live_memory_max_bytes(&self) -> u64 {
        self.live_memory_max_mib
            .unwrap_or(LIVE_SEGMENTS_DEFAULT * self.segment_size_mib)
            .saturating_mul(1024 * 1024)
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            segment_size_mib: 64,
            flush_interval_ms: 100,
            retention_mib: None,
            retention_age_secs: None,
            shared: true,
            live_memory_max_mib: None,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// Filter in `tracing` EnvFilter syntax (`info`, `warn,kaelix_controlplane=debug`).
    pub level: String,
    /// `human` or `json`.
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// TCP address of the gRPC admin API.
    pub addr: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:7002".parse().expect("valid literal"),
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Serve Prometheus text at `http://ADDR/metrics`.
    pub enabled: bool,
    /// TCP address of the endpoint.
    pub addr: SocketAddr,
    /// How often the counters of the shards and logs are sampled, in milliseconds.
    pub sample_interval_ms: u64,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: "127.0.0.1:7003".parse().expect("valid literal"),
            sample_interval_ms: 1000,
        }
    }
}

/// `[reload]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSection {
    /// Reload the configuration file when it changes on disk.
    pub watch: bool,
    /// Changes closer together than this (an editor's save) count as one, in milliseconds.
    pub debounce_ms: u64,
}

impl Default for ReloadSection {
    fn default() -> Self {
        Self {
            watch: true,
            debounce_ms: 200,
        }
    }
}

/// `[cluster]`: this broker as a member of the metadata Raft group
/// (`kaelix cluster init|join|leave|status`; see docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// This node's id: unique in the cluster, never reused (1 or more).
    pub node_id: u64,
    /// TCP address of the cluster gRPC server (Raft between brokers).
    pub addr: SocketAddr,
    /// `host:port` the other members use to reach `addr`. Unset: the bound
    /// address (which must then not be a wildcard like 0.0.0.0).
    pub advertise_addr: Option<String>,
    /// Directory of the Raft log, vote and snapshots. Unset:
    /// `broker.data_dir`/cluster (one of the two must be set: a temporary
    /// directory would forget the node's votes).
    pub data_dir: Option<PathBuf>,
    /// Leader heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout range in milliseconds (each term draws a value in it).
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range.
    pub election_timeout_max_ms: u64,
    /// Copies of every shard's log kept in the cluster (the leader's
    /// included); 0 turns data replication off (each broker serves its own
    /// shards alone). Shards get their replica sets once this many members
    /// have registered.
    pub replication_factor: u32,
    /// TCP address of the data replication listener (followers of the
    /// shards this broker leads connect there). Port 0 picks a free port.
    pub replication_addr: SocketAddr,
    /// A shard leader that does not answer the controller for this long
    /// (milliseconds) loses its shards to the most complete live replica.
    pub failover_after_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            node_id: 0,
            addr: "127.0.0.1:7004".parse().expect("valid literal"),
            advertise_addr: None,
            data_dir: None,
            heartbeat_ms: 50,
            election_timeout_min_ms: 150,
            election_timeout_max_ms: 300,
            replication_factor: 0,
            replication_addr: "127.0.0.1:7005".parse().expect("valid literal"),
            failover_after_ms: 1000,
        }
    }
}

impl ClusterSection {
    /// Where the Raft files live (`data_dir`, else `broker_data_dir`/cluster).
    pub fn raft_dir(&self, broker_data_dir: Option<&Path>) -> Option<PathBuf> {
        self.data_dir
            .clone()
            .or_else(|| broker_data_dir.map(|dir| dir.join("cluster")))
    }
}

/// One `[[streams]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// Stream id (what producers put in the frame header).
    pub id: u32,
    /// When appends are acknowledged: memory, flush or fsync.
    #[serde(with = "durability_name", default)]
    pub durability: DurabilityLevel,
}

mod durability_name {
    use kaelix_protocol::DurabilityLevel;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        level: &DurabilityLevel,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(level.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DurabilityLevel, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key, dotted (`storage.segment_size_mib`).
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
    /// Where the bad value came from (`file broker.toml`, `env KAELIX__BROKER__SHARDS`), when known.
    pub origin: Option<String>,
}

impl ConfigProblem {
    /// A problem with `key` of unknown origin.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
            origin: None,
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{} (from {origin}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has keys/types we do not accept.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Values out of range; every problem is listed.
    #[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

impl Config {
    /// Parse TOML text (over the defaults) and validate it. Unknown keys,
    /// wrong types and out-of-range values are all reported together.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: err.to_string(),
        })?;
        let (config, mut problems) = Self::from_table(table);
        if let Err(ConfigError::Invalid { problems: invalid }) = config.validate() {
            problems.extend(invalid);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// Deserialize a table, collecting every unknown key and wrongly typed
    /// value (each one dropped, so its default applies) instead of stopping
    /// at the first. The result is not validated.
    pub fn from_table(mut table: toml::Table) -> (Self, Vec<ConfigProblem>) {
        let mut problems = Vec::new();
        // `streams` is the only array: its entries are checked one by one so
        // that every bad entry is reported under its own index.
        let streams = match table.remove("streams") {
            None => None,
            Some(toml::Value::Array(entries)) => {
                let mut streams = Vec::new();
                for (index, entry) in entries.into_iter().enumerate() {
                    let prefix = format!("streams[{index}]");
                    let Some(stream) =
                        deserialize_collecting::<StreamSection>(entry, &prefix, &mut problems)
                    else {
                        continue;
                    };
                    streams.push(stream);
                }
                Some(streams)
            }
            Some(other) => {
                problems.push(ConfigProblem::new(
                    "streams",
                    format!(
                        "expected an array of tables ([[streams]]), found {}",
                        other.type_str()
                    ),
                ));
                None
            }
        };
        let mut config =
            deserialize_collecting::<Config>(toml::Value::Table(table), "", &mut problems)
                .unwrap_or_default();
        if let Some(streams) = streams {
            config.streams = streams;
        }
        (config, problems)
    }

    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Check every value; all problems are reported together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut problem =
            |key: &str, message: String| problems.push(ConfigProblem::new(key, message));
        let shards = self.broker.shards;
        if !(1..=64).contains(&shards) {
            problem(
                "broker.shards",
                format!("{shards} is out of range (allowed: 1 to 64)"),
            );
        }
        if self.broker.data_addr.port() == 0 && shards > 1 {
            problem(
                "broker.data_addr",
                "port 0 (pick any) works only with broker.shards = 1: shard N listens on port + N"
                    .into(),
            );
        }
        if u32::from(self.broker.data_addr.port()) + shards.saturating_sub(1) > 65_535 {
            problem(
                "broker.data_addr",
                format!(
                    "port {} + {} shards runs past 65535",
                    self.broker.data_addr.port(),
                    shards
                ),
            );
        }
        let segment = self.storage.segment_size_mib;
        if segment < 2 || !segment.is_multiple_of(2) || segment > 4096 {
            problem(
                "storage.segment_size_mib",
                format!("{segment} is not allowed (an even number from 2 to 4096)"),
            );
        }
        let flush = self.storage.flush_interval_ms;
        if !(1..=60_000).contains(&flush) {
            problem(
                "storage.flush_interval_ms",
                format!("{flush} is out of range (allowed: 1 to 60000)"),
            );
        }
        if let Some(retention) = self.storage.retention_mib
            && retention < 2 * segment
        {
            problem(
                "storage.retention_mib",
                format!(
                    "{retention} is below two segments ({} MiB); retention keeps whole segments",
                    2 * segment
                ),
            );
        }
        // The log keeps `live_segments_max` live segments and needs one more to roll.
        let live_segments_min = kaelix_storage::LogConfig::new("").live_segments_max as u64 + 1;
        if let Some(live) = self.storage.live_memory_max_mib
            && live < live_segments_min * segment
        {
            problem(
                "storage.live_memory_max_mib",
                format!(
                    "{live} is below {} MiB ({live_segments_min} segments of storage.segment_size_mib)",
                    live_segments_min * segment
                ),
            );
        }
        if self.storage.retention_age_secs == Some(0) {
            problem(
                "storage.retention_age_secs",
                "0 would delete data at once (allowed: 1 or more)".into(),
            );
        }
        let window = self.dataplane.shard.credit_window;
        if !(1..=1 << 20).contains(&window) {
            problem(
                "dataplane.shard.credit_window",
                format!("{window} is out of range (allowed: 1 to 1048576 frames)"),
            );
        }
        if self.dataplane.shard.max_flows == 0 {
            problem("dataplane.shard.max_flows", "must be at least 1".into());
        }
        if self.dataplane.backend == BackendKind::Dpdk && !cfg!(feature = "dpdk") {
            problem(
                "dataplane.backend",
                "\"dpdk\" needs a build with the `dpdk` feature (allowed here: socket, af_xdp)"
                    .into(),
            );
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problem(
                "log.level",
                format!(
                    "{:?} is not a log filter ({err}); allowed: error, warn, info, debug, trace, \
                     or per-target directives like \"info,kaelix_controlplane=debug\"",
                    self.log.level
                ),
            );
        }
        let sample = self.metrics.sample_interval_ms;
        if !(10..=60_000).contains(&sample) {
            problem(
                "metrics.sample_interval_ms",
                format!("{sample} is out of range (allowed: 10 to 60000)"),
            );
        }
        let debounce = self.reload.debounce_ms;
        if !(10..=60_000).contains(&debounce) {
            problem(
                "reload.debounce_ms",
                format!("{debounce} is out of range (allowed: 10 to 60000)"),
            );
        }
        let mut ports: Vec<(&str, SocketAddr)> = vec![
            ("broker.fetch_addr", self.broker.fetch_addr),
            ("admin.addr", self.admin.addr),
        ];
        if self.metrics.enabled {
            ports.push(("metrics.addr", self.metrics.addr));
        }
        if let Some(cluster) = &self.cluster {
            ports.push(("cluster.addr", cluster.addr));
            if cluster.replication_factor > 0 {
                ports.push(("cluster.replication_addr", cluster.replication_addr));
            }
            self.validate_cluster(cluster, &mut problem);
        }
        for (index, (key, addr)) in ports.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((other, _)) = ports[..index].iter().find(|(_, a)| a == addr) {
                problem(key, format!("{addr} is already used by {other}"));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (index, stream) in self.streams.iter().enumerate() {
            if !seen.insert(stream.id) {
                problem(
                    &format!("streams[{index}].id"),
                    format!("stream {} is listed twice", stream.id),
                );
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    fn validate_cluster(&self, cluster: &ClusterSection, problem: &mut impl FnMut(&str, String)) {
        if cluster.node_id == 0 {
            problem(
                "cluster.node_id",
                "0 is not a node id; set a number unique in the cluster (allowed: 1 or more)"
                    .into(),
            );
        }
        match &cluster.advertise_addr {
            Some(addr) => {
                let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
                });
                if !valid {
                    problem(
                        "cluster.advertise_addr",
                        format!("{addr:?} is not HOST:PORT with a port from 1 to 65535"),
                    );
                }
            }
            None if cluster.addr.ip().is_unspecified() => problem(
                "cluster.addr",
                format!(
                    "{} is a wildcard address the other members cannot dial: set \
                     cluster.advertise_addr (HOST:PORT they can reach)",
                    cluster.addr
                ),
            ),
            None => {}
        }
        if cluster.raft_dir(self.broker.data_dir.as_deref()).is_none() {
            problem(
                "cluster.data_dir",
                "unset, and broker.data_dir is unset too: the Raft log needs a directory that \
                 outlives the process (set either)"
                    .into(),
            );
        }
        let heartbeat = cluster.heartbeat_ms;
        if !(1..=10_000).contains(&heartbeat) {
            problem(
                "cluster.heartbeat_ms",
                format!("{heartbeat} is out of range (allowed: 1 to 10000)"),
            );
        }
        let (min, max) = (
            cluster.election_timeout_min_ms,
            cluster.election_timeout_max_ms,
        );
        if !(10..=60_000).contains(&min) || min <= heartbeat {
            problem(
                "cluster.election_timeout_min_ms",
                format!(
                    "{min} is not allowed (10 to 60000, and above cluster.heartbeat_ms = {heartbeat})"
                ),
            );
        }
        if cluster.replication_factor > 7 {
            problem(
                "cluster.replication_factor",
                format!(
                    "{} is out of range (allowed: 0 = off, 1 to 7)",
                    cluster.replication_factor
                ),
            );
        }
        if cluster.replication_factor > 0 && cluster.replication_addr.ip().is_unspecified() {
            problem(
                "cluster.replication_addr",
                format!(
                    "{} is a wildcard address; the other members need one they can dial",
                    cluster.replication_addr
                ),
            );
        }
        if !(10..=60_000).contains(&cluster.failover_after_ms) {
            problem(
                "cluster.failover_after_ms",
                format!(
                    "{} is out of range (allowed: 10 to 60000)",
                    cluster.failover_after_ms
                ),
            );
        }
        if max <= min || max > 120_000 {
            problem(
                "cluster.election_timeout_max_ms",
                format!(
                    "{max} is not allowed (above cluster.election_timeout_min_ms = {min}, at most 120000)"
                ),
            );
        }
    }

    /// The UDP address of shard `shard`.
    pub fn shard_data_addr(&self, shard: u32) -> SocketAddr {
        let mut addr = self.broker.data_addr;
        if addr.port() != 0 {
            addr.set_port(addr.port() + shard as u16);
        }
        addr
    }
}

/// Deserialize `value` as `T`; on an unknown key or a wrongly typed value,
/// record the problem under `prefix` + its path, drop that key and try
/// again, until it deserializes or nothing more can be dropped.
fn deserialize_collecting<T: serde::de::DeserializeOwned>(
    mut value: toml::Value,
    prefix: &str,
    problems: &mut Vec<ConfigProblem>,
) -> Option<T> {
    let reported_from = problems.len();
    // Each round drops one key, so this ends; the cap guards against a
    // deserializer error that names no key we can drop.
    for _ in 0..256 {
        let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => return Some(parsed),
            Err(err) => err,
        };
        let mut path: Vec<String> = Vec::new();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
                serde_path_to_error::Segment::Seq { index } => path.push(index.to_string()),
                // An enum in TOML is `{ variant = { ... } }`: the variant is a key.
                serde_path_to_error::Segment::Enum { variant } => path.push(variant.clone()),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = err.into_inner().message().to_string();
        // An unknown field's error comes with the path of its table; the
        // field is named in the message.
        if let Some(field) = unknown_field(&message)
            && path.last().map(String::as_str) != Some(field)
        {
            path.push(field.to_string());
        }
        let key = join_key(prefix, &path);
        let message = match (unknown_field(&message), message.split_once(", expected ")) {
            (Some(_), Some((_, allowed))) => format!(
                "unknown key (allowed here: {})",
                allowed.trim_start_matches("one of ")
            ),
            (Some(_), None) => "unknown key".to_string(),
            (None, _) => match value_at(&value, &path) {
                // Name the value when the deserializer's message does not.
                Some(found) if !message.contains(found.trim_matches('"')) => {
                    format!("{message} (found {found})")
                }
                _ => message,
            },
        };
        // Dropping a bad key can leave its table incomplete (an enum variant
        // without a field): that follow-on error is not reported again.
        let follow_on = problems[reported_from..]
            .iter()
            .any(|p| key_is_under(&p.key, &key));
        if !follow_on {
            problems.push(ConfigProblem::new(key, message));
        }
        // Drop the bad key (or, when the path names no value, the closest
        // table that holds one) so the next round gets further.
        let removed = (1..=path.len())
            .rev()
            .any(|len| remove_path(&mut value, &path[..len]));
        if !removed {
            return None;
        }
    }
    None
}

/// The value at `path`, in TOML syntax.
fn value_at(value: &toml::Value, path: &[String]) -> Option<String> {
    let mut current = value;
    for part in path {
        current = match current {
            toml::Value::Table(table) => table.get(part)?,
            toml::Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value_text(current))
}

/// The field named by serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

fn join_key(prefix: &str, path: &[String]) -> String {
    let mut key = prefix.to_string();
    for part in path {
        if part.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// Remove the value at `path`; false when there is none.
fn remove_path(value: &mut toml::Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for part in parents {
        current = match current {
            toml::Value::Table(table) => match table.get_mut(part) {
                Some(next) => next,
                None => return false,
            },
            toml::Value::Array(items) => {
                match part.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(next) => next,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match current {
        toml::Value::Table(table) => table.remove(last).is_some(),
        toml::Value::Array(items) => match last.parse::<usize>() {
            Ok(index) if index < items.len() => {
                items.remove(index);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// When a change to a key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// On reload, without dropping or duplicating traffic.
    Hot,
    /// At the next start; a reload reports it as waiting.
    Restart,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Dotted key.
    pub key: &'static str,
    /// When a change takes effect.
    pub apply: Apply,
}

const fn hot(key: &'static str) -> KeySpec {
    KeySpec {
        key,
        apply: Apply::Hot,
    }
}

const fn restart(key: &'static str) -> KeySpec {
    KeySpec {
        key,
        apply: Apply::Restart,
    }
}

/// The keys this module knows: every hot key, and the tables and arrays
/// that count as one key (`dataplane.shard.idle`, `streams`). A key not
/// listed here (a section added later, `dataplane.af_xdp.interface`) needs a
/// restart, which is the safe default.
pub const KEYS: &[KeySpec] = &[
    restart("broker.data_dir"),
    restart("broker.data_addr"),
    restart("broker.fetch_addr"),
    restart("broker.shards"),
    restart("dataplane.backend"),
    restart("dataplane.required"),
    hot("dataplane.shard.credit_window"),
    restart("dataplane.shard.max_flows"),
    restart("dataplane.shard.initial_flows"),
    hot("dataplane.shard.idle"),
    restart("storage.segment_size_mib"),
    restart("storage.flush_interval_ms"),
    hot("storage.retention_mib"),
    hot("storage.retention_age_secs"),
    restart("storage.shared"),
    restart("storage.live_memory_max_mib"),
    restart("streams"),
    hot("log.level"),
    restart("log.format"),
    restart("admin.addr"),
    restart("metrics.enabled"),
    restart("metrics.addr"),
    restart("metrics.sample_interval_ms"),
    restart("reload.watch"),
    restart("reload.debounce_ms"),
    restart("cluster.node_id"),
    restart("cluster.addr"),
    restart("cluster.advertise_addr"),
    restart("cluster.data_dir"),
    restart("cluster.heartbeat_ms"),
    restart("cluster.election_timeout_min_ms"),
    restart("cluster.election_timeout_max_ms"),
    restart("cluster.replication_factor"),
    restart("cluster.replication_addr"),
    restart("cluster.failover_after_ms"),
];

/// The listed spec of `key` or of the key holding it
/// (`dataplane.shard.idle.adaptive.park_us` belongs to `dataplane.shard.idle`,
/// `streams[0].id` to `streams`).
pub fn key_spec(key: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|spec| {
        key == spec.key
            || key
                .strip_prefix(spec.key)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    })
}

/// When a change to `key` takes effect ([`Apply::Restart`] unless listed hot).
pub fn apply_of(key: &str) -> Apply {
    key_spec(key).map_or(Apply::Restart, |spec| spec.apply)
}

/// True when `key` is `prefix` or inside it (`storage` selects
/// `storage.retention_mib`); the empty prefix selects everything.
pub fn key_is_under(key: &str, prefix: &str) -> bool {
    prefix.is_empty()
        || key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// Every key of `config` with its value in TOML syntax (an empty string for
/// an unset optional key), sorted by key. Tables listed in [`KEYS`] are one
/// key; other tables are walked down to their leaves.
pub fn flatten(config: &Config) -> BTreeMap<String, String> {
    fn walk(value: &toml::Value, key: &str, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) if !KEYS.iter().any(|spec| spec.key == key) => {
                for (name, inner) in table {
                    let inner_key = if key.is_empty() {
                        name.clone()
                    } else {
                        format!("{key}.{name}")
                    };
                    walk(inner, &inner_key, out);
                }
            }
            other => {
                out.insert(key.to_string(), value_text(other));
            }
        }
    }
    let root = toml::Value::try_from(config)
        .expect("a Config always serializes (plain data, string keys)");
    let mut out = BTreeMap::new();
    walk(&root, "", &mut out);
    for spec in KEYS {
        let known_table = out.keys().any(|key| key_is_under(key, spec.key));
        if !known_table {
            // An unset optional key (None is not serialized).
            out.insert(spec.key.to_string(), String::new());
        }
    }
    out
}

/// A value in TOML syntax, on one line.
pub fn value_text(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(table) => {
            let inner: Vec<String> = table
                .iter()
                .map(|(k, v)| format!("{k} = {}", value_text(v)))
                .collect();
            if inner.is_empty() {
                "{}".into()
            } else {
                format!("{{ {} }}", inner.join(", "))
            }
        }
        toml::Value::Array(items) => format!(
            "[{}]",
            items.iter().map(value_text).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// One key whose value differs between two configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// Dotted key.
    pub key: String,
    /// Value before (TOML syntax; empty when unset).
    pub old: String,
    /// Value after.
    pub new: String,
    /// When it takes effect.
    pub apply: Apply,
}

/// The keys whose values differ, sorted by key.
pub fn diff(old: &Config, new: &Config) -> Vec<KeyChange> {
    let old = flatten(old);
    let new = flatten(new);
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let before = old.get(key).cloned().unwrap_or_default();
            let after = new.get(key).cloned().unwrap_or_default();
            (before != after).then(|| KeyChange {
                key: key.clone(),
                old: before,
                new: after,
                apply: apply_of(key),
            })
        })
        .collect()
}

impl Config {
    /// `running` with the hot keys of `wanted` (what a reload puts in force;
    /// the restart keys keep their running values).
    pub fn with_hot_values_of(&self, wanted: &Config) -> Config {
        let mut next = self.clone();
        next.dataplane.shard.credit_window = wanted.dataplane.shard.credit_window;
        next.dataplane.shard.idle = wanted.dataplane.shard.idle;
        next.storage.retention_mib = wanted.storage.retention_mib;
        next.storage.retention_age_secs = wanted.storage.retention_age_secs;
        next.log.level = wanted.log.level.clone();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_validate() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.dataplane.backend, BackendKind::Socket);
        assert!(!config.streams.is_empty());
        assert_eq!(
            Config::from_toml("", Path::new("empty.toml"))
                .unwrap()
                .broker,
            BrokerSection::default()
        );
    }

    #[test]
    fn live_memory_limit_defaults_to_sixteen_segments_and_is_checked() {
        let config = Config::default();
        assert_eq!(config.storage.live_memory_max_bytes(), 1 << 30);
        let text = "[storage]\nsegment_size_mib = 8\nlive_memory_max_mib = 24\n";
        let err = Config::from_toml(text, Path::new("bad.toml")).unwrap_err();
        let ConfigError::Invalid { problems } = &err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 1, "{err}");
        assert_eq!(problems[0].key, "storage.live_memory_max_mib");
        assert!(problems[0].message.contains("below 40 MiB"), "{err}");
        let text = "[storage]\nsegment_size_mib = 8\nlive_memory_max_mib = 40\n";
        let config = Config::from_toml(text, Path::new("ok.toml")).unwrap();
        assert_eq!(config.storage.live_memory_max_bytes(), 40 << 20);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [broker]
            shards = 0
            [storage]
            segment_size_mib = 3
            flush_interval_ms = 0
            [[streams]]
            id = 1
            [[streams]]
            id = 1
            durability = "fsync"
        "#;
        let err = Config::from_toml(text, Path::new("bad.toml")).unwrap_err();
        let ConfigError::Invalid { problems } = &err else {
            panic!("{err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "broker.shards",
                "storage.segment_size_mib",
                "storage.flush_interval_ms",
                "streams[1].id"
            ]
        );
        assert!(err.to_string().contains("allowed: 1 to 64"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_parse_errors() {
        let err = Config::from_toml("[broker]\nshardz = 2\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("shardz"), "{err}");
        let err =
            Config::from_toml("[broker]\nshards = \"two\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("shards"), "{err}");
        let err = Config::from_toml(
            "[[streams]]\nid = 1\ndurability = \"quorum\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("quorum"), "{err}");
        let err = Config::from_toml("[broker\n", Path::new("x.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    #[test]
    fn the_rust_defaults_match_the_embedded_file() {
        let from_file = Config::default();
        let from_rust = Config {
            broker: BrokerSection::default(),
            dataplane: DataplaneSection::default(),
            storage: StorageSection::default(),
            streams: from_file.streams.clone(),
            log: LogSection::default(),
            admin: AdminSection::default(),
            metrics: MetricsSection::default(),
            reload: ReloadSection::default(),
            cluster: None,
        };
        assert_eq!(diff(&from_rust, &from_file), vec![]);
        assert_eq!(from_rust, from_file);
    }

    #[test]
    fn every_listed_key_is_a_key_of_config() {
        let mut config = Config::default();
        config.broker.data_dir = Some("/x".into());
        config.storage.retention_mib = Some(1024);
        config.storage.retention_age_secs = Some(60);
        let keys = flatten(&config);
        for spec in KEYS {
            assert!(
                keys.get(spec.key).is_some_and(|value| !value.is_empty())
                    || keys.keys().any(|key| key_is_under(key, spec.key)),
                "{} in KEYS is not a key of Config",
                spec.key
            );
        }
        assert_eq!(keys["dataplane.shard.idle"], config_idle_text());
        assert_eq!(
            apply_of("dataplane.shard.idle.adaptive.park_us"),
            Apply::Hot
        );
        assert_eq!(apply_of("streams[0].id"), Apply::Restart);
        assert_eq!(apply_of("some.future.key"), Apply::Restart);
    }

    fn config_idle_text() -> String {
        "{ adaptive = { park_us = 10000, spin_cycles = 20000, yield_cycles = 200 } }".into()
    }

    #[test]
    fn a_reload_takes_exactly_the_hot_keys() {
        let running = Config::default();
        let wanted = Config::from_toml(
            r#"
            [broker]
            shards = 2
            data_addr = "127.0.0.1:9000"
            [dataplane.shard]
            credit_window = 64
            max_flows = 100
            idle = "spin"
            [storage]
            retention_mib = 1024
            retention_age_secs = 3600
            flush_interval_ms = 5
            [log]
            level = "debug"
            format = "json"
            "#,
            Path::new("x.toml"),
        )
        .unwrap();
        let next = running.with_hot_values_of(&wanted);
        let applied: Vec<String> = diff(&running, &next).into_iter().map(|c| c.key).collect();
        let mut hot: Vec<String> = KEYS
            .iter()
            .filter(|s| s.apply == Apply::Hot)
            .map(|s| s.key.to_string())
            .collect();
        hot.sort();
        assert_eq!(applied, hot);
        assert!(
            diff(&next, &wanted)
                .iter()
                .all(|c| c.apply == Apply::Restart)
        );
        assert_eq!(
            diff(&running, &next)
                .iter()
                .find(|c| c.key == "storage.retention_mib")
                .map(|c| (c.old.as_str(), c.new.as_str())),
            Some(("", "1024"))
        );
    }

    #[test]
    fn cluster_section_is_optional_defaulted_and_validated() {
        assert_eq!(Config::default().cluster, None);
        let config = Config::from_toml(
            "[broker]\ndata_dir = \"/var/lib/kaelix\"\n[cluster]\nnode_id = 3\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let cluster = config.cluster.clone().unwrap();
        assert_eq!(cluster.node_id, 3);
        assert_eq!(cluster.heartbeat_ms, 50);
        assert_eq!(
            (
                cluster.election_timeout_min_ms,
                cluster.election_timeout_max_ms
            ),
            (150, 300)
        );
        assert_eq!(
            cluster.raft_dir(config.broker.data_dir.as_deref()),
            Some(PathBuf::from("/var/lib/kaelix/cluster"))
        );
        assert_eq!(apply_of("cluster.node_id"), Apply::Restart);
        let text = r#"
            [admin]
            addr = "0.0.0.0:7004"
            [cluster]
            node_id = 0
            addr = "0.0.0.0:7004"
            heartbeat_ms = 200
            election_timeout_min_ms = 100
            election_timeout_max_ms = 100
        "#;
        let err = Config::from_toml(text, Path::new("x.toml")).unwrap_err();
        let ConfigError::Invalid { problems } = &err else {
            panic!("{err}")
        };
        let mut keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "cluster.addr",
                "cluster.addr",
                "cluster.data_dir",
                "cluster.election_timeout_max_ms",
                "cluster.election_timeout_min_ms",
                "cluster.node_id",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("advertise_addr"), "{err}");
        assert!(
            err.to_string().contains("already used by admin.addr"),
            "{err}"
        );
        let err = Config::from_toml(
            "[cluster]\nnode_id = 1\ndata_dir = \"/x\"\nadvertise_addr = \"nohost\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("cluster.advertise_addr"), "{err}");
    }

    #[test]
    fn several_bad_streams_are_each_reported() {
        let text = r#"
            [[streams]]
            id = 1
            durability = "quorum"
            [[streams]]
            durability = "fsync"
            [[streams]]
            id = 3
            colour = "red"
            [[streams]]
            id = 4
        "#;
        let err = Config::from_toml(text, Path::new("x.toml")).unwrap_err();
        let ConfigError::Invalid { problems } = &err else {
            panic!("{err}")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["streams[0].durability", "streams[1]", "streams[2].colour"],
            "{err}"
        );
        assert!(problems[0].message.contains("quorum"), "{err}");
        assert!(problems[1].message.contains("id"), "{err}");
    }
}
