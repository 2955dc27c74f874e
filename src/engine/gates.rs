//! Which gates a model has (its config), the widths channel gates may choose, and the gate
//! parameters under `gates.*` (plus per-width batch-norm statistics under `slim.*`).
//!
//! Every channel and block gate reads the same input: the global average pool of the stem's
//! output, through one tiny MLP (`gates.trunk.fc1`, ReLU) and one output layer per gate
//! (sigmoid). Decisions therefore never depend on other gates' decisions: the whole
//! execution plan of an input is known before any gated work runs, and raising a threshold
//! can never make a later gate do more work. Exit heads read their stage's features (they
//! must: they classify). See docs/gating.md.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::EngineError;
use super::arch::{ArchSpec, BlockKind, BlockSpec};

/// Which blocks carry a block gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockGates {
    /// No block gates.
    #[default]
    None,
    /// Blocks whose shortcut is the identity (skipping them leaves the input unchanged).
    Identity,
    /// Every block; a skipped projection block still runs its shortcut.
    All,
}

/// A model's gate layout, from its `config.toml` (`[gates]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// A channel gate on every residual block.
    pub channel: bool,
    /// Which blocks may be skipped.
    pub block: BlockGates,
    /// Stages (1-based) followed by an early exit; the last stage cannot have one.
    pub exits: Vec<usize>,
    /// Exit heads start with a 3x3 stride-2 convolution to twice the stage's width
    /// (better small-model exits); otherwise they pool the stage's features directly.
    pub exit_conv: bool,
    /// Hidden units of the gate MLP.
    pub hidden: i64,
    /// At most this many allowed widths per block (multiples of 8).
    pub width_levels: i64,
    /// The narrowest allowed width, as a fraction of the block's inner width.
    pub min_width_fraction: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            channel: false,
            block: BlockGates::None,
            exits: Vec::new(),
            exit_conv: false,
            hidden: 32,
            width_levels: 8,
            min_width_fraction: 0.25,
        }
    }
}

impl GateConfig {
    /// Whether the model has any channel or block gate (and so a gate MLP).
    pub fn has_trunk(&self) -> bool {
        self.channel || self.block != BlockGates::None
    }
}

/// The widths a block's channel gate may choose: multiples of a step (itself a multiple of
/// 8) from the minimum up to the full inner width.
pub fn allowed_widths(inner: i64, config: &GateConfig) -> Vec<i64> {
    let ceil_div = |a: i64, b: i64| (a + b - 1) / b;
    let round8 = |v: i64| ceil_div(v, 8).max(1) * 8;
    let step = round8(ceil_div(inner, config.width_levels.max(1)));
    let min = round8((inner as f64 * config.min_width_fraction).ceil() as i64).min(inner);
    let mut widths: Vec<i64> =
        (1..).map(|i| i * step).skip_while(|&w| w < min).take_while(|&w| w < inner).collect();
    if widths.first() != Some(&min) && min < inner {
        widths.insert(0, min);
    }
    widths.push(inner);
    widths
}

/// Rounds a kept-channel count up to the nearest allowed width.
pub fn round_up_width(count: i64, allowed: &[i64]) -> i64 {
    allowed.iter().copied().find(|&w| w >= count).unwrap_or(allowed[allowed.len() - 1])
}

/// A gate's identity, as policies name it in per-gate overrides.
pub fn channel_gate_id(block: &BlockSpec) -> String {
    format!("{}.channel", block.prefix)
}

pub fn block_gate_id(block: &BlockSpec) -> String {
    format!("{}.block", block.prefix)
}

pub fn exit_gate_id(stage: usize) -> String {
    format!("exit{stage}")
}

/// Where one block's gates sit in the gate MLP's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockGateSlots {
    /// Channel saliencies: the inner width (Basic) or both inner widths (Bottleneck).
    pub channel: Option<Range<usize>>,
    pub block: Option<usize>,
    /// Allowed widths (only meaningful with a channel gate; otherwise just the full width).
    pub widths: Vec<i64>,
}

/// The gate layout of a concrete architecture: slots, widths and exits.
#[derive(Clone, Debug, PartialEq)]
pub struct GateLayout {
    pub config: GateConfig,
    pub blocks: Vec<BlockGateSlots>,
    /// Total outputs of the gate MLP.
    pub outputs: usize,
    /// Exit stages (1-based), ascending.
    pub exits: Vec<usize>,
}

impl GateLayout {
    /// Checks `config` against `spec` and lays out the gate outputs.
    pub fn new(spec: &ArchSpec, config: &GateConfig) -> Result<Self, EngineError> {
        let stages = spec.blocks.len();
        let mut exits = config.exits.clone();
        exits.sort_unstable();
        exits.dedup();
        if let Some(&bad) = exits.iter().find(|&&s| s == 0 || s >= stages) {
            return Err(EngineError::InvalidConfig(format!(
                "gates.exits: stage {bad} cannot have an exit ({} has stages 1..={stages}; the last has the classifier)",
                spec.name
            )));
        }
        if config.hidden < 1 || config.width_levels < 1 || !(0.0..=1.0).contains(&config.min_width_fraction) {
            return Err(EngineError::InvalidConfig(
                "gates: hidden and width_levels must be positive, min_width_fraction in [0, 1]".into(),
            ));
        }
        let mut outputs = 0;
        let mut blocks = Vec::new();
        for block in spec.block_specs() {
            let channel = config.channel.then(|| {
                let n =
                    block.inner_width() as usize * if spec.block == BlockKind::Bottleneck { 2 } else { 1 };
                outputs += n;
                outputs - n..outputs
            });
            let gated = match config.block {
                BlockGates::None => false,
                BlockGates::Identity => block.downsample.is_none(),
                BlockGates::All => true,
            };
            let block_slot = gated.then(|| {
                outputs += 1;
                outputs - 1
            });
            let widths = if config.channel {
                allowed_widths(block.inner_width(), config)
            } else {
                vec![block.inner_width()]
            };
            blocks.push(BlockGateSlots { channel, block: block_slot, widths });
        }
        Ok(GateLayout { config: config.clone(), blocks, outputs, exits })
    }

    /// Every gate id this layout has, for validating policy overrides.
    pub fn gate_ids(&self, spec: &ArchSpec) -> Vec<String> {
        let mut ids = Vec::new();
        for (slots, block) in self.blocks.iter().zip(spec.block_specs()) {
            if slots.channel.is_some() {
                ids.push(channel_gate_id(&block));
            }
            if slots.block.is_some() {
                ids.push(block_gate_id(&block));
            }
        }
        ids.extend(self.exits.iter().map(|&s| exit_gate_id(s)));
        ids
    }

    /// Input channels of the exit head after `stage` (1-based) and its conv width (0: none).
    pub fn exit_shape(&self, spec: &ArchSpec, stage: usize) -> (i64, i64) {
        let width = spec.stage_planes()[stage - 1] * spec.block.expansion();
        (width, if self.config.exit_conv { 2 * width } else { 0 })
    }
}

/// A linear layer's weight and bias.
#[derive(Debug)]
pub struct Dense {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Dense {
    fn new(p: nn::Path, inputs: i64, outputs: i64, bias_init: f64) -> Self {
        let bound = 1.0 / (inputs as f64).sqrt();
        Dense {
            weight: p.var("weight", &[outputs, inputs], Init::Uniform { lo: -bound, up: bound }),
            bias: p.var("bias", &[outputs], Init::Const(bias_init)),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// An exit head's parameters: optional 3x3/s2 conv (+bias, ReLU), then pool and linear.
#[derive(Debug)]
pub struct ExitParams {
    pub stage: usize,
    pub conv: Option<(Tensor, Tensor)>,
    pub fc: Dense,
}

/// Per-width running statistics of a batch-norm whose input width a channel gate changes.
#[derive(Debug)]
pub struct WidthStats {
    pub width: i64,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

/// One block's gate-related parameters.
#[derive(Debug, Default)]
pub struct BlockGateParams {
    pub channel: Option<Dense>,
    pub block: Option<Dense>,
    /// For each allowed width below full: statistics of the batch-norm(s) after the
    /// width-reduced sum (`bn2` for Basic; `bn2` and `bn3` for Bottleneck), full length.
    pub slim_stats: Vec<Vec<WidthStats>>,
}

/// Every gate parameter of a model.
#[derive(Debug)]
pub struct GateParams {
    pub layout: GateLayout,
    pub trunk: Option<Dense>,
    pub blocks: Vec<BlockGateParams>,
    pub exits: Vec<ExitParams>,
}

impl GateParams {
    /// Registers the gate parameters of `layout` under `root / "gates"` and `root / "slim"`.
    pub fn new(root: &nn::Path, spec: &ArchSpec, layout: &GateLayout) -> Self {
        let gates = root / "gates";
        let stem_width = spec.stem_conv().out_ch;
        let hidden = layout.config.hidden;
        let trunk =
            layout.config.has_trunk().then(|| Dense::new(&gates / "trunk" / "fc1", stem_width, hidden, 0.0));
        let mut blocks = Vec::new();
        for (slots, block) in layout.blocks.iter().zip(spec.block_specs()) {
            let mut p = gates.clone();
            let mut slim = root / "slim";
            for part in block.prefix.split('.') {
                p = p / part;
                slim = slim / part;
            }
            let channel =
                slots.channel.as_ref().map(|r| Dense::new(&p / "channel", hidden, r.len() as i64, 1.0));
            // Blocks start mostly on: a positive bias keeps early training close to dense.
            let block_gate = slots.block.map(|_| Dense::new(&p / "block", hidden, 1, 2.0));
            let mut slim_stats = Vec::new();
            if slots.channel.is_some() {
                let bns: Vec<(&str, i64)> = match spec.block {
                    BlockKind::Basic => vec![("bn2", block.out_ch())],
                    BlockKind::Bottleneck => vec![("bn2", block.inner_width()), ("bn3", block.out_ch())],
                };
                for &width in &slots.widths[..slots.widths.len() - 1] {
                    slim_stats.push(
                        bns.iter()
                            .map(|&(bn, channels)| {
                                let q = &slim / bn / width;
                                WidthStats {
                                    width,
                                    running_mean: q.zeros_no_train("running_mean", &[channels]),
                                    running_var: q.ones_no_train("running_var", &[channels]),
                                }
                            })
                            .collect(),
                    );
                }
            }
            blocks.push(BlockGateParams { channel, block: block_gate, slim_stats });
        }
        let exits = layout
            .exits
            .iter()
            .map(|&stage| {
                let p = &gates / format!("exit{stage}");
                let (width, conv_width) = layout.exit_shape(spec, stage);
                let conv = (conv_width > 0).then(|| {
                    let q = &p / "conv";
                    let init = Init::Kaiming {
                        dist: nn::init::NormalOrUniform::Normal,
                        fan: nn::init::FanInOut::FanOut,
                        non_linearity: nn::init::NonLinearity::ReLU,
                    };
                    (
                        q.var("weight", &[conv_width, width, 3, 3], init),
                        q.var("bias", &[conv_width], Init::Const(0.0)),
                    )
                });
                let fc_in = if conv_width > 0 { conv_width } else { width };
                ExitParams { stage, conv, fc: Dense::new(&p / "fc", fc_in, spec.num_classes, 0.0) }
            })
            .collect();
        GateParams { layout: layout.clone(), trunk, blocks, exits }
    }
}

impl ExitParams {
    /// Exit logits from the stage's features (training and reference path).
    pub fn forward(&self, features: &Tensor) -> Tensor {
        let x = match &self.conv {
            Some((w, b)) => features.conv2d(w, Some(b), [2, 2], [1, 1], [1, 1], 1).relu(),
            None => features.shallow_clone(),
        };
        self.fc.forward(&x.mean_dim(&[2i64, 3][..], false, Kind::Float))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_widths_are_multiples_of_eight_with_a_minimum() {
        let c = GateConfig::default();
        assert_eq!(allowed_widths(16, &c), vec![8, 16]);
        assert_eq!(allowed_widths(32, &c), vec![8, 16, 24, 32]);
        assert_eq!(allowed_widths(64, &c), vec![16, 24, 32, 40, 48, 56, 64]);
        assert_eq!(allowed_widths(512, &c), vec![128, 192, 256, 320, 384, 448, 512]);
        for inner in [16, 32, 64, 128, 256, 512] {
            assert!(allowed_widths(inner, &c).iter().all(|w| w % 8 == 0));
        }
        assert_eq!(round_up_width(0, &[8, 16]), 8);
        assert_eq!(round_up_width(9, &[8, 16]), 16);
        assert_eq!(round_up_width(99, &[8, 16]), 16);
    }

    #[test]
    fn layout_counts_slots_and_rejects_bad_exits() {
        let spec = ArchSpec::named("resnet20", 1, 10).unwrap();
        let config = GateConfig {
            channel: true,
            block: BlockGates::Identity,
            exits: vec![1, 2],
            ..Default::default()
        };
        let layout = GateLayout::new(&spec, &config).unwrap();
        // 9 channel gates of 16/32/64 channels, 7 identity blocks.
        assert_eq!(layout.outputs, 3 * 16 + 3 * 32 + 3 * 64 + 7);
        assert_eq!(layout.gate_ids(&spec).len(), 9 + 7 + 2);
        let bad = GateConfig { exits: vec![3], ..config };
        let err = GateLayout::new(&spec, &bad).unwrap_err().to_string();
        assert!(err.contains("stage 3"), "{err}");
    }
}
