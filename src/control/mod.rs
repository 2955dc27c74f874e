//! Control: the live gating policy of each model and its calibration (budget → thresholds).

pub mod calibration;
pub mod policy;

pub use policy::{PolicyError, PolicyRequest, PolicyStore};
