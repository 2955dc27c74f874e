//! One gated residual block: pre-sliced width variants, the gathered (select) path, and
//! grouped execution of a batch whose inputs decided differently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Tensor;

use super::plan::Exec;
use crate::engine::arch::{BlockSpec, ConvShape};
use crate::engine::folded::{FoldedConv, Layout, fold_bn, residual};
use crate::engine::gates::{BlockGateParams, BlockGateSlots};
use crate::engine::params::{BN_EPS, BlockParams};

/// Weights for the select path: the full-width folded first conv (its rows are gathered)
/// and, for the later convs, raw weights plus a folded batch-norm per stats width.
#[derive(Debug)]
struct SelectWeights {
    /// Raw (unfolded) weights of conv2[, conv3], in the engine layout.
    raw: Vec<Tensor>,
    /// For conv2[, conv3]: per width variant, (scale, bias) of its batch-norm.
    bn: Vec<Vec<(Tensor, Tensor)>>,
    calls: AtomicU64,
}

/// A residual block with its gate slots and width variants.
#[derive(Debug)]
pub(super) struct GatedBlock {
    pub spec: BlockSpec,
    pub slots: BlockGateSlots,
    /// One residual branch per allowed width, ascending; the last is full width.
    variants: Vec<Vec<FoldedConv>>,
    downsample: Option<FoldedConv>,
    select: Option<SelectWeights>,
}

impl GatedBlock {
    pub fn build(
        params: &BlockParams,
        gate: &BlockGateParams,
        slots: &BlockGateSlots,
        layout: Layout,
    ) -> Self {
        // Statistics of the batch-norms after width-reduced sums, for variant `v`.
        let stats = |v: usize, j: usize| -> Option<(&Tensor, &Tensor)> {
            gate.slim_stats.get(v).map(|s| (&s[j - 1].running_mean, &s[j - 1].running_var))
        };
        let variants = slots
            .widths
            .iter()
            .enumerate()
            .map(|(v, &k)| {
                params
                    .layers
                    .iter()
                    .enumerate()
                    .map(|(j, layer)| {
                        let (w, b) = fold_bn(&layer.conv, &layer.bn, if j == 0 { None } else { stats(v, j) });
                        let last = j + 1 == params.layers.len();
                        // Outputs: inner width except the last conv; inputs: inner except the first.
                        let (w, b) = if last { (w, b) } else { (w.narrow(0, 0, k), b.narrow(0, 0, k)) };
                        let w = if j == 0 { w } else { w.narrow(1, 0, k) };
                        FoldedConv::new(&w, &b, layer.conv.shape.clone(), layout)
                    })
                    .collect()
            })
            .collect();
        let select = slots.channel.as_ref().map(|_| SelectWeights {
            raw: params.layers[1..].iter().map(|l| layout.apply(&l.conv.weight.detach())).collect(),
            bn: params.layers[1..]
                .iter()
                .enumerate()
                .map(|(j, layer)| {
                    (0..slots.widths.len())
                        .map(|v| {
                            let (mean, var) =
                                stats(v, j + 1).unwrap_or((&layer.bn.running_mean, &layer.bn.running_var));
                            let scale = &layer.bn.weight.detach() / (var + BN_EPS).sqrt();
                            let bias = &layer.bn.bias.detach() - mean * &scale;
                            (scale.view([-1, 1, 1, 1]), bias)
                        })
                        .collect()
                })
                .collect(),
            calls: AtomicU64::new(0),
        });
        GatedBlock {
            spec: params.spec.clone(),
            slots: slots.clone(),
            variants,
            downsample: params.downsample.as_ref().map(|d| FoldedConv::fold(d, layout)),
            select,
        }
    }

    pub fn residual_calls(&self) -> u64 {
        let sliced: u64 = self.variants.iter().flatten().map(FoldedConv::calls).sum();
        sliced + self.select.as_ref().map_or(0, |s| s.calls.load(Ordering::Relaxed))
    }

    fn shortcut(&self, x: &Tensor) -> Tensor {
        match &self.downsample {
            Some(ds) => ds.forward(x),
            None => x.shallow_clone(),
        }
    }

    /// The residual branch for one execution (not `Skip`).
    fn residual_for(&self, exec: &Exec, x: &Tensor, layout: Layout) -> Tensor {
        match exec {
            Exec::Slice(v) => residual(&self.variants[*v], x),
            Exec::Select { sets, stats } => self.residual_select(sets, stats, x, layout),
            Exec::Skip => unreachable!("skipped blocks have no residual"),
        }
    }

    /// Gathers exactly the kept channels' weights and runs the branch on them.
    fn residual_select(&self, sets: &[Vec<i64>], stats: &[usize], x: &Tensor, layout: Layout) -> Tensor {
        let Some(select) = &self.select else {
            return residual(&self.variants[self.variants.len() - 1], x);
        };
        let full = &self.variants[self.variants.len() - 1];
        let idx: Vec<Tensor> = sets.iter().map(|s| Tensor::from_slice(s)).collect();
        let conv = |x: &Tensor, w: &Tensor, b: &Tensor, shape: &ConvShape| {
            select.calls.fetch_add(1, Ordering::Relaxed);
            x.conv2d(w, Some(b), [shape.stride; 2], [shape.padding; 2], [1, 1], 1)
        };
        // conv1: the kept output rows of the folded full-width conv.
        let first = &full[0];
        let w1 = layout.gather(&first.weight, 0, &idx[0]);
        let mut h = conv(x, &w1, &first.bias.index_select(0, &idx[0]), &first.shape).relu_();
        let last = select.raw.len() - 1;
        for (j, raw) in select.raw.iter().enumerate() {
            let shape = &full[j + 1].shape;
            // Inputs: the previous conv's kept set; outputs: this conv's kept set (all, last).
            let mut w = layout.gather(raw, 1, &idx[j]);
            let (scale, bias) = &select.bn[j][stats[j]];
            let (scale, bias) = if j == last {
                (scale.shallow_clone(), bias.shallow_clone())
            } else {
                w = layout.gather(&w, 0, &idx[j + 1]);
                (scale.index_select(0, &idx[j + 1]), bias.index_select(0, &idx[j + 1]))
            };
            h = conv(&h, &(w * scale), &bias, shape);
            if j != last {
                h = h.relu_();
            }
        }
        h
    }

    /// Runs the block on a batch whose rows decided `execs` (one per row).
    pub fn run(&self, x: &Tensor, execs: &[&Exec], layout: Layout) -> Tensor {
        let first = execs[0];
        if execs.iter().all(|e| *e == first) {
            return match first {
                Exec::Skip => match &self.downsample {
                    Some(ds) => ds.forward(x).relu_(),
                    None => x.shallow_clone(),
                },
                exec => {
                    let mut out = self.residual_for(exec, x, layout);
                    let _ = out.g_add_(&self.shortcut(x));
                    out.relu_()
                }
            };
        }
        // Mixed decisions: group rows by execution, compute each group's residual on its
        // rows only, then add them into the shortcut in place.
        let mut groups: HashMap<&Exec, Vec<i64>> = HashMap::new();
        let mut order: Vec<&Exec> = Vec::new();
        for (row, exec) in execs.iter().enumerate() {
            if matches!(exec, Exec::Skip) {
                continue;
            }
            groups
                .entry(exec)
                .or_insert_with(|| {
                    order.push(exec);
                    Vec::new()
                })
                .push(row as i64);
        }
        let residuals: Vec<(Tensor, Tensor)> = order
            .iter()
            .map(|exec| {
                let rows = Tensor::from_slice(&groups[exec]);
                let r = self.residual_for(exec, &layout.gather(x, 0, &rows), layout);
                (rows, r)
            })
            .collect();
        // For an identity shortcut this writes into `x` itself: nothing else reads it.
        let mut out = self.shortcut(x);
        for (rows, r) in &residuals {
            layout.add_rows_(&out, rows, r);
        }
        out.relu_()
    }
}
