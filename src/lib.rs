//! sluice: an inference server for dynamically pruned CNNs.
//!
//! Layers, each importing only the ones below it (checked by `tests/layering.rs`):
//! - `engine`: tch models, gates, FLOP accounting, weights; knows no protocol, queue, metrics
//!   registry or command line;
//! - `data`: datasets (IDX, CIFAR binary, image folders) and the PNG/JPEG decoding that
//!   training, evaluation and serving share;
//! - `observability`: the Prometheus registry and its typed handles, logging set-up;
//! - `control`: the live gating policy, its runtime calibration table, admin credentials;
//! - `repository`: model folders and their configuration;
//! - `scheduling`: engine threads, per-model batching queues, admission, deadlines,
//!   supervision;
//! - `train`: training gated models, exporting them, the offline calibration sweep;
//! - `serving`: the core both front doors call — the request model (requests, responses,
//!   `ApiError`, `prepare`), limits and admission, loaded models; knows no wire format;
//! - `protocol`: the front doors, `http` (axum) and `grpc` (tonic), which only translate wire
//!   formats (neither imports the other), and the connection limits they share;
//! - `server`: the composition root of `sluice serve`;
//! - `bench`, `cli`: benchmarks and the `sluice` command line.

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
