//! The scheduler on a real engine thread: batches form from concurrent requests, abandoned
//! requests are never computed, a full queue refuses at once, and stopping the scheduler
//! answers whoever still waits, also while an idle engine spins.

use std::sync::Arc;
use std::time::Duration;

use futures_util::poll;
use sluice::engine::{ArchSpec, GatePolicy, ModelSource};
use sluice::observability::{Metrics, ModelMetrics};
use sluice::scheduling::scheduler::{self, LivePolicy, Scheduler, SchedulerConfig, SchedulerHandle};
use sluice::scheduling::{ScheduleError, WorkerConfig};

fn start(max_batch: usize, delay: Duration, capacity: usize) -> (Scheduler, SchedulerHandle, ModelMetrics) {
    start_spinning(max_batch, delay, capacity, Duration::ZERO)
}

fn start_spinning(
    max_batch: usize,
    delay: Duration,
    capacity: usize,
    idle_spin: Duration,
) -> (Scheduler, SchedulerHandle, ModelMetrics) {
    let source = ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 3);
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
    let metrics = Metrics::new().model("test", &[]);
    let (scheduler, handle) =
        scheduler::start("test", config, &source, &[engine], live, metrics.clone()).unwrap();
    (scheduler, handle, metrics)
}

fn image(seed: usize) -> Vec<f32> {
    (0..784).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 17.0 - 0.5).collect()
}

#[tokio::test]
async fn concurrent_requests_share_a_batch_and_get_their_own_rows() {
    let (_scheduler, handle, metrics) = start(4, Duration::from_secs(30), 16);
    // Each alone, one after the other.
    let alone: Vec<Vec<f32>> = {
        let (_s, h, _) = start(1, Duration::ZERO, 4);
        let mut out = Vec::new();
        for seed in 0..4 {
            out.push(h.infer(image(seed), 1, None).await.unwrap().logits);
        }
        out
    };
    let answers = futures_util::future::join_all((0..4).map(|seed| handle.infer(image(seed), 1, None))).await;
    for (seed, answer) in answers.into_iter().enumerate() {
        let answer = answer.unwrap();
        assert_eq!(answer.batch_size, 4, "the fourth request fills the batch before the 30 s delay");
        let diff = answer.logits.iter().zip(&alone[seed]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "request {seed}: batched logits differ from its own by {diff}");
    }
    assert_eq!(metrics.compute_duration.get_sample_count(), 1);
}

#[tokio::test]
async fn an_abandoned_request_is_never_computed() {
    let (_scheduler, handle, metrics) = start(8, Duration::from_millis(200), 16);
    {
        let abandoned = handle.infer(image(0), 1, None);
        tokio::pin!(abandoned);
        assert!(poll!(&mut abandoned).is_pending(), "queued, waiting for its batch");
        assert_eq!(handle.inflight(), 1);
    } // the client goes away
    let answer = handle.infer(image(1), 1, None).await.unwrap();
    assert_eq!(answer.batch_size, 1, "the abandoned request was not batched");
    assert_eq!(metrics.compute_duration.get_sample_count(), 1, "one batch ran");
    assert_eq!(handle.inflight(), 0);
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_stopping_answers_the_waiting() {
    let (scheduler, handle, _) = start(8, Duration::from_secs(30), 1);
    let waiting = handle.infer(image(0), 1, None);
    tokio::pin!(waiting);
    assert!(poll!(&mut waiting).is_pending());
    match handle.infer(image(1), 1, None).await {
        Err(ScheduleError::QueueFull(model)) => assert_eq!(model, "test"),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    drop(scheduler); // closes the queue and joins the engine thread
    match waiting.await {
        Err(e @ ScheduleError::Stopped(_)) => assert!(e.to_string().contains("shutting down"), "{e}"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert!(matches!(handle.infer(image(2), 1, None).await, Err(ScheduleError::Stopped(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_engine_takes_new_work_and_stops_at_once() {
    // An idle spin far longer than the bounds below: only noticing the enqueue (and the close)
    // ends it in time.
    let (scheduler, handle, metrics) = start_spinning(4, Duration::ZERO, 4, Duration::from_secs(300));
    let bound = Duration::from_secs(30);
    for seed in 0..3 {
        let answer = tokio::time::timeout(bound, handle.infer(image(seed), 1, None)).await;
        assert!(answer.expect("answered while the engine spins").is_ok());
    }
    assert_eq!(metrics.compute_duration.get_sample_count(), 3);
    // Stop on a plain thread: a test that fails here must not wait for the spin to end.
    let (stopped, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(scheduler);
        let _ = stopped.send(());
    });
    done.recv_timeout(bound).expect("the spinning engine stops on close");
    assert!(matches!(handle.infer(image(3), 1, None).await, Err(ScheduleError::Stopped(_))));
}
