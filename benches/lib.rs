//! Criterion benchmarks for MemoryStreamer live in this package's `[[bench]]`
//! targets; the library is empty on purpose. Run them with `make bench`.
