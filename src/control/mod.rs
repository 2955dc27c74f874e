//! Control: the live gating policy of each model and its calibration (budget → thresholds).

pub mod auth;
pub mod calibration;
pub mod controller;
pub mod policy;
pub mod policy_file;

pub use policy::{
    ChangeError, ChangeKind, FollowedVersion, PolicyChange, PolicyError, PolicyRequest, PolicyStore,
    RequestBounds,
};
