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
