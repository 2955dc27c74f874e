//! `sluice train`: train (or resume, or retrofit) a gated model on a dataset and export it as a model
//! folder.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::data::{DataSpec, Normalization};
use crate::repository::ModelDir;
use crate::train::augment::Augment;
use crate::train::export::export_model;
use crate::train::{RunDir, TrainConfig, Trainer, has_checkpoint};

/// Arguments of `sluice train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run folder: checkpoints (after every epoch) and the training log.
    #[arg(long, env = "SLUICE_TRAIN_OUT")]
    pub out: PathBuf,
    /// Continue the run saved in --out (its saved settings win over the flags below).
    #[arg(long, env = "SLUICE_TRAIN_RESUME")]
    pub resume: bool,
    /// Where to write the finished model folder (config, weights); none: don't export.
    #[arg(long, env = "SLUICE_TRAIN_EXPORT")]
    pub export: Option<PathBuf>,
    /// The exported model's name.
    #[arg(long, env = "SLUICE_TRAIN_NAME", default_value = "fashion-resnet20")]
    pub name: String,
    /// Architecture: resnet20/32/56 (CIFAR-style), resnet18/34/50 (torchvision).
    #[arg(long, env = "SLUICE_TRAIN_ARCH", default_value = "resnet20")]
    pub arch: String,
    #[arg(long, env = "SLUICE_TRAIN_EPOCHS", default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, env = "SLUICE_TRAIN_BATCH_SIZE", default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate (cosine schedule, 1 epoch warm-up); default 0.1, or 0.01 with
    /// --init (then a 0.2-epoch warm-up).
    #[arg(long, env = "SLUICE_TRAIN_LR")]
    pub lr: Option<f64>,
    /// Peak learning rate of the gates and exit heads with --init (default 0.1: they start
    /// untrained while the backbone fine-tunes at --lr). Without --init everything trains
    /// at --lr.
    #[arg(long, env = "SLUICE_TRAIN_GATE_LR", requires = "init")]
    pub gate_lr: Option<f64>,
    /// Weight of each exit head's loss (cross-entropy, and with --init the teacher's
    /// distillation) against the final classifier's 1: higher trains the exits harder, so
    /// more inputs leave early at a given exit threshold.
    #[arg(long, env = "SLUICE_TRAIN_EXIT_WEIGHT", default_value_t = 0.5, value_parser = non_negative_weight,
          allow_negative_numbers = true)]
    pub exit_weight: f64,
    /// Temperature of the distillation from the teacher with --init: the teacher's and the
    /// students' logits are divided by it and the term scaled by its square. 1 (the default)
    /// is plain distillation; higher passes on more of how the teacher ranks wrong classes.
    #[arg(long, env = "SLUICE_TRAIN_DISTILL_TEMPERATURE", default_value_t = 1.0, requires = "init",
          value_parser = distill_temperature, allow_negative_numbers = true)]
    pub distill_temperature: f64,
    /// Retrofit gates onto a dense network: a model folder (its architecture, input size and
    /// weights) or a safetensors checkpoint with torchvision names (with --arch and the
    /// dataset's size). Its backbone, each block's inner channels ordered by importance
    /// (the same function), is the starting point and, frozen, the teacher.
    #[arg(long, env = "SLUICE_TRAIN_INIT")]
    pub init: Option<PathBuf>,
    /// Train on the first N training images only (0: all 55000).
    #[arg(long, env = "SLUICE_TRAIN_LIMIT", default_value_t = 0)]
    pub limit: usize,
    #[arg(long, env = "SLUICE_TRAIN_SEED", default_value_t = 1)]
    pub seed: u64,
    /// libtorch intra-op threads.
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 2)]
    pub threads: usize,
    #[command(flatten)]
    pub data: super::DataArgs,
    /// Input size CxHxW (H = W) for image folders (default: 3x32x32); IDX and CIFAR data
    /// have their own.
    #[arg(long, env = "SLUICE_TRAIN_DIMS")]
    pub dims: Option<super::Shape>,
    /// Training augmentation: pad-crop + flip below 96 pixels, random resized crop + flip
    /// from there (auto), or one of them, or flips only (none).
    #[arg(long, env = "SLUICE_TRAIN_AUGMENT", value_enum, default_value_t = Augment::Auto)]
    pub augment: Augment,
    /// No progress bar (logs only).
    #[arg(long, env = "SLUICE_QUIET")]
    pub quiet: bool,
    /// Keep training's running batch-norm statistics instead of re-measuring them on clean
    /// training images at export.
    #[arg(long, env = "SLUICE_TRAIN_NO_PRECISE_BN")]
    pub no_precise_bn: bool,
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1) as i32);
    let run = RunDir { dir: args.out.clone() };
    let (mut trainer, data) = if has_checkpoint(&args.out) {
        if !args.resume {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                args.out.display()
            );
        }
        let trainer = Trainer::resume(&run)?;
        tracing::info!(epoch = trainer.state.epoch, data = %trainer.config.data, "resuming");
        let spec: DataSpec = trainer.config.data.parse().map_err(anyhow::Error::msg)?;
        let c = &trainer.config;
        let saved = (!c.mean.is_empty()).then(|| Normalization { mean: c.mean.clone(), std: c.std.clone() });
        let data = spec.load(Some(c.dims), args.data.memory_limit(), saved.as_ref())?;
        (trainer, data)
    } else {
        let spec = args.data.spec();
        // A model folder fixes the architecture, the input size and the weights file.
        let folder = match &args.init {
            Some(p) if p.is_dir() => Some(ModelDir::open(p)?),
            _ => None,
        };
        let size = match (&folder, &args.dims) {
            (Some(dir), _) => Some(dir.config.input.dims),
            (None, Some(super::Shape(d))) if d.len() == 3 => Some([d[0], d[1], d[2]]),
            (None, Some(_)) => bail!("--dims must be CxHxW"),
            (None, None) => Some([3, 32, 32]),
        };
        // A teacher's inputs were normalised as its folder records.
        let teacher_norm = folder.as_ref().and_then(super::recorded_normalization);
        let data = spec.load(size, args.data.memory_limit(), teacher_norm.as_ref())?;
        let (arch, init) = match (&folder, &args.init) {
            (Some(dir), _) => {
                data.check_fits(dir.config.input.dims, dir.config.output.labels.len())
                    .map_err(|e| anyhow::anyhow!("{spec}: {e}"))?;
                (dir.config.architecture.clone(), Some(dir.dir.join(&dir.config.weights)))
            }
            (None, init) => (args.arch.clone(), init.clone()),
        };
        let t = &data.train;
        // Absolute, so that `--resume` from another folder finds the teacher again.
        let init = init.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
        let config = TrainConfig {
            arch,
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr: args.lr.unwrap_or(0.1),
            limit: args.limit,
            seed: args.seed,
            data: spec.to_arg(),
            dims: [t.channels as i64, t.rows as i64, t.cols as i64],
            classes: data.labels.len(),
            mean: t.norm.mean.clone(),
            std: t.norm.std.clone(),
            augment: args.augment,
            exit_weight: args.exit_weight,
            distill_temperature: args.distill_temperature,
            ..TrainConfig::fashion_default()
        };
        let config = match init {
            Some(init) => config.retrofit(init, args.lr, args.gate_lr),
            None => config,
        };
        (Trainer::new(config)?, data)
    };
    trainer.run(&data, &run, args.quiet)?;
    tracing::info!(minutes = format!("{:.1}", trainer.state.seconds / 60.0), "training finished");
    if let Some(dir) = &args.export {
        export_model(&trainer, &data, dir, &args.name, !args.no_precise_bn)?;
        tracing::info!(dir = %dir.display(), "model exported");
    }
    Ok(())
}

/// `--exit-weight`: a finite weight, not below 0.
fn non_negative_weight(s: &str) -> Result<f64, String> {
    super::non_negative_number(s, "a loss weight")
}

/// `--distill-temperature`: a number within `DISTILL_TEMPERATURES`.
fn distill_temperature(s: &str) -> Result<f64, String> {
    let range = crate::train::DISTILL_TEMPERATURES;
    match s.parse::<f64>() {
        Ok(t) if range.contains(&t) => Ok(t),
        _ => Err(format!(
            "expected a distillation temperature from {} to {}, got `{s}`",
            range.start(),
            range.end()
        )),
    }
}
