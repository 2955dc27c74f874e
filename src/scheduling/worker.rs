//! Engine threads: one `std::thread` per model instance owns the model and every tensor
//! (`tch::Tensor` is `Send`, not `Sync`). [`start_engine`] builds and warms the model on a
//! new thread and then runs the loop the scheduler gives it (take due batches from the
//! model's queue, run them, answer).

use std::sync::mpsc;
use std::thread::JoinHandle;

use tch::Tensor;
use tracing::info;

use crate::engine::{ComputeReport, EngineError, GatePolicy, Model, ModelSource};

/// Settings of one engine thread.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Thread name (shows in `top -H`, panics and logs).
    pub name: String,
    /// libtorch intra-op threads for this engine thread.
    pub intra_op_threads: usize,
    /// Batch size of the warm-up pass run before the worker reports ready (0: none).
    pub warmup_batch: usize,
}

/// A batch of inputs as plain data: row-major f32 values and their `[N, C, H, W]` shape.
#[derive(Clone, Debug)]
pub struct InputBatch {
    pub values: Vec<f32>,
    pub shape: Vec<i64>,
}

/// What the engine returns for a batch.
#[derive(Clone, Debug)]
pub struct BatchOutput {
    /// Row-major `[batch, classes]` logits.
    pub logits: Vec<f32>,
    pub batch: usize,
    pub classes: usize,
    /// One per input, in order.
    pub reports: Vec<ComputeReport>,
    /// Version of the policy the batch ran under.
    pub policy_version: u64,
}

/// Why an engine thread did not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the engine thread has stopped")]
    Stopped,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Starts an engine thread named after `config`: it sets its libtorch threads, builds the
/// model, warms it up and then runs `body` with the model until `body` returns. Returns once
/// the model is ready, or with the error that stopped it (the thread has ended then).
pub fn start_engine(
    source: ModelSource,
    config: &WorkerConfig,
    body: impl FnOnce(&Model) + Send + 'static,
) -> Result<JoinHandle<()>, WorkerError> {
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let (name, threads, warmup_batch) =
        (config.name.clone(), config.intra_op_threads.max(1), config.warmup_batch);
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            tch::set_num_threads(threads as i32);
            let _no_grad = tch::no_grad_guard();
            let model = match Model::build(&source).and_then(|m| warm_up(&m, warmup_batch).map(|_| m)) {
                Ok(model) => model,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            body(&model);
        })
        .map_err(|e| EngineError::InvalidConfig(format!("cannot start engine thread {name}: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => {
            info!(worker = %name, threads, "engine ready");
            Ok(thread)
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e.into())
        }
        Err(_) => {
            let _ = thread.join();
            Err(WorkerError::Stopped)
        }
    }
}

/// [`run`] inside an `engine` span that records the executed FLOPs (a child of the current
/// span, the batch's).
pub(crate) fn traced_run(
    model: &Model,
    input: &InputBatch,
    policy: &GatePolicy,
) -> Result<BatchOutput, EngineError> {
    let engine = tracing::info_span!("engine", executed_flops = tracing::field::Empty).entered();
    let result = run(model, input, policy);
    if let Ok(out) = &result {
        let executed: u64 = out.reports.iter().map(|r| r.executed_flops).sum();
        engine.record("executed_flops", executed);
        tracing::debug!(executed_flops = executed, batch = out.batch, "batch computed");
    }
    result
}

/// Runs one batch on `model` (on its engine thread) and copies the answer out.
fn run(model: &Model, input: &InputBatch, policy: &GatePolicy) -> Result<BatchOutput, EngineError> {
    model.check_input_shape(&input.shape)?;
    let expected: i64 = input.shape.iter().product();
    if expected as usize != input.values.len() {
        return Err(EngineError::InputShape {
            got: input.shape.clone(),
            why: format!("{} values for {expected} elements", input.values.len()),
        });
    }
    let x = Tensor::from_slice(&input.values).view(input.shape.as_slice());
    let (logits, reports) = model.forward(&x, policy)?;
    let (batch, classes) = logits.size2()?;
    let logits = Vec::<f32>::try_from(logits.contiguous().view(-1))?;
    Ok(BatchOutput {
        logits,
        batch: batch as usize,
        classes: classes as usize,
        reports,
        policy_version: policy.version,
    })
}

fn warm_up(model: &Model, batch: usize) -> Result<(), EngineError> {
    if batch == 0 {
        return Ok(());
    }
    let hw = model.spec.default_input_hw();
    let x =
        Tensor::zeros([batch as i64, model.spec.in_channels, hw, hw], (tch::Kind::Float, tch::Device::Cpu));
    model.forward(&x, &GatePolicy::dense()).map(|_| ())
}
