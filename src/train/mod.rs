//! `sluice train`: a gated ResNet trained from scratch (or retrofitted onto a dense one,
//! `TrainConfig::init`) with tch autograd on any dataset of `data`, so one model serves the
//! whole budget range (docs/training.md has the recipe):
//! slimmable widths by the sandwich rule with in-place distillation, block and prefix
//! channel gates by straight-through estimation with a compute-rate term towards a target
//! sampled per step, and exit heads by a weighted sum of their cross-entropies.

pub mod augment;
pub mod calibrate;
mod distill;
pub mod export;
pub mod net;
pub mod optim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::data::{DataError, Dataset, Split};
use crate::engine::gates::GateLayout;
use crate::engine::model::seeded;
use crate::engine::params::ResNetParams;
use crate::engine::{ArchSpec, GateConfig};
pub use distill::DISTILL_TEMPERATURES;
use distill::distillation;

use self::net::{PassMode, TrainableNet};
use self::optim::{Sgd, cosine_lr};

/// Everything that determines a training run; saved with every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub arch: String,
    pub gates: GateConfig,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Random crop padding (pixels) of pad-crop augmentation.
    pub pad: usize,
    /// The augmentation recipe; `auto` picks it by input size. Runs saved before the field
    /// existed used pad-crop at every size, and resume as they were.
    #[serde(default = "legacy_augment")]
    pub augment: augment::Augment,
    /// Weight of each exit's cross-entropy.
    pub exit_weight: f64,
    /// Weight of the squared gap between the gated pass's compute rate and its target.
    pub rate_weight: f64,
    /// Targets are drawn uniformly from [min_rate, 1].
    pub min_rate: f64,
    /// Use only the first N training images (CI's short run); 0 = all.
    pub limit: usize,
    pub seed: u64,
    /// The dataset, as `--data` names it (resuming reads the same one).
    #[serde(default = "default_data")]
    pub data: String,
    /// Input `[C, H, W]` (H = W) and classes of the network.
    #[serde(default = "default_dims")]
    pub dims: [i64; 3],
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// Gate retrofit: the dense weights (safetensors, torchvision names) the backbone starts
    /// from, and the frozen teacher every pass learns from (docs/training.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Per-channel normalisation the run trains with (a retrofit's is its teacher's); empty:
    /// the dataset's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mean: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub std: Vec<f64>,
    /// Peak learning rate of the gate and exit parameters (`gates.*`, `train.*`) when it differs from
    /// `lr`: a retrofit's are new while its backbone is already trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_lr: Option<f64>,
    /// A retrofit's exit heads learn from the teacher's predictions as well as the labels.
    /// Runs saved before the field existed did not.
    #[serde(default)]
    pub exit_distill: bool,
    /// A retrofit first orders each block's inner channels by importance (function-
    /// preserving), so the prefix a narrow width keeps holds the channels that matter most.
    /// Runs saved before the field existed did not.
    #[serde(default)]
    pub order_channels: bool,
    /// Temperature of a retrofit's distillation from the teacher: both sides' logits are
    /// divided by it and the term is scaled by its square (Hinton et al.), so above 1 the
    /// students also learn how the teacher ranks the wrong classes. Runs saved before the
    /// field existed used 1.
    #[serde(default = "unit_temperature")]
    pub distill_temperature: f64,
}

fn unit_temperature() -> f64 {
    1.0
}

fn legacy_augment() -> augment::Augment {
    augment::Augment::PadCrop
}

fn default_data() -> String {
    "fashion-mnist".into()
}

fn default_dims() -> [i64; 3] {
    [1, 28, 28]
}

fn default_classes() -> usize {
    10
}

impl TrainConfig {
    /// The recipe of the shipped model (docs/training.md).
    pub fn fashion_default() -> Self {
        TrainConfig {
            arch: "resnet20".into(),
            gates: GateConfig {
                channel: true,
                block: crate::engine::BlockGates::Identity,
                exits: vec![1, 2],
                exit_conv: true,
                ..GateConfig::default()
            },
            epochs: 30,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            warmup_epochs: 1.0,
            pad: 2,
            augment: augment::Augment::Auto,
            exit_weight: 0.5,
            rate_weight: 4.0,
            min_rate: 0.2,
            limit: 0,
            seed: 1,
            data: default_data(),
            dims: default_dims(),
            classes: default_classes(),
            init: None,
            mean: Vec::new(),
            std: Vec::new(),
            gate_lr: None,
            exit_distill: false,
            order_channels: false,
            distill_temperature: 1.0,
        }
    }

    /// The retrofit recipe on top of `self` (docs/training.md): the backbone fine-tunes at
    /// `lr` (0.01 unless given) after a short warm-up, while the new gates and exits learn
    /// at the from-scratch rate (0.1) and exits distil from the teacher too.
    pub fn retrofit(self, init: PathBuf, lr: Option<f64>, gate_lr: Option<f64>) -> Self {
        TrainConfig {
            init: Some(init),
            lr: lr.unwrap_or(0.01),
            gate_lr: Some(gate_lr.unwrap_or(0.1)),
            warmup_epochs: 0.2,
            exit_distill: true,
            order_channels: true,
            ..self
        }
    }
}

/// Progress of a run, saved beside the checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    pub step: usize,
    /// Seconds of training so far (resumes add to it).
    pub seconds: f64,
    pub history: Vec<EpochLog>,
}

/// One epoch's numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub validation_accuracy: f64,
    pub gated_validation_accuracy: f64,
    pub gated_validation_rate: f64,
    pub seconds: f64,
    /// Of which spent preparing batches (augmentation and normalisation; the loader's
    /// share, on the training thread).
    #[serde(default)]
    pub data_seconds: f64,
}

/// A run's files.
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }
}

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    config: TrainConfig,
    state: TrainState,
}

/// A training run in memory.
pub struct Trainer {
    pub config: TrainConfig,
    pub state: TrainState,
    pub vs: VarStore,
    pub net: TrainableNet,
    sgd: Sgd,
    /// The frozen dense network of a retrofit (`config.init`).
    teacher: Option<Teacher>,
}

/// A frozen dense network in eval mode: the retrofit's teacher.
pub struct Teacher {
    _vs: VarStore,
    net: ResNetParams,
}

impl Teacher {
    /// The dense network of `spec` with the backbone weights of `path`.
    pub fn load(spec: &ArchSpec, path: &Path) -> anyhow::Result<Self> {
        let vs = VarStore::new(Device::Cpu);
        let net = ResNetParams::new(&vs.root(), spec);
        copy_backbone(&vs, path)?;
        vs.variables().values().for_each(|t| {
            let _ = t.shallow_clone().set_requires_grad(false);
        });
        Ok(Teacher { _vs: vs, net })
    }

    /// Eval-mode logits, outside autograd.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.net.forward_t(x, false))
    }
}

/// Copies every backbone tensor (torchvision names) of `vs` from the safetensors at `path`:
/// all must be there with the same shape (BatchNorm `num_batches_tracked` may be absent);
/// anything else in the file (a gated model's gates) is ignored.
fn copy_backbone(vs: &VarStore, path: &Path) -> anyhow::Result<()> {
    let saved: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|n| is_backbone(n)).collect();
    names.sort();
    for name in names {
        match saved.get(name) {
            None if name.ends_with("num_batches_tracked") => {}
            None => problems.push(format!("missing `{name}`")),
            Some(src) if src.size() != vars[name].size() => problems.push(format!(
                "`{name}` has shape {:?}, the network needs {:?}",
                src.size(),
                vars[name].size()
            )),
            Some(src) => tch::no_grad(|| {
                vars[name].shallow_clone().copy_(&src.to_kind(vars[name].kind()));
            }),
        }
    }
    if !problems.is_empty() {
        let total = problems.len();
        problems.truncate(6);
        anyhow::bail!(
            "{} does not hold this network's dense weights: {}{}",
            path.display(),
            problems.join("; "),
            if total > 6 { format!("; and {} more", total - 6) } else { String::new() }
        );
    }
    Ok(())
}

/// A backbone tensor: not a gate (`gates.`), a width's statistics (`slim.`) or a training
/// gate (`train.`).
fn is_backbone(name: &str) -> bool {
    !["gates.", "slim.", "train."].iter().any(|p| name.starts_with(p))
}

impl Trainer {
    /// A fresh run (weights initialised from the config's seed).
    pub fn new(config: TrainConfig) -> anyhow::Result<Self> {
        for (name, lr) in [("lr", Some(config.lr)), ("gate_lr", config.gate_lr)] {
            if let Some(lr) = lr
                && !(lr.is_finite() && lr > 0.0)
            {
                anyhow::bail!("{name} must be a positive number, got {lr}");
            }
        }
        if !DISTILL_TEMPERATURES.contains(&config.distill_temperature) {
            anyhow::bail!(
                "distill_temperature must be from {} to {}, got {}",
                DISTILL_TEMPERATURES.start(),
                DISTILL_TEMPERATURES.end(),
                config.distill_temperature
            );
        }
        let [channels, h, w] = config.dims;
        if h != w {
            anyhow::bail!("training needs square inputs, got {h}x{w}");
        }
        let spec = ArchSpec::named(&config.arch, channels, config.classes as i64)?;
        let layout = GateLayout::new(&spec, &config.gates)?;
        let (vs, net) = seeded(config.seed as i64, || {
            let vs = VarStore::new(Device::Cpu);
            let net = TrainableNet::new(&vs.root(), &spec, &layout, h).map_err(anyhow::Error::msg);
            net.map(|net| (vs, net))
        })?;
        let mut trainable: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        trainable.sort_by(|a, b| a.0.cmp(&b.0));
        let mut sgd = Sgd::new(trainable, config.momentum, config.weight_decay);
        if let Some(gate_lr) = config.gate_lr {
            sgd = sgd.scale_lr(|name| !is_backbone(name), gate_lr / config.lr);
        }
        let teacher = match &config.init {
            Some(path) => {
                copy_backbone(&vs, path)?;
                if config.order_channels {
                    net.order_inner_channels();
                }
                Some(Teacher::load(&spec, path)?)
            }
            None => None,
        };
        Ok(Trainer { config, state: TrainState::default(), vs, net, sgd, teacher })
    }

    /// Resumes the run saved in `run`.
    pub fn resume(run: &RunDir) -> anyhow::Result<Self> {
        let meta: CheckpointMeta = serde_json::from_str(&std::fs::read_to_string(run.state())?)?;
        let mut trainer = Trainer::new(meta.config)?;
        let saved: HashMap<String, Tensor> =
            Tensor::read_safetensors(run.checkpoint())?.into_iter().collect();
        tch::no_grad(|| -> anyhow::Result<()> {
            for (name, var) in trainer.vs.variables() {
                let src = saved.get(&name).ok_or_else(|| anyhow::anyhow!("checkpoint lacks `{name}`"))?;
                var.shallow_clone().copy_(src);
            }
            Ok(())
        })?;
        trainer.sgd.load_state(&saved).map_err(anyhow::Error::msg)?;
        trainer.state = meta.state;
        Ok(trainer)
    }

    /// Writes weights, optimizer state and progress (atomically: temp files, then rename).
    pub fn save_checkpoint(&self, run: &RunDir) -> anyhow::Result<()> {
        std::fs::create_dir_all(&run.dir)?;
        let mut tensors: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        tensors.extend(self.sgd.state());
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let tmp = run.dir.join("checkpoint.safetensors.tmp");
        Tensor::write_safetensors(&tensors, &tmp)?;
        std::fs::rename(&tmp, run.checkpoint())?;
        let meta = CheckpointMeta { config: self.config.clone(), state: self.state.clone() };
        let tmp = run.dir.join("checkpoint.json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&meta)?)?;
        std::fs::rename(&tmp, run.state())?;
        Ok(())
    }

    /// One optimisation step on a batch; returns (loss, correct predictions of the full pass).
    /// The full network sees the whole batch; the narrowest and the random-width networks
    /// each see a quarter of it and the gated network the other half (the sandwich rule at
    /// about half its cost on 2 cores). The sub-networks learn from the full network's
    /// predictions (in-place distillation).
    pub fn step(&mut self, images: &Tensor, labels: &Tensor, rng: &mut StdRng, lr: f64) -> (f64, i64) {
        let c = &self.config;
        let n = labels.size()[0];
        let full = self.net.forward(images, &PassMode::Widths(self.net.widest()), true);
        let mut loss = full.logits.cross_entropy_for_logits(labels);
        for exit in &full.exits {
            loss = &loss + exit.cross_entropy_for_logits(labels) * c.exit_weight;
        }
        // The sub-networks learn from the full network's predictions, or in a retrofit from
        // the frozen dense teacher's, which the full network learns from too.
        let (soft, t) = match &self.teacher {
            Some(teacher) => {
                let t = c.distill_temperature;
                ((teacher.logits(images) / t).softmax(1, Kind::Float), t)
            }
            None => (full.logits.detach().softmax(1, Kind::Float), 1.0),
        };
        let distill =
            |logits: &Tensor, rows: (i64, i64)| distillation(&soft.narrow(0, rows.0, rows.1), logits, t);
        if self.teacher.is_some() {
            loss = &loss + distill(&full.logits, (0, n));
        }
        let exit_distill = self.teacher.is_some() && c.exit_distill;
        if exit_distill {
            for exit in &full.exits {
                loss = &loss + distill(exit, (0, n)) * c.exit_weight;
            }
        }
        let quarter = n / 4;
        let parts = [(0, quarter), (quarter, quarter)];
        let random: Vec<i64> =
            self.net.layout.blocks.iter().map(|s| s.widths[rng.gen_range(0..s.widths.len())]).collect();
        for ((start, len), widths) in parts.into_iter().zip([self.net.narrowest(), random]) {
            if len == 0 {
                continue;
            }
            let sub = self.net.forward(&images.narrow(0, start, len), &PassMode::Widths(widths), true);
            loss = &loss + distill(&sub.logits, (start, len));
        }
        if self.config.gates.has_trunk() {
            let (start, len) = (2 * quarter, n - 2 * quarter);
            let gated = self.net.forward(&images.narrow(0, start, len), &PassMode::Gated, true);
            loss = &loss + distill(&gated.logits, (start, len));
            let half_labels = labels.narrow(0, start, len);
            for exit in &gated.exits {
                loss = &loss + exit.cross_entropy_for_logits(&half_labels) * c.exit_weight;
                if exit_distill {
                    loss = &loss + distill(exit, (start, len)) * c.exit_weight;
                }
            }
            if let Some(rate) = &gated.rate {
                let target = rng.gen_range(c.min_rate..=1.0);
                let gap = rate.mean(Kind::Float) - target;
                loss = &loss + &gap * &gap * c.rate_weight;
            }
        }
        self.sgd.zero_grad();
        loss.backward();
        self.sgd.step(lr);
        let correct = full.logits.argmax(1, false).eq_tensor(labels).sum(Kind::Int64).int64_value(&[]);
        (loss.double_value(&[]), correct)
    }

    /// Trains until `config.epochs`, checkpointing after every epoch.
    pub fn run(&mut self, data: &Dataset, run: &RunDir, quiet: bool) -> anyhow::Result<()> {
        data.check_fits(self.config.dims, self.config.classes).map_err(anyhow::Error::msg)?;
        let train =
            if self.config.limit > 0 { data.train.take(self.config.limit) } else { data.train.clone() };
        let batches = train.len().div_ceil(self.config.batch_size);
        let total = batches * self.config.epochs;
        let warmup = (self.config.warmup_epochs * batches as f64) as usize;
        while self.state.epoch < self.config.epochs {
            let epoch = self.state.epoch;
            let started = Instant::now();
            let mut rng =
                StdRng::seed_from_u64(self.config.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64));
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rng);
            let bar = progress_bar(batches as u64, epoch + 1, self.config.epochs, quiet);
            let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0usize);
            let mut data_seconds = 0.0;
            for chunk in order.chunks(self.config.batch_size) {
                let loading = Instant::now();
                let (images, labels) = augmented_batch(&train, chunk, &self.config, &mut rng)?;
                data_seconds += loading.elapsed().as_secs_f64();
                let lr = cosine_lr(self.config.lr, self.state.step, warmup, total);
                let (loss, ok) = self.step(&images, &labels, &mut rng, lr);
                loss_sum += loss * chunk.len() as f64;
                correct += ok;
                seen += chunk.len();
                self.state.step += 1;
                bar.set_message(format!(
                    "loss {:.3} acc {:.3} lr {lr:.4}",
                    loss_sum / seen as f64,
                    correct as f64 / seen as f64
                ));
                bar.inc(1);
            }
            bar.finish_and_clear();
            let (validation_accuracy, _) =
                self.evaluate(&data.validation, &PassMode::Widths(self.net.widest()))?;
            let (gated_accuracy, gated_rate) = if self.config.gates.has_trunk() {
                self.evaluate(&data.validation, &PassMode::Gated)?
            } else {
                (validation_accuracy, 1.0)
            };
            let seconds = started.elapsed().as_secs_f64();
            self.state.seconds += seconds;
            self.state.epoch += 1;
            let log = EpochLog {
                epoch: self.state.epoch,
                train_loss: loss_sum / seen as f64,
                train_accuracy: correct as f64 / seen as f64,
                validation_accuracy,
                gated_validation_accuracy: gated_accuracy,
                gated_validation_rate: gated_rate,
                seconds,
                data_seconds,
            };
            tracing::info!(
                epoch = log.epoch,
                loss = format!("{:.4}", log.train_loss),
                train_acc = format!("{:.4}", log.train_accuracy),
                val_acc = format!("{:.4}", log.validation_accuracy),
                gated_val_acc = format!("{:.4}", log.gated_validation_accuracy),
                gated_rate = format!("{:.3}", log.gated_validation_rate),
                seconds = format!("{seconds:.0}"),
                // Images per second the batches were prepared at, against what training used.
                loader_images_per_s = format!("{:.0}", seen as f64 / data_seconds.max(1e-9)),
                train_images_per_s = format!("{:.1}", seen as f64 / seconds),
                "epoch done"
            );
            self.state.history.push(log);
            self.save_checkpoint(run)?;
        }
        Ok(())
    }

    /// Accuracy (and mean compute rate of gated passes) on a split, in eval mode.
    pub fn evaluate(&self, split: &Split, mode: &PassMode) -> Result<(f64, f64), DataError> {
        let _guard = tch::no_grad_guard();
        let (mut correct, mut rate) = (0i64, 0.0);
        for start in (0..split.len()).step_by(500) {
            let range = start..(start + 500).min(split.len());
            let out = self.net.forward(&split.images(range.clone())?, mode, false);
            correct += out
                .logits
                .argmax(1, false)
                .eq_tensor(&split.label_tensor(range))
                .sum(Kind::Int64)
                .int64_value(&[]);
            if let Some(r) = &out.rate {
                rate += r.sum(Kind::Float).double_value(&[]);
            }
        }
        let n = split.len().max(1) as f64;
        Ok((correct as f64 / n, if matches!(mode, PassMode::Gated) { rate / n } else { 1.0 }))
    }
}

/// The images at `indices`, read (a streamed split decodes them here, on the pool of
/// threads), augmented and normalised, with their labels.
fn augmented_batch(
    split: &Split,
    indices: &[usize],
    config: &TrainConfig,
    rng: &mut StdRng,
) -> Result<(Tensor, Tensor), DataError> {
    let raw = split.gather(indices)?;
    let images: Vec<&[u8]> = raw.chunks(split.image_bytes()).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let shape = [split.channels, split.rows, split.cols];
    let pixels = augment::augment(config.augment, &images, shape, config.pad, threads, rng);
    let shape = [indices.len() as i64, split.channels as i64, split.rows as i64, split.cols as i64];
    let images = split.normalize(&Tensor::from_slice(&pixels).view(shape));
    let labels: Vec<i64> = indices.iter().map(|&i| split.labels[i] as i64).collect();
    Ok((images, Tensor::from_slice(&labels)))
}

fn progress_bar(len: u64, epoch: usize, epochs: usize, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "epoch {epoch}/{epochs} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ETA {{eta}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Whether `dir` holds a run that can be resumed.
pub fn has_checkpoint(dir: &Path) -> bool {
    RunDir { dir: dir.to_path_buf() }.state().is_file()
}
