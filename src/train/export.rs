//! From a trained run to a model folder: serving weights (prefix channel gates written as
//! per-channel layers), per-width batch-norm statistics measured on training images
//! ("BN calibration"), and `config.toml`.

use std::path::Path;

use tch::{Kind, Tensor};

use super::Trainer;
use super::net::{TrainableNet, sliced_conv};
use crate::data::{DataError, Dataset, Split};
use crate::engine::model::{NetworkParams, load_params};
use crate::engine::params::{BN_EPS, BatchNormParams, ResNetParams};
use crate::engine::{ModelSource, weights};
use crate::repository::{CONFIG_FILE, ImageConfig, InputConfig, ModelConfig, OutputConfig};

/// Images used to measure each width's batch-norm statistics.
const CALIBRATION_IMAGES: usize = 4096;

/// Writes `dir/model.safetensors` and `dir/config.toml` for the trained network (the
/// dataset's class names and normalisation recorded in it). With `precise_bn`, the
/// full-width batch-norm statistics are first re-measured on clean training images
/// (training kept momentum averages over augmented batches of a moving network).
pub fn export_model(
    trainer: &Trainer,
    data: &Dataset,
    dir: &Path,
    name: &str,
    precise_bn: bool,
) -> anyhow::Result<()> {
    let train = &data.train;
    let _guard = tch::no_grad_guard();
    std::fs::create_dir_all(dir)?;
    if precise_bn {
        measure_full_width_stats(&trainer.net.backbone, train)?;
    }
    let source = ModelSource {
        gates: trainer.config.gates.clone(),
        ..ModelSource::random(trainer.net.spec.clone(), 0)
    };
    let (vs, serving) = load_params(&source)?;
    trainer.net.export(&serving);
    calibrate_width_stats(&trainer.net, &serving, train)?;
    weights::save(&vs, &dir.join("model.safetensors"))?;
    let config = ModelConfig {
        name: name.to_string(),
        version: "1".into(),
        architecture: trainer.config.arch.clone(),
        weights: "model.safetensors".into(),
        calibration: None,
        max_batch_size: 32,
        precision: Default::default(),
        input: InputConfig {
            name: "input".into(),
            dims: trainer.config.dims,
            datatype: Default::default(),
            image: Some(ImageConfig::new(train.norm.mean.clone(), train.norm.std.clone())),
        },
        output: OutputConfig { name: "logits".into(), labels: data.labels.clone() },
        gates: trainer.config.gates.clone(),
        batching: Default::default(),
        policy: Default::default(),
        limits: Default::default(),
        requests: Default::default(),
        controller: Default::default(),
    };
    std::fs::write(dir.join(CONFIG_FILE), toml::to_string_pretty(&config)?)?;
    Ok(())
}

/// Re-measures every batch-norm's running statistics of the full-width network as exact
/// averages over clean training images ("precise BN"), in place.
pub fn measure_full_width_stats(b: &ResNetParams, train: &Split) -> Result<(), DataError> {
    let n = CALIBRATION_IMAGES.min(train.len());
    let mut sums: Vec<(Tensor, Tensor)> = Vec::new();
    let mut batches = 0.0;
    for start in (0..n).step_by(512) {
        let stats = full_width_pass(b, &train.images(start..(start + 512).min(n))?);
        if sums.is_empty() {
            sums = stats;
        } else {
            for ((m, v), (bm, bv)) in sums.iter_mut().zip(stats) {
                *m = &*m + bm;
                *v = &*v + bv;
            }
        }
        batches += 1.0;
    }
    for (bn, (m, v)) in bns(b).into_iter().zip(&sums) {
        bn.running_mean.shallow_clone().copy_(&(m / batches));
        bn.running_var.shallow_clone().copy_(&(v / batches));
    }
    Ok(())
}

/// Every batch-norm of the backbone in forward order: stem, then per block conv1's, conv2's
/// (conv3's) and the projection's.
fn bns(b: &ResNetParams) -> Vec<&BatchNormParams> {
    let mut out = vec![&b.stem.bn];
    for block in &b.blocks {
        out.extend(block.layers.iter().map(|l| &l.bn));
        if let Some(ds) = &block.downsample {
            out.push(&ds.bn);
        }
    }
    out
}

/// Normalises `x` with its own batch statistics; returns it and (mean, unbiased variance).
fn batch_normalize(bn: &BatchNormParams, x: &Tensor) -> (Tensor, (Tensor, Tensor)) {
    let mean = x.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
    let var = x.var_dim(&[0i64, 2, 3][..], true, false);
    let y = x.batch_norm(
        Some(&bn.weight),
        Some(&bn.bias),
        None::<&Tensor>,
        None::<&Tensor>,
        true,
        0.1,
        BN_EPS,
        false,
    );
    (y, (mean, var))
}

/// A full-width pass normalising with batch statistics; returns them in [`bns`] order.
fn full_width_pass(b: &ResNetParams, x: &Tensor) -> Vec<(Tensor, Tensor)> {
    let mut stats = Vec::new();
    let (h, s) = batch_normalize(&b.stem.bn, &b.stem.conv.forward(x));
    stats.push(s);
    let mut h = h.relu();
    if b.spec.stem == crate::engine::StemKind::Imagenet {
        h = h.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
    }
    for block in &b.blocks {
        let mut r = h.shallow_clone();
        for (i, layer) in block.layers.iter().enumerate() {
            let (y, s) = batch_normalize(&layer.bn, &layer.conv.forward(&r));
            stats.push(s);
            r = if i + 1 < block.layers.len() { y.relu() } else { y };
        }
        let shortcut = match &block.downsample {
            Some(ds) => {
                let (y, s) = batch_normalize(&ds.bn, &ds.conv.forward(&h));
                stats.push(s);
                y
            }
            None => h.shallow_clone(),
        };
        h = (r + shortcut).relu();
    }
    stats
}

/// For every allowed width below full, the statistics of the batch-norms after a
/// width-reduced sum (`bn2`; `bn2` and `bn3` in a Bottleneck), measured with all blocks at
/// the same relative width level.
fn calibrate_width_stats(
    net: &TrainableNet,
    serving: &NetworkParams,
    train: &Split,
) -> Result<(), DataError> {
    let levels = net.layout.blocks.iter().map(|s| s.widths.len()).max().unwrap_or(1);
    let blocks = net.layout.blocks.len();
    // sums[b][v] = (per batch-norm: sum of means, sum of variances; batches)
    type Sums = (Vec<(Tensor, Tensor)>, f64);
    let mut sums: Vec<Vec<Option<Sums>>> =
        net.layout.blocks.iter().map(|s| (0..s.widths.len()).map(|_| None).collect()).collect();
    let n = CALIBRATION_IMAGES.min(train.len());
    for level in 0..levels {
        let choice: Vec<usize> = net
            .layout
            .blocks
            .iter()
            .map(|s| {
                if levels == 1 { 0 } else { (level * (s.widths.len() - 1) + (levels - 1) / 2) / (levels - 1) }
            })
            .collect();
        let widths: Vec<i64> = (0..blocks).map(|b| net.layout.blocks[b].widths[choice[b]]).collect();
        for start in (0..n).step_by(512) {
            let x = train.images(start..(start + 512).min(n))?;
            for (b, stats) in stats_pass(net, &x, &widths).into_iter().enumerate() {
                let slot = &mut sums[b][choice[b]];
                *slot = Some(match slot.take() {
                    None => (stats, 1.0),
                    Some((acc, k)) => (
                        acc.into_iter().zip(stats).map(|((m, v), (bm, bv))| (m + bm, v + bv)).collect(),
                        k + 1.0,
                    ),
                });
            }
        }
    }
    for (b, gate) in serving.gates.blocks.iter().enumerate() {
        for (v, stats) in gate.slim_stats.iter().enumerate() {
            if let Some((measured, k)) = &sums[b][v] {
                // A Bottleneck's `bn2` has the width's channels: the first ones of the slot.
                for (slot, (mean, var)) in stats.iter().zip(measured) {
                    let len = mean.size()[0];
                    slot.running_mean.narrow(0, 0, len).copy_(&(mean / *k));
                    slot.running_var.narrow(0, 0, len).copy_(&(var / *k));
                }
            }
        }
    }
    Ok(())
}

/// An eval-mode pass at the given widths that normalises every batch-norm after a narrowed
/// sum with its own batch statistics and returns them (per block, per such batch-norm:
/// mean, unbiased variance).
fn stats_pass(net: &TrainableNet, x: &Tensor, widths: &[i64]) -> Vec<Vec<(Tensor, Tensor)>> {
    let b = &net.backbone;
    let mut h = b.stem_t(x, false);
    let mut out = Vec::new();
    for (block, &k) in b.blocks.iter().zip(widths) {
        let last = block.layers.len() - 1;
        let full = k == block.spec.inner_width();
        let mut z = h.shallow_clone();
        let mut stats = Vec::new();
        for (j, layer) in block.layers.iter().enumerate() {
            let y = sliced_conv(block, j, &z, k);
            let bn = &layer.bn;
            let c = y.size()[1];
            let (weight, bias) = (bn.weight.narrow(0, 0, c), bn.bias.narrow(0, 0, c));
            let normalized = if j == 0 {
                // conv1 sums over the whole input: its running statistics hold, narrowed.
                let (m, v) = (bn.running_mean.narrow(0, 0, c), bn.running_var.narrow(0, 0, c));
                y.batch_norm(Some(&weight), Some(&bias), Some(&m), Some(&v), false, 0.1, BN_EPS, false)
            } else {
                let mean = y.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
                let var = y.var_dim(&[0i64, 2, 3][..], true, false);
                let normalized = if full {
                    bn.forward_t(&y, false)
                } else {
                    y.batch_norm(
                        Some(&weight),
                        Some(&bias),
                        Some(&mean),
                        Some(&var),
                        false,
                        0.1,
                        BN_EPS,
                        false,
                    )
                };
                stats.push((mean, var));
                normalized
            };
            z = if j < last { normalized.relu() } else { normalized };
        }
        h = (z + block.shortcut_t(&h, false)).relu();
        out.push(stats);
    }
    out
}
