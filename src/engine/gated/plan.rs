//! Per-input decisions, made on the host from the gate MLP's scores before any gated work
//! runs, and their FLOP cost.

use crate::engine::gates::{
    BlockGateSlots, GateLayout, block_gate_id, channel_gate_id, exit_gate_id, round_up_width,
};
use crate::engine::policy::{ChannelMode, GatePolicy, passes};
use crate::engine::{ArchSpec, BlockKind};

/// What one block does for one input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Exec {
    /// The residual branch is not run.
    Skip,
    /// The residual branch runs on the pre-sliced width variant with this index.
    Slice(usize),
    /// The residual branch runs on exactly these channels (sorted, one set per inner width),
    /// with batch-norm statistics of the width variants `stats` (one per set).
    Select { sets: Vec<Vec<i64>>, stats: Vec<usize> },
}

/// A policy resolved against one model: a threshold for every gate.
#[derive(Clone, Debug)]
pub struct Thresholds {
    pub channel: Vec<f32>,
    pub block: Vec<f32>,
    /// Per exit, in the layout's order.
    pub exit: Vec<f32>,
    pub mode: ChannelMode,
}

impl Thresholds {
    pub fn resolve(policy: &GatePolicy, spec: &ArchSpec, layout: &GateLayout) -> Self {
        if policy.overrides.is_empty() {
            // The common case, once per batch: no gate ids to look up.
            let n = layout.blocks.len();
            return Thresholds {
                channel: vec![policy.channel_threshold; n],
                block: vec![policy.block_threshold; n],
                exit: vec![policy.exit_threshold; layout.exits.len()],
                mode: policy.channel_mode,
            };
        }
        let blocks = spec.block_specs();
        Thresholds {
            channel: blocks
                .iter()
                .map(|b| policy.threshold(&channel_gate_id(b), policy.channel_threshold))
                .collect(),
            block: blocks
                .iter()
                .map(|b| policy.threshold(&block_gate_id(b), policy.block_threshold))
                .collect(),
            exit: layout
                .exits
                .iter()
                .map(|&s| policy.threshold(&exit_gate_id(s), policy.exit_threshold))
                .collect(),
            mode: policy.channel_mode,
        }
    }
}

/// `select` mode keeps channel counts in multiples of this (SIMD-friendly convolutions).
const SELECT_GRANULE: usize = 8;

/// Decides one block for one input from its row of gate scores (sigmoid outputs).
pub fn decide(
    slots: &BlockGateSlots,
    kind: BlockKind,
    scores: &[f32],
    channel_t: f32,
    block_t: f32,
    mode: ChannelMode,
) -> Exec {
    if let Some(j) = slots.block
        && !passes(scores[j], block_t)
    {
        return Exec::Skip;
    }
    let full = slots.widths.len() - 1;
    let Some(range) = &slots.channel else {
        return Exec::Slice(full);
    };
    let saliency = &scores[range.clone()];
    let groups = match kind {
        BlockKind::Basic => 1,
        BlockKind::Bottleneck => 2,
    };
    let inner = saliency.len() / groups;
    let min = slots.widths[0];
    match mode {
        ChannelMode::Slice => {
            let width = (0..groups)
                .map(|g| {
                    let kept = saliency[g * inner..(g + 1) * inner]
                        .iter()
                        .filter(|&&s| passes(s, channel_t))
                        .count();
                    round_up_width(kept as i64, &slots.widths)
                })
                .max()
                .unwrap_or(min);
            Exec::Slice(slots.widths.iter().position(|&w| w == width).unwrap_or(full))
        }
        ChannelMode::Select => {
            let sets: Vec<Vec<i64>> = (0..groups)
                .map(|g| kept_set(&saliency[g * inner..(g + 1) * inner], channel_t, min as usize))
                .collect();
            if sets.iter().all(|s| s.len() == inner) {
                return Exec::Slice(full);
            }
            let stats = sets
                .iter()
                .map(|s| {
                    let w = round_up_width(s.len() as i64, &slots.widths);
                    slots.widths.iter().position(|&x| x == w).unwrap_or(full)
                })
                .collect();
            Exec::Select { sets, stats }
        }
    }
}

/// The channels whose saliency passes `t`, their count rounded up to a multiple of 8 (and to
/// at least `min`) by adding the most salient of the others; sorted. Every passing channel
/// is more salient than every other, so this is the top-k set for the rounded k.
fn kept_set(saliency: &[f32], t: f32, min: usize) -> Vec<i64> {
    let passing = saliency.iter().filter(|&&s| passes(s, t)).count();
    let k = passing.next_multiple_of(SELECT_GRANULE).max(min).min(saliency.len());
    let mut order: Vec<usize> = (0..saliency.len()).collect();
    order.sort_by(|&a, &b| saliency[b].total_cmp(&saliency[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = order[..k].iter().map(|&c| c as i64).collect();
    kept.sort_unstable();
    kept
}

/// The inner widths an execution runs at (for reports and FLOPs).
pub fn exec_widths(exec: &Exec, slots: &BlockGateSlots, kind: BlockKind) -> Vec<i64> {
    let groups = match kind {
        BlockKind::Basic => 1,
        BlockKind::Bottleneck => 2,
    };
    match exec {
        Exec::Skip => Vec::new(),
        Exec::Slice(v) => vec![slots.widths[*v]; groups],
        Exec::Select { sets, .. } => sets.iter().map(|s| s.len() as i64).collect(),
    }
}
