//! The shipped model (deploy/models/fashion-resnet20) on the first 1000 Fashion-MNIST test
//! images: accuracy above floors set from its model card, dense and at calibrated budgets,
//! with the measured FLOPs inside each budget.

use std::path::PathBuf;

use sluice::cli::eval::accuracy_and_flops;
use sluice::control::calibration::CalibrationTable;
use sluice::data::FashionMnist;
use sluice::data::fashion_mnist::DEFAULT_DIR;
use sluice::engine::{GatePolicy, Model};
use sluice::repository::ModelDir;

/// Accuracy floors on the first 1000 test images (MODEL_CARD.md: the full-test-set numbers,
/// and these images' own numbers minus half a point of slack).
const DENSE_FLOOR: f64 = 0.943; // measured 0.948
const BUDGET_FLOORS: [(f64, f64); 2] = [(0.5, 0.945), (0.3, 0.938)]; // measured 0.950, 0.943

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/models/fashion-resnet20")
}

#[test]
fn the_shipped_model_keeps_its_accuracy_at_every_budget() {
    tch::set_num_threads(2);
    let _guard = tch::no_grad_guard();
    let dir = ModelDir::open(&model_dir()).unwrap();
    let model = Model::build(&dir.source(Default::default())).unwrap();
    let data_dir =
        std::env::var_os("SLUICE_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_DIR.into());
    let test = FashionMnist::load_test(&data_dir).unwrap().take(1000);

    let (dense_accuracy, dense_fraction) = accuracy_and_flops(&model, &test, &GatePolicy::dense()).unwrap();
    println!("dense: accuracy {dense_accuracy:.4}, FLOP fraction {dense_fraction:.4}");
    assert!(dense_accuracy >= DENSE_FLOOR, "dense accuracy {dense_accuracy} below {DENSE_FLOOR}");
    let table = CalibrationTable::load(&dir.calibration_path().unwrap()).unwrap();
    for (budget, floor) in BUDGET_FLOORS {
        let (accuracy, fraction) =
            accuracy_and_flops(&model, &test, &table.policy_for(budget).unwrap()).unwrap();
        println!("budget {budget}: accuracy {accuracy:.4}, FLOP fraction {fraction:.4}");
        assert!(accuracy >= floor, "budget {budget}: accuracy {accuracy} below {floor}");
        assert!(fraction <= budget + 0.02, "budget {budget}: {fraction} of dense FLOPs");
    }
}
