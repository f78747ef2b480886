//! The result of a run: per-thread reports merged into one summary, shown
//! as a table or as JSON.

use comfy_table::{Table, presets};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

use super::BenchArgs;
use super::consume::ConsumeReport;
use super::load::{Plan, ProducerReport, new_histogram};

/// Percentiles reported, as (label, quantile).
const PERCENTILES: [(&str, f64); 4] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
];

/// Everything a run measured, merged over the producer threads.
#[derive(Debug)]
pub struct Summary {
    label: Option<String>,
    sender: &'static str,
    sender_detail: String,
    broker: String,
    streams: Vec<u32>,
    level: Option<String>,
    message_size: usize,
    producers: usize,
    batch: usize,
    datagram_len: usize,
    linger_us: u64,
    inflight: usize,
    target_rate: Option<f64>,
    window_secs: f64,
    acked_in_window: u64,
    offered_in_window: u64,
    offered: u64,
    acked: u64,
    failed: u64,
    unacked_at_end: usize,
    retransmitted: u64,
    timeouts: u64,
    datagrams: u64,
    latency: Histogram<u64>,
    /// The cluster's other brokers (`--brokers`), empty for one broker.
    brokers: Vec<String>,
    /// Shards moved by a `not_leader` redirect / to the next broker.
    redirects: u64,
    rotations: u64,
    /// (stream, destination) at the end of the run, every producer's, deduplicated.
    destinations: Vec<(u32, String)>,
    /// The longest silence between ACKs of any producer (ns), and when it
    /// ended on the wall clock (ns since the Unix epoch; 0: never two ACKs).
    ack_gap_max_ns: u64,
    ack_gap_end_unix_ns: u64,
    /// Every producer's silences between ACKs of 10 ms or more, as (last
    /// ACK before, first ACK after) on the wall clock, sorted.
    ack_silences_unix_ns: Vec<(u64, u64)>,
    /// Remote (TCP fetch) consumers' figures, when they ran (`--fetch`).
    end_to_end: Option<EndToEnd>,
    /// Local (mapped log) consumers' figures, when they ran (`--local`).
    local: Option<EndToEnd>,
}

/// The consumers' reports of a run, by kind (None: that kind did not run).
#[derive(Debug, Default)]
pub(super) struct Consumed {
    /// Remote TCP fetch consumers.
    pub remote: Option<Vec<ConsumeReport>>,
    /// Local consumers following the mapped log.
    pub local: Option<Vec<ConsumeReport>>,
}

/// produce→consume latency and consumed counts of one kind of consumer.
#[derive(Debug)]
struct EndToEnd {
    latency: Histogram<u64>,
    consumed: u64,
    in_window: u64,
}

impl EndToEnd {
    fn merge(reports: Vec<ConsumeReport>) -> Self {
        let mut merged = Self {
            latency: new_histogram(),
            consumed: 0,
            in_window: 0,
        };
        for report in reports {
            merged
                .latency
                .add(&report.latency)
                .expect("histograms with equal bounds always merge");
            merged.consumed += report.consumed;
            merged.in_window += report.consumed_in_window;
        }
        merged
    }

    /// Table rows named `name pNN`, then the consumed count as `what`.
    fn rows(&self, name: &str, what: &str, window_secs: f64) -> Vec<(String, String)> {
        let mut rows: Vec<(String, String)> = PERCENTILES
            .iter()
            .map(|(label, quantile)| {
                (
                    format!("{name} {label}"),
                    format!(
                        "{:.1} us",
                        self.latency.value_at_quantile(*quantile) as f64 / 1e3
                    ),
                )
            })
            .collect();
        rows.push((
            format!("{name} max"),
            format!("{:.1} us", self.latency.max() as f64 / 1e3),
        ));
        rows.push((
            format!("consumed ({what})"),
            format!(
                "{} records, {:.0} msgs/s in the window",
                self.consumed,
                self.in_window as f64 / window_secs.max(1e-9)
            ),
        ));
        rows
    }

    fn to_json(&self, window_secs: f64) -> Value {
        let mut map = serde_json::Map::new();
        for (name, quantile) in PERCENTILES {
            map.insert(
                name.into(),
                json!(self.latency.value_at_quantile(quantile) as f64 / 1e3),
            );
        }
        map.insert("max".into(), json!(self.latency.max() as f64 / 1e3));
        map.insert("samples".into(), json!(self.latency.len()));
        map.insert("consumed".into(), json!(self.consumed));
        map.insert(
            "consumed_per_sec".into(),
            json!(self.in_window as f64 / window_secs.max(1e-9)),
        );
        Value::Object(map)
    }
}

const NO_CONSUMER: &str = "not measured (no --fetch: no consumer ran)";
const NO_LOCAL_CONSUMER: &str = "not measured (no --local: no local consumer ran)";

impl Summary {
    /// Merge the producers' reports (histograms are added here, after the run).
    /// `sender` is the sender's name and what it used (socket, queue...).
    pub(super) fn new(
        args: &BenchArgs,
        streams: &[u32],
        datagram_len: usize,
        (sender, sender_detail): (&'static str, String),
        plan: &Plan,
        reports: Vec<ProducerReport>,
        consumed: Consumed,
    ) -> Self {
        let mut latency = new_histogram();
        let mut summary = Self {
            label: args.label.clone(),
            sender,
            sender_detail,
            broker: args.broker.to_string(),
            streams: streams.to_vec(),
            level: None,
            message_size: args.message_size,
            producers: args.producers,
            batch: args.batch,
            datagram_len,
            linger_us: args.linger_us,
            inflight: args.inflight,
            target_rate: args.rate,
            window_secs: 0.0,
            acked_in_window: 0,
            offered_in_window: 0,
            offered: 0,
            acked: 0,
            failed: 0,
            unacked_at_end: 0,
            retransmitted: 0,
            timeouts: 0,
            datagrams: 0,
            latency: new_histogram(),
            brokers: args.brokers.iter().map(ToString::to_string).collect(),
            redirects: 0,
            rotations: 0,
            destinations: Vec::new(),
            ack_gap_max_ns: 0,
            ack_gap_end_unix_ns: 0,
            ack_silences_unix_ns: Vec::new(),
            end_to_end: consumed.remote.map(EndToEnd::merge),
            local: consumed.local.map(EndToEnd::merge),
        };
        let mut window_end_ns = 0;
        for report in reports {
            latency
                .add(&report.latency)
                .expect("histograms with equal bounds always merge");
            window_end_ns = window_end_ns.max(report.window_end_ns);
            summary.acked_in_window += report.acked_in_window;
            summary.offered_in_window += report.offered_in_window;
            summary.offered += report.offered;
            summary.acked += report.acked;
            summary.failed += report.failed;
            summary.unacked_at_end += report.unacked_at_end;
            summary.retransmitted += report.stats.frames_retransmitted;
            summary.timeouts += report.stats.timeouts;
            summary.datagrams += report.datagrams;
            summary.redirects += report.stats.redirects;
            summary.rotations += report.stats.rotations;
            for (stream, addr) in &report.destinations {
                let entry = (*stream, addr.to_string());
                if !summary.destinations.contains(&entry) {
                    summary.destinations.push(entry);
                }
            }
            summary.ack_silences_unix_ns.extend(
                report
                    .ack_silences
                    .iter()
                    .map(|&(from, to)| (plan.start_unix_ns + from, plan.start_unix_ns + to)),
            );
            if report.ack_gap_max_ns > summary.ack_gap_max_ns {
                summary.ack_gap_max_ns = report.ack_gap_max_ns;
                summary.ack_gap_end_unix_ns = plan.start_unix_ns + report.ack_gap_end_ns;
            }
            if let Some(level) = report.level {
                summary.level = Some(level.name().to_string());
            }
        }
        summary.ack_silences_unix_ns.sort_unstable();
        summary.window_secs = window_end_ns.saturating_sub(plan.warmup_ns) as f64 / 1e9;
        summary.latency = latency;
        summary
    }

    /// Acknowledged messages per second inside the window.
    pub fn msgs_per_sec(&self) -> f64 {
        if self.window_secs > 0.0 {
            self.acked_in_window as f64 / self.window_secs
        } else {
            0.0
        }
    }

    /// Acknowledged payload megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.msgs_per_sec() * self.message_size as f64 / 1e6
    }

    fn micros(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1e3
    }

    /// Things that make the figures suspect, in words.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.failed > 0 {
            warnings.push(format!("the broker rejected {} messages", self.failed));
        }
        if self.unacked_at_end > 0 {
            warnings.push(format!(
                "{} messages were still unacknowledged when the drain time ran out",
                self.unacked_at_end
            ));
        }
        if self.timeouts > 0 {
            warnings.push(format!(
                "{} retransmission timeouts ({} frames sent again): datagrams were lost or ACKs came later than the timeout (a descheduled broker or producer)",
                self.timeouts, self.retransmitted
            ));
        }
        if let Some(rate) = self.target_rate {
            let offered = self.offered_in_window as f64 / self.window_secs.max(1e-9);
            if offered < rate * 0.95 {
                warnings.push(format!(
                    "offered {offered:.0} msgs/s of the {rate:.0} asked: the in-flight limit held the schedule back (latency still counts from the intended times)"
                ));
            }
        }
        if self.latency.is_empty() {
            warnings.push("no message of the measurement window was acknowledged".into());
        }
        warnings
    }

    fn frames_per_datagram(&self) -> f64 {
        if self.datagrams == 0 {
            0.0
        } else {
            self.offered as f64 / self.datagrams as f64
        }
    }

    /// The result as a table (plain text, one row per figure).
    pub fn table(&self) -> String {
        let mut table = Table::new();
        table.load_style(presets::UTF8_FULL_CONDENSED);
        table.set_header(vec!["kaelix bench", "value"]);
        if let Some(label) = &self.label {
            table.add_row(vec!["label".to_string(), label.clone()]);
        }
        let rows: Vec<(String, String)> = vec![
            ("sender".into(), self.sender_detail.clone()),
            ("broker".into(), self.broker.clone()),
            (
                "streams (acked at)".into(),
                format!(
                    "{:?} ({})",
                    self.streams,
                    self.level.as_deref().unwrap_or("no ack")
                ),
            ),
            (
                "load".into(),
                format!(
                    "{} producer(s), {}-byte payloads, datagrams <= {} B / {} frames, linger {} us, in-flight {}",
                    self.producers,
                    self.message_size,
                    self.datagram_len,
                    self.batch,
                    self.linger_us,
                    self.inflight
                ),
            ),
            (
                "mode".into(),
                match self.target_rate {
                    Some(rate) => {
                        format!("fixed rate {rate:.0} msgs/s (latency from intended send time)")
                    }
                    None => "as fast as acks allow (latency from offer time)".into(),
                },
            ),
            ("window".into(), format!("{:.2} s", self.window_secs)),
            (
                "throughput (acked)".into(),
                format!(
                    "{:.0} msgs/s, {:.2} MB/s payload",
                    self.msgs_per_sec(),
                    self.mb_per_sec()
                ),
            ),
            (
                "frames per datagram".into(),
                format!("{:.1}", self.frames_per_datagram()),
            ),
        ];
        for (name, value) in rows {
            table.add_row(vec![name, value]);
        }
        for (name, quantile) in PERCENTILES {
            table.add_row(vec![
                format!("produce->ack {name}"),
                format!("{:.1} us", self.micros(quantile)),
            ]);
        }
        table.add_row(vec![
            "produce->ack max".to_string(),
            format!("{:.1} us", self.latency.max() as f64 / 1e3),
        ]);
        match &self.end_to_end {
            Some(e2e) => {
                for (name, value) in
                    e2e.rows("produce->consume", "remote TCP fetch", self.window_secs)
                {
                    table.add_row(vec![name, value]);
                }
            }
            None => {
                table.add_row(vec![
                    "end-to-end (produce->consume)".to_string(),
                    NO_CONSUMER.to_string(),
                ]);
            }
        }
        if let Some(local) = &self.local {
            for (name, value) in local.rows(
                "produce->visible (local)",
                "local, mapped log",
                self.window_secs,
            ) {
                table.add_row(vec![name, value]);
            }
        }
        if !self.brokers.is_empty() {
            let destinations: Vec<String> = self
                .destinations
                .iter()
                .map(|(stream, addr)| format!("stream {stream} -> {addr}"))
                .collect();
            table.add_row(vec![
                "cluster".to_string(),
                format!(
                    "also {}; at the end {}; {} redirects, {} rotations",
                    self.brokers.join(", "),
                    destinations.join(", "),
                    self.redirects,
                    self.rotations
                ),
            ]);
        }
        table.add_row(vec![
            "longest silence between ACKs".to_string(),
            format!("{:.1} us", self.ack_gap_max_ns as f64 / 1e3),
        ]);
        table.add_row(vec![
            "messages".to_string(),
            format!(
                "{} offered, {} acked, {} rejected, {} retransmitted frames",
                self.offered, self.acked, self.failed, self.retransmitted
            ),
        ]);
        format!("{table}\n")
    }

    /// The result as JSON (latencies in microseconds).
    pub fn to_json(&self) -> Value {
        let mut latency = serde_json::Map::new();
        for (name, quantile) in PERCENTILES {
            latency.insert(name.into(), json!(self.micros(quantile)));
        }
        latency.insert("max".into(), json!(self.latency.max() as f64 / 1e3));
        latency.insert("mean".into(), json!(self.latency.mean() / 1e3));
        latency.insert("samples".into(), json!(self.latency.len()));
        let end_to_end = match &self.end_to_end {
            Some(e2e) => e2e.to_json(self.window_secs),
            None => json!(NO_CONSUMER),
        };
        let local = match &self.local {
            Some(local) => local.to_json(self.window_secs),
            None => json!(NO_LOCAL_CONSUMER),
        };
        json!({
            "label": self.label,
            "sender": self.sender,
            "sender_detail": self.sender_detail,
            "broker": self.broker,
            "streams": self.streams,
            "acked_level": self.level,
            "message_size": self.message_size,
            "producers": self.producers,
            "batch_frames_max": self.batch,
            "datagram_len_max": self.datagram_len,
            "linger_us": self.linger_us,
            "inflight": self.inflight,
            "target_rate": self.target_rate,
            "window_secs": self.window_secs,
            "msgs_per_sec": self.msgs_per_sec(),
            "mb_per_sec": self.mb_per_sec(),
            "frames_per_datagram": self.frames_per_datagram(),
            "produce_ack_us": latency,
            "end_to_end_us": end_to_end,
            "local_end_to_end_us": local,
            "offered": self.offered,
            "acked": self.acked,
            "rejected": self.failed,
            "unacked_at_end": self.unacked_at_end,
            "retransmitted_frames": self.retransmitted,
            "retransmit_timeouts": self.timeouts,
            "brokers": self.brokers,
            "redirects": self.redirects,
            "rotations": self.rotations,
            "destinations": self
                .destinations
                .iter()
                .map(|(stream, addr)| json!({"stream": stream, "addr": addr}))
                .collect::<Vec<_>>(),
            "ack_silence_max_us": self.ack_gap_max_ns as f64 / 1e3,
            "ack_silence_end_unix_ns": self.ack_gap_end_unix_ns,
            "ack_silences_unix_ns": self
                .ack_silences_unix_ns
                .iter()
                .map(|(from, to)| json!({"last_ack": from, "next_ack": to}))
                .collect::<Vec<_>>(),
            "warnings": self.warnings(),
        })
    }
}
