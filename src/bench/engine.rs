//! `sluice bench engine`: the realized speedup table of gating. For each model, batch, gate
//! kind and target FLOP fraction, thresholds are found by measuring (bisection on the
//! benchmark batch's executed FLOPs; random gate weights), then the gated engine and the
//! dense engine are timed interleaved in the same run.
//! efficiency = speedup × executed FLOP fraction (1.0: the savings are fully real).

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::timing::interleaved;
use crate::engine::folded::{FoldedResNet, Format, Layout, Precision};
use crate::engine::gates::{BlockGates, GateConfig};
use crate::engine::model::load_params;
use crate::engine::{
    ArchSpec, BatchTotals, BlockDecision, ChannelMode, ComputeReport, GatePolicy, Model, ModelSource,
};

/// The gate kinds a row exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum GateKind {
    /// Every gate present, every threshold 0 (exits off): the gates' own overhead.
    None,
    ChannelSlice,
    ChannelSelect,
    Block,
    Exit,
}

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub model: String,
    pub input: String,
    pub batch: i64,
    pub gate: GateKind,
    pub target: f64,
    pub flop_fraction: f64,
    pub latency_ms: f64,
    pub dense_ms: f64,
    pub speedup: f64,
    pub efficiency: f64,
    /// Mean fraction of the inner channels kept, over inputs and the blocks they ran.
    pub kept_fraction: f64,
    /// Distinct per-input decision patterns in the batch, by widths (1 = uniform).
    pub distinct_plans: usize,
    pub threads: i32,
    /// The engines' layout and precision.
    pub layout: Layout,
    pub precision: Precision,
    /// The gated model's `gates.width_levels`.
    pub width_levels: i64,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    pub cases: Vec<(String, i64, i64)>,
    pub gates: Vec<GateKind>,
    pub targets: Vec<f64>,
    /// Interleaved rounds per row (each runs dense and gated once).
    pub rounds: usize,
    /// Layout and precision of both the gated and the dense engine.
    pub format: Format,
    /// `gates.width_levels` of the gated models (None: the default, 8).
    pub width_levels: Option<i64>,
}

impl BenchPlan {
    /// The table: ResNet-50 at 224 (b1, b8), ResNet-20 at 28 (b1, b32).
    pub fn standard(rounds: usize) -> Self {
        BenchPlan {
            cases: vec![
                ("resnet50".into(), 224, 1),
                ("resnet50".into(), 224, 8),
                ("resnet20".into(), 28, 1),
                ("resnet20".into(), 28, 32),
            ],
            gates: vec![
                GateKind::None,
                GateKind::ChannelSlice,
                GateKind::ChannelSelect,
                GateKind::Block,
                GateKind::Exit,
            ],
            targets: vec![0.75, 0.5, 0.3],
            rounds,
            format: Format::from(Layout::ChannelsLast),
            width_levels: None,
        }
    }
}

fn gate_config(kind: GateKind, arch: &ArchSpec, width_levels: Option<i64>) -> GateConfig {
    let exits = if arch.is_cifar() { vec![1, 2] } else { vec![2, 3] };
    let defaults = GateConfig::default();
    let base = GateConfig {
        exit_conv: arch.is_cifar(),
        width_levels: width_levels.unwrap_or(defaults.width_levels),
        ..defaults
    };
    match kind {
        GateKind::None => GateConfig { channel: true, block: BlockGates::Identity, exits, ..base },
        GateKind::ChannelSlice | GateKind::ChannelSelect => GateConfig { channel: true, ..base },
        GateKind::Block => GateConfig { block: BlockGates::Identity, ..base },
        GateKind::Exit => GateConfig { exits, ..base },
    }
}

/// The policy at knob position `s` in [0, 1]: higher `s` = less compute.
fn policy_at(kind: GateKind, s: f32) -> GatePolicy {
    match kind {
        GateKind::None => GatePolicy::dense(),
        GateKind::ChannelSlice => GatePolicy::with_thresholds(s, 0.0, 1.0),
        GateKind::ChannelSelect => {
            GatePolicy { channel_mode: ChannelMode::Select, ..GatePolicy::with_thresholds(s, 0.0, 1.0) }
        }
        GateKind::Block => GatePolicy::with_thresholds(0.0, s, 1.0),
        // Lower exit thresholds mean more exits; s = 0 keeps them off.
        GateKind::Exit => GatePolicy::with_thresholds(0.0, 0.0, if s <= 0.0 { 1.0 } else { 1.0 - s }),
    }
}

fn fraction(model: &Model, x: &Tensor, policy: &GatePolicy) -> (f64, Vec<ComputeReport>) {
    let (_, reports) = model.net.forward(x, policy);
    (BatchTotals::of(&reports).flop_fraction(), reports)
}

/// The knob position whose batch FLOP fraction is closest to `target` (bisection; FLOPs
/// fall as the knob rises).
fn find_knob(model: &Model, x: &Tensor, kind: GateKind, target: f64) -> f32 {
    let (mut lo, mut hi) = (0.0f32, 1.0f32);
    let mut best = (f64::INFINITY, 0.0f32);
    for _ in 0..24 {
        let mid = (lo + hi) / 2.0;
        let (f, _) = fraction(model, x, &policy_at(kind, mid));
        if (f - target).abs() < best.0 {
            best = ((f - target).abs(), mid);
        }
        if f > target { lo = mid } else { hi = mid }
    }
    best.1
}

/// Inputs whose per-image scale and offset differ, so gate decisions differ per input.
pub fn varied_inputs(n: i64, c: i64, hw: i64, seed: i64) -> Tensor {
    let spread = Tensor::arange(n, (Kind::Float, Device::Cpu)).view([n, 1, 1, 1]) / n.max(1) as f64;
    crate::engine::model::seeded(seed, || Tensor::randn([n, c, hw, hw], (Kind::Float, Device::Cpu)))
        * (&spread + 0.5)
        + (spread - 0.5)
}

fn kept_fraction(spec: &ArchSpec, reports: &[ComputeReport]) -> f64 {
    let blocks = spec.block_specs();
    let kept: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.blocks.iter().zip(&blocks))
        .filter_map(|(d, b)| match d {
            BlockDecision::Run { widths } => {
                Some(widths.iter().sum::<i64>() as f64 / (widths.len() as i64 * b.inner_width()) as f64)
            }
            _ => None,
        })
        .collect();
    kept.iter().sum::<f64>() / kept.len().max(1) as f64
}

fn distinct_plans(reports: &[ComputeReport]) -> usize {
    let mut plans: Vec<String> = reports.iter().map(|r| format!("{:?}{:?}", r.blocks, r.exit)).collect();
    plans.sort();
    plans.dedup();
    plans.len()
}

/// Runs the plan; calls `each` with every row as soon as it is measured.
pub fn run(plan: &BenchPlan, mut each: impl FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
    let _guard = tch::no_grad_guard();
    let threads = tch::get_num_threads();
    let mut rows = Vec::new();
    for (arch, hw, batch) in &plan.cases {
        let channels =
            if arch.starts_with("resnet2") || arch == "resnet32" || arch == "resnet56" { 1 } else { 3 };
        let spec = ArchSpec::named(arch, channels, 10)?;
        let x = varied_inputs(*batch, channels, *hw, 7);
        let dense_model = {
            let (_vs, params) = load_params(&ModelSource::random(spec.clone(), 0))?;
            FoldedResNet::fold(&params.backbone, plan.format)
        };
        for &kind in &plan.gates {
            let source = ModelSource {
                gates: gate_config(kind, &spec, plan.width_levels),
                format: plan.format,
                ..ModelSource::random(spec.clone(), 0)
            };
            let model = Model::build(&source)?;
            let targets: Vec<f64> = if kind == GateKind::None { vec![1.0] } else { plan.targets.clone() };
            for &target in &targets {
                let policy = if kind == GateKind::None {
                    GatePolicy::dense()
                } else {
                    policy_at(kind, find_knob(&model, &x, kind, target))
                };
                let (flop_fraction, reports) = fraction(&model, &x, &policy);
                let mut dense = || {
                    let _ = dense_model.forward(&x);
                };
                let mut gated = || {
                    let _ = model.net.forward(&x, &policy);
                };
                let rounds = if *batch * hw * hw > 200_000 { plan.rounds.div_ceil(2) } else { plan.rounds };
                let t = interleaved(&mut [&mut dense, &mut gated], rounds, 2);
                let row = Row {
                    model: arch.clone(),
                    input: format!("{batch}x{channels}x{hw}x{hw}"),
                    batch: *batch,
                    gate: kind,
                    target,
                    flop_fraction,
                    latency_ms: t.median_ms[1],
                    dense_ms: t.median_ms[0],
                    speedup: t.speedup[1],
                    efficiency: t.speedup[1] * flop_fraction,
                    kept_fraction: kept_fraction(&spec, &reports),
                    distinct_plans: distinct_plans(&reports),
                    threads,
                    layout: plan.format.layout,
                    precision: plan.format.precision,
                    width_levels: source.gates.width_levels,
                };
                each(&row);
                rows.push(row);
            }
        }
    }
    Ok(rows)
}

/// The markdown table header and one row.
pub fn markdown_header() -> String {
    "| model | batch | gate | target | FLOP fraction | channels kept | latency ms | dense ms | speedup | efficiency | plans |\n\
     |---|---|---|---|---|---|---|---|---|---|---|"
        .to_string()
}

pub fn markdown_row(r: &Row) -> String {
    let gate =
        serde_json::to_value(r.gate).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    format!(
        "| {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2}x | {:.2} | {} |",
        r.model,
        r.batch,
        gate,
        r.target,
        r.flop_fraction,
        r.kept_fraction,
        r.latency_ms,
        r.dense_ms,
        r.speedup,
        r.efficiency,
        r.distinct_plans
    )
}
