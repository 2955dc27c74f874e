//! The inference network's building blocks: batch-norm folded into each convolution at
//! load, weights laid out once in the engine's memory format, eval mode only. The engine
//! thread runs them under `no_grad`.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::arch::{ArchSpec, ConvShape, StemKind};
use super::onednn;
use super::params::{BN_EPS, BatchNormParams, ConvBn, ConvParams, LinearParams, ResNetParams};

/// Memory layout of activations and convolution weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// NHWC strides (PyTorch's `channels_last`), libtorch's own convolutions.
    ChannelsLast,
    /// Plain contiguous NCHW.
    Nchw,
    /// sluice's own oneDNN primitives (Debian's libdnnl): weights reordered once at load into
    /// the blocked layout each convolution's kernel wants, a primitive per input shape made
    /// once, activations channels-last, bias, ReLU and a block's residual add applied as
    /// post-ops of the convolution itself (engine/onednn.rs). The default: measured fastest
    /// here (docs/decisions.md).
    #[default]
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

impl std::fmt::Display for Layout {
    /// The name `--layout` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::ChannelsLast => "channels-last",
            Layout::Nchw => "nchw",
            Layout::Onednn => "onednn",
        })
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
    cpu_info_field("flags").is_some_and(|flags| flags.split_whitespace().any(|f| f == flag))
}

/// The value of the first `/proc/cpuinfo` line naming `key` (`model name`, `flags`; Linux,
/// `None` elsewhere).
pub fn cpu_info_field(key: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(key))?;
    line.split_once(':').map(|(_, v)| v.trim().to_string())
}

impl Layout {
    /// Whether this machine can run the layout (onednn needs oneDNN's CPU engine; the
    /// message says what is missing).
    pub fn check(self) -> Result<(), String> {
        match self {
            Layout::Onednn => onednn::available().map_err(|e| format!("layout onednn needs oneDNN: {e}")),
            _ => Ok(()),
        }
    }

    /// Whether activations are channels-last (strided) tensors.
    fn channels_last(self) -> bool {
        matches!(self, Layout::ChannelsLast | Layout::Onednn)
    }
}

/// How the engine holds a network's tensors: memory layout and number format, and the
/// input size its onednn weights are packed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Format {
    pub layout: Layout,
    pub precision: Precision,
    /// Height and width of the inputs the network will mostly see (the model's configured
    /// dims): the onednn layout makes each convolution's primitive and weight packing for
    /// this size at load (another size gets its own on its first call). `None`: the
    /// architecture's default side ([`ArchSpec::default_input_hw`]).
    pub input_hw: Option<[i64; 2]>,
    /// Inputs always come one at a time (a model whose `max_batch_size` is 1): the onednn
    /// layout then makes primitives for batch 1 only at load. Otherwise also for batch 8
    /// (oneDNN may want another weight layout once the batch exceeds 1; that packing is
    /// then made once, at load, rather than on a request's first call).
    pub unbatched: bool,
}

impl From<Layout> for Format {
    fn from(layout: Layout) -> Self {
        Format { layout, precision: Precision::Fp32, input_hw: None, unbatched: false }
    }
}

impl Format {
    pub fn new(layout: Layout, precision: Precision) -> Self {
        Format { layout, precision, input_hw: None, unbatched: false }
    }

    /// Whether this machine and libtorch can run the format ([`Precision::check`],
    /// [`Layout::check`]).
    pub fn check(self) -> Result<(), String> {
        self.precision.check()?;
        self.layout.check()
    }

    /// This format for a model that never batches (see [`Format::unbatched`]).
    pub fn unbatched(self) -> Self {
        Format { unbatched: true, ..self }
    }

    /// This format, prepared for inputs of `height × width`.
    pub fn for_input(self, height: i64, width: i64) -> Self {
        Format { input_hw: Some([height, width]), ..self }
    }

    /// The input size to prepare `spec`'s convolutions for.
    pub fn input_hw(self, spec: &ArchSpec) -> [i64; 2] {
        self.input_hw.unwrap_or([spec.default_input_hw(); 2])
    }

    /// Returns `t` (4-d) in this format; a no-op when it already is.
    pub fn apply(self, t: &Tensor) -> Tensor {
        let t = if t.kind() == self.precision.kind() {
            t.shallow_clone()
        } else {
            t.to_kind(self.precision.kind())
        };
        if self.layout.channels_last() {
            // tch has no memory-format argument: permute to NHWC, make contiguous, permute
            // back. The result has channels-last strides, which libtorch recognises.
            t.permute(TO_NHWC).contiguous().permute(FROM_NHWC)
        } else {
            t.contiguous()
        }
    }

    /// `t.index_select(dim, index)` that keeps this format (libtorch's own returns NCHW).
    pub fn gather(self, t: &Tensor, dim: usize, index: &Tensor) -> Tensor {
        if self.layout.channels_last() {
            t.permute(TO_NHWC).index_select(FROM_NHWC[dim], index).permute(FROM_NHWC)
        } else {
            t.index_select(dim as i64, index)
        }
    }

    /// The batch rows of `t` in `order` (`order[p]`: the row of `t` that becomes row `p`; all
    /// of them or a subset), a new tensor in `t`'s layout, copied one run of consecutive rows
    /// at a time: whole rows
    /// are contiguous in every layout, and a block copy of them took 1/2.7 of
    /// `index_select`'s time in isolation (docs/benchmarks.md, stop 33; within a whole
    /// forward the two were indistinguishable, stop 34).
    pub fn rows(self, t: &Tensor, order: &[usize]) -> Tensor {
        // The batch is the outermost dimension in every layout, so the first rows are dense
        // and `empty_like` keeps their strides.
        let out = t.narrow(0, 0, order.len() as i64).empty_like();
        let mut p = 0;
        while p < order.len() {
            let mut end = p + 1;
            while end < order.len() && order[end] == order[end - 1] + 1 {
                end += 1;
            }
            let len = (end - p) as i64;
            let mut dst = out.narrow(0, p as i64, len);
            dst.copy_(&t.narrow(0, order[p] as i64, len));
            p = end;
        }
        out
    }

    /// The batches `parts` (each in this format, same `C × H × W`) one after another as one
    /// batch in this format: one copy of each, whatever the layout (the batch is the
    /// outermost dimension in every one).
    pub fn cat_rows(self, parts: &[Tensor]) -> Tensor {
        let size = parts[0].size();
        let (c, h, w) = (size[1], size[2], size[3]);
        let n: i64 = parts.iter().map(|p| p.size()[0]).sum();
        let options = (parts[0].kind(), parts[0].device());
        let out = if self.layout.channels_last() {
            Tensor::empty([n, h, w, c], options).permute(FROM_NHWC)
        } else {
            Tensor::empty([n, c, h, w], options)
        };
        let mut start = 0;
        for part in parts {
            let rows = part.size()[0];
            out.narrow(0, start, rows).copy_(part);
            start += rows;
        }
        out
    }

    /// Global average pool of a `[N, C, H, W]` activation to FP32 `[N, C]`.
    pub fn pool(self, x: &Tensor) -> Tensor {
        x.mean_dim(&[2i64, 3][..], false, Kind::Float)
    }
}

/// Spatial size after `shape` for an input of `hw`.
pub fn out_hw(shape: &ConvShape, hw: [i64; 2]) -> [i64; 2] {
    [shape.out_hw(hw[0]), shape.out_hw(hw[1])]
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

/// How a folded convolution runs.
#[derive(Debug)]
enum Kernel {
    /// libtorch's convolution on a strided (NCHW or channels-last) weight in the engine's
    /// precision.
    Strided(Tensor),
    /// The onednn layout: sluice's own oneDNN primitives on weights packed at load.
    Packed(onednn::PackedConv),
}

/// A convolution with its batch-norm folded in: `conv(x, w') + b'`. Counts its calls, so
/// tests can prove that skipped work is not run.
#[derive(Debug)]
pub struct FoldedConv {
    kernel: Kernel,
    pub bias: Tensor,
    pub shape: ConvShape,
    calls: AtomicU64,
}

/// The batch size a batched model's convolutions also get a primitive for at load (the first
/// call of any other batch size makes its own). oneDNN may want another weight layout once the
/// batch exceeds 1; a packing is made once per layout and shared.
const BATCHED_PACK: i64 = 8;

impl FoldedConv {
    /// A convolution from already folded NCHW weight and bias, prepared for `format` and
    /// inputs of `in_hw` (height, width).
    ///
    /// `post` is what the network will call it with ([`FoldedConv::forward`],
    /// `forward_relu` or `forward_add_relu`): the onednn layout makes that primitive at load.
    ///
    /// # Panics
    /// For the onednn layout when oneDNN cannot make the convolution: model loading checks
    /// [`Layout::check`] first.
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        shape: ConvShape,
        format: Format,
        in_hw: [i64; 2],
        post: onednn::Post,
    ) -> Self {
        let size = weight.size();
        let shape = ConvShape { out_ch: size[0], in_ch: size[1], ..shape };
        let kind = format.precision.kind();
        let (kernel, bias) = match format.layout {
            Layout::Onednn => {
                let plain = weight.to_kind(kind).contiguous();
                let input = |batch: i64| [batch, shape.in_ch, in_hw[0], in_hw[1]];
                let fail = |e: String| -> ! { panic!("preparing a {size:?} convolution for oneDNN: {e}") };
                let packed = onednn::PackedConv::new(
                    &plain,
                    bias,
                    shape.padding,
                    shape.stride,
                    input(1),
                    post,
                    onednn::Algo::Fastest,
                )
                .unwrap_or_else(|e| fail(e));
                if !format.unbatched {
                    packed.prepare(input(BATCHED_PACK), post).unwrap_or_else(|e| fail(e));
                }
                // The primitive holds the bias in FP32; this copy stays in the engine precision
                // for `device()` and readers of the public field.
                (Kernel::Packed(packed), bias.to_kind(kind).contiguous())
            }
            _ => (Kernel::Strided(format.apply(weight)), bias.to_kind(kind).contiguous()),
        };
        FoldedConv { kernel, bias, shape, calls: AtomicU64::new(0) }
    }

    /// Folds `layer`'s batch-norm into its convolution.
    pub fn fold(layer: &ConvBn, format: Format, in_hw: [i64; 2], post: onednn::Post) -> Self {
        let (w, b) = fold_bn(&layer.conv, &layer.bn, None);
        FoldedConv::new(&w, &b, layer.conv.shape.clone(), format, in_hw, post)
    }

    /// Spatial size of this convolution's output for an input of `hw`.
    pub fn out_hw(&self, hw: [i64; 2]) -> [i64; 2] {
        out_hw(&self.shape, hw)
    }

    fn run(&self, x: &Tensor, relu: bool) -> Tensor {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let s = &self.shape;
        match &self.kernel {
            Kernel::Packed(packed) => packed.conv(x, relu),
            Kernel::Strided(weight) => {
                let mut y = x.conv2d(weight, Some(&self.bias), [s.stride; 2], [s.padding; 2], [1, 1], 1);
                if relu { y.relu_() } else { y }
            }
        }
    }

    /// The oneDNN convolution behind the onednn layout (`None` for the strided layouts).
    pub fn packed(&self) -> Option<&onednn::PackedConv> {
        match &self.kernel {
            Kernel::Packed(packed) => Some(packed),
            Kernel::Strided(_) => None,
        }
    }

    /// The device the convolution's tensors live on.
    pub fn device(&self) -> tch::Device {
        self.bias.device()
    }

    /// The convolution on `x` (which must already be in the engine's format).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.run(x, false)
    }

    /// `relu(conv(x))`, one fused primitive for the onednn layout.
    pub fn forward_relu(&self, x: &Tensor) -> Tensor {
        self.run(x, true)
    }

    /// `relu(conv(x) + shortcut)`: a residual block's end, written into `shortcut`'s storage
    /// and returned (so an identity shortcut's input is overwritten: the caller must not
    /// read it again). For the onednn layout, one fused primitive.
    pub fn forward_add_relu(&self, x: &Tensor, shortcut: Tensor) -> Tensor {
        let mut acc = shortcut;
        match &self.kernel {
            Kernel::Packed(packed) => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                packed.conv_add_relu_(&mut acc, x);
                acc
            }
            Kernel::Strided(_) => {
                let _ = acc.g_add_(&self.forward(x));
                acc.relu_()
            }
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

/// The residual branch of `layers` on `x` up to its last convolution's input.
fn inner(layers: &[FoldedConv], x: &Tensor) -> Tensor {
    let mut out = x.shallow_clone();
    for layer in &layers[..layers.len() - 1] {
        out = layer.forward_relu(&out);
    }
    out
}

/// The residual branch of `layers` on `x` (no shortcut, no final ReLU).
pub fn residual(layers: &[FoldedConv], x: &Tensor) -> Tensor {
    layers[layers.len() - 1].forward(&inner(layers, x))
}

/// `relu(residual(layers, x) + shortcut)`, written into `shortcut`'s storage, the last
/// convolution fused with the add and the ReLU where the layout allows (see
/// [`FoldedConv::forward_add_relu`]).
pub fn residual_add_relu(layers: &[FoldedConv], x: &Tensor, shortcut: Tensor) -> Tensor {
    layers[layers.len() - 1].forward_add_relu(&inner(layers, x), shortcut)
}

/// Convolutions of a block built from `convs` (in order) for a block input of `in_hw`.
pub fn fold_layers(
    convs: impl IntoIterator<Item = (Tensor, Tensor, ConvShape)>,
    format: Format,
    in_hw: [i64; 2],
) -> Vec<FoldedConv> {
    let mut hw = in_hw;
    let convs: Vec<_> = convs.into_iter().collect();
    let count = convs.len();
    convs
        .into_iter()
        .enumerate()
        .map(|(j, (w, b, shape))| {
            // Every convolution but the last is followed by a ReLU; the last ends the block.
            let post = if j + 1 == count { onednn::Post::AddRelu } else { onednn::Post::Relu };
            let conv = FoldedConv::new(&w, &b, shape, format, hw, post);
            hw = conv.out_hw(hw);
            conv
        })
        .collect()
}

impl FoldedBlock {
    pub fn shortcut(&self, x: &Tensor) -> Tensor {
        match &self.downsample {
            Some(ds) => ds.forward(x),
            None => x.shallow_clone(),
        }
    }

    /// `(output channels, stride)`.
    pub fn out_shape(&self) -> (i64, i64) {
        let out_ch = self.layers.last().map_or(0, |l| l.shape.out_ch);
        (out_ch, self.layers.iter().map(|l| l.shape.stride).product())
    }

    /// The block on `x`. With the onednn layout and an identity shortcut the output is
    /// written into `x`'s storage: `x` must not be read afterwards.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        residual_add_relu(&self.layers, x, self.shortcut(x))
    }
}

/// The stem: conv (+ReLU), and the ImageNet family's max-pool.
pub fn stem_forward(stem: &FoldedConv, kind: StemKind, x: &Tensor) -> Tensor {
    let x = stem.forward_relu(x);
    match kind {
        StemKind::Cifar => x,
        StemKind::Imagenet => x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
    }
}

/// The largest output, in bytes, a leading block may write for a whole batch before the
/// network runs it in tiles of rows instead ([`row_tiles`]): ResNet-50 at 224×224 writes
/// 25.7 MB per first-stage block at batch 8, more than this VM's 32 MiB L3 keeps with the
/// block's other tensors, and its fused residual adds then read and write memory, not cache
/// (docs/benchmarks.md, "Row tiles", stop 36).
pub const ROW_TILE_BYTES: i64 = 8 << 20;

/// How the leading blocks of a batch run in tiles of rows: each tile goes through
/// `blocks` blocks alone (so their activations stay in cache), then the tiles are put back
/// together and the rest of the network runs on the whole batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowTiles {
    /// How many leading blocks run per tile.
    pub blocks: usize,
    /// Rows per tile (the last one may have fewer).
    pub rows: i64,
}

impl RowTiles {
    /// `(first row, rows)` of each tile of a batch of `n`.
    pub fn spans(self, n: i64) -> impl Iterator<Item = (i64, i64)> {
        (0..n).step_by(self.rows.max(1) as usize).map(move |start| (start, self.rows.min(n - start)))
    }
}

/// The row tiles for a batch of `n` whose blocks (`(output channels, stride)` each, in
/// order) start from a `hw` input with `elem_bytes` per value: the leading blocks whose
/// output for the whole batch exceeds `budget` bytes run in tiles whose widest output fits
/// it (at least one row). `None` when the first block's output already fits, or when a
/// tile would hold the whole batch.
pub fn row_tiles(
    blocks: impl Iterator<Item = (i64, i64)>,
    n: i64,
    hw: [i64; 2],
    elem_bytes: i64,
    budget: i64,
) -> Option<RowTiles> {
    let (mut h, mut w) = (hw[0], hw[1]);
    let (mut lead, mut widest) = (0, 0);
    for (out_ch, stride) in blocks {
        (h, w) = super::arch::strided((h, w), stride);
        let row_bytes = out_ch.saturating_mul(h).saturating_mul(w).saturating_mul(elem_bytes);
        if row_bytes.saturating_mul(n) <= budget {
            break;
        }
        lead += 1;
        widest = widest.max(row_bytes);
    }
    let rows = (budget / widest.max(1)).max(1);
    (lead > 0 && rows < n).then_some(RowTiles { blocks: lead, rows })
}

/// A whole folded dense ResNet: the baseline that gated models are measured against.
#[derive(Debug)]
pub struct FoldedResNet {
    pub spec: ArchSpec,
    pub format: Format,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    pub fc: FoldedLinear,
    /// [`ROW_TILE_BYTES`] unless a test asks for other tiles.
    pub row_tile_bytes: i64,
}

impl FoldedResNet {
    /// Builds the dense inference network from trained parameters.
    pub fn fold(params: &ResNetParams, format: impl Into<Format>) -> Self {
        let format = format.into();
        let input = format.input_hw(&params.spec);
        let blocks = params
            .blocks
            .iter()
            .zip(params.spec.block_input_sizes(input))
            .map(|(b, hw)| {
                let convs = b.layers.iter().map(|l| {
                    let (w, bias) = fold_bn(&l.conv, &l.bn, None);
                    (w, bias, l.conv.shape.clone())
                });
                FoldedBlock {
                    layers: fold_layers(convs, format, hw),
                    downsample: b
                        .downsample
                        .as_ref()
                        .map(|d| FoldedConv::fold(d, format, hw, onednn::Post::None)),
                }
            })
            .collect();
        FoldedResNet {
            spec: params.spec.clone(),
            format,
            stem: FoldedConv::fold(&params.stem, format, input, onednn::Post::Relu),
            blocks,
            fc: FoldedLinear::copy_of(&params.fc),
            row_tile_bytes: ROW_TILE_BYTES,
        }
    }

    /// Dense forward pass: `[N, C, H, W]` f32 in any layout → `[N, classes]` FP32 logits.
    /// Large batches run their leading blocks in tiles of rows ([`row_tiles`]).
    pub fn forward(&self, input: &Tensor) -> Tensor {
        let mut x = stem_forward(&self.stem, self.spec.stem, &self.format.apply(input));
        let size = x.size();
        let shapes = self.blocks.iter().map(FoldedBlock::out_shape);
        let elem = x.kind().elt_size_in_bytes() as i64;
        let mut first = 0;
        if let Some(tiles) = row_tiles(shapes, size[0], [size[2], size[3]], elem, self.row_tile_bytes) {
            // Each tile reads its rows of the stem's output in place; identity shortcuts
            // write into them, which nothing reads afterwards.
            let parts: Vec<Tensor> = tiles
                .spans(size[0])
                .map(|(start, rows)| {
                    let mut t = x.narrow(0, start, rows);
                    for block in &self.blocks[..tiles.blocks] {
                        t = block.forward(&t);
                    }
                    t
                })
                .collect();
            x = self.format.cat_rows(&parts);
            first = tiles.blocks;
        }
        for block in &self.blocks[first..] {
            x = block.forward(&x);
        }
        self.fc.forward(&self.format.pool(&x))
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// An architecture's blocks as `row_tiles` reads them (output channels, stride).
    fn blocks_of(arch: &str, channels: i64) -> Vec<(i64, i64)> {
        let spec = ArchSpec::named(arch, channels, 10).unwrap();
        spec.block_specs().iter().map(|b| (b.out_ch(), b.stride())).collect()
    }

    #[test]
    fn batches_whose_leading_blocks_outgrow_the_budget_run_them_in_row_tiles() {
        let r50 = blocks_of("resnet50", 3);
        // FP32 at batch 8: the first stage writes 3.2 MB per row (25.7 MB per batch), the
        // second 1.6 MB (12.8 MB), the third 0.8 MB (6.4 MB, within 8 MiB).
        let tiles = row_tiles(r50.iter().copied(), 8, [56, 56], 4, ROW_TILE_BYTES).unwrap();
        assert_eq!(tiles, RowTiles { blocks: 7, rows: 2 });
        assert_eq!(tiles.spans(8).collect::<Vec<_>>(), [(0, 2), (2, 2), (4, 2), (6, 2)]);
        assert_eq!(RowTiles { blocks: 1, rows: 3 }.spans(7).collect::<Vec<_>>(), [(0, 3), (3, 3), (6, 1)]);
        // bf16 halves every output: the first stage alone at batch 8 (12.8 MB), 5 rows a tile.
        assert_eq!(
            row_tiles(r50.iter().copied(), 8, [56, 56], 2, ROW_TILE_BYTES),
            Some(RowTiles { blocks: 3, rows: 5 })
        );
        // Batch 1, and batch 2 (a tile would hold the whole batch): no tiles.
        assert_eq!(row_tiles(r50.iter().copied(), 1, [56, 56], 4, ROW_TILE_BYTES), None);
        assert_eq!(row_tiles(r50.iter().copied(), 2, [56, 56], 4, ROW_TILE_BYTES), None);
        // The shipped ResNet-20 at 28×28: 50 KB per row, 1.6 MB at batch 32.
        let r20 = blocks_of("resnet20", 1);
        assert_eq!(row_tiles(r20.iter().copied(), 32, [28, 28], 4, ROW_TILE_BYTES), None);
        // A budget smaller than one row: every block, one row a tile.
        assert_eq!(row_tiles(r20.iter().copied(), 5, [28, 28], 4, 1), Some(RowTiles { blocks: 9, rows: 1 }));
    }

    #[test]
    fn a_dense_batch_in_row_tiles_equals_the_whole_batch() {
        let _guard = tch::no_grad_guard();
        let spec = ArchSpec::named("resnet20", 1, 10).unwrap();
        let (_vs, params) =
            crate::engine::model::load_params(&crate::engine::ModelSource::random(spec, 3)).unwrap();
        let x = crate::engine::model::seeded(9, || Tensor::randn([5, 1, 28, 28], (Kind::Float, Device::Cpu)));
        for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
            let mut net = FoldedResNet::fold(&params.backbone, Format::from(layout));
            net.row_tile_bytes = i64::MAX;
            let whole = net.forward(&x);
            // Tiles of one row through every block; of two rows (the last one short) through
            // the first two stages.
            for budget in [1, 2 * 16 * 28 * 28 * 4] {
                net.row_tile_bytes = budget;
                let shapes = net.blocks.iter().map(FoldedBlock::out_shape);
                assert!(row_tiles(shapes, 5, [28, 28], 4, budget).is_some(), "budget {budget} tiles nothing");
                let tiled = net.forward(&x);
                let diff = (&tiled - &whole).abs().max().double_value(&[]);
                assert!(diff <= 1e-5, "{layout:?}, budget {budget}: {diff}");
            }
        }
    }

    /// `rows` is `index_select` on the batch dimension, keeping the layout, for orders with
    /// runs of consecutive rows, reversed rows, the identity and subsets (the rows that stay
    /// after an exit).
    #[test]
    fn rows_in_an_order_match_index_select_and_keep_the_layout() {
        let orders: [&[usize]; 5] =
            [&[2, 3, 4, 0, 5, 1], &[5, 4, 3, 2, 1, 0], &[0, 1, 2, 3, 4, 5], &[1, 3, 4], &[5]];
        for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
            let format = Format::from(layout);
            let t = format.apply(&Tensor::randn([6, 5, 3, 4], (Kind::Float, Device::Cpu)));
            for order in orders {
                let got = format.rows(&t, order);
                let index: Vec<i64> = order.iter().map(|&r| r as i64).collect();
                let want = t.index_select(0, &Tensor::from_slice(&index));
                assert!(got.equal(&want), "{layout:?} {order:?}");
                assert_eq!(got.stride(), t.stride(), "{layout:?} {order:?}: layout changed");
            }
        }
    }
}
