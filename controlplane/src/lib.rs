//! # kaelix-controlplane (being built)
//!
//! Will hold the tokio control plane: tonic gRPC admin API, configuration with
//! validation and hot reload, openraft cluster metadata, replication and
//! metrics. Nothing is implemented yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod config;
pub mod fetch;
pub mod layers;
pub mod logging;
pub mod pb;
