//! Every Prometheus metric sluice exports, registered once here with help text
//! (docs/metrics.md). Handlers and the scheduler record through typed handles.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::{BlockDecision, ComputeReport, GatePolicy};

const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0,
    5.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const WIDTH_BUCKETS: [f64; 8] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];

/// The registry and every metric family.
pub struct Metrics {
    pub registry: Registry,
    /// The length of the last scrape's text, to size the next one's buffer.
    last_render_len: AtomicUsize,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    queue_duration: HistogramVec,
    compute_duration: HistogramVec,
    batch_size: HistogramVec,
    inferences: IntCounterVec,
    flops: IntCounterVec,
    flops_dense: IntCounterVec,
    gate_decisions: IntCounterVec,
    channel_width: HistogramVec,
    exits: IntCounterVec,
    policy_version: IntGaugeVec,
    policy_budget: GaugeVec,
    policy_threshold: GaugeVec,
    queue_depth: IntGaugeVec,
    inflight: IntGaugeVec,
    model_load: GaugeVec,
    admin_rejections: IntCounterVec,
    engine_restarts: IntCounterVec,
    engines_live: IntGaugeVec,
    deadline_dropped: IntCounterVec,
    connections: IntGaugeVec,
    connections_refused: IntCounterVec,
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("valid histogram")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter")
}

impl Metrics {
    /// Creates and registers every metric (and the process collector).
    pub fn new() -> Self {
        let m = Metrics {
            registry: Registry::new(),
            last_render_len: AtomicUsize::new(0),
            requests: counter(
                "sluice_requests_total",
                "Inference requests by protocol and outcome, every request counted once (model \"_none\" \
                 when the request named no served model).",
                &["model", "protocol", "outcome"],
            ),
            request_duration: histogram(
                "sluice_request_duration_seconds",
                "Time from a request's first byte handled to its response ready, by outcome.",
                &["model", "protocol", "outcome"],
                &LATENCY_BUCKETS,
            ),
            queue_duration: histogram(
                "sluice_queue_duration_seconds",
                "Time a request waited before its batch started.",
                &["model"],
                &LATENCY_BUCKETS,
            ),
            compute_duration: histogram(
                "sluice_compute_duration_seconds",
                "Engine time per batch.",
                &["model"],
                &LATENCY_BUCKETS,
            ),
            batch_size: histogram(
                "sluice_batch_size",
                "Inputs per executed batch.",
                &["model"],
                &BATCH_BUCKETS,
            ),
            inferences: counter("sluice_inferences_total", "Inputs (batch rows) computed.", &["model"]),
            flops: counter(
                "sluice_flops_total",
                "FLOPs executed (gate heads included) and skipped (dense minus executed, per input), \
                 at the model's number format (precision: fp32 or bf16).",
                &["model", "kind", "precision"],
            ),
            flops_dense: counter(
                "sluice_flops_dense_total",
                "Dense FLOPs of the computed inputs, at the model's number format (precision).",
                &["model", "precision"],
            ),
            gate_decisions: counter(
                "sluice_gate_decisions_total",
                "Block-gate decisions of inputs that reached the block.",
                &["model", "gate", "decision"],
            ),
            channel_width: histogram(
                "sluice_channel_width_fraction",
                "Kept inner width over full inner width, per input that ran the block.",
                &["model", "gate"],
                &WIDTH_BUCKETS,
            ),
            exits: counter(
                "sluice_exits_total",
                "Where inputs left the network (none: the final classifier).",
                &["model", "exit"],
            ),
            policy_version: IntGaugeVec::new(
                Opts::new("sluice_policy_version", "Version of the live gating policy."),
                &["model"],
            )
            .expect("gauge"),
            policy_budget: GaugeVec::new(
                Opts::new(
                    "sluice_policy_budget",
                    "Live compute budget (fraction of dense FLOPs); -1 for raw thresholds.",
                ),
                &["model"],
            )
            .expect("gauge"),
            policy_threshold: GaugeVec::new(
                Opts::new("sluice_policy_threshold", "Live default gate thresholds."),
                &["model", "kind"],
            )
            .expect("gauge"),
            queue_depth: IntGaugeVec::new(
                Opts::new("sluice_queue_depth", "Requests waiting for a batch."),
                &["model"],
            )
            .expect("gauge"),
            inflight: IntGaugeVec::new(
                Opts::new("sluice_inflight_requests", "Requests admitted and not yet answered."),
                &["model"],
            )
            .expect("gauge"),
            model_load: GaugeVec::new(
                Opts::new("sluice_model_load_seconds", "Time to load and warm up the model."),
                &["model"],
            )
            .expect("gauge"),
            admin_rejections: counter(
                "sluice_admin_rejections_total",
                "Refused calls to the control API.",
                &["reason"],
            ),
            engine_restarts: counter(
                "sluice_engine_restarts_total",
                "Engine loops restarted after a panic outside a batch's own guard.",
                &["model"],
            ),
            engines_live: IntGaugeVec::new(
                Opts::new(
                    "sluice_engines_live",
                    "Engine threads running their loop (0: the model is not ready).",
                ),
                &["model"],
            )
            .expect("gauge"),
            deadline_dropped: counter(
                "sluice_deadline_dropped_total",
                "Requests dropped from the queue uncomputed because their deadline had passed.",
                &["model"],
            ),
            connections: IntGaugeVec::new(
                Opts::new("sluice_open_connections", "Open client connections per listener."),
                &["listener"],
            )
            .expect("gauge"),
            connections_refused: counter(
                "sluice_connections_refused_total",
                "Connections closed at once because the listener had its maximum open.",
                &["listener"],
            ),
        };
        let r = &m.registry;
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.queue_duration.clone()),
            Box::new(m.compute_duration.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.inferences.clone()),
            Box::new(m.flops.clone()),
            Box::new(m.flops_dense.clone()),
            Box::new(m.gate_decisions.clone()),
            Box::new(m.channel_width.clone()),
            Box::new(m.exits.clone()),
            Box::new(m.policy_version.clone()),
            Box::new(m.policy_budget.clone()),
            Box::new(m.policy_threshold.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.inflight.clone()),
            Box::new(m.model_load.clone()),
            Box::new(m.admin_rejections.clone()),
            Box::new(m.engine_restarts.clone()),
            Box::new(m.engines_live.clone()),
            Box::new(m.deadline_dropped.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.connections_refused.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            r.register(c).expect("each metric registered once");
        }
        m
    }

    /// Handles for one model, with its label values resolved once.
    /// `precision` labels the FLOP counters (`fp32`, `bf16`): a FLOP is a FLOP in either,
    /// but what it costs differs.
    pub fn model(&self, model: &str, blocks: &[BlockGates], precision: &str) -> ModelMetrics {
        let gate = |id: &str, decision: &str| self.gate_decisions.with_label_values(&[model, id, decision]);
        ModelMetrics {
            model: model.to_string(),
            http: RequestMetrics::new(self, model, "http"),
            grpc: RequestMetrics::new(self, model, "grpc"),
            queue_duration: self.queue_duration.with_label_values(&[model]),
            compute_duration: self.compute_duration.with_label_values(&[model]),
            batch_size: self.batch_size.with_label_values(&[model]),
            inferences: self.inferences.with_label_values(&[model]),
            flops_executed: self.flops.with_label_values(&[model, "executed", precision]),
            flops_skipped: self.flops.with_label_values(&[model, "skipped", precision]),
            flops_dense: self.flops_dense.with_label_values(&[model, precision]),
            blocks: blocks
                .iter()
                .map(|b| BlockHandles {
                    gate: b.block_gate.then(|| {
                        let id = format!("{}.block", b.prefix);
                        (gate(&id, "run"), gate(&id, "skip"))
                    }),
                    width: b.channel_gate.then(|| {
                        self.channel_width.with_label_values(&[model, &format!("{}.channel", b.prefix)])
                    }),
                    inner_width: b.inner_width,
                })
                .collect(),
            exits: self.exits.clone(),
            policy_version: self.policy_version.with_label_values(&[model]),
            policy_budget: self.policy_budget.with_label_values(&[model]),
            thresholds: ["channel", "block", "exit"]
                .map(|k| self.policy_threshold.with_label_values(&[model, k])),
            queue_depth: self.queue_depth.with_label_values(&[model]),
            inflight: self.inflight.with_label_values(&[model]),
            load_seconds: self.model_load.with_label_values(&[model]),
            engine_restarts: self.engine_restarts.with_label_values(&[model]),
            engines_live: self.engines_live.with_label_values(&[model]),
            deadline_dropped: self.deadline_dropped.with_label_values(&[model]),
        }
    }

    /// Request handles for `model` (or [`NO_MODEL`]) over `protocol`.
    pub fn requests(&self, model: &str, protocol: &str) -> RequestMetrics {
        RequestMetrics::new(self, model, protocol)
    }

    /// Handles of one listener's connection gauge and refusal counter.
    pub fn listener(&self, listener: &str) -> (IntGauge, IntCounter) {
        (
            self.connections.with_label_values(&[listener]),
            self.connections_refused.with_label_values(&[listener]),
        )
    }

    /// Counts a refused control-API call.
    pub fn admin_rejected(&self, reason: &str) {
        self.admin_rejections.with_label_values(&[reason]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        // Sized from the previous scrape (plus room to grow), so encoding does not reallocate
        // and copy the text several times on the way to ~50 KB.
        let hint = self.last_render_len.load(Ordering::Relaxed);
        let mut out = String::with_capacity(hint + hint / 8 + 1024);
        let _ = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out);
        self.last_render_len.store(out.len(), Ordering::Relaxed);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The `model` label of requests that named no served model.
pub const NO_MODEL: &str = "_none";

/// Every request outcome label, in the order [`RequestMetrics`] keeps them; the last one
/// also takes any unknown label.
pub const OUTCOMES: [&str; 7] =
    ["success", "client_error", "too_large", "rejected", "timeout", "cancelled", "server_error"];

/// Request counters and latency of one model and protocol, per outcome. Every counter
/// exists from the start (so rates and alerts see zeros); the latency histograms of failed
/// requests appear when the first such request does, which keeps a scrape small.
#[derive(Clone)]
pub struct RequestMetrics {
    counts: [IntCounter; OUTCOMES.len()],
    success: Histogram,
    durations: HistogramVec,
    labels: [String; 2],
}

impl RequestMetrics {
    fn new(m: &Metrics, model: &str, protocol: &str) -> Self {
        RequestMetrics {
            counts: OUTCOMES.map(|o| m.requests.with_label_values(&[model, protocol, o])),
            success: m.request_duration.with_label_values(&[model, protocol, "success"]),
            durations: m.request_duration.clone(),
            labels: [model.to_string(), protocol.to_string()],
        }
    }

    /// Counts one finished request by outcome label and observes its duration.
    pub fn finished(&self, outcome: &str, seconds: f64) {
        let i = OUTCOMES.iter().position(|o| *o == outcome).unwrap_or(OUTCOMES.len() - 1);
        self.counts[i].inc();
        if i == 0 {
            self.success.observe(seconds);
        } else {
            let [model, protocol] = &self.labels;
            self.durations
                .with_label_values(&[model.as_str(), protocol.as_str(), OUTCOMES[i]])
                .observe(seconds);
        }
    }
}

/// What metrics need to know of one residual block.
#[derive(Clone, Debug)]
pub struct BlockGates {
    /// torchvision prefix, e.g. `layer2.1`.
    pub prefix: String,
    pub block_gate: bool,
    pub channel_gate: bool,
    pub inner_width: i64,
}

#[derive(Clone)]
struct BlockHandles {
    /// (run, skip) counters of its block gate.
    gate: Option<(IntCounter, IntCounter)>,
    width: Option<Histogram>,
    inner_width: i64,
}

/// Handles of one model's metrics.
#[derive(Clone)]
pub struct ModelMetrics {
    pub model: String,
    pub http: RequestMetrics,
    pub grpc: RequestMetrics,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub batch_size: Histogram,
    inferences: IntCounter,
    flops_executed: IntCounter,
    flops_skipped: IntCounter,
    flops_dense: IntCounter,
    blocks: Vec<BlockHandles>,
    exits: IntCounterVec,
    policy_version: IntGauge,
    policy_budget: Gauge,
    thresholds: [Gauge; 3],
    pub queue_depth: IntGauge,
    pub inflight: IntGauge,
    pub load_seconds: Gauge,
    pub engine_restarts: IntCounter,
    pub engines_live: IntGauge,
    pub deadline_dropped: IntCounter,
}

impl ModelMetrics {
    /// Records what a batch computed.
    pub fn record_batch(&self, reports: &[ComputeReport]) {
        self.batch_size.observe(reports.len() as f64);
        self.inferences.inc_by(reports.len() as u64);
        for r in reports {
            self.flops_executed.inc_by(r.executed_flops);
            self.flops_skipped.inc_by(r.skipped_flops());
            self.flops_dense.inc_by(r.dense_flops);
            for (decision, h) in r.blocks.iter().zip(&self.blocks) {
                match decision {
                    BlockDecision::NotReached => {}
                    BlockDecision::Skipped => {
                        if let Some((_, skip)) = &h.gate {
                            skip.inc();
                        }
                    }
                    BlockDecision::Run { widths } => {
                        if let Some((run, _)) = &h.gate {
                            run.inc();
                        }
                        if let Some(width) = &h.width {
                            let kept: i64 = widths.iter().sum();
                            width.observe(kept as f64 / (h.inner_width * widths.len() as i64).max(1) as f64);
                        }
                    }
                }
            }
            let exit = r.exit.map_or("none".to_string(), |s| format!("exit{s}"));
            self.exits.with_label_values(&[self.model.as_str(), exit.as_str()]).inc();
        }
    }

    /// Publishes the live policy.
    pub fn set_policy(&self, p: &GatePolicy) {
        self.policy_version.set(p.version as i64);
        self.policy_budget.set(p.budget.unwrap_or(-1.0));
        self.thresholds[0].set(p.channel_threshold as f64);
        self.thresholds[1].set(p.block_threshold as f64);
        self.thresholds[2].set(p.exit_threshold as f64);
    }
}
