//! `sluice bench widths`: what a channel gate's narrower widths cost in time, not FLOPs.
//!
//! For one identity block of every stage of an architecture, the residual branch is built at
//! every width a channel gate of the default gate configuration may choose
//! ([`allowed_widths`]: multiples of 8 from a quarter of the inner width), on the engine's own oneDNN
//! convolutions with random weights, and timed alone, widths interleaved round by round. A
//! vector unit computes output channels in fixed-size groups (16 FP32 lanes with AVX-512), so
//! a width that is not a multiple of the group may cost as much as the next one up: the table
//! shows where a FLOP saved is not a microsecond saved.

use std::time::Instant;

use anyhow::Context;
use tch::{Kind, Tensor};

use super::timing::median;
use crate::engine::arch::{ArchSpec, BlockSpec, ConvShape};
use crate::engine::flops::residual_flops;
use crate::engine::folded::{FoldedConv, cpu_info_field, fold_layers, residual_add_relu};
use crate::engine::gates::allowed_widths;
use crate::engine::{Format, GateConfig, Layout, Precision};

/// Untimed calls of every width before the rounds.
const WARMUP_CALLS: usize = 20;

/// Limits on what is timed (ImageNet-size inputs fit many times over).
const MAX_BATCH: i64 = 256;
const MAX_SIDE: i64 = 1024;

/// What to time.
#[derive(Clone, Debug)]
pub struct WidthsPlan {
    pub arch: String,
    /// Input `[C, H, W]`.
    pub dims: [i64; 3],
    pub batch: i64,
    /// Interleaved rounds; each times every width once.
    pub rounds: usize,
    /// Calls per timing.
    pub calls: usize,
}

/// One width of one stage's block.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WidthRow {
    pub block: String,
    pub channels: i64,
    pub height: i64,
    pub width: i64,
    /// The inner width the residual branch runs at.
    pub inner: i64,
    /// Of the branch's FLOPs at full inner width.
    pub flop_fraction: f64,
    /// Median microseconds per call of the branch (with its fused residual add and ReLU).
    pub micros: f64,
    /// Of the full inner width's median.
    pub time_fraction: f64,
}

/// The first block of every stage that keeps its input's shape (an identity shortcut).
fn identity_blocks(spec: &ArchSpec) -> Vec<(usize, BlockSpec)> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for (i, block) in spec.block_specs().into_iter().enumerate() {
        if block.downsample.is_none() && !seen.contains(&block.stage) {
            seen.push(block.stage);
            out.push((i, block));
        }
    }
    out
}

/// The block's convolutions at inner width `k`, random He-initialised weights.
fn branch(block: &BlockSpec, k: i64, format: Format, hw: [i64; 2]) -> Vec<FoldedConv> {
    let last = block.convs.len() - 1;
    let convs = block.convs.iter().enumerate().map(|(j, shape)| {
        let out_ch = if j == last { shape.out_ch } else { k };
        let in_ch = if j == 0 { shape.in_ch } else { k };
        let fan_in = (in_ch * shape.kernel * shape.kernel) as f64;
        let weight = Tensor::randn([out_ch, in_ch, shape.kernel, shape.kernel], tch::kind::FLOAT_CPU)
            * (2.0 / fan_in).sqrt();
        let bias = Tensor::zeros([out_ch], tch::kind::FLOAT_CPU);
        (weight, bias, ConvShape { in_ch, out_ch, ..shape.clone() })
    });
    fold_layers(convs, format, hw)
}

/// Times every allowed width of every stage's identity block; `each` sees rows as they come.
pub fn run(plan: &WidthsPlan, mut each: impl FnMut(&WidthRow)) -> anyhow::Result<Vec<WidthRow>> {
    crate::engine::onednn::available().map_err(|e| anyhow::anyhow!("oneDNN is not usable here: {e}"))?;
    anyhow::ensure!(
        plan.batch >= 1 && plan.rounds >= 1 && plan.calls >= 1,
        "batch, rounds and calls must be >= 1"
    );
    let [c, h, w] = plan.dims;
    // Checked before any tensor is made: a block's input is at most batch × 2048 × H × W.
    anyhow::ensure!(
        plan.batch <= MAX_BATCH && h <= MAX_SIDE && w <= MAX_SIDE && c <= MAX_SIDE,
        "--batch must be at most {MAX_BATCH} and each of --dims at most {MAX_SIDE}"
    );
    let spec = ArchSpec::named(&plan.arch, c, 10).context("--arch")?;
    let _guard = tch::no_grad_guard();
    let _turn = crate::engine::model::GeneratorTurn::seeded(0);
    let sizes = spec.block_input_sizes([h, w]);
    let gates = GateConfig { channel: true, ..GateConfig::default() };
    let mut rows = Vec::new();
    for (index, block) in identity_blocks(&spec) {
        let hw = sizes[index];
        let format = Format {
            input_hw: Some([h, w]),
            unbatched: plan.batch == 1,
            ..Format::new(Layout::Onednn, Precision::Fp32)
        };
        let widths = allowed_widths(block.inner_width(), &gates);
        let branches: Vec<Vec<FoldedConv>> = widths.iter().map(|&k| branch(&block, k, format, hw)).collect();
        let x = format.apply(&Tensor::randn(
            [plan.batch, block.in_ch(), hw[0], hw[1]],
            (Kind::Float, tch::Device::Cpu),
        ));
        // Every call overwrites its shortcut's storage (the fused add): each gets a copy,
        // the same cost at every width.
        let call = |layers: &[FoldedConv]| drop(residual_add_relu(layers, &x, x.copy()));
        // The first calls of a primitive are slow (its scratch memory, the thread pool).
        for layers in &branches {
            (0..WARMUP_CALLS).for_each(|_| call(layers));
        }
        let mut times = vec![Vec::with_capacity(plan.rounds); widths.len()];
        for round in 0..plan.rounds {
            for step in 0..widths.len() {
                let v = (round + step) % widths.len();
                let start = Instant::now();
                (0..plan.calls).for_each(|_| call(&branches[v]));
                times[v].push(start.elapsed().as_secs_f64() * 1e6 / plan.calls as f64);
            }
        }
        let full_width = widths[widths.len() - 1];
        let flops = |k: i64| residual_flops(&block, hw[0], hw[1], &vec![k; block.convs.len() - 1]) as f64;
        let full_time = median(&times[widths.len() - 1]);
        for (&k, t) in widths.iter().zip(&times) {
            let row = WidthRow {
                block: block.prefix.clone(),
                channels: block.in_ch(),
                height: hw[0],
                width: hw[1],
                inner: k,
                flop_fraction: flops(k) / flops(full_width),
                micros: median(t),
                time_fraction: median(t) / full_time,
            };
            each(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

pub fn markdown_header() -> String {
    "| block | input C×H×W | inner width | FLOP fraction | µs per call | time fraction |\n|---|---|---|---|---|---|"
        .into()
}

pub fn markdown_row(r: &WidthRow) -> String {
    format!(
        "| {} | {}×{}×{} | {} | {:.2} | {:.1} | {:.2} |",
        r.block, r.channels, r.height, r.width, r.inner, r.flop_fraction, r.micros, r.time_fraction
    )
}

/// The CPU's model name and its SIMD flags (Linux `/proc/cpuinfo`), for the table's caption.
pub fn cpu_caption() -> String {
    let model = cpu_info_field("model name").unwrap_or_default();
    let flags = cpu_info_field("flags").unwrap_or_default();
    let simd: Vec<&str> =
        flags.split_whitespace().filter(|f| f.starts_with("avx") || f.starts_with("amx")).collect();
    format!("CPU: {} ({})", if model.is_empty() { "unknown" } else { &model }, simd.join(" "))
}
