//! # kaelix-dataplane
//!
//! The receive/transmit backend trait ([`Backend`]: kernel sockets, AF_XDP,
//! DPDK), the busy-poll loop pinned per RX queue, duplicate detection and
//! acknowledgements. Being built: only the backend trait exists so far.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod af_xdp;
pub mod backend;

pub use backend::{Backend, BackendError, BackendStats, LinkPeer, Peer};
pub mod counters;
pub mod dpdk;
pub mod flow;
pub mod idle;
pub mod packet;
pub mod pinning;
pub mod shard;
pub mod sink;
pub mod socket;
pub mod storage_sink;
pub mod tunables;

pub use counters::ShardCounters;
pub use idle::IdleStrategy;
pub use pinning::{CoreSelection, PinError, PinPlan};
pub use shard::{Shard, ShardConfig, ShardError, ShardLinks, ShardTask};
pub use sink::{LogSink, SinkBatch, SinkError};
pub use socket::{SocketBackend, SocketConfig};
pub use tunables::{ShardRole, ShardTunables};
