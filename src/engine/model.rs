//! A loaded model: its architecture, gate layout and gated inference network, built on the
//! thread that will own it.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use super::arch::ArchSpec;
use super::folded::Format;
use super::gated::GatedResNet;
use super::gates::{GateConfig, GateLayout, GateParams};
use super::params::ResNetParams;
use super::policy::GatePolicy;
use super::report::ComputeReport;
use super::{EngineError, weights};

/// Where a model comes from: plain data that can cross threads (tensors cannot be shared).
#[derive(Clone, Debug)]
pub struct ModelSource {
    pub spec: ArchSpec,
    pub gates: GateConfig,
    /// Safetensors weights; `None` means random initialisation from `seed`.
    pub weights: Option<PathBuf>,
    pub seed: i64,
    pub format: Format,
}

impl ModelSource {
    /// A randomly initialised dense model (benchmarks, tests, `model info`).
    pub fn random(spec: ArchSpec, seed: i64) -> Self {
        ModelSource { spec, gates: GateConfig::default(), weights: None, seed, format: Format::default() }
    }
}

/// Every parameter of a model, registered in one `VarStore`.
#[derive(Debug)]
pub struct NetworkParams {
    pub backbone: ResNetParams,
    pub gates: GateParams,
}

/// A model ready for inference.
#[derive(Debug)]
pub struct Model {
    pub spec: ArchSpec,
    pub net: GatedResNet,
    gate_ids: Vec<String>,
}

impl Model {
    /// Loads (or randomly initialises) the parameters and builds the inference network.
    pub fn build(source: &ModelSource) -> Result<Self, EngineError> {
        let (_vs, params) = load_params(source)?;
        Ok(Model::from_params(&params, source.format))
    }

    /// Builds the inference network from parameters already in memory.
    pub fn from_params(params: &NetworkParams, format: impl Into<Format>) -> Self {
        let net = GatedResNet::build(&params.backbone, &params.gates, format);
        let gate_ids = params.gates.layout.gate_ids(&params.backbone.spec);
        Model { spec: params.backbone.spec.clone(), net, gate_ids }
    }

    /// The ids of every gate, as policy overrides name them.
    pub fn gate_ids(&self) -> &[String] {
        &self.gate_ids
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

    /// Runs a `[N, C, H, W]` f32 batch under `policy`: `[N, classes]` logits and a compute
    /// report per input.
    pub fn forward(
        &self,
        input: &Tensor,
        policy: &GatePolicy,
    ) -> Result<(Tensor, Vec<ComputeReport>), EngineError> {
        self.check_input_shape(&input.size())?;
        if input.kind() != Kind::Float {
            return Err(EngineError::InvalidConfig(format!("input dtype {:?}, expected f32", input.kind())));
        }
        Ok(self.net.forward(input, policy))
    }
}

/// libtorch's random generator, held by one thread from seeding to its last draw. libtorch
/// has one generator per process, so two threads that seed and draw at the same time (tests
/// running in parallel, models initialised side by side) would interleave their draws and
/// get different numbers on every run. Every seeding in sluice and its tests takes a turn
/// ([`seeded`] for a closure); while a thread holds one, it must not take another (it would
/// wait for itself).
pub struct GeneratorTurn {
    _turn: MutexGuard<'static, ()>,
}

impl GeneratorTurn {
    /// Waits for the generator, then seeds it with `seed`.
    pub fn seeded(seed: i64) -> Self {
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        tch::manual_seed(seed);
        GeneratorTurn { _turn: turn }
    }
}

/// Runs `draw` on libtorch's generator seeded with `seed`, with no other thread seeding or
/// drawing through a [`GeneratorTurn`] meanwhile.
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    let _turn = GeneratorTurn::seeded(seed);
    draw()
}

/// Builds the parameter store of `source` (random, or loaded strictly from safetensors).
pub fn load_params(source: &ModelSource) -> Result<(VarStore, NetworkParams), EngineError> {
    let layout = GateLayout::new(&source.spec, &source.gates)?;
    let (mut vs, backbone, gates) = seeded(source.seed, || {
        let vs = VarStore::new(Device::Cpu);
        let backbone = ResNetParams::new(&vs.root(), &source.spec);
        let gates = GateParams::new(&vs.root(), &source.spec, &layout);
        (vs, backbone, gates)
    });
    if let Some(path) = &source.weights {
        weights::load_strict(&mut vs, path)?;
    }
    Ok((vs, NetworkParams { backbone, gates }))
}
