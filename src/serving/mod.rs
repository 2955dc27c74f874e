//! The one core both front doors call: the loaded models, each with its scheduler, live
//! policy, metrics and statistics. It turns a decoded request into a response; HTTP and
//! gRPC only translate wire formats.

mod model;
mod outputs;
pub mod stats;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::{info, instrument};

pub use self::model::{LoadOptions, ModelRuntime};
use crate::observability::Metrics;
use crate::protocol::prepare::prepare;
use crate::protocol::{ApiError, InferRequest, InferResponse};
use crate::scheduling::ScheduleError;

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
    pub inputs: Vec<(String, crate::protocol::DataType, Vec<i64>)>,
    pub outputs: Vec<(String, crate::protocol::DataType, Vec<i64>)>,
    pub max_queue_delay_us: u64,
    pub instances: usize,
}

/// Which front door a request came through (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Every loaded model and the server's shared state.
pub struct ServingCore {
    models: BTreeMap<String, Arc<ModelRuntime>>,
    pub metrics: Arc<Metrics>,
    stopping: AtomicBool,
}

impl ServingCore {
    /// Loads every model of the repository at `root` (each on its own engine threads,
    /// warmed up) and starts its scheduler.
    pub async fn load(root: &Path, options: &LoadOptions) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let dirs = crate::repository::scan(root)?;
        if dirs.is_empty() {
            anyhow::bail!(
                "the model repository {} holds no model folders (with config.toml)",
                root.display()
            );
        }
        let mut models = BTreeMap::new();
        for dir in dirs {
            let runtime = ModelRuntime::load(dir, options, &metrics).await?;
            info!(model = %runtime.interface.name, seconds = runtime.load_seconds, "model ready");
            models.insert(runtime.interface.name.clone(), Arc::new(runtime));
        }
        Ok(ServingCore { models, metrics, stopping: AtomicBool::new(false) })
    }

    /// The model `name` (and `version`, if given).
    pub fn model(&self, name: &str, version: Option<&str>) -> Result<&Arc<ModelRuntime>, ApiError> {
        let m = self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            ApiError::NotFound(format!("unknown model `{name}` (this server has: {})", known.join(", ")))
        })?;
        match version {
            Some(v) if !v.is_empty() && v != m.interface.version => Err(ApiError::NotFound(format!(
                "model `{name}` has no version `{v}` (it serves version {})",
                m.interface.version
            ))),
            _ => Ok(m),
        }
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelRuntime>> {
        self.models.values()
    }

    /// Live: the process answers. Ready: every model is loaded and the server is not
    /// shutting down.
    pub fn is_ready(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
    }

    /// Marks the server as shutting down (readiness turns false; requests still finish).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Runs one inference request end to end and records its outcome.
    #[instrument(skip_all, fields(model = %req.model, protocol = ?protocol, batch_size, policy_version, flops_executed))]
    pub async fn infer(&self, req: InferRequest, protocol: Protocol) -> Result<InferResponse, ApiError> {
        let started = Instant::now();
        let model = self.model(&req.model, req.version.as_deref())?;
        let result = self.infer_on(model, req).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        let requests = match protocol {
            Protocol::Http => &model.metrics.http,
            Protocol::Grpc => &model.metrics.grpc,
        };
        requests.finished(outcome, started.elapsed().as_secs_f64());
        result
    }

    async fn infer_on(&self, model: &ModelRuntime, req: InferRequest) -> Result<InferResponse, ApiError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        let started = Instant::now();
        let prepared = prepare(&req, &model.interface)?;
        let input_time = started.elapsed();
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
        let answer = match model.scheduler.infer(prepared.values, prepared.items, policy).await {
            Ok(a) => a,
            Err(e) => {
                model.stats.failure();
                return Err(match e {
                    ScheduleError::QueueFull(_) => ApiError::Busy(e.to_string()),
                    ScheduleError::Stopped(_) => ApiError::Unavailable(e.to_string()),
                    ScheduleError::Failed { .. } => ApiError::Internal(e.to_string()),
                });
            }
        };
        let output_started = Instant::now();
        let response = outputs::response(&req, model, &prepared.outputs, &answer, overridden);
        model.stats.success(prepared.items, &answer, input_time, output_started.elapsed());
        let executed: u64 = answer.reports.iter().map(|r| r.executed_flops).sum();
        let span = tracing::Span::current();
        span.record("flops_executed", executed);
        span.record("batch_size", answer.batch_size);
        span.record("policy_version", answer.policy_version);
        Ok(response)
    }
}
