//! Layered configuration and the source of every value.
//!
//! Precedence, lowest first:
//!
//! 1. the embedded defaults (`config/default.toml`), or the file when one is
//!    given (keys it leaves out keep their defaults, as in [`Config::from_toml`]);
//! 2. environment variables `KAELIX__SECTION__KEY` (`KAELIX__STORAGE__RETENTION_MIB=4096`,
//!    `KAELIX__DATAPLANE__SHARD__CREDIT_WINDOW=1024`; the separator is a double
//!    underscore because keys contain single ones), plus `KAELIX_LOG` for
//!    `log.level` and `KAELIX_LOG_FORMAT` for `log.format`;
//! 3. command-line flags (`--data-dir`, `--set KEY=VALUE`);
//! 4. values set on the running broker through the admin API
//!    (`kaelix config set`), which stay until the broker stops.
//!
//! A value is TOML (`4096`, `true`, `"debug"`, `{ adaptive = { ... } }`);
//! text that is not valid TOML counts as a string, so
//! `KAELIX__LOG__LEVEL=debug` works without quotes.
//!
//! [`ConfigLayers::resolve`] merges the layers, then parses and validates the
//! result as a whole: every problem is reported, each with its key and the
//! layer the bad value came from.

use std::path::{Path, PathBuf};

use crate::config::{Apply, Config, ConfigError, ConfigProblem, KEYS, apply_of, flatten};

/// Prefix of the environment variables that set keys.
pub const ENV_PREFIX: &str = "KAELIX__";

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The embedded defaults.
    Default,
    /// The configuration file.
    File(PathBuf),
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (as typed, `--data-dir`).
    Flag(String),
    /// `kaelix config set` on the running broker.
    Admin,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Admin => write!(f, "admin"),
        }
    }
}

/// The layers a configuration is built from. Keep it to rebuild the
/// configuration when the file changes (the other layers stay).
#[derive(Debug, Clone, Default)]
pub struct ConfigLayers {
    file: Option<PathBuf>,
    /// (variable, key, value) in the order read.
    env: Vec<(String, String, toml::Value)>,
    /// (flag, key, value).
    flags: Vec<(String, String, toml::Value)>,
    /// (key, value) from the admin API.
    admin: Vec<(String, toml::Value)>,
}

/// A merged, parsed and validated configuration with the source of each value.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The configuration.
    pub config: Config,
    /// Where each key's value came from.
    pub sources: Sources,
}

/// Where values came from: keys as set by each layer, lowest precedence first.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    set: Vec<(String, Source)>,
}

/// One key of the effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dotted key.
    pub key: String,
    /// Value in TOML syntax (empty when unset).
    pub value: String,
    /// Where it came from.
    pub source: Source,
    /// When a change takes effect.
    pub apply: Apply,
}

/// Parse a value as TOML; text that is not TOML is a string.
pub fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// The key an environment variable sets, if it is one of ours.
pub fn env_key(name: &str) -> Option<String> {
    match name {
        "KAELIX_LOG" => return Some("log.level".into()),
        "KAELIX_LOG_FORMAT" => return Some("log.format".into()),
        _ => {}
    }
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return None;
    }
    Some(parts.join("."))
}

impl ConfigLayers {
    /// Start from `file` (or the embedded defaults) with no other layer.
    pub fn new(file: Option<PathBuf>) -> Self {
        Self {
            file,
            ..Self::default()
        }
    }

    /// Add the variables among `vars` that set keys (see [`env_key`]).
    pub fn with_env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| env_key(name).is_some())
            .collect();
        // The process environment has no order; make precedence between
        // two variables for one key (KAELIX_LOG vs KAELIX__LOG__LEVEL) stable.
        vars.sort();
        for (name, value) in vars {
            let key = env_key(&name).expect("filtered above");
            self.env.push((name, key, parse_value(&value)));
        }
        self
    }

    /// Add this process's `KAELIX__*` variables.
    pub fn with_process_env(self) -> Self {
        self.with_env(std::env::vars())
    }

    /// A flag that sets `key` (`--data-dir` sets `broker.data_dir`).
    pub fn flag(&mut self, flag: &str, key: &str, value: toml::Value) {
        self.flags.push((flag.to_string(), key.to_string(), value));
    }

    /// `--set KEY=VALUE`.
    pub fn set_flag(&mut self, assignment: &str) -> Result<(), ConfigProblem> {
        let Some((key, value)) = assignment.split_once('=') else {
            return Err(ConfigProblem::new(
                assignment,
                "expected KEY=VALUE (for example storage.retention_mib=4096)",
            ));
        };
        self.flag("--set", key.trim(), parse_value(value.trim()));
        Ok(())
    }

    /// A value set through the admin API (replaces an earlier one for the same key).
    pub fn set_admin(&mut self, key: &str, value: toml::Value) {
        self.admin.retain(|(k, _)| k != key);
        self.admin.push((key.to_string(), value));
    }

    /// The configuration file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Merge, parse and validate. Every problem is reported, with its key
    /// and where the value came from.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let mut sources = Sources::default();
        let mut table = match &self.file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let table: toml::Table =
                    toml::from_str(&text).map_err(|err| ConfigError::Parse {
                        path: path.clone(),
                        message: err.to_string(),
                    })?;
                record_file_keys(&table, "", path, &mut sources);
                table
            }
            None => toml::from_str(crate::config::DEFAULT_CONFIG_TOML)
                .expect("the embedded default configuration parses (checked by a unit test)"),
        };
        let mut problems = Vec::new();
        let layered = self
            .env
            .iter()
            .map(|(name, key, value)| (Source::Env(name.clone()), key, value))
            .chain(
                self.flags
                    .iter()
                    .map(|(flag, key, value)| (Source::Flag(flag.clone()), key, value)),
            )
            .chain(
                self.admin
                    .iter()
                    .map(|(key, value)| (Source::Admin, key, value)),
            );
        for (source, key, value) in layered {
            if let Err(message) = insert(&mut table, key, value.clone()) {
                problems.push(ConfigProblem {
                    key: key.clone(),
                    message,
                    origin: Some(source.to_string()),
                });
                continue;
            }
            sources.set.push((key.clone(), source));
        }
        let (config, parse_problems) = Config::from_table(table);
        problems.extend(parse_problems);
        if let Err(ConfigError::Invalid { problems: invalid }) = config.validate() {
            problems.extend(invalid);
        }
        if problems.is_empty() {
            return Ok(Resolved { config, sources });
        }
        for problem in &mut problems {
            if problem.origin.is_none() {
                let source = sources.source_of(&problem.key);
                if source != Source::Default {
                    problem.origin = Some(source.to_string());
                }
            }
        }
        Err(ConfigError::Invalid { problems })
    }
}

/// Record the keys a file sets: each known key present, and any other leaf
/// (so an unknown key's problem names the file).
fn record_file_keys(table: &toml::Table, prefix: &str, path: &Path, sources: &mut Sources) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let is_known_key = KEYS.iter().any(|spec| spec.key == key);
        match value {
            toml::Value::Table(inner) if !is_known_key => {
                record_file_keys(inner, &key, path, sources)
            }
            _ => sources.set.push((key, Source::File(path.to_path_buf()))),
        }
    }
}

/// Put `value` at dotted `key`, creating tables on the way.
fn insert(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields at least one part");
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            other => {
                return Err(format!(
                    "cannot set a key inside {part}, which is a {}",
                    other.type_str()
                ));
            }
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// True when one key is the other or holds it.
fn related(a: &str, b: &str) -> bool {
    crate::config::key_is_under(a, b) || crate::config::key_is_under(b, a)
}

impl Sources {
    /// Where the value of `key` came from: the last layer that set it, a
    /// table holding it, or a key inside it.
    pub fn source_of(&self, key: &str) -> Source {
        self.set
            .iter()
            .rev()
            .find(|(set, _)| !set.is_empty() && related(set, key))
            .map_or(Source::Default, |(_, source)| source.clone())
    }

    /// These sources, except that `keys` keep their sources from `old` (keys
    /// whose new value waits for a restart keep the running value's source).
    pub fn keeping(&self, keys: &[String], old: &Sources) -> Sources {
        let held = |set: &str| keys.iter().any(|key| related(set, key));
        let mut set: Vec<(String, Source)> = self
            .set
            .iter()
            .filter(|(key, _)| !held(key))
            .cloned()
            .collect();
        set.extend(old.set.iter().filter(|(key, _)| held(key)).cloned());
        Sources { set }
    }
}

impl Resolved {
    /// Every key with its value, source and reload behaviour.
    pub fn entries(&self) -> Vec<Entry> {
        entries(&self.config, &self.sources)
    }
}

/// Every key of `config` with its value, source and reload behaviour.
pub fn entries(config: &Config, sources: &Sources) -> Vec<Entry> {
    flatten(config)
        .into_iter()
        .map(|(key, value)| Entry {
            source: sources.source_of(&key),
            apply: apply_of(&key),
            key,
            value,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("broker.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn entry<'a>(entries: &'a [Entry], key: &str) -> &'a Entry {
        entries.iter().find(|e| e.key == key).unwrap()
    }

    #[test]
    fn file_then_env_then_flags_then_admin_with_sources() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[broker]\nshards = 2\n[storage]\nretention_mib = 512\nflush_interval_ms = 50\n",
        );
        let mut layers = ConfigLayers::new(Some(path.clone())).with_env([
            (
                "KAELIX__STORAGE__RETENTION_MIB".to_string(),
                "1024".to_string(),
            ),
            ("KAELIX__LOG__LEVEL".to_string(), "debug".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ]);
        layers.flag(
            "--data-dir",
            "broker.data_dir",
            toml::Value::String("/tmp/x".into()),
        );
        layers.set_flag("storage.retention_mib=2048").unwrap();
        let resolved = layers.resolve().unwrap();
        let config = &resolved.config;
        assert_eq!(config.broker.shards, 2);
        assert_eq!(config.storage.retention_mib, Some(2048));
        assert_eq!(config.storage.flush_interval_ms, 50);
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.broker.data_dir, Some(PathBuf::from("/tmp/x")));
        // A file without [[streams]] has none.
        assert!(config.streams.is_empty());

        let entries = resolved.entries();
        assert_eq!(
            entry(&entries, "broker.shards").source,
            Source::File(path.clone())
        );
        assert_eq!(
            entry(&entries, "storage.retention_mib").source,
            Source::Flag("--set".into())
        );
        assert_eq!(
            entry(&entries, "log.level").source,
            Source::Env("KAELIX__LOG__LEVEL".into())
        );
        assert_eq!(
            entry(&entries, "broker.data_dir").source,
            Source::Flag("--data-dir".into())
        );
        assert_eq!(
            entry(&entries, "storage.segment_size_mib").source,
            Source::Default
        );
        assert_eq!(entry(&entries, "storage.retention_mib").value, "2048");
        assert_eq!(entry(&entries, "storage.retention_mib").apply, Apply::Hot);
        assert_eq!(entry(&entries, "broker.shards").apply, Apply::Restart);

        layers.set_admin("storage.retention_mib", toml::Value::Integer(4096));
        let resolved = layers.resolve().unwrap();
        assert_eq!(resolved.config.storage.retention_mib, Some(4096));
        assert_eq!(
            entry(&resolved.entries(), "storage.retention_mib").source,
            Source::Admin
        );
    }

    #[test]
    fn no_file_means_the_embedded_defaults_with_their_streams() {
        let resolved = ConfigLayers::new(None).resolve().unwrap();
        assert_eq!(resolved.config, Config::default());
        assert!(
            resolved
                .entries()
                .iter()
                .all(|e| e.source == Source::Default)
        );
    }

    #[test]
    fn table_valued_keys_from_the_environment() {
        let resolved = ConfigLayers::new(None)
            .with_env([
                (
                    "KAELIX__DATAPLANE__SHARD__IDLE".to_string(),
                    "spin".to_string(),
                ),
                (
                    "KAELIX__STREAMS".to_string(),
                    r#"[{ id = 9, durability = "fsync" }]"#.to_string(),
                ),
                ("KAELIX_LOG".to_string(), "warn".to_string()),
            ])
            .resolve()
            .unwrap();
        assert_eq!(
            resolved.config.dataplane.shard.idle,
            kaelix_dataplane::IdleStrategy::Spin
        );
        assert_eq!(resolved.config.streams.len(), 1);
        assert_eq!(resolved.config.streams[0].id, 9);
        assert_eq!(resolved.config.log.level, "warn");
        assert_eq!(
            resolved.sources.source_of("streams"),
            Source::Env("KAELIX__STREAMS".into())
        );
    }

    #[test]
    fn every_problem_names_its_key_and_layer() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[broker]\nshards = 0\nshardz = 1\n[storage]\nflush_interval_ms = \"soon\"\n",
        );
        let mut layers = ConfigLayers::new(Some(path)).with_env([
            (
                "KAELIX__STORAGE__SEGMENT_SIZE_MIB".to_string(),
                "3".to_string(),
            ),
            ("KAELIX__STORAGE__SEGMENTS".to_string(), "3".to_string()),
        ]);
        layers.set_flag("log.level=info,,=bad[").unwrap();
        let err = layers.resolve().unwrap_err();
        let ConfigError::Invalid { problems } = &err else {
            panic!("{err}")
        };
        let described: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let find = |key: &str| {
            problems
                .iter()
                .find(|p| p.key == key)
                .unwrap_or_else(|| panic!("no problem for {key}: {described:#?}"))
        };
        assert!(
            find("broker.shardz").message.contains("unknown key"),
            "{described:#?}"
        );
        assert!(
            find("broker.shardz").message.contains("`shards`"),
            "{described:#?}"
        );
        assert!(
            find("storage.flush_interval_ms").message.contains("soon"),
            "{described:#?}"
        );
        assert!(find("broker.shards").message.contains("allowed: 1 to 64"));
        assert_eq!(
            find("storage.segment_size_mib").origin.as_deref(),
            Some("env KAELIX__STORAGE__SEGMENT_SIZE_MIB")
        );
        assert_eq!(
            find("storage.segments").origin.as_deref(),
            Some("env KAELIX__STORAGE__SEGMENTS")
        );
        assert_eq!(find("log.level").origin.as_deref(), Some("flag --set"));
        assert!(
            find("broker.shards")
                .origin
                .as_deref()
                .unwrap()
                .starts_with("file ")
        );
        assert_eq!(problems.len(), 6, "{described:#?}");
    }

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        assert_eq!(parse_value("4096"), toml::Value::Integer(4096));
        assert_eq!(parse_value("true"), toml::Value::Boolean(true));
        assert_eq!(parse_value("\"x\""), toml::Value::String("x".into()));
        assert_eq!(
            parse_value("127.0.0.1:7000"),
            toml::Value::String("127.0.0.1:7000".into())
        );
        assert_eq!(
            env_key("KAELIX__BROKER__DATA_ADDR").as_deref(),
            Some("broker.data_addr")
        );
        assert_eq!(env_key("KAELIX_CONFIG"), None);
        assert_eq!(env_key("KAELIX____X"), None);
    }
}
