//! # kaelix-storage (being built)
//!
//! Will hold the segmented log every message lands in: one interleaved log per
//! data-plane shard on 2 MiB hugepage memory with a disk copy, per-stream
//! sparse offset indexes, a time index, retention, three durability levels
//! and crash recovery. Sans-IO: no tokio, no threads of its own.
//! Nothing is implemented yet.
#![deny(unsafe_code)]
#![warn(missing_docs)]
