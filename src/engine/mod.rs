//! The engine: tch models, FLOP accounting and weights. It knows nothing of HTTP, gRPC,
//! queues or metrics; callers hand it tensors and get logits (and compute reports) back.

pub mod arch;
pub mod flops;
pub mod folded;
pub mod gated;
pub mod gates;
pub mod memory;
pub mod model;
pub mod onednn;
pub mod params;
pub mod policy;
pub mod report;
pub mod weights;

pub use arch::{ArchSpec, BlockKind, StemKind};
pub use folded::{Format, Layout, Precision};
pub use gated::{ExitTrace, GatedResNet};
pub use gates::{BlockGates, GateConfig};
pub use model::{Model, ModelSource};
pub use policy::{ChannelMode, GatePolicy, PolicySource};
pub use report::{BatchTotals, BlockDecision, ComputeReport};

/// Errors of the engine layer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown architecture `{name}` (known: {known})")]
    UnknownArch { name: String, known: String },
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),
    #[error("weights file {file}: {problem}")]
    Weights { file: String, problem: String },
    #[error("input shape {got:?} does not fit the model: {why}")]
    InputShape { got: Vec<i64>, why: String },
    #[error("invalid gating policy: {0}")]
    InvalidPolicy(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
