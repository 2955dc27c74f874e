//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod server;

use std::path::PathBuf;

use tch::Tensor;

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Reads one named tensor from a safetensors fixture.
pub fn fixture_tensor(file: &str, name: &str) -> Tensor {
    Tensor::read_safetensors(fixture(file))
        .expect("fixture readable")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{file} has no tensor {name}"))
        .1
}

/// Largest absolute difference between two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
