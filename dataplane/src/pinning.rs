//! CPU pinning for data-plane shards.
//!
//! [`plan`] decides which OS cpu index each shard runs on, using hwloc's I/O
//! objects (through `hwlocality`) to find the cores local to the NIC:
//! the interface's OS device -> its first non-I/O ancestor -> that object's
//! cpuset and NUMA node. [`pin_current_thread`] binds the calling thread to one
//! PU and checks that the binding took. [`available_cpus`] lists the cpus this
//! process may use.
//!
//! All three read the topology from hwloc, never the calling thread's affinity
//! mask: a thread that is already pinned still sees every usable cpu. (APIs
//! built on `sched_getaffinity`, such as `core_affinity::get_core_ids`, only
//! report the caller's own cpu once it is pinned, so enumerate before pinning
//! if you use those.)

use std::fmt::Write as _;

use hwlocality::Topology;
use hwlocality::bitmap::BitmapIndex;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::topology::builder::TypeFilter;

/// Which cores data-plane shards may use.
///
/// In TOML: `cores = "auto"`, `cores = "none"` or `cores = { list = [2, 3] }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoreSelection {
    /// Cores local to the NIC's NUMA node (all usable cores when the interface
    /// has no PCI locality), skipping the machine's first core when another
    /// core is eligible: that core is left to the control plane and the OS.
    /// Distinct physical cores are used before SMT siblings.
    #[default]
    Auto,
    /// Do not pin; the OS schedules the shards.
    None,
    /// Exactly these OS cpu indexes, in this order (shard `i` gets entry
    /// `i % len`).
    List(Vec<usize>),
}

/// The cpu each shard should be pinned to, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinPlan {
    /// Per shard: the OS cpu index to pin it to, or `None` to leave it unpinned.
    pub assignments: Vec<Option<usize>>,
    /// NUMA node (OS index) the interface is attached to, when known.
    pub numa_node: Option<usize>,
    /// One human-readable line explaining the plan, e.g.
    /// `interface eth0 is on NUMA node 0 (cores 0-1); skipping core 0 (first
    /// core, left to the OS); shard 0 -> core 1`.
    pub reason: String,
}

/// Errors from planning or applying CPU pinning.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// A plan was asked for zero shards.
    #[error("cannot plan pinning for 0 shards")]
    NoShards,
    /// `CoreSelection::List` was empty.
    #[error("the core list is empty; cpus that exist: {}", fmt_cpus(.available))]
    EmptyList {
        /// The cpus this process may use.
        available: Vec<usize>,
    },
    /// `CoreSelection::List` named the same cpu twice.
    #[error("cpu {cpu} appears more than once in the core list")]
    DuplicateCpu {
        /// The repeated cpu.
        cpu: usize,
    },
    /// The cpu is not part of this machine (or is offline).
    #[error("cpu {cpu} does not exist; cpus that exist: {}", fmt_cpus(.available))]
    UnknownCpu {
        /// The cpu asked for.
        cpu: usize,
        /// The cpus this process may use.
        available: Vec<usize>,
    },
    /// The cpu exists but this process may not run on it (cgroup cpuset).
    #[error(
        "cpu {cpu} exists but this process may not use it (cgroup cpuset); usable cpus: {}",
        fmt_cpus(.available)
    )]
    CpuNotAllowed {
        /// The cpu asked for.
        cpu: usize,
        /// The cpus this process may use.
        available: Vec<usize>,
    },
    /// No network interface of that name exists in this network namespace.
    #[error("network interface {interface:?} does not exist; interfaces: {}", .known.join(", "))]
    UnknownInterface {
        /// The interface asked for.
        interface: String,
        /// The interfaces that exist (from `/sys/class/net`).
        known: Vec<String>,
    },
    /// hwloc could not load or configure the topology.
    #[error("hwloc topology discovery failed: {detail}")]
    Topology {
        /// hwloc's error text.
        detail: String,
    },
    /// hwloc refused to bind the thread.
    #[error("binding the current thread to cpu {cpu} failed: {detail}")]
    Bind {
        /// The cpu asked for.
        cpu: usize,
        /// hwloc's error text.
        detail: String,
    },
    /// The bind call succeeded but the thread is not (only) on that cpu.
    #[error(
        "binding the current thread to cpu {cpu} did not take: binding is {}, running on {}",
        fmt_cpus(.binding),
        fmt_cpus(.running_on)
    )]
    NotVerified {
        /// The cpu asked for.
        cpu: usize,
        /// The thread's binding as reported by hwloc afterwards.
        binding: Vec<usize>,
        /// The cpu(s) the thread last ran on.
        running_on: Vec<usize>,
    },
}

/// Plan which cpu each of `shards` shards is pinned to.
///
/// `interface` is the NIC the shards serve; its PCI locality decides the
/// eligible cores for [`CoreSelection::Auto`] and is reported for
/// [`CoreSelection::List`]. Interfaces without a PCI device (veth, loopback,
/// bridges) have no locality: all usable cores are eligible and `reason` says
/// so. With more shards than eligible cores, shards share cores round-robin.
///
/// # Errors
///
/// [`PinError::NoShards`]; for a list: [`PinError::EmptyList`],
/// [`PinError::DuplicateCpu`], [`PinError::UnknownCpu`],
/// [`PinError::CpuNotAllowed`]; [`PinError::UnknownInterface`] when the
/// interface does not exist; [`PinError::Topology`] when hwloc fails.
/// [`CoreSelection::None`] never consults hwloc or the interface.
pub fn plan(
    interface: Option<&str>,
    shards: usize,
    selection: &CoreSelection,
) -> Result<PinPlan, PinError> {
    if shards == 0 {
        return Err(PinError::NoShards);
    }
    if *selection == CoreSelection::None {
        return Ok(PinPlan {
            assignments: vec![None; shards],
            numa_node: None,
            reason: format!(
                "pinning disabled (core selection none); {shards} {} left to the OS scheduler",
                plural(shards, "shard", "shards")
            ),
        });
    }

    let topology = load_topology(true)?;
    let usable = usable_cpus(&topology);
    if usable.is_empty() {
        return Err(PinError::Topology {
            detail: "hwloc reports no cpu this process may use".to_owned(),
        });
    }
    let locality = match interface {
        Some(name) => Some(nic_locality(&topology, name, &usable)?),
        None => None,
    };
    let numa_node = locality.as_ref().and_then(|l| l.numa_node);

    let mut reason = String::new();
    let cores: Vec<usize> = match selection {
        CoreSelection::None => unreachable!("handled above"),
        CoreSelection::List(list) => {
            check_list(&topology, list, &usable)?;
            let _ = write!(reason, "core list {}", fmt_list(list));
            if let Some(loc) = &locality {
                let _ = write!(reason, "; {}", loc.describe(false));
                if let Some(local) = &loc.local {
                    let remote: Vec<usize> = list
                        .iter()
                        .copied()
                        .filter(|c| !local.contains(c))
                        .collect();
                    if !remote.is_empty() {
                        let _ = write!(
                            reason,
                            "; warning: {} {} not local to {}",
                            plural(remote.len(), "core", "cores"),
                            fmt_list(&remote),
                            loc.interface
                        );
                    }
                }
            }
            list.clone()
        }
        CoreSelection::Auto => {
            let mut eligible: Vec<usize> = match &locality {
                Some(loc) => {
                    reason.push_str(&loc.describe(true));
                    match &loc.local {
                        Some(local) if !local.is_empty() => local.clone(),
                        Some(_) => {
                            let _ = write!(
                                reason,
                                "; none of those cores is usable by this process, using all usable cores ({})",
                                fmt_cpus(&usable)
                            );
                            usable.clone()
                        }
                        None => {
                            let _ = write!(reason, " ({})", fmt_cpus(&usable));
                            usable.clone()
                        }
                    }
                }
                None => {
                    let _ = write!(
                        reason,
                        "no interface given; using all usable cores ({})",
                        fmt_cpus(&usable)
                    );
                    usable.clone()
                }
            };
            let first = first_core_pus(&topology);
            if topology.objects_with_type(ObjectType::Core).len() > 1
                && eligible.iter().any(|c| first.contains(c))
            {
                if eligible.iter().any(|c| !first.contains(c)) {
                    eligible.retain(|c| !first.contains(c));
                    let _ = write!(
                        reason,
                        "; skipping {} {} (first core, left to the OS)",
                        plural(first.len(), "core", "cores"),
                        fmt_cpus(&first)
                    );
                } else {
                    reason.push_str("; only the first core is eligible, so using it");
                }
            }
            order_by_smt_rank(&topology, &mut eligible);
            eligible
        }
    };

    let assignments: Vec<Option<usize>> =
        (0..shards).map(|i| Some(cores[i % cores.len()])).collect();
    reason.push_str("; ");
    for (shard, cpu) in assignments.iter().enumerate() {
        if shard > 0 {
            reason.push_str(", ");
        }
        let _ = write!(reason, "shard {shard} -> core {}", cpu.unwrap_or_default());
    }
    if shards > cores.len() {
        let _ = write!(
            reason,
            " ({shards} shards share {} {} round-robin)",
            cores.len(),
            plural(cores.len(), "core", "cores")
        );
    }
    Ok(PinPlan {
        assignments,
        numa_node,
        reason,
    })
}

/// Bind the calling thread to the single PU with OS index `cpu`, then check
/// (binding and current location, as reported by hwloc) that it took.
///
/// # Errors
///
/// [`PinError::UnknownCpu`] / [`PinError::CpuNotAllowed`] for a cpu this
/// process cannot use, [`PinError::Bind`] when hwloc refuses,
/// [`PinError::NotVerified`] when the thread is not on `cpu` afterwards,
/// [`PinError::Topology`] when hwloc fails to load.
pub fn pin_current_thread(cpu: usize) -> Result<(), PinError> {
    let topology = load_topology(false)?;
    let usable = usable_cpus(&topology);
    check_cpu(&topology, cpu, &usable)?;
    let set = singleton(cpu).ok_or_else(|| PinError::UnknownCpu {
        cpu,
        available: usable.clone(),
    })?;
    topology
        .bind_cpu(&set, CpuBindingFlags::THREAD)
        .map_err(|e| PinError::Bind {
            cpu,
            detail: e.to_string(),
        })?;

    let binding = topology
        .cpu_binding(CpuBindingFlags::THREAD)
        .map_err(|e| PinError::Bind {
            cpu,
            detail: format!("reading the binding back: {e}"),
        })?;
    // Linux migrates the calling thread before sched_setaffinity returns; the
    // retries only cover a platform that migrates lazily.
    let mut running_on = CpuSet::new();
    for _ in 0..100 {
        running_on = topology
            .last_cpu_location(CpuBindingFlags::THREAD)
            .map_err(|e| PinError::Bind {
                cpu,
                detail: format!("reading the thread's cpu location: {e}"),
            })?;
        if running_on == set {
            break;
        }
        std::thread::yield_now();
    }
    if binding != set || running_on != set {
        return Err(PinError::NotVerified {
            cpu,
            binding: to_vec(&binding),
            running_on: to_vec(&running_on),
        });
    }
    Ok(())
}

/// The OS cpu indexes this process may run on (online and allowed by its
/// cgroup), ascending. Unaffected by the calling thread's own pinning.
///
/// # Errors
///
/// [`PinError::Topology`] when hwloc fails to load the topology.
pub fn available_cpus() -> Result<Vec<usize>, PinError> {
    let topology = load_topology(false)?;
    Ok(usable_cpus(&topology))
}

// --- internals ---------------------------------------------------------------

/// Where an interface sits.
struct Locality {
    interface: String,
    /// Usable cpus local to the NIC; `None` when it has no PCI locality.
    local: Option<Vec<usize>>,
    /// All cpus local to the NIC (usable or not), for the reason line.
    local_all: Vec<usize>,
    numa_node: Option<usize>,
}

impl Locality {
    /// `auto` says what it does about a missing locality; a list does not.
    fn describe(&self, auto: bool) -> String {
        match (&self.local, self.numa_node) {
            (None, _) if auto => format!(
                "interface {} has no PCI locality; using all cores",
                self.interface
            ),
            (None, _) => format!("interface {} has no PCI locality", self.interface),
            (Some(_), Some(node)) => format!(
                "interface {} is on NUMA node {node} (cores {})",
                self.interface,
                fmt_cpus(&self.local_all)
            ),
            (Some(_), None) => format!(
                "interface {} spans several NUMA nodes (cores {})",
                self.interface,
                fmt_cpus(&self.local_all)
            ),
        }
    }
}

fn load_topology(with_io: bool) -> Result<Topology, PinError> {
    let err = |detail: String| PinError::Topology { detail };
    if with_io {
        Topology::builder()
            .with_io_type_filter(TypeFilter::KeepImportant)
            .map_err(|e| err(format!("enabling I/O discovery: {e}")))?
            .build()
            .map_err(|e| err(e.to_string()))
    } else {
        Topology::new().map_err(|e| err(e.to_string()))
    }
}

/// Cpus of the topology that this process may use, ascending.
fn usable_cpus(topology: &Topology) -> Vec<usize> {
    let mut set = topology.cpuset().clone_target();
    set &= topology.allowed_cpuset();
    to_vec(&set)
}

fn to_vec(set: &CpuSet) -> Vec<usize> {
    set.iter_set().map(usize::from).collect()
}

fn singleton(cpu: usize) -> Option<CpuSet> {
    let idx = BitmapIndex::try_from(cpu).ok()?;
    Some(CpuSet::from(idx))
}

fn check_cpu(topology: &Topology, cpu: usize, usable: &[usize]) -> Result<(), PinError> {
    if usable.contains(&cpu) {
        return Ok(());
    }
    let exists = BitmapIndex::try_from(cpu).is_ok_and(|i| topology.complete_cpuset().is_set(i));
    if exists {
        Err(PinError::CpuNotAllowed {
            cpu,
            available: usable.to_vec(),
        })
    } else {
        Err(PinError::UnknownCpu {
            cpu,
            available: usable.to_vec(),
        })
    }
}

fn check_list(topology: &Topology, list: &[usize], usable: &[usize]) -> Result<(), PinError> {
    if list.is_empty() {
        return Err(PinError::EmptyList {
            available: usable.to_vec(),
        });
    }
    for (i, &cpu) in list.iter().enumerate() {
        if list[..i].contains(&cpu) {
            return Err(PinError::DuplicateCpu { cpu });
        }
        check_cpu(topology, cpu, usable)?;
    }
    Ok(())
}

/// Network interface names in this network namespace, or `None` when
/// `/sys/class/net` cannot be read.
fn interface_names() -> Option<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    Some(names)
}

fn is_network_osdev(obj: &TopologyObject) -> bool {
    matches!(
        obj.attributes(),
        Some(ObjectAttributes::OSDevice(a)) if a.device_type() == OSDeviceType::Network
    )
}

fn nic_locality(topology: &Topology, name: &str, usable: &[usize]) -> Result<Locality, PinError> {
    let osdev = topology.os_devices().find(|obj| {
        is_network_osdev(obj) && obj.name().is_some_and(|n| n.to_bytes() == name.as_bytes())
    });
    // hwloc lists only interfaces backed by a device (PCI, ...); virtual ones
    // (veth, lo, bridges) are absent unless HWLOC_VIRTUAL_LINUX_OSDEV is set,
    // in which case they hang off the root with no PCI ancestor.
    let pci_backed = osdev.filter(|obj| {
        obj.ancestors()
            .any(|a| a.object_type() == ObjectType::PCIDevice)
    });
    let Some(ancestor) = pci_backed.and_then(TopologyObject::first_non_io_ancestor) else {
        if let Some(known) = interface_names()
            && !known.iter().any(|k| k == name)
        {
            return Err(PinError::UnknownInterface {
                interface: name.to_owned(),
                known,
            });
        }
        return Ok(Locality {
            interface: name.to_owned(),
            local: None,
            local_all: Vec::new(),
            numa_node: None,
        });
    };
    let local_all = ancestor.cpuset().map(|s| to_vec(&s)).unwrap_or_default();
    let local = local_all
        .iter()
        .copied()
        .filter(|c| usable.contains(c))
        .collect();
    let numa_node = ancestor.nodeset().and_then(|nodes| {
        if nodes.weight() == Some(1) {
            nodes.first_set().map(usize::from)
        } else {
            None
        }
    });
    Ok(Locality {
        interface: name.to_owned(),
        local: Some(local),
        local_all,
        numa_node,
    })
}

/// OS indexes of the PUs of the machine's first core (or of its first PU when
/// hwloc reports no cores).
fn first_core_pus(topology: &Topology) -> Vec<usize> {
    if let Some(core) = topology.objects_with_type(ObjectType::Core).next() {
        core.cpuset().map(|s| to_vec(&s)).unwrap_or_default()
    } else {
        topology
            .objects_with_type(ObjectType::PU)
            .next()
            .and_then(TopologyObject::os_index)
            .into_iter()
            .collect()
    }
}

/// Order cpus so that one PU of every physical core comes before any SMT
/// sibling (then topology order), so shards land on distinct cores first.
fn order_by_smt_rank(topology: &Topology, cpus: &mut Vec<usize>) {
    let mut ranked: Vec<(usize, usize, usize)> = topology
        .objects_with_type(ObjectType::PU)
        .enumerate()
        .filter_map(|(logical, pu)| {
            let os = pu.os_index()?;
            if !cpus.contains(&os) {
                return None;
            }
            let rank = pu
                .ancestors()
                .find(|a| a.object_type() == ObjectType::Core)
                .and_then(|core| core.cpuset())
                .and_then(|s| s.iter_set().position(|i| usize::from(i) == os))
                .unwrap_or(0);
            Some((rank, logical, os))
        })
        .collect();
    ranked.sort_unstable();
    let ordered: Vec<usize> = ranked.into_iter().map(|(_, _, os)| os).collect();
    if ordered.len() == cpus.len() {
        *cpus = ordered;
    }
}

/// `[0, 1, 2, 5]` -> `"0-2,5"` (sorts a copy).
fn fmt_cpus(cpus: &[usize]) -> String {
    if cpus.is_empty() {
        return "none".to_owned();
    }
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            let _ = write!(out, "{start}");
        } else {
            let _ = write!(out, "{start}-{end}");
        }
        i += 1;
    }
    out
}

/// `[3, 1]` -> `"3,1"` (keeps the order).
fn fmt_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name of a network interface hwloc attaches to a PCI device, if any.
    fn pci_interface() -> Option<String> {
        let topology = load_topology(true).expect("topology");
        topology
            .os_devices()
            .filter(|o| is_network_osdev(o))
            .filter(|o| {
                o.ancestors()
                    .any(|a| a.object_type() == ObjectType::PCIDevice)
            })
            .find_map(|o| o.name().map(|n| n.to_string_lossy().into_owned()))
    }

    #[test]
    fn formats_cpu_ranges() {
        assert_eq!(fmt_cpus(&[]), "none");
        assert_eq!(fmt_cpus(&[1]), "1");
        assert_eq!(fmt_cpus(&[5, 0, 1, 2]), "0-2,5");
        assert_eq!(fmt_cpus(&[0, 2, 4]), "0,2,4");
    }

    #[test]
    fn available_cpus_are_sorted_and_non_empty() {
        let cpus = available_cpus().unwrap();
        assert!(!cpus.is_empty());
        assert!(cpus.windows(2).all(|w| w[0] < w[1]), "{cpus:?}");
    }

    #[test]
    fn plan_none_pins_nothing() {
        let p = plan(Some("lo"), 3, &CoreSelection::None).unwrap();
        assert_eq!(p.assignments, vec![None, None, None]);
        assert_eq!(p.numa_node, None);
        assert!(p.reason.contains("pinning disabled"), "{}", p.reason);
    }

    #[test]
    fn plan_zero_shards_is_an_error() {
        assert!(matches!(
            plan(None, 0, &CoreSelection::Auto),
            Err(PinError::NoShards)
        ));
    }

    #[test]
    fn plan_auto_without_pci_locality_uses_all_cores_minus_first() {
        let cpus = available_cpus().unwrap();
        let p = plan(Some("lo"), 1, &CoreSelection::Auto).unwrap();
        println!("{}", p.reason);
        assert!(
            p.reason
                .contains("interface lo has no PCI locality; using all cores"),
            "{}",
            p.reason
        );
        assert_eq!(p.numa_node, None);
        let cpu = p.assignments[0].expect("pinned");
        assert!(cpus.contains(&cpu));
        if cpus.len() > 1 {
            assert_ne!(
                cpu, cpus[0],
                "first core must be left to the OS: {}",
                p.reason
            );
        }
    }

    #[test]
    fn plan_auto_shares_cores_round_robin() {
        let shards = available_cpus().unwrap().len() * 2 + 1;
        let p = plan(None, shards, &CoreSelection::Auto).unwrap();
        println!("{}", p.reason);
        assert_eq!(p.assignments.len(), shards);
        assert!(p.assignments.iter().all(Option::is_some));
        assert!(p.reason.contains("round-robin"), "{}", p.reason);
        let distinct: std::collections::BTreeSet<_> = p.assignments.iter().collect();
        // Round-robin: the pattern repeats with the number of distinct cores.
        let n = distinct.len();
        for (i, a) in p.assignments.iter().enumerate().skip(n) {
            assert_eq!(*a, p.assignments[i - n]);
        }
    }

    #[test]
    fn plan_auto_on_pci_interface_uses_local_cores() {
        let Some(ifname) = pci_interface() else {
            eprintln!("no PCI-backed network interface here; skipping");
            return;
        };
        let p = plan(Some(&ifname), 2, &CoreSelection::Auto).unwrap();
        println!("{}", p.reason);
        assert!(
            p.reason
                .starts_with(&format!("interface {ifname} is on NUMA node"))
                || p.reason.starts_with(&format!("interface {ifname} spans")),
            "{}",
            p.reason
        );
        let topology = load_topology(true).unwrap();
        let loc = nic_locality(&topology, &ifname, &usable_cpus(&topology)).unwrap();
        let local = loc.local.unwrap();
        for a in &p.assignments {
            assert!(
                local.contains(&a.unwrap()),
                "{:?} vs {local:?}",
                p.assignments
            );
        }
        if topology.nodeset().weight() == Some(1) {
            assert_eq!(p.numa_node, topology.nodeset().first_set().map(usize::from));
        }
    }

    #[test]
    fn plan_unknown_interface_is_an_error() {
        let err = plan(Some("nosuchif0"), 1, &CoreSelection::Auto).unwrap_err();
        assert!(matches!(err, PinError::UnknownInterface { .. }), "{err}");
        assert!(err.to_string().contains("lo"), "{err}");
    }

    #[test]
    fn plan_list_valid() {
        let cpus = available_cpus().unwrap();
        let list: Vec<usize> = cpus.iter().rev().copied().collect();
        let p = plan(
            Some("lo"),
            cpus.len() + 1,
            &CoreSelection::List(list.clone()),
        )
        .unwrap();
        println!("{}", p.reason);
        let expected: Vec<Option<usize>> = (0..=cpus.len())
            .map(|i| Some(list[i % list.len()]))
            .collect();
        assert_eq!(p.assignments, expected);
        assert!(p.reason.contains("round-robin"), "{}", p.reason);
    }

    #[test]
    fn plan_list_invalid() {
        let cpus = available_cpus().unwrap();
        let bogus = 4096 + cpus.last().unwrap();
        let err = plan(None, 1, &CoreSelection::List(vec![cpus[0], bogus])).unwrap_err();
        let msg = err.to_string();
        match err {
            PinError::UnknownCpu { cpu, available } => {
                assert_eq!(cpu, bogus);
                assert_eq!(available, cpus);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            msg.contains(&bogus.to_string()) && msg.contains(&fmt_cpus(&cpus)),
            "{msg}"
        );
        println!("{msg}");

        assert!(matches!(
            plan(None, 1, &CoreSelection::List(vec![])),
            Err(PinError::EmptyList { .. })
        ));
        assert!(matches!(
            plan(None, 1, &CoreSelection::List(vec![cpus[0], cpus[0]])),
            Err(PinError::DuplicateCpu { cpu }) if cpu == cpus[0]
        ));
    }

    #[test]
    fn pin_unknown_cpu_is_an_error() {
        let err = std::thread::spawn(|| pin_current_thread(100_000))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, PinError::UnknownCpu { cpu: 100_000, .. }),
            "{err}"
        );
    }

    #[test]
    fn pin_spawned_thread_to_each_cpu() {
        let cpus = available_cpus().unwrap();
        for &cpu in &cpus {
            let seen = std::thread::spawn(move || {
                pin_current_thread(cpu).unwrap();
                // Burn a little time so the scheduler gets a chance to move us.
                let mut x = 0u64;
                for i in 0..2_000_000u64 {
                    x = x.wrapping_add(std::hint::black_box(i));
                }
                std::hint::black_box(x);
                let now = rustix::thread::sched_getcpu();
                // Enumeration must not shrink to our own cpu once pinned.
                let after = available_cpus().unwrap();
                (now, after)
            })
            .join()
            .unwrap();
            assert_eq!(seen.0, cpu, "sched_getcpu after pinning to {cpu}");
            assert_eq!(seen.1, cpus, "available_cpus from a thread pinned to {cpu}");
        }
    }
}
