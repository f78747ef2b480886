#![allow(dead_code)] // each test binary uses part of the support module
//! A broker with its control plane, started in-process on loopback ports
//! picked by the kernel and a temporary data directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kaelix_controlplane::broker::Broker;
use kaelix_controlplane::layers::ConfigLayers;
use kaelix_controlplane::pb;
use kaelix_controlplane::reload::ConfigManager;
use kaelix_controlplane::server::ControlPlane;
use tonic::transport::Channel;

/// A configuration file for a test broker: loopback, ports 0, `data_dir`,
/// stream 1 (memory) and stream 2 (fsync), fast metrics sampling, then `extra`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let data_dir = dir.join("data");
    let text = format!(
        r#"
[broker]
data_dir = "{}"
data_addr = "127.0.0.1:0"
fetch_addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[metrics]
addr = "127.0.0.1:0"
sample_interval_ms = 100

[reload]
debounce_ms = 50

[storage]
segment_size_mib = 2
{extra}

[[streams]]
id = 1
durability = "memory"

[[streams]]
id = 2
durability = "fsync"
"#,
        data_dir.display()
    );
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Start a broker and its control plane from `file` (inside a tokio runtime).
pub async fn start(file: &Path) -> ControlPlane {
    let layers = ConfigLayers::new(Some(file.to_path_buf()));
    let resolved = layers.resolve().unwrap();
    let broker = Broker::start(&resolved.config).unwrap();
    match ControlPlane::start(broker, ConfigManager::new(layers, resolved)).await {
        Ok(control) => control,
        Err(failed) => panic!("control plane: {}", failed.0),
    }
}

/// Stop the control plane, then the broker.
pub async fn stop(control: ControlPlane) {
    let broker = control.shutdown().await;
    tokio::task::spawn_blocking(move || broker.shutdown().unwrap())
        .await
        .unwrap();
}

/// A channel to the admin API.
pub async fn channel(control: &ControlPlane) -> Channel {
    Channel::from_shared(format!("http://{}", control.admin_addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

/// The admin clients.
pub struct Clients {
    pub streams: pb::streams_client::StreamsClient<Channel>,
    pub broker: pb::broker_client::BrokerClient<Channel>,
    pub config: pb::config_client::ConfigClient<Channel>,
}

pub async fn clients(control: &ControlPlane) -> Clients {
    let channel = channel(control).await;
    Clients {
        streams: pb::streams_client::StreamsClient::new(channel.clone()),
        broker: pb::broker_client::BrokerClient::new(channel.clone()),
        config: pb::config_client::ConfigClient::new(channel),
    }
}

/// GET `path` from `addr` over HTTP/1.1; the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Parse the Prometheus text exposition format (the subset the exporter
/// writes: `# HELP`/`# TYPE` comments, `name{k="v",...} value`); panics on
/// any other line.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "unexpected comment: {line}"
            );
            if let Some(kind) = comment.strip_prefix("TYPE ") {
                let kind = kind.split_whitespace().nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "summary"].contains(&kind),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let rest = rest.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                let labels = rest
                    .split("\",")
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, value) =
                            pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                        (key.to_string(), value.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The value of the sample `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .map(|s| s.value)
}

/// Wait until `check` holds (at most 10 s).
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
