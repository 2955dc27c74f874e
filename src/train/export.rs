//! From a trained run to a model folder: serving weights (prefix channel gates written as
//! per-channel layers), per-width batch-norm statistics measured on training images
//! ("BN calibration"), and `config.toml`.

use std::path::Path;

use tch::{Kind, Tensor};

use super::Trainer;
use super::net::TrainableNet;
use crate::data::Split;
use crate::data::fashion_mnist::LABELS;
use crate::engine::model::{NetworkParams, load_params};
use crate::engine::params::BN_EPS;
use crate::engine::{ModelSource, weights};
use crate::repository::{CONFIG_FILE, InputConfig, ModelConfig, OutputConfig};

/// Images used to measure each width's batch-norm statistics.
const CALIBRATION_IMAGES: usize = 4096;

/// Writes `dir/model.safetensors` and `dir/config.toml` for the trained network.
pub fn export_model(trainer: &Trainer, train: &Split, dir: &Path, name: &str) -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    std::fs::create_dir_all(dir)?;
    let source = ModelSource {
        gates: trainer.config.gates.clone(),
        ..ModelSource::random(trainer.net.spec.clone(), 0)
    };
    let (vs, serving) = load_params(&source)?;
    trainer.net.export(&serving);
    calibrate_width_stats(&trainer.net, &serving, train);
    weights::save(&vs, &dir.join("model.safetensors"))?;
    let config = ModelConfig {
        name: name.to_string(),
        version: "1".into(),
        architecture: trainer.config.arch.clone(),
        weights: "model.safetensors".into(),
        calibration: None,
        max_batch_size: 32,
        input: InputConfig {
            name: "input".into(),
            dims: [1, 28, 28],
            datatype: Default::default(),
            image: None,
        },
        output: OutputConfig {
            name: "logits".into(),
            labels: LABELS.iter().map(|s| s.to_string()).collect(),
        },
        gates: trainer.config.gates.clone(),
        batching: Default::default(),
        policy: Default::default(),
    };
    std::fs::write(dir.join(CONFIG_FILE), toml::to_string_pretty(&config)?)?;
    Ok(())
}

/// For every allowed width below full, the statistics of the batch-norm after the
/// width-reduced sum (`bn2`), measured with all blocks at the same relative width level.
fn calibrate_width_stats(net: &TrainableNet, serving: &NetworkParams, train: &Split) {
    let levels = net.layout.blocks.iter().map(|s| s.widths.len()).max().unwrap_or(1);
    let blocks = net.layout.blocks.len();
    // sums[b][v] = (sum of means, sum of variances, batches)
    let mut sums: Vec<Vec<Option<(Tensor, Tensor, f64)>>> =
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
            let x = train.images(start..(start + 512).min(n));
            for (b, (mean, var)) in stats_pass(net, &x, &widths).into_iter().enumerate() {
                let slot = &mut sums[b][choice[b]];
                *slot = Some(match slot.take() {
                    None => (mean, var, 1.0),
                    Some((m, v, k)) => (m + mean, v + var, k + 1.0),
                });
            }
        }
    }
    for (b, gate) in serving.gates.blocks.iter().enumerate() {
        for (v, stats) in gate.slim_stats.iter().enumerate() {
            if let Some((mean, var, k)) = &sums[b][v] {
                stats[0].running_mean.shallow_clone().copy_(&(mean / *k));
                stats[0].running_var.shallow_clone().copy_(&(var / *k));
            }
        }
    }
}

/// An eval-mode pass at the given widths that normalises each narrowed `bn2` with its own
/// batch statistics and returns them (per block: mean, unbiased variance).
fn stats_pass(net: &TrainableNet, x: &Tensor, widths: &[i64]) -> Vec<(Tensor, Tensor)> {
    let b = &net.backbone;
    let mut h = b.stem_t(x, false);
    let mut out = Vec::new();
    for (block, &k) in b.blocks.iter().zip(widths) {
        let (l1, l2) = (&block.layers[0], &block.layers[1]);
        let s1 = &l1.conv.shape;
        let z = h.conv2d(
            &l1.conv.weight.narrow(0, 0, k),
            None::<Tensor>,
            [s1.stride; 2],
            [s1.padding; 2],
            [1, 1],
            1,
        );
        let bn = &l1.bn;
        let z = z
            .batch_norm(
                Some(&bn.weight.narrow(0, 0, k)),
                Some(&bn.bias.narrow(0, 0, k)),
                Some(&bn.running_mean.narrow(0, 0, k)),
                Some(&bn.running_var.narrow(0, 0, k)),
                false,
                0.1,
                BN_EPS,
                false,
            )
            .relu();
        let s2 = &l2.conv.shape;
        let z = z.conv2d(
            &l2.conv.weight.narrow(1, 0, k),
            None::<Tensor>,
            [s2.stride; 2],
            [s2.padding; 2],
            [1, 1],
            1,
        );
        let mean = z.mean_dim(&[0i64, 2, 3][..], false, Kind::Float);
        let var = z.var_dim(&[0i64, 2, 3][..], true, false);
        let full = k == block.spec.inner_width();
        let normalized = if full {
            l2.bn.forward_t(&z, false)
        } else {
            z.batch_norm(
                Some(&l2.bn.weight),
                Some(&l2.bn.bias),
                Some(&mean),
                Some(&var),
                false,
                0.1,
                BN_EPS,
                false,
            )
        };
        h = (normalized + block.shortcut_t(&h, false)).relu();
        out.push((mean, var));
    }
    out
}
