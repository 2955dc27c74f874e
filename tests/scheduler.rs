//! The scheduler on a real engine thread: batches form from concurrent requests, abandoned
//! requests are never computed, a full queue refuses at once, and stopping the scheduler
//! answers whoever still waits, also while an idle engine spins.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures_util::poll;
use sluice::engine::{ArchSpec, GatePolicy, ModelSource};
use sluice::observability::{Metrics, ModelMetrics};
use sluice::scheduling::scheduler::{self, LivePolicy, Scheduler, SchedulerConfig, SchedulerHandle};
use sluice::scheduling::{EngineAnswer, ScheduleError, WorkerConfig, WorkerError};

fn start(max_batch: usize, delay: Duration, capacity: usize) -> (Scheduler, SchedulerHandle, Recorded) {
    start_spinning(max_batch, delay, capacity, Duration::ZERO)
}

fn start_on(source: ModelSource, max_batch: usize) -> (Scheduler, SchedulerHandle, Recorded) {
    start_with(source, max_batch, Duration::ZERO, 16, Duration::ZERO)
}

fn start_spinning(
    max_batch: usize,
    delay: Duration,
    capacity: usize,
    idle_spin: Duration,
) -> (Scheduler, SchedulerHandle, Recorded) {
    start_with(
        ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 3),
        max_batch,
        delay,
        capacity,
        idle_spin,
    )
}

fn start_with(
    source: ModelSource,
    max_batch: usize,
    delay: Duration,
    capacity: usize,
    idle_spin: Duration,
) -> (Scheduler, SchedulerHandle, Recorded) {
    let config = SchedulerConfig {
        max_batch_size: max_batch,
        max_queue_delay: delay,
        queue_capacity: capacity,
        item_shape: [1, 28, 28],
        idle_spin,
    };
    let engine = WorkerConfig { name: "test-engine".into(), intra_op_threads: 1, warmup_batch: 0 };
    let dense = Arc::new(GatePolicy::dense());
    let live: LivePolicy = Arc::new(move || dense.clone());
    let registry = Metrics::new();
    let model = registry.model("test", &[], "fp32");
    let (scheduler, handle) =
        scheduler::start("test", config, &source, &[engine], live, model.clone()).unwrap();
    (scheduler, handle, Recorded { registry, model })
}

/// The model's metric handles and the registry they are exposed through.
struct Recorded {
    registry: Metrics,
    model: ModelMetrics,
}

impl Recorded {
    /// Batches computed, as a scrape reports them.
    fn batches(&self) -> u64 {
        let text = self.registry.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("sluice_compute_duration_seconds_count{model=\"test\"} "))
            .unwrap_or_else(|| panic!("no compute duration count in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }
}

impl std::ops::Deref for Recorded {
    type Target = ModelMetrics;
    fn deref(&self) -> &ModelMetrics {
        &self.model
    }
}

/// Admits and queues one request of `items` rows (the live policy, no deadline).
async fn ask(
    handle: &SchedulerHandle,
    values: Vec<f32>,
    items: usize,
) -> Result<EngineAnswer, ScheduleError> {
    let ticket = handle.admit()?;
    handle.infer(ticket, values, items, None, None).await
}

fn image(seed: usize) -> Vec<f32> {
    (0..784).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 17.0 - 0.5).collect()
}

#[tokio::test]
async fn concurrent_requests_share_a_batch_and_get_their_own_rows() {
    // Trained weights from a file: random ones would depend on the global RNG, which tests
    // running in parallel share.
    let source = || ModelSource {
        weights: Some(common::fixture("resnet20_weights.safetensors")),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    };
    let (_scheduler, handle, metrics) = start_with(source(), 4, Duration::from_secs(30), 16, Duration::ZERO);
    // Each alone, one after the other.
    let alone: Vec<Vec<f32>> = {
        let (_s, h, _) = start_with(source(), 1, Duration::ZERO, 4, Duration::ZERO);
        let mut out = Vec::new();
        for seed in 0..4 {
            out.push(ask(&h, image(seed), 1).await.unwrap().logits);
        }
        out
    };
    let answers = futures_util::future::join_all((0..4).map(|seed| ask(&handle, image(seed), 1))).await;
    for (seed, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        assert_eq!(answer.batch_size, 4, "the fourth request fills the batch before the 30 s delay");
        let diff = answer.logits.iter().zip(&alone[seed]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "request {seed}: batched logits differ from its own by {diff}");
    }
    assert_eq!(metrics.batches(), 1);
}

#[tokio::test]
async fn an_abandoned_request_is_never_computed() {
    let (_scheduler, handle, metrics) = start(8, Duration::from_millis(200), 16);
    {
        let abandoned = ask(&handle, image(0), 1);
        tokio::pin!(abandoned);
        assert!(poll!(&mut abandoned).is_pending(), "queued, waiting for its batch");
        assert_eq!(handle.inflight(), 1);
    } // the client goes away
    let answer = ask(&handle, image(1), 1).await.unwrap();
    assert_eq!(answer.batch_size, 1, "the abandoned request was not batched");
    assert_eq!(metrics.batches(), 1, "one batch ran");
    assert_eq!(handle.inflight(), 0);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_stopping_answers_the_waiting() {
    let (scheduler, handle, _) = start(8, Duration::from_secs(30), 1);
    let waiting = ask(&handle, image(0), 1);
    tokio::pin!(waiting);
    assert!(poll!(&mut waiting).is_pending());
    match ask(&handle, image(1), 1).await {
        Err(ScheduleError::QueueFull(model)) => assert_eq!(model, "test"),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    drop(scheduler); // closes the queue and joins the engine thread
    match waiting.await {
        Err(e @ ScheduleError::Stopped(_)) => assert!(e.to_string().contains("shutting down"), "{e}"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert!(matches!(ask(&handle, image(2), 1).await, Err(ScheduleError::Stopped(_))));
    assert_eq!(handle.live_engines(), 0, "a stopped model has no live engine (not ready)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_engine_takes_new_work_and_stops_at_once() {
    // An idle spin far longer than the bounds below: only noticing the enqueue (and the close)
    // ends it in time.
    let (scheduler, handle, metrics) = start_spinning(4, Duration::ZERO, 4, Duration::from_secs(300));
    let bound = Duration::from_secs(30);
    for seed in 0..3 {
        let answer = tokio::time::timeout(bound, ask(&handle, image(seed), 1)).await;
        assert!(answer.expect("answered while the engine spins").is_ok());
    }
    assert_eq!(metrics.batches(), 3);
    // Stop on a plain thread: a test that fails here must not wait for the spin to end.
    let (stopped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(scheduler);
        let _ = stopped.send(());
    });
    done.recv_timeout(bound).expect("the spinning engine stops on close");
    assert!(matches!(ask(&handle, image(3), 1).await, Err(ScheduleError::Stopped(_))));
}

#[tokio::test]
async fn a_request_past_its_deadline_leaves_the_queue_uncomputed() {
    // The batch waits up to 200 ms for company; the request's deadline is 20 ms.
    let (_scheduler, handle, metrics) = start(8, Duration::from_millis(200), 16);
    let ticket = handle.admit().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(20);
    match handle.infer(ticket, image(0), 1, None, Some(deadline)).await {
        Err(e @ ScheduleError::DeadlineExceeded(_)) => assert!(e.to_string().contains("deadline"), "{e}"),
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert_eq!(metrics.batches(), 0, "nothing was computed");
    assert_eq!(metrics.deadline_dropped.get(), 1);
    assert_eq!(handle.inflight(), 0);
}

#[tokio::test]
async fn an_engine_that_panics_outside_a_batch_is_restarted() {
    let (_scheduler, handle, metrics) = start(1, Duration::ZERO, 4);
    assert_eq!(handle.live_engines(), 1);
    handle.inject_engine_panic();
    match ask(&handle, image(0), 1).await {
        Err(e @ ScheduleError::EngineLost(_)) => assert!(e.to_string().contains("restarted"), "{e}"),
        other => panic!("expected EngineLost, got {other:?}"),
    }
    let answer = ask(&handle, image(1), 1).await.expect("the restarted engine answers");
    assert_eq!(answer.logits.len(), 10);
    assert_eq!(metrics.engine_restarts.get(), 1);
    assert_eq!(handle.live_engines(), 1, "the engine runs its loop again");
    assert_eq!(metrics.engines_live.get(), 1);
}

#[tokio::test]
async fn the_engine_computes_pytorchs_logits_and_survives_bad_batches() {
    let source = ModelSource {
        weights: Some(common::fixture("resnet20_weights.safetensors")),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    };
    let (_scheduler, handle, _) = start_on(source, 8);
    let input = common::fixture_tensor("resnet20_io.safetensors", "input");
    let expected =
        Vec::<f32>::try_from(common::fixture_tensor("resnet20_io.safetensors", "logits").view(-1)).unwrap();
    let values = Vec::<f32>::try_from(input.contiguous().view(-1)).unwrap();
    let out = ask(&handle, values, 8).await.unwrap();
    assert_eq!((out.reports.len(), out.classes), (8, 10));
    let diff = out.logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff <= 1e-4, "max abs diff {diff}");
    // A batch the engine refuses fails alone; the thread keeps serving.
    match ask(&handle, vec![0.0; 10], 1).await {
        Err(ScheduleError::Failed { why, .. }) => {
            assert!(why.contains("10 values for 784 elements"), "{why}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(ask(&handle, image(0), 1).await.unwrap().logits.len(), 10);
}

#[test]
fn a_model_that_cannot_load_fails_the_start() {
    let source = ModelSource {
        weights: Some(common::fixture("does-not-exist.safetensors")),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    };
    let config = SchedulerConfig {
        max_batch_size: 1,
        max_queue_delay: Duration::ZERO,
        queue_capacity: 1,
        item_shape: [1, 28, 28],
        idle_spin: Duration::ZERO,
    };
    let engine = WorkerConfig { name: "test-engine".into(), intra_op_threads: 1, warmup_batch: 0 };
    let dense = Arc::new(GatePolicy::dense());
    let live: LivePolicy = Arc::new(move || dense.clone());
    let metrics = Metrics::new().model("test", &[], "fp32");
    match scheduler::start("test", config, &source, &[engine], live, metrics) {
        Err(WorkerError::Engine(e)) => assert!(e.to_string().contains("does-not-exist"), "{e}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("start should fail"),
    }
}
