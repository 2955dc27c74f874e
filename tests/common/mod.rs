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

/// Runs the `sluice` binary built for the tests.
pub fn sluice(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("sluice runs")
}

/// One JSON value per non-empty line (`--json` outputs).
pub fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}
