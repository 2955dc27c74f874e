//! The runtime calibration table: it maps a compute budget (fraction of dense FLOPs) to the
//! thresholds with the best validation accuracy whose mean executed FLOPs stay within it,
//! with a margin of a few standard errors so that they stay within it on images the
//! validation split did not hold ([`OperatingPoint::fits`]).
//! Stored beside the weights as `calibration.json`; the offline sweep that measures it is
//! `train::calibrate`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::{ChannelMode, GatePolicy};

/// File name of the table in a model folder.
pub const CALIBRATION_FILE: &str = "calibration.json";

/// One operating point: thresholds and what they measured on the validation split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    pub channel_threshold: f32,
    pub block_threshold: f32,
    pub exit_threshold: f32,
    pub validation_accuracy: f64,
    /// Mean executed FLOPs / dense FLOPs (gate heads included).
    pub flop_fraction: f64,
    /// Standard error of `flop_fraction` (the per-image fractions' standard deviation ÷
    /// √images): how far the mean may move on other images of the same distribution. 0 in
    /// tables written before it was measured.
    #[serde(default)]
    pub flop_fraction_stderr: f64,
}

impl OperatingPoint {
    /// Whether the point's mean FLOP fraction, plus `confidence` standard errors, is within
    /// `budget`: with 2, a budget holds on unseen images of the validation split's
    /// distribution with ~98% confidence, not just on the split itself (docs/decisions.md).
    pub fn fits(&self, budget: f64, confidence: f64) -> bool {
        self.flops_bound(confidence) <= budget
    }

    /// The mean FLOP fraction plus `confidence` standard errors.
    pub fn flops_bound(&self, confidence: f64) -> f64 {
        self.flop_fraction + confidence * self.flop_fraction_stderr
    }
}

/// A budget and the operating point chosen for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BudgetEntry {
    pub budget: f64,
    #[serde(flatten)]
    pub point: OperatingPoint,
    /// Median batch-1 latency of the point ÷ the dense network's, per validation image,
    /// where `sluice calibrate` timed it (`--latency-images`); absent in tables built on
    /// FLOPs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ratio: Option<f64>,
}

/// The calibration table of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationTable {
    pub model: String,
    /// Which data it was measured on (always the validation split).
    pub split: String,
    pub images: usize,
    pub channel_mode: ChannelMode,
    /// How many standard errors of its FLOP fraction each budget's point keeps below the
    /// budget (`sluice calibrate --flops-confidence`); 0 in tables built on the mean alone.
    #[serde(default)]
    pub flops_confidence: f64,
    /// Ascending budgets.
    pub budgets: Vec<BudgetEntry>,
    /// Every point of the accuracy/FLOPs frontier the sweep found, ascending FLOPs.
    pub frontier: Vec<OperatingPoint>,
}

/// Why a budget cannot be served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BudgetError {
    #[error("budget {budget} is outside the calibrated range [{min}, {max}]")]
    OutOfRange { budget: f64, min: f64, max: f64 },
    #[error("this model has no calibration table")]
    NotCalibrated,
}

impl CalibrationTable {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }

    /// The smallest and largest calibrated budgets.
    pub fn range(&self) -> Option<(f64, f64)> {
        Some((self.budgets.first()?.budget, self.budgets.last()?.budget))
    }

    /// The entry for `budget`: the largest calibrated budget not above it (so the measured
    /// FLOPs stay within the request). Budgets above the table's top use the top entry.
    pub fn lookup(&self, budget: f64) -> Result<&BudgetEntry, BudgetError> {
        let (min, max) = self.range().ok_or(BudgetError::NotCalibrated)?;
        if !(budget.is_finite() && budget >= min - 1e-9 && budget <= 1.0) {
            return Err(BudgetError::OutOfRange { budget, min, max: max.max(1.0) });
        }
        Ok(self.budgets.iter().rev().find(|e| e.budget <= budget + 1e-9).unwrap_or(&self.budgets[0]))
    }

    /// The policy that serves `budget` (version left at 0 for the caller to assign).
    /// Budget 1.0 is the dense network whatever the table found cheaper at equal accuracy
    /// (DESIGN.md): a client that asks for full compute gets it.
    pub fn policy_for(&self, budget: f64) -> Result<GatePolicy, BudgetError> {
        let e = &self.lookup(budget)?.point;
        if budget >= 1.0 {
            return Ok(GatePolicy {
                channel_mode: self.channel_mode,
                budget: Some(budget),
                ..GatePolicy::dense()
            });
        }
        Ok(GatePolicy {
            channel_threshold: e.channel_threshold,
            block_threshold: e.block_threshold,
            exit_threshold: e.exit_threshold,
            channel_mode: self.channel_mode,
            budget: Some(budget),
            ..GatePolicy::dense()
        })
    }
}

/// The points no other point beats on both accuracy and FLOPs, ascending FLOPs.
pub fn frontier(points: &[OperatingPoint]) -> Vec<OperatingPoint> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| {
        a.flop_fraction
            .total_cmp(&b.flop_fraction)
            .then(b.validation_accuracy.total_cmp(&a.validation_accuracy))
    });
    let mut out: Vec<OperatingPoint> = Vec::new();
    for p in sorted {
        if out.last().is_none_or(|best| p.validation_accuracy > best.validation_accuracy) {
            out.push(p);
        }
    }
    out
}

/// For each budget, the most accurate point that fits it at `confidence` standard errors
/// ([`OperatingPoint::fits`]); budgets no point fits are left out (the table's range says
/// what is calibrated). Budget 1.0 is the dense network, `dense` (../shared/DESIGN.md), even
/// where a cheaper point measured as accurate on the validation split.
pub fn budget_table(
    frontier: &[OperatingPoint],
    budgets: &[f64],
    dense: &OperatingPoint,
    confidence: f64,
) -> Vec<BudgetEntry> {
    budgets
        .iter()
        .filter_map(|&budget| {
            if budget >= 1.0 {
                return Some(BudgetEntry { budget, point: dense.clone(), latency_ratio: None });
            }
            frontier
                .iter()
                .filter(|p| p.fits(budget, confidence))
                .max_by(|a, b| a.validation_accuracy.total_cmp(&b.validation_accuracy))
                .map(|p| BudgetEntry { budget, point: p.clone(), latency_ratio: None })
        })
        .collect()
}

/// The points `budget` may choose among when time is weighed too: every point of `points`
/// (all swept points, not just the frontier: a point that exits early can be a little less
/// accurate than a channel-only one of fewer FLOPs and still be faster) that fits the budget
/// at `confidence` standard errors and whose validation accuracy is at most `margin` below
/// the best such point; most accurate first (ties: fewer FLOPs first), distinct thresholds,
/// at most `max`.
pub fn near_best(
    points: &[OperatingPoint],
    budget: f64,
    confidence: f64,
    margin: f64,
    max: usize,
) -> Vec<OperatingPoint> {
    let mut within: Vec<&OperatingPoint> = points.iter().filter(|p| p.fits(budget, confidence)).collect();
    within.sort_by(|a, b| {
        b.validation_accuracy
            .total_cmp(&a.validation_accuracy)
            .then(a.flop_fraction.total_cmp(&b.flop_fraction))
    });
    let Some(best) = within.first().map(|p| p.validation_accuracy) else { return Vec::new() };
    let mut out: Vec<OperatingPoint> = Vec::new();
    for p in within.into_iter().take_while(|p| p.validation_accuracy >= best - margin - 1e-12) {
        if out.len() == max {
            break;
        }
        if !out.iter().any(|q| same_thresholds(p, q)) {
            out.push(p.clone());
        }
    }
    out
}

/// Whether two points run the same policy.
pub fn same_thresholds(a: &OperatingPoint, b: &OperatingPoint) -> bool {
    a.channel_threshold == b.channel_threshold
        && a.block_threshold == b.block_threshold
        && a.exit_threshold == b.exit_threshold
}

/// Of `timed` candidates (point, measured latency ÷ dense; most accurate first, as
/// [`near_best`] returns them), the most accurate one whose latency is within `slack` (a
/// fraction) of the fastest's: a faster point is taken only when it is faster by more than
/// timing noise, and never over one that is as fast and more accurate.
pub fn fastest_of(timed: &[(OperatingPoint, f64)], slack: f64) -> Option<(OperatingPoint, f64)> {
    let fastest = timed.iter().map(|(_, r)| *r).min_by(f64::total_cmp)?;
    timed
        .iter()
        .filter(|(_, r)| *r <= fastest * (1.0 + slack))
        .max_by(|(a, _), (b, _)| {
            a.validation_accuracy
                .total_cmp(&b.validation_accuracy)
                .then(b.flop_fraction.total_cmp(&a.flop_fraction))
        })
        .cloned()
}

/// The dense network's point among a sweep's (every gate at threshold 0, exits off).
pub fn dense_point(points: &[OperatingPoint]) -> Option<&OperatingPoint> {
    points.iter().find(|p| p.channel_threshold <= 0.0 && p.block_threshold <= 0.0 && p.exit_threshold >= 1.0)
}

/// The budgets a table is built for: 0.10, 0.15, …, 1.00.
pub fn default_budgets() -> Vec<f64> {
    (2..=20).map(|i| f64::from(i) / 20.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(acc: f64, fraction: f64) -> OperatingPoint {
        OperatingPoint {
            channel_threshold: fraction as f32,
            block_threshold: 0.0,
            exit_threshold: 1.0,
            validation_accuracy: acc,
            flop_fraction: fraction,
            flop_fraction_stderr: 0.0,
        }
    }

    #[test]
    fn frontier_and_budgets_pick_the_best_point_within_each_budget() {
        let points =
            vec![point(0.90, 0.3), point(0.85, 0.35), point(0.93, 0.6), point(0.92, 0.5), point(0.94, 1.01)];
        let f = frontier(&points);
        assert_eq!(f.iter().map(|p| p.flop_fraction).collect::<Vec<_>>(), vec![0.3, 0.5, 0.6, 1.01]);
        let dense = OperatingPoint { channel_threshold: 0.0, ..point(0.925, 1.0) };
        let mut all = points.clone();
        all.push(dense.clone());
        assert_eq!(dense_point(&all), Some(&dense));
        assert_eq!(dense_point(&points), None);
        let table = budget_table(&f, &[0.25, 0.3, 0.55, 0.95, 1.0], &dense, 2.0);
        assert_eq!(table.len(), 4, "0.25 fits no point");
        assert_eq!(table[1].point.flop_fraction, 0.5);
        assert_eq!(table[2].point.validation_accuracy, 0.93, "0.95: the more accurate 0.6 point");
        assert_eq!(table[3].point, dense, "1.0 is dense, though 0.6 measured more accurate");
        let t = CalibrationTable {
            model: "m".into(),
            split: "validation".into(),
            images: 10,
            channel_mode: ChannelMode::Slice,
            flops_confidence: 2.0,
            budgets: table,
            frontier: f,
        };
        assert_eq!(t.lookup(0.57).unwrap().budget, 0.55);
        assert_eq!(t.lookup(0.2), Err(BudgetError::OutOfRange { budget: 0.2, min: 0.3, max: 1.0 }));
        assert!(t.lookup(1.5).is_err());
        assert_eq!(t.policy_for(0.3).unwrap().budget, Some(0.3));
        assert_eq!(t.policy_for(0.99).unwrap().channel_threshold, 0.6, "the 0.95 entry");
        // Budget 1.0 serves the dense policy itself.
        let full = t.policy_for(1.0).unwrap();
        assert_eq!(full, GatePolicy { budget: Some(1.0), ..GatePolicy::dense() });
    }

    #[test]
    fn a_budget_keeps_its_points_standard_errors_below_it() {
        let edge = OperatingPoint { flop_fraction_stderr: 0.002, ..point(0.935, 0.4996) };
        let inside = OperatingPoint { flop_fraction_stderr: 0.002, ..point(0.934, 0.49) };
        assert!(edge.fits(0.5, 0.0) && !edge.fits(0.5, 2.0));
        assert!(inside.fits(0.5, 2.0) && !inside.fits(0.5, 5.1));
        let dense = OperatingPoint { channel_threshold: 0.0, ..point(0.94, 1.0) };
        let f = frontier(&[inside.clone(), edge.clone(), dense.clone()]);
        let pick = |confidence| budget_table(&f, &[0.5], &dense, confidence)[0].point.clone();
        assert_eq!(pick(0.0), edge, "on the mean alone: the point at the edge");
        assert_eq!(pick(2.0), inside, "two standard errors: the point with room");
        assert_eq!(near_best(&[inside.clone(), edge], 0.5, 2.0, 0.01, 10), vec![inside]);
        // Tables written before the field existed read as exact means.
        let old: OperatingPoint = serde_json::from_str(
            r#"{"channel_threshold":0.5,"block_threshold":0,"exit_threshold":1,"validation_accuracy":0.9,"flop_fraction":0.5}"#,
        )
        .unwrap();
        assert_eq!(old.flop_fraction_stderr, 0.0);
    }

    #[test]
    fn near_best_keeps_points_within_the_margin_most_accurate_first() {
        let exits =
            |acc: f64, fraction: f64, e: f32| OperatingPoint { exit_threshold: e, ..point(acc, fraction) };
        let points = vec![
            point(0.930, 0.45),
            exits(0.928, 0.48, 0.9),
            exits(0.929, 0.47, 0.95),
            exits(0.925, 0.40, 0.8),
            point(0.940, 0.55), // over the budget
            point(0.930, 0.45), // the same thresholds again (a refined sweep)
        ];
        let near = near_best(&points, 0.5, 0.0, 0.002, 10);
        let acc: Vec<f64> = near.iter().map(|p| p.validation_accuracy).collect();
        assert_eq!(
            acc,
            vec![0.930, 0.929, 0.928],
            "0.925 is 0.5 pt below; 0.94 is over budget; no duplicate"
        );
        assert_eq!(near_best(&points, 0.5, 0.0, 0.002, 2).len(), 2);
        assert_eq!(near_best(&points, 0.5, 0.0, 0.0, 10).len(), 1, "margin 0: the FLOPs-only choice");
        assert!(near_best(&points, 0.3, 0.0, 0.01, 10).is_empty(), "no point fits 0.3");
    }

    #[test]
    fn fastest_of_takes_a_faster_point_only_beyond_the_slack() {
        let a = point(0.930, 0.45);
        let b = OperatingPoint { exit_threshold: 0.9, ..point(0.928, 0.48) };
        let c = OperatingPoint { exit_threshold: 0.95, ..point(0.929, 0.47) };
        // b is clearly faster: chosen over the more accurate a.
        assert_eq!(fastest_of(&[(a.clone(), 0.80), (b.clone(), 0.55)], 0.03).unwrap().0, b);
        // c is within 3% of the fastest b and more accurate: c.
        assert_eq!(
            fastest_of(&[(a.clone(), 0.80), (c.clone(), 0.56), (b.clone(), 0.55)], 0.03).unwrap(),
            (c, 0.56)
        );
        // Within noise of each other: the most accurate stays.
        assert_eq!(fastest_of(&[(a.clone(), 0.80), (b, 0.79)], 0.03).unwrap().0, a);
        assert!(fastest_of(&[], 0.03).is_none());
    }
}
