//! The per-model scheduler. Admitted requests wait in one [`BatchQueue`] behind a mutex;
//! each engine instance is a thread that, whenever it is free, takes the next due batch from
//! that queue itself, runs it and answers every request of the batch directly. A request so
//! crosses two threads in all (front door → engine → front door) with no batcher task in
//! between, a busy engine starts its next batch without waiting to be handed one, and the
//! queue delay is a condition-variable timeout (a futex wait) rather than a tokio timer
//! (1 ms ticks). Admission control is an owned semaphore permit per request, taken before the
//! request's body is read ([`SchedulerHandle::admit`]), so a full queue answers at once.
//! Requests past their deadline leave the queue uncomputed. An engine whose loop panics
//! anywhere is restarted on the same thread (its weights are read-only); the model counts as
//! ready only while at least one engine runs its loop.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::observability::metrics::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{Span, debug, error, warn};

use super::queue::{BatchQueue, Pending};
use super::worker::{self, BatchOutput, InputBatch, WorkerConfig, WorkerError};
use crate::engine::{ComputeReport, GatePolicy, Model, ModelSource};
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
    /// How long one free engine busy-waits for work before it sleeps (zero: no spinning).
    pub idle_spin: Duration,
}

/// Why a request got no answer from the engine.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("the queue of model `{0}` is full; retry later")]
    QueueFull(String),
    #[error("model `{0}` is shutting down")]
    Stopped(String),
    #[error("model `{model}`: the batch failed: {why}")]
    Failed { model: String, why: String },
    #[error("model `{0}`: the request's deadline passed while it waited in the queue")]
    DeadlineExceeded(String),
    #[error("model `{0}`: the engine stopped before answering (it is being restarted)")]
    EngineLost(String),
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
    /// Engine time of the batch the request ran in.
    pub compute_time: Duration,
    pub batch_size: usize,
}

/// One batch the engines ran, as the latency controller learns from it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchSample {
    /// The budget of the batch's policy (`None`: raw thresholds).
    pub budget: Option<f64>,
    pub images: usize,
    /// Engine time of the batch.
    pub compute: Duration,
}

/// What the scheduler measured since the last [`SchedulerHandle::take_load`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// Images queued (requests refused because the queue was full count as one image each:
    /// they were offered load too).
    pub arrived: u64,
    /// Images waiting for a batch now.
    pub queued: usize,
    /// The batches run, oldest first, at most [`BATCH_SAMPLES`] (the newest).
    pub batches: Vec<BatchSample>,
}

/// Batches kept between two reads of the load; older ones are dropped first.
pub const BATCH_SAMPLES: usize = 1024;

type Reply = oneshot::Sender<Result<EngineAnswer, ScheduleError>>;

struct Job {
    values: Vec<f32>,
    reply: Reply,
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

/// Where a batch gets the live policy when it starts.
pub type LivePolicy = Arc<dyn Fn() -> Arc<GatePolicy> + Send + Sync>;

/// What the front doors and the engine threads share.
struct Shared {
    model: String,
    config: SchedulerConfig,
    state: Mutex<State>,
    /// Signalled when a request arrives, when a taken batch leaves due work behind, and on
    /// close.
    wake: Condvar,
    live: LivePolicy,
    metrics: ModelMetrics,
    /// Counts enqueues and the close, so a spinning engine sees work without the lock.
    events: AtomicU64,
    /// Set while one engine spins; the others sleep.
    spinning: AtomicBool,
    /// Engines running their loop (0 while loading, restarting or stopped).
    live_engines: AtomicUsize,
    /// Test hook: the next engine to take a batch panics outside the batch's guard.
    inject_panic: AtomicBool,
    /// Images offered since the last load reading (see [`LoadSample::arrived`]).
    arrived: AtomicU64,
    /// Batches run since the last load reading, at most [`BATCH_SAMPLES`].
    batches: Mutex<std::collections::VecDeque<BatchSample>>,
}

struct State {
    queue: BatchQueue<Job>,
    open: bool,
}

/// The cheap-to-clone handle front doors use.
#[derive(Clone)]
pub struct SchedulerHandle {
    shared: Arc<Shared>,
    admission: Arc<Semaphore>,
}

/// A request's place in its model's queue, taken before its body is read; the request holds
/// it until it is answered or abandoned.
pub struct QueueTicket {
    admitted: Admitted,
}

impl SchedulerHandle {
    /// Takes a place in the queue, or fails at once when the queue is full or closed.
    pub fn admit(&self) -> Result<QueueTicket, ScheduleError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::NoPermits => {
                self.shared.arrived.fetch_add(1, Ordering::Relaxed);
                ScheduleError::QueueFull(self.shared.model.clone())
            }
            tokio::sync::TryAcquireError::Closed => ScheduleError::Stopped(self.shared.model.clone()),
        })?;
        let inflight = GaugeGuard::new(&self.shared.metrics.inflight);
        Ok(QueueTicket { admitted: Admitted { _permit: permit, _inflight: inflight } })
    }

    /// Queues `items` rows under `policy` (`None`: the live policy, snapshotted when its
    /// batch starts) and waits for the answer. A request still queued at its `deadline` is
    /// dropped uncomputed. Dropping the future abandons the request: it is not batched.
    pub async fn infer(
        &self,
        ticket: QueueTicket,
        values: Vec<f32>,
        items: usize,
        policy: Option<Arc<GatePolicy>>,
        deadline: Option<Instant>,
    ) -> Result<EngineAnswer, ScheduleError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            values,
            reply,
            span: Span::current(),
            admitted: ticket.admitted,
            queued: GaugeGuard::new(&self.shared.metrics.queue_depth),
        };
        self.shared.enqueue(Pending { items, policy, enqueued: Instant::now(), deadline, payload: job })?;
        answer.await.map_err(|_| ScheduleError::EngineLost(self.shared.model.clone()))?
    }

    /// Requests admitted and not yet answered.
    pub fn inflight(&self) -> usize {
        self.shared.config.queue_capacity - self.admission.available_permits()
    }

    /// What was measured since the last call: images offered, images queued now, batches
    /// run. One reader (the model's latency controller) is expected.
    pub fn take_load(&self) -> LoadSample {
        let arrived = self.shared.arrived.swap(0, Ordering::Relaxed);
        let queued = self.shared.lock().queue.items();
        let batches =
            std::mem::take(&mut *self.shared.batches.lock().unwrap_or_else(PoisonError::into_inner));
        LoadSample { arrived, queued, batches: batches.into() }
    }

    /// Engines running their loop: 0 means the model cannot answer (not ready).
    pub fn live_engines(&self) -> usize {
        self.shared.live_engines.load(Ordering::Acquire)
    }

    /// Fault injection for tests: the next engine to take a batch panics outside the batch's
    /// own guard (as a bug in reply or metrics code would), and must be restarted.
    #[doc(hidden)]
    pub fn inject_engine_panic(&self) {
        self.shared.inject_panic.store(true, Ordering::Release);
    }
}

/// A model's engine threads. Dropping it closes the queue (requests still waiting are
/// answered "shutting down"), lets running batches finish and joins the threads.
pub struct Scheduler {
    shared: Arc<Shared>,
    engines: Vec<JoinHandle<()>>,
}

/// Starts one engine thread per entry of `engines` on `source` (each builds and warms up
/// its own model; this blocks until all are ready) and returns them with the handle
/// front doors use.
pub fn start(
    model: &str,
    config: SchedulerConfig,
    source: &ModelSource,
    engines: &[WorkerConfig],
    live: LivePolicy,
    metrics: ModelMetrics,
) -> Result<(Scheduler, SchedulerHandle), WorkerError> {
    let admission = Arc::new(Semaphore::new(config.queue_capacity));
    let shared = Arc::new(Shared {
        model: model.to_string(),
        state: Mutex::new(State {
            queue: BatchQueue::new(config.max_batch_size, config.max_queue_delay),
            open: true,
        }),
        wake: Condvar::new(),
        events: AtomicU64::new(0),
        spinning: AtomicBool::new(false),
        live_engines: AtomicUsize::new(0),
        inject_panic: AtomicBool::new(false),
        arrived: AtomicU64::new(0),
        batches: Mutex::new(std::collections::VecDeque::new()),
        config,
        live,
        metrics,
    });
    // On an error, dropping the partly started scheduler stops the engines already running.
    let mut scheduler = Scheduler { shared: shared.clone(), engines: Vec::with_capacity(engines.len()) };
    for engine in engines {
        let shared = shared.clone();
        // Counted live before its loop starts, so the model is ready once `start` returns.
        shared.live_engines.fetch_add(1, Ordering::AcqRel);
        let counted = shared.clone();
        match worker::start_engine(source.clone(), engine, move |model| shared.serve(model)) {
            Ok(thread) => scheduler.engines.push(thread),
            Err(e) => {
                counted.live_engines.fetch_sub(1, Ordering::AcqRel);
                return Err(e);
            }
        }
    }
    Ok((scheduler, SchedulerHandle { shared, admission }))
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.shared.lock();
            state.open = false;
            state.queue.drain()
        };
        for Job { reply, admitted, .. } in waiting {
            drop(admitted);
            let _ = reply.send(Err(ScheduleError::Stopped(self.shared.model.clone())));
        }
        self.shared.events.fetch_add(1, Ordering::Release);
        self.shared.wake.notify_all();
        for engine in self.engines.drain(..) {
            if engine.join().is_err() {
                warn!(model = %self.shared.model, "engine thread panicked");
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock is never held across engine work, so a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn enqueue(&self, pending: Pending<Job>) -> Result<(), ScheduleError> {
        let items = pending.items as u64;
        {
            let mut state = self.lock();
            if !state.open {
                return Err(ScheduleError::Stopped(self.model.clone()));
            }
            state.queue.push(pending);
        }
        self.arrived.fetch_add(items, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Release);
        self.wake.notify_one();
        Ok(())
    }

    /// An engine thread's life: run its loop until the scheduler closes, restarting the loop
    /// after a panic anywhere in it (the model's weights are read-only, so it stays whole).
    /// The engine counts as live from its start (see [`start`]) until it ends, except while
    /// it restarts.
    fn serve(&self, model: &Model) {
        loop {
            let ended = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve_batches(model)));
            self.live_engines.fetch_sub(1, Ordering::AcqRel);
            match ended {
                Ok(()) => return,
                Err(panic) => {
                    error!(model = %self.model, panic = panic_message(&*panic), "engine loop panicked; restarting it");
                    self.metrics.engine_restarts.inc();
                    self.live_engines.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Runs batches until the scheduler closes.
    fn serve_batches(&self, model: &Model) {
        self.metrics.engines_live.inc();
        let _live = Decrement(&self.metrics.engines_live);
        while let Some(batch) = self.next_batch() {
            if self.inject_panic.swap(false, Ordering::AcqRel) {
                panic!("injected engine panic (test hook)");
            }
            self.run_batch(model, batch);
        }
    }

    /// Blocks until a batch is due (or the scheduler closes: `None`).
    fn next_batch(&self) -> Option<Vec<Pending<Job>>> {
        let mut state = self.lock();
        let mut may_spin = !self.config.idle_spin.is_zero();
        loop {
            let dropped = state.queue.drop_abandoned(|job| job.reply.is_closed());
            if dropped > 0 {
                debug!(model = %self.model, dropped, "requests abandoned by their clients before batching");
            }
            let expired = state.queue.take_expired(Instant::now());
            if !expired.is_empty() {
                self.metrics.deadline_dropped.inc_by(expired.len() as u64);
                debug!(model = %self.model, expired = expired.len(), "requests past their deadline dropped uncomputed");
                for Job { reply, admitted, .. } in expired {
                    drop(admitted); // out of the queue before the client hears of it
                    let _ = reply.send(Err(ScheduleError::DeadlineExceeded(self.model.clone())));
                }
            }
            if !state.open {
                return None;
            }
            let now = Instant::now();
            if let Some(batch) = state.queue.pop_batch(now, false) {
                let more = !state.queue.is_empty();
                drop(state);
                if more {
                    self.wake.notify_one(); // for another free engine
                }
                return Some(batch);
            }
            if may_spin && state.queue.is_empty() {
                may_spin = false;
                let seen = self.events.load(Ordering::Acquire);
                drop(state);
                self.spin_for_work(seen);
                state = self.lock();
                continue;
            }
            state = match state.queue.deadline() {
                Some(due) => {
                    let wait = due.saturating_duration_since(now);
                    self.wake.wait_timeout(state, wait).unwrap_or_else(PoisonError::into_inner).0
                }
                None => self.wake.wait(state).unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Busy-waits until an enqueue or the close (an event after `seen`) or the idle spin runs
    /// out, if no other engine is spinning already. A sleeping engine's vCPU halts on VMs
    /// like ours, and the next forward pays for it (docs/benchmarks.md); one spinning engine
    /// is enough to take the next request.
    fn spin_for_work(&self, seen: u64) {
        if self.spinning.swap(true, Ordering::AcqRel) {
            return;
        }
        let start = Instant::now();
        while self.events.load(Ordering::Acquire) == seen && start.elapsed() < self.config.idle_spin {
            std::hint::spin_loop();
        }
        self.spinning.store(false, Ordering::Release);
    }

    /// Runs one batch on this engine thread and answers its requests.
    fn run_batch(&self, model: &Model, batch: Vec<Pending<Job>>) {
        let started = Instant::now();
        // One snapshot per batch: the policy is whole, and changes apply from the next batch.
        let policy = batch[0].policy.clone().unwrap_or_else(|| (self.live)());
        let items: usize = batch.iter().map(|p| p.items).sum();
        let [c, h, w] = self.config.item_shape;
        let mut values = Vec::with_capacity(items * (c * h * w) as usize);
        let mut waiting = Vec::with_capacity(batch.len());
        for p in batch {
            let queue_time = started.saturating_duration_since(p.enqueued);
            self.metrics.queue_duration.observe(queue_time.as_secs_f64());
            let Job { values: v, reply, span, admitted, queued } = p.payload;
            drop(queued);
            values.extend_from_slice(&v);
            waiting.push(Waiting { items: p.items, reply, span, queue_time, admitted });
        }
        // The batch's span is a child of its first request's span and follows from the
        // others', so each request's trace runs protocol → queue → engine.
        let span = tracing::info_span!(
            parent: &waiting[0].span, "batch", model = %self.model, batch_size = items, policy_version = policy.version
        );
        for w in waiting.iter().skip(1) {
            span.follows_from(&w.span);
        }
        let _batch = span.enter();
        let input = InputBatch { values, shape: vec![items as i64, c, h, w] };
        // A panic in the engine fails this batch, not the thread: the weights are read-only.
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| worker::traced_run(model, &input, &policy)));
        let compute_time = started.elapsed();
        match result {
            Ok(Ok(out)) => {
                self.metrics.compute_duration.observe(compute_time.as_secs_f64());
                self.metrics.record_batch(&out.reports);
                self.record_sample(BatchSample {
                    budget: policy.budget,
                    images: items,
                    compute: compute_time,
                });
                reply_all(waiting, &out, compute_time, items);
            }
            Ok(Err(e)) => {
                warn!(model = %self.model, error = %e, "batch failed");
                fail_all(waiting, &self.model, &e.to_string());
            }
            Err(panic) => {
                let what = panic_message(&*panic);
                error!(model = %self.model, panic = what, "the engine panicked; batch failed");
                fail_all(waiting, &self.model, &format!("the engine panicked: {what}"));
            }
        }
    }
}

impl Shared {
    /// Keeps a batch for the next load reading (dropping the oldest beyond [`BATCH_SAMPLES`]).
    fn record_sample(&self, sample: BatchSample) {
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if batches.len() == BATCH_SAMPLES {
            batches.pop_front();
        }
        batches.push_back(sample);
    }
}

/// What a caught panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}

/// Decrements a gauge when dropped (also while unwinding).
struct Decrement<'a>(&'a IntGauge);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A request of a running batch.
struct Waiting {
    items: usize,
    reply: Reply,
    span: Span,
    queue_time: Duration,
    admitted: Admitted,
}

fn reply_all(waiting: Vec<Waiting>, out: &BatchOutput, compute_time: Duration, batch_size: usize) {
    let mut row = 0;
    for Waiting { items, reply, queue_time, admitted, .. } in waiting {
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
        // Leave the queue before the client sees the answer, so it counts as answered.
        drop(admitted);
        let _ = reply.send(Ok(answer));
    }
}

fn fail_all(waiting: Vec<Waiting>, model: &str, why: &str) {
    for Waiting { reply, admitted, .. } in waiting {
        drop(admitted);
        let _ = reply.send(Err(ScheduleError::Failed { model: model.to_string(), why: why.to_string() }));
    }
}
