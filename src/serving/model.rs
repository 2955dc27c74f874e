//! One served model: its folder, interface, engine instances behind a scheduler, live
//! policy, metrics and statistics.

use std::time::Instant;

use anyhow::Context;

use super::adaptive::{Adaptive, ControllerView};
use super::stats::InferStats;
use crate::control::controller::{ControllerChange, ControllerError};
use std::sync::Arc;

use crate::control::calibration::CalibrationTable;
use crate::control::policy_file::{self, PolicyFile};
use crate::control::{ChangeError, ChangeKind, FollowedVersion, PolicyChange, PolicyStore};
use crate::engine::gates::GateLayout;
use crate::engine::{GatePolicy, Layout, PolicySource, Precision};

/// Where a model's live policy is persisted across restarts.
pub const POLICY_FILE: &str = "policy.json";
use crate::observability::{BlockGates, Metrics, ModelMetrics};
use crate::repository::ModelDir;
use crate::scheduling::WorkerConfig;
use crate::scheduling::scheduler::{self, Scheduler, SchedulerConfig, SchedulerHandle};
use crate::serving::prepare::ModelInterface;

/// How models are loaded (from the command line).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// libtorch intra-op threads per engine instance.
    pub intra_op_threads: usize,
    /// Overrides every model's `batching.instances`.
    pub instances: Option<usize>,
    /// The least compute budget a request may ask for (overrides each config's
    /// `requests.min_budget`).
    pub min_request_budget: Option<f64>,
    pub layout: Layout,
    /// Overrides every model's `precision`.
    pub precision: Option<Precision>,
    /// Keep policy changes in `policy.json` beside the model and start from it (not while
    /// following a policy file).
    pub persist_policy: bool,
    /// The fleet's policy file, read at start: every model's operator policy follows it.
    pub policy_file: Option<Arc<FollowedFile>>,
}

/// A policy file the server follows (`--policy-file`) and its contents at start.
#[derive(Clone, Debug)]
pub struct FollowedFile {
    /// Where it is (read again every poll interval).
    pub path: std::path::PathBuf,
    /// What it said at start.
    pub file: PolicyFile,
    /// The bytes `file` was parsed from (the watcher applies only changes to them).
    pub bytes: Vec<u8>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            intra_op_threads: 1,
            instances: None,
            min_request_budget: None,
            layout: Layout::default(),
            precision: None,
            persist_policy: true,
            policy_file: None,
        }
    }
}

/// Runs the model's controller every `tick` until aborted.
fn spawn_ticker(
    tick: std::time::Duration,
    adaptive: Arc<Adaptive>,
    policy: Arc<PolicyStore>,
    scheduler: SchedulerHandle,
    metrics: ModelMetrics,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        let mut last = Instant::now();
        loop {
            interval.tick().await;
            let now = Instant::now();
            let load = scheduler.take_load();
            if let Some(new) = adaptive.tick(&policy, load, now - last) {
                metrics.set_policy(&new);
            }
            last = now;
        }
    })
    .abort_handle()
}

/// A loaded, serving model.
pub struct ModelRuntime {
    pub dir: ModelDir,
    pub interface: ModelInterface,
    pub scheduler: SchedulerHandle,
    pub policy: Arc<PolicyStore>,
    pub metrics: ModelMetrics,
    pub stats: InferStats,
    pub load_seconds: f64,
    pub instances: usize,
    /// Deadline of requests that set none (`limits.default_timeout_ms`).
    pub default_timeout: Option<std::time::Duration>,
    /// The latency objective and the adaptive budget controller.
    pub adaptive: Arc<Adaptive>,
    /// The controller's tick task (calibrated models only); stopped with the runtime.
    _ticker: Option<AbortOnDrop>,
    /// The engine threads; dropping the runtime stops them.
    _engines: Scheduler,
}

/// Aborts a task when dropped (a task that lives as long as its owner).
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl ModelRuntime {
    /// Starts the model's engine threads (each builds and warms up its model) behind its
    /// scheduler.
    pub async fn load(dir: ModelDir, options: &LoadOptions, metrics: &Metrics) -> anyhow::Result<Self> {
        let started = Instant::now();
        let config = &dir.config;
        let name = config.name.clone();
        let layout = GateLayout::new(&dir.spec, &config.gates).with_context(|| format!("model `{name}`"))?;
        let gate_ids = layout.gate_ids(&dir.spec);
        let calibration = match dir.calibration_path() {
            Some(path) => Some(
                CalibrationTable::load(&path)
                    .with_context(|| format!("model `{name}`: {}", path.display()))?,
            ),
            None => None,
        };
        let persisted = dir.dir.join(POLICY_FILE);
        let followed = options.policy_file.as_deref();
        let persist = options.persist_policy && followed.is_none();
        let initial = if let Some(f) = followed {
            // The file decides from the first request: its entry, or the config's policy.
            let policy = match f.file.models.get(&name) {
                Some(entry) => entry
                    .apply(&GatePolicy::dense(), ChangeKind::Replace)
                    .map_err(|e| anyhow::anyhow!("policy file {}: models.{name}: {e}", f.path.display()))?,
                None => config.policy.clone(),
            };
            GatePolicy { version: f.file.version, source: PolicySource::File, ..policy }
        } else if persist && persisted.is_file() {
            let text = std::fs::read_to_string(&persisted)?;
            let p: GatePolicy =
                serde_json::from_str(&text).with_context(|| format!("{}", persisted.display()))?;
            tracing::info!(model = %name, version = p.version, "starting from the persisted policy");
            GatePolicy { source: PolicySource::Persisted, ..p }
        } else {
            GatePolicy { source: PolicySource::Config, ..config.policy.clone() }
        };
        let mut bounds = config.requests.clone();
        if let Some(floor) = options.min_request_budget {
            bounds.min_budget = Some(floor);
            bounds.max_budget = bounds.max_budget.max(floor);
        }
        let mut policy =
            PolicyStore::new(initial, calibration, gate_ids, bounds).map_err(|e| match followed {
                Some(f) => anyhow::anyhow!("policy file {}: models.{name}: {e}", f.path.display()),
                None => anyhow::anyhow!("model `{name}`: policy: {e}"),
            })?;
        if persist {
            policy = policy.persist_to(persisted);
        }
        if let Some(f) = followed {
            policy = policy.follow_file(FollowedVersion {
                path: f.path.display().to_string(),
                version: f.file.version,
                sha256: policy_file::digest(&f.bytes),
            });
        }
        let instances = options.instances.unwrap_or(config.batching.instances).max(1);
        let mut source = dir.source(options.layout);
        if let Some(precision) = options.precision {
            source.format.precision = precision;
        }
        source.format.check().map_err(|e| anyhow::anyhow!("model `{name}`: {e}"))?;
        let threads = config.batching.threads.unwrap_or(options.intra_op_threads).max(1);
        let blocks: Vec<BlockGates> = dir
            .spec
            .block_specs()
            .iter()
            .zip(&layout.blocks)
            .map(|(b, slots)| BlockGates {
                prefix: b.prefix.clone(),
                block_gate: slots.block.is_some(),
                channel_gate: slots.channel.is_some(),
                inner_width: b.inner_width(),
            })
            .collect();
        let model_metrics = metrics.model(&name, &blocks, &source.format.precision.to_string());
        model_metrics.set_policy(&policy.snapshot());
        let scheduler_config = SchedulerConfig {
            max_batch_size: config.max_batch_size,
            max_queue_delay: std::time::Duration::from_micros(config.batching.max_queue_delay_us),
            queue_capacity: config.batching.queue_capacity,
            item_shape: config.input.dims,
            idle_spin: std::time::Duration::from_micros(config.batching.idle_spin_us),
        };
        let adaptive = Adaptive::new(
            config.controller.clone(),
            policy.calibration(),
            instances,
            model_metrics.controller.clone(),
        )
        .map_err(|e| anyhow::anyhow!("model `{name}`: {e}"))?;
        let adaptive = Arc::new(adaptive);
        let policy = Arc::new(policy);
        let live: scheduler::LivePolicy = {
            let policy = policy.clone();
            Arc::new(move || policy.snapshot())
        };
        let engines: Vec<WorkerConfig> = (0..instances)
            .map(|i| WorkerConfig {
                name: format!("engine-{name}-{i}"),
                intra_op_threads: threads,
                warmup_batch: config.max_batch_size,
            })
            .collect();
        let metrics_for_engines = model_metrics.clone();
        let (engines, scheduler) = tokio::task::spawn_blocking(move || {
            // Building and warming up blocks until every engine thread is ready.
            scheduler::start(&name, scheduler_config, &source, &engines, live, metrics_for_engines)
                .map_err(|e| anyhow::anyhow!("model `{name}`: {e}"))
        })
        .await??;
        let load_seconds = started.elapsed().as_secs_f64();
        let default_timeout = super::default_timeout(config.limits.default_timeout_ms);
        model_metrics.load_seconds.set(load_seconds);
        let ticker = policy.calibration().is_some().then(|| {
            let tick = std::time::Duration::from_millis(config.controller.tick_ms);
            AbortOnDrop(spawn_ticker(
                tick,
                adaptive.clone(),
                policy.clone(),
                scheduler.clone(),
                model_metrics.clone(),
            ))
        });
        Ok(ModelRuntime {
            interface: ModelInterface::from_config(config),
            dir,
            scheduler,
            policy,
            metrics: model_metrics,
            stats: InferStats::default(),
            load_seconds,
            instances,
            default_timeout,
            adaptive,
            _ticker: ticker,
            _engines: engines,
        })
    }

    /// Whether an engine runs its loop (false while every engine restarts after a panic).
    pub fn is_ready(&self) -> bool {
        self.scheduler.live_engines() > 0
    }

    /// The Triton-style configuration clients such as perf_analyzer read.
    pub fn triton_config(&self) -> super::TritonConfig {
        let m = &self.interface;
        super::TritonConfig {
            name: m.name.clone(),
            platform: super::PLATFORM,
            backend: "sluice",
            max_batch_size: m.max_batch_size as i64,
            inputs: vec![(m.input_name.clone(), m.input_datatype, m.item_shape())],
            outputs: m.outputs(),
            max_queue_delay_us: self.dir.config.batching.max_queue_delay_us,
            instances: self.instances,
        }
    }

    /// Changes the controller's settings (`replace`: unset fields take their defaults) and
    /// publishes the policy gauges if switching it off gave the operator's budget back.
    pub fn change_controller(
        &self,
        change: &ControllerChange,
        replace: bool,
        who: &str,
    ) -> Result<ControllerView, ControllerError> {
        let (view, released) = self.adaptive.change(change, replace, &self.policy, who)?;
        if let Some(p) = released {
            self.metrics.set_policy(&p);
        }
        Ok(view)
    }

    /// Applies the operator policy `prepared` from the policy file's contents `file` (see
    /// [`PolicyStore::apply_file`]) and publishes its gauges.
    pub fn apply_file_policy(
        &self,
        prepared: GatePolicy,
        file: FollowedVersion,
        who: &str,
    ) -> Result<Arc<GatePolicy>, crate::control::PolicyError> {
        let new = self.policy.apply_file(prepared, file, who)?;
        self.metrics.set_policy(&new);
        Ok(new)
    }

    /// Changes the live policy (see [`PolicyStore::change`]) and publishes its gauges.
    pub fn change_policy(
        &self,
        change: &PolicyChange,
        kind: ChangeKind,
        who: &str,
    ) -> Result<Arc<GatePolicy>, ChangeError> {
        let new = self.policy.change(change, kind, who)?;
        self.metrics.set_policy(&new);
        Ok(new)
    }
}

impl std::fmt::Debug for ModelRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRuntime").field("name", &self.interface.name).finish_non_exhaustive()
    }
}
