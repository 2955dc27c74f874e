//! Interleaved A/B timing: every round runs every variant once, rotating the order, so slow
//! drifts of this shared machine hit all variants alike. Ratios are medians of per-round
//! ratios.

use std::time::Instant;

/// Median milliseconds of each variant and the median per-round ratio `base / variant`.
#[derive(Clone, Debug)]
pub struct Timing {
    pub median_ms: Vec<f64>,
    /// `speedup[i]` = median over rounds of time(base) / time(i); 1 for the base itself.
    pub speedup: Vec<f64>,
}

/// Times `variants` (index 0 is the base) over `rounds` rounds after `warmup` rounds.
pub fn interleaved(variants: &mut [&mut dyn FnMut()], rounds: usize, warmup: usize) -> Timing {
    let k = variants.len();
    for _ in 0..warmup {
        variants.iter_mut().for_each(|f| f());
    }
    let mut times = vec![Vec::with_capacity(rounds); k];
    for r in 0..rounds.max(1) {
        for j in 0..k {
            let i = (j + r) % k;
            let start = Instant::now();
            (variants[i])();
            times[i].push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let speedup = (0..k)
        .map(|i| median(&times[0].iter().zip(&times[i]).map(|(b, v)| b / v).collect::<Vec<_>>()))
        .collect();
    Timing { median_ms: times.iter().map(|t| median(t)).collect(), speedup }
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
        let mut slow = || std::thread::sleep(std::time::Duration::from_millis(4));
        let mut fast = || std::thread::sleep(std::time::Duration::from_millis(1));
        let t = interleaved(&mut [&mut slow, &mut fast], 5, 1);
        assert!(t.speedup[1] > 1.5, "{t:?}");
        assert_eq!(t.speedup[0], 1.0);
    }
}
