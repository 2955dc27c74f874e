//! sluice: an inference server for dynamically pruned CNNs.
//!
//! Layers, with dependencies pointing one way (front doors → scheduling/control → engine):
//! - `engine`: tch models, gates, FLOP accounting, weights;
//! - `scheduling`: engine threads (queues and batching with the serving layer);
//! - `control`: the gating policy's calibration (and, with serving, live control);
//! - `repository`: model folders and their configuration;
//! - `train`: training gated models (sandwich rule, gates, exits) and exporting them;
//! - `data`: datasets;
//! - `cli`: the `sluice` command line.

pub mod bench;
pub mod cli;
pub mod control;
pub mod data;
pub mod engine;
pub mod observability;
pub mod protocol;
pub mod repository;
pub mod scheduling;
pub mod server;
pub mod serving;
pub mod train;
