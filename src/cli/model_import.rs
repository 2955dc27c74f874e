//! `sluice model import`: a dense checkpoint trained elsewhere (safetensors with
//! torchvision's names) becomes a servable model folder with no gates, checked strictly
//! and run once against the unfused reference before anything is written.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use tch::{Kind, Tensor};

use crate::engine::model::load_params;
use crate::engine::{ArchSpec, GateConfig, GatePolicy, Layout, Model, ModelSource, weights};
use crate::repository::{CONFIG_FILE, ImageConfig, ModelDir};

use super::model_tools::new_config;

/// Arguments of `sluice model import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The dense checkpoint: safetensors of a `state_dict` with torchvision's names
    /// (README, "Bring your own model"). BatchNorm `num_batches_tracked` may be absent.
    pub checkpoint: PathBuf,
    /// The model folder to create (must not exist, or be empty).
    pub dir: PathBuf,
    /// Architecture: resnet18/34/50 (torchvision) or resnet20/32/56 (CIFAR-style).
    #[arg(long, env = "SLUICE_IMPORT_ARCH")]
    pub arch: String,
    /// Per-item input shape CxHxW the network was trained on (C is 1 or 3).
    #[arg(long, env = "SLUICE_IMPORT_DIMS")]
    pub dims: super::Shape,
    /// Per-channel mean of the pixels scaled to [0, 1], as training normalised them
    /// (comma-separated, one value per channel).
    #[arg(long, env = "SLUICE_IMPORT_MEAN", value_delimiter = ',', required = true)]
    pub mean: Vec<f64>,
    /// Per-channel standard deviation, as `--mean`.
    #[arg(long, env = "SLUICE_IMPORT_STD", value_delimiter = ',', required = true)]
    pub std: Vec<f64>,
    /// Class names, one per line (default: class0, class1, ... as many as `fc.weight` has rows).
    #[arg(long, env = "SLUICE_IMPORT_LABELS")]
    pub labels: Option<PathBuf>,
    /// The model's name (default: the folder's name).
    #[arg(long, env = "SLUICE_IMPORT_NAME")]
    pub name: Option<String>,
    /// Accept PNG/JPEG images (BYTES), decoded and normalised server-side, instead of FP32
    /// tensors.
    #[arg(long, env = "SLUICE_IMPORT_IMAGE")]
    pub image: bool,
}

/// Largest difference allowed between the served (fused, packed) network and the unfused
/// reference on the check input, relative to the largest logit.
const CHECK_TOLERANCE: f64 = 1e-3;

pub fn run(args: &ImportArgs) -> anyhow::Result<()> {
    let [c, h, w] = args.dims.0[..] else { bail!("--dims must be CxHxW, e.g. 3x224x224") };
    if args.mean.len() != c as usize || args.std.len() != c as usize {
        bail!(
            "--mean and --std need {c} values each (one per channel), got {} and {}",
            args.mean.len(),
            args.std.len()
        );
    }
    if args.dir.exists() && std::fs::read_dir(&args.dir)?.next().is_some() {
        bail!("{} already exists and is not empty; choose a new folder", args.dir.display());
    }
    let classes = checkpoint_classes(&args.checkpoint)?;
    let labels = match &args.labels {
        Some(path) => read_labels(path, classes)?,
        None => (0..classes).map(|i| format!("class{i}")).collect(),
    };
    let spec = ArchSpec::named(&args.arch, c, classes)?;
    let source =
        ModelSource { weights: Some(args.checkpoint.clone()), ..ModelSource::random(spec.clone(), 0) };
    let (vs, params) = load_params(&source)
        .with_context(|| format!("{} is not a dense {} checkpoint", args.checkpoint.display(), args.arch))?;

    // Written to a staging folder first: a failed check leaves no half-made model behind.
    let staging = staging_dir(&args.dir)?;
    let _cleanup = RemoveOnDrop(staging.clone());
    weights::save(&vs, &staging.join("model.safetensors"))?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let image = ImageConfig::new(args.mean.clone(), args.std.clone());
    let config =
        new_config(name, &args.arch, [c, h, w], labels, Some(image), args.image, GateConfig::default());
    std::fs::write(staging.join(CONFIG_FILE), toml::to_string_pretty(&config)?)?;

    // The folder as `serve` opens it, in the default layout, against the unfused reference.
    let dir = ModelDir::open(&staging)?;
    let served = Model::build(&dir.source(Layout::default()))?;
    let _guard = tch::no_grad_guard();
    let input = check_input(c, h, w);
    let reference = params.backbone.forward_t(&input, false);
    let (logits, _) = served.forward(&input, &GatePolicy::dense())?;
    let scale = f64::try_from(reference.abs().max())?.max(1.0);
    let diff = f64::try_from((&logits - &reference).abs().max())?;
    if !diff.is_finite() || diff > CHECK_TOLERANCE * scale {
        bail!(
            "the packed network's logits differ from the reference by {diff:.3e} (largest logit {scale:.3e})"
        );
    }
    if args.dir.exists() {
        std::fs::remove_dir(&args.dir)?;
    }
    std::fs::rename(&staging, &args.dir)
        .with_context(|| format!("moving the model into {}", args.dir.display()))?;
    let flops = crate::engine::flops::dense_flops(&spec, h, w);
    println!(
        "{}: {} {c}x{h}x{w}, {classes} classes, {:.3} GFLOPs dense; fused network matches the reference \
         (max |Δlogit| {diff:.2e}); no gates yet: `sluice train --init {}` adds them",
        args.dir.display(),
        args.arch,
        flops as f64 / 1e9,
        args.dir.display()
    );
    Ok(())
}

/// The class count, from the checkpoint's `fc.weight` rows.
fn checkpoint_classes(path: &Path) -> anyhow::Result<i64> {
    let tensors = Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    let fc = tensors
        .iter()
        .find(|(n, _)| n == "fc.weight")
        .with_context(|| format!("{} has no `fc.weight` (torchvision names expected)", path.display()))?;
    match fc.1.size()[..] {
        [rows, _] if rows > 0 => Ok(rows),
        ref other => bail!("`fc.weight` has shape {other:?}; expected [classes, features]"),
    }
}

/// One label per non-empty line; as many as the classifier has outputs.
fn read_labels(path: &Path, classes: i64) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let labels: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if labels.len() as i64 != classes {
        bail!(
            "{} has {} labels; the checkpoint's classifier has {classes} outputs",
            path.display(),
            labels.len()
        );
    }
    Ok(labels)
}

/// A deterministic, non-trivial input: a smooth pattern, different per channel.
fn check_input(c: i64, h: i64, w: i64) -> Tensor {
    let n = c * h * w;
    (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.013).sin().view([1, c, h, w]) * 2.0
}

fn staging_dir(target: &Path) -> anyhow::Result<PathBuf> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let name = target.file_name().context("the model folder needs a name")?.to_string_lossy();
    let staging = parent.join(format!(".{name}.import-{}", std::process::id()));
    std::fs::create_dir_all(&staging)?;
    Ok(staging)
}

/// Removes a folder when dropped, unless it was moved away.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
