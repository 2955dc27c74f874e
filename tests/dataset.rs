//! Fashion-MNIST from Debian's package (installed by `make setup`).

use std::path::PathBuf;

use sluice::data::fashion_mnist::{DEFAULT_DIR, VALIDATION_SIZE};
use sluice::data::{FashionMnist, Pixels};
use tch::Kind;

fn data_dir() -> PathBuf {
    std::env::var_os("SLUICE_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

#[test]
fn fashion_mnist_loads_with_known_counts_and_checksums() {
    let data = FashionMnist::load(&data_dir()).unwrap();
    assert_eq!(data.train.len() + data.validation.len(), 60000);
    assert_eq!(data.validation.len(), VALIDATION_SIZE);
    assert_eq!(data.test.len(), 10000);
    for split in [&data.train, &data.validation, &data.test] {
        assert_eq!((split.rows, split.cols), (28, 28));
        assert!(split.labels.iter().all(|&l| l <= 9));
    }
    // Pixel sums of the published files (computed independently with numpy).
    let sum = |px: &Pixels| match px {
        Pixels::Memory(px) => px.iter().map(|&p| p as u64).sum::<u64>(),
        Pixels::Files(_) => panic!("Fashion-MNIST is decoded in memory"),
    };
    assert_eq!(sum(&data.train.pixels) + sum(&data.validation.pixels), 3_431_114_169);
    assert_eq!(sum(&data.test.pixels), 573_469_082);
    let mut per_class = [0usize; 10];
    data.test.labels.iter().for_each(|&l| per_class[l as usize] += 1);
    assert_eq!(per_class, [1000; 10]);
}

#[test]
fn images_become_normalized_tensors() {
    let test = FashionMnist::load_test(&data_dir()).unwrap();
    let images = test.images(0..100).unwrap();
    assert_eq!(images.size(), [100, 1, 28, 28]);
    assert_eq!(images.kind(), Kind::Float);
    let mean = images.mean(Kind::Float).double_value(&[]);
    assert!(mean.abs() < 0.2, "normalised mean {mean}");
    assert_eq!(test.label_tensor(0..100).size(), [100]);
}

#[test]
fn a_missing_folder_says_how_to_install_the_dataset() {
    let err = FashionMnist::load_test(std::path::Path::new("/nonexistent")).unwrap_err().to_string();
    assert!(err.contains("dataset-fashion-mnist"), "{err}");
}
