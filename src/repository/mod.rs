//! The model repository: one folder per model (like Triton's), holding `config.toml`, the
//! safetensors weights and, for gated models, the calibration table.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::control::RequestBounds;
use crate::control::controller::ControllerConfig;
use crate::engine::{ArchSpec, EngineError, Format, GateConfig, GatePolicy, Layout, ModelSource, Precision};

/// File name of a model folder's configuration.
pub const CONFIG_FILE: &str = "config.toml";

/// A model folder's `config.toml` (docs/model-repository.md).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use.
    pub name: String,
    /// The one version served (Triton-style version label).
    #[serde(default = "default_version")]
    pub version: String,
    /// One of [`ArchSpec::KNOWN`].
    pub architecture: String,
    /// Weights file, relative to the folder.
    pub weights: PathBuf,
    /// Calibration table (budget → thresholds), relative to the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<PathBuf>,
    /// Largest batch a request or a dynamic batch may hold.
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: usize,
    /// Number format of weights and activations: `fp32` (default) or `bf16` (needs
    /// AVX512-BF16 or AMX; `sluice serve --precision` overrides it for every model).
    #[serde(default)]
    pub precision: Precision,
    pub input: InputConfig,
    pub output: OutputConfig,
    /// Which gates the model has (none: a dense model).
    #[serde(default)]
    pub gates: GateConfig,
    #[serde(default)]
    pub batching: BatchingConfig,
    /// The policy the model starts with (dense unless set). A `budget` here is resolved
    /// through the calibration table.
    #[serde(default)]
    pub policy: GatePolicy,
    /// Size limits beyond those derived from the model (docs/security.md).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What a single request may ask of the gating (docs/gating.md).
    #[serde(default)]
    pub requests: RequestBounds,
    /// The latency objective and the adaptive budget controller (docs/controller.md); off
    /// by default.
    #[serde(default, skip_serializing_if = "ControllerConfig::is_default")]
    pub controller: ControllerConfig,
}

/// Overrides of the limits sluice derives from the model (docs/security.md).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest HTTP body / gRPC message for this model. Default: derived from
    /// `max_batch_size` × the item's size (× a factor for JSON text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<usize>,
    /// Deadline of a request that sets none itself, queue time included (0: none).
    pub default_timeout_ms: u64,
}

fn default_version() -> String {
    "1".into()
}

fn default_max_batch_size() -> usize {
    32
}

/// The element type clients send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum InputDatatype {
    /// A float tensor of `dims` per item, already normalised.
    #[default]
    #[serde(rename = "FP32")]
    Fp32,
    /// One encoded PNG or JPEG image per item, decoded and normalised server-side.
    #[serde(rename = "BYTES")]
    Bytes,
}

/// The model's input tensor.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    /// Per-item shape `[channels, height, width]` the network runs on (the batch dimension is
    /// implicit). For image inputs this is the decoded, resized image.
    pub dims: [i64; 3],
    #[serde(default)]
    pub datatype: InputDatatype,
    /// Pre-processing of image (`BYTES`) inputs; for `FP32` inputs, the normalisation the
    /// tensor was made with (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageConfig>,
}

/// How an encoded image becomes the network's input: decoded, converted to grayscale (1
/// channel) or RGB (3), resized to `dims`, scaled to [0, 1], then `(x - mean) / std` per
/// channel — as the model was trained. The server applies it to `BYTES` inputs; with an
/// `FP32` input it only records the normalisation clients must apply (and sluice's dataset
/// commands do), its size limits unused.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Largest encoded image accepted, in bytes.
    #[serde(default = "default_max_image_bytes")]
    pub max_bytes: usize,
    /// Largest image accepted, in pixels (width × height, read from the header before
    /// decoding).
    #[serde(default = "default_max_image_pixels")]
    pub max_pixels: u64,
}

/// Default of `input.image.max_bytes`: 256 KiB.
pub const DEFAULT_MAX_IMAGE_BYTES: usize = 256 << 10;
/// Default of `input.image.max_pixels`: 4 megapixels (2048 × 2048).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 2048 * 2048;

impl ImageConfig {
    /// Per-channel normalisation with the default size limits.
    pub fn new(mean: Vec<f64>, std: Vec<f64>) -> Self {
        ImageConfig { mean, std, max_bytes: DEFAULT_MAX_IMAGE_BYTES, max_pixels: DEFAULT_MAX_IMAGE_PIXELS }
    }
}

fn default_max_image_bytes() -> usize {
    DEFAULT_MAX_IMAGE_BYTES
}

fn default_max_image_pixels() -> u64 {
    DEFAULT_MAX_IMAGE_PIXELS
}

/// The model's output tensor.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub name: String,
    /// Class names; their count is the number of classes.
    pub labels: Vec<String>,
}

/// The longest idle spin a model config may ask for.
pub const MAX_IDLE_SPIN_US: u64 = 10_000;

/// Dynamic batching and engine instances.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// How long the first request of a batch may wait for others. 0 (Triton's default):
    /// a free engine takes whatever is queued at once; under load requests queue while the
    /// engine computes, so batches still form, and a lone request never waits.
    pub max_queue_delay_us: u64,
    /// Requests admitted but not yet answered; more are refused at once (429).
    pub queue_capacity: usize,
    /// Engine threads (model copies) for this model.
    pub instances: usize,
    /// libtorch threads per engine instance of this model (default: the server's
    /// `--engine-threads`).
    pub threads: Option<usize>,
    /// After its queue runs dry, one free engine busy-waits this long for the next request
    /// before it sleeps (0: sleep at once). On VMs that halt idle vCPUs a sleeping engine
    /// wakes to cold caches; spinning keeps a lightly loaded engine fast at the price of
    /// one core's worth of CPU while it spins (docs/benchmarks.md). At most 10 000.
    pub idle_spin_us: u64,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_queue_delay_us: 0,
            queue_capacity: 256,
            instances: 1,
            threads: None,
            idle_spin_us: 0,
        }
    }
}

/// A model folder, read and checked.
#[derive(Clone, Debug)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub spec: ArchSpec,
}

impl ModelDir {
    /// Reads `dir/config.toml` and checks it describes a model sluice can build.
    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join(CONFIG_FILE);
        let bad = |why: String| EngineError::InvalidConfig(format!("{}: {why}", path.display()));
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let config: ModelConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let spec =
            ArchSpec::named(&config.architecture, config.input.dims[0], config.output.labels.len() as i64)?;
        if config.max_batch_size == 0 || config.batching.queue_capacity == 0 || config.batching.instances == 0
        {
            return Err(bad(
                "max_batch_size, batching.queue_capacity and batching.instances must be positive".into(),
            ));
        }
        if config.batching.idle_spin_us > MAX_IDLE_SPIN_US {
            return Err(bad(format!(
                "batching.idle_spin_us is {}; at most {MAX_IDLE_SPIN_US} (a spinning engine holds a core)",
                config.batching.idle_spin_us
            )));
        }
        match (&config.input.datatype, &config.input.image) {
            (InputDatatype::Bytes, None) => {
                return Err(bad("a BYTES input needs [input.image] settings".into()));
            }
            (_, Some(img))
                if img.mean.len() != config.input.dims[0] as usize || img.std.len() != img.mean.len() =>
            {
                return Err(bad(format!(
                    "input.image mean and std need {} values (one per channel)",
                    config.input.dims[0]
                )));
            }
            (_, Some(img))
                if img.mean.iter().chain(&img.std).any(|v| !v.is_finite())
                    || img.std.iter().any(|&s| s <= 0.0) =>
            {
                return Err(bad("input.image mean must be finite and std positive".into()));
            }
            _ => {}
        }
        let r = &config.requests;
        let min = r.min_budget.unwrap_or(f64::MIN_POSITIVE);
        if !(min > 0.0 && min <= r.max_budget && r.max_budget <= 1.0) {
            return Err(bad(format!(
                "requests: need 0 < min_budget ≤ max_budget ≤ 1 (min_budget {:?}, max_budget {})",
                r.min_budget, r.max_budget
            )));
        }
        if let Some(img) = &config.input.image
            && (img.max_bytes == 0 || img.max_pixels == 0)
        {
            return Err(bad("input.image max_bytes and max_pixels must be positive".into()));
        }
        if !(1..=3).contains(&config.input.dims[0]) || config.input.dims[0] == 2 {
            return Err(bad("input.dims[0] (channels) must be 1 or 3".into()));
        }
        // What the engine accepts (`Model::check_input_shape`), checked before the weights are
        // packed for this size at load; 4096 bounds what one input may cost.
        let min_side = if spec.is_cifar() { 8 } else { 32 };
        if config.input.dims[1..].iter().any(|&side| !(min_side..=4096).contains(&side)) {
            return Err(bad(format!(
                "input.dims height and width must be from {min_side} to 4096 for {}",
                config.architecture
            )));
        }
        if config.name.is_empty() || config.name.contains('/') {
            return Err(bad(format!("model name `{}` must be non-empty and contain no '/'", config.name)));
        }
        Ok(ModelDir { dir: dir.to_path_buf(), config, spec })
    }

    /// How to build this model on an engine thread, in `layout` and the configured precision,
    /// prepared for the configured input size (and batch size 1 only when the model never
    /// batches).
    pub fn source(&self, layout: Layout) -> ModelSource {
        ModelSource {
            spec: self.spec.clone(),
            gates: self.config.gates.clone(),
            weights: Some(self.dir.join(&self.config.weights)),
            seed: 0,
            format: {
                let [_, h, w] = self.config.input.dims;
                let format = Format::new(layout, self.config.precision).for_input(h, w);
                if self.config.max_batch_size == 1 { format.unbatched() } else { format }
            },
        }
    }

    /// The calibration table's path: the configured one, or `calibration.json` if present.
    pub fn calibration_path(&self) -> Option<PathBuf> {
        match &self.config.calibration {
            Some(p) => Some(self.dir.join(p)),
            None => {
                let p = self.dir.join(crate::control::calibration::CALIBRATION_FILE);
                p.is_file().then_some(p)
            }
        }
    }
}

/// Every model folder directly under `root` (folders without `config.toml` are ignored),
/// sorted by name; fails on the first invalid one or on duplicate names. A `root` that holds
/// a `config.toml` itself is one model's folder, served alone.
pub fn scan(root: &Path) -> Result<Vec<ModelDir>, EngineError> {
    if root.join(CONFIG_FILE).is_file() {
        // The root is itself one model's folder (as KServe mounts a model at /mnt/models).
        return Ok(vec![ModelDir::open(root)?]);
    }
    let entries = std::fs::read_dir(root)
        .map_err(|e| EngineError::InvalidConfig(format!("model repository {}: {e}", root.display())))?;
    let mut dirs: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join(CONFIG_FILE).is_file()).collect();
    dirs.sort();
    let models = dirs.iter().map(|d| ModelDir::open(d)).collect::<Result<Vec<_>, _>>()?;
    for (i, m) in models.iter().enumerate() {
        if models[..i].iter().any(|o| o.config.name == m.config.name) {
            return Err(EngineError::InvalidConfig(format!(
                "two model folders are named `{}`",
                m.config.name
            )));
        }
    }
    Ok(models)
}

/// Serves the one model of `models` under `name` (`sluice serve --model-name`, as KServe
/// names a model it mounts): refused unless the repository holds exactly one model, or when
/// the name could not appear in a URL path as it is.
pub fn rename_single(models: &mut [ModelDir], name: &str) -> Result<(), EngineError> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if !valid {
        return Err(EngineError::InvalidConfig(format!(
            "--model-name `{name}`: use 1 to 128 letters, digits, `-`, `_` or `.`, not starting with `.`"
        )));
    }
    match models {
        [one] => {
            one.config.name = name.to_string();
            Ok(())
        }
        _ => Err(EngineError::InvalidConfig(format!(
            "--model-name names the one model of a single-model repository; this one holds {}",
            models.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_folder_is_a_repository_of_one_and_can_be_renamed() {
        let shipped = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/models"));
        let mut all = scan(shipped).unwrap();
        let mut one = scan(&shipped.join("fashion-resnet20")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].config.name, "fashion-resnet20");
        rename_single(&mut one, "my-model").unwrap();
        assert_eq!(one[0].config.name, "my-model");
        let e = rename_single(&mut one, "../x").unwrap_err().to_string();
        assert!(e.contains("--model-name `../x`"), "{e}");
        assert!(rename_single(&mut one, "").is_err());
        let e = rename_single(&mut all, "m").unwrap_err().to_string();
        assert!(e.contains(&format!("holds {}", all.len())) && all.len() > 1, "{e}");
    }

    /// The shipped model's config, changed by `edit`.
    fn open_edited(edit: impl FnOnce(&mut toml::Table)) -> Result<ModelDir, EngineError> {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/models/fashion-resnet20/config.toml");
        let mut config: toml::Table = std::fs::read_to_string(shipped).unwrap().parse().unwrap();
        edit(&mut config);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), toml::to_string(&config).unwrap()).unwrap();
        ModelDir::open(dir.path())
    }

    /// The shipped model's config with `[batching] idle_spin_us` set.
    fn open_with_spin(us: u64) -> Result<ModelDir, EngineError> {
        open_edited(|config| {
            config["batching"].as_table_mut().unwrap().insert("idle_spin_us".into(), (us as i64).into());
        })
    }

    /// Input sides outside what the engine runs are refused when the folder is opened,
    /// before any weight is packed for them.
    #[test]
    fn input_sides_are_bounded() {
        let with_dims = |dims: [i64; 3]| {
            open_edited(|config| {
                let dims = toml::Value::Array(dims.iter().map(|&d| toml::Value::Integer(d)).collect());
                config["input"].as_table_mut().unwrap().insert("dims".into(), dims);
            })
        };
        assert_eq!(with_dims([1, 32, 32]).unwrap().config.input.dims, [1, 32, 32]);
        for dims in [[1, 4, 28], [1, 28, 5000]] {
            let err = with_dims(dims).unwrap_err().to_string();
            assert!(err.contains("input.dims height and width must be from 8 to 4096 for resnet20"), "{err}");
        }
    }

    #[test]
    fn idle_spin_is_bounded() {
        assert_eq!(open_with_spin(MAX_IDLE_SPIN_US).unwrap().config.batching.idle_spin_us, MAX_IDLE_SPIN_US);
        let err = open_with_spin(MAX_IDLE_SPIN_US + 1).unwrap_err().to_string();
        assert!(err.contains("batching.idle_spin_us is 10001; at most 10000"), "{err}");
    }
}
