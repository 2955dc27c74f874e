//! `sluice model info <arch|model-dir>`: layers, parameters and dense FLOPs.

use std::path::Path;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use crate::engine::ArchSpec;
use crate::engine::flops::{LayerCost, dense_layers};
use crate::repository::ModelDir;

use super::Shape;

/// Arguments of `sluice model info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// An architecture (resnet20/32/56, resnet18/34/50) or a model folder with config.toml.
    pub target: String,
    /// Input shape NxCxHxW; defaults to the model's own (1x1x28x28 or 1x3x224x224).
    #[arg(long, env = "SLUICE_INFO_INPUT")]
    pub input: Option<Shape>,
    /// Classes of an architecture given by name (default: 10 for CIFAR-style, 1000 otherwise).
    #[arg(long, env = "SLUICE_INFO_CLASSES")]
    pub classes: Option<i64>,
    /// Print one JSON object instead of a table.
    #[arg(long, env = "SLUICE_INFO_JSON")]
    pub json: bool,
}

#[derive(Serialize)]
struct Info<'a> {
    model: String,
    architecture: &'a str,
    input: [i64; 4],
    parameters: u64,
    /// FLOPs of the whole input (all of its batch).
    dense_flops: u64,
    dense_flops_per_input: u64,
    dense_macs: u64,
    layers: &'a [LayerCost],
}

pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let (model, spec) = if Path::new(&args.target).join(crate::repository::CONFIG_FILE).is_file() {
        let dir = ModelDir::open(Path::new(&args.target))?;
        (dir.config.name.clone(), dir.spec)
    } else {
        let channels = args.input.as_ref().and_then(|s| s.0.get(1).copied());
        let probe = ArchSpec::named(&args.target, 3, 1)
            .with_context(|| format!("`{}` is neither a model folder nor an architecture", args.target))?;
        let classes = args.classes.unwrap_or(if probe.is_cifar() { 10 } else { 1000 });
        let channels = channels.unwrap_or(if probe.is_cifar() { 1 } else { 3 });
        (args.target.clone(), ArchSpec::named(&args.target, channels, classes)?)
    };
    let hw = spec.default_input_hw();
    let input = match args.input.as_ref().map(|s| s.0.as_slice()) {
        None => [1, spec.in_channels, hw, hw],
        Some(&[n, c, h, w]) => {
            if c != spec.in_channels {
                bail!("--input has {c} channels; {model} takes {}", spec.in_channels);
            }
            [n, c, h, w]
        }
        Some(other) => bail!("--input must have 4 dimensions NxCxHxW, got {}", other.len()),
    };
    let layers = dense_layers(&spec, input[2], input[3]);
    let per_input: u64 = layers.iter().map(|l| l.flops).sum();
    let info = Info {
        model,
        architecture: &spec.name,
        input,
        parameters: layers.iter().map(|l| l.params).sum(),
        dense_flops: per_input * input[0] as u64,
        dense_flops_per_input: per_input,
        dense_macs: per_input / 2 * input[0] as u64,
        layers: &layers,
    };
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        print_table(&info);
    }
    Ok(())
}

fn print_table(info: &Info) {
    println!("{} ({}), input {:?}", info.model, info.architecture, info.input);
    println!(
        "{:<22} {:<6} {:>6} {:>6} {:>3} {:>3} {:>9} {:>14}",
        "layer", "kind", "in", "out", "k", "s", "out hxw", "FLOPs"
    );
    for l in info.layers {
        println!(
            "{:<22} {:<6} {:>6} {:>6} {:>3} {:>3} {:>9} {:>14}",
            l.name,
            l.kind,
            l.in_ch,
            l.out_ch,
            l.kernel,
            l.stride,
            format!("{}x{}", l.out_hw[0], l.out_hw[1]),
            l.flops
        );
    }
    println!("parameters: {}", info.parameters);
    println!(
        "dense FLOPs: {} ({:.3} GFLOPs, {:.3} GMACs) for the whole input; {} per input",
        info.dense_flops,
        info.dense_flops as f64 / 1e9,
        info.dense_macs as f64 / 1e9,
        info.dense_flops_per_input
    );
}
