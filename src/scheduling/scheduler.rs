//! The per-model scheduler: admission control (an owned semaphore permit per request, so
//! a full queue answers at once), a batcher task that forms dynamic batches with
//! [`BatchQueue`] while an engine instance is free, and completion tasks that split each
//! batch's output back to its requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{Instrument, Span, debug, warn};

use super::queue::{BatchQueue, Pending};
use super::worker::{BatchOutput, EngineWorker, InputBatch, WorkerError};
use crate::engine::{ComputeReport, EngineError, GatePolicy};
use prometheus::IntGauge;

use crate::observability::ModelMetrics;

/// Batching settings of one model.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Requests admitted and not yet answered.
    pub queue_capacity: usize,
    /// Per-item values (C·H·W), to build batches.
    pub item_shape: [i64; 3],
}

/// Why a request got no answer from the engine.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("the queue of model `{0}` is full; retry later")]
    QueueFull(String),
    #[error("model `{0}` is shutting down")]
    Stopped(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The engine's answer for one request.
#[derive(Clone, Debug)]
pub struct EngineAnswer {
    /// Row-major `[items, classes]`.
    pub logits: Vec<f32>,
    pub classes: usize,
    pub reports: Vec<ComputeReport>,
    pub policy_version: u64,
    pub queue_time: Duration,
    pub compute_time: Duration,
    pub batch_size: usize,
}

struct Job {
    values: Vec<f32>,
    reply: oneshot::Sender<Result<EngineAnswer, ScheduleError>>,
    span: Span,
    admitted: Admitted,
    /// Counted in the queue-depth gauge until its batch starts (or it is dropped).
    queued: GaugeGuard,
}

/// A gauge incremented for as long as this value lives.
struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An admitted request: its queue permit and its place in the in-flight gauge, both held
/// until it is answered (or abandoned).
struct Admitted {
    _permit: OwnedSemaphorePermit,
    _inflight: GaugeGuard,
}

/// The cheap-to-clone handle front doors use.
#[derive(Clone)]
pub struct SchedulerHandle {
    model: Arc<str>,
    jobs: mpsc::Sender<Pending<Job>>,
    admission: Arc<Semaphore>,
    capacity: usize,
    inflight: IntGauge,
    queue_depth: IntGauge,
}

impl SchedulerHandle {
    /// Queues `items` rows under `policy` (`None`: the live policy, snapshotted when its
    /// batch starts) and waits for the answer. Fails at once when the queue is full.
    /// Dropping the future abandons the request: it is not batched.
    pub async fn infer(
        &self,
        values: Vec<f32>,
        items: usize,
        policy: Option<Arc<GatePolicy>>,
    ) -> Result<EngineAnswer, ScheduleError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::NoPermits => ScheduleError::QueueFull(self.model.to_string()),
            tokio::sync::TryAcquireError::Closed => ScheduleError::Stopped(self.model.to_string()),
        })?;
        let (reply, answer) = oneshot::channel();
        let admitted = Admitted { _permit: permit, _inflight: GaugeGuard::new(&self.inflight) };
        let job = Job {
            values,
            reply,
            span: Span::current(),
            admitted,
            queued: GaugeGuard::new(&self.queue_depth),
        };
        let pending = Pending { items, policy, enqueued: Instant::now(), payload: job };
        self.jobs.try_send(pending).map_err(|_| ScheduleError::Stopped(self.model.to_string()))?;
        answer.await.map_err(|_| ScheduleError::Stopped(self.model.to_string()))?
    }

    /// Requests admitted and not yet answered.
    pub fn inflight(&self) -> usize {
        self.capacity - self.admission.available_permits()
    }
}

/// Where a batch gets the live policy when it starts.
pub type LivePolicy = Arc<dyn Fn() -> Arc<GatePolicy> + Send + Sync>;

/// Starts the batcher for `workers`; returns the handle and the batcher's task.
pub fn start(
    model: &str,
    config: SchedulerConfig,
    workers: Vec<EngineWorker>,
    live: LivePolicy,
    metrics: ModelMetrics,
) -> (SchedulerHandle, tokio::task::JoinHandle<()>) {
    let (jobs, inbox) = mpsc::channel(config.queue_capacity.max(1));
    let handle = SchedulerHandle {
        model: model.into(),
        jobs,
        admission: Arc::new(Semaphore::new(config.queue_capacity)),
        capacity: config.queue_capacity,
        inflight: metrics.inflight.clone(),
        queue_depth: metrics.queue_depth.clone(),
    };
    let (free_tx, free) = mpsc::channel(workers.len().max(1));
    for i in 0..workers.len() {
        let _ = free_tx.try_send(i);
    }
    let batcher =
        Batcher { model: model.to_string(), config, workers: Arc::new(workers), live, metrics, free_tx };
    let task = tokio::spawn(batcher.run(inbox, free));
    (handle, task)
}

/// The batcher task's state.
struct Batcher {
    model: String,
    config: SchedulerConfig,
    workers: Arc<Vec<EngineWorker>>,
    live: LivePolicy,
    metrics: ModelMetrics,
    /// Engine instances report back here when they finish a batch.
    free_tx: mpsc::Sender<usize>,
}

impl Batcher {
    /// Forms batches while an engine instance is free, until the request channel closes and
    /// the queue is drained.
    async fn run(self, mut inbox: mpsc::Receiver<Pending<Job>>, mut free: mpsc::Receiver<usize>) {
        let mut queue = BatchQueue::new(self.config.max_batch_size, self.config.max_queue_delay);
        let mut open = true;
        loop {
            let Some(worker) = free.recv().await else { return };
            // Wait until a batch is due; requests keep arriving meanwhile.
            let batch = loop {
                while let Ok(p) = inbox.try_recv() {
                    queue.push(p);
                }
                let dropped = queue.drop_abandoned(|job| job.reply.is_closed());
                if dropped > 0 {
                    debug!(dropped, "requests abandoned by their clients before batching");
                }
                if let Some(batch) = queue.pop_batch(Instant::now(), !open) {
                    break batch;
                }
                if !open {
                    return; // closed and drained
                }
                let deadline = queue.deadline();
                tokio::select! {
                    next = inbox.recv() => match next {
                        Some(p) => queue.push(p),
                        None => open = false,
                    },
                    _ = sleep_until(deadline), if deadline.is_some() => {}
                }
            };
            // One snapshot per batch: the policy is whole, and changes apply from the next batch.
            let policy = batch[0].policy.clone().unwrap_or_else(|| (self.live)());
            self.dispatch(worker, batch, policy);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d.into()).await;
    }
}

impl Batcher {
    /// Sends a batch to engine instance `worker` and answers its requests when it is done.
    fn dispatch(&self, worker: usize, batch: Vec<Pending<Job>>, policy: Arc<GatePolicy>) {
        let (model, config, workers, metrics) = (&self.model, &self.config, &self.workers, &self.metrics);
        let free = self.free_tx.clone();
        let started = Instant::now();
        let items: usize = batch.iter().map(|p| p.items).sum();
        let mut values = Vec::with_capacity(items * config.item_shape.iter().product::<i64>() as usize);
        let mut parts = Vec::with_capacity(batch.len());
        for p in batch {
            let queue_time = started - p.enqueued;
            metrics.queue_duration.observe(queue_time.as_secs_f64());
            let Job { values: v, reply, span, admitted, queued } = p.payload;
            drop(queued);
            values.extend(v);
            parts.push((p.items, reply, span, queue_time, admitted));
        }
        let [c, h, w] = config.item_shape;
        let input = InputBatch { values, shape: vec![items as i64, c, h, w] };
        // The batch's span is a child of its first request's span and follows from the
        // others', so each request's trace runs protocol → queue → engine.
        let span = parts.first().map_or_else(Span::none, |first| {
            tracing::info_span!(parent: &first.2, "batch", model, batch_size = items, policy_version = policy.version)
        });
        for part in parts.iter().skip(1) {
            span.follows_from(&part.2);
        }
        // The engine thread enters the span of the job, which is this batch's.
        let submitted = span.in_scope(|| workers[worker].try_submit(input, policy));
        let metrics = metrics.clone();
        let model = model.to_string();
        tokio::spawn(
            async move {
                let result = match submitted {
                    Ok(answer) => answer.await.unwrap_or(Err(WorkerError::Stopped)),
                    Err(e) => Err(e),
                };
                let _ = free.send(worker).await;
                let compute_time = started.elapsed();
                match result {
                    Ok(out) => {
                        metrics.compute_duration.observe(compute_time.as_secs_f64());
                        metrics.record_batch(&out.reports);
                        reply_all(parts, out, compute_time, items);
                    }
                    Err(e) => {
                        warn!(model, error = %e, "batch failed");
                        for (_, reply, _, _, _) in parts {
                            let err = match &e {
                                WorkerError::Engine(inner) => {
                                    ScheduleError::Engine(EngineError::InvalidConfig(inner.to_string()))
                                }
                                _ => ScheduleError::Stopped(model.clone()),
                            };
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
}

type Part = (usize, oneshot::Sender<Result<EngineAnswer, ScheduleError>>, Span, Duration, Admitted);

fn reply_all(parts: Vec<Part>, out: BatchOutput, compute_time: Duration, batch_size: usize) {
    let mut row = 0;
    for (items, reply, _span, queue_time, _admitted) in parts {
        let answer = EngineAnswer {
            logits: out.logits[row * out.classes..(row + items) * out.classes].to_vec(),
            classes: out.classes,
            reports: out.reports[row..row + items].to_vec(),
            policy_version: out.policy_version,
            queue_time,
            compute_time,
            batch_size,
        };
        row += items;
        let _ = reply.send(Ok(answer));
    }
}
