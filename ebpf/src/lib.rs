//! # kaelix-ebpf (being built)
//!
//! Will hold the XDP program (C, built with clang) that steers the data port
//! into AF_XDP sockets, and its libbpf-rs loader. Nothing is implemented yet.
#![deny(unsafe_code)]
#![warn(missing_docs)]
