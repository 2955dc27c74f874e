//! What the engine did for each input: FLOPs executed versus dense, and the decisions taken.

use serde::Serialize;

/// What happened to one residual block for one input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum BlockDecision {
    /// The residual branch ran at these inner widths (one for Basic, two for Bottleneck).
    Run { widths: Vec<i64> },
    /// The block gate skipped the residual branch (the shortcut still ran, if a projection).
    Skipped,
    /// The input left at an earlier exit.
    NotReached,
}

/// Per-input compute accounting. FLOPs = 2 × MACs of executed convolutions and linear
/// layers (gate and exit heads included), at the shapes they actually ran.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ComputeReport {
    /// FLOPs of the dense network for this input's size.
    pub dense_flops: u64,
    /// FLOPs actually executed, gate heads included.
    pub executed_flops: u64,
    /// The part of `executed_flops` spent in gate and exit heads.
    pub gate_flops: u64,
    /// One entry per residual block, in order.
    pub blocks: Vec<BlockDecision>,
    /// The exit taken (its stage, 1-based), if the input left early.
    pub exit: Option<usize>,
}

impl ComputeReport {
    /// Executed FLOPs as a fraction of dense.
    pub fn flop_fraction(&self) -> f64 {
        self.executed_flops as f64 / self.dense_flops.max(1) as f64
    }

    /// FLOPs the gates saved (never negative; gate heads can make a fully dense run cost
    /// slightly more than dense).
    pub fn skipped_flops(&self) -> u64 {
        self.dense_flops.saturating_sub(self.executed_flops)
    }
}

/// Sums over a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BatchTotals {
    pub inputs: usize,
    pub dense_flops: u64,
    pub executed_flops: u64,
    pub gate_flops: u64,
    pub exited: usize,
}

impl BatchTotals {
    pub fn of(reports: &[ComputeReport]) -> Self {
        reports.iter().fold(BatchTotals::default(), |t, r| BatchTotals {
            inputs: t.inputs + 1,
            dense_flops: t.dense_flops + r.dense_flops,
            executed_flops: t.executed_flops + r.executed_flops,
            gate_flops: t.gate_flops + r.gate_flops,
            exited: t.exited + usize::from(r.exit.is_some()),
        })
    }

    pub fn flop_fraction(&self) -> f64 {
        self.executed_flops as f64 / self.dense_flops.max(1) as f64
    }
}
