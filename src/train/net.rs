//! The trainable gated network (Basic or Bottleneck blocks): the backbone under torchvision's
//! names, the gate MLP, block gates and exit heads under the serving names, and channel
//! gates in a *prefix* parameterisation — saliency_c(x) = σ(a(x) − b_c) with increasing
//! offsets b_c — so the kept set is always a leading prefix and `slice` mode runs exactly
//! what training saw. `export` turns it into the generic per-channel layer the engine reads.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::engine::arch::ArchSpec;
use crate::engine::flops::{residual_flops, shortcut_flops};
use crate::engine::gates::{Dense, GateLayout, GateParams, round_up_width};
use crate::engine::model::NetworkParams;
use crate::engine::params::{BatchNormParams, BlockParams, ConvBn, ResNetParams};

/// A channel gate in prefix form.
#[derive(Debug)]
pub struct PrefixGate {
    /// a(x): one output from the gate MLP's hidden layer.
    pub demand: Dense,
    /// Unconstrained; the offsets are b_c = cumsum(softplus(raw)).
    pub raw_offsets: Tensor,
}

impl PrefixGate {
    pub fn offsets(&self) -> Tensor {
        self.raw_offsets.softplus().cumsum(0, Kind::Float)
    }

    /// Saliency `[N, C]` from the gate MLP's hidden features.
    pub fn saliency(&self, hidden: &Tensor) -> Tensor {
        (self.demand.forward(hidden) - self.offsets()).sigmoid()
    }
}

/// What a forward pass runs.
#[derive(Clone, Debug)]
pub enum PassMode {
    /// Every block runs at these inner widths (one per block); exits are evaluated when
    /// every width is full.
    Widths(Vec<i64>),
    /// The gates decide (hard decisions, straight-through gradients) at threshold 0.5.
    Gated,
}

/// The outputs of a training pass.
pub struct PassOutput {
    pub logits: Tensor,
    /// Exit logits, in the layout's exit order (empty when exits were not evaluated).
    pub exits: Vec<Tensor>,
    /// Per-input executed fraction of dense FLOPs (gated passes only).
    pub rate: Option<Tensor>,
}

/// Every trainable parameter of a gated CIFAR-style ResNet.
#[derive(Debug)]
pub struct TrainableNet {
    pub spec: ArchSpec,
    pub layout: GateLayout,
    pub backbone: ResNetParams,
    /// The serving-named gate parameters; their `channel` entries stay unused in training.
    pub gates: GateParams,
    pub channel: Vec<Option<PrefixGate>>,
    /// Per-block residual FLOPs at inner-width fraction f: `lin·f + quad·f²` (`quad` is a
    /// Bottleneck's middle convolution, narrowed on both sides), shortcut FLOPs, and the rest
    /// (stem, gate MLP, fc).
    residual_flops: Vec<(f64, f64)>,
    shortcut_flops: Vec<f64>,
    fixed_flops: f64,
    dense_flops: f64,
}

impl TrainableNet {
    /// Registers every parameter under `root`.
    pub fn new(root: &nn::Path, spec: &ArchSpec, layout: &GateLayout, input_hw: i64) -> Result<Self, String> {
        let backbone = ResNetParams::new(root, spec);
        let no_channel =
            GateLayout::new(spec, &crate::engine::GateConfig { channel: false, ..layout.config.clone() })
                .map_err(|e| e.to_string())?;
        let gates = GateParams::new(root, spec, &no_channel);
        let hidden = layout.config.hidden;
        let channel = spec
            .block_specs()
            .iter()
            .zip(&layout.blocks)
            .map(|(block, slots)| {
                slots.channel.as_ref().map(|_| {
                    let mut p = root / "train";
                    for part in block.prefix.split('.') {
                        p = p / part;
                    }
                    let c = block.inner_width();
                    // Offsets start spread so that the initial demand keeps most channels.
                    PrefixGate {
                        demand: Dense {
                            weight: (&p / "demand").var(
                                "weight",
                                &[1, hidden],
                                Init::Uniform { lo: -0.05, up: 0.05 },
                            ),
                            bias: (&p / "demand").var("bias", &[1], Init::Const(3.0)),
                        },
                        raw_offsets: p.var(
                            "raw_offsets",
                            &[c],
                            Init::Const((3.0f64 / c as f64).exp_m1().ln()),
                        ),
                    }
                })
            })
            .collect();
        let (mut h, mut w) = (spec.after_stem_hw(input_hw), spec.after_stem_hw(input_hw));
        let (mut residual, mut shortcut) = (Vec::new(), Vec::new());
        for block in spec.block_specs() {
            let at = |k: i64| residual_flops(&block, h, w, &vec![k; block.convs.len() - 1]) as f64;
            let (full, half) = (at(block.inner_width()), at(block.inner_width() / 2));
            // Exact: every convolution's cost is linear in each of its two widths.
            let quad = if block.convs.len() > 2 { 2.0 * (full - 2.0 * half) } else { 0.0 };
            residual.push((full - quad, quad));
            shortcut.push(shortcut_flops(&block, h, w) as f64);
            (h, w) = block.out_hw((h, w));
        }
        let dense = crate::engine::flops::dense_flops(spec, input_hw, input_hw) as f64;
        let fixed = dense - residual.iter().map(|(l, q)| l + q).sum::<f64>() - shortcut.iter().sum::<f64>();
        Ok(TrainableNet {
            spec: spec.clone(),
            layout: GateLayout { config: layout.config.clone(), ..layout.clone() },
            backbone,
            gates,
            channel,
            residual_flops: residual,
            shortcut_flops: shortcut,
            fixed_flops: fixed,
            dense_flops: dense,
        })
    }

    /// The narrowest and the full width of every block.
    pub fn narrowest(&self) -> Vec<i64> {
        self.layout.blocks.iter().map(|s| s.widths[0]).collect()
    }

    pub fn widest(&self) -> Vec<i64> {
        self.layout.blocks.iter().map(|s| s.widths[s.widths.len() - 1]).collect()
    }

    /// One forward pass in training (`train`) or evaluation mode.
    pub fn forward(&self, x: &Tensor, mode: &PassMode, train: bool) -> PassOutput {
        let b = &self.backbone;
        let stem = b.stem_t(x, train);
        let full = matches!(mode, PassMode::Widths(w) if *w == self.widest());
        let gated = matches!(mode, PassMode::Gated);
        let hidden = match (&self.gates.trunk, gated) {
            (Some(trunk), true) => {
                Some(trunk.forward(&stem.mean_dim(&[2i64, 3][..], false, Kind::Float)).relu())
            }
            _ => None,
        };
        let n = x.size()[0];
        let mut rate = gated.then(|| Tensor::full([n], self.fixed_flops, (Kind::Float, x.device())));
        let mut h = stem;
        let mut exits = Vec::new();
        let mut block_index = 0;
        for (stage, &count) in self.spec.blocks.iter().enumerate() {
            for _ in 0..count {
                let i = block_index;
                let block = &b.blocks[i];
                let shortcut = block.shortcut_t(&h, train && full);
                let (residual, cost) = match (mode, &hidden) {
                    (PassMode::Widths(widths), _) => {
                        (sliced_residual(block, &h, widths[i], train, full), None)
                    }
                    (PassMode::Gated, Some(hidden)) => {
                        let (r, c) = self.gated_residual(i, &h, hidden);
                        (r, Some(c))
                    }
                    (PassMode::Gated, None) => {
                        (sliced_residual(block, &h, self.widest()[i], train, false), None)
                    }
                };
                if let Some(rate) = rate.as_mut() {
                    let cost = cost.unwrap_or_else(|| {
                        let (lin, quad) = self.residual_flops[i];
                        Tensor::full([n], lin + quad, (Kind::Float, x.device()))
                    });
                    *rate = &*rate + cost + self.shortcut_flops[i];
                }
                h = (residual + shortcut).relu();
                block_index += 1;
            }
            if (full || gated)
                && let Some(e) = self.gates.exits.iter().find(|e| e.stage == stage + 1)
            {
                exits.push(e.forward(&h));
            }
        }
        PassOutput { logits: b.head(&h), exits, rate: rate.map(|r| r / self.dense_flops) }
    }

    /// A block's residual under its gates: prefix channel mask and block gate, both hard in
    /// the forward pass with sigmoid gradients (straight-through). Returns the gated residual
    /// and its per-input FLOPs.
    fn gated_residual(&self, i: usize, x: &Tensor, hidden: &Tensor) -> (Tensor, Tensor) {
        let block = &self.backbone.blocks[i];
        let slots = &self.layout.blocks[i];
        let c = block.spec.inner_width();
        let n = x.size()[0];
        let mut fraction = Tensor::ones([n], (Kind::Float, x.device()));
        // One prefix mask for every inner width of the block (both of a Bottleneck's).
        let mask = self.channel[i].as_ref().map(|gate| {
            let saliency = gate.saliency(hidden);
            let kept = saliency.ge(0.5).to_kind(Kind::Float).sum_dim_intlist(&[1i64][..], false, Kind::Float);
            let kept = Vec::<f32>::try_from(&kept).unwrap_or_default();
            let widths: Vec<f32> =
                kept.iter().map(|&k| round_up_width(k as i64, &slots.widths) as f32).collect();
            let widths = Tensor::from_slice(&widths).to_device(x.device());
            let prefix =
                Tensor::arange(c, (Kind::Float, x.device())).unsqueeze(0).lt_tensor(&widths.unsqueeze(1));
            let mask = prefix.to_kind(Kind::Float) + &saliency - saliency.detach();
            fraction = mask.sum_dim_intlist(&[1i64][..], false, Kind::Float) / c as f64;
            mask.view([n, c, 1, 1])
        });
        // Batch statistics without touching running statistics: decisions mix in a batch.
        let last = block.layers.len() - 1;
        let mut r = x.shallow_clone();
        for (j, layer) in block.layers.iter().enumerate() {
            r = bn_batch(&layer.bn, &layer.conv.forward(&r));
            if j < last {
                r = r.relu();
                if let Some(mask) = &mask {
                    r = &r * mask;
                }
            }
        }
        let (lin, quad) = self.residual_flops[i];
        let mut run = None;
        if let Some(gate) = &self.gates.blocks[i].block {
            let score = gate.forward(hidden).sigmoid().view([n]);
            let hard = score.ge(0.5).to_kind(Kind::Float) + &score - score.detach();
            r = &r * hard.view([n, 1, 1, 1]);
            run = Some(hard);
        }
        let cost = if quad == 0.0 {
            // Basic blocks: linear in the width (kept in this order: the shipped model's
            // training reproduces bit for bit).
            run.map_or(fraction.shallow_clone(), |run| &fraction * run) * lin
        } else {
            let cost = &fraction * lin + &fraction * &fraction * quad;
            run.map_or(cost.shallow_clone(), |run| &cost * run)
        };
        (r, cost)
    }

    /// The serving parameters: the backbone and gates as the engine reads them, with every
    /// prefix channel gate written as a per-channel linear layer.
    pub fn export(&self, serving: &NetworkParams) {
        tch::no_grad(|| {
            copy_all(&self.backbone_tensors(), &serving_backbone_tensors(serving));
            if let (Some(src), Some(dst)) = (&self.gates.trunk, &serving.gates.trunk) {
                copy(&dst.weight, &src.weight);
                copy(&dst.bias, &src.bias);
            }
            for (i, dst) in serving.gates.blocks.iter().enumerate() {
                if let (Some(src), Some(dst)) = (&self.gates.blocks[i].block, &dst.block) {
                    copy(&dst.weight, &src.weight);
                    copy(&dst.bias, &src.bias);
                }
                if let (Some(gate), Some(dst)) = (&self.channel[i], &dst.channel) {
                    // One saliency per inner channel, repeated for each inner width (2 in a
                    // Bottleneck): the same prefix for both.
                    let c = dst.weight.size()[0];
                    let offsets = gate.offsets();
                    let groups = c / offsets.size()[0];
                    copy(&dst.weight, &gate.demand.weight.expand([c, -1], false));
                    copy(&dst.bias, &(&gate.demand.bias - offsets.repeat([groups])));
                }
            }
            for (src, dst) in self.gates.exits.iter().zip(&serving.gates.exits) {
                if let (Some((sw, sb)), Some((dw, db))) = (&src.conv, &dst.conv) {
                    copy(dw, sw);
                    copy(db, sb);
                }
                copy(&dst.fc.weight, &src.fc.weight);
                copy(&dst.fc.bias, &src.fc.bias);
            }
        });
    }

    fn backbone_tensors(&self) -> Vec<Tensor> {
        backbone_tensors(&self.backbone)
    }

    /// Puts every block's inner channels in order of importance, most important first,
    /// without changing what the network computes: a channel's output convolution filter,
    /// batch-norm entries and the next convolution's input slice move together. Channel
    /// gates keep a leading prefix, so a dense network's arbitrary order would make a
    /// narrow width keep arbitrary channels; after this it keeps the ones that matter most.
    /// Importance is |batch-norm scale| × the L1 norm of the weights that read the channel
    /// (network-slimming's criterion, weighted by how much the next layer listens).
    pub fn order_inner_channels(&self) {
        tch::no_grad(|| {
            for block in &self.backbone.blocks {
                for pair in block.layers.windows(2) {
                    let (this, next) = (&pair[0], &pair[1]);
                    let order = inner_channel_importance(this, next).argsort(0, true);
                    let bn = &this.bn;
                    for t in [&this.conv.weight, &bn.weight, &bn.bias, &bn.running_mean, &bn.running_var] {
                        copy(t, &t.index_select(0, &order));
                    }
                    copy(&next.conv.weight, &next.conv.weight.index_select(1, &order));
                }
            }
        });
    }
}

/// The importance of each output channel of `this` (a convolution and its batch-norm) that
/// `next` reads: |batch-norm scale| × the L1 norm of `next`'s weights on that channel.
pub fn inner_channel_importance(this: &ConvBn, next: &ConvBn) -> Tensor {
    let reads = next.conv.weight.abs().sum_dim_intlist(&[0i64, 2, 3][..], false, Kind::Float);
    this.bn.weight.abs() * reads
}

fn serving_backbone_tensors(p: &NetworkParams) -> Vec<Tensor> {
    backbone_tensors(&p.backbone)
}

fn backbone_tensors(b: &ResNetParams) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut push_cb = |cb: &ConvBn| {
        out.push(cb.conv.weight.shallow_clone());
        let bn = &cb.bn;
        out.extend(
            [&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var, &bn.num_batches_tracked]
                .map(|t| t.shallow_clone()),
        );
    };
    push_cb(&b.stem);
    for block in &b.blocks {
        block.layers.iter().for_each(&mut push_cb);
        if let Some(ds) = &block.downsample {
            push_cb(ds);
        }
    }
    out.push(b.fc.weight.shallow_clone());
    out.push(b.fc.bias.shallow_clone());
    out
}

fn copy(dst: &Tensor, src: &Tensor) {
    dst.shallow_clone().copy_(src);
}

fn copy_all(src: &[Tensor], dst: &[Tensor]) {
    for (s, d) in src.iter().zip(dst) {
        copy(d, s);
    }
}

/// Batch-norm with the batch's statistics only (running statistics untouched).
pub fn bn_batch(bn: &BatchNormParams, x: &Tensor) -> Tensor {
    batch_statistics_norm(x, &bn.weight, &bn.bias)
}

/// `(x - batch mean) / batch std · weight + bias`, per channel; no running statistics.
fn batch_statistics_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    x.batch_norm(
        Some(weight),
        Some(bias),
        None::<&Tensor>,
        None::<&Tensor>,
        true,
        0.1,
        crate::engine::params::BN_EPS,
        false,
    )
}

/// A block's residual branch at inner width `k` (slimmable training): every inner width
/// sliced to `k` (both of a Bottleneck's), batch-norm over the kept channels. Running
/// statistics are updated only in full passes.
pub fn sliced_residual(block: &BlockParams, x: &Tensor, k: i64, train: bool, update_stats: bool) -> Tensor {
    let last = block.layers.len() - 1;
    let mut h = x.shallow_clone();
    for (j, layer) in block.layers.iter().enumerate() {
        h = sliced_conv(block, j, &h, k);
        h = if j < last {
            narrow_bn(&layer.bn, &h, k, train, update_stats).relu()
        } else if update_stats || !train {
            layer.bn.forward_t(&h, train)
        } else {
            bn_batch(&layer.bn, &h)
        };
    }
    h
}

/// The block's `j`-th convolution at inner width `k`: its outputs narrowed unless it is the
/// last, its inputs unless it is the first.
pub fn sliced_conv(block: &BlockParams, j: usize, x: &Tensor, k: i64) -> Tensor {
    let conv = &block.layers[j].conv;
    let mut w = conv.weight.shallow_clone();
    if j + 1 < block.layers.len() {
        w = w.narrow(0, 0, k);
    }
    if j > 0 {
        w = w.narrow(1, 0, k);
    }
    let s = &conv.shape;
    x.conv2d(&w, None::<Tensor>, [s.stride; 2], [s.padding; 2], [1, 1], 1)
}

fn narrow_bn(bn: &BatchNormParams, x: &Tensor, k: i64, train: bool, update_stats: bool) -> Tensor {
    let full = bn.weight.size()[0] == k;
    if full && (update_stats || !train) {
        return bn.forward_t(x, train);
    }
    let (w, b) = (bn.weight.narrow(0, 0, k), bn.bias.narrow(0, 0, k));
    if train {
        batch_statistics_norm(x, &w, &b)
    } else {
        let (m, v) = (bn.running_mean.narrow(0, 0, k), bn.running_var.narrow(0, 0, k));
        x.batch_norm(Some(&w), Some(&b), Some(&m), Some(&v), false, 0.1, crate::engine::params::BN_EPS, false)
    }
}
