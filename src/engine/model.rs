//! A loaded model: its architecture and folded inference network, built on the thread
//! that will own it.

use std::path::PathBuf;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::arch::ArchSpec;
use super::folded::{FoldedResNet, Layout};
use super::params::ResNetParams;
use super::{EngineError, weights};

/// Where a model comes from: plain data that can cross threads (tensors cannot be shared).
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub spec: ArchSpec,
    /// Safetensors weights; `None` means random initialisation from `seed`.
    pub weights: Option<PathBuf>,
    pub seed: i64,
    pub layout: Layout,
}

impl ModelSource {
    /// A randomly initialised model (benchmarks, tests, `model info`).
    pub fn random(spec: ArchSpec, seed: i64) -> Self {
        ModelSource { spec, weights: None, seed, layout: Layout::default() }
    }
}

/// A dense model ready for inference.
#[derive(Debug)]
pub struct Model {
    pub spec: ArchSpec,
    pub net: FoldedResNet,
}

impl Model {
    /// Loads (or randomly initialises) the parameters and folds them for inference.
    pub fn build(source: &ModelSource) -> Result<Self, EngineError> {
        let params = load_params(source)?;
        Ok(Model { spec: source.spec.clone(), net: FoldedResNet::fold(&params.1, source.layout) })
    }

    /// Checks that `shape` is `[N, C, H, W]` with the model's channels and a usable size.
    pub fn check_input_shape(&self, shape: &[i64]) -> Result<(), EngineError> {
        let bad = |why: String| EngineError::InputShape { got: shape.to_vec(), why };
        let [n, c, h, w] = shape else {
            return Err(bad("expected 4 dimensions [batch, channels, height, width]".into()));
        };
        if *n < 1 {
            return Err(bad("batch must be at least 1".into()));
        }
        if *c != self.spec.in_channels {
            return Err(bad(format!("expected {} channels, got {c}", self.spec.in_channels)));
        }
        let min = if self.spec.is_cifar() { 8 } else { 32 };
        if *h < min || *w < min {
            return Err(bad(format!("height and width must be at least {min}")));
        }
        Ok(())
    }

    /// Dense forward pass of a `[N, C, H, W]` f32 batch; returns `[N, classes]` logits.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, EngineError> {
        self.check_input_shape(&input.size())?;
        if input.kind() != Kind::Float {
            return Err(EngineError::InvalidConfig(format!("input dtype {:?}, expected f32", input.kind())));
        }
        Ok(self.net.forward(input))
    }
}

/// Builds the parameter store of `source` (random, or loaded strictly from safetensors).
/// Returns the store with the parameters registered in it.
pub fn load_params(source: &ModelSource) -> Result<(VarStore, ResNetParams), EngineError> {
    tch::manual_seed(source.seed);
    let mut vs = VarStore::new(Device::Cpu);
    let params = ResNetParams::new(&vs.root(), &source.spec);
    if let Some(path) = &source.weights {
        weights::load_strict(&mut vs, path)?;
    }
    Ok((vs, params))
}
