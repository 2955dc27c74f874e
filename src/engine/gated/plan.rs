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

/// `select` gathers its weights on every call (and oneDNN reorders them), a cost that grows
/// with the channels it keeps, while what it saves grows with them and with the output
/// positions each weight is applied to. Measured per ResNet-50 stage on the 2-core dev VM
/// (fused dense block, before Winograd, vs select at kept fractions 1/4…7/8, batch 1 and 8;
/// docs/decisions.md), select was faster up to about `positions / 400` of the channels,
/// never above ~3/4:
/// 56×56 and 28×28 up to 3/4, 14×14 up to 1/2, 7×7 (ResNet-50's last stage at 224×224)
/// not even at 1/4.
///
/// Its gathers, masks and unfused operators also cost a fixed ~50 µs or so per block, more
/// than a small block saves: ResNet-20's blocks at 28×28 (3.6 MFLOPs each) ran 0.64–0.77×
/// dense in select mode at every budget, batch 1 and 32, where slice mode broke even or won.
/// Below `SELECT_MIN_FLOPS` of dense work per input a block never selects.
///
/// Above `SELECT_WIDE_POSITIONS` the limit is `SELECT_WIDE_MAX_FRACTION`: once the dense
/// blocks ran on sluice's own packed primitives with Winograd, ResNet-50's 56×56 blocks in
/// select mode ran 1.01–1.43× their dense time at batch 8 with ~60% of their inner channels
/// (their 1×1 convolutions over 256 channels are bound by memory traffic, which a narrower
/// inner width barely reduces). Capping them at 1/4 took select at 75% FLOPs from 0.89–0.97×
/// dense to 0.92–1.01× and kept the lowest reachable FLOPs (never selecting there: 0.98–1.08×,
/// but select could no longer go below ~53% of dense FLOPs); docs/benchmarks.md, "select at
/// batch 8 and 75% FLOPs profiled". 28×28 (784 positions) still pays up to 3/4.
const SELECT_POSITIONS_PER_FRACTION: f64 = 400.0;
const SELECT_MAX_FRACTION: f64 = 0.75;
const SELECT_MIN_FLOPS: u64 = 20_000_000;
const SELECT_WIDE_POSITIONS: i64 = 1600;
const SELECT_WIDE_MAX_FRACTION: f64 = 0.25;

/// The largest fraction of a block's inner channels that `select` keeps before the block
/// runs at full width instead, for one input whose block output has `positions` (H × W)
/// positions and whose full-width residual branch costs `dense_flops`. Per input, never
/// per batch: an input's result must not depend on what it is batched with.
pub fn select_limit(positions: i64, dense_flops: u64) -> f64 {
    if dense_flops < SELECT_MIN_FLOPS {
        return 0.0;
    }
    if positions > SELECT_WIDE_POSITIONS {
        return SELECT_WIDE_MAX_FRACTION;
    }
    (positions as f64 / SELECT_POSITIONS_PER_FRACTION).min(SELECT_MAX_FRACTION)
}

/// Decides one block for one input from its row of gate scores (sigmoid outputs).
/// `select_limit`: see [`select_limit`]; a `select` set larger than that fraction of the
/// inner width runs the full-width block (exact, and faster there), counted as such.
pub fn decide(
    slots: &BlockGateSlots,
    kind: BlockKind,
    scores: &[f32],
    channel_t: f32,
    block_t: f32,
    mode: ChannelMode,
    select_limit: f64,
) -> Exec {
    // A threshold of 0 (or below) passes every score: such a gate reads none, and its
    // scores may not have been computed (the dense policy skips the gate MLP).
    if let Some(j) = slots.block
        && block_t > 0.0
        && !passes(scores[j], block_t)
    {
        return Exec::Skip;
    }
    let full = slots.widths.len() - 1;
    let Some(range) = &slots.channel else {
        return Exec::Slice(full);
    };
    if channel_t <= 0.0 {
        return Exec::Slice(full);
    }
    if mode == ChannelMode::Select && select_limit <= 0.0 {
        return Exec::Slice(full); // whatever the scores say (they may not even be computed)
    }
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
            let too_many = |s: &Vec<i64>| s.len() as f64 > select_limit * inner as f64;
            if sets.iter().all(|s| s.len() == inner) || sets.iter().any(too_many) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A Basic block with 32 inner channels, a channel gate and widths 8/16/24/32.
    fn slots() -> BlockGateSlots {
        BlockGateSlots { channel: Some(0..32), block: None, widths: vec![8, 16, 24, 32] }
    }

    /// Scores keeping the first `kept` of 32 channels at threshold 0.5.
    fn scores(kept: usize) -> Vec<f32> {
        (0..32).map(|c| if c < kept { 0.9 } else { 0.1 }).collect()
    }

    #[test]
    fn select_runs_where_it_pays_and_the_full_block_where_it_does_not() {
        let select = |kept, limit| {
            decide(&slots(), BlockKind::Basic, &scores(kept), 0.5, 0.0, ChannelMode::Select, limit)
        };
        // 16 of 32 kept (a multiple of 8 already): selected when half the channels may be.
        assert_eq!(select(16, 0.5), Exec::Select { sets: vec![(0..16).collect()], stats: vec![1] });
        // 24 of 32 is more than half: the full-width block, exactly as when every channel passes.
        assert_eq!(select(24, 0.5), Exec::Slice(3));
        assert_eq!(select(32, 0.75), Exec::Slice(3));
        // Slice mode is not affected by the limit.
        let slice = decide(&slots(), BlockKind::Basic, &scores(24), 0.5, 0.0, ChannelMode::Slice, 0.0);
        assert_eq!(slice, Exec::Slice(2));
    }

    #[test]
    fn the_select_limit_grows_with_positions_up_to_three_quarters_then_drops_at_56x56() {
        // ResNet-50 at 224x224: stages of 56x56, 28x28, 14x14 and 7x7 positions.
        let big = 200_000_000;
        let [s1, s2, s3, s4] = [56 * 56, 28 * 28, 14 * 14, 7 * 7].map(|p| select_limit(p, big));
        assert_eq!(s1, 0.25, "56x56 blocks lost to full width at ~60% of their channels");
        assert_eq!(s2, 0.75);
        assert_eq!(select_limit(40 * 40, big), 0.75);
        assert_eq!(select_limit(40 * 40 + 1, big), 0.25);
        assert_eq!(select_limit(56 * 56, 3_600_000), 0.0, "small blocks never select, wide or not");
        assert!((0.45..0.55).contains(&s3), "{s3}");
        assert!(s4 < 0.25, "{s4}: select lost to the full block at every fraction there");
        assert!(
            select_limit(1, big) < select_limit(100, big) && select_limit(100, big) < select_limit(300, big)
        );
        // A ResNet-20 block at 28x28 (3.6 MFLOPs): never worth selecting.
        assert_eq!(select_limit(28 * 28, 3_600_000), 0.0);
    }
}
