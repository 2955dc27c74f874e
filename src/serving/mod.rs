//! The one core both front doors call: the request model (requests, responses, errors, the
//! checks that turn a request into engine input), the loaded models, each with its
//! scheduler, live policy, metrics and statistics. It turns a decoded request into a
//! response and knows no wire format; HTTP and gRPC only translate.

pub mod adaptive;
pub mod error;
pub mod image;
pub mod limits;
pub mod policy_watch;
mod pool;
pub use pool::raise_priority;
mod model;
mod outputs;
pub mod prepare;
pub mod request;
pub mod stats;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tracing::{info, instrument};

pub use self::error::ApiError;
use self::limits::{Budget, ModelLimits, Reservation, ServerLimits};
pub use self::model::{AbortOnDrop, FollowedFile, LoadOptions, ModelRuntime};
use self::prepare::prepare;
pub use self::request::{
    DataType, InferInput, InferOutput, InferRequest, InferResponse, InputData, OutputData, ParamValue,
    Parameters, RequestedOutput,
};
use crate::observability::{Metrics, NO_MODEL, RequestMetrics};
use crate::repository::ModelDir;
use crate::scheduling::{QueueTicket, ScheduleError};

/// The platform name reported in metadata and configuration.
pub const PLATFORM: &str = "sluice_libtorch";

/// The Triton-style model configuration both front doors render (`…/config`, ModelConfig).
#[derive(Clone, Debug)]
pub struct TritonConfig {
    pub name: String,
    pub platform: &'static str,
    pub backend: &'static str,
    pub max_batch_size: i64,
    /// (name, datatype, per-item dims)
    pub inputs: Vec<(String, DataType, Vec<i64>)>,
    pub outputs: Vec<(String, DataType, Vec<i64>)>,
    pub max_queue_delay_us: u64,
    pub instances: usize,
}

/// Which front door a request came through (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Every served model and the server's shared state. Created empty (not ready) so the
/// listeners can bind first; [`ServingCore::load_models`] fills it.
pub struct ServingCore {
    models: ArcSwap<BTreeMap<String, Arc<ModelRuntime>>>,
    /// Every model of the repository loaded.
    loaded: AtomicBool,
    pub metrics: Arc<Metrics>,
    budget: Budget,
    /// The largest body/message any model accepts (the gRPC message limit).
    max_body_bytes: usize,
    stopping: AtomicBool,
    /// Requests that named no served model, per protocol.
    unmatched: [RequestMetrics; 2],
}

/// A request let in: its model and its share of the server's budget (a request slot, and
/// body bytes as they arrive), held from before its body is read until its answer is built.
/// Its place in the model's queue is taken when its body is complete
/// ([`ServingCore::infer`]), so clients that send slowly hold bytes they sent, not queue
/// places others need.
pub struct Admission {
    pub model: Arc<ModelRuntime>,
    reservation: Option<Reservation>,
    /// When the request arrived (its deadline counts from here).
    pub started: Instant,
}

impl Admission {
    /// Reserves `n` more body bytes before they are buffered (429 when the budget is spent).
    pub fn reserve_bytes(&mut self, n: usize) -> Result<(), ApiError> {
        match &mut self.reservation {
            Some(r) => r.grow(n),
            None => Ok(()),
        }
    }
}

impl ServingCore {
    /// An empty core for the models in `dirs` (their configurations are read, their weights
    /// not yet): it knows every model's limits, serves health (not ready) and refuses
    /// inference with 503 until [`ServingCore::load_models`] is done.
    pub fn new(dirs: &[ModelDir], limits: ServerLimits) -> Self {
        let metrics = Arc::new(Metrics::new());
        let max_body_bytes =
            dirs.iter().map(|d| ModelLimits::from_config(&d.config).max_body_bytes).max().unwrap_or(0);
        ServingCore {
            models: ArcSwap::from_pointee(BTreeMap::new()),
            loaded: AtomicBool::new(false),
            unmatched: [metrics.requests(NO_MODEL, "http"), metrics.requests(NO_MODEL, "grpc")],
            metrics,
            budget: Budget::new(limits),
            max_body_bytes,
            stopping: AtomicBool::new(false),
        }
    }

    /// Reads the repository at `root` and loads every model in it (tests and tools).
    pub async fn load(root: &Path, options: &LoadOptions, limits: ServerLimits) -> anyhow::Result<Self> {
        let dirs = scan_repository(root, None)?;
        let core = ServingCore::new(&dirs, limits);
        core.load_models(dirs, options).await?;
        Ok(core)
    }

    /// Loads each model (on its own engine threads, warmed up) and starts its scheduler; each
    /// model serves as soon as it is loaded, the server is ready when all are.
    pub async fn load_models(&self, dirs: Vec<ModelDir>, options: &LoadOptions) -> anyhow::Result<()> {
        for dir in dirs {
            let runtime = ModelRuntime::load(dir, options, &self.metrics).await?;
            info!(model = %runtime.interface.name, seconds = runtime.load_seconds, "model ready");
            let mut models = (**self.models.load()).clone();
            models.insert(runtime.interface.name.clone(), Arc::new(runtime));
            self.models.store(Arc::new(models));
        }
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// The model `name` (and `version`, if given).
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelRuntime>, ApiError> {
        let models = self.models.load();
        let Some(m) = models.get(name) else {
            if !self.loaded.load(Ordering::Acquire) {
                return Err(ApiError::Unavailable(format!(
                    "model `{name}` is not loaded yet: the server is still loading its models"
                )));
            }
            let known: Vec<&str> = models.keys().map(String::as_str).collect();
            return Err(ApiError::NotFound(format!(
                "unknown model `{name}` (this server has: {})",
                known.join(", ")
            )));
        };
        match version {
            Some(v) if !v.is_empty() && v != m.interface.version => Err(ApiError::NotFound(format!(
                "model `{name}` has no version `{v}` (it serves version {})",
                m.interface.version
            ))),
            _ => Ok(m.clone()),
        }
    }

    /// Every loaded model, by name.
    pub fn models(&self) -> Vec<Arc<ModelRuntime>> {
        self.models.load().values().cloned().collect()
    }

    /// Live: the process answers. Ready: every model is loaded and has a running engine, and
    /// the server is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
            && !self.stopping.load(Ordering::Acquire)
            && self.models.load().values().all(|m| m.is_ready())
    }

    /// Whether `model` can answer now (loaded, an engine running, not shutting down).
    pub fn model_ready(&self, model: &ModelRuntime) -> bool {
        !self.stopping.load(Ordering::Acquire) && model.is_ready()
    }

    /// Marks the server as shutting down (readiness turns false; requests still finish).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The largest request body or message any model accepts.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn limits(&self) -> &ServerLimits {
        self.budget.limits()
    }

    /// Requests admitted server-wide and not yet answered.
    pub fn inflight(&self) -> usize {
        self.budget.inflight()
    }

    /// Lets a request to `name` in before its body is read: checks the declared body length
    /// against the model's limit and takes a request slot of the server's budget; the body's
    /// bytes are reserved as they arrive ([`Admission::reserve_bytes`]). Refuses at once
    /// (404, 413, 429, 503), never waits.
    pub fn admit(
        &self,
        name: &str,
        version: Option<&str>,
        body_bytes: Option<usize>,
    ) -> Result<Admission, ApiError> {
        let started = Instant::now();
        let model = self.model(name, version)?;
        let limit = model.interface.limits.max_body_bytes;
        if let Some(n) = body_bytes
            && n > limit
        {
            return Err(too_large(&model, n));
        }
        let reservation = self.budget.reserve(0)?;
        self.admit_reserved(model, Some(reservation), started)
    }

    /// Reserves `bytes` of the server's budget (and a request slot) for a message whose model
    /// is not known until it is decoded (gRPC); [`ServingCore::admit_reserved`] completes the
    /// admission once it is.
    pub fn reserve(&self, bytes: usize) -> Result<Reservation, ApiError> {
        self.budget.reserve(bytes)
    }

    /// Completes an admission whose bytes are already reserved (here, or by the caller for
    /// as long as the request lives): the model must be ready.
    pub fn admit_reserved(
        &self,
        model: Arc<ModelRuntime>,
        reservation: Option<Reservation>,
        started: Instant,
    ) -> Result<Admission, ApiError> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        if !model.is_ready() {
            return Err(ApiError::Unavailable(format!(
                "model `{}` has no running engine (it is restarting); retry shortly",
                model.interface.name
            )));
        }
        Ok(Admission { model, reservation, started })
    }

    /// Runs CPU-heavy decoding or encoding on the bounded decode pool, off the async runtime.
    pub async fn decode<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.budget.decode(work).await
    }

    /// Whether decoding `bytes` of a request belongs on the decode pool.
    pub fn decode_offloaded(&self, bytes: usize) -> bool {
        bytes >= self.budget.limits().inline_decode_bytes
    }

    /// Starts counting one request: [`RequestRecord::finish`] records its outcome; a record
    /// dropped unfinished (the client went away and its call was dropped) counts as
    /// `cancelled`.
    pub fn begin_request(&self, protocol: Protocol) -> RequestRecord<'_> {
        RequestRecord { core: self, protocol, started: Instant::now(), model: None, done: false }
    }

    /// Counts one finished request of `protocol` (every request, whatever happened to it).
    pub fn record(&self, protocol: Protocol, model: Option<&ModelRuntime>, outcome: &str, started: Instant) {
        let seconds = started.elapsed().as_secs_f64();
        let handles = match (model, protocol) {
            (Some(m), Protocol::Http) => &m.metrics.http,
            (Some(m), Protocol::Grpc) => &m.metrics.grpc,
            (None, Protocol::Http) => &self.unmatched[0],
            (None, Protocol::Grpc) => &self.unmatched[1],
        };
        handles.finished(outcome, seconds);
        if let Some(m) = model
            && outcome != "success"
        {
            m.stats.failure();
        }
    }

    /// Runs one admitted request whose body is complete: takes its place in the model's queue
    /// (429 when full), checks and decodes its input (images on the decode pool), queues it
    /// under its deadline, and builds its response.
    #[instrument(skip_all, fields(model = %admission.model.interface.name, batch_size, policy_version, flops_executed))]
    pub async fn infer(
        &self,
        admission: Admission,
        mut req: InferRequest,
    ) -> Result<InferResponse, ApiError> {
        let Admission { model, reservation: _reservation, started } = admission;
        if self.stopping.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        // The body is complete: take a place in the model's queue before decoding it.
        let ticket: QueueTicket = model.scheduler.admit().map_err(|e| {
            match (schedule_error(e), model.adaptive.shedding_reason()) {
                (ApiError::Busy(why), Some(reason)) => ApiError::Busy(format!("{why} ({reason})")),
                (other, _) => other,
            }
        })?;
        let input_started = Instant::now();
        let prepared = if model.interface.input_datatype == DataType::Bytes {
            let m = model.clone();
            let (back, prepared) = self
                .decode(move || {
                    let prepared = prepare(&mut req, &m.interface);
                    (req, prepared)
                })
                .await?;
            req = back;
            prepared?
        } else {
            prepare(&mut req, &model.interface)?
        };
        let input_time = input_started.elapsed();
        let deadline = limits::earliest(started, [req.timeout, prepared.timeout, model.default_timeout]);
        let overridden = !prepared.policy.is_empty();
        let policy = if overridden {
            Some(
                model
                    .policy
                    .for_request(&prepared.policy)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            )
        } else {
            None // the live policy, snapshotted when the batch starts
        };
        let asked = model.scheduler.infer(ticket, prepared.values, prepared.items, policy, deadline);
        let answered = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), asked)
                .await
                .unwrap_or_else(|_| Err(ScheduleError::DeadlineExceeded(model.interface.name.clone()))),
            None => asked.await,
        };
        let answer = answered.map_err(|e| {
            let waited = started.elapsed();
            match e {
                ScheduleError::DeadlineExceeded(_) => ApiError::DeadlineExceeded(format!(
                    "model `{}`: the request's deadline passed after {} ms (set by the `timeout` \
                     parameter, the gRPC deadline or the model's limits.default_timeout_ms)",
                    model.interface.name,
                    waited.as_millis()
                )),
                other => schedule_error(other),
            }
        })?;
        let output_started = Instant::now();
        let response = outputs::response(&req, &model, &prepared.outputs, &answer, overridden);
        model.stats.success(prepared.items, &answer, input_time, output_started.elapsed());
        model.adaptive.record(started.elapsed());
        let executed: u64 = answer.reports.iter().map(|r| r.executed_flops).sum();
        let span = tracing::Span::current();
        span.record("flops_executed", executed);
        span.record("batch_size", answer.batch_size);
        span.record("policy_version", answer.policy_version);
        Ok(response)
    }
}

/// One request being counted (see [`ServingCore::begin_request`]).
pub struct RequestRecord<'a> {
    core: &'a ServingCore,
    protocol: Protocol,
    pub started: Instant,
    /// The model the request named, once it is known to be served.
    pub model: Option<Arc<ModelRuntime>>,
    done: bool,
}

impl RequestRecord<'_> {
    /// Records the outcome of `result`.
    pub fn finish<T>(mut self, result: &Result<T, ApiError>) {
        let outcome = match result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        self.core.record(self.protocol, self.model.as_deref(), outcome, self.started);
        self.done = true;
    }
}

impl Drop for RequestRecord<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.core.record(self.protocol, self.model.as_deref(), "cancelled", self.started);
        }
    }
}

/// Every model folder of the repository at `root`, read and checked (no weights loaded);
/// with `name`, the repository's one model served under that name (`--model-name`).
pub fn scan_repository(root: &Path, name: Option<&str>) -> anyhow::Result<Vec<ModelDir>> {
    let mut dirs = crate::repository::scan(root)?;
    if dirs.is_empty() {
        anyhow::bail!("the model repository {} holds no model folders (with config.toml)", root.display());
    }
    if let Some(name) = name {
        crate::repository::rename_single(&mut dirs, name)?;
    }
    Ok(dirs)
}

fn too_large(model: &ModelRuntime, bytes: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "a request of {bytes} bytes exceeds model `{}`'s limit of {} bytes (max_batch_size {} × the \
         item's size; limits.max_body_bytes in its config.toml)",
        model.interface.name, model.interface.limits.max_body_bytes, model.interface.max_batch_size
    ))
}

/// Refuses a request whose body or message turned out larger than its model allows.
pub fn check_body_size(model: &ModelRuntime, bytes: usize) -> Result<(), ApiError> {
    if bytes > model.interface.limits.max_body_bytes { Err(too_large(model, bytes)) } else { Ok(()) }
}

fn schedule_error(e: ScheduleError) -> ApiError {
    match e {
        ScheduleError::QueueFull(_) => ApiError::Busy(e.to_string()),
        ScheduleError::Stopped(_) => ApiError::Unavailable(e.to_string()),
        ScheduleError::DeadlineExceeded(_) => ApiError::DeadlineExceeded(e.to_string()),
        ScheduleError::Failed { .. } | ScheduleError::EngineLost(_) => ApiError::Internal(e.to_string()),
    }
}

/// How long requests to a model may take by default (`limits.default_timeout_ms`; 0: none).
fn default_timeout(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}
