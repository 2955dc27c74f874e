//! The inference network: batch-norm folded into each convolution at load, weights laid
//! out once in the engine's memory format, eval mode only. The engine thread runs it under
//! `no_grad`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::arch::{ArchSpec, ConvShape, StemKind};
use super::params::{BN_EPS, ConvBn, LinearParams, ResNetParams};

/// Memory layout of activations and convolution weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// NHWC strides (PyTorch's `channels_last`): measured faster on this CPU (see DESIGN).
    #[default]
    ChannelsLast,
    /// Plain contiguous NCHW.
    Nchw,
}

impl Layout {
    /// Returns `t` (4-d) in this layout; a no-op when it already is.
    pub fn apply(self, t: &Tensor) -> Tensor {
        match self {
            Layout::Nchw => t.contiguous(),
            // tch has no memory-format argument: permute to NHWC, make contiguous, permute
            // back. The result has channels-last strides, which libtorch recognises.
            Layout::ChannelsLast => t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]),
        }
    }
}

/// A convolution with its batch-norm folded in: `conv(x, w') + b'`.
#[derive(Debug)]
pub struct FoldedConv {
    pub weight: Tensor,
    pub bias: Tensor,
    pub shape: ConvShape,
}

impl FoldedConv {
    /// Folds `bn` into `conv`: w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε).
    pub fn fold(layer: &ConvBn, layout: Layout) -> Self {
        tch::no_grad(|| {
            let bn = &layer.bn;
            let scale = &bn.weight / (&bn.running_var + BN_EPS).sqrt();
            let weight = &layer.conv.weight * scale.view([-1, 1, 1, 1]);
            let bias = &bn.bias - &bn.running_mean * &scale;
            FoldedConv {
                weight: layout.apply(&weight.detach()),
                bias: bias.detach().contiguous(),
                shape: layer.conv.shape.clone(),
            }
        })
    }

    /// The convolution on `x` (which must already be in the engine's layout).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = &self.shape;
        x.conv2d(&self.weight, Some(&self.bias), [s.stride; 2], [s.padding; 2], [1, 1], 1)
    }
}

/// A folded fully connected layer.
#[derive(Debug)]
pub struct FoldedLinear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl FoldedLinear {
    pub fn copy_of(fc: &LinearParams) -> Self {
        FoldedLinear { weight: fc.weight.detach().copy(), bias: fc.bias.detach().copy() }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// A folded residual block.
#[derive(Debug)]
pub struct FoldedBlock {
    pub layers: Vec<FoldedConv>,
    pub downsample: Option<FoldedConv>,
}

impl FoldedBlock {
    /// The residual branch (no shortcut, no final ReLU).
    pub fn residual(&self, x: &Tensor) -> Tensor {
        let (last, inner) = self.layers.split_last().expect("a block has convolutions");
        let mut out = x.shallow_clone();
        for layer in inner {
            out = layer.forward(&out).relu_();
        }
        last.forward(&out)
    }

    pub fn shortcut(&self, x: &Tensor) -> Tensor {
        match &self.downsample {
            Some(ds) => ds.forward(x),
            None => x.shallow_clone(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut out = self.residual(x);
        let _ = out.g_add_(&self.shortcut(x));
        out.relu_()
    }
}

/// A whole folded ResNet.
#[derive(Debug)]
pub struct FoldedResNet {
    pub spec: ArchSpec,
    pub layout: Layout,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    pub fc: FoldedLinear,
}

impl FoldedResNet {
    /// Builds the inference network from trained parameters.
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

    /// Stem (conv, ReLU, max-pool for the ImageNet family) on an input already in layout.
    pub fn stem(&self, x: &Tensor) -> Tensor {
        let x = self.stem.forward(x).relu_();
        match self.spec.stem {
            StemKind::Cifar => x,
            StemKind::Imagenet => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
        }
    }

    /// Global average pool and classifier.
    pub fn head(&self, features: &Tensor) -> Tensor {
        self.fc.forward(&features.mean_dim(&[2i64, 3][..], false, Kind::Float))
    }

    /// Dense forward pass: `[N, C, H, W]` f32 in any layout → `[N, classes]` logits.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = self.stem(&self.layout.apply(input));
        for block in &self.blocks {
            x = block.forward(&x);
        }
        self.head(&x)
    }
}
