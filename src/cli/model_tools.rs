//! `sluice model init` (a model folder with random weights: fixtures, benchmarks, a start
//! for your own) and `sluice model predict` (run a model folder locally, no server).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

use crate::control::calibration::{CALIBRATION_FILE, CalibrationTable};
use crate::engine::gates::BlockGates;
use crate::engine::model::load_params;
use crate::engine::{ArchSpec, GateConfig, GatePolicy, Model, ModelSource, weights};
use crate::repository::{
    BatchingConfig, CONFIG_FILE, ImageConfig, InputConfig, InputDatatype, ModelConfig, ModelDir, OutputConfig,
};

/// Arguments of `sluice model init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The folder to create.
    pub dir: PathBuf,
    /// The model's name (default: the folder's name).
    #[arg(long, env = "SLUICE_INIT_NAME")]
    pub name: Option<String>,
    #[arg(long, env = "SLUICE_INIT_ARCH", default_value = "resnet20")]
    pub arch: String,
    /// Per-item input shape CxHxW.
    #[arg(long, env = "SLUICE_INIT_DIMS", default_value = "1x28x28")]
    pub dims: super::Shape,
    #[arg(long, env = "SLUICE_INIT_CLASSES", default_value_t = 10)]
    pub classes: usize,
    /// Gates to add: any of channel, block, exits (comma-separated; none: a dense model).
    #[arg(long, env = "SLUICE_INIT_GATES", value_delimiter = ',')]
    pub gates: Vec<String>,
    /// Accept PNG/JPEG images (BYTES) instead of FP32 tensors.
    #[arg(long, env = "SLUICE_INIT_IMAGE")]
    pub image: bool,
    #[arg(long, env = "SLUICE_INIT_MAX_BATCH", default_value_t = 32)]
    pub max_batch_size: usize,
    #[arg(long, env = "SLUICE_INIT_SEED", default_value_t = 0)]
    pub seed: i64,
}

pub fn init(args: &InitArgs) -> anyhow::Result<()> {
    let [c, h, w] = args.dims.0[..] else { bail!("--dims must be CxHxW") };
    let spec = ArchSpec::named(&args.arch, c, args.classes as i64)?;
    let mut gates = GateConfig::default();
    for g in &args.gates {
        match g.as_str() {
            "channel" => gates.channel = true,
            "block" => gates.block = BlockGates::Identity,
            "exits" => {
                gates.exits = (1..spec.blocks.len()).collect();
                gates.exit_conv = spec.is_cifar();
            }
            other => bail!("--gates: unknown gate kind `{other}` (channel, block, exits)"),
        }
    }
    std::fs::create_dir_all(&args.dir)?;
    let source = ModelSource { gates: gates.clone(), ..ModelSource::random(spec, args.seed) };
    let (vs, _) = load_params(&source)?;
    weights::save(&vs, &args.dir.join("model.safetensors"))?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    });
    let image = args.image.then(|| ImageConfig::new(vec![0.5; c as usize], vec![0.5; c as usize]));
    let labels = (0..args.classes).map(|i| format!("class{i}")).collect();
    let mut config = new_config(name, &args.arch, [c, h, w], labels, image, args.image, gates);
    config.max_batch_size = args.max_batch_size;
    std::fs::write(args.dir.join(CONFIG_FILE), toml::to_string_pretty(&config)?)?;
    println!("{}", args.dir.display());
    Ok(())
}

/// A new model folder's configuration: dense policy, default batching and limits. `image`
/// is how pixels become the input tensor: applied by the server to encoded images when
/// `accepts_images` (a `BYTES` input), otherwise only recorded, for clients and sluice's
/// dataset commands (the input is then an already normalised FP32 tensor).
pub(crate) fn new_config(
    name: String,
    arch: &str,
    dims: [i64; 3],
    labels: Vec<String>,
    image: Option<ImageConfig>,
    accepts_images: bool,
    gates: GateConfig,
) -> ModelConfig {
    ModelConfig {
        name,
        version: "1".into(),
        architecture: arch.into(),
        weights: "model.safetensors".into(),
        calibration: None,
        max_batch_size: 32,
        precision: Default::default(),
        input: InputConfig {
            name: if accepts_images { "image".into() } else { "input".into() },
            dims,
            datatype: if accepts_images { InputDatatype::Bytes } else { InputDatatype::Fp32 },
            image,
        },
        output: OutputConfig { name: "logits".into(), labels },
        gates,
        batching: BatchingConfig::default(),
        policy: GatePolicy::dense(),
        limits: Default::default(),
        requests: Default::default(),
        controller: Default::default(),
    }
}

/// Arguments of `sluice model predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The model folder.
    pub model: PathBuf,
    /// A JSON file `{"shape": [N, C, H, W], "data": [...]}` (flat row-major FP32).
    #[arg(long, env = "SLUICE_PREDICT_INPUT")]
    pub input: PathBuf,
    /// Run at this calibrated budget instead of the model's configured policy.
    #[arg(long, env = "SLUICE_PREDICT_BUDGET")]
    pub budget: Option<f64>,
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 1)]
    pub threads: usize,
    #[command(flatten)]
    pub format: super::FormatArgs,
}

#[derive(Deserialize)]
struct TensorFile {
    shape: Vec<i64>,
    data: Vec<f32>,
}

pub fn predict(args: &PredictArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads.max(1) as i32);
    let _guard = tch::no_grad_guard();
    let dir = ModelDir::open(&args.model)?;
    let model = Model::build(&args.format.source(&dir)?)?;
    let text = std::fs::read_to_string(&args.input).with_context(|| args.input.display().to_string())?;
    let file: TensorFile = serde_json::from_str(&text)
        .with_context(|| format!("{}: expected {{\"shape\", \"data\"}}", args.input.display()))?;
    let mut policy = dir.config.policy.clone();
    if let Some(b) = args.budget.or(policy.budget) {
        let path = dir.calibration_path().unwrap_or_else(|| args.model.join(CALIBRATION_FILE));
        policy = CalibrationTable::load(&path)?.policy_for(b)?;
    }
    let x = tch::Tensor::from_slice(&file.data).view(file.shape.as_slice());
    let (logits, reports) = model.forward(&x, &policy)?;
    let classes = logits.size()[1] as usize;
    let flat = Vec::<f32>::try_from(logits.contiguous().view(-1))?;
    let rows: Vec<&[f32]> = flat.chunks(classes).collect();
    println!("{}", serde_json::json!({ "logits": rows, "reports": reports }));
    Ok(())
}
