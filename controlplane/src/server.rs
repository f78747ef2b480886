//! The control plane beside a running [`Broker`]: the gRPC admin API, the
//! Prometheus endpoint and its sampler, and configuration reloads (file
//! watch, SIGHUP, admin call), all on the caller's tokio runtime. The data
//! plane is reached only through its command queues and atomics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify_debouncer_full::notify::RecursiveMode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminService;
use crate::broker::Broker;
use crate::cluster::ClusterNode;
use crate::metrics::{StreamRates, Telemetry};
use crate::pb;
use crate::reload::ConfigManager;

/// What every handler shares.
pub struct ControlState {
    /// The broker.
    pub broker: Arc<Broker>,
    /// The configuration in force.
    pub config: Arc<ConfigManager>,
    /// The metrics recorder.
    pub telemetry: Telemetry,
    /// Append rates by stream, from the sampler.
    pub rates: StreamRates,
    /// When the control plane started.
    pub started: Instant,
    /// This broker's member of the metadata Raft group, when `[cluster]` is configured.
    pub cluster: Option<Arc<ClusterNode>>,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The admin address could not be bound.
    #[error("admin.addr {addr}: {source}")]
    AdminBind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint could not start.
    #[error("{0}")]
    Metrics(String),
    /// The configuration file could not be watched.
    #[error("watching {path}: {message}")]
    Watch {
        /// The directory.
        path: std::path::PathBuf,
        /// The watcher's error.
        message: String,
    },
}

type FileWatcher = notify_debouncer_full::Debouncer<
    notify_debouncer_full::notify::RecommendedWatcher,
    notify_debouncer_full::RecommendedCache,
>;

/// A running control plane. [`ControlPlane::shutdown`] hands the broker back.
pub struct ControlPlane {
    state: Arc<ControlState>,
    admin_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    /// Tasks that end when `stop` turns true.
    tasks: Vec<JoinHandle<()>>,
    /// The metrics exporter, which only ends when aborted.
    exporter: Option<JoinHandle<()>>,
    watcher: Option<FileWatcher>,
}

impl ControlPlane {
    /// Serve `broker` with the configuration `config` (the one it was
    /// started with). Must be called inside a tokio runtime. When an address
    /// cannot be bound the broker comes back with the error, still running,
    /// for [`Broker::shutdown`].
    pub async fn start(
        broker: Broker,
        config: ConfigManager,
    ) -> Result<Self, Box<(ControlError, Broker)>> {
        Self::start_clustered(broker, config, None).await
    }

    /// [`ControlPlane::start`] for a broker that is a cluster member: the
    /// admin server also serves the cluster RPCs (so `kaelix cluster` reaches
    /// it at `admin.addr`), streams are created through the Raft metadata,
    /// and cluster-wide configuration entries are applied here as they
    /// commit. The node is not shut down with the control plane.
    pub async fn start_clustered(
        broker: Broker,
        config: ConfigManager,
        cluster: Option<Arc<ClusterNode>>,
    ) -> Result<Self, Box<(ControlError, Broker)>> {
        let settings = config.current().config.clone();
        let (stop, stop_rx) = watch::channel(false);
        let (telemetry, metrics_addr, exporter) = if settings.metrics.enabled {
            match crate::metrics::start_exporter(settings.metrics.addr) {
                Ok((telemetry, addr, server)) => (telemetry, Some(addr), Some(server)),
                Err(message) => return Err(Box::new((ControlError::Metrics(message), broker))),
            }
        } else {
            (Telemetry::default(), None, None)
        };
        let bound = async {
            let listener = tokio::net::TcpListener::bind(settings.admin.addr).await?;
            let addr = listener.local_addr()?;
            Ok::<_, std::io::Error>((listener, addr))
        };
        let (listener, admin_addr) = match bound.await {
            Ok(bound) => bound,
            Err(source) => {
                if let Some(exporter) = exporter {
                    exporter.abort();
                }
                let error = ControlError::AdminBind {
                    addr: settings.admin.addr,
                    source,
                };
                return Err(Box::new((error, broker)));
            }
        };
        let state = Arc::new(ControlState {
            broker: Arc::new(broker),
            config: Arc::new(config),
            telemetry,
            rates: StreamRates::default(),
            started: Instant::now(),
            cluster: cluster.clone(),
        });
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(crate::metrics::run_sampler(
            state.broker.clone(),
            state.config.clone(),
            state.telemetry.clone(),
            state.rates.clone(),
            Duration::from_millis(settings.metrics.sample_interval_ms),
            stop_rx.clone(),
        )));
        if let Some(node) = &cluster {
            tasks.push(tokio::spawn(crate::cluster::apply::run(
                state.clone(),
                node.clone(),
                stop_rx.clone(),
            )));
            if let Some(section) = settings
                .cluster
                .clone()
                .filter(|section| section.replication_factor > 0)
            {
                tasks.push(tokio::spawn(crate::cluster::shards::run(
                    state.broker.clone(),
                    node.clone(),
                    section,
                    stop_rx.clone(),
                )));
            }
        }
        let cluster_service = cluster.as_ref().map(|node| node.service());
        let service = AdminService::new(state.clone());
        let mut shutdown = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(pb::streams_server::StreamsServer::new(service.clone()))
                .add_service(pb::broker_server::BrokerServer::new(service.clone()))
                .add_service(pb::config_server::ConfigServer::new(service))
                .add_optional_service(cluster_service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = shutdown.changed().await;
                    },
                )
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "the admin API stopped");
            }
        }));

        let mut control = Self {
            state,
            admin_addr,
            metrics_addr,
            stop,
            tasks,
            exporter,
            watcher: None,
        };
        if settings.reload.watch
            && let Some(file) = control.state.config.file()
        {
            let debounce = Duration::from_millis(settings.reload.debounce_ms);
            match control.watch_file(&file, debounce) {
                Ok(watcher) => control.watcher = Some(watcher),
                // SIGHUP and `kaelix config reload` still work.
                Err(err) => tracing::warn!(error = %err, "not watching the configuration file"),
            }
        }
        Ok(control)
    }

    /// Watch the configuration file's directory (editors replace the file
    /// rather than write it, which a watch on the file itself would miss)
    /// and reload when an event names the file.
    fn watch_file(
        &self,
        file: &std::path::Path,
        debounce: Duration,
    ) -> Result<FileWatcher, ControlError> {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let dir = file
            .parent()
            .map_or_else(|| std::path::PathBuf::from("."), |d| d.to_path_buf());
        let name = file.file_name().map(|n| n.to_os_string());
        let state = self.state.clone();
        let handler = move |result: notify_debouncer_full::DebounceEventResult| {
            let events = match result {
                Ok(events) => events,
                Err(errors) => {
                    for err in errors {
                        tracing::warn!(error = %err, "configuration file watch");
                    }
                    return;
                }
            };
            let touched = events.iter().any(|event| {
                !event.kind.is_access()
                    && event
                        .paths
                        .iter()
                        .any(|path| path.file_name().map(|n| n.to_os_string()) == name)
            });
            if touched {
                tracing::info!("configuration file changed; reloading");
                // The outcome is logged and kept for `kaelix broker status`.
                let _ = state.config.reload(&state.broker);
            }
        };
        let mut watcher =
            notify_debouncer_full::new_debouncer(debounce, None, handler).map_err(|err| {
                ControlError::Watch {
                    path: dir.clone(),
                    message: err.to_string(),
                }
            })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|err| ControlError::Watch {
                path: dir.clone(),
                message: err.to_string(),
            })?;
        tracing::info!(file = %file.display(), "watching the configuration file");
        Ok(watcher)
    }

    /// Reload on every SIGHUP until shutdown.
    pub fn reload_on_sighup(&mut self) -> std::io::Result<()> {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let state = self.state.clone();
        let mut stop = self.stop.subscribe();
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    received = hangups.recv() => {
                        if received.is_none() {
                            return;
                        }
                        tracing::info!("SIGHUP: reloading the configuration");
                        let state = state.clone();
                        // The outcome is logged and kept for `kaelix broker status`.
                        let _ = tokio::task::spawn_blocking(move || {
                            state.config.reload(&state.broker)
                        })
                        .await;
                    }
                }
            }
        }));
        Ok(())
    }

    /// The admin API's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The Prometheus endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared state (broker, configuration, metrics).
    pub fn state(&self) -> &Arc<ControlState> {
        &self.state
    }

    /// Stop serving and hand the broker back (to [`Broker::shutdown`]).
    pub async fn shutdown(mut self) -> Broker {
        if let Some(watcher) = self.watcher.take() {
            // Joins the debouncer thread, so no reload runs after this.
            let _ = tokio::task::spawn_blocking(move || watcher.stop()).await;
        }
        let _ = self.stop.send(true);
        for mut task in self.tasks.drain(..) {
            // Requests in flight get a moment to finish.
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
            }
        }
        if let Some(exporter) = self.exporter.take() {
            exporter.abort();
            let _ = exporter.await;
        }
        let mut state = self.state;
        loop {
            match Arc::try_unwrap(state) {
                Ok(inner) => {
                    let mut broker = inner.broker;
                    loop {
                        match Arc::try_unwrap(broker) {
                            Ok(broker) => return broker,
                            Err(shared) => {
                                // A request still finishing holds a reference.
                                broker = shared;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                }
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}
