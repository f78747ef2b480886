//! # kaelix-client (being built)
//!
//! Will hold the producer (batching, retransmit, credit window) and the
//! consumers (remote TCP fetch, local mapped follower) that applications link.
//! Nothing is implemented yet.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
