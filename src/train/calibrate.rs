//! The offline calibration sweep: on held-out validation images, try the gate thresholds
//! on a grid, measure accuracy and FLOPs at each point, and hand the points to
//! `control::calibration` to keep the frontier and build the budget table.

use tch::{Kind, Tensor};

use crate::control::calibration::OperatingPoint;
use crate::data::Split;
use crate::engine::{GatePolicy, Model};

/// The thresholds a sweep tries.
#[derive(Clone, Debug)]
pub struct SweepGrid {
    pub channel: Vec<f32>,
    pub block: Vec<f32>,
    pub exit: Vec<f32>,
}

impl SweepGrid {
    /// Channel and block thresholds at quantiles of the gates' own scores on `images` (plus 0
    /// and 1), so the grid follows the trained gates; exit thresholds on a fixed ladder.
    pub fn from_scores(model: &Model, images: &Tensor, steps: usize) -> Self {
        let mut channel = vec![0.0f32, 1.0];
        let mut block = vec![0.0f32, 1.0];
        if let Some(scores) = model.net.gate_scores(images) {
            let mut c = Vec::new();
            let mut b = Vec::new();
            for slots in &model.net.gates.blocks {
                if let Some(r) = &slots.channel {
                    c.extend(
                        Vec::<f32>::try_from(scores.narrow(1, r.start as i64, r.len() as i64).reshape(-1))
                            .unwrap_or_default(),
                    );
                }
                if let Some(j) = slots.block {
                    b.extend(Vec::<f32>::try_from(scores.select(1, j as i64)).unwrap_or_default());
                }
            }
            channel.extend(quantiles(c, steps));
            block.extend(quantiles(b, steps));
        }
        let has_exits = !model.net.gates.exits.is_empty();
        let exit = if has_exits {
            vec![1.0, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5]
        } else {
            vec![1.0]
        };
        let tidy = |mut v: Vec<f32>| {
            v.sort_by(f32::total_cmp);
            v.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
            v
        };
        let channel = if model.net.gates.blocks.iter().any(|s| s.channel.is_some()) {
            tidy(channel)
        } else {
            vec![0.0]
        };
        let block =
            if model.net.gates.blocks.iter().any(|s| s.block.is_some()) { tidy(block) } else { vec![0.0] };
        SweepGrid { channel, block, exit }
    }
}

fn quantiles(mut values: Vec<f32>, steps: usize) -> Vec<f32> {
    if values.is_empty() || steps == 0 {
        return Vec::new();
    }
    values.sort_by(f32::total_cmp);
    (1..steps).map(|i| values[(i * (values.len() - 1)) / steps]).collect()
}

/// Measures every grid point on `split` (slice mode): accuracy and mean FLOP fraction.
/// Each (channel, block) pair is one traced pass; every exit threshold follows from it.
pub fn sweep(
    model: &Model,
    split: &Split,
    grid: &SweepGrid,
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Vec<OperatingPoint> {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    let total = grid.channel.len() * grid.block.len();
    let mut points = Vec::new();
    let mut done = 0;
    for &c in &grid.channel {
        for &b in &grid.block {
            let policy = GatePolicy::with_thresholds(c, b, 1.0);
            // Per exit threshold: (correct, FLOP fraction sum).
            let mut acc = vec![(0usize, 0.0f64); grid.exit.len()];
            for start in (0..n).step_by(batch.max(1)) {
                let range = start..(start + batch).min(n);
                let labels = &split.labels[range.clone()];
                let trace = model.net.trace(&split.images(range.clone()), &policy);
                let final_pred = argmax(&trace.final_logits);
                let exit_conf: Vec<Vec<f32>> = trace.exit_logits.iter().map(confidence).collect();
                let exit_pred: Vec<Vec<i64>> = trace.exit_logits.iter().map(argmax).collect();
                for (k, &e) in grid.exit.iter().enumerate() {
                    for (i, &label) in labels.iter().enumerate() {
                        let r = &trace.reports[i];
                        let dense = r.dense_flops as f64;
                        let left =
                            (e < 1.0).then(|| exit_conf.iter().position(|conf| conf[i] >= e)).flatten();
                        let (pred, flops) = match left {
                            Some(x) => (exit_pred[x][i], trace.flops_at_exit[x][i]),
                            None if e < 1.0 => (final_pred[i], r.executed_flops),
                            None => (final_pred[i], r.executed_flops - trace.head_flops[i]),
                        };
                        acc[k].0 += usize::from(pred == label as i64);
                        acc[k].1 += flops as f64 / dense;
                    }
                }
            }
            for (k, &e) in grid.exit.iter().enumerate() {
                points.push(OperatingPoint {
                    channel_threshold: c,
                    block_threshold: b,
                    exit_threshold: e,
                    validation_accuracy: acc[k].0 as f64 / n as f64,
                    flop_fraction: acc[k].1 / n as f64,
                });
            }
            done += 1;
            progress(done, total);
        }
    }
    points
}

fn argmax(logits: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(logits.argmax(1, false)).unwrap_or_default()
}

fn confidence(logits: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(logits.softmax(1, Kind::Float).amax(&[1i64][..], false)).unwrap_or_default()
}
