use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{normalize_pixels, DataSplits, Dataset, RandomCrop};
use crate::{Error, Result};

const RECORD: usize = 1 + 3 * 32 * 32;
const PIXELS: usize = RECORD - 1;

/// CIFAR-10 from either of its distributions in `dir`, `dir/cifar-10-batches-bin` or `dir/cifar-10-batches-py`:
/// the binary version (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`) or the Python version that
/// torchvision and Distiller download (`data_batch_1` … `data_batch_5`, `test_batch`: pickled numpy arrays). The
/// last 5,000 training images (10%) form the validation set. Pixels are normalized with mean 0.5 and std 0.5 per
/// channel, and training passes use random 32×32 crops of the image padded by 4 and random horizontal flips, as
/// Distiller's loader.
pub fn cifar10(dir: impl AsRef<Path>) -> Result<DataSplits> {
    let files = Files::locate(dir.as_ref(), true)?;
    let mut train_parts = Vec::new();
    for i in 1..=5 {
        train_parts.push(files.read(&format!("data_batch_{i}"))?);
    }
    let (test_x, test_y) = files.read("test_batch")?;
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
/// (`test_batch.bin` or the Python `test_batch`, where [`cifar10`] looks for them).
pub fn cifar10_test(dir: impl AsRef<Path>) -> Result<Dataset> {
    let (x, y) = Files::locate(dir.as_ref(), false)?.read("test_batch")?;
    Dataset::new("cifar10/test", normalize_pixels(&x, &[0.5; 3], &[0.5; 3])?, y, 10)
}

/// Where the batches are and in which of the two formats.
struct Files {
    dir: PathBuf,
    python: bool,
}

impl Files {
    /// The first folder holding the test batch (and, with `train`, the first training batch), binary first.
    fn locate(dir: &Path, train: bool) -> Result<Self> {
        let candidates = [(dir.to_path_buf(), false), (dir.join("cifar-10-batches-bin"), false), (dir.to_path_buf(), true), (dir.join("cifar-10-batches-py"), true)];
        for (dir, python) in candidates {
            let files = Files { dir, python };
            if files.path("test_batch").is_file() && (!train || files.path("data_batch_1").is_file()) {
                return Ok(files);
            }
        }
        let wanted = if train { "data_batch_1 … data_batch_5 and test_batch" } else { "test_batch" };
        Err(Error::data(
            dir,
            format!("CIFAR-10 batches not found: expected {wanted}, as the binary version (.bin files) here or in cifar-10-batches-bin/, or the Python version here or in cifar-10-batches-py/"),
        ))
    }

    fn path(&self, batch: &str) -> PathBuf {
        self.dir.join(if self.python { batch.to_string() } else { format!("{batch}.bin") })
    }

    /// Images `[N, 3, 32, 32]` (u8) and labels `[N]`.
    fn read(&self, batch: &str) -> Result<(Tensor, Tensor)> {
        let path = self.path(batch);
        if self.python {
            read_python_batch(&path)
        } else {
            read_batch(&path)
        }
    }
}

/// One binary batch file: records of a label byte then 3×32×32 pixel bytes.
fn read_batch(path: &Path) -> Result<(Tensor, Tensor)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(Error::data(path, format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records", bytes.len())));
    }
    let n = bytes.len() / RECORD;
    let records = Tensor::f_from_slice(&bytes)?.f_view([n as i64, RECORD as i64])?;
    let labels = records.f_select(1, 0)?.f_to_kind(tch::Kind::Int64)?;
    check_labels(path, &Vec::<i64>::try_from(&labels)?)?;
    let images = records.f_narrow(1, 1, PIXELS as i64)?.f_reshape([n as i64, 3, 32, 32])?;
    Ok((images, labels))
}

fn check_labels(path: &Path, labels: &[i64]) -> Result<()> {
    match labels.iter().position(|l| !(0..10).contains(l)) {
        Some(bad) => Err(Error::data(path, format!("record {bad} has label {}, expected 0-9", labels[bad]))),
        None => Ok(()),
    }
}

/// One Python batch: a pickled dict whose `data` is a numpy `uint8` array `[N, 3072]` (rows of 1,024 red, green,
/// then blue pixels, as in the binary records) and whose `labels` is a list of N ints. Python 2 wrote the
/// originals, with bytes keys; numpy pickles an array as `_reconstruct` plus a `BUILD` whose state is
/// `(version, shape, dtype, fortran_order, raw bytes)`, which serde-pickle returns as that tuple.
fn read_python_batch(path: &Path) -> Result<(Tensor, Tensor)> {
    use serde_pickle::{HashableValue, Value};
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::data(path, format!("not a CIFAR-10 Python batch: {msg}"));
    let value = serde_pickle::value_from_slice(&bytes, serde_pickle::DeOptions::new()).map_err(|e| {
        bad(format!("the pickle cannot be read ({e}); the files of cifar-10-python.tar.gz are read, and so are re-pickled ones up to protocol 4"))
    })?;
    let Value::Dict(dict) = value else { return Err(bad("the pickle holds no dict".into())) };
    let field = |key: &str| {
        dict.iter()
            .find(|(k, _)| match k {
                HashableValue::Bytes(b) => b == key.as_bytes(),
                HashableValue::String(s) => s == key,
                _ => false,
            })
            .map(|(_, v)| v)
            .ok_or_else(|| bad(format!("it has no '{key}' entry")))
    };
    let labels: Vec<i64> = match field("labels")? {
        Value::List(items) | Value::Tuple(items) => items
            .iter()
            .map(|v| match v {
                Value::I64(l) => Ok(*l),
                other => Err(bad(format!("a label is {}, not an int", kind(other)))),
            })
            .collect::<Result<_>>()?,
        other => return Err(bad(format!("'labels' is {}, not a list", kind(other)))),
    };
    let raw = match field("data")? {
        Value::Tuple(state) => match state.as_slice() {
            [_, Value::Tuple(shape), _, Value::Bool(fortran), Value::Bytes(raw)] => {
                let dims: Vec<i64> = shape.iter().map(|d| if let Value::I64(d) = d { *d } else { -1 }).collect();
                if *fortran || dims != [labels.len() as i64, PIXELS as i64] || raw.len() != labels.len() * PIXELS {
                    return Err(bad(format!(
                        "'data' is a {dims:?} array of {} bytes{}; expected a C-ordered uint8 array [{}, {PIXELS}] (one row per label)",
                        raw.len(),
                        if *fortran { " in Fortran order" } else { "" },
                        labels.len()
                    )));
                }
                raw
            }
            _ => return Err(bad("'data' is not a pickled numpy array".into())),
        },
        other => return Err(bad(format!("'data' is {}, not a numpy array", kind(other)))),
    };
    check_labels(path, &labels)?;
    let n = labels.len() as i64;
    let images = Tensor::f_from_slice(raw)?.f_reshape([n, 3, 32, 32])?;
    Ok((images, Tensor::f_from_slice(&labels)?))
}

/// A pickled value's Python type, for errors (its contents may be megabytes).
fn kind(v: &serde_pickle::Value) -> &'static str {
    use serde_pickle::Value;
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a str",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
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
        assert!(err.contains("CIFAR-10 batches not found"), "{err}");
        // The test file alone is enough to evaluate, in the folder or in cifar-10-batches-bin/.
        let sub = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("test_batch.bin"), &bytes).unwrap();
        let test = cifar10_test(dir.path()).unwrap();
        assert_eq!(test.len(), 2);
        // 10 → (10/255 − 0.5)/0.5
        assert!((test.images().unwrap().double_value(&[0, 0, 0, 0]) - (10.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6);
        assert!(cifar10(dir.path()).unwrap_err().to_string().contains("not found"));
    }

    /// A Python batch byte for byte as Python 2's cPickle (protocol 2) wrote cifar-10-batches-py: bytes keys, a
    /// list of labels, and the numpy array as `_reconstruct` + `BUILD` with its raw bytes in a `str`.
    fn py2_batch(labels: &[u8], fills: &[u8]) -> Vec<u8> {
        let s = |b: &[u8]| -> Vec<u8> {
            let mut out = if b.len() < 256 { vec![b'U', b.len() as u8] } else { [&[b'T'][..], &(b.len() as u32).to_le_bytes()].concat() };
            out.extend_from_slice(b);
            out
        };
        let n = labels.len() as u16;
        let mut out = b"\x80\x02}q\x00(".to_vec();
        out.extend(s(b"batch_label"));
        out.extend(s(b"testing batch 1 of 1"));
        out.extend(s(b"labels"));
        out.extend(b"]q\x01(");
        for &l in labels {
            out.extend([b'K', l]);
        }
        out.push(b'e');
        out.extend(s(b"data"));
        out.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00\x85");
        out.extend(s(b"b"));
        out.extend(b"\x87R(K\x01M");
        out.extend(n.to_le_bytes());
        out.extend(b"M\x00\x0c\x86cnumpy\ndtype\n");
        out.extend(s(b"u1"));
        out.extend(b"K\x00K\x01\x87R(K\x03");
        out.extend(s(b"|"));
        out.extend(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
        let raw: Vec<u8> = fills.iter().flat_map(|&f| (0..PIXELS).map(move |i| f.wrapping_add((i / 1024) as u8))).collect();
        out.extend(s(&raw));
        out.extend(b"tbu.");
        out
    }

    #[test]
    fn reads_python_batches_as_python_2_wrote_them() {
        let dir = crate::io::TempDir::new().unwrap();
        let sub = dir.path().join("cifar-10-batches-py");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("test_batch"), py2_batch(&[3, 9, 0], &[10, 20, 30])).unwrap();
        let test = cifar10_test(dir.path()).unwrap();
        assert_eq!(Vec::<i64>::try_from(test.labels()).unwrap(), [3, 9, 0]);
        // Row 1 is red, green, blue planes of 1,024 bytes each: 20, 21, 22.
        let px = |n, c, y, x| (test.images().unwrap().double_value(&[n, c, y, x]) * 0.5 + 0.5) * 255.0;
        assert!((px(1, 0, 0, 0) - 20.0).abs() < 1e-4 && (px(1, 1, 31, 31) - 21.0).abs() < 1e-4 && (px(2, 2, 5, 7) - 32.0).abs() < 1e-4);
        // The training batches are required for the full splits, and a binary test file is preferred when both exist.
        assert!(cifar10(dir.path()).unwrap_err().to_string().contains("data_batch_1 … data_batch_5 and test_batch"));
        for i in 1..=5 {
            std::fs::write(sub.join(format!("data_batch_{i}")), py2_batch(&[i, i, i, i, i, i, i, i, i, i], &[i; 10])).unwrap();
        }
        let splits = cifar10(dir.path()).unwrap();
        assert_eq!((splits.train.len(), splits.valid.len(), splits.test.len()), (45, 5, 3));
        assert_eq!(Vec::<i64>::try_from(splits.valid.labels()).unwrap(), [5; 5]);
    }

    #[test]
    fn a_bad_python_batch_says_what_is_wrong() {
        let dir = crate::io::TempDir::new().unwrap();
        let p = dir.path().join("test_batch");
        let mut label_ten = py2_batch(&[3, 10], &[1, 2]);
        std::fs::write(&p, &label_ten).unwrap();
        assert!(cifar10_test(dir.path()).unwrap_err().to_string().contains("record 1 has label 10"));
        label_ten.truncate(500);
        std::fs::write(&p, &label_ten).unwrap();
        assert!(cifar10_test(dir.path()).unwrap_err().to_string().contains("the pickle cannot be read"));
        // Three labels for two rows.
        let mut mismatched = py2_batch(&[1, 2], &[1, 2]);
        let at = mismatched.windows(2).position(|w| w == b"K\x02").unwrap();
        mismatched.splice(at..at + 2, b"K\x02K\x04".iter().copied());
        std::fs::write(&p, &mismatched).unwrap();
        let err = cifar10_test(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a [2, 3072] array of 6144 bytes") && err.contains("expected a C-ordered uint8 array [3, 3072]"), "{err}");
        std::fs::write(&p, b"\x80\x02]q\x00.").unwrap();
        assert!(cifar10_test(dir.path()).unwrap_err().to_string().contains("the pickle holds no dict"));
    }

    /// numpy's own pickles, from the project's Python: protocols 2 to 4 as a user re-pickling a batch writes them.
    #[test]
    fn reads_batches_pickled_by_numpy() {
        let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        let dir = crate::io::TempDir::new().unwrap();
        for protocol in 2..=4 {
            let path = dir.path().join("test_batch");
            let script = "import pickle, sys, numpy as np\n\
                data = (np.arange(4 * 3072) % 251).astype(np.uint8).reshape(4, 3072)\n\
                pickle.dump({'data': data, 'labels': [0, 1, 2, 9]}, open(sys.argv[1], 'wb'), protocol=int(sys.argv[2]))";
            let status = std::process::Command::new(&python).args(["-c", script, path.to_str().unwrap(), &protocol.to_string()]).status().unwrap();
            assert!(status.success(), "{} could not write the batch (run scripts/setup.sh)", python.display());
            let test = cifar10_test(dir.path()).unwrap();
            assert_eq!(Vec::<i64>::try_from(test.labels()).unwrap(), [0, 1, 2, 9]);
            let flat = (test.images().unwrap().reshape([-1]) * 0.5 + 0.5) * 255.0;
            let expected = Tensor::arange(4 * 3072, (tch::Kind::Float, tch::Device::Cpu)).fmod(251);
            assert!(flat.allclose(&expected, 0.0, 1e-3, false), "protocol {protocol}");
        }
    }
}
