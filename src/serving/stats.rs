//! Per-model counters for Triton's statistics extension (`/v2/models/{m}/stats`,
//! `ModelStatistics`), which perf_analyzer reads for its server-side breakdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::scheduling::EngineAnswer;

/// A count and the total time it took.
#[derive(Default)]
pub struct TimedCount {
    pub count: AtomicU64,
    pub ns: AtomicU64,
}

impl TimedCount {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// (count, total nanoseconds)
    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.ns.load(Ordering::Relaxed))
    }
}

/// Cumulative statistics of one model.
#[derive(Default)]
pub struct InferStats {
    /// Inputs (batch rows) inferred.
    pub inference_count: AtomicU64,
    /// Requests answered (each request is counted once, as Triton does per request).
    pub execution_count: AtomicU64,
    pub last_inference_ms: AtomicU64,
    pub success: TimedCount,
    pub fail: TimedCount,
    pub queue: TimedCount,
    /// Decoding and checking the request (and images).
    pub compute_input: TimedCount,
    pub compute_infer: TimedCount,
    /// Building the response.
    pub compute_output: TimedCount,
}

impl InferStats {
    /// Records a request that got its answer; `input` and `output` are the times spent
    /// preparing it and building its response.
    pub fn success(&self, items: usize, answer: &EngineAnswer, input: Duration, output: Duration) {
        self.inference_count.fetch_add(items as u64, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.success.add(input + answer.queue_time + answer.compute_time + output);
        self.queue.add(answer.queue_time);
        self.compute_input.add(input);
        self.compute_infer.add(answer.compute_time);
        self.compute_output.add(output);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_inference_ms.store(now.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn failure(&self) {
        self.fail.add(Duration::ZERO);
    }
}
