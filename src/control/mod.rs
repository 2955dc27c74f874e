//! Control: the gating policy's calibration (budget → thresholds).

pub mod calibration;
