//! `kaelix serve` and the admin verbs as a user runs them: subprocesses,
//! exit codes, one-line failures, tables and `--json`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn kaelix() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kaelix"));
    command.env("KAELIX_LOG", "warn").env_remove("KAELIX_ADMIN");
    command
}

fn run(args: &[&str], admin: &str) -> Output {
    kaelix()
        .args(args)
        .env("KAELIX_ADMIN", admin)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A failure: exit status 1 and exactly one line on stderr, starting `kaelix: `.
fn assert_one_line_failure(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("kaelix: "), "{err}");
    err
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[broker]
data_dir = "{}"
data_addr = "127.0.0.1:0"
fetch_addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[metrics]
addr = "127.0.0.1:0"
[[streams]]
id = 1
durability = "memory"
{extra}
"#,
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

struct Served {
    child: Child,
    admin: String,
    /// The TCP fetch address.
    fetch: String,
}

impl Served {
    fn start(config: &Path) -> Self {
        let mut child = kaelix()
            .args(["serve", "--config"])
            .arg(config)
            .env("KAELIX__STORAGE__RETENTION_MIB", "1024")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut fetch = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some((_, rest)) = line.split_once("(udp), fetch ") {
                    fetch = rest.split(' ').next().unwrap().to_string();
                }
                if let Some(rest) = line.strip_prefix("kaelix admin ready: grpc ") {
                    let admin = rest.split(',').next().unwrap().to_string();
                    let _ = tx.send((admin, fetch.clone()));
                }
            }
        });
        let (admin, fetch) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("kaelix serve printed its admin address");
        Self {
            child,
            admin,
            fetch,
        }
    }

    /// SIGTERM; the broker must stop cleanly.
    fn stop(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "kaelix serve exited with {exit}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn admin_verbs_against_a_served_broker() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&write_config(dir.path(), ""));
    let admin = served.admin.clone();

    let created = run(&["stream", "create", "9", "--durability", "flush"], &admin);
    assert!(created.status.success(), "{created:?}");
    assert!(
        stdout(&created).contains("created stream 9 (flush"),
        "{created:?}"
    );
    let again = run(&["stream", "create", "9"], &admin);
    let err = assert_one_line_failure(&again);
    assert!(
        err.contains("stream create 9") && err.contains("exists"),
        "{err}"
    );

    let listed = run(&["stream", "list", "--json"], &admin);
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let ids: Vec<u64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 9]);
    assert_eq!(listed[1]["durability"], "flush");

    let table = stdout(&run(&["stream", "list"], &admin));
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("STREAM") && header.contains("DURABILITY"),
        "{table}"
    );
    let described = stdout(&run(&["stream", "describe", "9"], &admin));
    assert!(
        described.contains("durability") && described.contains("flush"),
        "{described}"
    );
    let missing = run(&["stream", "describe", "77"], &admin);
    let err = assert_one_line_failure(&missing);
    assert!(err.contains("NotFound"), "{err}");

    let status = run(&["broker", "status", "--json"], &admin);
    assert!(status.status.success(), "{status:?}");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["health"], "serving");
    assert_eq!(status["shards"][0]["backend"], "socket");
    assert_eq!(status["xdp"]["present"], false);
    assert!(
        status["xdp"]["absent_reason"]
            .as_str()
            .unwrap()
            .contains("socket")
    );
    let human = stdout(&run(&["broker", "status"], &admin));
    assert!(human.contains("xdp: absent"), "{human}");

    let got = run(
        &["config", "get", "storage.retention_mib", "--json"],
        &admin,
    );
    let got: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(got["entries"][0]["value"], "1024");
    assert_eq!(
        got["entries"][0]["source"],
        "env KAELIX__STORAGE__RETENTION_MIB"
    );
    assert_eq!(got["entries"][0]["hot_reloadable"], true);
    let all = stdout(&run(&["config", "get"], &admin));
    assert!(
        all.lines()
            .any(|l| l.contains("broker.shards") && l.contains("restart")),
        "{all}"
    );

    let set = run(&["config", "set", "log.level", "debug"], &admin);
    assert!(set.status.success(), "{set:?}");
    assert!(stdout(&set).contains("applied log.level"), "{set:?}");
    let refused = run(&["config", "set", "broker.shards", "2"], &admin);
    let err = assert_one_line_failure(&refused);
    assert!(err.contains("restart"), "{err}");
    let invalid = run(&["config", "set", "storage.retention_mib", "1"], &admin);
    let err = assert_one_line_failure(&invalid);
    assert!(err.contains("storage.retention_mib"), "{err}");
    let reload = run(&["config", "reload", "--json"], &admin);
    assert!(reload.status.success(), "{reload:?}");
    let reload: serde_json::Value = serde_json::from_slice(&reload.stdout).unwrap();
    assert_eq!(reload["restart_required"], serde_json::json!([]));

    served.stop();

    // Nothing listening any more.
    let unreachable = run(&["stream", "list", "--timeout", "2"], &admin);
    let err = assert_one_line_failure(&unreachable);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

/// One fetch of `stream_id` from offset 0 over a new connection.
fn fetch(addr: &str, stream_id: u32) -> kaelix_protocol::FetchResponseHeader {
    use kaelix_protocol::fetch::{FETCH_REQUEST_LEN, FETCH_RESPONSE_HEADER_LEN};
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    let mut bytes = [0u8; FETCH_REQUEST_LEN];
    kaelix_protocol::FetchRequest {
        request_id: 7,
        stream_id,
        from_offset: 0,
        max_bytes: 1 << 16,
        max_wait_ms: 0,
    }
    .encode(&mut bytes);
    socket.write_all(&bytes).unwrap();
    let mut head = [0u8; FETCH_RESPONSE_HEADER_LEN];
    socket.read_exact(&mut head).unwrap();
    kaelix_protocol::FetchResponseHeader::decode(&head).unwrap()
}

#[test]
fn a_streams_own_retention_and_runtime_streams_on_the_fetch_port() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(&write_config(dir.path(), ""));
    let admin = served.admin.clone();

    let zero = run(&["stream", "create", "12", "--retention-mib", "0"], &admin);
    let err = assert_one_line_failure(&zero);
    assert!(
        err.contains("InvalidArgument") && err.contains("retention_mib"),
        "{err}"
    );
    let created = run(
        &[
            "stream",
            "create",
            "12",
            "--durability",
            "fsync",
            "--retention-mib",
            "64",
            "--retention-age-secs",
            "3600",
            "--json",
        ],
        &admin,
    );
    assert!(created.status.success(), "{created:?}");
    let created: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(created["retention_mib"], 64);
    assert_eq!(created["retention_age_secs"], 3600);
    let described = stdout(&run(&["stream", "describe", "12"], &admin));
    assert!(described.contains("64 MiB, 3600 s"), "{described}");
    let plain = stdout(&run(&["stream", "describe", "1"], &admin));
    assert!(plain.contains("shard log's only"), "{plain}");

    // The fetch port knows the stream created at runtime (empty so far) and
    // answers unknown_stream for one that does not exist.
    let header = fetch(&served.fetch, 12);
    assert_eq!((header.error, header.record_count), (None, 0));
    let header = fetch(&served.fetch, 4242);
    assert_eq!(
        header.error,
        Some(kaelix_protocol::FetchErrorCode::UnknownStream)
    );
    served.stop();
}

#[test]
fn a_bad_file_is_checked_and_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "");
    let checked = kaelix()
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(checked.status.success(), "{checked:?}");
    assert!(stdout(&checked).contains("valid"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[broker]\nshards = 0\nshardz = 1\n[storage]\nsegment_size_mib = \"big\"\n[log]\nlevel = \"=[\"\n",
    )
    .unwrap();
    let checked = kaelix()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = assert_one_line_failure(&checked);
    assert!(err.contains("4 problems"), "{err}");
    let listed = stdout(&checked);
    for key in [
        "broker.shards",
        "broker.shardz",
        "storage.segment_size_mib",
        "log.level",
    ] {
        assert!(listed.contains(key), "{key} missing from:\n{listed}");
    }
    let json = kaelix()
        .args(["config", "check", "--json"])
        .arg(&bad)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert_eq!(json["problems"].as_array().unwrap().len(), 4);

    // KAELIX_LOG would override the file's log.level.
    let served = kaelix()
        .env_remove("KAELIX_LOG")
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!served.status.success());
    assert!(!stdout(&served).contains("ready"), "{served:?}");
    let err = stderr(&served);
    for key in [
        "broker.shards",
        "broker.shardz",
        "storage.segment_size_mib",
        "log.level",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
}

#[test]
fn help_shows_examples() {
    for group in ["stream", "broker", "config"] {
        let help = kaelix().args([group, "--help"]).output().unwrap();
        assert!(help.status.success());
        let text = stdout(&help);
        assert!(text.contains("Examples:"), "{group}: {text}");
        assert!(text.contains("--json"), "{group}: {text}");
    }
}
