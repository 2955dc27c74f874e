//! The CIFAR-10 and CIFAR-100 binary versions (`cifar-10-batches-bin/`,
//! `cifar-100-binary/`): fixed-size records of label byte(s) then 3072 pixel bytes, planar
//! RGB 32×32. The last 5000 training images validate. Class names from the archive's
//! `batches.meta.txt` / `fine_label_names.txt` when present.

use std::path::Path;

use super::{DataError, Dataset, Normalization, Pixels, Split, check_memory, default_holdout, hold_out};

const PIXELS: usize = 3 * 32 * 32;

/// Which of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// 10 classes; `data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`.
    Ten,
    /// 100 fine classes (the coarse label is skipped); `train.bin`, `test.bin`.
    Hundred,
}

impl Variant {
    fn classes(self) -> usize {
        match self {
            Variant::Ten => 10,
            Variant::Hundred => 100,
        }
    }

    /// Bytes before the pixels of a record, and which of them is the label.
    fn label_bytes(self) -> (usize, usize) {
        match self {
            Variant::Ten => (1, 0),
            Variant::Hundred => (2, 1),
        }
    }

    fn files(self) -> (Vec<String>, &'static str, &'static str) {
        match self {
            Variant::Ten => (
                (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
                "test_batch.bin",
                "batches.meta.txt",
            ),
            Variant::Hundred => (vec!["train.bin".into()], "test.bin", "fine_label_names.txt"),
        }
    }
}

/// Loads the training files (last 5000 images held out for validation) and the test file.
pub fn load(dir: &Path, variant: Variant, memory_limit: u64) -> Result<Dataset, DataError> {
    let (train_files, test_file, names_file) = variant.files();
    let paths: Vec<_> = train_files.iter().map(|f| dir.join(f)).chain([dir.join(test_file)]).collect();
    let record = variant.label_bytes().0 + PIXELS;
    let mut images = 0u64;
    for path in &paths {
        let len = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?.len();
        if len == 0 || len % record as u64 != 0 {
            return Err(DataError::format(
                path,
                format!("{len} bytes is not a whole number of {record}-byte records"),
            ));
        }
        images += len / record as u64;
    }
    check_memory(dir, images, PIXELS as u64, memory_limit)?;
    let norm = Normalization { mean: vec![0.0; 3], std: vec![1.0; 3] };
    let split = |(pixels, labels)| Split {
        pixels: Pixels::Memory(pixels),
        labels,
        channels: 3,
        rows: 32,
        cols: 32,
        norm: norm.clone(),
    };
    let mut train_records = (Vec::new(), Vec::new());
    for path in &paths[..paths.len() - 1] {
        read_records(path, variant, &mut train_records)?;
    }
    let full_train = split(train_records);
    let mut test_records = (Vec::new(), Vec::new());
    read_records(&paths[paths.len() - 1], variant, &mut test_records)?;
    let test = split(test_records);
    let holdout = default_holdout(full_train.len());
    let (train, validation) = hold_out(full_train, holdout);
    let names_path = dir.join(names_file);
    let labels = match std::fs::read_to_string(&names_path) {
        Ok(text) => {
            let names: Vec<String> =
                text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
            if names.len() != variant.classes() {
                return Err(DataError::format(
                    &names_path,
                    format!("{} names for {} classes", names.len(), variant.classes()),
                ));
            }
            names
        }
        Err(_) => (0..variant.classes()).map(|i| i.to_string()).collect(),
    };
    Ok(Dataset { train, validation, test, labels, test_is_validation: false })
}

/// Appends `path`'s records to `into`'s (pixels, labels).
fn read_records(path: &Path, variant: Variant, into: &mut (Vec<u8>, Vec<u16>)) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let (head, label_at) = variant.label_bytes();
    for (i, record) in bytes.chunks_exact(head + PIXELS).enumerate() {
        let label = record[label_at];
        if label as usize >= variant.classes() {
            return Err(DataError::format(
                path,
                format!("record {i}: label {label} outside 0..{}", variant.classes()),
            ));
        }
        into.1.push(u16::from(label));
        into.0.extend_from_slice(&record[head..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CIFAR-10 folder of `per_file` records per batch, pixel values = label.
    fn write_cifar10(dir: &Path, per_file: usize) {
        for name in (1..=5).map(|i| format!("data_batch_{i}.bin")).chain(["test_batch.bin".to_string()]) {
            let mut bytes = Vec::new();
            for i in 0..per_file {
                let label = (i % 10) as u8;
                bytes.push(label);
                bytes.extend(std::iter::repeat_n(label * 20, PIXELS));
            }
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn cifar10_records_become_planar_images_with_their_labels() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path(), 20);
        let data = load(dir.path(), Variant::Ten, super::super::DEFAULT_MEMORY_LIMIT).unwrap();
        assert_eq!((data.train.len(), data.validation.len(), data.test.len()), (90, 10, 20));
        assert_eq!((data.test.channels, data.test.rows, data.test.cols), (3, 32, 32));
        for i in 0..data.test.len() {
            let label = data.test.labels[i] as u8;
            assert!(data.test.gather(&[i]).unwrap().iter().all(|&p| p == label * 20));
        }
        assert_eq!(data.labels[3], "3");
        std::fs::write(dir.path().join("batches.meta.txt"), "a\nb\n").unwrap();
        let err = load(dir.path(), Variant::Ten, super::super::DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("2 names for 10 classes"), "{err}");
    }

    #[test]
    fn truncated_files_and_bad_labels_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        write_cifar10(dir.path(), 2);
        std::fs::write(dir.path().join("test_batch.bin"), vec![0u8; 3000]).unwrap();
        let err = load(dir.path(), Variant::Ten, super::super::DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("test_batch.bin") && err.contains("whole number of 3073-byte records"), "{err}");
        let mut bad = vec![11u8];
        bad.extend(vec![0u8; PIXELS]);
        std::fs::write(dir.path().join("test_batch.bin"), bad).unwrap();
        let err = load(dir.path(), Variant::Ten, super::super::DEFAULT_MEMORY_LIMIT).unwrap_err().to_string();
        assert!(err.contains("label 11 outside 0..10"), "{err}");
    }
}
