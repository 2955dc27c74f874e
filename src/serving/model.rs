//! One served model: its folder, interface, engine instances behind a scheduler, live
//! policy, metrics and statistics.

use std::time::Instant;

use anyhow::Context;

use super::stats::InferStats;
use std::sync::Arc;

use crate::control::calibration::CalibrationTable;
use crate::control::{ChangeKind, PolicyChange, PolicyError, PolicyStore};
use crate::engine::gates::GateLayout;
use crate::engine::{GatePolicy, Layout, ModelSource};

/// Where a model's live policy is persisted across restarts.
pub const POLICY_FILE: &str = "policy.json";
use crate::observability::{BlockGates, Metrics, ModelMetrics};
use crate::protocol::prepare::ModelInterface;
use crate::repository::ModelDir;
use crate::scheduling::scheduler::{self, SchedulerConfig, SchedulerHandle};
use crate::scheduling::{EngineWorker, WorkerConfig};

/// How models are loaded (from the command line).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// libtorch intra-op threads per engine instance.
    pub intra_op_threads: usize,
    /// Overrides every model's `batching.instances`.
    pub instances: Option<usize>,
    /// The least compute budget a request may ask for.
    pub min_request_budget: Option<f64>,
    pub layout: Layout,
    /// Keep policy changes in `policy.json` beside the model and start from it.
    pub persist_policy: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            intra_op_threads: 1,
            instances: None,
            min_request_budget: None,
            layout: Layout::default(),
            persist_policy: true,
        }
    }
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
    _batcher: tokio::task::JoinHandle<()>,
}

impl ModelRuntime {
    /// Builds the model on its engine threads (warm-up included) and starts its scheduler.
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
        let initial = if options.persist_policy && persisted.is_file() {
            let text = std::fs::read_to_string(&persisted)?;
            let p: GatePolicy =
                serde_json::from_str(&text).with_context(|| format!("{}", persisted.display()))?;
            tracing::info!(model = %name, version = p.version, "starting from the persisted policy");
            p
        } else {
            config.policy.clone()
        };
        let mut policy = PolicyStore::new(initial, calibration, gate_ids, options.min_request_budget)
            .map_err(|e| anyhow::anyhow!("model `{name}`: policy: {e}"))?;
        if options.persist_policy {
            policy = policy.persist_to(persisted);
        }
        let instances = options.instances.unwrap_or(config.batching.instances).max(1);
        let source = ModelSource { layout: options.layout, ..dir.source(options.layout) };
        let threads = config.batching.threads.unwrap_or(options.intra_op_threads).max(1);
        let workers = spawn_workers(&name, source, instances, threads, config.max_batch_size).await?;
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
        let model_metrics = metrics.model(&name, &blocks);
        model_metrics.set_policy(&policy.snapshot());
        let scheduler_config = SchedulerConfig {
            max_batch_size: config.max_batch_size,
            max_queue_delay: std::time::Duration::from_micros(config.batching.max_queue_delay_us),
            queue_capacity: config.batching.queue_capacity,
            item_shape: config.input.dims,
        };
        let policy = Arc::new(policy);
        let live: scheduler::LivePolicy = {
            let policy = policy.clone();
            Arc::new(move || policy.snapshot())
        };
        let (scheduler, batcher) =
            scheduler::start(&name, scheduler_config, workers, live, model_metrics.clone());
        let load_seconds = started.elapsed().as_secs_f64();
        model_metrics.load_seconds.set(load_seconds);
        Ok(ModelRuntime {
            interface: ModelInterface::from_config(config),
            dir,
            scheduler,
            policy,
            metrics: model_metrics,
            stats: InferStats::default(),
            load_seconds,
            instances,
            _batcher: batcher,
        })
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

    /// Changes the live policy (see [`PolicyStore::change`]) and publishes its gauges.
    pub fn change_policy(
        &self,
        change: &PolicyChange,
        kind: ChangeKind,
        who: &str,
    ) -> Result<Arc<GatePolicy>, PolicyError> {
        let new = self.policy.change(change, kind, who)?;
        self.metrics.set_policy(&new);
        Ok(new)
    }
}

async fn spawn_workers(
    name: &str,
    source: ModelSource,
    instances: usize,
    threads: usize,
    warmup_batch: usize,
) -> anyhow::Result<Vec<EngineWorker>> {
    let name = name.to_string();
    // Building and warming up blocks until the engine thread is ready; wait off the runtime.
    let workers = tokio::task::spawn_blocking(move || {
        (0..instances)
            .map(|i| {
                let config = WorkerConfig {
                    name: format!("engine-{name}-{i}"),
                    intra_op_threads: threads,
                    queue_capacity: 2,
                    warmup_batch,
                };
                EngineWorker::spawn(source.clone(), config)
                    .map_err(|e| anyhow::anyhow!("model `{name}`: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    Ok(workers)
}

impl std::fmt::Debug for ModelRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRuntime").field("name", &self.interface.name).finish_non_exhaustive()
    }
}
