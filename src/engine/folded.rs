//! The inference network's building blocks: batch-norm folded into each convolution at
//! load, weights laid out once in the engine's memory format, eval mode only. The engine
//! thread runs them under `no_grad`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::arch::{ArchSpec, ConvShape, StemKind};
use super::params::{BN_EPS, BatchNormParams, ConvBn, ConvParams, LinearParams, ResNetParams};

/// Memory layout of activations and convolution weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// NHWC strides (PyTorch's `channels_last`): measured faster on this CPU (docs/decisions.md).
    #[default]
    ChannelsLast,
    /// Plain contiguous NCHW.
    Nchw,
}

/// Logical → physical dimension order of a channels-last 4-d tensor, and back.
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];
const FROM_NHWC: [i64; 4] = [0, 3, 1, 2];

impl std::str::FromStr for Layout {
    type Err = String;

    /// `channels-last` or `nchw`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "channels-last" => Ok(Layout::ChannelsLast),
            "nchw" => Ok(Layout::Nchw),
            other => Err(format!("unknown layout `{other}` (channels-last or nchw)")),
        }
    }
}

impl Layout {
    /// Returns `t` (4-d) in this layout; a no-op when it already is.
    pub fn apply(self, t: &Tensor) -> Tensor {
        match self {
            Layout::Nchw => t.contiguous(),
            // tch has no memory-format argument: permute to NHWC, make contiguous, permute
            // back. The result has channels-last strides, which libtorch recognises.
            Layout::ChannelsLast => t.permute(TO_NHWC).contiguous().permute(FROM_NHWC),
        }
    }

    /// `t.index_select(dim, index)` that keeps this layout (libtorch's own returns NCHW).
    pub fn gather(self, t: &Tensor, dim: usize, index: &Tensor) -> Tensor {
        match self {
            Layout::Nchw => t.index_select(dim as i64, index),
            Layout::ChannelsLast => t.permute(TO_NHWC).index_select(FROM_NHWC[dim], index).permute(FROM_NHWC),
        }
    }

    /// `dst.index_add_(0, index, src)` along the batch dimension, in place, keeping layout.
    pub fn add_rows_(self, dst: &Tensor, index: &Tensor, src: &Tensor) {
        match self {
            Layout::Nchw => {
                let _ = dst.shallow_clone().index_add_(0, index, src);
            }
            Layout::ChannelsLast => {
                let _ = dst.permute(TO_NHWC).index_add_(0, index, &src.permute(TO_NHWC));
            }
        }
    }
}

/// Batch-norm folded into a bias-free convolution: w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε).
/// `stats` replaces the running statistics (per-width statistics of slimmable blocks).
/// Returns the folded weight (NCHW, contiguous) and bias.
pub fn fold_bn(
    conv: &ConvParams,
    bn: &BatchNormParams,
    stats: Option<(&Tensor, &Tensor)>,
) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let (mean, var) = stats.unwrap_or((&bn.running_mean, &bn.running_var));
        let scale = &bn.weight / (var + BN_EPS).sqrt();
        let weight = &conv.weight * scale.view([-1, 1, 1, 1]);
        let bias = &bn.bias - mean * &scale;
        (weight.detach(), bias.detach())
    })
}

/// A convolution with its batch-norm folded in: `conv(x, w') + b'`. Counts its calls, so
/// tests can prove that skipped work is not run.
#[derive(Debug)]
pub struct FoldedConv {
    pub weight: Tensor,
    pub bias: Tensor,
    pub shape: ConvShape,
    calls: AtomicU64,
}

impl FoldedConv {
    /// A convolution from already folded NCHW weight and bias, laid out for `layout`.
    pub fn new(weight: &Tensor, bias: &Tensor, shape: ConvShape, layout: Layout) -> Self {
        let size = weight.size();
        let shape = ConvShape { out_ch: size[0], in_ch: size[1], ..shape };
        FoldedConv { weight: layout.apply(weight), bias: bias.contiguous(), shape, calls: AtomicU64::new(0) }
    }

    /// Folds `layer`'s batch-norm into its convolution.
    pub fn fold(layer: &ConvBn, layout: Layout) -> Self {
        let (w, b) = fold_bn(&layer.conv, &layer.bn, None);
        FoldedConv::new(&w, &b, layer.conv.shape.clone(), layout)
    }

    /// The convolution on `x` (which must already be in the engine's layout).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let s = &self.shape;
        x.conv2d(&self.weight, Some(&self.bias), [s.stride; 2], [s.padding; 2], [1, 1], 1)
    }

    /// How many times `forward` ran.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// A folded fully connected layer.
#[derive(Debug)]
pub struct FoldedLinear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl FoldedLinear {
    pub fn new(weight: &Tensor, bias: &Tensor) -> Self {
        FoldedLinear { weight: weight.detach().copy(), bias: bias.detach().copy() }
    }

    pub fn copy_of(fc: &LinearParams) -> Self {
        FoldedLinear::new(&fc.weight, &fc.bias)
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// Global average pool of a `[N, C, H, W]` tensor to `[N, C]`.
pub fn global_pool(x: &Tensor) -> Tensor {
    x.mean_dim(&[2i64, 3][..], false, Kind::Float)
}

/// A folded residual block (the dense path).
#[derive(Debug)]
pub struct FoldedBlock {
    pub layers: Vec<FoldedConv>,
    pub downsample: Option<FoldedConv>,
}

/// The residual branch of `layers` on `x` (no shortcut, no final ReLU).
pub fn residual(layers: &[FoldedConv], x: &Tensor) -> Tensor {
    let (last, inner) = layers.split_last().expect("a block has convolutions");
    let mut out = x.shallow_clone();
    for layer in inner {
        out = layer.forward(&out).relu_();
    }
    last.forward(&out)
}

impl FoldedBlock {
    pub fn shortcut(&self, x: &Tensor) -> Tensor {
        match &self.downsample {
            Some(ds) => ds.forward(x),
            None => x.shallow_clone(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut out = residual(&self.layers, x);
        let _ = out.g_add_(&self.shortcut(x));
        out.relu_()
    }
}

/// The stem: conv (+ReLU), and the ImageNet family's max-pool.
pub fn stem_forward(stem: &FoldedConv, kind: StemKind, x: &Tensor) -> Tensor {
    let x = stem.forward(x).relu_();
    match kind {
        StemKind::Cifar => x,
        StemKind::Imagenet => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
    }
}

/// A whole folded dense ResNet: the baseline that gated models are measured against.
#[derive(Debug)]
pub struct FoldedResNet {
    pub spec: ArchSpec,
    pub layout: Layout,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    pub fc: FoldedLinear,
}

impl FoldedResNet {
    /// Builds the dense inference network from trained parameters.
    pub fn fold(params: &ResNetParams, layout: Layout) -> Self {
        let blocks = params
            .blocks
            .iter()
            .map(|b| FoldedBlock {
                layers: b.layers.iter().map(|l| FoldedConv::fold(l, layout)).collect(),
                downsample: b.downsample.as_ref().map(|d| FoldedConv::fold(d, layout)),
            })
            .collect();
        FoldedResNet {
            spec: params.spec.clone(),
            layout,
            stem: FoldedConv::fold(&params.stem, layout),
            blocks,
            fc: FoldedLinear::copy_of(&params.fc),
        }
    }

    /// Dense forward pass: `[N, C, H, W]` f32 in any layout → `[N, classes]` logits.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = stem_forward(&self.stem, self.spec.stem, &self.layout.apply(input));
        for block in &self.blocks {
            x = block.forward(&x);
        }
        self.fc.forward(&global_pool(&x))
    }
}
