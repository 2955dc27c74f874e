//! sluice: an inference server for dynamically pruned CNNs.
//!
//! Layers, with dependencies pointing one way (front doors → scheduling/control → engine):
//! - `engine`: tch models, gates, FLOP accounting, weights;
//! - `scheduling`: engine threads (queues and batching with the serving layer);
//! - `repository`: model folders and their configuration;
//! - `data`: datasets;
//! - `cli`: the `sluice` command line.

pub mod cli;
pub mod data;
pub mod engine;
pub mod repository;
pub mod scheduling;
