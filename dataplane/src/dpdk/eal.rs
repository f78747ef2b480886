//! EAL arguments (derived from [`DpdkConfig`], no FFI) and the EAL's
//! once-per-process lifetime: `rte_eal_init`, `rte_eal_cleanup`, and removal
//! of the runtime directory the EAL leaves behind.

use std::ffi::{CStr, c_char, c_int};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use kaelix_dpdk_sys as sys;

use super::{DpdkConfig, DpdkError, HugepageMode};

/// Program name handed to the EAL as `argv[0]`.
const PROGRAM: &str = "kaelix";
/// Bytes per mbuf in the pool: the mbuf header (128), headroom and data room
/// (2176), mempool object header and padding (rounded up).
const MBUF_FOOTPRINT_BYTES: u64 = 2_432;
/// Memory the EAL itself needs besides the pool (rings, memzones, heap).
const EAL_OVERHEAD_BYTES: u64 = 48 << 20;

/// Set by the first [`Eal::init`] of the process, never cleared: DPDK
/// cannot start the EAL again, not even after `rte_eal_cleanup`.
static EAL_STARTED: AtomicBool = AtomicBool::new(false);

/// The EAL arguments for a configuration, and what they imply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EalArgs {
    /// `argv`, program name first.
    pub args: Vec<String>,
    /// The `--file-prefix` used.
    pub file_prefix: String,
    /// Whether the pool will be on hugepages (`--in-memory`), as far as the
    /// derived arguments decide it (false when `eal_args` set memory options).
    pub hugepages: bool,
}

/// What the machine offers, read once by the caller (kept apart so
/// [`eal_args`] is a pure function).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    /// Free hugepage bytes of the default size.
    pub hugepages_free_bytes: u64,
    /// `Cpus_allowed_list` of the opening thread (`0-1`, `0,2-3`).
    pub allowed_cpus: Option<String>,
    /// This process's id.
    pub pid: u32,
}

impl Host {
    /// Read `/proc/meminfo` and `/proc/thread-self/status`.
    pub fn probe() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let hugepages_free_bytes = field("HugePages_Free:") * field("Hugepagesize:") * 1024;
        let allowed_cpus = std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                    .map(|list| list.trim().to_owned())
            })
            .filter(|list| !list.is_empty());
        Self {
            hugepages_free_bytes,
            allowed_cpus,
            pid: std::process::id(),
        }
    }
}

/// Estimated bytes the pool and the EAL need.
pub(crate) fn memory_needed_bytes(config: &DpdkConfig) -> u64 {
    u64::from(config.mbuf_count) * MBUF_FOOTPRINT_BYTES + EAL_OVERHEAD_BYTES
}

fn has_option(args: &[String], options: &[&str]) -> bool {
    args.iter().any(|arg| {
        options.iter().any(|option| {
            arg == option
                || arg
                    .strip_prefix(option)
                    .is_some_and(|rest| rest.starts_with('='))
        })
    })
}

/// The EAL `argv` for `config` on `host`: program name, `--file-prefix`,
/// memory options, `--lcores`, then `config.eal_args` as they are.
pub(crate) fn eal_args(config: &DpdkConfig, host: &Host) -> Result<EalArgs, DpdkError> {
    let file_prefix = config
        .file_prefix
        .clone()
        .unwrap_or_else(|| format!("kaelix-{}", host.pid));
    let mut args = vec![PROGRAM.to_owned(), format!("--file-prefix={file_prefix}")];

    let user_memory = has_option(
        &config.eal_args,
        &[
            "--no-huge",
            "--in-memory",
            "-m",
            "--socket-mem",
            "--legacy-mem",
            "--huge-dir",
        ],
    );
    let needed = memory_needed_bytes(config);
    let hugepages = !user_memory
        && match config.hugepages {
            HugepageMode::Off => false,
            HugepageMode::Auto => host.hugepages_free_bytes >= needed,
            HugepageMode::On if host.hugepages_free_bytes >= needed => true,
            HugepageMode::On => {
                return Err(DpdkError::NoHugepages {
                    free_bytes: host.hugepages_free_bytes,
                    needed_bytes: needed,
                });
            }
        };
    if !user_memory {
        if hugepages {
            // Hugepages without hugetlbfs files: nothing is left behind.
            args.push("--in-memory".to_owned());
        } else {
            // `--in-memory` is refused with `--no-huge`; `--no-shconf` keeps
            // the shared config files away instead.
            let memory_mb = config
                .memory_mb
                .unwrap_or_else(|| u32::try_from(needed.div_ceil(1 << 20)).unwrap_or(u32::MAX));
            args.extend([
                "--no-huge".to_owned(),
                "--no-shconf".to_owned(),
                format!("-m{memory_mb}"),
            ]);
        }
    }

    if !has_option(&config.eal_args, &["-l", "--lcores", "-c"]) {
        match (&config.lcores, &host.allowed_cpus) {
            (Some(lcores), _) => args.push(format!("--lcores={lcores}")),
            (None, Some(cpus)) => args.push(format!("--lcores=0@({cpus})")),
            (None, None) => args.push("--lcores=0".to_owned()),
        }
    }
    args.extend(config.eal_args.iter().cloned());
    Ok(EalArgs {
        args,
        file_prefix,
        hugepages,
    })
}

/// What usually causes an `rte_eal_init` errno (DPDK 21.11 - 23.x `eal.c`).
fn eal_hint(errno: c_int) -> &'static str {
    match errno {
        libc::EACCES => {
            "permission denied or no hugepage information: run as root, or use hugepages = \"off\""
        }
        libc::EINVAL => "invalid EAL arguments (see the EAL: lines logged above)",
        libc::ENOMEM => {
            "not enough memory: reserve hugepages, lower mbuf_count, or raise memory_mb"
        }
        libc::ENODEV => "memory or bus setup failed (see the EAL: lines logged above)",
        libc::ENOTSUP => {
            "a device failed to probe: check each --vdev (e.g. iface=<name> exists in this network \
             namespace) and -a address"
        }
        libc::EALREADY => "the EAL was already initialised in this process",
        libc::EPROTO => {
            "the EAL is shared with another process (multi-process) in an unexpected state"
        }
        libc::EFAULT => "the EAL tail queues could not be set up",
        _ => "see the EAL: lines logged above",
    }
}

/// `rte_strerror(code)` as a `String`.
pub(crate) fn strerror(code: c_int) -> String {
    // SAFETY: rte_strerror accepts any value and returns a pointer to a
    // NUL-terminated string (static or per-lcore), valid until the next
    // call on this thread; it is copied out at once.
    unsafe {
        let text = sys::rte_strerror(code);
        if text.is_null() {
            format!("error {code}")
        } else {
            CStr::from_ptr(text).to_string_lossy().into_owned()
        }
    }
}

/// `rte_errno` of the calling thread.
pub(crate) fn rte_errno() -> c_int {
    // SAFETY: reads a thread-local integer; no preconditions.
    unsafe { sys::kx_dpdk_errno() }
}

/// The started EAL. Dropping it runs `rte_eal_cleanup` (see [`Eal::cleanup`]).
#[derive(Debug)]
pub(crate) struct Eal {
    /// The runtime directory the EAL created (`/var/run/dpdk/<prefix>` as root).
    runtime_dir: Option<PathBuf>,
    /// `argv` storage: NUL-terminated strings the EAL may keep pointers into
    /// until `rte_eal_cleanup`.
    argv_storage: Vec<Vec<u8>>,
    /// The arguments, for reports.
    args: Vec<String>,
    cleaned_up: bool,
}

impl Eal {
    /// Start the EAL with `args`. Fails with [`DpdkError::EalAlreadyStarted`]
    /// on any second call in the process, successful or not.
    pub fn init(args: &EalArgs) -> Result<Self, DpdkError> {
        if EAL_STARTED.swap(true, Ordering::AcqRel) {
            return Err(DpdkError::EalAlreadyStarted);
        }
        let mut argv_storage: Vec<Vec<u8>> = args
            .args
            .iter()
            .map(|arg| {
                let mut bytes = arg.clone().into_bytes();
                bytes.push(0);
                bytes
            })
            .collect();
        let mut argv: Vec<*mut c_char> = argv_storage
            .iter_mut()
            .map(|bytes| bytes.as_mut_ptr().cast::<c_char>())
            .collect();
        argv.push(std::ptr::null_mut());
        let argc =
            c_int::try_from(args.args.len()).expect("a handful of EAL arguments fits in a C int");
        // SAFETY: argv holds argc pointers to NUL-terminated strings (checked
        // free of inner NULs by DpdkConfig::validate) followed by NULL, as
        // C's main gets. The strings live in argv_storage, which is kept in
        // the returned Eal until rte_eal_cleanup. EAL_STARTED guarantees this
        // is the only rte_eal_init call of the process.
        let parsed = unsafe { sys::rte_eal_init(argc, argv.as_mut_ptr()) };
        let runtime_dir = runtime_dir();
        if parsed < 0 {
            let errno = rte_errno();
            // The EAL is half up and cannot be cleaned up; remove at least the
            // runtime directory when its name is ours alone.
            if let Some(dir) = &runtime_dir
                && dir.ends_with(&args.file_prefix)
            {
                remove_runtime_dir(dir);
            }
            return Err(DpdkError::EalInit {
                errno,
                message: strerror(errno),
                hint: eal_hint(errno),
                args: args.args.clone(),
            });
        }
        Ok(Self {
            runtime_dir,
            argv_storage,
            args: args.args.clone(),
            cleaned_up: false,
        })
    }

    /// The arguments the EAL was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// `rte_eal_cleanup`, then remove the runtime directory (and
    /// `/var/run/dpdk` when nothing else is in it). Call after every port is
    /// closed and every pool freed.
    pub fn cleanup(mut self) -> Result<(), DpdkError> {
        self.cleanup_in_place()
    }

    fn cleanup_in_place(&mut self) -> Result<(), DpdkError> {
        if std::mem::replace(&mut self.cleaned_up, true) {
            return Ok(());
        }
        // SAFETY: the EAL was started by Eal::init and is cleaned up once
        // (cleaned_up); ports and pools are released by the owner first.
        let code = unsafe { sys::rte_eal_cleanup() };
        if let Some(dir) = &self.runtime_dir {
            remove_runtime_dir(dir);
        }
        self.argv_storage.clear();
        if code < 0 {
            return Err(DpdkError::Shutdown {
                operation: "rte_eal_cleanup",
                code,
                message: strerror(-code),
            });
        }
        Ok(())
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        if let Err(error) = self.cleanup_in_place() {
            tracing::warn!(%error, "DPDK EAL cleanup on drop failed");
        }
    }
}

/// `rte_eal_get_runtime_dir()`, when set.
fn runtime_dir() -> Option<PathBuf> {
    // SAFETY: returns a pointer to a static NUL-terminated buffer (empty
    // until the EAL parsed --file-prefix); copied out at once.
    let dir = unsafe {
        let ptr = sys::rte_eal_get_runtime_dir();
        if ptr.is_null() {
            return None;
        }
        CStr::from_ptr(ptr).to_string_lossy().into_owned()
    };
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Remove the EAL runtime directory and, when empty, its parent
/// (`/var/run/dpdk`). Best effort: failures are logged.
fn remove_runtime_dir(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "removing the DPDK runtime directory")
        }
    }
    if let Some(parent) = dir.parent() {
        // Fails (and is left alone) while another DPDK process uses it.
        let _ = std::fs::remove_dir(parent);
    }
}

/// Give the calling thread an lcore id if it has none, so mempool caches
/// work on it (non-EAL threads otherwise go to the shared ring every time).
/// Tried once per thread; a thread without an id still works, slower.
pub(crate) fn register_thread() {
    thread_local! {
        static TRIED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if TRIED.with(|tried| tried.replace(true)) {
        return;
    }
    // SAFETY: reads the thread-local lcore id; the EAL is running (the
    // caller holds a port, which holds the EAL).
    let lcore = unsafe { sys::kx_dpdk_lcore_id() };
    if lcore != sys::LCORE_ID_ANY {
        return;
    }
    // SAFETY: rte_thread_register only needs a running EAL, which the
    // caller's port guarantees; it affects the calling thread only.
    let code = unsafe { sys::rte_thread_register() };
    if code != 0 {
        let errno = rte_errno();
        tracing::debug!(errno, message = %strerror(errno), "rte_thread_register failed; mbuf caches unused on this thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(free: u64) -> Host {
        Host {
            hugepages_free_bytes: free,
            allowed_cpus: Some("0-1".to_owned()),
            pid: 4242,
        }
    }

    #[test]
    fn no_hugepages_means_no_huge_and_a_pid_prefix() {
        let config = DpdkConfig::default();
        let args = eal_args(&config, &host(0)).unwrap();
        assert!(!args.hugepages);
        assert_eq!(args.file_prefix, "kaelix-4242");
        assert_eq!(args.args[0], "kaelix");
        assert!(args.args.contains(&"--file-prefix=kaelix-4242".to_owned()));
        assert!(args.args.contains(&"--no-huge".to_owned()));
        assert!(args.args.contains(&"--no-shconf".to_owned()));
        assert!(!args.args.contains(&"--in-memory".to_owned()));
        assert!(args.args.contains(&"--lcores=0@(0-1)".to_owned()));
        // User arguments come last, unchanged.
        assert!(args.args.ends_with(&config.eal_args));
        let memory = args
            .args
            .iter()
            .find_map(|arg| arg.strip_prefix("-m"))
            .unwrap();
        assert!(u64::from(memory.parse::<u32>().unwrap()) << 20 >= memory_needed_bytes(&config));
    }

    #[test]
    fn enough_hugepages_means_in_memory() {
        let config = DpdkConfig::default();
        let args = eal_args(&config, &host(1 << 30)).unwrap();
        assert!(args.hugepages);
        assert!(args.args.contains(&"--in-memory".to_owned()));
        assert!(!args.args.contains(&"--no-huge".to_owned()));
    }

    #[test]
    fn hugepages_on_without_pages_is_a_typed_error() {
        let config = DpdkConfig {
            hugepages: HugepageMode::On,
            ..DpdkConfig::default()
        };
        match eal_args(&config, &host(2 << 20)) {
            Err(DpdkError::NoHugepages {
                free_bytes,
                needed_bytes,
            }) => {
                assert_eq!(free_bytes, 2 << 20);
                assert!(needed_bytes > free_bytes);
            }
            other => panic!("expected NoHugepages, got {other:?}"),
        }
        let off = DpdkConfig {
            hugepages: HugepageMode::Off,
            ..DpdkConfig::default()
        };
        assert!(!eal_args(&off, &host(1 << 30)).unwrap().hugepages);
    }

    #[test]
    fn user_memory_and_core_options_replace_the_derived_ones() {
        let config = DpdkConfig {
            eal_args: vec![
                "--no-huge".to_owned(),
                "-m".to_owned(),
                "512".to_owned(),
                "-l".to_owned(),
                "1".to_owned(),
            ],
            file_prefix: Some("mine".to_owned()),
            ..DpdkConfig::default()
        };
        let args = eal_args(&config, &host(1 << 30)).unwrap();
        assert_eq!(
            args.args,
            [
                "kaelix",
                "--file-prefix=mine",
                "--no-huge",
                "-m",
                "512",
                "-l",
                "1"
            ]
        );
        let pinned = DpdkConfig {
            lcores: Some("0@3".to_owned()),
            ..DpdkConfig::default()
        };
        assert!(
            eal_args(&pinned, &host(0))
                .unwrap()
                .args
                .contains(&"--lcores=0@3".to_owned())
        );
    }

    #[test]
    fn host_probe_reads_this_machine() {
        let host = Host::probe();
        assert_eq!(host.pid, std::process::id());
        let cpus = host.allowed_cpus.expect("Linux reports Cpus_allowed_list");
        assert!(
            cpus.chars()
                .all(|c| c.is_ascii_digit() || c == '-' || c == ','),
            "{cpus}"
        );
    }
}
