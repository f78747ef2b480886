//! `kaelix stream|broker|config`: the admin verbs, over the broker's gRPC
//! admin API (the generated client in `kaelix_controlplane::pb`).
//! Tables for people, `--json` for scripts; on failure one line on stderr
//! (`kaelix: ...`) and exit status 1.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets};
use kaelix_controlplane::config::ConfigError;
use kaelix_controlplane::layers::ConfigLayers;
use kaelix_controlplane::pb;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// How to reach the admin API, and how to print.
#[derive(Debug, Args)]
pub struct Conn {
    /// Admin API address (the broker's `admin.addr`).
    #[arg(long, env = "KAELIX_ADMIN", default_value = kaelix_controlplane::pb::DEFAULT_ADMIN_ADDR, global = true)]
    pub(crate) admin: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS", global = true)]
    pub(crate) timeout: u64,
}

/// `kaelix stream`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kaelix stream create 7 --durability fsync
  kaelix stream create 8 --retention-mib 512 --retention-age-secs 3600
  kaelix stream list
  kaelix stream describe 7 --json
  kaelix stream delete 7
  kaelix stream list --admin 127.0.0.1:7002   (or KAELIX_ADMIN=...)")]
pub struct StreamArgs {
    #[command(subcommand)]
    command: StreamCommand,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum StreamCommand {
    /// Create a stream.
    Create {
        /// Stream id (what producers put in the frame header).
        id: u32,
        /// When appends are acknowledged.
        #[arg(long, value_enum, default_value_t = DurabilityArg::Memory)]
        durability: DurabilityArg,
        /// Copies in a cluster (a single-node broker takes 1 only).
        #[arg(long)]
        replication_factor: Option<u32>,
        /// The stream's own size retention: keep at least its newest N MiB.
        /// Its first offset moves forward (older offsets are no longer
        /// served); the shard log's retention frees the space.
        #[arg(long, value_name = "MIB")]
        retention_mib: Option<u64>,
        /// The stream's own age retention: keep at least what was appended
        /// in the last N seconds (older offsets are no longer served).
        #[arg(long, value_name = "SECS")]
        retention_age_secs: Option<u64>,
    },
    /// Delete a stream (its offsets are never reused).
    Delete {
        /// Stream id.
        id: u32,
    },
    /// List the streams.
    List,
    /// Offsets, size, append rate and durability of one stream.
    Describe {
        /// Stream id.
        id: u32,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Memory,
    Flush,
    Fsync,
    /// A quorum of the shard's replicas holds it in memory.
    Replicated,
    /// A quorum of the shard's replicas has it fsynced.
    #[value(name = "replicated_fsync", alias = "replicated+fsync")]
    ReplicatedFsync,
}

/// `kaelix broker`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kaelix broker status
  kaelix broker status --json | jq .shards")]
pub struct BrokerArgs {
    #[command(subcommand)]
    command: BrokerCommand,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum BrokerCommand {
    /// Health, version, shards (backend, core, counters, log positions), XDP,
    /// warnings and configuration changes waiting for a restart.
    Status,
}

/// `kaelix config`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  kaelix config get                     every key: value, source, hot or restart
  kaelix config get storage             the keys under [storage]
  kaelix config set log.level debug     hot keys only; kept until the broker stops
  kaelix config set storage.retention_mib 4096
  kaelix config set log.level debug --cluster   on every member of the cluster
  kaelix config reload                  re-read the file (as on SIGHUP)
  kaelix config check broker.toml       validate a file; starts nothing")]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The configuration in force, with the source of each value.
    Get {
        /// A key or a prefix (`storage`); all keys when left out.
        key: Option<String>,
    },
    /// Change a hot-reloadable key on the running broker.
    Set {
        /// Dotted key (`log.level`).
        key: String,
        /// TOML value (`4096`, `true`, `"debug"`); a bare word is a string.
        value: String,
        /// Set it on every cluster member, through the Raft metadata (each
        /// member applies it as it commits; members restarted later take it back).
        #[arg(long)]
        cluster: bool,
    },
    /// Re-read the configuration file and apply what changed.
    Reload,
    /// Validate a configuration file (every problem, with its key) without
    /// starting anything.
    Check {
        /// The file.
        file: PathBuf,
        /// Also apply this shell's `KAELIX__*` variables, as `kaelix serve` would.
        #[arg(long)]
        with_env: bool,
    },
}

/// A failure, printed as one line.
pub(crate) struct Failure(pub(crate) String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(err.to_string())
    }
}

/// A multi-line message (a list of configuration problems) on one line.
pub(crate) fn one_line(message: &str) -> String {
    message
        .replace(":\n  - ", ": ")
        .replace("\n  - ", "; ")
        .replace('\n', "; ")
}

pub(crate) fn status_line(context: &str, status: tonic::Status) -> Failure {
    let message = one_line(status.message());
    Failure(format!("{context}: {message} ({:?})", status.code()))
}

/// Run `kaelix stream ...`.
pub fn stream(args: StreamArgs) -> anyhow::Result<()> {
    finish(block_on(&args.conn, stream_inner(args.command, &args.conn)))
}

/// Run `kaelix broker ...`.
pub fn broker(args: BrokerArgs) -> anyhow::Result<()> {
    finish(block_on(&args.conn, broker_inner(args.command, &args.conn)))
}

/// Run `kaelix config ...`.
pub fn config(args: ConfigArgs) -> anyhow::Result<()> {
    if let ConfigCommand::Check { file, with_env } = &args.command {
        return finish(check(file, *with_env, args.conn.json));
    }
    finish(block_on(&args.conn, config_inner(args.command, &args.conn)))
}

pub(crate) fn finish(result: Result<(), Failure>) -> anyhow::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(Failure(message)) => {
            eprintln!("kaelix: {}", one_line(&message));
            std::process::exit(1);
        }
    }
}

pub(crate) fn block_on<F: std::future::Future<Output = Result<(), Failure>>>(
    conn: &Conn,
    future: F,
) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_secs(conn.timeout.max(1));
    runtime.block_on(async {
        match tokio::time::timeout(timeout, future).await {
            Ok(result) => result,
            Err(_) => Err(Failure(format!(
                "no answer from the admin API at {} within {}s",
                conn.admin,
                timeout.as_secs()
            ))),
        }
    })
}

pub(crate) async fn channel(conn: &Conn) -> Result<Channel, Failure> {
    let uri = if conn.admin.contains("://") {
        conn.admin.clone()
    } else {
        format!("http://{}", conn.admin)
    };
    let endpoint = Channel::from_shared(uri.clone())
        .map_err(|err| Failure(format!("--admin {}: {err}", conn.admin)))?
        .connect_timeout(Duration::from_secs(conn.timeout.max(1)));
    endpoint.connect().await.map_err(|err| {
        let cause = std::error::Error::source(&err).map_or(String::new(), |s| format!(": {s}"));
        Failure(format!(
            "cannot reach the admin API at {}{cause} (is `kaelix serve` running? set --admin or KAELIX_ADMIN)",
            conn.admin
        ))
    })
}

pub(crate) fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("a JSON value always serializes")
    );
}

pub(crate) fn new_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_style(presets::NOTHING);
    table.set_header(header.iter().map(|h| h.to_ascii_uppercase()));
    table
}

fn durability_name(value: i32) -> &'static str {
    match pb::Durability::try_from(value) {
        Ok(pb::Durability::Memory | pb::Durability::Unspecified) => "memory",
        Ok(pb::Durability::Flush) => "flush",
        Ok(pb::Durability::Fsync) => "fsync",
        Ok(pb::Durability::Replicated) => "replicated",
        Ok(pb::Durability::ReplicatedFsync) => "replicated_fsync",
        Err(_) => "unknown",
    }
}

fn stream_json(info: &pb::StreamInfo) -> Value {
    json!({
        "stream_id": info.stream_id,
        "durability": durability_name(info.durability),
        "shard": info.shard,
        "first_offset": info.first_offset,
        "next_offset": info.next_offset,
        "stored_messages": info.stored_messages,
        "append_rate_per_sec": info.append_rate_per_sec,
        "shard_log_bytes": info.shard_log_bytes,
        "replication_factor": info.replication_factor,
        "retention_mib": info.retention_mib,
        "retention_age_secs": info.retention_age_secs,
    })
}

fn retention_text(mib: Option<u64>, age_secs: Option<u64>) -> String {
    match (mib, age_secs) {
        (None, None) => "shard log's only".into(),
        (mib, age) => [
            mib.map(|m| format!("{m} MiB")),
            age.map(|a| format!("{a} s")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    }
}

fn rate_text(rate: Option<f64>) -> String {
    rate.map_or("-".into(), |r| format!("{r:.1}/s"))
}

async fn stream_inner(command: StreamCommand, conn: &Conn) -> Result<(), Failure> {
    let mut client = pb::streams_client::StreamsClient::new(channel(conn).await?);
    match command {
        StreamCommand::Create {
            id,
            durability,
            replication_factor,
            retention_mib,
            retention_age_secs,
        } => {
            let durability = match durability {
                DurabilityArg::Memory => pb::Durability::Memory,
                DurabilityArg::Flush => pb::Durability::Flush,
                DurabilityArg::Fsync => pb::Durability::Fsync,
                DurabilityArg::Replicated => pb::Durability::Replicated,
                DurabilityArg::ReplicatedFsync => pb::Durability::ReplicatedFsync,
            };
            let info = client
                .create(pb::CreateStreamRequest {
                    stream_id: id,
                    durability: durability.into(),
                    replication_factor,
                    retention_mib,
                    retention_age_secs,
                })
                .await
                .map_err(|s| status_line(&format!("stream create {id}"), s))?
                .into_inner();
            if conn.json {
                print_json(&stream_json(&info));
            } else {
                println!(
                    "created stream {} ({}, shard {}, next offset {})",
                    info.stream_id,
                    durability_name(info.durability),
                    info.shard,
                    info.next_offset
                );
            }
        }
        StreamCommand::Delete { id } => {
            client
                .delete(pb::DeleteStreamRequest { stream_id: id })
                .await
                .map_err(|s| status_line(&format!("stream delete {id}"), s))?;
            if conn.json {
                print_json(&json!({ "deleted": id }));
            } else {
                println!("deleted stream {id}");
            }
        }
        StreamCommand::List => {
            let streams = client
                .list(pb::ListStreamsRequest {})
                .await
                .map_err(|s| status_line("stream list", s))?
                .into_inner()
                .streams;
            if conn.json {
                print_json(&Value::Array(streams.iter().map(stream_json).collect()));
                return Ok(());
            }
            let mut table = new_table(&[
                "stream",
                "durability",
                "shard",
                "first offset",
                "next offset",
                "stored",
                "rate",
            ]);
            for s in &streams {
                table.add_row(vec![
                    s.stream_id.to_string(),
                    durability_name(s.durability).to_string(),
                    s.shard.to_string(),
                    s.first_offset.to_string(),
                    s.next_offset.to_string(),
                    s.stored_messages.to_string(),
                    rate_text(s.append_rate_per_sec),
                ]);
            }
            println!("{table}");
        }
        StreamCommand::Describe { id } => {
            let info = client
                .describe(pb::DescribeStreamRequest { stream_id: id })
                .await
                .map_err(|s| status_line(&format!("stream describe {id}"), s))?
                .into_inner();
            if conn.json {
                print_json(&stream_json(&info));
                return Ok(());
            }
            let mut table = new_table(&["field", "value"]);
            for (field, value) in [
                ("stream", info.stream_id.to_string()),
                ("durability", durability_name(info.durability).to_string()),
                ("shard", info.shard.to_string()),
                ("first offset", info.first_offset.to_string()),
                ("next offset", info.next_offset.to_string()),
                ("stored messages", info.stored_messages.to_string()),
                ("append rate", rate_text(info.append_rate_per_sec)),
                ("shard log bytes", info.shard_log_bytes.to_string()),
                ("replication factor", info.replication_factor.to_string()),
                (
                    "retention",
                    retention_text(info.retention_mib, info.retention_age_secs),
                ),
            ] {
                table.add_row(vec![field.to_string(), value]);
            }
            println!("{table}");
        }
    }
    Ok(())
}

fn change_json(change: &pb::ConfigChange) -> Value {
    json!({ "key": change.key, "old": change.old_value, "new": change.new_value })
}

async fn broker_inner(command: BrokerCommand, conn: &Conn) -> Result<(), Failure> {
    let BrokerCommand::Status = command;
    let mut client = pb::broker_client::BrokerClient::new(channel(conn).await?);
    let status = client
        .status(pb::BrokerStatusRequest {})
        .await
        .map_err(|s| status_line("broker status", s))?
        .into_inner();
    let xdp = status.xdp.clone().unwrap_or_default();
    if conn.json {
        let shards: Vec<Value> = status
            .shards
            .iter()
            .map(|s| {
                json!({
                    "id": s.id, "backend": s.backend, "data_addr": s.data_addr, "core": s.core,
                    "frames_appended": s.frames_appended, "bytes_appended": s.bytes_appended,
                    "datagrams": s.datagrams, "duplicates": s.duplicates, "gaps": s.gaps,
                    "retransmits_seen": s.retransmits_seen, "errors": s.errors,
                    "acks_sent": s.acks_sent, "appended_position": s.appended_position,
                    "written_position": s.written_position, "synced_position": s.synced_position,
                })
            })
            .collect();
        print_json(&json!({
            "health": status.health,
            "version": status.version,
            "uptime_secs": status.uptime_secs,
            "data_dir": status.data_dir,
            "data_dir_temporary": status.data_dir_temporary,
            "cores_available": status.cores_available,
            "shards": shards,
            "xdp": {
                "present": xdp.present,
                "absent_reason": if xdp.present { Value::Null } else { json!(xdp.absent_reason) },
                "mode": xdp.mode,
                "counters": xdp.counters,
            },
            "warnings": status.warnings,
            "pending_restart": status.pending_restart.iter().map(change_json).collect::<Vec<_>>(),
            "last_reload_error": status.last_reload_error,
        }));
        return Ok(());
    }
    println!(
        "health {}  version {}  uptime {}s  cores {}",
        status.health, status.version, status.uptime_secs, status.cores_available
    );
    println!(
        "data dir {}{}",
        status.data_dir,
        if status.data_dir_temporary {
            " (temporary)"
        } else {
            ""
        }
    );
    let mut table = new_table(&[
        "shard",
        "backend",
        "data addr",
        "core",
        "frames",
        "bytes",
        "dups",
        "retransmits",
        "errors",
        "unsynced bytes",
    ]);
    for s in &status.shards {
        table.add_row(vec![
            s.id.to_string(),
            s.backend.clone(),
            s.data_addr.clone(),
            s.core.map_or("-".into(), |c| c.to_string()),
            s.frames_appended.to_string(),
            s.bytes_appended.to_string(),
            s.duplicates.to_string(),
            s.retransmits_seen.to_string(),
            s.errors.to_string(),
            s.appended_position
                .saturating_sub(s.synced_position)
                .to_string(),
        ]);
    }
    println!("{table}");
    if xdp.present {
        let counters: Vec<String> = xdp
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("xdp: {} mode, {}", xdp.mode, counters.join(" "));
    } else {
        println!("xdp: absent ({})", xdp.absent_reason);
    }
    for warning in &status.warnings {
        println!("warning: {warning}");
    }
    for change in &status.pending_restart {
        println!(
            "waits for a restart: {} = {} (running: {})",
            change.key,
            empty_as_unset(&change.new_value),
            empty_as_unset(&change.old_value)
        );
    }
    if let Some(error) = &status.last_reload_error {
        println!(
            "last reload rejected (old configuration kept): {}",
            one_line(error)
        );
    }
    Ok(())
}

fn empty_as_unset(value: &str) -> &str {
    if value.is_empty() { "(unset)" } else { value }
}

fn print_outcome(response: &pb::ConfigApplyResponse, json_out: bool) {
    if json_out {
        print_json(&json!({
            "applied": response.applied.iter().map(change_json).collect::<Vec<_>>(),
            "restart_required": response.restart_required.iter().map(change_json).collect::<Vec<_>>(),
        }));
        return;
    }
    if response.applied.is_empty() {
        println!("nothing changed that can be applied while running");
    }
    for change in &response.applied {
        println!(
            "applied {}: {} -> {}",
            change.key,
            empty_as_unset(&change.old_value),
            empty_as_unset(&change.new_value)
        );
    }
    for change in &response.restart_required {
        println!(
            "needs a restart {}: {} (running: {})",
            change.key,
            empty_as_unset(&change.new_value),
            empty_as_unset(&change.old_value)
        );
    }
}

async fn config_inner(command: ConfigCommand, conn: &Conn) -> Result<(), Failure> {
    let mut client = pb::config_client::ConfigClient::new(channel(conn).await?);
    match command {
        ConfigCommand::Get { key } => {
            let key = key.unwrap_or_default();
            let response = client
                .get(pb::ConfigGetRequest { key: key.clone() })
                .await
                .map_err(|s| status_line("config get", s))?
                .into_inner();
            if conn.json {
                let entries: Vec<Value> = response
                    .entries
                    .iter()
                    .map(|e| {
                        json!({
                            "key": e.key, "value": e.value, "source": e.source,
                            "hot_reloadable": e.hot_reloadable,
                        })
                    })
                    .collect();
                print_json(&json!({ "file": response.file, "entries": entries }));
                return Ok(());
            }
            let mut table = new_table(&["key", "value", "source", "reload"]);
            for e in &response.entries {
                table.add_row(vec![
                    e.key.clone(),
                    empty_as_unset(&e.value).to_string(),
                    e.source.clone(),
                    if e.hot_reloadable { "hot" } else { "restart" }.to_string(),
                ]);
            }
            println!("{table}");
        }
        ConfigCommand::Set {
            key,
            value,
            cluster,
        } => {
            let response = client
                .set(pb::ConfigSetRequest {
                    key: key.clone(),
                    value,
                    cluster,
                })
                .await
                .map_err(|s| status_line(&format!("config set {key}"), s))?
                .into_inner();
            print_outcome(&response, conn.json);
        }
        ConfigCommand::Reload => {
            let response = client
                .reload(pb::ConfigReloadRequest {})
                .await
                .map_err(|s| status_line("config reload", s))?
                .into_inner();
            print_outcome(&response, conn.json);
        }
        ConfigCommand::Check { .. } => unreachable!("handled without a connection"),
    }
    Ok(())
}

fn check(file: &std::path::Path, with_env: bool, json_out: bool) -> Result<(), Failure> {
    let mut layers = ConfigLayers::new(Some(file.to_path_buf()));
    if with_env {
        layers = layers.with_process_env();
    }
    match layers.resolve() {
        Ok(_) => {
            if json_out {
                print_json(&json!({ "file": file.display().to_string(), "valid": true }));
            } else {
                println!("{}: valid", file.display());
            }
            Ok(())
        }
        Err(ConfigError::Invalid { problems }) => {
            if json_out {
                let list: Vec<Value> = problems
                    .iter()
                    .map(|p| json!({ "key": p.key, "message": p.message, "origin": p.origin }))
                    .collect();
                print_json(
                    &json!({ "file": file.display().to_string(), "valid": false, "problems": list }),
                );
            } else {
                for problem in &problems {
                    println!("{problem}");
                }
            }
            Err(Failure(format!(
                "{}: {} problem{} (listed above)",
                file.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            )))
        }
        Err(err) => Err(Failure(err.to_string())),
    }
}
