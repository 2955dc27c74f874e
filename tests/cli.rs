//! The `sluice` binary's machine-readable output.

mod common;

use common::{json_lines, sluice};

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
    assert_eq!(row["width_levels"], 8, "the models' default");
    let out = sluice(&["bench", "engine", "--layout", "sideways"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown layout"));

    // The gated models' width levels, as asked for, and refused outside 1..=64.
    let common = ["bench", "engine", "--models", "resnet20", "--batches", "1", "--rounds", "1", "--json"];
    let out = sluice(
        &[&common[..], &["--gates", "channel-slice", "--targets", "0.5", "--width-levels", "4"]].concat(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let row: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(row["width_levels"], 4);
    assert!(row["flop_fraction"].as_f64().unwrap() < 0.9, "{row}");
    let out = sluice(&[&common[..], &["--width-levels", "0"]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--width-levels"));
}

/// `bench widths` times every width a channel gate may choose in one identity block per
/// stage: rows for exactly the allowed widths, FLOP fractions from the widths, the full
/// width as the time reference.
#[test]
fn bench_widths_times_every_allowed_width_of_each_stage() {
    let out = sluice(&["bench", "widths", "--arch", "resnet20", "--rounds", "2", "--calls", "3", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows = json_lines(&out.stdout);
    let per_block = |prefix: &str| -> Vec<(i64, f64, f64)> {
        rows.iter()
            .filter(|r| r["block"] == prefix)
            .map(|r| {
                (
                    r["inner"].as_i64().unwrap(),
                    r["flop_fraction"].as_f64().unwrap(),
                    r["time_fraction"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // ResNet-20 at 32×32: layer1.0 (16 channels, 32×32), layer2.1 (32, 16×16), layer3.1 (64, 8×8);
    // widths are multiples of 8 from a quarter of the inner width.
    let inner = |rows: &[(i64, f64, f64)]| rows.iter().map(|r| r.0).collect::<Vec<_>>();
    assert_eq!(inner(&per_block("layer1.0")), vec![8, 16]);
    assert_eq!(inner(&per_block("layer2.1")), vec![8, 16, 24, 32]);
    assert_eq!(inner(&per_block("layer3.1")), vec![16, 24, 32, 40, 48, 56, 64]);
    assert_eq!(rows.len(), 13, "one identity block per stage, nothing else");
    for block in ["layer1.0", "layer2.1", "layer3.1"] {
        let rows = per_block(block);
        let full = rows[rows.len() - 1];
        assert_eq!((full.1, full.2), (1.0, 1.0), "{block}: the full width is the reference");
        let c = full.0 as f64;
        for &(k, flops, time) in &rows {
            // Two convolutions, each linear in the inner width.
            assert!((flops - k as f64 / c).abs() < 1e-9, "{block} width {k}: {flops}");
            assert!(time.is_finite() && time > 0.0, "{block} width {k}: {time}");
        }
    }
    let table = sluice(&["bench", "widths", "--rounds", "1", "--calls", "1"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("CPU: ") && text.contains("| layer3.1 | 64×8×8 | 64 | 1.00 |"), "{text}");
    let bad = sluice(&["bench", "widths", "--dims", "3x32"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--dims must be CxHxW"));
    let huge = sluice(&["bench", "widths", "--dims", "3x100000x100000"]);
    assert!(!huge.status.success());
    assert!(String::from_utf8_lossy(&huge.stderr).contains("each of --dims at most 1024"));
    let many = sluice(&["bench", "widths", "--batch", "257"]);
    assert!(!many.status.success());
    assert!(String::from_utf8_lossy(&many.stderr).contains("--batch must be at most 256"));
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
/// images: the table keeps every budget, each timed and within the accuracy margin, the eval
/// prints one JSON row per budget and writes its report.
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
    let frontier = table["frontier"].as_array().unwrap();
    // The default --flops-confidence: a budget's point keeps two standard errors below it.
    assert_eq!(table["flops_confidence"].as_f64(), Some(2.0));
    let bound = |p: &serde_json::Value| {
        let stderr = p["flop_fraction_stderr"].as_f64().unwrap();
        assert!((0.0..0.05).contains(&stderr), "{p}");
        p["flop_fraction"].as_f64().unwrap() + 2.0 * stderr
    };
    for entry in budgets {
        let budget = entry["budget"].as_f64().unwrap();
        assert!(bound(entry) <= budget + 1e-12 || budget >= 1.0, "{entry}");
        // Timed at batch 1 (the default --latency-images), and never more than the default
        // --latency-margin (0.2 pt) below the most accurate point within the budget.
        let ratio = entry["latency_ratio"].as_f64().unwrap_or_else(|| panic!("no latency: {entry}"));
        assert!(ratio > 0.0 && ratio.is_finite(), "{entry}");
        if budget < 1.0 {
            let best = frontier
                .iter()
                .filter(|p| bound(p) <= budget)
                .map(|p| p["validation_accuracy"].as_f64().unwrap())
                .fold(0.0, f64::max);
            assert!(
                entry["validation_accuracy"].as_f64().unwrap() >= best - 0.002 - 1e-9,
                "{entry} vs {best}"
            );
        }
    }
    assert_eq!(budgets.last().unwrap()["latency_ratio"].as_f64(), Some(1.0), "dense is the reference");

    // One candidate per budget (the most accurate) is the FLOPs-only table, timed; margin 0
    // is the same table, untimed.
    let (one, flops) = (dir.path().join("one.json"), dir.path().join("flops.json"));
    let args = |out: &std::path::Path, extra: &[&str]| {
        let mut a =
            vec!["calibrate", model, "--limit", "300", "--steps", "4", "--out", out.to_str().unwrap()];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    for (out, extra) in [
        (&one, &["--latency-candidates", "1", "--latency-images", "20"][..]),
        (&flops, &["--latency-margin", "0"][..]),
    ] {
        let a = args(out, extra);
        let out = sluice(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let (one, flops) = (read(&one), read(&flops));
    let thresholds = |t: &serde_json::Value| -> Vec<(f64, f64, f64)> {
        t["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["channel_threshold"].as_f64().unwrap(),
                    e["block_threshold"].as_f64().unwrap(),
                    e["exit_threshold"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(thresholds(&one), thresholds(&flops));
    assert!(one["budgets"].as_array().unwrap().iter().all(|e| e["latency_ratio"].as_f64().is_some()));
    assert!(flops["budgets"].as_array().unwrap().iter().all(|e| e.get("latency_ratio").is_none()), "{flops}");

    for bad in ["nan", "-1"] {
        let out = sluice(&["calibrate", model, "--flops-confidence", bad]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--flops-confidence") && err.contains("standard errors"), "{bad}: {err}");
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
    let rows = json_lines(&out.stdout);
    assert_eq!(rows.len(), 1 + budgets.len(), "the dense row and one per budget");
    assert!(rows[0]["budget"].is_null());
    // Every gate open: exactly the dense network (the gate MLP is skipped when no gate reads
    // it), and budget 1.0 is that same network, not a cheaper point of the sweep.
    let dense_fraction = rows[0]["flop_fraction"].as_f64().unwrap();
    assert!((dense_fraction - 1.0).abs() < 1e-9, "{dense_fraction}");
    let top = rows.last().unwrap();
    assert_eq!(top["budget"].as_f64(), Some(1.0));
    assert_eq!((&top["accuracy"], &top["flop_fraction"]), (&rows[0]["accuracy"], &rows[0]["flop_fraction"]));
    let top_entry = budgets.last().unwrap();
    assert_eq!(
        (
            top_entry["channel_threshold"].as_f64(),
            top_entry["block_threshold"].as_f64(),
            top_entry["exit_threshold"].as_f64()
        ),
        (Some(0.0), Some(0.0), Some(1.0)),
        "{top_entry}"
    );
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

/// `sluice model import`: a torchvision-named checkpoint without its BatchNorm counters (a
/// common export) becomes a model folder that predicts exactly what the original weights
/// do; wrong checkpoints are refused, naming the problem, and leave no folder behind.
#[test]
fn model_import_makes_a_servable_folder_from_a_dense_checkpoint() {
    use tch::Tensor;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let out = sluice(&[
        "model",
        "init",
        &path("src"),
        "--arch",
        "resnet18",
        "--dims",
        "3x32x32",
        "--classes",
        "4",
        "--seed",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut tensors = Tensor::read_safetensors(dir.path().join("src/model.safetensors")).unwrap();
    let all = tensors.len();
    tensors.retain(|(n, _)| !n.ends_with("num_batches_tracked"));
    assert_eq!(all - tensors.len(), 20, "resnet18 has 20 batch-norms");
    Tensor::write_safetensors(&tensors, path("ckpt.safetensors")).unwrap();
    std::fs::write(path("labels.txt"), "cat\ndog\n\nbird\nfish\n").unwrap();

    let import = |ckpt: &str, out_dir: &str, extra: &[&str]| {
        let mut args = vec!["model", "import", ckpt, out_dir, "--arch", "resnet18", "--dims", "3x32x32"];
        args.extend(["--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.25"]);
        args.extend(extra);
        sluice(&args)
    };
    let out = import(&path("ckpt.safetensors"), &path("imported"), &["--labels", &path("labels.txt")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches the reference"));
    let config: toml::Table =
        std::fs::read_to_string(dir.path().join("imported/config.toml")).unwrap().parse().unwrap();
    assert_eq!(config["output"]["labels"].as_array().unwrap().len(), 4);
    assert_eq!(config["output"]["labels"][3].as_str(), Some("fish"));
    assert_eq!(config["input"]["image"]["std"].as_array().unwrap()[2].as_float(), Some(0.25));

    // Same logits as the folder the checkpoint came from.
    let input: Vec<f32> = (0..3 * 32 * 32).map(|i| ((i as f32) * 0.37).sin()).collect();
    std::fs::write(path("x.json"), serde_json::json!({"shape": [1, 3, 32, 32], "data": input}).to_string())
        .unwrap();
    let logits = |model: &str| {
        let out = sluice(&["model", "predict", model, "--input", &path("x.json")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["logits"][0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect::<Vec<_>>()
    };
    let (a, b) = (logits(&path("src")), logits(&path("imported")));
    assert_eq!(a.len(), 4);
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{a:?} vs {b:?}");

    // Refusals, each naming its problem.
    let out = import(&path("ckpt.safetensors"), &path("imported"), &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"), "{out:?}");
    std::fs::write(path("three.txt"), "a\nb\nc\n").unwrap();
    let out = import(&path("ckpt.safetensors"), &path("other"), &["--labels", &path("three.txt")]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("has 3 labels; the checkpoint's classifier has 4 outputs")
    );
    for (name, t) in tensors.iter_mut() {
        if name == "layer2.0.conv1.weight" {
            *t = Tensor::zeros([128, 64, 1, 1], (tch::Kind::Float, tch::Device::Cpu));
        }
    }
    tensors.retain(|(n, _)| n != "layer3.1.bn2.running_var");
    Tensor::write_safetensors(&tensors, path("bad.safetensors")).unwrap();
    let out = import(&path("bad.safetensors"), &path("other"), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`layer2.0.conv1.weight` has shape [128, 64, 1, 1] in the file"), "{err}");
    assert!(err.contains("missing tensor `layer3.1.bn2.running_var`"), "{err}");
    assert!(!dir.path().join("other").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".import-"))
        .collect();
    assert!(leftovers.is_empty(), "staging folders left behind");
}
