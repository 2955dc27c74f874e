//! Scheduling: engine threads (and, with the serving layer, queues and batching).

pub mod worker;

pub use worker::{BatchOutput, EngineWorker, InputBatch, WorkerConfig, WorkerError};
