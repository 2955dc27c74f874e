//! Scheduling: per-model queues with dynamic batching and admission control, and the
//! engine threads that own the models.

pub mod queue;
pub mod scheduler;
pub mod worker;

pub use scheduler::{
    BatchSample, EngineAnswer, LoadSample, QueueTicket, ScheduleError, SchedulerConfig, SchedulerHandle,
};
pub use worker::{BatchOutput, InputBatch, WorkerConfig, WorkerError};
