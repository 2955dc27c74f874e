//! The offline calibration sweep: on held-out validation images, try the gate thresholds
//! on a grid, measure accuracy and FLOPs at each point, and hand the points to
//! `control::calibration` to keep the frontier and build the budget table.

use tch::{Kind, Tensor};

use crate::control::calibration::{OperatingPoint, frontier};
use crate::data::{DataError, Split};
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
        let exit = if has_exits { exit_ladder() } else { vec![1.0] };
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

/// The exit thresholds every sweep tries: 1 (exits off), the near-certain 0.9999 … 0.995,
/// every hundredth from 0.99 to 0.80 — where the accuracy/time trade of an exit lives
/// (docs/decisions.md, stop 31) — then 0.75 … 0.5. Exit thresholds cost the sweep no forward
/// pass: every one is read off the same trace.
fn exit_ladder() -> Vec<f32> {
    let mut ladder = vec![1.0, 0.9999, 0.999, 0.995];
    ladder.extend((80..=99).rev().map(|h| h as f32 / 100.0));
    ladder.extend([0.75, 0.7, 0.6, 0.5]);
    ladder
}

fn quantiles(mut values: Vec<f32>, steps: usize) -> Vec<f32> {
    if values.is_empty() || steps == 0 {
        return Vec::new();
    }
    values.sort_by(f32::total_cmp);
    (1..steps).map(|i| values[(i * (values.len() - 1)) / steps]).collect()
}

/// Measures every grid point on `split` (slice mode): accuracy, mean FLOP fraction and its
/// standard error.
/// Each (channel, block) pair is one traced pass; every exit threshold follows from it.
pub fn sweep(
    model: &Model,
    split: &Split,
    grid: &SweepGrid,
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<OperatingPoint>, DataError> {
    let _guard = tch::no_grad_guard();
    let n = split.len();
    let total = grid.channel.len() * grid.block.len();
    let mut points = Vec::new();
    let mut done = 0;
    for &c in &grid.channel {
        for &b in &grid.block {
            let policy = GatePolicy::with_thresholds(c, b, 1.0);
            // Per exit threshold: (correct, FLOP fraction sum, sum of squares).
            let mut acc = vec![(0usize, 0.0f64, 0.0f64); grid.exit.len()];
            for start in (0..n).step_by(batch.max(1)) {
                let range = start..(start + batch).min(n);
                let labels = &split.labels[range.clone()];
                let trace = model.net.trace(&split.images(range.clone())?, &policy);
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
                        let fraction = flops as f64 / dense;
                        acc[k].0 += usize::from(pred == label as i64);
                        acc[k].1 += fraction;
                        acc[k].2 += fraction * fraction;
                    }
                }
            }
            for (k, &e) in grid.exit.iter().enumerate() {
                let (correct, sum, squares) = acc[k];
                points.push(OperatingPoint {
                    channel_threshold: c,
                    block_threshold: b,
                    exit_threshold: e,
                    validation_accuracy: correct as f64 / n as f64,
                    flop_fraction: sum / n as f64,
                    flop_fraction_stderr: standard_error(sum, squares, n),
                });
            }
            done += 1;
            progress(done, total);
        }
    }
    Ok(points)
}

/// [`sweep`], then fills the frontier where it is too coarse for the budget table: for each
/// of `budgets` whose best point sits more than `max_gap` of dense FLOPs below it, the
/// threshold pair halfway between that point and the next frontier point above the budget
/// is swept too (every exit threshold comes with it), for up to `rounds` rounds; "below it"
/// at `confidence` standard errors, as the table will choose ([`OperatingPoint::fits`]). Quantile
/// grids follow the gates' score mass, which piles up near 0 and 1, so one quantile step can
/// jump from 35% to 53% of dense FLOPs and leave every budget in between on the point below.
#[allow(clippy::too_many_arguments)]
pub fn sweep_refined(
    model: &Model,
    split: &Split,
    grid: &SweepGrid,
    batch: usize,
    budgets: &[f64],
    confidence: f64,
    max_gap: f64,
    rounds: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<OperatingPoint>, DataError> {
    let mut points = sweep(model, split, grid, batch, &mut progress)?;
    let mut swept: Vec<(f32, f32)> =
        points.iter().map(|p| (p.channel_threshold, p.block_threshold)).collect();
    for round in 0..rounds {
        let pairs: Vec<(f32, f32)> = gap_pairs(&frontier(&points), budgets, confidence, max_gap)
            .into_iter()
            .filter(|pair| !swept.iter().any(|s| (s.0 - pair.0).abs() < 1e-5 && (s.1 - pair.1).abs() < 1e-5))
            .collect();
        if pairs.is_empty() {
            break;
        }
        tracing::info!(
            round = round + 1,
            pairs = pairs.len(),
            "refining the grid where budgets fall in gaps"
        );
        for &(c, b) in &pairs {
            let one = SweepGrid { channel: vec![c], block: vec![b], exit: grid.exit.clone() };
            points.extend(sweep(model, split, &one, batch, |_, _| {})?);
        }
        swept.extend(pairs);
    }
    Ok(points)
}

/// For each budget below 1 whose best fitting frontier point (`frontier` ascending FLOPs, so
/// ascending accuracy; fitting at `confidence` standard errors) leaves more than `max_gap`
/// of it unused, the (channel, block) thresholds halfway to the next point, which does not
/// fit; deduplicated.
fn gap_pairs(frontier: &[OperatingPoint], budgets: &[f64], confidence: f64, max_gap: f64) -> Vec<(f32, f32)> {
    let mut pairs: Vec<(f32, f32)> = Vec::new();
    for &budget in budgets.iter().filter(|&&b| b < 1.0) {
        let Some(at) = frontier.iter().rposition(|p| p.fits(budget, confidence)) else { continue };
        let (lo, Some(hi)) = (&frontier[at], frontier.get(at + 1)) else { continue };
        if budget - lo.flops_bound(confidence) <= max_gap {
            continue;
        }
        let mid = (
            (lo.channel_threshold + hi.channel_threshold) / 2.0,
            (lo.block_threshold + hi.block_threshold) / 2.0,
        );
        if !pairs.contains(&mid) {
            pairs.push(mid);
        }
    }
    pairs
}

/// The standard error of a mean from `n` values' sum and sum of squares (sample variance;
/// 0 for fewer than two values, and never negative from rounding).
fn standard_error(sum: f64, squares: f64, n: usize) -> f64 {
    if n < 2 {
        return 0.0;
    }
    let n = n as f64;
    let variance = ((squares - sum * sum / n) / (n - 1.0)).max(0.0);
    (variance / n).sqrt()
}

fn argmax(logits: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(logits.argmax(1, false)).unwrap_or_default()
}

fn confidence(logits: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(logits.softmax(1, Kind::Float).amax(&[1i64][..], false)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(c: f32, b: f32, acc: f64, flops: f64) -> OperatingPoint {
        OperatingPoint {
            channel_threshold: c,
            block_threshold: b,
            exit_threshold: 1.0,
            validation_accuracy: acc,
            flop_fraction: flops,
            flop_fraction_stderr: 0.0,
        }
    }

    #[test]
    fn exit_ladder_descends_from_off_through_every_hundredth_above_0_8() {
        let ladder = exit_ladder();
        assert_eq!(ladder[0], 1.0, "the first exit threshold turns exits off");
        assert!(ladder.windows(2).all(|w| w[0] > w[1]), "strictly descending: {ladder:?}");
        for h in 80..=99 {
            let t = h as f32 / 100.0;
            assert!(ladder.iter().any(|&e| (e - t).abs() < 1e-6), "{t} missing from {ladder:?}");
        }
        assert_eq!(ladder.last(), Some(&0.5));
    }

    #[test]
    fn standard_error_of_a_mean_from_its_sums() {
        // 0.2, 0.4, 0.6: sample variance 0.04, so the standard error is sqrt(0.04 / 3).
        let (sum, squares) = (1.2, 0.04 + 0.16 + 0.36);
        assert!((standard_error(sum, squares, 3) - (0.04f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(standard_error(0.5, 0.25, 1), 0.0);
        assert_eq!(standard_error(1.5, 0.75, 3), 0.0, "three equal values, rounding kept at 0");
    }

    #[test]
    fn budgets_far_above_their_point_get_the_pair_halfway_to_the_next() {
        let front =
            vec![point(0.8, 0.0, 0.90, 0.35), point(0.4, 0.2, 0.92, 0.53), point(0.0, 0.0, 0.93, 1.0)];
        // 0.40, 0.45 and 0.50 all sit on the 0.35 point: one pair between it and 0.53. 0.55
        // is within 0.03 of 0.53; 0.60 … 0.95 fall between 0.53 and dense.
        let pairs = gap_pairs(&front, &[0.4, 0.45, 0.5, 0.55, 0.6, 1.0], 0.0, 0.03);
        assert_eq!(pairs, vec![(0.6, 0.1), (0.2, 0.1)]);
        assert!(gap_pairs(&front, &[0.36, 0.54], 0.0, 0.03).is_empty());
        // Below the cheapest point there is nothing to bisect towards from.
        assert!(gap_pairs(&front, &[0.2], 0.0, 0.03).is_empty());
        // At two standard errors the 0.53 point (0.53 + 2 x 0.02) does not fit 0.55, which
        // then sits 0.2 above the 0.35 point: the same pair as 0.40 ... 0.50.
        let wide = OperatingPoint { flop_fraction_stderr: 0.02, ..front[1].clone() };
        let wide = vec![front[0].clone(), wide, front[2].clone()];
        assert!(gap_pairs(&wide, &[0.55], 0.0, 0.03).is_empty());
        assert_eq!(gap_pairs(&wide, &[0.55], 2.0, 0.03), vec![(0.6, 0.1)]);
    }
}
