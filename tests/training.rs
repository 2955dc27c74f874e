//! Training: a real short run on Fashion-MNIST (the loss falls), bit-exact checkpoints, and
//! an export that the engine serves with the trained network's outputs and gate scores.

use std::path::PathBuf;

use rand::SeedableRng;
use rand::rngs::StdRng;
use sluice::data::fashion_mnist::DEFAULT_DIR;
use sluice::data::{Dataset, FashionMnist};
use sluice::engine::model::seeded;
use sluice::engine::{GatePolicy, Model};
use sluice::repository::ModelDir;
use sluice::train::export::export_model;
use sluice::train::net::PassMode;
use sluice::train::{RunDir, TrainConfig, Trainer};
use tch::{Kind, Tensor};

fn data() -> Dataset {
    let dir =
        std::env::var_os("SLUICE_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    FashionMnist::load(&dir).expect("Fashion-MNIST installed by make setup")
}

fn small_config() -> TrainConfig {
    TrainConfig { epochs: 1, batch_size: 64, limit: 1024, ..TrainConfig::fashion_default() }
}

fn batch(split: &sluice::data::Split, start: usize, n: usize) -> (Tensor, Tensor) {
    (split.images(start..start + n).unwrap(), split.label_tensor(start..start + n))
}

#[test]
fn one_short_epoch_lowers_the_loss() {
    tch::set_num_threads(2);
    let data = data();
    let mut trainer = Trainer::new(small_config()).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let losses: Vec<f64> = (0..16)
        .map(|i| {
            let (x, y) = batch(&data.train, i * 64, 64);
            trainer.step(&x, &y, &mut rng, 0.05).0
        })
        .collect();
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[12..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.8 * first, "loss did not fall: {losses:?}");
}

#[test]
fn checkpoints_reload_bit_exactly_and_resume_identically() {
    let data = data();
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir { dir: dir.path().to_path_buf() };
    let mut trainer = Trainer::new(small_config()).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    for i in 0..3 {
        let (x, y) = batch(&data.train, i * 64, 64);
        trainer.step(&x, &y, &mut rng, 0.05);
    }
    trainer.state.epoch = 1;
    trainer.save_checkpoint(&run).unwrap();
    let mut resumed = Trainer::resume(&run).unwrap();
    assert_eq!(resumed.state.epoch, 1);
    let (a, b) = (trainer.vs.variables(), resumed.vs.variables());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after reload");
    }
    // The same next step (same batch, same random draws) gives bit-identical weights:
    // optimizer state came back too.
    let (x, y) = batch(&data.train, 192, 64);
    let (l1, _) = trainer.step(&x, &y, &mut StdRng::seed_from_u64(9), 0.05);
    let (l2, _) = resumed.step(&x, &y, &mut StdRng::seed_from_u64(9), 0.05);
    assert_eq!(l1, l2);
    let (a, b) = (trainer.vs.variables(), resumed.vs.variables());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after one more step");
    }
}

#[test]
fn exported_models_serve_the_trained_network() {
    let _guard = tch::no_grad_guard();
    let data = data();
    let mut trainer = Trainer::new(small_config()).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for i in 0..4 {
        let (x, y) = batch(&data.train, i * 64, 64);
        tch::with_grad(|| trainer.step(&x, &y, &mut rng, 0.05));
    }
    let dir = tempfile::tempdir().unwrap();
    let small = Dataset { train: data.train.take(1024), ..data.clone() };
    export_model(&trainer, &small, dir.path(), "tiny", false).unwrap();
    let model = Model::build(&ModelDir::open(dir.path()).unwrap().source(Default::default())).unwrap();
    let x = data.test.images(0..32).unwrap();

    // Every gate open: the served logits are the trained network's eval-mode outputs.
    let trained = trainer.net.forward(&x, &PassMode::Widths(trainer.net.widest()), false).logits;
    let (served, _) = model.forward(&x, &GatePolicy::dense()).unwrap();
    let diff = (&served - &trained).abs().max().double_value(&[]);
    assert!(diff < 1e-4, "served vs trained logits differ by {diff}");

    // The served channel saliencies are the prefix gates' own.
    let scores = model.net.gate_scores(&x).unwrap();
    let stem = trainer.net.backbone.stem_t(&x, false);
    let trunk = trainer.net.gates.trunk.as_ref().unwrap();
    let hidden = trunk.forward(&stem.mean_dim(&[2i64, 3][..], false, Kind::Float)).relu();
    for (slots, gate) in model.net.gates.blocks.iter().zip(&trainer.net.channel) {
        let (Some(range), Some(gate)) = (&slots.channel, gate) else { continue };
        let served = scores.narrow(1, range.start as i64, range.len() as i64);
        let diff = (&served - gate.saliency(&hidden)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "channel saliency differs by {diff}");
    }
}

/// A retrofit starts from the dense network: before any step, the trainable network at full
/// width computes exactly the teacher's logits, from the weights of the checkpoint (which
/// may lack BatchNorm counters); a checkpoint of another shape is refused by name.
#[test]
fn a_retrofit_starts_from_the_dense_weights_it_learns_from() {
    let _guard = tch::no_grad_guard();
    let dir = tempfile::tempdir().unwrap();
    let dense = dir.path().join("dense.safetensors");
    {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let spec = sluice::engine::ArchSpec::named("resnet20", 1, 10).unwrap();
        let params = sluice::engine::params::ResNetParams::new(&vs.root(), &spec);
        // Non-trivial batch-norm statistics, as a trained network has.
        let _ = params.stem.bn.running_mean.shallow_clone().fill_(0.3);
        let _ = params.blocks[4].layers[1].bn.running_var.shallow_clone().fill_(2.5);
        let tensors: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(n, _)| !n.ends_with("num_batches_tracked")).collect();
        Tensor::write_safetensors(&tensors, &dense).unwrap();
    }
    let config = TrainConfig { init: Some(dense.clone()), ..small_config() };
    let trainer = Trainer::new(config).unwrap();
    let x = data().test.images(0..16).unwrap();
    let student = trainer.net.forward(&x, &PassMode::Widths(trainer.net.widest()), false).logits;
    let teacher = sluice::train::Teacher::load(&trainer.net.spec, &dense).unwrap().logits(&x);
    let diff = (&student - &teacher).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "student and teacher differ by {diff} before training");
    assert!(teacher.abs().max().double_value(&[]) > 0.0);

    let wrong = TrainConfig { arch: "resnet32".into(), init: Some(dense), ..small_config() };
    let err = Trainer::new(wrong).err().unwrap().to_string();
    assert!(
        err.contains("does not hold this network's dense weights") && err.contains("missing `layer1.3."),
        "{err}"
    );
}

/// Bottleneck ResNets train too: a ResNet-50 at 32×32 takes sandwich-rule steps (full,
/// narrow, random-width and gated passes through three-convolution blocks), and its export
/// serves the trained network's dense logits and the prefix gates' saliencies for both inner
/// widths of every block; a gated policy runs at fewer FLOPs.
#[test]
fn bottleneck_networks_train_and_export() {
    use sluice::data::{Normalization, Pixels, Split};
    use sluice::engine::{BlockGates, GateConfig};
    let gates =
        GateConfig { channel: true, block: BlockGates::Identity, exits: vec![], ..GateConfig::default() };
    let config =
        TrainConfig { arch: "resnet50".into(), dims: [3, 32, 32], classes: 4, gates, ..small_config() };
    let mut trainer = Trainer::new(config).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let x = seeded(7, || Tensor::randn([8, 3, 32, 32], (Kind::Float, tch::Device::Cpu)));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3]);
    for _ in 0..2 {
        let (loss, _) = trainer.step(&x, &y, &mut rng, 0.01);
        assert!(loss.is_finite(), "{loss}");
    }
    let split = Split {
        pixels: Pixels::Memory((0..16 * 3 * 32 * 32).map(|i| (i * 37 % 251) as u8).collect()),
        labels: (0..16).map(|i| i % 4).collect(),
        channels: 3,
        rows: 32,
        cols: 32,
        norm: Normalization { mean: vec![0.5; 3], std: vec![0.25; 3] },
    };
    let labels = (0..4).map(|i| format!("c{i}")).collect();
    let data = sluice::data::Dataset {
        train: split.clone(),
        validation: split.clone(),
        test: split,
        labels,
        test_is_validation: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let _guard = tch::no_grad_guard();
    // Two steps leave momentum-averaged running statistics far from the moving weights'
    // (eval-mode logits reached 1e30 and overflowed to NaN in CI); precise BN measures them
    // afresh (logits then 1e1–1e6 across seeds, served within 1e-5 of them, relatively).
    export_model(&trainer, &data, dir.path(), "r50", true).unwrap();
    let model = Model::build(&ModelDir::open(dir.path()).unwrap().source(Default::default())).unwrap();
    let x = data.test.images(0..4).unwrap();
    let trained = trainer.net.forward(&x, &PassMode::Widths(trainer.net.widest()), false).logits;
    let (served, reports) = model.forward(&x, &GatePolicy::dense()).unwrap();
    let largest = trained.abs().max().double_value(&[]);
    assert!(largest.is_finite(), "trained logits reach {largest}");
    let scale = largest.max(1.0);
    let diff = (&served - &trained).abs().max().double_value(&[]);
    assert!(diff < 1e-4 * scale, "served vs trained logits differ by {diff} (scale {scale})");
    assert!(reports.iter().all(|r| r.executed_flops == r.dense_flops));

    let scores = model.net.gate_scores(&x).unwrap();
    let stem = trainer.net.backbone.stem_t(&x, false);
    let hidden = trainer
        .net
        .gates
        .trunk
        .as_ref()
        .unwrap()
        .forward(&stem.mean_dim(&[2i64, 3][..], false, Kind::Float))
        .relu();
    for (slots, gate) in model.net.gates.blocks.iter().zip(&trainer.net.channel) {
        let (Some(range), Some(gate)) = (&slots.channel, gate) else { continue };
        let saliency = gate.saliency(&hidden);
        let c = saliency.size()[1];
        assert_eq!(range.len() as i64, 2 * c, "one saliency per channel of each inner width");
        // σ(a − b_c): the served saliencies come through the engine's fused, packed stem and
        // the trainer's through libtorch's plain one, so float rounding differs: 0 to 1.4e-5
        // across 16 seed pairs here, 3.7e-5 once in a fresh-clone CI run, and once over 1e-4
        // in a full local run (value not captured, not reproduced). Allowed: 5e-4, under what
        // a prefix shifted by one channel moves a steep saliency: σ' × (b_c+1 − b_c), about
        // 0.25 × 3/C at the offsets' initial spacing (1.5e-3 on a 512-channel block, 1.2e-2
        // on a 64-channel one); a misread layout differs by far more.
        let allowed = 5e-4;
        for group in 0..2 {
            let served = scores.narrow(1, range.start as i64 + group * c, c);
            let diff = (&served - &saliency).abs().max().double_value(&[]);
            assert!(diff < allowed, "group {group}: channel saliency differs by {diff} (allowed {allowed})");
        }
    }
    let (logits, reports) = model.forward(&x, &GatePolicy::with_thresholds(0.5, 0.5, 1.0)).unwrap();
    assert!(logits.isfinite().all().int64_value(&[]) == 1);
    assert!(reports.iter().all(|r| r.executed_flops <= r.dense_flops + r.gate_flops));
}

#[test]
fn learning_rates_must_be_positive() {
    for (config, field) in [
        (TrainConfig { lr: 0.0, ..small_config() }, "lr"),
        (TrainConfig { gate_lr: Some(-0.1), ..small_config() }, "gate_lr"),
        (TrainConfig { gate_lr: Some(f64::NAN), ..small_config() }, "gate_lr"),
    ] {
        let err = Trainer::new(config).err().expect("refused").to_string();
        assert!(err.starts_with(&format!("{field} must be a positive number")), "{err}");
    }
}

#[test]
fn a_distillation_temperature_below_1_or_not_finite_is_refused() {
    for t in [0.5, 0.0, f64::NAN, f64::INFINITY, 21.0] {
        let err =
            Trainer::new(TrainConfig { distill_temperature: t, ..small_config() }).err().expect("refused");
        assert!(err.to_string().starts_with("distill_temperature must be from 1 to 20"), "{t}: {err}");
    }
}

#[test]
fn the_retrofit_recipe_takes_both_learning_rates_or_its_defaults() {
    let init = PathBuf::from("dense.safetensors");
    let given = small_config().retrofit(init.clone(), Some(0.02), Some(0.3));
    assert_eq!((given.lr, given.gate_lr, given.init.as_ref()), (0.02, Some(0.3), Some(&init)));
    let defaults = small_config().retrofit(init, None, None);
    assert_eq!((defaults.lr, defaults.gate_lr), (0.01, Some(0.1)));
    assert!(defaults.exit_distill && defaults.warmup_epochs == 0.2 && defaults.order_channels);
}

/// Ordering a block's inner channels by importance moves every tensor that touches a
/// channel together: the full-width network computes the same logits, for Basic and
/// Bottleneck blocks, and afterwards the leading channels are the important ones.
#[test]
fn ordering_inner_channels_keeps_the_function_and_sorts_by_importance() {
    use sluice::engine::arch::ArchSpec;
    use sluice::engine::gates::GateLayout;
    use sluice::engine::{BlockGates, GateConfig};
    for arch in ["resnet20", "resnet50"] {
        // Weights, statistics and input drawn in one turn of libtorch's generator: the same on
        // every run, whatever other tests draw meanwhile.
        let turn = sluice::engine::model::GeneratorTurn::seeded(3);
        let spec = ArchSpec::named(arch, 3, 10).unwrap();
        let gates =
            GateConfig { channel: true, block: BlockGates::Identity, exits: vec![], ..GateConfig::default() };
        let layout = GateLayout::new(&spec, &gates).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let net = sluice::train::net::TrainableNet::new(&vs.root(), &spec, &layout, 32).unwrap();
        // Trained-looking batch-norm: scales, shifts and running statistics all differ by channel.
        tch::no_grad(|| {
            for block in &net.backbone.blocks {
                for layer in &block.layers {
                    let bn = &layer.bn;
                    let c = bn.weight.size()[0];
                    bn.weight.shallow_clone().copy_(&Tensor::randn([c], (Kind::Float, tch::Device::Cpu)));
                    bn.bias
                        .shallow_clone()
                        .copy_(&(Tensor::randn([c], (Kind::Float, tch::Device::Cpu)) * 0.1));
                    bn.running_mean
                        .shallow_clone()
                        .copy_(&(Tensor::randn([c], (Kind::Float, tch::Device::Cpu)) * 0.1));
                    bn.running_var
                        .shallow_clone()
                        .copy_(&(Tensor::rand([c], (Kind::Float, tch::Device::Cpu)) + 0.5));
                }
            }
        });
        let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        drop(turn);
        let full = PassMode::Widths(net.widest());
        let before = tch::no_grad(|| net.forward(&x, &full, false).logits);
        net.order_inner_channels();
        let after = tch::no_grad(|| net.forward(&x, &full, false).logits);
        let scale = before.abs().max().double_value(&[]).max(1.0);
        let diff = (&after - &before).abs().max().double_value(&[]);
        assert!(diff <= 1e-4 * scale, "{arch}: logits moved by {diff} (|logit| up to {scale})");
        for block in &net.backbone.blocks {
            for pair in block.layers.windows(2) {
                let importance =
                    Vec::<f32>::try_from(sluice::train::net::inner_channel_importance(&pair[0], &pair[1]))
                        .unwrap();
                assert!(importance.windows(2).all(|w| w[0] >= w[1]), "{arch}: not in order: {importance:?}");
            }
        }
    }
}
