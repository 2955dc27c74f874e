//! Benchmarks that print tables: `sluice bench engine` (realized speedup of gating) and
//! `sluice bench widths` (time against FLOPs per channel-gate width).

pub mod engine;
pub mod timing;
pub mod widths;
