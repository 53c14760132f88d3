use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{normalize_pixels, DataSplits, Dataset, RandomCrop};
use crate::{Error, Result};

const RECORD: usize = 1 + 3 * 32 * 32;

/// CIFAR-10 from its binary version (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`) in `dir` or in
/// `dir/cifar-10-batches-bin`. The last 5,000 training images (10%) form the validation set. Pixels are
/// normalized with mean 0.5 and std 0.5 per channel, and training passes use random 32×32 crops of the image
/// padded by 4 and random horizontal flips, as Distiller's loader.
pub fn cifar10(dir: impl AsRef<Path>) -> Result<DataSplits> {
    let dir = locate(dir.as_ref(), "data_batch_1.bin")?;
    let mut train_parts = Vec::new();
    for i in 1..=5 {
        train_parts.push(read_batch(&dir.join(format!("data_batch_{i}.bin")))?);
    }
    let (test_x, test_y) = read_batch(&dir.join("test_batch.bin"))?;
    let (xs, ys): (Vec<Tensor>, Vec<Tensor>) = train_parts.into_iter().unzip();
    let norm = |x: &Tensor| normalize_pixels(x, &[0.5; 3], &[0.5; 3]);
    let all = Dataset::new("cifar10/train", norm(&Tensor::f_cat(&xs, 0)?)?, Tensor::f_cat(&ys, 0)?, 10)?;
    let n = all.len() as i64;
    let n_valid = n / 10;
    Ok(DataSplits {
        train: all
            .subset("cifar10/train", &(0..n - n_valid).collect::<Vec<_>>())?
            .with_augmentation(Some(RandomCrop { padding: 4, fill: -1.0, horizontal_flip: true })),
        valid: all.subset("cifar10/valid", &(n - n_valid..n).collect::<Vec<_>>())?,
        test: Dataset::new("cifar10/test", norm(&test_x)?, test_y, 10)?,
    })
}

/// CIFAR-10's 10,000 test images alone, normalized as [`cifar10`] does: all that evaluating a trained model needs
/// (`test_batch.bin` in `dir` or in `dir/cifar-10-batches-bin`).
pub fn cifar10_test(dir: impl AsRef<Path>) -> Result<Dataset> {
    let dir = locate(dir.as_ref(), "test_batch.bin")?;
    let (x, y) = read_batch(&dir.join("test_batch.bin"))?;
    Dataset::new("cifar10/test", normalize_pixels(&x, &[0.5; 3], &[0.5; 3])?, y, 10)
}

fn locate(dir: &Path, file: &str) -> Result<PathBuf> {
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if d.join(file).is_file() {
            return Ok(d);
        }
    }
    Err(Error::data(dir, "CIFAR-10 binary batches not found (expected data_batch_1.bin … data_batch_5.bin and test_batch.bin here or in cifar-10-batches-bin/)"))
}

/// One batch file: records of a label byte then 3×32×32 pixel bytes.
fn read_batch(path: &Path) -> Result<(Tensor, Tensor)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(Error::data(path, format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records", bytes.len())));
    }
    let n = bytes.len() / RECORD;
    let records = Tensor::f_from_slice(&bytes)?.f_view([n as i64, RECORD as i64])?;
    let labels = records.f_select(1, 0)?.f_to_kind(tch::Kind::Int64)?;
    if let Some(bad) = Vec::<i64>::try_from(&labels)?.iter().position(|&l| l > 9) {
        return Err(Error::data(path, format!("record {bad} has label {}, expected 0-9", bytes[bad * RECORD])));
    }
    let images = records.f_narrow(1, 1, (RECORD - 1) as i64)?.f_reshape([n as i64, 3, 32, 32])?;
    Ok((images, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_records_and_rejects_bad_files() {
        let dir = crate::io::TempDir::new().unwrap();
        let p = dir.path().join("b.bin");
        let mut bytes = Vec::new();
        for (label, fill) in [(3u8, 10u8), (9, 20)] {
            bytes.push(label);
            bytes.extend(std::iter::repeat_n(fill, RECORD - 1));
        }
        std::fs::write(&p, &bytes).unwrap();
        let (x, y) = read_batch(&p).unwrap();
        assert_eq!(x.size(), [2, 3, 32, 32]);
        assert_eq!(Vec::<i64>::try_from(&y).unwrap(), [3, 9]);
        assert_eq!(x.int64_value(&[1, 2, 31, 31]), 20);
        std::fs::write(&p, &bytes[..100]).unwrap();
        assert!(read_batch(&p).unwrap_err().to_string().contains("not a whole number"));
        let err = cifar10(dir.path()).unwrap_err().to_string();
        assert!(err.contains("CIFAR-10 binary batches not found"), "{err}");
        // The test file alone is enough to evaluate, in the folder or in cifar-10-batches-bin/.
        let sub = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("test_batch.bin"), &bytes).unwrap();
        let test = cifar10_test(dir.path()).unwrap();
        assert_eq!(test.len(), 2);
        // 10 → (10/255 − 0.5)/0.5
        assert!((test.images().double_value(&[0, 0, 0, 0]) - (10.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        assert!(cifar10(dir.path()).unwrap_err().to_string().contains("not found"));
    }
}
