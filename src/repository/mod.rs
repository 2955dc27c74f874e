//! The model repository: one folder per model (like Triton's), holding `config.toml`, the
//! safetensors weights and, for gated models, the calibration table.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::{ArchSpec, EngineError, GateConfig, Layout, ModelSource};

/// File name of a model folder's configuration.
pub const CONFIG_FILE: &str = "config.toml";

/// A model folder's `config.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use.
    pub name: String,
    /// One of [`ArchSpec::KNOWN`].
    pub architecture: String,
    /// Weights file, relative to the folder.
    pub weights: PathBuf,
    pub input: InputConfig,
    pub output: OutputConfig,
    /// Which gates the model has (none: a dense model).
    #[serde(default)]
    pub gates: GateConfig,
}

/// The model's input tensor.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    /// Per-item shape `[channels, height, width]` (the batch dimension is implicit).
    pub dims: [i64; 3],
}

/// The model's output tensor.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub name: String,
    /// Class names; their count is the number of classes.
    pub labels: Vec<String>,
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
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::InvalidConfig(format!("{}: {e}", path.display())))?;
        let config: ModelConfig = toml::from_str(&text)
            .map_err(|e| EngineError::InvalidConfig(format!("{}: {e}", path.display())))?;
        let spec =
            ArchSpec::named(&config.architecture, config.input.dims[0], config.output.labels.len() as i64)?;
        Ok(ModelDir { dir: dir.to_path_buf(), config, spec })
    }

    /// How to build this model on an engine thread.
    pub fn source(&self, layout: Layout) -> ModelSource {
        ModelSource {
            spec: self.spec.clone(),
            gates: self.config.gates.clone(),
            weights: Some(self.dir.join(&self.config.weights)),
            seed: 0,
            layout,
        }
    }
}
