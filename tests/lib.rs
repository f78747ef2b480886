//! Shared helpers for the cross-crate integration tests in `tests/tests/`.
//! Test files are named by area: `storage_*.rs`, `e2e_*.rs`, `xdp_*.rs`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `kaelix` binary next to the running test's directory (cargo builds
/// it for kaelix-tools' own integration tests); built here when missing.
pub fn kaelix_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from <target>/<profile>/deps");
    let bin = profile_dir.join("kaelix");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "kaelix-tools", "--bin", "kaelix"])
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building kaelix failed");
    }
    assert!(bin.exists(), "no kaelix binary at {}", bin.display());
    bin
}

/// Stop a `kaelix serve` child: SIGTERM, so the broker closes its logs and
/// removes its live segment files; SIGKILL only if it has not exited after
/// `grace`. Does nothing to a child that has already exited.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Wait for `child` (spawned with piped stdout and stderr) to exit and return
/// its output; kill it and panic naming `what` if it runs longer than `limit`.
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("polling a child process").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} ran for more than {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child
        .wait_with_output()
        .expect("collecting a child's output")
}

/// The lines `child` prints on its (piped) stdout, read on a thread of
/// their own until it closes (still drained after the receiver is gone, so
/// the child never blocks on a full pipe).
///
/// # Panics
/// When the child's stdout was not piped.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    rx
}

/// The addresses a clustered `kaelix serve` prints when it is ready.
#[derive(Debug, Clone)]
pub struct ServeAddresses {
    /// Admin gRPC (`kaelix admin ready: grpc ADDR, ...`).
    pub admin: String,
    /// Cluster RPCs (`kaelix cluster ready: node ID raft ADDR ...`).
    pub raft: String,
    /// Shard 0's data address (`kaelix broker ready: data ADDR ...`).
    pub data: std::net::SocketAddr,
    /// The fetch server (`... fetch ADDR ...`).
    pub fetch: std::net::SocketAddr,
}

/// Read the ready lines of node `id`'s `kaelix serve` from `lines` (see
/// [`stdout_lines`]) until every address is known; panics after 60 s.
pub fn serve_addresses(lines: &mpsc::Receiver<String>, id: u64) -> ServeAddresses {
    let (mut admin, mut raft, mut data, mut fetch) = (None, None, None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while admin.is_none() || raft.is_none() || data.is_none() || fetch.is_none() {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("node {id}: kaelix serve did not print its addresses"));
        let word_after = |prefix: &str| {
            line.split(prefix)
                .nth(1)
                .and_then(|rest| rest.split([' ', ',']).next())
                .map(str::to_string)
        };
        if line.starts_with("kaelix broker ready: ") {
            data = word_after("data ").and_then(|a| a.parse().ok());
            fetch = word_after("fetch ").and_then(|a| a.parse().ok());
        } else if line.starts_with("kaelix admin ready: ") {
            admin = word_after("grpc ");
        } else if line.starts_with(&format!("kaelix cluster ready: node {id} ")) {
            raft = word_after("raft ");
        }
    }
    ServeAddresses {
        admin: admin.unwrap_or_default(),
        raft: raft.unwrap_or_default(),
        data: data.expect("the data address"),
        fetch: fetch.expect("the fetch address"),
    }
}
