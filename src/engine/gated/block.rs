//! One gated residual block: pre-sliced width variants, the gathered (select) path, and
//! grouped execution of a batch whose inputs decided differently.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Tensor;

use super::plan::Exec;
use crate::engine::arch::{BlockSpec, ConvShape};
use crate::engine::folded::{FoldedConv, Format, fold_bn, fold_layers, residual, residual_add_relu};
use crate::engine::gates::{BlockGateParams, BlockGateSlots};
use crate::engine::onednn::Post;
use crate::engine::params::{BN_EPS, BatchNormParams, BlockParams, ConvParams};

/// Weights for the select path. conv1 gathers rows of the full-width folded conv1; each
/// later conv keeps its weight folded with the full width's batch-norm statistics in NCHW
/// (OIHW) order, where gathering output rows or input columns copies contiguous runs, and
/// per width variant the correction that turns it into that variant's folding.
#[derive(Debug)]
struct SelectWeights {
    /// The full-width folded conv1 (weight in the engine's strided layout, never packed:
    /// its rows are gathered per call, bias), whose kept output rows are gathered.
    first: (Tensor, Tensor),
    convs: Vec<SelectConv>,
    calls: AtomicU64,
}

#[derive(Debug)]
struct SelectConv {
    /// Folded with the full width's statistics; contiguous OIHW.
    weight: Tensor,
    /// Per width variant: `(bias, factor)` with `conv(h, weight, bias) * factor` equal to
    /// the convolution folded with the variant's statistics; no factor where they agree.
    variants: Vec<(Tensor, Option<Tensor>)>,
}

impl SelectConv {
    /// `stats[v]` are variant `v`'s `(mean, var)`; the last variant is the full width.
    fn new(conv: &ConvParams, bn: &BatchNormParams, stats: &[(&Tensor, &Tensor)], kind: tch::Kind) -> Self {
        let (_, full_var) = stats[stats.len() - 1];
        let (weight, _) = fold_bn(conv, bn, Some(stats[stats.len() - 1]));
        let variants = stats
            .iter()
            .map(|&(mean, var)| {
                let (_, bias) = fold_bn(conv, bn, Some((mean, var)));
                // scale_v / scale_full, from the variances alone (independent of gamma).
                let factor = ((full_var + BN_EPS) / (var + BN_EPS)).sqrt();
                if factor.eq(1.0).all().int64_value(&[]) != 0 {
                    (bias.to_kind(kind), None)
                } else {
                    ((bias / &factor).to_kind(kind), Some(factor.view([1, -1, 1, 1]).to_kind(kind)))
                }
            })
            .collect();
        SelectConv { weight: weight.to_kind(kind).contiguous(), variants }
    }
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
        format: Format,
        in_hw: [i64; 2],
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
                let convs = params.layers.iter().enumerate().map(|(j, layer)| {
                    let (w, b) = fold_bn(&layer.conv, &layer.bn, if j == 0 { None } else { stats(v, j) });
                    let last = j + 1 == params.layers.len();
                    // Outputs: inner width except the last conv; inputs: inner except the first.
                    let (w, b) = if last { (w, b) } else { (w.narrow(0, 0, k), b.narrow(0, 0, k)) };
                    let w = if j == 0 { w } else { w.narrow(1, 0, k) };
                    (w, b, layer.conv.shape.clone())
                });
                fold_layers(convs, format, in_hw)
            })
            .collect();
        let select = slots.channel.as_ref().map(|_| SelectWeights {
            first: {
                let (w, b) = fold_bn(&params.layers[0].conv, &params.layers[0].bn, None);
                (format.apply(&w), b.to_kind(format.precision.kind()))
            },
            convs: params.layers[1..]
                .iter()
                .enumerate()
                .map(|(j, layer)| {
                    let running = (&layer.bn.running_mean, &layer.bn.running_var);
                    let per_variant: Vec<_> =
                        (0..slots.widths.len()).map(|v| stats(v, j + 1).unwrap_or(running)).collect();
                    SelectConv::new(&layer.conv, &layer.bn, &per_variant, format.precision.kind())
                })
                .collect(),
            calls: AtomicU64::new(0),
        });
        GatedBlock {
            spec: params.spec.clone(),
            slots: slots.clone(),
            variants,
            downsample: params.downsample.as_ref().map(|d| FoldedConv::fold(d, format, in_hw, Post::None)),
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
    fn residual_for(&self, exec: &Exec, x: &Tensor, format: Format) -> Tensor {
        match exec {
            Exec::Slice(v) => residual(&self.variants[*v], x),
            Exec::Select { sets, stats } => self.residual_select(
                &SelectRows { sets: Cow::Borrowed(sets), stats: vec![stats], masks: None },
                x,
                format,
            ),
            Exec::Skip => unreachable!("skipped blocks have no residual"),
        }
    }

    /// Gathers exactly the channels of `run.sets` from the weights and runs the branch on
    /// them, masking each row to its own channels where `run` says so.
    fn residual_select(&self, run: &SelectRows, x: &Tensor, format: Format) -> Tensor {
        let Some(select) = &self.select else {
            return residual(&self.variants[self.variants.len() - 1], x);
        };
        let full = &self.variants[self.variants.len() - 1];
        // A set of every channel (a union often is) gathers nothing: `None`.
        let inner = self.slots.widths[self.slots.widths.len() - 1] as usize;
        let idx: Vec<Option<Tensor>> =
            run.sets.iter().map(|s| (s.len() < inner).then(|| Tensor::from_slice(s))).collect();
        let gather = |t: &Tensor, dim: i64, index: &Option<Tensor>| match index {
            Some(index) => t.index_select(dim, index),
            None => t.shallow_clone(),
        };
        let conv = |x: &Tensor, w: &Tensor, b: Option<&Tensor>, shape: &ConvShape| {
            select.calls.fetch_add(1, Ordering::Relaxed);
            x.conv2d(w, b, [shape.stride; 2], [shape.padding; 2], [1, 1], 1)
        };
        let mask = |mut h: Tensor, g: usize| match run.masks.as_ref().and_then(|m| m[g].as_ref()) {
            Some(m) => h.g_mul_(m),
            None => h,
        };
        let x = format.apply(x);
        // conv1: the kept output rows of the folded full-width conv.
        let (w1, b1) = &select.first;
        let w1 = match &idx[0] {
            Some(index) => format.gather(w1, 0, index),
            None => w1.shallow_clone(),
        };
        let mut h = mask(conv(&x, &w1, Some(&gather(b1, 0, &idx[0])), &full[0].shape).relu_(), 0);
        let last = select.convs.len() - 1;
        for (j, sc) in select.convs.iter().enumerate() {
            let shape = &full[j + 1].shape;
            // Inputs: the previous conv's kept set; outputs: this conv's kept set (all, last).
            let none = None;
            let out = if j == last { &none } else { &idx[j + 1] };
            let w = gather(&gather(&sc.weight, 0, out), 1, &idx[j]);
            let pick = |t: &Tensor, dim: i64| gather(t, dim, out);
            if let [stats] = run.stats.as_slice() {
                // Every row uses the same statistics: their bias goes into the convolution.
                let (bias, factor) = &sc.variants[stats[j]];
                h = conv(&h, &w, Some(&pick(bias, 0)), shape);
                if let Some(f) = factor {
                    h = h.g_mul_(&pick(f, 1));
                }
            } else {
                // Per-row statistics: `(conv + bias_row) * factor_row`.
                let (bias, factor) = sc.rows(run.stats.iter().map(|s| s[j]));
                h = conv(&h, &w, None, shape).g_add_(&pick(&bias, 1));
                if let Some(f) = factor {
                    h = h.g_mul_(&pick(&f, 1));
                }
            }
            if j != last {
                h = mask(h.relu_(), j + 1);
            }
        }
        format.apply(&h)
    }

    /// Runs the block on a batch whose rows decided `execs` (one per row).
    pub fn run(&self, x: &Tensor, execs: &[&Exec], format: Format) -> BlockRun {
        let first = execs[0];
        if execs.iter().all(|e| *e == first) {
            let out = match first {
                Exec::Skip => match &self.downsample {
                    Some(ds) => ds.forward(x).relu_(),
                    None => x.shallow_clone(),
                },
                // The sliced branch ends in one fused conv + add + ReLU where the layout has it.
                Exec::Slice(v) => residual_add_relu(&self.variants[*v], x, self.shortcut(x)),
                exec => {
                    let mut out = self.residual_for(exec, x, format);
                    let _ = out.g_add_(&self.shortcut(x));
                    out.relu_()
                }
            };
            return BlockRun { out, union_widths: None, order: None };
        }
        // Mixed decisions: the rows are put in order of their execution, so that each group
        // is one contiguous run of rows (the batch is copied once, and only when the order
        // changes), then each group reads its rows in place and adds its residual into the
        // same rows of the shortcut (one fused conv + add + ReLU for a sliced group). Rows
        // that chose different `select` sets run as one group when that is cheaper
        // (`SelectRows::union`).
        let union = SelectRows::union(execs, format.precision.kind());
        let mut groups: Vec<(Group, Vec<usize>)> = Vec::new();
        for (row, exec) in execs.iter().enumerate() {
            let key = match exec {
                Exec::Skip => Group::Skip,
                Exec::Select { .. } if union.is_some() => Group::Together,
                exec => Group::Own(exec),
            };
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, rows)) => rows.push(row),
                None => groups.push((key, vec![row])),
            }
        }
        let order: Vec<usize> = groups.iter().flat_map(|(_, rows)| rows.iter().copied()).collect();
        let reordered = order.iter().enumerate().any(|(position, &row)| position != row);
        let x = if reordered { format.rows(x, &order) } else { x.shallow_clone() };
        // For an identity shortcut this writes into `x` itself: each group reads its rows
        // before it writes them, and nothing else reads them.
        let acc = self.shortcut(&x);
        let mut union_widths = None;
        let mut start = 0;
        for (key, rows) in &groups {
            let len = rows.len() as i64;
            let (rows_in, mut rows_out) = (x.narrow(0, start, len), acc.narrow(0, start, len));
            start += len;
            let residual = match key {
                Group::Skip if self.downsample.is_some() => {
                    let _ = rows_out.relu_();
                    continue;
                }
                Group::Skip => continue, // the identity shortcut's rows, already past a ReLU
                Group::Own(Exec::Slice(v)) => {
                    // Written into the shortcut's rows.
                    let _ = residual_add_relu(&self.variants[*v], &rows_in, rows_out);
                    continue;
                }
                Group::Own(exec) => self.residual_for(exec, &rows_in, format),
                Group::Together => {
                    let Some(run) = &union else { continue }; // only made with a union
                    union_widths = Some(run.sets.iter().map(|s| s.len() as i64).collect());
                    self.residual_select(run, &rows_in, format)
                }
            };
            let _ = rows_out.g_add_(&residual).relu_();
        }
        BlockRun { out: acc, union_widths, order: reordered.then_some(order) }
    }
}

/// What [`GatedBlock::run`] returns.
pub(super) struct BlockRun {
    /// The block's output, its rows in `order`.
    pub out: Tensor,
    /// When the rows that chose `select` ran together on the union of their channel sets,
    /// the inner widths each of them ran at (for their FLOPs).
    pub union_widths: Option<Vec<i64>>,
    /// `order[p]`: the input row now at row `p` of the output; `None`: the input's order.
    pub order: Option<Vec<usize>>,
}

/// The groups a mixed batch runs in.
#[derive(PartialEq)]
enum Group<'e> {
    Skip,
    /// The rows that chose `select`, on the union of their sets.
    Together,
    Own(&'e Exec),
}

impl SelectConv {
    /// Per-row `(bias [rows, C, 1, 1], factor)` for rows using these width variants.
    fn rows(&self, variants: impl Iterator<Item = usize>) -> (Tensor, Option<Tensor>) {
        let (biases, factors): (Vec<&Tensor>, Vec<Option<&Tensor>>) =
            variants.map(|v| (&self.variants[v].0, self.variants[v].1.as_ref())).unzip();
        let bias = Tensor::stack(&biases, 0).unsqueeze(-1).unsqueeze(-1);
        let factor = factors.iter().any(Option::is_some).then(|| {
            let ones = bias.ones_like().select(0, 0).view([1, -1, 1, 1]);
            let each: Vec<&Tensor> = factors.iter().map(|f| f.unwrap_or(&ones)).collect();
            Tensor::cat(&each, 0)
        });
        (bias, factor)
    }
}

/// How many times the per-row work the union of a batch's `select` sets may cost and still
/// run as one group: one gather of each weight instead of one per row, and one batched
/// convolution instead of many small ones, repay computing some channels a row did not keep
/// (and masking them to zero, so each row's result is its own set's). Measured in
/// docs/benchmarks.md ("select at batch > 1").
const UNION_SLACK: usize = 2;

/// The select path's work for a group of rows (borrowed from their decisions where it can).
struct SelectRows<'a> {
    /// Per set (inner width), the channels computed, sorted.
    sets: Cow<'a, [Vec<i64>]>,
    /// Per row (one entry: shared by all rows), per set, the width variant whose statistics
    /// apply.
    stats: Vec<&'a [usize]>,
    /// Per set, `[rows, |set|, 1, 1]` masks keeping each row's own channels; `None` for a
    /// set every row keeps whole.
    masks: Option<Vec<Option<Tensor>>>,
}

impl<'a> SelectRows<'a> {
    /// The rows of `execs` that chose `select`, as one group on the union of their sets,
    /// when there are two or more and the union costs at most [`UNION_SLACK`] times their
    /// own sets (counted in channels × rows).
    fn union(execs: &[&'a Exec], kind: tch::Kind) -> Option<Self> {
        let rows: Vec<(&'a Vec<Vec<i64>>, &'a Vec<usize>)> = execs
            .iter()
            .filter_map(|e| match e {
                Exec::Select { sets, stats } => Some((sets, stats)),
                _ => None,
            })
            .collect();
        if rows.len() < 2 {
            return None;
        }
        let groups = rows[0].0.len();
        let sets: Vec<Vec<i64>> = (0..groups)
            .map(|g| {
                let mut all: Vec<i64> = rows.iter().flat_map(|(s, _)| s[g].iter().copied()).collect();
                all.sort_unstable();
                all.dedup();
                all
            })
            .collect();
        let own: usize = rows.iter().flat_map(|(s, _)| s.iter().map(Vec::len)).sum();
        let union: usize = sets.iter().map(Vec::len).sum::<usize>() * rows.len();
        if union > UNION_SLACK * own {
            return None;
        }
        let masks = sets
            .iter()
            .enumerate()
            .map(|(g, set)| {
                if rows.iter().all(|(s, _)| s[g].len() == set.len()) {
                    return None;
                }
                let keep: Vec<f32> = rows
                    .iter()
                    .flat_map(|(s, _)| {
                        set.iter().map(|c| if s[g].binary_search(c).is_ok() { 1.0 } else { 0.0 })
                    })
                    .collect();
                Some(
                    Tensor::from_slice(&keep).view([rows.len() as i64, set.len() as i64, 1, 1]).to_kind(kind),
                )
            })
            .collect();
        let mut stats: Vec<&[usize]> = rows.iter().map(|(_, st)| st.as_slice()).collect();
        if stats.iter().all(|s| *s == stats[0]) {
            stats.truncate(1);
        }
        Some(SelectRows { sets: Cow::Owned(sets), stats, masks: Some(masks) })
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::engine::arch::ArchSpec;
    use crate::engine::folded::Layout;
    use crate::engine::gates::GateConfig;
    use crate::engine::model::{ModelSource, load_params, seeded};

    /// A random channel-gated network whose per-width batch-norm statistics differ from the
    /// full width's, as training leaves them.
    fn channel_gated(
        arch: &str,
        channels: i64,
        seed: i64,
    ) -> (tch::nn::VarStore, crate::engine::model::NetworkParams) {
        let spec = ArchSpec::named(arch, channels, 10).unwrap();
        let source = ModelSource {
            gates: GateConfig { channel: true, ..GateConfig::default() },
            ..ModelSource::random(spec, seed)
        };
        let (vs, params) = load_params(&source).unwrap();
        seeded(seed + 1, || {
            for stats in params.gates.blocks.iter().flat_map(|b| b.slim_stats.iter().flatten()) {
                let n = stats.running_mean.size()[0];
                let mean = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.3;
                let var = Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5;
                stats.running_mean.shallow_clone().copy_(&mean);
                stats.running_var.shallow_clone().copy_(&var);
            }
        });
        (vs, params)
    }

    /// `select` on a leading set of an allowed width computes what the pre-sliced variant of
    /// that width computes, including its own batch-norm statistics.
    #[test]
    fn select_on_a_prefix_equals_the_sliced_variant() {
        let _g = tch::no_grad_guard();
        for (arch, channels, hw) in [("resnet20", 1, 8), ("resnet50", 3, 32)] {
            let (_vs, params) = channel_gated(arch, channels, 3);
            let (bp, gp, slots) =
                (&params.backbone.blocks[1], &params.gates.blocks[1], &params.gates.layout.blocks[1]);
            for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
                let format = Format::from(layout);
                let block = GatedBlock::build(bp, gp, slots, format, [hw, hw]);
                let cin = bp.layers[0].conv.shape.in_ch;
                let x =
                    format.apply(&seeded(7, || Tensor::randn([2, cin, hw, hw], (Kind::Float, Device::Cpu))));
                for (v, &width) in slots.widths.iter().enumerate().take(slots.widths.len() - 1) {
                    let groups = bp.layers.len() - 1;
                    let sets = vec![(0..width).collect::<Vec<i64>>(); groups];
                    // Copies: a block may write its output into its input.
                    let select = block
                        .run(&x.copy(), &[&Exec::Select { sets, stats: vec![v; groups] }; 2], format)
                        .out;
                    let slice = block.run(&x.copy(), &[&Exec::Slice(v); 2], format).out;
                    let diff = (select - slice).abs().max().double_value(&[]);
                    assert!(diff < 1e-4, "{arch} {layout:?} width {width}: {diff}");
                }
            }
        }
    }

    /// Rows that chose different `select` sets (and statistics) run together on the union of
    /// their sets, and each row gets what it would have got alone.
    #[test]
    fn select_rows_run_together_give_each_row_its_own_result() {
        let _g = tch::no_grad_guard();
        for (arch, channels, hw) in [("resnet20", 1, 8), ("resnet50", 3, 16)] {
            let (_vs, params) = channel_gated(arch, channels, 5);
            let (bp, gp, slots) =
                (&params.backbone.blocks[1], &params.gates.blocks[1], &params.gates.layout.blocks[1]);
            let inner = *slots.widths.last().unwrap();
            let groups = bp.layers.len() - 1;
            // Overlapping sets: every other channel, then the first 3/4, then the last 3/4.
            let set = |k: i64| -> Vec<i64> {
                match k {
                    0 => (0..inner).step_by(2).collect(),
                    1 => (0..inner * 3 / 4).collect(),
                    _ => (inner / 4..inner).collect(),
                }
            };
            let execs: Vec<Exec> = (0..3)
                .map(|k| Exec::Select {
                    sets: vec![set(k); groups],
                    stats: vec![k as usize % slots.widths.len(); groups],
                })
                .chain([Exec::Slice(0), Exec::Skip])
                .collect();
            for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
                let format = Format::from(layout);
                let block = GatedBlock::build(bp, gp, slots, format, [hw, hw]);
                let cin = bp.layers[0].conv.shape.in_ch;
                // Non-negative, as a block's input is (the previous block's ReLU output).
                let n = execs.len() as i64;
                let x = seeded(9, || Tensor::randn([n, cin, hw, hw], (Kind::Float, Device::Cpu))).relu();
                let refs: Vec<&Exec> = execs.iter().collect();
                // A copy: a block may add into its input in place.
                let run = block.run(&format.apply(&x.copy()), &refs, format);
                assert_eq!(
                    run.union_widths,
                    Some(vec![inner; groups]),
                    "{arch}: the union of the three sets is every channel"
                );
                let order = run.order.clone().unwrap_or_else(|| (0..execs.len()).collect());
                for (row, exec) in execs.iter().enumerate() {
                    let alone = format.apply(&x.narrow(0, row as i64, 1));
                    let alone = block.run(&alone, &[exec], format);
                    assert_eq!((alone.union_widths, alone.order), (None, None));
                    let at = order.iter().position(|&r| r == row).unwrap() as i64;
                    let diff = (alone.out - run.out.narrow(0, at, 1)).abs().max().double_value(&[]);
                    assert!(diff < 1e-4, "{arch} {layout:?} row {row}: {diff}");
                }
            }
        }
    }
}
