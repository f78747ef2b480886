//! Shared helpers for the cross-crate integration tests in `tests/tests/`.
//! Test files are named by area: `storage_*.rs`, `e2e_*.rs`, `xdp_*.rs`.
