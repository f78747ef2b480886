//! Broker configuration: a TOML file over embedded defaults, validated as a whole.
//!
//! Every key has a default (see `config/default.toml`, embedded in the
//! binary), so an empty file is a valid configuration. Unknown keys are
//! errors. [`Config::validate`] reports every problem at once, each naming
//! the key, the value and what is allowed.

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
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            segment_size_mib: 64,
            flush_interval_ms: 100,
            retention_mib: None,
            retention_age_secs: None,
            shared: true,
        }
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
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
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
    /// Parse TOML text (over the defaults) and validate it.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: err.to_string(),
        })?;
        config.validate()?;
        Ok(config)
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
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.to_string(),
                message,
            })
        };
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
        if segment < 2 || segment % 2 != 0 || segment > 4096 {
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

    /// The UDP address of shard `shard`.
    pub fn shard_data_addr(&self, shard: u32) -> SocketAddr {
        let mut addr = self.broker.data_addr;
        if addr.port() != 0 {
            addr.set_port(addr.port() + shard as u16);
        }
        addr
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
}
