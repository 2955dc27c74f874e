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
fn bench_engine_runs_both_engines_in_the_format_asked_for() {
    let out = sluice(&[
        "bench",
        "engine",
        "--models",
        "resnet20",
        "--batches",
        "1",
        "--gates",
        "none",
        "--rounds",
        "1",
        "--layout",
        "onednn",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((row["layout"].as_str(), row["precision"].as_str()), (Some("onednn"), Some("fp32")));
    assert!(row["latency_ms"].as_f64().unwrap() > 0.0 && row["dense_ms"].as_f64().unwrap() > 0.0);
    let out = sluice(&["bench", "engine", "--layout", "sideways"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown layout"));
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

/// `sluice calibrate` then `sluice eval` on a copy of the shipped model, on a few hundred
/// images: the table keeps every budget, the eval prints one JSON row per budget and writes
/// its report.
#[test]
fn calibrate_then_eval_write_a_table_and_a_report() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/models/fashion-resnet20");
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.toml", "model.safetensors"] {
        std::fs::copy(shipped.join(file), dir.path().join(file)).unwrap();
    }
    let model = dir.path().to_str().unwrap();
    let out = sluice(&["calibrate", model, "--limit", "300", "--steps", "4"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("calibration.json")).unwrap()).unwrap();
    assert_eq!(table["images"], 300);
    let budgets = table["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 19);
    for entry in budgets {
        let (budget, fraction) =
            (entry["budget"].as_f64().unwrap(), entry["flop_fraction"].as_f64().unwrap());
        assert!(fraction <= budget, "{entry}");
    }

    let report = dir.path().join("report");
    let out = sluice(&[
        "eval",
        model,
        "--limit",
        "300",
        "--latency-images",
        "10",
        "--json",
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1 + budgets.len(), "the dense row and one per budget");
    assert!(rows[0]["budget"].is_null());
    // Every gate open: dense FLOPs plus the gate heads' own (well under 1%).
    let dense_fraction = rows[0]["flop_fraction"].as_f64().unwrap();
    assert!((1.0..1.01).contains(&dense_fraction), "{dense_fraction}");
    for row in &rows {
        let accuracy = row["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{row}");
        assert!(row["latency_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["flop_fraction"].as_f64().unwrap() > 0.0, "{row}");
    }
    let csv = std::fs::read_to_string(report.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + rows.len());
    assert!(std::fs::read_to_string(report.join("report.svg")).unwrap().contains("<svg"));
    assert!(std::fs::read_to_string(report.join("report.md")).unwrap().contains("| dense |"));
}
