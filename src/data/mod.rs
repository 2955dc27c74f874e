//! Datasets for training, calibration and evaluation, chosen with one flag
//! (`--data KIND:DIR`, [`DataSpec`]): Fashion-MNIST from Debian's package (the shipped
//! model's), any IDX (MNIST-style) folder, the CIFAR-10/100 binary format, and image
//! folders (torchvision's `ImageFolder` convention). Every dataset becomes three [`Split`]s
//! of u8 pixels, normalised per channel. A split's pixels are decoded in memory when the
//! whole dataset fits the memory limit ([`DEFAULT_MEMORY_LIMIT`], `--data-memory-mib`;
//! checked from file headers and counts before anything is decoded); a larger image folder
//! streams instead, its files decoded on every core each time a batch is read. The
//! fixed-size formats (IDX, CIFAR) over the limit are refused.

pub mod cifar;
pub mod fashion_mnist;
pub mod folder;
pub mod pixels;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::{Kind, Tensor};

pub use fashion_mnist::FashionMnist;

/// The default of the most pixel bytes a dataset is decoded into memory for (all three
/// splits); a larger image folder streams from disk, a larger IDX or CIFAR set is refused.
pub const DEFAULT_MEMORY_LIMIT: u64 = 8 << 30;

/// How many images of a training split its normalisation is measured on: the first ones
/// (every format's order mixes the classes, image folders' by construction), the same rule
/// in memory and streamed, so `--data-memory-mib` never changes a model's statistics.
pub const STATS_IMAGES: usize = 10_000;

/// Images read at a time while measuring (bounds a streamed split's decode buffer).
const STATS_CHUNK: usize = 256;

/// Errors reading a dataset; each names the file or folder.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}{hint}")]
    Io { path: PathBuf, source: std::io::Error, hint: &'static str },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io { path: path.to_path_buf(), source, hint: "" }
    }

    pub(crate) fn format(path: &Path, why: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), why: why.into() }
    }
}

/// Per-channel normalisation of pixels scaled to [0, 1]: `(x - mean) / std`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Normalization {
    /// Measured on the first [`STATS_IMAGES`] of `split`'s images, read [`STATS_CHUNK`] at
    /// a time, rounded to 4 decimals (what a config file records).
    pub fn measure(split: &Split) -> Result<Self, DataError> {
        let n = split.len().min(STATS_IMAGES);
        let plane = split.rows * split.cols;
        let (mut sum, mut sq) = (vec![0f64; split.channels], vec![0f64; split.channels]);
        for start in (0..n).step_by(STATS_CHUNK) {
            let indices: Vec<usize> = (start..(start + STATS_CHUNK).min(n)).collect();
            let pixels = split.gather(&indices)?;
            for image in pixels.chunks(split.image_bytes().max(1)) {
                for (c, channel) in image.chunks(plane.max(1)).enumerate() {
                    let (s, q) =
                        channel.iter().fold((0u64, 0u64), |(s, q), &p| (s + p as u64, q + (p as u64).pow(2)));
                    sum[c] += s as f64;
                    sq[c] += q as f64;
                }
            }
        }
        let n = (n * plane).max(1) as f64;
        let round = |v: f64| (v * 1e4).round() / 1e4;
        let mean: Vec<f64> = sum.iter().map(|s| s / n / 255.0).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| round((q / n / 65025.0 - m * m).max(0.0).sqrt()).max(1e-4))
            .collect();
        Ok(Normalization { mean: mean.into_iter().map(round).collect(), std })
    }
}

/// Where a split's pixels are.
#[derive(Debug, Clone)]
pub enum Pixels {
    /// Decoded: planar, `len = n × channels × rows × cols`.
    Memory(Vec<u8>),
    /// One image file per example, decoded and resized whenever it is read.
    Files(Arc<[PathBuf]>),
}

/// Images and labels of one part of a dataset, as u8 pixels `[N, C, H, W]`.
#[derive(Debug, Clone)]
pub struct Split {
    pub pixels: Pixels,
    pub labels: Vec<u16>,
    pub channels: usize,
    pub rows: usize,
    pub cols: usize,
    /// How [`Split::images`] normalises.
    pub norm: Normalization,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image.
    pub fn image_bytes(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// Whether the pixels are decoded from files on every read.
    pub fn is_streamed(&self) -> bool {
        matches!(self.pixels, Pixels::Files(_))
    }

    /// The planar pixels of the images at `indices`, one after another (a streamed split
    /// decodes them on every core; a file that fails is named in the error).
    pub fn gather(&self, indices: &[usize]) -> Result<Vec<u8>, DataError> {
        let n = self.image_bytes();
        match &self.pixels {
            Pixels::Memory(p) => Ok(indices.iter().flat_map(|&i| &p[i * n..(i + 1) * n]).copied().collect()),
            Pixels::Files(files) => {
                let paths: Vec<&Path> = indices.iter().map(|&i| files[i].as_path()).collect();
                folder::decode_files(&paths, [self.channels, self.rows, self.cols])
            }
        }
    }

    /// The images `range` as a normalised `[n, C, H, W]` f32 tensor.
    pub fn images(&self, range: std::ops::Range<usize>) -> Result<Tensor, DataError> {
        let shape = [range.len() as i64, self.channels as i64, self.rows as i64, self.cols as i64];
        let n = self.image_bytes();
        let pixels = match &self.pixels {
            Pixels::Memory(p) => Tensor::from_slice(&p[range.start * n..range.end * n]),
            Pixels::Files(_) => Tensor::from_slice(&self.gather(&range.collect::<Vec<_>>())?),
        };
        Ok(self.normalize(&pixels.view(shape)))
    }

    /// u8 pixels `[N, C, H, W]` → f32 normalised with this split's statistics.
    pub fn normalize(&self, pixels: &Tensor) -> Tensor {
        let c = self.channels as i64;
        if c == 1 {
            // Scalars: bit-identical to how the shipped model was trained.
            return (pixels.to_kind(Kind::Float) / 255.0 - self.norm.mean[0]) / self.norm.std[0];
        }
        let stat = |v: &[f64]| {
            Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).view([1, c, 1, 1])
        };
        (pixels.to_kind(Kind::Float) / 255.0 - stat(&self.norm.mean)) / stat(&self.norm.std)
    }

    /// The labels `range` as an i64 tensor.
    pub fn label_tensor(&self, range: std::ops::Range<usize>) -> Tensor {
        let labels: Vec<i64> = self.labels[range].iter().map(|&l| i64::from(l)).collect();
        Tensor::from_slice(&labels)
    }

    /// The first `n` examples (or all, if fewer).
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.len());
        Split {
            pixels: match &self.pixels {
                Pixels::Memory(p) => Pixels::Memory(p[..n * self.image_bytes()].to_vec()),
                Pixels::Files(f) => Pixels::Files(f[..n].into()),
            },
            labels: self.labels[..n].to_vec(),
            norm: self.norm.clone(),
            ..*self
        }
    }

    /// The first `at` examples and the rest.
    pub fn split_at(mut self, at: usize) -> (Split, Split) {
        let bytes = at * self.image_bytes();
        let tail_pixels = match &mut self.pixels {
            Pixels::Memory(p) => Pixels::Memory(p.split_off(bytes)),
            Pixels::Files(f) => {
                let (head, tail) = f.split_at(at);
                let tail = Pixels::Files(tail.into());
                *f = head.into();
                tail
            }
        };
        let tail =
            Split { pixels: tail_pixels, labels: self.labels.split_off(at), norm: self.norm.clone(), ..self };
        (self, tail)
    }
}

/// A dataset's three parts and its class names.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Training images.
    pub train: Split,
    /// Held out of training for calibration and model selection; never the test set.
    pub validation: Split,
    /// For `sluice eval`. Image folders without a `test/` folder use their validation
    /// split here ([`Dataset::test_is_validation`]).
    pub test: Split,
    pub labels: Vec<String>,
    pub test_is_validation: bool,
}

impl Dataset {
    /// Sets every split's normalisation.
    pub fn set_normalization(&mut self, norm: &Normalization) {
        for split in [&mut self.train, &mut self.validation, &mut self.test] {
            split.norm = norm.clone();
        }
    }

    /// Checks the images are what a model with input `dims` `[C, H, W]` and `classes`
    /// outputs takes.
    pub fn check_fits(&self, dims: [i64; 3], classes: usize) -> Result<(), String> {
        let t = &self.test;
        let have = [t.channels as i64, t.rows as i64, t.cols as i64];
        if have != dims {
            return Err(format!("the dataset's images are {have:?} (C, H, W); the model takes {dims:?}"));
        }
        if self.labels.len() != classes {
            return Err(format!(
                "the dataset has {} classes; the model has {classes} outputs",
                self.labels.len()
            ));
        }
        Ok(())
    }
}

/// Which dataset, as `--data` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSpec {
    /// Fashion-MNIST's gzip IDX files with its class names and published statistics.
    FashionMnist(PathBuf),
    /// Any MNIST-style IDX folder (`train-images-idx3-ubyte[.gz]`, …, `t10k-…`).
    Idx(PathBuf),
    /// CIFAR-10's binary version (`data_batch_1..5.bin`, `test_batch.bin`).
    Cifar10(PathBuf),
    /// CIFAR-100's binary version (`train.bin`, `test.bin`; fine labels).
    Cifar100(PathBuf),
    /// One sub-folder of PNG/JPEG files per class (docs/datasets.md has the split rules).
    ImageFolder(PathBuf),
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec::FashionMnist(fashion_mnist::DEFAULT_DIR.into())
    }
}

impl std::str::FromStr for DataSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, dir) = text.split_once(':').unwrap_or((text, ""));
        let dir = PathBuf::from(dir);
        let need_dir = |spec: DataSpec| {
            if dir.as_os_str().is_empty() {
                Err(format!("`{kind}` needs a folder: {kind}:DIR"))
            } else {
                Ok(spec)
            }
        };
        match kind {
            "fashion-mnist" if dir.as_os_str().is_empty() => Ok(DataSpec::default()),
            "fashion-mnist" => Ok(DataSpec::FashionMnist(dir)),
            "idx" => need_dir(DataSpec::Idx(dir.clone())),
            "cifar10" => need_dir(DataSpec::Cifar10(dir.clone())),
            "cifar100" => need_dir(DataSpec::Cifar100(dir.clone())),
            "imagefolder" => need_dir(DataSpec::ImageFolder(dir.clone())),
            _ => Err(format!(
                "`{text}`: expected fashion-mnist[:DIR], idx:DIR, cifar10:DIR, cifar100:DIR or imagefolder:DIR"
            )),
        }
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataSpec::FashionMnist(_) => write!(f, "Fashion-MNIST"),
            DataSpec::Idx(d) => write!(f, "IDX dataset {}", d.display()),
            DataSpec::Cifar10(d) => write!(f, "CIFAR-10 ({})", d.display()),
            DataSpec::Cifar100(d) => write!(f, "CIFAR-100 ({})", d.display()),
            DataSpec::ImageFolder(d) => write!(f, "image folder {}", d.display()),
        }
    }
}

impl DataSpec {
    /// The `--data` text that parses back to this spec (saved with a training run, so
    /// `--resume` reads the same dataset); kept beside [`std::str::FromStr`] above.
    pub fn to_arg(&self) -> String {
        let (kind, dir) = match self {
            DataSpec::FashionMnist(d) => ("fashion-mnist", d),
            DataSpec::Idx(d) => ("idx", d),
            DataSpec::Cifar10(d) => ("cifar10", d),
            DataSpec::Cifar100(d) => ("cifar100", d),
            DataSpec::ImageFolder(d) => ("imagefolder", d),
        };
        format!("{kind}:{}", dir.display())
    }

    /// Loads every split, decoding at most `memory_limit` bytes of pixels into memory (an
    /// image folder over it streams; IDX and CIFAR over it are refused). Image folders are
    /// decoded at `size` `[C, H, W]` (required for them; the others have their own size).
    /// Normalisation: `norm` when given (a model's or a run's recorded statistics; nothing
    /// is measured), else Fashion-MNIST's published statistics, else measured on the
    /// training split.
    pub fn load(
        &self,
        size: Option<[i64; 3]>,
        memory_limit: u64,
        norm: Option<&Normalization>,
    ) -> Result<Dataset, DataError> {
        let mut data = match self {
            DataSpec::FashionMnist(dir) => {
                let mut data = FashionMnist::load(dir)?;
                if let Some(norm) = norm {
                    data.set_normalization(norm);
                }
                return Ok(data);
            }
            DataSpec::Idx(dir) => fashion_mnist::load_idx(dir, memory_limit)?,
            DataSpec::Cifar10(dir) => cifar::load(dir, cifar::Variant::Ten, memory_limit)?,
            DataSpec::Cifar100(dir) => cifar::load(dir, cifar::Variant::Hundred, memory_limit)?,
            DataSpec::ImageFolder(dir) => {
                let size = size.ok_or_else(|| {
                    DataError::format(
                        dir,
                        "an image folder needs the image size (the model's input dims, or --dims)",
                    )
                })?;
                let started = std::time::Instant::now();
                let data = folder::load(dir, size, memory_limit)?;
                let test = if data.test_is_validation { 0 } else { data.test.len() };
                let images = data.train.len() + data.validation.len() + test;
                let seconds = started.elapsed().as_secs_f64();
                if data.train.is_streamed() {
                    tracing::info!(
                        images,
                        memory_limit_mib = memory_limit >> 20,
                        "image folder larger than the memory limit: streaming its files from disk"
                    );
                } else {
                    tracing::info!(
                        images,
                        seconds = format!("{seconds:.1}"),
                        images_per_s = format!("{:.0}", images as f64 / seconds.max(1e-9)),
                        "image folder decoded"
                    );
                }
                data
            }
        };
        let norm = match norm {
            Some(norm) => norm.clone(),
            None => Normalization::measure(&data.train)?,
        };
        data.set_normalization(&norm);
        Ok(data)
    }
}

/// Refuses a dataset whose pixels would exceed `limit` bytes.
pub(crate) fn check_memory(path: &Path, images: u64, image_bytes: u64, limit: u64) -> Result<(), DataError> {
    let total = images.saturating_mul(image_bytes);
    if total > limit {
        return Err(DataError::format(
            path,
            format!(
                "{images} images of {image_bytes} bytes need {} MiB in memory; the limit is {} MiB \
                 (--data-memory-mib; only image folders stream from disk)",
                total.div_ceil(1 << 20),
                limit >> 20
            ),
        ));
    }
    Ok(())
}

/// Splits `train` into training and validation by holding out its last `holdout` images
/// (a fixed rule: no seed, never the test set).
pub(crate) fn hold_out(train: Split, holdout: usize) -> (Split, Split) {
    let at = train.len() - holdout.min(train.len());
    train.split_at(at)
}

/// Validation images held out of a training set of `n`: a tenth, at most 5000.
pub(crate) fn default_holdout(n: usize) -> usize {
    (n / 10).clamp(1, 5000).min(n)
}

/// Class names from `dir/labels.txt` (one per line) when it exists, else `0`, `1`, ….
pub(crate) fn labels_file_or_numbers(dir: &Path, classes: usize) -> Result<Vec<String>, DataError> {
    let path = dir.join("labels.txt");
    if !path.is_file() {
        return Ok((0..classes).map(|i| i.to_string()).collect());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let labels: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if labels.len() != classes {
        return Err(DataError::format(&path, format!("{} names for {classes} classes", labels.len())));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_specs_round_trip_through_their_argument() {
        for text in ["fashion-mnist:/d", "idx:/d", "cifar10:/d", "cifar100:/d", "imagefolder:/d"] {
            let spec: DataSpec = text.parse().unwrap();
            assert_eq!(spec.to_arg(), text);
        }
        assert!("cifar10".parse::<DataSpec>().unwrap_err().contains("needs a folder"));
    }
}
