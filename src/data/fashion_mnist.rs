//! IDX (MNIST-style) datasets, and Fashion-MNIST from its gzip IDX files (as Debian's
//! `dataset-fashion-mnist` installs them), normalised with its published statistics.
//! Validation is a fixed held-out tail of the training set, so it never overlaps the test
//! set nor depends on a random seed.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use super::{
    DEFAULT_MEMORY_LIMIT, DataError, Dataset, Normalization, Pixels, Split, default_holdout, hold_out,
    labels_file_or_numbers,
};

/// Where Debian installs the dataset.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Mean and standard deviation of the training pixels scaled to [0, 1].
pub const MEAN: f64 = 0.2860;
pub const STD: f64 = 0.3530;
/// Images held out of the 60000 training images for validation (the last ones).
pub const VALIDATION_SIZE: usize = 5000;
/// Class names, index = label.
pub const LABELS: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Fashion-MNIST, as the shipped model was trained on it.
pub struct FashionMnist;

impl FashionMnist {
    /// Loads all four IDX files from `dir`: the first 55000 training images train, the last
    /// 5000 validate, the 10000 test images test; the published statistics normalise.
    pub fn load(dir: &Path) -> Result<Dataset, DataError> {
        let norm = Normalization { mean: vec![MEAN], std: vec![STD] };
        let full_train = read_split(dir, "train", &norm, DEFAULT_MEMORY_LIMIT).map_err(install_hint)?;
        let test = read_split(dir, "t10k", &norm, DEFAULT_MEMORY_LIMIT).map_err(install_hint)?;
        for (split, prefix) in [(&full_train, "train"), (&test, "t10k")] {
            if let Some(bad) = split.labels.iter().find(|&&l| l as usize >= LABELS.len()) {
                let path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
                return Err(DataError::format(&path, format!("label {bad} outside 0..=9")));
            }
        }
        let (train, validation) = hold_out(full_train, VALIDATION_SIZE);
        let labels = LABELS.iter().map(|s| s.to_string()).collect();
        Ok(Dataset { train, validation, test, labels, test_is_validation: false })
    }

    /// Loads only the test set (evaluation needs nothing else).
    pub fn load_test(dir: &Path) -> Result<Split, DataError> {
        let norm = Normalization { mean: vec![MEAN], std: vec![STD] };
        read_split(dir, "t10k", &norm, DEFAULT_MEMORY_LIMIT).map_err(install_hint)
    }
}

fn install_hint(e: DataError) -> DataError {
    match e {
        DataError::Io { path, source, .. } => DataError::Io {
            path,
            source,
            hint: " (install Debian's dataset-fashion-mnist: `make setup`, or pass --data fashion-mnist:DIR)",
        },
        other => other,
    }
}

/// Any MNIST-style IDX folder: `train-` and `t10k-` `images-idx3-ubyte` / `labels-idx1-ubyte`
/// files, gzip-compressed (`.gz`) or not. Class names from `labels.txt` if present. Each
/// file's pixels must fit `memory_limit` bytes.
pub fn load_idx(dir: &Path, memory_limit: u64) -> Result<Dataset, DataError> {
    let norm = Normalization { mean: vec![0.0], std: vec![1.0] };
    let full_train = read_split(dir, "train", &norm, memory_limit)?;
    let test = read_split(dir, "t10k", &norm, memory_limit)?;
    let classes = full_train.labels.iter().chain(&test.labels).max().map_or(0, |&m| m as usize + 1);
    let holdout = default_holdout(full_train.len());
    let (train, validation) = hold_out(full_train, holdout);
    let labels = labels_file_or_numbers(dir, classes)?;
    Ok(Dataset { train, validation, test, labels, test_is_validation: false })
}

fn read_split(dir: &Path, prefix: &str, norm: &Normalization, limit: u64) -> Result<Split, DataError> {
    let file = |name: &str| {
        let gz = dir.join(format!("{prefix}-{name}.gz"));
        if gz.is_file() {
            gz
        } else if dir.join(format!("{prefix}-{name}")).is_file() {
            dir.join(format!("{prefix}-{name}"))
        } else {
            gz
        }
    };
    let (images_path, labels_path) = (file("images-idx3-ubyte"), file("labels-idx1-ubyte"));
    let (dims, pixels) = read_idx(&images_path, 0x0803, limit)?;
    let (label_dims, labels) = read_idx(&labels_path, 0x0801, limit)?;
    let [n, rows, cols] = dims[..] else {
        return Err(DataError::format(&images_path, format!("expected 3 dimensions, found {}", dims.len())));
    };
    if rows == 0 || cols == 0 {
        return Err(DataError::format(&images_path, format!("images of {rows}×{cols} pixels")));
    }
    if label_dims != [n] {
        return Err(DataError::format(&labels_path, format!("{label_dims:?} labels for {n} images")));
    }
    let labels = labels.into_iter().map(u16::from).collect();
    Ok(Split { pixels: Pixels::Memory(pixels), labels, channels: 1, rows, cols, norm: norm.clone() })
}

/// Reads an IDX file (gzip-compressed when its name ends in `.gz`) with the given magic
/// number; returns its dimensions and bytes. The header's size is checked against `limit`
/// bytes before the data is read.
fn read_idx(path: &Path, magic: u32, limit: u64) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let io = |source| DataError::io(path, source);
    let file = File::open(path).map_err(io)?;
    let mut reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut word = || -> Result<u32, DataError> {
        let mut b = [0u8; 4];
        reader.read_exact(&mut b).map_err(|_| DataError::format(path, "truncated header"))?;
        Ok(u32::from_be_bytes(b))
    };
    let found = word()?;
    if found != magic {
        return Err(DataError::format(path, format!("magic number {found:#x}, expected {magic:#x}")));
    }
    let ndim = (magic & 0xff) as usize;
    let dims = (0..ndim).map(|_| word().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
    let item: u64 = dims[1..].iter().map(|&d| d as u64).product();
    super::check_memory(path, dims[0] as u64, item, limit)?;
    let expected = dims.iter().map(|&d| d as u64).product::<u64>() as usize;
    let mut bytes = Vec::with_capacity(expected);
    reader.take(expected as u64 + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() != expected {
        let found = if bytes.len() > expected { "more".to_string() } else { bytes.len().to_string() };
        return Err(DataError::format(path, format!("{found} data bytes, header says {expected}")));
    }
    Ok((dims, bytes))
}
