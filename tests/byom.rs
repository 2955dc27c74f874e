//! Bring your own data: an image folder sluice has never seen, through `train`, `calibrate`
//! and `eval` with `--data imagefolder:DIR`, each step's output checked.

use std::path::Path;

mod common;

use common::{json_lines, sluice};

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
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
