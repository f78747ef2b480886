//! One started ethdev port with its mbuf pool, shared by the port's
//! backends (one per queue). Dropping the last reference stops and closes
//! the port, frees the pool and cleans up the EAL, in that order.

use std::ffi::{CStr, CString, c_char, c_int};

use kaelix_dpdk_sys as sys;

use super::eal::{Eal, EalArgs, Host, eal_args, rte_errno, strerror};
use super::{DpdkConfig, DpdkError};

/// A started port. Fields are filled in as `open` gets further, so `Drop`
/// undoes exactly what was done.
#[derive(Debug)]
pub(crate) struct Port {
    pub port_id: u16,
    pub queues: u16,
    pub mac: [u8; 6],
    pub mtu: u16,
    pub hugepages: bool,
    /// Usable bytes of each mbuf, after the headroom.
    pub mbuf_data_bytes: u16,
    pub pool: *mut sys::rte_mempool,
    configured: bool,
    started: bool,
    /// Last field: dropped after the port is closed and the pool freed.
    eal: Option<Eal>,
}

// SAFETY: `pool` is a DPDK mempool, which is thread-safe (multi-producer,
// multi-consumer ring) and lives until Port::drop. The port itself is only
// configured, started and stopped through `&mut Port` (open and drop); what
// backends do through `&Port` (burst on their own queue, alloc/free mbufs,
// read stats) DPDK allows from any thread as long as one queue is used by one
// thread at a time, which DpdkBackend (one per queue, not Sync) ensures.
unsafe impl Send for Port {}
// SAFETY: see Send: shared access is limited to DPDK's thread-safe calls.
unsafe impl Sync for Port {}

fn port_error(port_id: u16, operation: &'static str, code: c_int) -> DpdkError {
    DpdkError::Port {
        port_id,
        operation,
        code,
        message: strerror(code.saturating_neg()),
    }
}

fn check(port_id: u16, operation: &'static str, code: c_int) -> Result<(), DpdkError> {
    if code < 0 {
        Err(port_error(port_id, operation, code))
    } else {
        Ok(())
    }
}

impl Port {
    /// Start the EAL, find the port, create the pool, configure `queues`
    /// queue pairs and start the port.
    pub fn open(config: &DpdkConfig) -> Result<Self, DpdkError> {
        config.validate()?;
        let args: EalArgs = eal_args(config, &Host::probe())?;
        let eal = Eal::init(&args)?;
        tracing::info!(args = ?eal.args(), hugepages = args.hugepages, "DPDK EAL started");
        let mut port = Self {
            port_id: 0,
            queues: config.queues,
            mac: [0; 6],
            mtu: 1500,
            hugepages: args.hugepages,
            mbuf_data_bytes: config.mbuf_data_bytes,
            pool: std::ptr::null_mut(),
            configured: false,
            started: false,
            eal: Some(eal),
        };
        port.port_id = find_port(config)?;
        port.setup(config)?;
        Ok(port)
    }

    fn setup(&mut self, config: &DpdkConfig) -> Result<(), DpdkError> {
        let port_id = self.port_id;
        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: port_id is a valid port (find_port); info is a writable
        // struct of the type the call fills.
        check(port_id, "rte_eth_dev_info_get", unsafe {
            sys::rte_eth_dev_info_get(port_id, &mut info)
        })?;
        if info.max_rx_queues < config.queues || info.max_tx_queues < config.queues {
            return Err(DpdkError::InvalidConfig {
                key: "queues",
                reason: format!(
                    "{} queue pairs asked, port {port_id} has at most {} RX and {} TX queues \
                     (for net_af_packet add qpairs=N to the --vdev)",
                    config.queues, info.max_rx_queues, info.max_tx_queues
                ),
            });
        }
        // SAFETY: valid port id; returns a NUMA socket id or -1 (SOCKET_ID_ANY).
        let socket = unsafe { sys::rte_eth_dev_socket_id(port_id) };

        let name =
            CString::new(format!("kx_pool_p{port_id}")).expect("no NUL in a formatted pool name");
        // Validated: the data bytes plus the headroom fit the u16 data room.
        let data_room = u16::try_from(
            u32::from(config.mbuf_data_bytes) + sys::RTE_PKTMBUF_HEADROOM,
        )
        .map_err(|_| DpdkError::InvalidConfig {
            key: "mbuf_data_bytes",
            reason: format!("{} plus the headroom exceeds 65535", config.mbuf_data_bytes),
        })?;
        // SAFETY: the EAL is running; name is NUL-terminated and unique in
        // this process (one port per EAL). A NULL return is handled below.
        self.pool = unsafe {
            sys::rte_pktmbuf_pool_create(
                name.as_ptr(),
                config.mbuf_count,
                config.mbuf_cache_size,
                0,
                data_room,
                socket,
            )
        };
        if self.pool.is_null() {
            let errno = rte_errno();
            return Err(DpdkError::MbufPool {
                count: config.mbuf_count,
                errno,
                message: strerror(errno),
            });
        }

        let mut conf = sys::rte_eth_conf::default();
        if config.queues > 1 && info.flow_type_rss_offloads != 0 {
            // Spread flows over the queues by hashing on every field the
            // device can hash (with DPDK's default key): one producer socket
            // always lands on the same queue, so per-flow order holds.
            conf.rxmode.mq_mode = sys::RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = info.flow_type_rss_offloads;
        }
        // SAFETY: valid port, stopped; conf is a zeroed rte_eth_conf (no
        // offloads, default MTU, RSS only as set above) that outlives the call;
        // its rss_key is NULL (the driver's default key).
        check(port_id, "rte_eth_dev_configure", unsafe {
            sys::rte_eth_dev_configure(port_id, config.queues, config.queues, &conf)
        })?;
        self.configured = true;

        let (mut rx_descriptors, mut tx_descriptors) = (config.rx_ring_size, config.tx_ring_size);
        // SAFETY: valid, configured port; both pointers are to live u16s.
        check(port_id, "rte_eth_dev_adjust_nb_rx_tx_desc", unsafe {
            sys::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut rx_descriptors, &mut tx_descriptors)
        })?;
        let queue_socket = u32::try_from(socket).unwrap_or(sys::SOCKET_ID_ANY as u32);
        for queue in 0..config.queues {
            // SAFETY: configured port, queue < the configured count; NULL
            // rx_conf selects the driver defaults; the pool outlives the port
            // (freed in Drop after rte_eth_dev_close).
            check(port_id, "rte_eth_rx_queue_setup", unsafe {
                sys::rte_eth_rx_queue_setup(
                    port_id,
                    queue,
                    rx_descriptors,
                    queue_socket,
                    std::ptr::null(),
                    self.pool,
                )
            })?;
            // SAFETY: as above; NULL tx_conf selects the driver defaults.
            check(port_id, "rte_eth_tx_queue_setup", unsafe {
                sys::rte_eth_tx_queue_setup(
                    port_id,
                    queue,
                    tx_descriptors,
                    queue_socket,
                    std::ptr::null(),
                )
            })?;
        }
        if config.promiscuous {
            // SAFETY: valid, configured port.
            check(port_id, "rte_eth_promiscuous_enable", unsafe {
                sys::rte_eth_promiscuous_enable(port_id)
            })?;
        }
        // SAFETY: valid port with every queue set up.
        check(port_id, "rte_eth_dev_start", unsafe {
            sys::rte_eth_dev_start(port_id)
        })?;
        self.started = true;

        let mut mac = sys::rte_ether_addr::default();
        // SAFETY: valid port; mac is writable.
        check(port_id, "rte_eth_macaddr_get", unsafe {
            sys::rte_eth_macaddr_get(port_id, &mut mac)
        })?;
        self.mac = mac.addr_bytes;
        let mut mtu = 0u16;
        // SAFETY: valid port; mtu is writable. Some drivers do not report it.
        if unsafe { sys::rte_eth_dev_get_mtu(port_id, &mut mtu) } == 0 && mtu > 0 {
            self.mtu = mtu;
        }
        tracing::info!(
            port_id,
            queues = config.queues,
            rx_descriptors,
            tx_descriptors,
            mac = ?self.mac,
            mtu = self.mtu,
            "DPDK port started"
        );
        Ok(())
    }

    /// Stop and close the port, free the pool, clean up the EAL. Reports
    /// the first failure; every step is tried regardless.
    pub fn close(mut self) -> Result<(), DpdkError> {
        self.close_in_place()
    }

    fn close_in_place(&mut self) -> Result<(), DpdkError> {
        let mut first_error = None;
        if std::mem::replace(&mut self.started, false) {
            // SAFETY: the port was started by open and is stopped once.
            let code = unsafe { sys::rte_eth_dev_stop(self.port_id) };
            if code < 0 {
                first_error.get_or_insert(port_error(self.port_id, "rte_eth_dev_stop", code));
            }
        }
        if std::mem::replace(&mut self.configured, false) {
            // SAFETY: configured port, stopped above; closed once. Releases
            // the mbufs its queues hold back to the pool.
            let code = unsafe { sys::rte_eth_dev_close(self.port_id) };
            if code < 0 {
                first_error.get_or_insert(port_error(self.port_id, "rte_eth_dev_close", code));
            }
        }
        if !self.pool.is_null() {
            // SAFETY: the pool was created by open; the port that used it is
            // closed and every backend (which return their mbufs on drop) is
            // gone, since this runs when the last Arc<Port> goes.
            unsafe { sys::rte_mempool_free(self.pool) };
            self.pool = std::ptr::null_mut();
        }
        if let Some(eal) = self.eal.take()
            && let Err(error) = eal.cleanup()
        {
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Mbufs free in the pool (for leak checks and metrics).
    pub fn pool_available(&self) -> u32 {
        // SAFETY: the pool is live while self is.
        unsafe { sys::rte_mempool_avail_count(self.pool) }
    }

    /// Mbufs of the pool in use (in rings, in flight, in caches).
    pub fn pool_in_use(&self) -> u32 {
        // SAFETY: the pool is live while self is.
        unsafe { sys::rte_mempool_in_use_count(self.pool) }
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Err(error) = self.close_in_place() {
            tracing::warn!(%error, "DPDK port shutdown on drop failed");
        }
    }
}

/// The device name of `port_id`.
fn port_name(port_id: u16) -> Option<String> {
    let mut name = [0 as c_char; sys::RTE_ETH_NAME_MAX_LEN as usize];
    // SAFETY: name has RTE_ETH_NAME_MAX_LEN bytes, the size DPDK writes at most.
    let code = unsafe { sys::rte_eth_dev_get_name_by_port(port_id, name.as_mut_ptr()) };
    if code != 0 {
        return None;
    }
    // SAFETY: on success DPDK wrote a NUL-terminated string into name.
    let name = unsafe { CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Resolve `config.port_name` or `config.port_id` to a valid port.
fn find_port(config: &DpdkConfig) -> Result<u16, DpdkError> {
    let no_port = |wanted: String| {
        let names: Vec<String> = (0..sys::RTE_MAX_ETHPORTS as u16)
            // SAFETY: any u16 may be asked about.
            .filter(|&id| unsafe { sys::rte_eth_dev_is_valid_port(id) } == 1)
            .filter_map(port_name)
            .collect();
        let mut devices = Vec::new();
        let mut args = config.eal_args.iter();
        while let Some(arg) = args.next() {
            if arg.starts_with("--vdev") || arg.starts_with("--allow") || arg.starts_with("-a") {
                if arg.contains('=') || (arg.starts_with("-a") && arg.len() > 2) {
                    devices.push(arg.clone());
                } else if let Some(value) = args.next() {
                    devices.push(format!("{arg} {value}"));
                }
            }
        }
        DpdkError::NoPort {
            wanted,
            devices,
            // SAFETY: no preconditions beyond a running EAL.
            available: unsafe { sys::rte_eth_dev_count_avail() },
            names,
        }
    };
    if let Some(name) = &config.port_name {
        let c_name = CString::new(name.as_str()).map_err(|_| DpdkError::InvalidConfig {
            key: "port_name",
            reason: format!("{name:?} contains a NUL byte"),
        })?;
        let mut port_id = 0u16;
        // SAFETY: c_name is NUL-terminated; port_id is writable.
        let code = unsafe { sys::rte_eth_dev_get_port_by_name(c_name.as_ptr(), &mut port_id) };
        return if code == 0 {
            Ok(port_id)
        } else {
            Err(no_port(format!("{name:?}")))
        };
    }
    // SAFETY: any u16 may be asked about.
    if unsafe { sys::rte_eth_dev_is_valid_port(config.port_id) } == 1 {
        Ok(config.port_id)
    } else {
        Err(no_port(format!("id {}", config.port_id)))
    }
}
