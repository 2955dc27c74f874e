//! Benchmarks that print tables: `sluice bench engine` (realized speedup of gating).

pub mod engine;
pub mod timing;
