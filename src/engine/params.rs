//! Trainable ResNet parameters registered on a `VarStore` under torchvision's names
//! (`conv1.weight`, `layer1.0.bn2.running_var`, `fc.bias`, ...), so a torchvision
//! `state_dict` saved as safetensors loads into them and our own checkpoints look the same.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::arch::{ArchSpec, BlockSpec, ConvShape};

/// Batch-norm epsilon and momentum, as in torchvision.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// A bias-free convolution's weight.
#[derive(Debug)]
pub struct ConvParams {
    pub weight: Tensor,
    pub shape: ConvShape,
}

impl ConvParams {
    fn new(p: nn::Path, shape: &ConvShape) -> Self {
        let init = Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        };
        let dims = [shape.out_ch, shape.in_ch, shape.kernel, shape.kernel];
        ConvParams { weight: p.var("weight", &dims, init), shape: shape.clone() }
    }

    /// Unfused convolution (training and reference path).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = &self.shape;
        x.conv2d(&self.weight, None::<Tensor>, [s.stride; 2], [s.padding; 2], [1, 1], 1)
    }
}

/// A 2-d batch-norm's affine parameters and running statistics.
#[derive(Debug)]
pub struct BatchNormParams {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: Tensor,
}

impl BatchNormParams {
    fn new(p: nn::Path, channels: i64) -> Self {
        let tracked = Tensor::zeros([], (Kind::Int64, p.device()));
        BatchNormParams {
            weight: p.var("weight", &[channels], Init::Const(1.0)),
            bias: p.var("bias", &[channels], Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
            num_batches_tracked: p.add("num_batches_tracked", tracked, false),
        }
    }

    /// Batch-norm in training mode (batch statistics, running stats updated) or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        if train {
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            false,
        )
    }
}

/// A convolution followed by its batch-norm.
#[derive(Debug)]
pub struct ConvBn {
    pub conv: ConvParams,
    pub bn: BatchNormParams,
}

impl ConvBn {
    fn new(parent: &nn::Path, conv: &str, bn: &str, shape: &ConvShape) -> Self {
        ConvBn {
            conv: ConvParams::new(parent / conv, shape),
            bn: BatchNormParams::new(parent / bn, shape.out_ch),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), train)
    }
}

/// A fully connected layer.
#[derive(Debug)]
pub struct LinearParams {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LinearParams {
    /// PyTorch's default `nn.Linear` init: uniform in ±1/sqrt(in).
    pub fn new(p: nn::Path, inputs: i64, outputs: i64) -> Self {
        let bound = 1.0 / (inputs as f64).sqrt();
        LinearParams {
            weight: p.var("weight", &[outputs, inputs], Init::Uniform { lo: -bound, up: bound }),
            bias: p.var("bias", &[outputs], Init::Uniform { lo: -bound, up: bound }),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// One residual block's parameters.
#[derive(Debug)]
pub struct BlockParams {
    pub spec: BlockSpec,
    /// `conv1/bn1`, `conv2/bn2`[, `conv3/bn3`].
    pub layers: Vec<ConvBn>,
    /// `downsample.0` / `downsample.1`.
    pub downsample: Option<ConvBn>,
}

impl BlockParams {
    fn new(root: &nn::Path, spec: &BlockSpec) -> Self {
        let mut p = root.clone();
        for part in spec.prefix.split('.') {
            p = p / part;
        }
        let layers = spec
            .convs
            .iter()
            .enumerate()
            .map(|(i, shape)| ConvBn::new(&p, &format!("conv{}", i + 1), &format!("bn{}", i + 1), shape))
            .collect();
        let downsample =
            spec.downsample.as_ref().map(|shape| ConvBn::new(&(&p / "downsample"), "0", "1", shape));
        BlockParams { spec: spec.clone(), layers, downsample }
    }

    /// The residual branch alone (no shortcut, no final ReLU).
    pub fn residual_t(&self, x: &Tensor, train: bool) -> Tensor {
        let last = self.layers.len() - 1;
        let mut out = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            out = layer.forward_t(&out, train);
            if i < last {
                out = out.relu();
            }
        }
        out
    }

    /// The shortcut path.
    pub fn shortcut_t(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.downsample {
            Some(ds) => ds.forward_t(x, train),
            None => x.shallow_clone(),
        }
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        (self.residual_t(x, train) + self.shortcut_t(x, train)).relu()
    }
}

/// A whole ResNet's parameters with torchvision names.
#[derive(Debug)]
pub struct ResNetParams {
    pub spec: ArchSpec,
    pub stem: ConvBn,
    pub blocks: Vec<BlockParams>,
    pub fc: LinearParams,
}

impl ResNetParams {
    /// Registers every parameter of `spec` under `root`.
    pub fn new(root: &nn::Path, spec: &ArchSpec) -> Self {
        let stem = ConvBn::new(root, "conv1", "bn1", &spec.stem_conv());
        let blocks = spec.block_specs().iter().map(|b| BlockParams::new(root, b)).collect();
        let fc = LinearParams::new(root / "fc", spec.feature_width(), spec.num_classes);
        ResNetParams { spec: spec.clone(), stem, blocks, fc }
    }

    /// The stem: conv, batch-norm, ReLU and (ImageNet family) max-pool.
    pub fn stem_t(&self, x: &Tensor, train: bool) -> Tensor {
        let x = self.stem.forward_t(x, train).relu();
        match self.spec.stem {
            super::arch::StemKind::Cifar => x,
            super::arch::StemKind::Imagenet => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
        }
    }

    /// Global average pool and classifier.
    pub fn head(&self, features: &Tensor) -> Tensor {
        self.fc.forward(&features.mean_dim(&[2i64, 3][..], false, Kind::Float))
    }

    /// Unfused reference forward pass (training, and checking the folded engine).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = self.stem_t(x, train);
        for block in &self.blocks {
            x = block.forward_t(&x, train);
        }
        self.head(&x)
    }
}
