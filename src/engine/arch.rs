//! Architecture descriptions: which ResNet, its stages, blocks and shapes. Plain data,
//! shared by the trainable parameters, the folded inference network and FLOP accounting.

use serde::{Deserialize, Serialize};

use super::EngineError;

/// The residual block type of a ResNet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34 and the CIFAR family).
    Basic,
    /// 1x1 → 3x3 → 1x1 with 4× expansion (ResNet-50), stride on the 3x3 (torchvision v1.5).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block relative to its inner width.
    pub fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// How the network starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StemKind {
    /// 3x3 stride-1 convolution, no pooling (CIFAR-style ResNets, small images).
    Cifar,
    /// 7x7 stride-2 convolution then 3x3 stride-2 max-pool (torchvision ResNets).
    Imagenet,
}

/// A ResNet variant: everything needed to build its parameters and count its FLOPs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchSpec {
    /// Canonical name, e.g. `resnet20` or `resnet50`.
    pub name: String,
    pub stem: StemKind,
    pub block: BlockKind,
    /// Blocks per stage.
    pub blocks: Vec<usize>,
    pub in_channels: i64,
    pub num_classes: i64,
}

/// One convolution's static shape (before any gating).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConvShape {
    pub in_ch: i64,
    pub out_ch: i64,
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
}

impl ConvShape {
    fn new(in_ch: i64, out_ch: i64, kernel: i64, stride: i64) -> Self {
        ConvShape { in_ch, out_ch, kernel, stride, padding: kernel / 2 }
    }

    /// Spatial output size for a square input of side `hw`.
    pub fn out_hw(&self, hw: i64) -> i64 {
        (hw + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// One residual block's static layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockSpec {
    /// torchvision's parameter prefix, e.g. `layer2.0`.
    pub prefix: String,
    /// Stage index, 0-based.
    pub stage: usize,
    /// Index within the stage.
    pub index: usize,
    /// The block's convolutions in order (`conv1`, `conv2`[, `conv3`]).
    pub convs: Vec<ConvShape>,
    /// The projection shortcut (`downsample.0`), when shape changes.
    pub downsample: Option<ConvShape>,
}

impl BlockSpec {
    pub fn in_ch(&self) -> i64 {
        self.convs[0].in_ch
    }

    pub fn out_ch(&self) -> i64 {
        self.convs[self.convs.len() - 1].out_ch
    }

    /// The block's inner width (what channel gates prune).
    pub fn inner_width(&self) -> i64 {
        self.convs[0].out_ch
    }

    pub fn stride(&self) -> i64 {
        self.convs.iter().map(|c| c.stride).product()
    }

    /// The block's output size for an `hw` input.
    pub fn out_hw(&self, hw: (i64, i64)) -> (i64, i64) {
        strided(hw, self.stride())
    }
}

/// The output size of a `hw` input at `stride` (a ResNet block or its padded convolutions):
/// each side ⌈side / stride⌉.
pub fn strided((h, w): (i64, i64), stride: i64) -> (i64, i64) {
    ((h - 1) / stride + 1, (w - 1) / stride + 1)
}

impl ArchSpec {
    /// The architectures sluice knows, for error messages and `--help`.
    pub const KNOWN: [&'static str; 6] =
        ["resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50"];

    /// Looks up an architecture by name.
    pub fn named(name: &str, in_channels: i64, num_classes: i64) -> Result<Self, EngineError> {
        let (stem, block, blocks) = match name {
            "resnet20" => (StemKind::Cifar, BlockKind::Basic, vec![3, 3, 3]),
            "resnet32" => (StemKind::Cifar, BlockKind::Basic, vec![5, 5, 5]),
            "resnet56" => (StemKind::Cifar, BlockKind::Basic, vec![9, 9, 9]),
            "resnet18" => (StemKind::Imagenet, BlockKind::Basic, vec![2, 2, 2, 2]),
            "resnet34" => (StemKind::Imagenet, BlockKind::Basic, vec![3, 4, 6, 3]),
            "resnet50" => (StemKind::Imagenet, BlockKind::Bottleneck, vec![3, 4, 6, 3]),
            other => {
                return Err(EngineError::UnknownArch {
                    name: other.to_string(),
                    known: Self::KNOWN.join(", "),
                });
            }
        };
        if in_channels < 1 || num_classes < 1 {
            return Err(EngineError::InvalidConfig(format!(
                "{name}: in_channels ({in_channels}) and num_classes ({num_classes}) must be positive"
            )));
        }
        Ok(ArchSpec { name: name.to_string(), stem, block, blocks, in_channels, num_classes })
    }

    /// Whether the name is one of the small-image (CIFAR-style) family.
    pub fn is_cifar(&self) -> bool {
        self.stem == StemKind::Cifar
    }

    /// The default input side for this family (28 for Fashion-MNIST-sized, 224 for ImageNet).
    pub fn default_input_hw(&self) -> i64 {
        match self.stem {
            StemKind::Cifar => 28,
            StemKind::Imagenet => 224,
        }
    }

    /// The stem convolution.
    pub fn stem_conv(&self) -> ConvShape {
        match self.stem {
            StemKind::Cifar => ConvShape::new(self.in_channels, 16, 3, 1),
            StemKind::Imagenet => ConvShape::new(self.in_channels, 64, 7, 2),
        }
    }

    /// Inner width of each stage's blocks.
    pub fn stage_planes(&self) -> Vec<i64> {
        match self.stem {
            StemKind::Cifar => vec![16, 32, 64],
            StemKind::Imagenet => vec![64, 128, 256, 512],
        }
    }

    /// Every residual block in forward order.
    pub fn block_specs(&self) -> Vec<BlockSpec> {
        let expansion = self.block.expansion();
        let mut in_ch = self.stem_conv().out_ch;
        let mut out = Vec::new();
        for (stage, (&n, planes)) in self.blocks.iter().zip(self.stage_planes()).enumerate() {
            for index in 0..n {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let out_ch = planes * expansion;
                let convs = match self.block {
                    BlockKind::Basic => {
                        vec![ConvShape::new(in_ch, planes, 3, stride), ConvShape::new(planes, planes, 3, 1)]
                    }
                    BlockKind::Bottleneck => vec![
                        ConvShape::new(in_ch, planes, 1, 1),
                        ConvShape::new(planes, planes, 3, stride),
                        ConvShape::new(planes, out_ch, 1, 1),
                    ],
                };
                let downsample =
                    (stride != 1 || in_ch != out_ch).then(|| ConvShape::new(in_ch, out_ch, 1, stride));
                out.push(BlockSpec {
                    prefix: format!("layer{}.{}", stage + 1, index),
                    stage,
                    index,
                    convs,
                    downsample,
                });
                in_ch = out_ch;
            }
        }
        out
    }

    /// Channels entering the classifier.
    pub fn feature_width(&self) -> i64 {
        self.stage_planes().last().copied().unwrap_or(0) * self.block.expansion()
    }

    /// Spatial side after the stem (and max-pool) for an input of side `hw`.
    pub fn after_stem_hw(&self, hw: i64) -> i64 {
        let hw = self.stem_conv().out_hw(hw);
        match self.stem {
            StemKind::Cifar => hw,
            StemKind::Imagenet => (hw + 2 - 3) / 2 + 1,
        }
    }

    /// Height and width after the stem (and max-pool) for an input of `hw`.
    pub fn after_stem(&self, hw: [i64; 2]) -> [i64; 2] {
        [self.after_stem_hw(hw[0]), self.after_stem_hw(hw[1])]
    }

    /// Height and width entering each residual block for an input of `hw`, then after the
    /// last one (one more entry than blocks).
    pub fn block_input_sizes(&self, hw: [i64; 2]) -> Vec<[i64; 2]> {
        let mut sizes = vec![self.after_stem(hw)];
        for block in self.block_specs() {
            let into = sizes[sizes.len() - 1];
            sizes.push(block.convs.iter().fold(into, |hw, c| [c.out_hw(hw[0]), c.out_hw(hw[1])]));
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_input_sizes_follow_the_strides() {
        let r50 = ArchSpec::named("resnet50", 3, 1000).unwrap();
        let sizes = r50.block_input_sizes([224, 224]);
        assert_eq!(sizes.len(), 17);
        assert_eq!((sizes[0], sizes[3], sizes[4], sizes[16]), ([56, 56], [56, 56], [28, 28], [7, 7]));
        let r20 = ArchSpec::named("resnet20", 1, 10).unwrap();
        assert_eq!(r20.block_input_sizes([28, 32])[9], [7, 8]);
    }

    #[test]
    fn block_layouts_follow_torchvision() {
        let r50 = ArchSpec::named("resnet50", 3, 1000).unwrap();
        let blocks = r50.block_specs();
        assert_eq!(blocks.len(), 16);
        assert_eq!(blocks[0].prefix, "layer1.0");
        assert_eq!(blocks[0].downsample.as_ref().map(|d| d.out_ch), Some(256));
        assert_eq!(blocks[3].convs[1].stride, 2, "stride sits on the 3x3 conv");
        assert_eq!(r50.feature_width(), 2048);
        let r20 = ArchSpec::named("resnet20", 1, 10).unwrap();
        assert_eq!(r20.block_specs().iter().filter(|b| b.downsample.is_some()).count(), 2);
        assert_eq!(r20.after_stem_hw(28), 28);
        assert_eq!(r50.after_stem_hw(224), 56);
    }

    #[test]
    fn unknown_arch_names_the_known_ones() {
        let err = ArchSpec::named("vgg16", 3, 10).unwrap_err().to_string();
        assert!(err.contains("vgg16") && err.contains("resnet50"), "{err}");
    }
}
