//! The `sluice` binary's machine-readable output.

use std::process::Command;

fn sluice(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(args).output().expect("sluice runs")
}

#[test]
fn model_info_json_reports_parameters_and_dense_flops() {
    let out = sluice(&["model", "info", "resnet50", "--input", "1x3x224x224", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["parameters"], 25_557_032);
    let flops = info["dense_flops"].as_f64().unwrap();
    assert!((flops - 8.2e9).abs() / 8.2e9 < 0.02, "{flops}");
    assert_eq!(info["layers"].as_array().unwrap().len(), 54);

    let out = sluice(&["model", "info", "resnet20", "--input", "4x1x28x28", "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["dense_flops"].as_u64().unwrap(), 4 * info["dense_flops_per_input"].as_u64().unwrap());
}

#[test]
fn model_info_rejects_bad_arguments_clearly() {
    let out = sluice(&["model", "info", "vgg16"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vgg16") && err.contains("resnet50"), "{err}");

    let out = sluice(&["model", "info", "resnet50", "--input", "1x3xbig"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1x3xbig"));
}
