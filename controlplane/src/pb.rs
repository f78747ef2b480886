//! The admin API's generated messages, clients and servers
//! (`proto/admin.proto`, package `kaelix.admin.v1`). `kaelix stream|broker|config`
//! use the clients; [`crate::admin`] implements the servers.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kaelix.admin.v1");

/// Default address of the admin API (`admin.addr`).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:7002";
