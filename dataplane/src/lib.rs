//! # kaelix-dataplane (being built)
//!
//! Will hold the receive/transmit backend trait (kernel sockets, AF_XDP,
//! DPDK), the busy-poll loop pinned per RX queue, duplicate detection and
//! acknowledgements. Nothing is implemented yet.
#![deny(unsafe_code)]
#![warn(missing_docs)]
