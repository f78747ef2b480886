//! `kaelix serve`: run a broker until Ctrl-C / SIGTERM, with the admin API,
//! the Prometheus endpoint and configuration reloads (file change, SIGHUP,
//! `kaelix config reload`) on a small tokio runtime beside the shards.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use std::sync::Arc;

use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::config::Config;
use kaelix_controlplane::config::DEFAULT_CONFIG_TOML;
use kaelix_controlplane::fetch::{FetchServerConfig, FetchServerThread, broker_logs};
use kaelix_controlplane::layers::ConfigLayers;
use kaelix_controlplane::reload::ConfigManager;
use kaelix_controlplane::server::ControlPlane;

/// Options of `kaelix serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); keys not in it keep their defaults.
    /// `KAELIX__SECTION__KEY` variables override it, flags override both.
    #[arg(long, short, env = "KAELIX_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override `broker.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Override `broker.data_addr` (UDP data port of shard 0).
    #[arg(long)]
    pub data_addr: Option<std::net::SocketAddr>,
    /// Override `broker.fetch_addr` (TCP fetch protocol).
    #[arg(long)]
    pub fetch_addr: Option<std::net::SocketAddr>,
    /// Override `admin.addr` (gRPC admin API).
    #[arg(long)]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Override `metrics.addr` (Prometheus text at /metrics).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Override any key: `--set storage.retention_mib=4096` (repeatable; TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    pub print_defaults: bool,
}

fn layers(args: &ServeArgs) -> anyhow::Result<ConfigLayers> {
    let mut layers = ConfigLayers::new(args.config.clone()).with_process_env();
    let text = |value: String| toml::Value::String(value);
    if let Some(dir) = &args.data_dir {
        layers.flag(
            "--data-dir",
            "broker.data_dir",
            text(dir.display().to_string()),
        );
    }
    for (flag, key, addr) in [
        ("--data-addr", "broker.data_addr", args.data_addr),
        ("--fetch-addr", "broker.fetch_addr", args.fetch_addr),
        ("--admin-addr", "admin.addr", args.admin_addr),
        ("--metrics-addr", "metrics.addr", args.metrics_addr),
    ] {
        if let Some(addr) = addr {
            layers.flag(flag, key, text(addr.to_string()));
        }
    }
    for assignment in &args.set {
        layers
            .set_flag(assignment)
            .map_err(|problem| anyhow::anyhow!("--set {problem}"))?;
    }
    Ok(layers)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.print_defaults {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    let layers = layers(&args)?;
    // Every problem of the file, the environment and the flags at once.
    let resolved = layers.resolve()?;
    let config = resolved.config.clone();
    kaelix_controlplane::logging::apply(&config.log.level, config.log.format)
        .map_err(|err| anyhow::anyhow!("log.level {err}"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kaelix-control")
        .enable_all()
        .build()
        .context("starting the control plane runtime")?;
    // With data replication the Raft node starts first: a former shard
    // leader learns who leads now and drops the tail that leader lacks
    // before its shards open (a running shard cannot truncate its log).
    let replicated = config
        .cluster
        .as_ref()
        .is_some_and(|cluster| cluster.replication_factor > 0);
    let early_node = if replicated {
        let node = runtime.block_on(crate::cluster::start_node(
            &config,
            config.shard_data_addr(0).to_string(),
        ))?;
        if let Some(node) = &node {
            let warnings = runtime.block_on(kaelix_controlplane::cluster::catch_up_before_start(
                &config, node,
            ));
            for warning in warnings {
                tracing::warn!("{warning}");
            }
        }
        Some(node)
    } else {
        None
    };
    let broker = Broker::start(&config).context("starting the broker")?;
    for warning in broker.warnings() {
        tracing::warn!("{warning}");
    }
    for shard in broker.shards() {
        tracing::info!(
            shard = shard.id,
            backend = shard.backend,
            data_addr = %shard.data_addr,
            "shard running"
        );
    }
    tracing::info!(
        data_dir = %broker.data_dir().display(),
        temporary = broker.data_dir_is_temporary(),
        streams = ?config.streams.iter().map(|s| (s.id, s.durability.name())).collect::<Vec<_>>(),
        "broker ready"
    );
    // --- TCP fetch server for remote consumers ---
    let fetch = match start_fetch_server(&broker, &config) {
        Ok(fetch) => fetch,
        Err(err) => {
            let _ = broker.shutdown();
            return Err(err);
        }
    };
    println!(
        "kaelix broker ready: data {} (udp), fetch {} (tcp), data dir {}",
        broker.shards()[0].data_addr,
        fetch.local_addr(),
        broker.data_dir().display()
    );

    // --- control plane: admin API, metrics, reloads (issue 6) ---
    let broker = runtime.block_on(async move {
        let started = match early_node {
            Some(node) => Ok(node),
            None => {
                let data_addr = broker.shards()[0].data_addr.to_string();
                crate::cluster::start_node(&config, data_addr).await
            }
        };
        let cluster = match started {
            Ok(cluster) => cluster,
            Err(error) => {
                let _ = broker.shutdown();
                return Err(error);
            }
        };
        let manager = ConfigManager::new(layers, resolved);
        let mut control =
            match ControlPlane::start_clustered(broker, manager, cluster.clone()).await {
                Ok(control) => control,
                Err(failed) => {
                    let (error, broker) = *failed;
                    if let Some(node) = &cluster {
                        node.shutdown().await;
                    }
                    // Stop the shards cleanly before reporting.
                    let _ = broker.shutdown();
                    return Err(anyhow::Error::new(error).context("starting the control plane"));
                }
            };
        control
            .reload_on_sighup()
            .context("installing the SIGHUP handler")?;
        let metrics = control
            .metrics_addr()
            .map_or("off".to_string(), |addr| format!("http://{addr}/metrics"));
        println!(
            "kaelix admin ready: grpc {}, metrics {metrics}",
            control.admin_addr()
        );
        wait_for_stop().await?;
        tracing::info!("stopping: flushing and syncing the logs");
        let broker = control.shutdown().await;
        if let Some(node) = cluster {
            node.shutdown().await;
        }
        Ok::<_, anyhow::Error>(broker)
    })?;
    drop(runtime);
    // --- end control plane ---

    fetch.shutdown();
    broker.shutdown().map_err(|err| anyhow::anyhow!(err))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Serve fetches from every shard's log on `broker.fetch_addr`. A stream is
/// served up to what is durable at the level its log registers for it
/// (consumers never see data a crash could take back), streams created at
/// runtime included; a stream the broker does not have is `unknown_stream`.
fn start_fetch_server(broker: &Broker, config: &Config) -> anyhow::Result<FetchServerThread> {
    let readers = broker
        .shards()
        .iter()
        .map(|shard| shard.reader.clone())
        .collect();
    let source = broker_logs(readers);
    let threads = 1;
    FetchServerThread::spawn(
        config.broker.fetch_addr,
        Arc::new(source),
        FetchServerConfig::default(),
        threads,
    )
    .with_context(|| format!("starting the fetch server on {}", config.broker.fetch_addr))
}

/// Until SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_stop() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}
