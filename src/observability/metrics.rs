//! Every Prometheus metric sluice exports, registered once here with help text
//! (docs/metrics.md). Handlers and the scheduler record through typed handles; a scrape
//! is written straight from them ([`super::exposition`]).

use std::sync::atomic::{AtomicUsize, Ordering};

pub use super::exposition::{Counter as IntCounter, FloatCounter, FloatGauge, Gauge as IntGauge};
use super::exposition::{Family, Histogram, ProcessCollector, Registry};
use crate::engine::{BlockDecision, ComputeReport, GatePolicy};

const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0,
    5.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const WIDTH_BUCKETS: [f64; 8] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];

/// The registry and every metric family.
pub struct Metrics {
    registry: Registry,
    /// The length of the last scrape's text, to size the next one's buffer.
    last_render_len: AtomicUsize,
    requests: Family<IntCounter, 3>,
    request_duration: Family<Histogram, 3>,
    queue_duration: Family<Histogram, 1>,
    compute_duration: Family<Histogram, 1>,
    batch_size: Family<Histogram, 1>,
    inferences: Family<IntCounter, 1>,
    flops: Family<IntCounter, 3>,
    flops_dense: Family<IntCounter, 2>,
    gate_decisions: Family<IntCounter, 3>,
    channel_width: Family<Histogram, 2>,
    exits: Family<IntCounter, 2>,
    policy_version: Family<IntGauge, 1>,
    policy_budget: Family<FloatGauge, 1>,
    policy_threshold: Family<FloatGauge, 2>,
    queue_depth: Family<IntGauge, 1>,
    inflight: Family<IntGauge, 1>,
    model_load: Family<FloatGauge, 1>,
    admin_rejections: Family<IntCounter, 1>,
    policy_file_version: Family<IntGauge, 0>,
    policy_file_errors: Family<IntCounter, 0>,
    engine_restarts: Family<IntCounter, 1>,
    engines_live: Family<IntGauge, 1>,
    deadline_dropped: Family<IntCounter, 1>,
    connections: Family<IntGauge, 1>,
    connections_refused: Family<IntCounter, 1>,
    controller_enabled: Family<IntGauge, 1>,
    controller_target: Family<FloatGauge, 1>,
    controller_floor: Family<FloatGauge, 1>,
    controller_predicted: Family<FloatGauge, 1>,
    controller_measured: Family<FloatGauge, 1>,
    controller_at_floor: Family<IntGauge, 1>,
    controller_floor_seconds: Family<FloatCounter, 1>,
    controller_cannot_meet: Family<IntGauge, 1>,
    controller_changes: Family<IntCounter, 1>,
    slo_violations: Family<IntCounter, 1>,
}

impl Metrics {
    /// Creates and registers every metric (and the process's own).
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            last_render_len: AtomicUsize::new(0),
            requests: Family::new(
                "sluice_requests_total",
                "Inference requests by protocol and outcome, every request counted once (model \"_none\" \
                 when the request named no served model).",
                ["model", "outcome", "protocol"],
            ),
            request_duration: Family::histogram(
                "sluice_request_duration_seconds",
                "Time from a request's first byte handled to its response ready, by outcome.",
                ["model", "outcome", "protocol"],
                &LATENCY_BUCKETS,
            ),
            queue_duration: Family::histogram(
                "sluice_queue_duration_seconds",
                "Time a request waited before its batch started.",
                ["model"],
                &LATENCY_BUCKETS,
            ),
            compute_duration: Family::histogram(
                "sluice_compute_duration_seconds",
                "Engine time per batch.",
                ["model"],
                &LATENCY_BUCKETS,
            ),
            batch_size: Family::histogram(
                "sluice_batch_size",
                "Inputs per executed batch.",
                ["model"],
                &BATCH_BUCKETS,
            ),
            inferences: Family::new("sluice_inferences_total", "Inputs (batch rows) computed.", ["model"]),
            flops: Family::new(
                "sluice_flops_total",
                "FLOPs executed (gate heads included) and skipped (dense minus executed, per input), \
                 at the model's number format (precision: fp32 or bf16).",
                ["kind", "model", "precision"],
            ),
            flops_dense: Family::new(
                "sluice_flops_dense_total",
                "Dense FLOPs of the computed inputs, at the model's number format (precision).",
                ["model", "precision"],
            ),
            gate_decisions: Family::new(
                "sluice_gate_decisions_total",
                "Block-gate decisions of inputs that reached the block.",
                ["decision", "gate", "model"],
            ),
            channel_width: Family::histogram(
                "sluice_channel_width_fraction",
                "Kept inner width over full inner width, per input that ran the block.",
                ["gate", "model"],
                &WIDTH_BUCKETS,
            ),
            exits: Family::new(
                "sluice_exits_total",
                "Where inputs left the network (none: the final classifier).",
                ["exit", "model"],
            ),
            policy_version: Family::new(
                "sluice_policy_version",
                "Version of the live gating policy.",
                ["model"],
            ),
            policy_budget: Family::new(
                "sluice_policy_budget",
                "Live compute budget (fraction of dense FLOPs); -1 for raw thresholds.",
                ["model"],
            ),
            policy_threshold: Family::new(
                "sluice_policy_threshold",
                "Live default gate thresholds.",
                ["kind", "model"],
            ),
            queue_depth: Family::new("sluice_queue_depth", "Requests waiting for a batch.", ["model"]),
            inflight: Family::new(
                "sluice_inflight_requests",
                "Requests admitted and not yet answered.",
                ["model"],
            ),
            model_load: Family::new(
                "sluice_model_load_seconds",
                "Time to load and warm up the model.",
                ["model"],
            ),
            admin_rejections: Family::new(
                "sluice_admin_rejections_total",
                "Refused calls to the control API.",
                ["reason"],
            ),
            policy_file_version: Family::new(
                "sluice_policy_file_version",
                "Version of the fleet's policy file applied last (--policy-file); 0 before one is.",
                [],
            ),
            policy_file_errors: Family::new(
                "sluice_policy_file_errors_total",
                "Policy-file contents refused (unreadable, invalid, or a version not above the one applied).",
                [],
            ),
            engine_restarts: Family::new(
                "sluice_engine_restarts_total",
                "Engine loops restarted after a panic outside a batch's own guard.",
                ["model"],
            ),
            engines_live: Family::new(
                "sluice_engines_live",
                "Engine threads running their loop (0: the model is not ready).",
                ["model"],
            ),
            deadline_dropped: Family::new(
                "sluice_deadline_dropped_total",
                "Requests dropped from the queue uncomputed because their deadline had passed.",
                ["model"],
            ),
            connections: Family::new(
                "sluice_open_connections",
                "Open client connections per listener.",
                ["listener"],
            ),
            connections_refused: Family::new(
                "sluice_connections_refused_total",
                "Connections closed at once because the listener had its maximum open.",
                ["listener"],
            ),
            controller_enabled: Family::new(
                "sluice_controller_enabled",
                "1 while the adaptive budget controller is switched on for the model (it may still be \
                 suspended: see the control API), else 0.",
                ["model"],
            ),
            controller_target: Family::new(
                "sluice_controller_target_seconds",
                "The latency objective's target (of the percentile the objective names); 0 when none is set.",
                ["model"],
            ),
            controller_floor: Family::new(
                "sluice_controller_floor_budget",
                "The lowest budget the controller may choose (the objective's floor, never above the \
                 operator's budget); -1 while the controller is off.",
                ["model"],
            ),
            controller_predicted: Family::new(
                "sluice_controller_predicted_seconds",
                "The controller's predicted latency percentile at the budget it chose, last tick \
                 (+Inf: that budget cannot keep up; NaN: nothing measured yet).",
                ["model"],
            ),
            controller_measured: Family::new(
                "sluice_controller_measured_seconds",
                "The objective's latency percentile of the requests answered in the last tick (NaN: too \
                 few to say).",
                ["model"],
            ),
            controller_at_floor: Family::new(
                "sluice_controller_at_floor",
                "1 while the controller holds the budget at its floor below the operator's, else 0.",
                ["model"],
            ),
            controller_floor_seconds: Family::new(
                "sluice_controller_at_floor_seconds_total",
                "Seconds the controller has held the budget at its floor.",
                ["model"],
            ),
            controller_cannot_meet: Family::new(
                "sluice_controller_cannot_meet",
                "1 while even the floor budget is predicted to miss the latency target (admission \
                 control sheds load), else 0.",
                ["model"],
            ),
            controller_changes: Family::new(
                "sluice_controller_changes_total",
                "Policy versions the controller made (budget lowered or given back).",
                ["model"],
            ),
            slo_violations: Family::new(
                "sluice_slo_violations_total",
                "Answered requests slower than the model's latency target (counted while a target is set).",
                ["model"],
            ),
        };
        let r = &mut m.registry;
        r.add(m.requests.clone());
        r.add(m.request_duration.clone());
        r.add(m.queue_duration.clone());
        r.add(m.compute_duration.clone());
        r.add(m.batch_size.clone());
        r.add(m.inferences.clone());
        r.add(m.flops.clone());
        r.add(m.flops_dense.clone());
        r.add(m.gate_decisions.clone());
        r.add(m.channel_width.clone());
        r.add(m.exits.clone());
        r.add(m.policy_version.clone());
        r.add(m.policy_budget.clone());
        r.add(m.policy_threshold.clone());
        r.add(m.queue_depth.clone());
        r.add(m.inflight.clone());
        r.add(m.model_load.clone());
        r.add(m.admin_rejections.clone());
        r.add(m.policy_file_version.clone());
        r.add(m.policy_file_errors.clone());
        r.add(m.engine_restarts.clone());
        r.add(m.engines_live.clone());
        r.add(m.deadline_dropped.clone());
        r.add(m.connections.clone());
        r.add(m.connections_refused.clone());
        r.add(m.controller_enabled.clone());
        r.add(m.controller_target.clone());
        r.add(m.controller_floor.clone());
        r.add(m.controller_predicted.clone());
        r.add(m.controller_measured.clone());
        r.add(m.controller_at_floor.clone());
        r.add(m.controller_floor_seconds.clone());
        r.add(m.controller_cannot_meet.clone());
        r.add(m.controller_changes.clone());
        r.add(m.slo_violations.clone());
        r.add(ProcessCollector);
        m
    }

    /// Handles for one model, with its label values resolved once.
    /// `precision` labels the FLOP counters (`fp32`, `bf16`): a FLOP is a FLOP in either,
    /// but what it costs differs.
    pub fn model(&self, model: &str, blocks: &[BlockGates], precision: &str) -> ModelMetrics {
        let gate = |id: &str, decision: &str| self.gate_decisions.get([decision, id, model]);
        ModelMetrics {
            model: model.to_string(),
            http: RequestMetrics::new(self, model, "http"),
            grpc: RequestMetrics::new(self, model, "grpc"),
            queue_duration: self.queue_duration.get([model]),
            compute_duration: self.compute_duration.get([model]),
            batch_size: self.batch_size.get([model]),
            inferences: self.inferences.get([model]),
            flops_executed: self.flops.get(["executed", model, precision]),
            flops_skipped: self.flops.get(["skipped", model, precision]),
            flops_dense: self.flops_dense.get([model, precision]),
            blocks: blocks
                .iter()
                .map(|b| BlockHandles {
                    gate: b.block_gate.then(|| {
                        let id = format!("{}.block", b.prefix);
                        (gate(&id, "run"), gate(&id, "skip"))
                    }),
                    width: b
                        .channel_gate
                        .then(|| self.channel_width.get([&format!("{}.channel", b.prefix), model])),
                    inner_width: b.inner_width,
                })
                .collect(),
            exits: self.exits.clone(),
            policy_version: self.policy_version.get([model]),
            policy_budget: self.policy_budget.get([model]),
            thresholds: ["channel", "block", "exit"].map(|k| self.policy_threshold.get([k, model])),
            queue_depth: self.queue_depth.get([model]),
            inflight: self.inflight.get([model]),
            load_seconds: self.model_load.get([model]),
            engine_restarts: self.engine_restarts.get([model]),
            engines_live: self.engines_live.get([model]),
            deadline_dropped: self.deadline_dropped.get([model]),
            controller: ControllerMetrics {
                enabled: self.controller_enabled.get([model]),
                target: self.controller_target.get([model]),
                floor: self.controller_floor.get([model]),
                predicted: self.controller_predicted.get([model]),
                measured: self.controller_measured.get([model]),
                at_floor: self.controller_at_floor.get([model]),
                floor_seconds: self.controller_floor_seconds.get([model]),
                cannot_meet: self.controller_cannot_meet.get([model]),
                changes: self.controller_changes.get([model]),
                slo_violations: self.slo_violations.get([model]),
            },
        }
    }

    /// Request handles for `model` (or [`NO_MODEL`]) over `protocol`.
    pub fn requests(&self, model: &str, protocol: &str) -> RequestMetrics {
        RequestMetrics::new(self, model, protocol)
    }

    /// Handles of one listener's connection gauge and refusal counter.
    pub fn listener(&self, listener: &str) -> (IntGauge, IntCounter) {
        (self.connections.get([listener]), self.connections_refused.get([listener]))
    }

    /// Counts a refused control-API call.
    pub fn admin_rejected(&self, reason: &str) {
        self.admin_rejections.get([reason]).inc();
    }

    /// The policy file's version `version` is live.
    pub fn policy_file_applied(&self, version: u64) {
        self.policy_file_version.get([]).set(version as i64);
        // Exported from the first version on, so a rate over it starts at 0.
        self.policy_file_errors.get([]);
    }

    /// Policy-file contents were refused.
    pub fn policy_file_refused(&self) {
        self.policy_file_errors.get([]).inc();
    }

    /// The Prometheus text exposition, format 0.0.4 ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        // Sized from the previous scrape (plus room to grow), so rendering does not
        // reallocate and copy the text several times on the way to ~50 KB.
        let hint = self.last_render_len.load(Ordering::Relaxed);
        let mut out = String::with_capacity(hint + hint / 8 + 1024);
        self.registry.render_into(&mut out);
        self.last_render_len.store(out.len(), Ordering::Relaxed);
        out
    }
}

/// The media type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    durations: Family<Histogram, 3>,
    labels: [String; 2],
}

impl RequestMetrics {
    fn new(m: &Metrics, model: &str, protocol: &str) -> Self {
        RequestMetrics {
            counts: OUTCOMES.map(|o| m.requests.get([model, o, protocol])),
            success: m.request_duration.get([model, "success", protocol]),
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
            self.durations.get([model.as_str(), OUTCOMES[i], protocol.as_str()]).observe(seconds);
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
    exits: Family<IntCounter, 2>,
    policy_version: IntGauge,
    policy_budget: FloatGauge,
    thresholds: [FloatGauge; 3],
    pub queue_depth: IntGauge,
    pub inflight: IntGauge,
    pub load_seconds: FloatGauge,
    pub engine_restarts: IntCounter,
    pub engines_live: IntGauge,
    pub deadline_dropped: IntCounter,
    pub controller: ControllerMetrics,
}

/// Handles of one model's adaptive-budget-controller metrics.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub enabled: IntGauge,
    pub target: FloatGauge,
    pub floor: FloatGauge,
    pub predicted: FloatGauge,
    pub measured: FloatGauge,
    pub at_floor: IntGauge,
    pub floor_seconds: FloatCounter,
    pub cannot_meet: IntGauge,
    pub changes: IntCounter,
    pub slo_violations: IntCounter,
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
            self.exits.get([exit.as_str(), self.model.as_str()]).inc();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_has_every_family_with_help_and_the_series_recorded() {
        let m = Metrics::new();
        let model = m.model("m", &[], "fp32");
        model.http.finished("success", 0.003);
        model.http.finished("rejected", 0.001);
        m.admin_rejected("bad_token");
        let text = m.render();
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!((types, helps), (35 + 7, 35 + 7), "every family and the process's own, with help");
        for counter in ["sluice_requests_total", "sluice_admin_rejections_total", "process_cpu_seconds_total"]
        {
            assert!(text.contains(&format!("\n# TYPE {counter} counter\n")), "{counter}:\n{text}");
        }
        assert!(
            text.contains("\nsluice_requests_total{model=\"m\",outcome=\"success\",protocol=\"http\"} 1\n")
        );
        assert!(
            text.contains("\nsluice_requests_total{model=\"m\",outcome=\"timeout\",protocol=\"grpc\"} 0\n")
        );
        assert!(text.contains("\nsluice_admin_rejections_total{reason=\"bad_token\"} 1\n"));
        let bucket = "sluice_request_duration_seconds_bucket{model=\"m\",outcome=\"success\",protocol=\"http\",le=\"0.004\"} 1\n";
        assert!(text.contains(bucket), "{text}");
        // A failed request's latency series appears with the first such request.
        assert!(text.contains(
            "sluice_request_duration_seconds_count{model=\"m\",outcome=\"rejected\",protocol=\"http\"} 1\n"
        ));
        assert!(!text.contains("outcome=\"timeout\",protocol=\"http\",le="));
        assert!(text.contains("\nsluice_flops_total{kind=\"skipped\",model=\"m\",precision=\"fp32\"} 0\n"));
    }
}
