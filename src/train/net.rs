//! The trainable gated network (CIFAR-style, Basic blocks): the backbone under torchvision's
//! names, the gate MLP, block gates and exit heads under the serving names, and channel
//! gates in a *prefix* parameterisation — saliency_c(x) = σ(a(x) − b_c) with increasing
//! offsets b_c — so the kept set is always a leading prefix and `slice` mode runs exactly
//! what training saw. `export` turns it into the generic per-channel layer the engine reads.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::engine::arch::{ArchSpec, BlockKind};
use crate::engine::flops::{residual_flops, shortcut_flops};
use crate::engine::gates::{Dense, GateLayout, GateParams, round_up_width};
use crate::engine::model::NetworkParams;
use crate::engine::params::{BatchNormParams, BlockParams, ResNetParams};

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
    /// Per-block dense residual FLOPs, shortcut FLOPs, and the rest (stem, gate MLP, fc).
    residual_flops: Vec<f64>,
    shortcut_flops: Vec<f64>,
    fixed_flops: f64,
    dense_flops: f64,
}

impl TrainableNet {
    /// Registers every parameter under `root`. Only Basic-block (CIFAR-style) models train.
    pub fn new(root: &nn::Path, spec: &ArchSpec, layout: &GateLayout, input_hw: i64) -> Result<Self, String> {
        if spec.block != BlockKind::Basic {
            return Err(format!(
                "{}: training supports Basic-block ResNets (resnet20/32/56, 18/34)",
                spec.name
            ));
        }
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
            residual.push(residual_flops(&block, h, w, &[block.inner_width()]) as f64);
            shortcut.push(shortcut_flops(&block, h, w) as f64);
            let s = block.stride();
            (h, w) = ((h - 1) / s + 1, (w - 1) / s + 1);
        }
        let dense = crate::engine::flops::dense_flops(spec, input_hw, input_hw) as f64;
        let fixed = dense - residual.iter().sum::<f64>() - shortcut.iter().sum::<f64>();
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
                        Tensor::full([n], self.residual_flops[i], (Kind::Float, x.device()))
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
        // Batch statistics without touching running statistics: decisions mix in a batch.
        let mut r = bn_batch(&block.layers[0].bn, &block.layers[0].conv.forward(x)).relu();
        if let Some(gate) = &self.channel[i] {
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
            r = &r * mask.view([n, c, 1, 1]);
        }
        r = bn_batch(&block.layers[1].bn, &block.layers[1].conv.forward(&r));
        if let Some(gate) = &self.gates.blocks[i].block {
            let score = gate.forward(hidden).sigmoid().view([n]);
            let run = score.ge(0.5).to_kind(Kind::Float) + &score - score.detach();
            fraction = &fraction * &run;
            r = &r * run.view([n, 1, 1, 1]);
        }
        (r, fraction * self.residual_flops[i])
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
                    let c = dst.weight.size()[0];
                    copy(&dst.weight, &gate.demand.weight.expand([c, -1], false));
                    copy(&dst.bias, &(&gate.demand.bias - gate.offsets()));
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
}

fn serving_backbone_tensors(p: &NetworkParams) -> Vec<Tensor> {
    backbone_tensors(&p.backbone)
}

fn backbone_tensors(b: &ResNetParams) -> Vec<Tensor> {
    let mut out = Vec::new();
    let mut push_cb = |cb: &crate::engine::params::ConvBn| {
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

/// A Basic block's residual branch at inner width `k` (slimmable training): sliced weights,
/// batch-norm over the kept channels. Running statistics are updated only in full passes.
pub fn sliced_residual(block: &BlockParams, x: &Tensor, k: i64, train: bool, update_stats: bool) -> Tensor {
    let (l1, l2) = (&block.layers[0], &block.layers[1]);
    let s1 = &l1.conv.shape;
    let w1 = l1.conv.weight.narrow(0, 0, k);
    let h = x.conv2d(&w1, None::<Tensor>, [s1.stride; 2], [s1.padding; 2], [1, 1], 1);
    let h = narrow_bn(&l1.bn, &h, k, train, update_stats).relu();
    let s2 = &l2.conv.shape;
    let w2 = l2.conv.weight.narrow(1, 0, k);
    let h = h.conv2d(&w2, None::<Tensor>, [s2.stride; 2], [s2.padding; 2], [1, 1], 1);
    if update_stats || !train { l2.bn.forward_t(&h, train) } else { bn_batch(&l2.bn, &h) }
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
