//! Image folders, torchvision's `ImageFolder` convention: one sub-folder per class (sorted
//! names = label order) of PNG/JPEG files. Either `DIR/train/`, `DIR/val/` (or
//! `validation/`) and optionally `DIR/test/`, or the class folders directly in `DIR`, split
//! by a fixed rule: in each class, files sorted by name, every tenth (the 10th, 20th, …)
//! validates. Without a test folder the validation split is also the test split, and
//! reports say so. Images are decoded on all cores, converted to the model's channels and
//! resized to its input size exactly as the server does for image inputs: all at load when
//! the decoded folder fits the memory limit, otherwise batch by batch as they are read (the
//! splits then hold only the file names).

use std::path::{Path, PathBuf};

use super::pixels::decode_pixels;
use super::{DataError, Dataset, Normalization, Pixels, Split};

/// The largest image file read (bytes) and the most pixels decoded from one.
pub const MAX_FILE_BYTES: usize = 64 << 20;
pub const MAX_FILE_PIXELS: u64 = 64 << 20;

/// Loads the folder at `size` `[C, H, W]`, streamed when its decoded pixels would exceed
/// `memory_limit` bytes.
pub fn load(dir: &Path, size: [i64; 3], memory_limit: u64) -> Result<Dataset, DataError> {
    let [c, h, w] = size;
    if !(c == 1 || c == 3) || h < 1 || w < 1 {
        return Err(DataError::format(dir, format!("cannot decode images to {size:?} (C must be 1 or 3)")));
    }
    if (h as u64).saturating_mul(w as u64) > MAX_FILE_PIXELS {
        return Err(DataError::format(
            dir,
            format!("cannot decode images to {size:?}: at most {MAX_FILE_PIXELS} pixels per image"),
        ));
    }
    let train_dir = dir.join("train");
    let (labels, train, validation, test) = if train_dir.is_dir() {
        let labels = class_names(&train_dir)?;
        let val_dir = ["val", "validation"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_dir())
            .ok_or_else(|| DataError::format(dir, "has train/ but no val/ (or validation/) folder"))?;
        let test_dir = dir.join("test");
        let test = test_dir.is_dir().then(|| files(&test_dir, &labels)).transpose()?;
        (labels.clone(), files(&train_dir, &labels)?, files(&val_dir, &labels)?, test)
    } else {
        let labels = class_names(dir)?;
        let all = files(dir, &labels)?;
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        let mut index_in_class = vec![0usize; labels.len()];
        for (path, label) in all {
            let i = &mut index_in_class[label as usize];
            *i += 1;
            if *i % 10 == 0 { validation.push((path, label)) } else { train.push((path, label)) }
        }
        (labels, train, validation, None)
    };
    if train.is_empty() || validation.is_empty() {
        return Err(DataError::format(dir, "needs images for both training and validation"));
    }
    let count = train.len() + validation.len() + test.as_ref().map_or(0, Vec::len);
    let image_bytes = (c * h * w) as u64;
    let stream = (count as u64).saturating_mul(image_bytes) > memory_limit;
    let test_is_validation = test.is_none();
    let decode = |list: &[(PathBuf, u16)]| {
        let labels = list.iter().map(|(_, l)| *l).collect();
        let [c, h, w] = size.map(|v| v as usize);
        let pixels = if stream {
            Pixels::Files(list.iter().map(|(p, _)| p.clone()).collect())
        } else {
            let paths: Vec<&Path> = list.iter().map(|(p, _)| p.as_path()).collect();
            Pixels::Memory(decode_files(&paths, [c, h, w])?)
        };
        let norm = Normalization { mean: vec![0.0; c], std: vec![1.0; c] };
        Ok::<_, DataError>(Split { pixels, labels, channels: c, rows: h, cols: w, norm })
    };
    let train = decode(&train)?;
    let validation = decode(&validation)?;
    let test = match test {
        Some(list) => decode(&list)?,
        None => validation.clone(),
    };
    Ok(Dataset { train, validation, test, labels, test_is_validation })
}

/// Sub-folder names, sorted: the classes.
fn class_names(root: &Path) -> Result<Vec<String>, DataError> {
    let entries = std::fs::read_dir(root).map_err(|e| DataError::io(root, e))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(DataError::format(root, "holds no class folders (one sub-folder of images per class)"));
    }
    if names.len() > usize::from(u16::MAX) {
        return Err(DataError::format(root, format!("{} classes; at most {}", names.len(), u16::MAX)));
    }
    Ok(names)
}

/// Every PNG/JPEG under `root/<class>/`, interleaved across classes (below). A class folder
/// that is not one of `labels` is an error.
fn files(root: &Path, labels: &[String]) -> Result<Vec<(PathBuf, u16)>, DataError> {
    let found = class_names(root)?;
    if let Some(unknown) = found.iter().find(|n| !labels.contains(n)) {
        return Err(DataError::format(
            root,
            format!("class folder `{unknown}` is not among the training classes"),
        ));
    }
    let mut per_class = Vec::new();
    for (label, name) in labels.iter().enumerate() {
        let class_dir = root.join(name);
        if !class_dir.is_dir() {
            continue;
        }
        let entries = std::fs::read_dir(&class_dir).map_err(|e| DataError::io(&class_dir, e))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            })
            .collect();
        paths.sort();
        per_class.push(paths.into_iter().map(|p| (p, label as u16)).collect::<Vec<_>>());
    }
    // Round-robin over the classes (each class's files in name order), so that every prefix
    // of a split — `--limit`, the statistics samples, an evaluation batch — holds every
    // class, as a shuffled dataset's would.
    let longest = per_class.iter().map(Vec::len).max().unwrap_or(0);
    let mut iters: Vec<_> = per_class.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    for _ in 0..longest {
        out.extend(iters.iter_mut().filter_map(Iterator::next));
    }
    Ok(out)
}

/// Decodes the image files `paths` on every core into planar `[C, H, W]` pixels, one image
/// after another.
pub(crate) fn decode_files(paths: &[&Path], [c, h, w]: [usize; 3]) -> Result<Vec<u8>, DataError> {
    let image_bytes = c * h * w;
    let mut pixels = vec![0u8; paths.len() * image_bytes];
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(paths.len().max(1));
    let per_worker = paths.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let jobs: Vec<_> = paths
            .chunks(per_worker)
            .zip(pixels.chunks_mut(per_worker * image_bytes))
            .map(|(items, out)| scope.spawn(move || decode_chunk(items, out, [c, h, w])))
            .collect();
        jobs.into_iter().try_for_each(|job| {
            job.join().unwrap_or_else(|_| {
                Err(DataError::format(Path::new("image decoder"), "a decoding thread panicked"))
            })
        })
    })?;
    Ok(pixels)
}

/// Decodes `items` into `out` (planar `[C, H, W]` per image).
fn decode_chunk(items: &[&Path], out: &mut [u8], [c, h, w]: [usize; 3]) -> Result<(), DataError> {
    let plane = h * w;
    for (&path, dst) in items.iter().zip(out.chunks_mut(c * plane)) {
        let len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
        if len > MAX_FILE_BYTES as u64 {
            return Err(DataError::format(
                path,
                format!("{len} bytes; image files of at most {MAX_FILE_BYTES} are read"),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        let interleaved = decode_pixels(&bytes, c, h as u32, w as u32, MAX_FILE_BYTES, MAX_FILE_PIXELS)
            .map_err(|e| DataError::format(path, e.to_string()))?;
        for (i, &p) in interleaved.iter().enumerate() {
            dst[(i % c) * plane + i / c] = p;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::DEFAULT_MEMORY_LIMIT;

    fn write_png(path: &Path, value: u8, rgb: bool) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if rgb {
            image::RgbImage::from_pixel(40, 30, image::Rgb([value, value / 2, 255 - value]))
                .save(path)
                .unwrap();
        } else {
            image::GrayImage::from_pixel(40, 30, image::Luma([value])).save(path).unwrap();
        }
    }

    #[test]
    fn one_folder_splits_every_tenth_file_per_class_for_validation() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("cat", 10u8), ("dog", 200)] {
            for i in 0..25 {
                write_png(&dir.path().join(class).join(format!("{i:03}.png")), value, true);
            }
        }
        std::fs::write(dir.path().join("cat/notes.txt"), "ignored").unwrap();
        let data = load(dir.path(), [3, 16, 16], DEFAULT_MEMORY_LIMIT).unwrap();
        assert_eq!(data.labels, ["cat", "dog"]);
        assert_eq!((data.train.len(), data.validation.len()), (46, 4));
        assert!(data.test_is_validation);
        assert_eq!(data.test.len(), 4);
        // Classes alternate, so any prefix holds both.
        assert_eq!(&data.train.labels[..4], &[0, 1, 0, 1]);
        assert_eq!(&data.validation.labels[..], &[0, 1, 0, 1]);
        // Resized, planar RGB, labels from folder order.
        let first_dog = data.train.labels.iter().position(|&l| l == 1).unwrap();
        let img = data.train.gather(&[first_dog]).unwrap();
        assert_eq!(img.len(), 3 * 16 * 16);
        assert!(img[..256].iter().all(|&p| p == 200) && img[256..512].iter().all(|&p| p == 100));
        assert!(img[512..].iter().all(|&p| p == 55));
    }

    #[test]
    fn train_val_test_folders_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        for split in ["train", "val", "test"] {
            for class in ["a", "b", "c"] {
                write_png(&dir.path().join(split).join(class).join("x.png"), 7, false);
            }
        }
        let data = load(dir.path(), [1, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap();
        assert_eq!((data.train.len(), data.validation.len(), data.test.len()), (3, 3, 3));
        assert!(!data.test_is_validation);
        write_png(&dir.path().join("val/zebra/y.png"), 1, false);
        let err = load(dir.path(), [1, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("class folder `zebra` is not among the training classes"), "{err}");
        std::fs::remove_dir_all(dir.path().join("val/zebra")).unwrap();
        std::fs::write(dir.path().join("train/a/broken.png"), b"\x89PNG not really").unwrap();
        let err = load(dir.path(), [1, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        let err = load(dir.path(), [1, 100_000, 100_000], DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("at most 67108864 pixels per image"), "{err}");
    }

    /// Over the memory limit the splits hold file names and decode on every read: the same
    /// pixels and statistics as decoding up front, and a file that breaks later is named.
    #[test]
    fn a_folder_over_the_memory_limit_streams_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        for (class, value) in [("a", 30u8), ("b", 90), ("c", 250)] {
            for i in 0..12 {
                write_png(&dir.path().join(class).join(format!("{i:02}.png")), value.wrapping_add(i), true);
            }
        }
        let memory = load(dir.path(), [3, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap();
        // 36 images of 192 bytes: one byte less than they need streams them.
        let streamed = load(dir.path(), [3, 8, 8], 36 * 192 - 1).unwrap();
        assert!(!memory.train.is_streamed() && streamed.train.is_streamed() && streamed.test.is_streamed());
        assert_eq!(streamed.train.labels, memory.train.labels);
        let all: Vec<usize> = (0..memory.train.len()).rev().collect();
        assert_eq!(streamed.train.gather(&all).unwrap(), memory.train.gather(&all).unwrap());
        assert_eq!(
            Normalization::measure(&streamed.train).unwrap(),
            Normalization::measure(&memory.train).unwrap()
        );
        let (a, b) = (streamed.validation.images(0..3).unwrap(), memory.validation.images(0..3).unwrap());
        assert!(a.equal(&b));
        let first = streamed.train.take(5);
        assert_eq!(first.gather(&[4]).unwrap(), memory.train.gather(&[4]).unwrap());
        std::fs::remove_file(dir.path().join("c/05.png")).unwrap();
        let err = streamed.train.gather(&all).unwrap_err().to_string();
        assert!(err.contains("05.png"), "{err}");
    }

    /// CRC-32 (PNG's chunk checksum), for a hand-edited header.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// Both per-file limits refuse before decoding: a file over `MAX_FILE_BYTES` (its size
    /// alone, read from the file system), and a PNG whose header claims more than
    /// `MAX_FILE_PIXELS`.
    #[test]
    fn oversized_files_are_refused_before_decoding() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            for i in 0..10 {
                write_png(&dir.path().join(class).join(format!("{i}.png")), 9, false);
            }
        }
        let big = dir.path().join("a/big.png");
        std::fs::File::create(&big).unwrap().set_len(MAX_FILE_BYTES as u64 + 1).unwrap();
        let err = load(dir.path(), [1, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(
            err.contains("big.png") && err.contains(&format!("image files of at most {MAX_FILE_BYTES}")),
            "{err}"
        );
        std::fs::remove_file(&big).unwrap();

        // A valid 1×1 PNG whose header is edited to claim 9000×9000 = 81 M pixels (> 64 Mi).
        let mut png = Vec::new();
        image::GrayImage::from_pixel(1, 1, image::Luma([0]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png[16..20].copy_from_slice(&9000u32.to_be_bytes());
        png[20..24].copy_from_slice(&9000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(dir.path().join("b/huge.png"), &png).unwrap();
        let err = load(dir.path(), [1, 8, 8], DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("huge.png") && err.contains("81000000 pixels"), "{err}");
    }
}
