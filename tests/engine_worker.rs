//! The engine thread: owns the model, answers over oneshot, reports build errors.

mod common;

use common::{fixture, fixture_tensor};
use std::sync::Arc;

use sluice::engine::{ArchSpec, GatePolicy, ModelSource};
use sluice::scheduling::{EngineWorker, InputBatch, WorkerConfig, WorkerError};

fn dense() -> Arc<GatePolicy> {
    Arc::new(GatePolicy::dense())
}

fn config() -> WorkerConfig {
    WorkerConfig { name: "test-engine".into(), intra_op_threads: 1, warmup_batch: 2 }
}

#[test]
fn engine_thread_returns_pytorchs_logits() {
    let source = ModelSource {
        weights: Some(fixture("resnet20_weights.safetensors")),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    };
    let worker = EngineWorker::spawn(source, config(), 4).unwrap();
    let input = fixture_tensor("resnet20_io.safetensors", "input");
    let expected =
        Vec::<f32>::try_from(fixture_tensor("resnet20_io.safetensors", "logits").view(-1)).unwrap();
    let values = Vec::<f32>::try_from(input.contiguous().view(-1)).unwrap();
    let out = worker.run_blocking(InputBatch { values, shape: input.size() }, dense()).unwrap();
    assert_eq!((out.batch, out.classes), (8, 10));
    let diff = out.logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

#[test]
fn bad_batches_get_errors_and_the_thread_keeps_serving() {
    let worker =
        EngineWorker::spawn(ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 1), config(), 4)
            .unwrap();
    let err = worker
        .run_blocking(InputBatch { values: vec![0.0; 10], shape: vec![1, 1, 28, 28] }, dense())
        .unwrap_err();
    assert!(err.to_string().contains("10 values for 784 elements"), "{err}");
    let ok = worker
        .run_blocking(InputBatch { values: vec![0.5; 784], shape: vec![1, 1, 28, 28] }, dense())
        .unwrap();
    assert_eq!(ok.logits.len(), 10);
    assert!(ok.logits.iter().all(|v| v.is_finite()));
}

#[test]
fn a_model_that_cannot_load_fails_the_spawn() {
    let source = ModelSource {
        weights: Some(fixture("does-not-exist.safetensors")),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    };
    match EngineWorker::spawn(source, config(), 4) {
        Err(WorkerError::Engine(e)) => assert!(e.to_string().contains("does-not-exist"), "{e}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("spawn should fail"),
    }
}
