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
    /// oneDNN's own blocked layout: weights reordered once at load for the convolution that
    /// uses them, activations kept as oneDNN tensors from the stem to the pooling, so no
    /// convolution reorders its weights or its input on a call (docs/decisions.md).
    Onednn,
}

/// Logical → physical dimension order of a channels-last 4-d tensor, and back.
const TO_NHWC: [i64; 4] = [0, 2, 3, 1];
const FROM_NHWC: [i64; 4] = [0, 3, 1, 2];

impl std::str::FromStr for Layout {
    type Err = String;

    /// `channels-last`, `nchw` or `onednn`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "channels-last" => Ok(Layout::ChannelsLast),
            "nchw" => Ok(Layout::Nchw),
            "onednn" => Ok(Layout::Onednn),
            other => Err(format!("unknown layout `{other}` (channels-last, nchw or onednn)")),
        }
    }
}

/// Number format of weights and activations. Pooling, the gate heads, the exit and final
/// classifiers and the logits are FP32 in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    /// bfloat16 weights and activations, FP32 accumulation inside the convolutions (oneDNN
    /// on AVX512-BF16 / AMX); needs a CPU that has the instructions ([`Precision::check`]).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `fp32` or `bf16`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}` (fp32 or bf16)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// Whether this CPU computes in this precision natively. bf16 without AVX512-BF16 or
    /// AMX-BF16 would be emulated by libtorch, slower than FP32: refused with the reason.
    pub fn check(self) -> Result<(), String> {
        match self {
            Precision::Fp32 => Ok(()),
            Precision::Bf16 => {
                #[cfg(target_arch = "x86_64")]
                {
                    let native = std::arch::is_x86_feature_detected!("avx512bf16") || cpu_flag("amx_bf16");
                    if native {
                        return Ok(());
                    }
                }
                Err("bf16 needs a CPU with AVX512-BF16 or AMX-BF16 instructions, which this one \
                     lacks (libtorch would emulate bf16, slower than fp32); use precision = \"fp32\""
                    .to_string())
            }
        }
    }
}

/// Whether `/proc/cpuinfo` lists `flag` (Linux; false elsewhere).
fn cpu_flag(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == flag))
        })
        .unwrap_or(false)
}

/// How the engine holds a network's tensors: memory layout and number format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Format {
    pub layout: Layout,
    pub precision: Precision,
}

impl From<Layout> for Format {
    fn from(layout: Layout) -> Self {
        Format { layout, precision: Precision::Fp32 }
    }
}

impl Format {
    pub fn new(layout: Layout, precision: Precision) -> Self {
        Format { layout, precision }
    }

    /// Returns `t` (4-d) in this format; a no-op when it already is.
    pub fn apply(self, t: &Tensor) -> Tensor {
        if t.is_mkldnn() {
            return t.shallow_clone();
        }
        let t = if t.kind() == self.precision.kind() {
            t.shallow_clone()
        } else {
            t.to_kind(self.precision.kind())
        };
        match self.layout {
            Layout::Nchw => t.contiguous(),
            // tch has no memory-format argument: permute to NHWC, make contiguous, permute
            // back. The result has channels-last strides, which libtorch recognises.
            Layout::ChannelsLast => t.permute(TO_NHWC).contiguous().permute(FROM_NHWC),
            Layout::Onednn => t.contiguous().to_mkldnn(),
        }
    }

    /// A plain (strided) tensor with `t`'s values: itself unless it is a oneDNN tensor.
    pub fn plain(self, t: &Tensor) -> Tensor {
        if t.is_mkldnn() { t.to_dense(None, false) } else { t.shallow_clone() }
    }

    /// `t.index_select(dim, index)` that keeps this format (libtorch's own returns NCHW and
    /// has no oneDNN kernel: those go through a plain copy).
    pub fn gather(self, t: &Tensor, dim: usize, index: &Tensor) -> Tensor {
        match self.layout {
            Layout::Nchw => t.index_select(dim as i64, index),
            Layout::ChannelsLast => t.permute(TO_NHWC).index_select(FROM_NHWC[dim], index).permute(FROM_NHWC),
            Layout::Onednn => self.plain(t).index_select(dim as i64, index).to_mkldnn(),
        }
    }

    /// `dst` with `src`'s rows added at `index` along the batch dimension. In place (and
    /// returned) for strided layouts; a new tensor for oneDNN tensors, which have no
    /// indexed add.
    pub fn add_rows(self, dst: Tensor, rows: &[(Tensor, Tensor)]) -> Tensor {
        match self.layout {
            Layout::Nchw => {
                for (index, src) in rows {
                    let _ = dst.shallow_clone().index_add_(0, index, src);
                }
                dst
            }
            Layout::ChannelsLast => {
                for (index, src) in rows {
                    let _ = dst.permute(TO_NHWC).index_add_(0, index, &src.permute(TO_NHWC));
                }
                dst
            }
            Layout::Onednn => {
                let out = self.plain(&dst);
                for (index, src) in rows {
                    let _ = out.shallow_clone().index_add_(0, index, &self.plain(src));
                }
                out.to_mkldnn()
            }
        }
    }

    /// Global average pool of a `[N, C, H, W]` activation to FP32 `[N, C]`.
    pub fn pool(self, x: &Tensor) -> Tensor {
        match self.layout {
            Layout::Onednn => {
                let pooled = x.adaptive_avg_pool2d([1, 1]).to_dense(None, false);
                pooled.to_kind(Kind::Float).flatten(1, -1)
            }
            _ => x.mean_dim(&[2i64, 3][..], false, Kind::Float),
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
    /// In the engine's format: strided (NCHW or channels-last) in its precision, or a
    /// oneDNN tensor already reordered for this convolution's shape.
    pub weight: Tensor,
    pub bias: Tensor,
    pub shape: ConvShape,
    packed: bool,
    calls: AtomicU64,
}

impl FoldedConv {
    /// A convolution from already folded NCHW weight and bias, prepared for `format`.
    pub fn new(weight: &Tensor, bias: &Tensor, shape: ConvShape, format: Format) -> Self {
        let size = weight.size();
        let shape = ConvShape { out_ch: size[0], in_ch: size[1], ..shape };
        let kind = format.precision.kind();
        let (weight, bias, packed) = match format.layout {
            Layout::Onednn => {
                let w = weight.to_kind(kind).contiguous().to_mkldnn();
                let w = w.mkldnn_reorder_conv2d_weight(
                    [shape.padding; 2],
                    [shape.stride; 2],
                    [1, 1],
                    1,
                    None::<&[i64]>,
                );
                (w, bias.to_kind(kind).contiguous().to_mkldnn(), true)
            }
            _ => (format.apply(weight), bias.to_kind(kind).contiguous(), false),
        };
        FoldedConv { weight, bias, shape, packed, calls: AtomicU64::new(0) }
    }

    /// Folds `layer`'s batch-norm into its convolution.
    pub fn fold(layer: &ConvBn, format: Format) -> Self {
        let (w, b) = fold_bn(&layer.conv, &layer.bn, None);
        FoldedConv::new(&w, &b, layer.conv.shape.clone(), format)
    }

    /// The convolution on `x` (which must already be in the engine's format).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let s = &self.shape;
        if self.packed {
            x.mkldnn_convolution(&self.weight, Some(&self.bias), [s.padding; 2], [s.stride; 2], [1, 1], 1)
        } else {
            x.conv2d(&self.weight, Some(&self.bias), [s.stride; 2], [s.padding; 2], [1, 1], 1)
        }
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
    pub format: Format,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    pub fc: FoldedLinear,
}

impl FoldedResNet {
    /// Builds the dense inference network from trained parameters.
    pub fn fold(params: &ResNetParams, format: impl Into<Format>) -> Self {
        let format = format.into();
        let blocks = params
            .blocks
            .iter()
            .map(|b| FoldedBlock {
                layers: b.layers.iter().map(|l| FoldedConv::fold(l, format)).collect(),
                downsample: b.downsample.as_ref().map(|d| FoldedConv::fold(d, format)),
            })
            .collect();
        FoldedResNet {
            spec: params.spec.clone(),
            format,
            stem: FoldedConv::fold(&params.stem, format),
            blocks,
            fc: FoldedLinear::copy_of(&params.fc),
        }
    }

    /// Dense forward pass: `[N, C, H, W]` f32 in any layout → `[N, classes]` FP32 logits.
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = stem_forward(&self.stem, self.spec.stem, &self.format.apply(input));
        for block in &self.blocks {
            x = block.forward(&x);
        }
        self.fc.forward(&self.format.pool(&x))
    }
}
