//! # kaelix-controlplane
//!
//! The tokio control plane beside the data plane: starting a broker
//! ([`broker`]), its configuration (schema and validation in [`config`],
//! layering with the source of each value in [`layers`], hot reload in
//! [`reload`]), the gRPC admin API ([`admin`], generated code in
//! [`pb`]), Prometheus metrics ([`metrics`]), logs ([`logging`]), the
//! TCP fetch server ([`fetch`]), and [`server::ControlPlane`], which runs the
//! admin API, metrics and reloads next to a running broker. It reaches the
//! busy-poll shards only through their bounded command queues
//! ([`shard_call`]) and atomics, never by locking their state.
//!
//! The metadata Raft group (openraft) lives in [`cluster`]; stream data
//! replication (leader and follower transport per shard, quorum commit
//! positions) in [`replication`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod fetch;
pub mod layers;
pub mod logging;
pub mod metrics;
pub mod pb;
pub mod reload;
pub mod replication;
pub mod server;
pub mod shard_call;
