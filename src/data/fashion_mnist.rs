//! Fashion-MNIST from its gzip IDX files (as Debian's `dataset-fashion-mnist` installs them).
//! Images become `[N, 1, 28, 28]` f32 tensors normalised with the training set's mean and
//! standard deviation; labels `[N]` i64. Validation is a fixed held-out tail of the
//! training set, so it never overlaps the test set nor depends on a random seed.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tch::{Kind, Tensor};

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

/// Errors reading the dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source} (install Debian's dataset-fashion-mnist: `make setup`, or set --data-dir)")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
}

/// Raw images and labels of one part of the dataset.
#[derive(Debug, Clone)]
pub struct Split {
    /// Row-major pixels, `len = n × rows × cols`.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images `range` as a normalised `[n, 1, rows, cols]` f32 tensor.
    pub fn images(&self, range: std::ops::Range<usize>) -> Tensor {
        let px = self.rows * self.cols;
        let bytes = &self.pixels[range.start * px..range.end * px];
        let shape = [range.len() as i64, 1, self.rows as i64, self.cols as i64];
        normalize(&Tensor::from_slice(bytes).view(shape))
    }

    /// The labels `range` as an i64 tensor.
    pub fn label_tensor(&self, range: std::ops::Range<usize>) -> Tensor {
        Tensor::from_slice(&self.labels[range]).to_kind(Kind::Int64)
    }

    /// The first `n` examples (or all, if fewer).
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.len());
        let px = self.rows * self.cols;
        Split { pixels: self.pixels[..n * px].to_vec(), labels: self.labels[..n].to_vec(), ..*self }
    }

    fn split_at(mut self, at: usize) -> (Split, Split) {
        let px = self.rows * self.cols;
        let tail = Split {
            pixels: self.pixels.split_off(at * px),
            labels: self.labels.split_off(at),
            rows: self.rows,
            cols: self.cols,
        };
        (self, tail)
    }
}

/// u8 pixels `[.., rows, cols]` → f32 normalised with the training statistics.
pub fn normalize(pixels: &Tensor) -> Tensor {
    (pixels.to_kind(Kind::Float) / 255.0 - MEAN) / STD
}

/// The three parts of Fashion-MNIST.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// The first 55000 training images.
    pub train: Split,
    /// The last 5000 training images, held out.
    pub validation: Split,
    /// The 10000 test images.
    pub test: Split,
}

impl FashionMnist {
    /// Loads all four IDX files from `dir`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let full_train = read_split(dir, "train")?;
        let test = read_split(dir, "t10k")?;
        let at = full_train.len().saturating_sub(VALIDATION_SIZE);
        let (train, validation) = full_train.split_at(at);
        Ok(FashionMnist { train, validation, test })
    }

    /// Loads only the test set (evaluation needs nothing else).
    pub fn load_test(dir: &Path) -> Result<Split, DataError> {
        read_split(dir, "t10k")
    }
}

fn read_split(dir: &Path, prefix: &str) -> Result<Split, DataError> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (dims, pixels) = read_idx(&images_path, 0x0803)?;
    let (label_dims, labels) = read_idx(&labels_path, 0x0801)?;
    let format = |path: &Path, why: String| DataError::Format { path: path.to_path_buf(), why };
    let [n, rows, cols] = dims[..] else {
        return Err(format(&images_path, format!("expected 3 dimensions, found {}", dims.len())));
    };
    if label_dims != [n] {
        return Err(format(&labels_path, format!("{label_dims:?} labels for {n} images")));
    }
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        return Err(format(&labels_path, format!("label {bad} outside 0..=9")));
    }
    Ok(Split { pixels, labels, rows, cols })
}

/// Reads a gzip IDX file with the given magic number; returns its dimensions and bytes.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let io = |source| DataError::Io { path: path.to_path_buf(), source };
    let mut bytes = Vec::new();
    GzDecoder::new(File::open(path).map_err(io)?).read_to_end(&mut bytes).map_err(io)?;
    let format = |why: String| DataError::Format { path: path.to_path_buf(), why };
    let word = |i: usize| -> Result<u32, DataError> {
        bytes
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format("truncated header".into()))
    };
    let found = word(0)?;
    if found != magic {
        return Err(format(format!("magic number {found:#x}, expected {magic:#x}")));
    }
    let ndim = (magic & 0xff) as usize;
    let dims = (1..=ndim).map(|i| word(i).map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
    let header = 4 * (ndim + 1);
    let expected: usize = dims.iter().product();
    if bytes.len() - header != expected {
        return Err(format(format!("{} data bytes, header says {expected}", bytes.len() - header)));
    }
    bytes.drain(..header);
    Ok((dims, bytes))
}
