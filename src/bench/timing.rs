//! Interleaved A/B timing: every round runs every variant once, rotating the order, so slow
//! drifts of this shared machine hit all variants alike. Ratios are medians of per-round
//! ratios. Fast calls are repeated within a sample (at least 10 ms per sample).

use std::time::Instant;

use tch::Tensor;

use crate::engine::{GatePolicy, Model};

/// Median milliseconds of each variant and the median per-round ratio `base / variant`.
#[derive(Clone, Debug)]
pub struct Timing {
    pub median_ms: Vec<f64>,
    /// `speedup[i]` = median over rounds of time(base) / time(i); 1 for the base itself.
    pub speedup: Vec<f64>,
}

/// Shortest timed sample: faster calls are repeated within a sample and averaged, so the
/// clock's resolution and one-off hiccups do not dominate sub-millisecond forwards.
const MIN_SAMPLE_MS: f64 = 10.0;

/// Times `variants` (index 0 is the base) over `rounds` rounds after `warmup` rounds.
pub fn interleaved(variants: &mut [&mut dyn FnMut()], rounds: usize, warmup: usize) -> Timing {
    let k = variants.len();
    for _ in 0..warmup {
        variants.iter_mut().for_each(|f| f());
    }
    let probe = Instant::now();
    (variants[0])();
    let probe_ms = probe.elapsed().as_secs_f64() * 1e3;
    let reps = (MIN_SAMPLE_MS / probe_ms.max(1e-3)).ceil().clamp(1.0, 1000.0) as usize;
    let mut times = vec![Vec::with_capacity(rounds); k];
    for r in 0..rounds.max(1) {
        for j in 0..k {
            let i = (j + r) % k;
            let start = Instant::now();
            for _ in 0..reps {
                (variants[i])();
            }
            times[i].push(start.elapsed().as_secs_f64() * 1e3 / reps as f64);
        }
    }
    summarize(&times)
}

/// Medians of per-variant sample times (ms, one sample per round each) and of the per-round
/// ratios to variant 0.
pub fn summarize(times: &[Vec<f64>]) -> Timing {
    let speedup = times
        .iter()
        .map(|t| median(&times[0].iter().zip(t).map(|(b, v)| b / v).collect::<Vec<_>>()))
        .collect();
    Timing { median_ms: times.iter().map(|t| median(t)).collect(), speedup }
}

/// Per policy: the median batch-1 latency (ms) over `inputs` (one image each) and the median
/// per-image ratio to the first policy's time on the same image. Every policy runs on each
/// image, in an order that rotates from image to image, so drifts of a shared machine hit
/// them alike; the first five images are run once first as warm-up.
pub fn batch1_latencies(model: &Model, inputs: &[Tensor], policies: &[GatePolicy]) -> Vec<(f64, f64)> {
    let k = policies.len();
    if inputs.is_empty() || k == 0 {
        return Vec::new();
    }
    let _guard = tch::no_grad_guard();
    for x in inputs.iter().take(5) {
        policies.iter().for_each(|p| drop(model.net.forward(x, p)));
    }
    let mut times = vec![Vec::with_capacity(inputs.len()); k];
    for (i, x) in inputs.iter().enumerate() {
        for j in 0..k {
            let p = (i + j) % k;
            let start = Instant::now();
            let _ = model.net.forward(x, &policies[p]);
            times[p].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times
        .iter()
        .map(|t| {
            let ratios: Vec<f64> = t.iter().zip(&times[0]).map(|(a, d)| a / d).collect();
            (median(t), median(&ratios))
        })
        .collect()
}

/// Median of a non-empty slice (0 for an empty one).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        // Round 2 was slow for everyone (a drift): per-round ratios ignore it.
        let t = summarize(&[vec![4.0, 4.0, 40.0], vec![1.0, 2.0, 10.0]]);
        assert_eq!(t.median_ms, vec![4.0, 2.0]);
        assert_eq!(t.speedup, vec![1.0, 4.0]);
    }
}
