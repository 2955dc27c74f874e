//! Bring your own data: an image folder sluice has never seen, through `train`, `calibrate`
//! and `eval` with `--data imagefolder:DIR`, each step's output checked.

use std::path::Path;

mod common;

use common::{json_lines, sluice};

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn exit_weight_must_be_a_non_negative_number() {
    for bad in ["-1", "nan", "inf", "heavy"] {
        let out = sluice(&["train", "--out", "/nonexistent/run", "--exit-weight", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("expected a loss weight >= 0"), "{bad}: {stderr}");
    }
}

#[test]
fn distill_temperature_is_from_1_to_20_and_needs_init() {
    for bad in ["0.5", "0", "-2", "25", "nan", "warm"] {
        let out = sluice(&[
            "train",
            "--out",
            "/nonexistent/run",
            "--init",
            "/nonexistent/model",
            "--distill-temperature",
            bad,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("expected a distillation temperature from 1 to 20"),
            "{bad}: {stderr}"
        );
    }
    let out = sluice(&["train", "--out", "/nonexistent/run", "--distill-temperature", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("required arguments were not provided")
            && stderr.contains("--init"),
        "{stderr}"
    );
}

#[test]
fn gate_lr_needs_init() {
    let out = sluice(&["train", "--out", "/nonexistent/run", "--gate-lr", "0.2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--init"), "{stderr}");
}

/// Three classes of 32×32 RGB PNGs, 40 each: a colour per class under a varying pattern.
fn write_folder(root: &Path) {
    for (class, colour) in [("red", [200u8, 40, 40]), ("green", [40, 180, 60]), ("blue", [30, 60, 210])] {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..40u32 {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let wave = ((x * 7 + y * 3 + i * 11) % 40) as u8;
                image::Rgb(colour.map(|c| c.saturating_sub(20).saturating_add(wave)))
            });
            img.save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
}

#[test]
fn an_image_folder_trains_calibrates_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    write_folder(&dir.path().join("images"));
    let data = format!("imagefolder:{}", path("images"));

    ok(sluice(&[
        "train",
        "--out",
        &path("run"),
        "--data",
        &data,
        "--dims",
        "3x32x32",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--export",
        &path("model"),
        "--name",
        "colours",
        "--augment",
        "none",
        "--exit-weight",
        "0.8",
        "--quiet",
    ]));
    let config: toml::Table =
        std::fs::read_to_string(dir.path().join("model/config.toml")).unwrap().parse().unwrap();
    let labels: Vec<&str> =
        config["output"]["labels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(labels, ["blue", "green", "red"], "sorted folder names");
    assert_eq!(config["input"]["dims"].as_array().unwrap().len(), 3);
    let mean: Vec<f64> =
        config["input"]["image"]["mean"].as_array().unwrap().iter().map(|v| v.as_float().unwrap()).collect();
    // Measured on the training images: red dominates one class in three.
    assert_eq!(mean.len(), 3);
    assert!(mean.iter().all(|m| (0.1..0.7).contains(m)), "{mean:?}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/checkpoint.json")).unwrap())
            .unwrap();
    assert_eq!(run["config"]["classes"], 3);
    assert_eq!(run["config"]["augment"], "none", "--augment is recorded with the run");
    assert_eq!(run["config"]["exit_weight"], 0.8, "--exit-weight is recorded with the run");
    assert!(run["config"]["data"].as_str().unwrap().starts_with("imagefolder:"));

    ok(sluice(&["calibrate", &path("model"), "--data", &data, "--steps", "3"]));
    let table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("model/calibration.json")).unwrap()).unwrap();
    assert_eq!(table["images"], 12, "every tenth image of each class validates");

    let out = ok(sluice(&["eval", &path("model"), "--data", &data, "--latency-images", "0", "--json"]));
    let rows = json_lines(&out.stdout);
    assert!(rows.len() > 1);
    for row in &rows {
        assert_eq!(row["images"], 12);
        assert!((0.0..=1.0).contains(&row["accuracy"].as_f64().unwrap()), "{row}");
    }
    let out = ok(sluice(&["eval", &path("model"), "--data", &data, "--latency-images", "0"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("validation split (it has no test split)"));
    // Over the memory limit the folder streams from disk: same images, same results.
    let streamed = ok(sluice(&[
        "eval",
        &path("model"),
        "--data",
        &data,
        "--data-memory-mib",
        "0",
        "--latency-images",
        "0",
        "--json",
    ]));
    assert!(String::from_utf8_lossy(&streamed.stderr).contains("streaming its files from disk"));
    assert_eq!(json_lines(&streamed.stdout), rows);

    // A dataset that does not fit the model, and one that is not there, are named.
    let out = sluice(&["eval", &path("model"), "--data", "fashion-mnist", "--latency-images", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the dataset's images are [1, 28, 28] (C, H, W); the model takes [3, 32, 32]"),
        "{err}"
    );
    let out = sluice(&["calibrate", &path("model"), "--data", &format!("cifar10:{}", path("nowhere"))]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nowhere/data_batch_1.bin"), "{err}");
    let out = sluice(&["eval", &path("model"), "--data", "imagenet:/x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected fashion-mnist[:DIR], idx:DIR"));
}

/// The whole path in miniature, on a network sluice did not train: a dense checkpoint (here
/// `model init`'s random weights stand in for one trained elsewhere) is imported, gates are
/// retrofitted on the image folder with the dense network as teacher, the result is
/// calibrated on the folder's validation split, served, and answers over HTTP at a budget.
#[test]
fn import_retrofit_calibrate_serve() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &str| dir.path().join(p).to_str().unwrap().to_string();
    write_folder(&dir.path().join("images"));
    let data = format!("imagefolder:{}", path("images"));
    ok(sluice(&[
        "model",
        "init",
        &path("elsewhere"),
        "--arch",
        "resnet20",
        "--dims",
        "3x32x32",
        "--classes",
        "3",
    ]));
    std::fs::write(path("labels.txt"), "blue\ngreen\nred\n").unwrap();
    let out = ok(sluice(&[
        "model",
        "import",
        &path("elsewhere/model.safetensors"),
        &path("repo/imported"),
        "--arch",
        "resnet20",
        "--dims",
        "3x32x32",
        "--mean",
        "0.4,0.4,0.4",
        "--std",
        "0.3,0.3,0.3",
        "--labels",
        &path("labels.txt"),
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("matches the reference"));

    ok(sluice(&[
        "train",
        "--init",
        &path("repo/imported"),
        "--out",
        &path("run"),
        "--data",
        &data,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--export",
        &path("repo/retrofit"),
        "--name",
        "retrofit",
        "--distill-temperature",
        "2",
        "--quiet",
    ]));
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/checkpoint.json")).unwrap())
            .unwrap();
    assert!(run["config"]["init"].as_str().unwrap().ends_with("imported/model.safetensors"), "{run}");
    assert_eq!(run["config"]["lr"], 0.01, "a retrofit fine-tunes");
    assert_eq!(run["config"]["gate_lr"], 0.1, "its new gates and exits learn at the from-scratch rate");
    assert_eq!(run["config"]["warmup_epochs"], 0.2, "{run}");
    assert_eq!(run["config"]["exit_distill"], true, "{run}");
    assert_eq!(run["config"]["order_channels"], true, "{run}");
    assert_eq!(run["config"]["distill_temperature"], 2.0, "--distill-temperature is recorded with the run");
    assert_eq!(run["config"]["mean"], serde_json::json!([0.4, 0.4, 0.4]), "normalised as the teacher was");
    let config: toml::Table =
        std::fs::read_to_string(dir.path().join("repo/retrofit/config.toml")).unwrap().parse().unwrap();
    assert_eq!(config["gates"]["channel"].as_bool(), Some(true));
    assert_eq!(config["architecture"].as_str(), Some("resnet20"));

    ok(sluice(&["calibrate", &path("repo/retrofit"), "--data", &data, "--steps", "3"]));
    let server = common::server::Server::start(&dir.path().join("repo"), &[]);
    let image: Vec<f32> = (0..3 * 32 * 32).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
    let infer = |model: &str, parameters: serde_json::Value| {
        let body = serde_json::json!({
            "inputs": [{ "name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": image }],
            "parameters": parameters
        });
        let url = format!("/v2/models/{model}/infer");
        let reply = common::server::request(server.http, "POST", &url, &[], body.to_string().as_bytes());
        assert_eq!(reply.status, 200, "{model}: {}", String::from_utf8_lossy(&reply.body));
        reply.json()
    };
    let dense = infer("imported", serde_json::json!({}));
    assert_eq!(dense["outputs"][0]["shape"], serde_json::json!([1, 3]), "{dense}");
    let gated = infer("retrofit", serde_json::json!({ "sluice_budget": 0.5 }));
    assert_eq!(gated["outputs"][0]["shape"], serde_json::json!([1, 3]), "{gated}");
    let p = &gated["parameters"];
    assert_eq!(p["sluice_policy_override"], true, "{gated}");
    assert!(p["sluice_flops_executed"].as_i64() <= p["sluice_flops_dense"].as_i64(), "{gated}");
    server.terminate();
}
