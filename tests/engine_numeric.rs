//! Numerical truth: sluice's engine against PyTorch 2.11 (fixtures from
//! tests/fixtures/generate.py), torchvision's parameter names, strict weight loading.

mod common;

use std::collections::BTreeMap;

use common::{fixture, fixture_tensor, max_abs_diff};
use sluice::engine::folded::{FoldedResNet, Format, Layout, Precision};
use sluice::engine::params::ResNetParams;
use sluice::engine::{ArchSpec, EngineError, GatePolicy, Model, ModelSource, weights};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn resnet20_source(format: impl Into<Format>) -> ModelSource {
    ModelSource {
        weights: Some(fixture("resnet20_weights.safetensors")),
        format: format.into(),
        ..ModelSource::random(ArchSpec::named("resnet20", 1, 10).unwrap(), 0)
    }
}

#[test]
fn resnet20_matches_pytorch_eval_logits() {
    let _guard = tch::no_grad_guard();
    let input = fixture_tensor("resnet20_io.safetensors", "input");
    let expected = fixture_tensor("resnet20_io.safetensors", "logits");
    for layout in [Layout::ChannelsLast, Layout::Nchw, Layout::Onednn] {
        let model = Model::build(&resnet20_source(layout)).unwrap();
        let diff = max_abs_diff(&model.forward(&input, &GatePolicy::dense()).unwrap().0, &expected);
        assert!(diff <= 1e-4, "{layout:?}: max abs diff {diff}");
    }
    // onednn packs each weight for batch 1 and for batches; a model that never batches keeps
    // only the first, which serves a batch correctly too (oneDNN then reorders per call).
    let batch = input.size()[0];
    assert!(batch > 1, "the fixture is a batch");
    for format in [Format::from(Layout::Onednn), Format::from(Layout::Onednn).unbatched()] {
        let model = Model::build(&resnet20_source(format)).unwrap();
        for rows in [1, batch] {
            let logits = model.forward(&input.narrow(0, 0, rows), &GatePolicy::dense()).unwrap().0;
            let diff = max_abs_diff(&logits, &expected.narrow(0, 0, rows));
            assert!(diff <= 1e-4, "{format:?}, {rows} rows: max abs diff {diff}");
        }
    }
    // bf16 (where the CPU has it): 8 bits of mantissa through 20 layers, so agreement is
    // measured against the logits' scale, and the predicted classes must be PyTorch's.
    if Precision::Bf16.check().is_ok() {
        let scale = expected.abs().max().double_value(&[]);
        for layout in [Layout::ChannelsLast, Layout::Onednn] {
            let model = Model::build(&resnet20_source(Format::new(layout, Precision::Bf16))).unwrap();
            let logits = model.forward(&input, &GatePolicy::dense()).unwrap().0;
            assert_eq!(logits.kind(), Kind::Float, "logits stay FP32");
            let diff = max_abs_diff(&logits, &expected);
            assert!(diff <= 0.05 * scale, "bf16 {layout:?}: max abs diff {diff} at |logit| ≤ {scale}");
            assert_eq!(
                Vec::<i64>::try_from(logits.argmax(1, false)).unwrap(),
                Vec::<i64>::try_from(expected.argmax(1, false)).unwrap(),
                "bf16 {layout:?}: predicted classes"
            );
        }
    }
    // The unfolded reference path (used for training) agrees too.
    let (_vs, params) = sluice::engine::model::load_params(&resnet20_source(Layout::Nchw)).unwrap();
    let diff = max_abs_diff(&params.backbone.forward_t(&input, false), &expected);
    assert!(diff <= 1e-4, "reference path: max abs diff {diff}");
}

/// Mirrors `synthetic_value` in tests/fixtures/generate.py.
fn synthetic_value(index: usize, name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap();
    if leaf == "num_batches_tracked" {
        return Tensor::from(3i64).view(shape);
    }
    let wave = |i: i64| (0.37 * i as f64 + 1.7 * index as f64).sin();
    let fan_in = if shape.len() > 1 { n / shape[0] } else { 1 };
    let value = |i: i64| -> f32 {
        let w = wave(i);
        let v = match leaf {
            "running_var" => 1.0 + 0.5 * w,
            "running_mean" | "bias" => 0.1 * w,
            "weight" if shape.len() == 1 => 1.0 + 0.2 * w,
            _ => (2.0 / fan_in as f64).sqrt() * 2f64.sqrt() * w,
        };
        v as f32
    };
    let values: Vec<f32> = (0..n).map(value).collect();
    Tensor::from_slice(&values).view(shape)
}

#[test]
fn torchvision_resnets_match_pytorch_on_synthetic_weights() {
    let _guard = tch::no_grad_guard();
    let input = fixture_tensor("synthetic_io.safetensors", "input");
    let dir = tempfile::tempdir().unwrap();
    for arch in ["resnet18", "resnet50"] {
        let spec = ArchSpec::named(arch, 3, 1000).unwrap();
        // Write a torchvision-named state dict to safetensors, then load it strictly.
        let probe = VarStore::new(Device::Cpu);
        let _ = ResNetParams::new(&probe.root(), &spec);
        let mut names: Vec<(String, Vec<i64>)> =
            probe.variables().iter().map(|(n, t)| (n.clone(), t.size())).collect();
        names.sort();
        let tensors: Vec<(String, Tensor)> =
            names.iter().enumerate().map(|(i, (n, s))| (n.clone(), synthetic_value(i, n, s))).collect();
        let path = dir.path().join(format!("{arch}.safetensors"));
        Tensor::write_safetensors(&tensors, &path).unwrap();
        let source = ModelSource { weights: Some(path), ..ModelSource::random(spec, 0) };
        let logits = Model::build(&source).unwrap().forward(&input, &GatePolicy::dense()).unwrap().0;
        let expected = fixture_tensor("synthetic_io.safetensors", &format!("{arch}_logits"));
        let scale = expected.abs().max().double_value(&[]);
        let diff = max_abs_diff(&logits, &expected);
        assert!(diff <= 1e-5 * scale.max(1.0), "{arch}: max abs diff {diff} at logit scale {scale}");
    }
}

#[test]
fn parameter_names_and_shapes_equal_torchvision_state_dicts() {
    let text = std::fs::read_to_string(fixture("torchvision_manifest.json")).unwrap();
    let manifest: BTreeMap<String, BTreeMap<String, Vec<i64>>> = serde_json::from_str(&text).unwrap();
    for (arch, expected) in &manifest {
        let vs = VarStore::new(Device::Cpu);
        let _ = ResNetParams::new(&vs.root(), &ArchSpec::named(arch, 3, 1000).unwrap());
        let ours: BTreeMap<String, Vec<i64>> =
            vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        assert_eq!(&ours, expected, "{arch}");
    }
}

fn resnet20_tensors() -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(fixture("resnet20_weights.safetensors")).unwrap()
}

fn load_error(tensors: &[(String, Tensor)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    Tensor::write_safetensors(tensors, &path).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let _ = ResNetParams::new(&vs.root(), &ArchSpec::named("resnet20", 1, 10).unwrap());
    match weights::load_strict(&mut vs, &path) {
        Err(e @ EngineError::Weights { .. }) => e.to_string(),
        other => panic!("expected a weights error, got {other:?}"),
    }
}

#[test]
fn strict_loading_names_the_offending_tensor() {
    let mut missing = resnet20_tensors();
    missing.retain(|(n, _)| n != "layer2.1.bn1.running_var");
    let err = load_error(&missing);
    assert!(err.contains("missing tensor `layer2.1.bn1.running_var`"), "{err}");

    // A counter inference never reads may be left out (common torchvision exports); a
    // missing running statistic next to it is still refused.
    let mut without_counters = resnet20_tensors();
    without_counters.retain(|(n, _)| !n.ends_with("num_batches_tracked"));
    assert!(without_counters.len() < resnet20_tensors().len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no_counters.safetensors");
    Tensor::write_safetensors(&without_counters, &path).unwrap();
    let mut vs = VarStore::new(Device::Cpu);
    let _ = ResNetParams::new(&vs.root(), &ArchSpec::named("resnet20", 1, 10).unwrap());
    weights::load_strict(&mut vs, &path).unwrap();
    let vars = vs.variables();
    for (name, t) in &without_counters {
        assert!(vars[name].equal(&t.to_kind(vars[name].kind())), "{name} loaded");
    }
    without_counters.retain(|(n, _)| n != "layer1.0.bn2.running_mean");
    let err = load_error(&without_counters);
    assert!(err.contains("missing tensor `layer1.0.bn2.running_mean`"), "{err}");
    assert!(!err.contains("num_batches_tracked"), "{err}");

    let mut extra = resnet20_tensors();
    extra.push(("layer9.0.conv1.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
    let err = load_error(&extra);
    assert!(err.contains("unexpected tensor `layer9.0.conv1.weight`"), "{err}");

    let mut misshaped = resnet20_tensors();
    for (n, t) in misshaped.iter_mut() {
        if n == "fc.weight" {
            *t = Tensor::zeros([11, 64], (Kind::Float, Device::Cpu));
        }
    }
    let err = load_error(&misshaped);
    assert!(err.contains("`fc.weight` has shape [11, 64]") && err.contains("[10, 64]"), "{err}");
}

#[test]
fn cifar_weights_round_trip_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ArchSpec::named("resnet32", 1, 10).unwrap();
    let (vs, _params) = sluice::engine::model::load_params(&ModelSource::random(spec.clone(), 7)).unwrap();
    let path = dir.path().join("r32.safetensors");
    weights::save(&vs, &path).unwrap();
    let source = ModelSource { weights: Some(path), ..ModelSource::random(spec, 99) };
    let (reloaded, _) = sluice::engine::model::load_params(&source).unwrap();
    let before = vs.variables();
    let after = reloaded.variables();
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        assert!(t.equal(&after[name]), "{name} changed in the round trip");
    }
}

#[test]
fn folding_preserves_the_reference_forward_on_random_models() {
    let _guard = tch::no_grad_guard();
    for arch in ["resnet56", "resnet34"] {
        let spec = ArchSpec::named(arch, 3, 10).unwrap();
        let (_vs, params) = sluice::engine::model::load_params(&ModelSource::random(spec, 3)).unwrap();
        let x =
            sluice::engine::model::seeded(4, || Tensor::randn([2, 3, 40, 40], (Kind::Float, Device::Cpu)));
        let reference = params.backbone.forward_t(&x, false);
        let folded = FoldedResNet::fold(&params.backbone, Layout::ChannelsLast).forward(&x);
        let scale = reference.abs().max().double_value(&[]).max(1.0);
        let diff = max_abs_diff(&folded, &reference);
        assert!(diff <= 1e-5 * scale, "{arch}: {diff} at scale {scale}");
    }
}

#[test]
fn wrong_input_shapes_are_rejected_with_the_reason() {
    let model = Model::build(&resnet20_source(Layout::ChannelsLast)).unwrap();
    let dense = GatePolicy::dense();
    let err = model.forward(&Tensor::zeros([1, 3, 28, 28], (Kind::Float, Device::Cpu)), &dense).unwrap_err();
    assert!(err.to_string().contains("expected 1 channels, got 3"), "{err}");
    let err = model.forward(&Tensor::zeros([1, 28, 28], (Kind::Float, Device::Cpu)), &dense).unwrap_err();
    assert!(err.to_string().contains("4 dimensions"), "{err}");
}
