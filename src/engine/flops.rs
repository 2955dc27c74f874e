//! Analytic FLOP accounting. FLOPs = 2 × multiply-accumulates of every executed convolution
//! and linear layer, from the real shapes they ran at (DESIGN.md). Batch-norm is folded,
//! and ReLU, additions and pooling are not counted, as in the published MAC counts.

use serde::Serialize;

use super::arch::{ArchSpec, BlockSpec, ConvShape};

/// FLOPs of one convolution producing `out_ch` channels of `out_h × out_w` from `in_ch`
/// input channels.
pub fn conv_flops(in_ch: i64, out_ch: i64, kernel: i64, out_h: i64, out_w: i64) -> u64 {
    2 * (in_ch * out_ch * kernel * kernel * out_h * out_w) as u64
}

/// FLOPs of a fully connected layer.
pub fn linear_flops(inputs: i64, outputs: i64) -> u64 {
    2 * (inputs * outputs) as u64
}

/// FLOPs of a residual branch whose inner widths are `widths` (one per inner width: `[k]`
/// for Basic, `[k1, k2]` for Bottleneck), for a block input of `h × w`. The projection
/// shortcut is not included (see [`shortcut_flops`]).
pub fn residual_flops(block: &BlockSpec, h: i64, w: i64, widths: &[i64]) -> u64 {
    let last = block.convs.len() - 1;
    let (mut h, mut w) = (h, w);
    let mut total = 0;
    for (j, conv) in block.convs.iter().enumerate() {
        let in_ch = if j == 0 { conv.in_ch } else { widths[j - 1] };
        let out_ch = if j == last { conv.out_ch } else { widths[j] };
        (h, w) = (conv.out_hw(h), conv.out_hw(w));
        total += conv_flops(in_ch, out_ch, conv.kernel, h, w);
    }
    total
}

/// FLOPs of a block's projection shortcut (0 for an identity shortcut).
pub fn shortcut_flops(block: &BlockSpec, h: i64, w: i64) -> u64 {
    block.downsample.as_ref().map_or(0, |d| conv_flops(d.in_ch, d.out_ch, d.kernel, d.out_hw(h), d.out_hw(w)))
}

/// One layer of a dense network with its cost, for `sluice model info`.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCost {
    /// torchvision's parameter prefix (`layer1.0.conv2`, `fc`).
    pub name: String,
    /// `conv` or `linear`.
    pub kind: &'static str,
    pub in_ch: i64,
    pub out_ch: i64,
    pub kernel: i64,
    pub stride: i64,
    /// Output spatial size `[h, w]` (`[1, 1]` for linear).
    pub out_hw: [i64; 2],
    pub flops: u64,
    /// Trainable parameters of the layer including its batch-norm's affine pair.
    pub params: u64,
}

fn conv_cost(name: String, s: &ConvShape, h: i64, w: i64) -> (LayerCost, i64, i64) {
    let (oh, ow) = (s.out_hw(h), s.out_hw(w));
    let cost = LayerCost {
        name,
        kind: "conv",
        in_ch: s.in_ch,
        out_ch: s.out_ch,
        kernel: s.kernel,
        stride: s.stride,
        out_hw: [oh, ow],
        flops: conv_flops(s.in_ch, s.out_ch, s.kernel, oh, ow),
        params: (s.in_ch * s.out_ch * s.kernel * s.kernel + 2 * s.out_ch) as u64,
    };
    (cost, oh, ow)
}

/// Every dense layer of `spec` at input size `h × w`, in forward order.
pub fn dense_layers(spec: &ArchSpec, h: i64, w: i64) -> Vec<LayerCost> {
    let mut layers = Vec::new();
    let (stem, mut h, mut w) = conv_cost("conv1".into(), &spec.stem_conv(), h, w);
    layers.push(stem);
    if spec.stem == super::arch::StemKind::Imagenet {
        h = (h - 1) / 2 + 1;
        w = (w - 1) / 2 + 1;
    }
    for block in spec.block_specs() {
        let (bh, bw) = (h, w);
        for (i, conv) in block.convs.iter().enumerate() {
            let (cost, oh, ow) = conv_cost(format!("{}.conv{}", block.prefix, i + 1), conv, h, w);
            layers.push(cost);
            (h, w) = (oh, ow);
        }
        if let Some(ds) = &block.downsample {
            layers.push(conv_cost(format!("{}.downsample.0", block.prefix), ds, bh, bw).0);
        }
    }
    let (f, c) = (spec.feature_width(), spec.num_classes);
    layers.push(LayerCost {
        name: "fc".into(),
        kind: "linear",
        in_ch: f,
        out_ch: c,
        kernel: 1,
        stride: 1,
        out_hw: [1, 1],
        flops: linear_flops(f, c),
        params: (f * c + c) as u64,
    });
    layers
}

/// FLOPs of the stem convolution for an input of `h × w`.
pub fn stem_flops(spec: &ArchSpec, h: i64, w: i64) -> u64 {
    let s = spec.stem_conv();
    conv_flops(s.in_ch, s.out_ch, s.kernel, s.out_hw(h), s.out_hw(w))
}

/// Dense FLOPs of `spec` for one input of size `h × w` (no allocation: it runs per batch).
pub fn dense_flops(spec: &ArchSpec, h: i64, w: i64) -> u64 {
    let (mut h2, mut w2) = (spec.after_stem_hw(h), spec.after_stem_hw(w));
    let mut total = stem_flops(spec, h, w) + linear_flops(spec.feature_width(), spec.num_classes);
    for block in spec.block_specs() {
        let widths = [block.inner_width(); 2];
        total +=
            residual_flops(&block, h2, w2, &widths[..block.convs.len() - 1]) + shortcut_flops(&block, h2, w2);
        (h2, w2) = block.out_hw((h2, w2));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: u64, published_macs: f64, tolerance: f64) -> bool {
        let macs = actual as f64 / 2.0;
        (macs - published_macs).abs() / published_macs <= tolerance
    }

    #[test]
    fn matches_published_mac_counts() {
        let r50 = ArchSpec::named("resnet50", 3, 1000).unwrap();
        let r18 = ArchSpec::named("resnet18", 3, 1000).unwrap();
        let r20 = ArchSpec::named("resnet20", 3, 10).unwrap();
        assert!(within(dense_flops(&r50, 224, 224), 4.1e9, 0.02), "{}", dense_flops(&r50, 224, 224));
        assert!(within(dense_flops(&r18, 224, 224), 1.8e9, 0.02), "{}", dense_flops(&r18, 224, 224));
        assert!(within(dense_flops(&r20, 32, 32), 41e6, 0.02), "{}", dense_flops(&r20, 32, 32));
    }

    #[test]
    fn parameter_counts_match_torchvision() {
        // torchvision: sum(p.numel() for p in model.parameters())
        let count = |name| -> u64 {
            let spec = ArchSpec::named(name, 3, 1000).unwrap();
            dense_layers(&spec, 224, 224).iter().map(|l| l.params).sum()
        };
        assert_eq!(count("resnet18"), 11_689_512);
        assert_eq!(count("resnet34"), 21_797_672);
        assert_eq!(count("resnet50"), 25_557_032);
    }

    #[test]
    fn residual_and_shortcut_flops_add_up_to_dense() {
        for arch in ["resnet20", "resnet50"] {
            let spec = ArchSpec::named(arch, 3, 10).unwrap();
            let hw = spec.default_input_hw();
            let (mut h, mut w) = (spec.after_stem_hw(hw), spec.after_stem_hw(hw));
            let mut blocks = 0;
            for b in spec.block_specs() {
                let widths = vec![b.inner_width(); b.convs.len() - 1];
                blocks += residual_flops(&b, h, w, &widths) + shortcut_flops(&b, h, w);
                (h, w) = b.out_hw((h, w));
            }
            let stem = dense_layers(&spec, hw, hw)[0].flops;
            assert_eq!(stem + blocks + linear_flops(spec.feature_width(), 10), dense_flops(&spec, hw, hw));
        }
    }

    #[test]
    fn dense_flops_equal_the_sum_over_layers() {
        for arch in ["resnet20", "resnet18", "resnet50"] {
            let spec = ArchSpec::named(arch, 3, 10).unwrap();
            for (h, w) in [(28, 28), (64, 48), (224, 224)] {
                let layers: u64 = dense_layers(&spec, h, w).iter().map(|l| l.flops).sum();
                assert_eq!(dense_flops(&spec, h, w), layers, "{arch} {h}x{w}");
            }
        }
    }

    #[test]
    fn flops_scale_with_input_area() {
        let r20 = ArchSpec::named("resnet20", 1, 10).unwrap();
        let fc = linear_flops(64, 10);
        let small = dense_flops(&r20, 28, 28) - fc;
        let big = dense_flops(&r20, 56, 56) - fc;
        assert_eq!(big, 4 * small);
    }
}
