//! TensorBoard event files, written and read in-tree: TFRecord framing with masked CRC-32C and the few protobuf
//! messages scalars, histograms and text need, encoded by hand. (tensorboard-rs, the crate first chosen, is
//! unmaintained, depends on protobuf 2.28 with RUSTSEC-2024-0437, panics in `add_histogram` and 15 other methods
//! and transposes images; `tboard` needs `protoc` at build time.)
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tch::{Kind, Tensor};

use crate::{Error, Result};

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn double_field(field: u32, v: f64, out: &mut Vec<u8>) {
    key(field, 1, out);
    out.extend_from_slice(&v.to_le_bytes());
}

fn packed_doubles(field: u32, vs: &[f64], out: &mut Vec<u8>) {
    let mut data = Vec::with_capacity(vs.len() * 8);
    vs.iter().for_each(|v| data.extend_from_slice(&v.to_le_bytes()));
    bytes_field(field, &data, out);
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `Event{wall_time, step, summary{value}}`.
fn event(step: i64, value: &[u8]) -> Vec<u8> {
    let mut summary = Vec::new();
    bytes_field(1, value, &mut summary);
    let mut e = Vec::new();
    double_field(1, wall_time(), &mut e);
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    bytes_field(5, &summary, &mut e);
    e
}

/// Writes one run's event file (`events.out.tfevents.<time>.<host>.distill`).
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `logdir` (created if needed).
    pub fn create(logdir: impl AsRef<Path>) -> Result<Self> {
        let dir = logdir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.distill", wall_time() as u64));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { out: BufWriter::new(file), path };
        let mut first = Vec::new();
        double_field(1, wall_time(), &mut first);
        bytes_field(3, b"brain.Event:2", &mut first);
        w.record(&first)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out.write_all(&buf).map_err(|e| Error::io(&self.path, e))
    }

    /// A scalar (stored as a 32-bit float, as TensorBoard's `simple_value`).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        let mut v = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut v);
        key(2, 5, &mut v);
        v.extend_from_slice(&(value as f32).to_le_bytes());
        self.record(&event(step, &v))
    }

    /// A histogram of `values` in `bins` equal-width buckets between their min and max.
    pub fn add_histogram(&mut self, tag: &str, values: &Tensor, bins: usize, step: i64) -> Result<()> {
        let v = values.f_detach()?.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
        let n = v.numel();
        if n == 0 {
            return Err(Error::invalid("histogram", format!("'{tag}' has no values")));
        }
        let (min, max) = (v.f_min()?.f_double_value(&[])?, v.f_max()?.f_double_value(&[])?);
        let sum = v.f_sum(Kind::Double)?.f_double_value(&[])?;
        let sum_sq = v.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        let (edges, counts) = crate::summary::histogram(&v, bins)?;
        let limits = &edges[1..];
        let mut h = Vec::new();
        double_field(1, min, &mut h);
        double_field(2, max, &mut h);
        double_field(3, n as f64, &mut h);
        double_field(4, sum, &mut h);
        double_field(5, sum_sq, &mut h);
        packed_doubles(6, limits, &mut h);
        packed_doubles(7, &counts, &mut h);
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val);
        bytes_field(5, &h, &mut val);
        self.record(&event(step, &val))
    }

    /// A text note (TensorBoard's text plugin).
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> Result<()> {
        let mut plugin = Vec::new();
        bytes_field(1, b"text", &mut plugin);
        let mut meta = Vec::new();
        bytes_field(1, &plugin, &mut meta);
        let mut tensor = Vec::new();
        key(1, 0, &mut tensor);
        varint(7, &mut tensor); // DT_STRING
        bytes_field(2, &[], &mut tensor);
        bytes_field(8, text.as_bytes(), &mut tensor);
        let mut val = Vec::new();
        bytes_field(1, tag.as_bytes(), &mut val);
        bytes_field(8, &tensor, &mut val);
        bytes_field(9, &meta, &mut val);
        self.record(&event(step, &val))
    }

    /// Writes buffered records to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// One scalar read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarEvent {
    /// Tag.
    pub tag: String,
    /// Step.
    pub step: i64,
    /// Value.
    pub value: f64,
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos)?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    /// The next (field, wire type, payload) of a protobuf message.
    fn field(&mut self) -> Option<(u32, Field<'a>)> {
        if self.pos >= self.data.len() {
            return None;
        }
        let k = self.varint()?;
        let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
        let f = match wire {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            2 => {
                let n = self.varint()? as usize;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().ok()?)),
            _ => return None,
        };
        Some((field, f))
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

fn fields(data: &[u8]) -> Vec<(u32, Field<'_>)> {
    let mut r = Reader { data, pos: 0 };
    std::iter::from_fn(|| r.field()).collect()
}

/// The scalars of one `Summary.Value`: `simple_value`, or a one-element float tensor (PyTorch's new-style
/// scalars, TensorFlow 2's scalar summaries).
fn value_scalar(value: &[u8]) -> Option<(String, f64)> {
    let mut tag = None;
    let mut scalar = None;
    for (f, v) in fields(value) {
        match (f, v) {
            (1, Field::Bytes(b)) => tag = Some(String::from_utf8_lossy(b).into_owned()),
            (2, Field::Fixed32(bits)) => scalar = Some(f32::from_bits(bits) as f64),
            (8, Field::Bytes(t)) => {
                let mut dtype = 0;
                for (tf, tv) in fields(t) {
                    match (tf, tv) {
                        (1, Field::Varint(d)) => dtype = d,
                        (5, Field::Bytes(b)) if b.len() == 4 => scalar = Some(f32::from_le_bytes(b.try_into().ok()?) as f64),
                        (5, Field::Fixed32(bits)) => scalar = Some(f32::from_bits(bits) as f64),
                        (6, Field::Bytes(b)) if b.len() == 8 => scalar = Some(f64::from_le_bytes(b.try_into().ok()?)),
                        (6, Field::Fixed64(bits)) => scalar = Some(f64::from_bits(bits)),
                        (4, Field::Bytes(b)) if dtype == 1 && b.len() == 4 => scalar = Some(f32::from_le_bytes(b.try_into().ok()?) as f64),
                        (4, Field::Bytes(b)) if dtype == 2 && b.len() == 8 => scalar = Some(f64::from_le_bytes(b.try_into().ok()?)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((tag?, scalar?))
}

/// Reads every scalar of an event file. A file cut short (a run killed mid-write) or a record whose checksum
/// fails ends the reading: the complete records before it are returned with a warning.
pub fn read_scalars(path: impl AsRef<Path>) -> Result<(Vec<ScalarEvent>, Option<String>)> {
    let path = path.as_ref();
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut pos = 0;
    let mut warning = None;
    while pos < data.len() {
        let header = data.get(pos..pos + 12);
        let Some(header) = header else {
            warning = Some(format!("{}: truncated record header at byte {pos}; {} complete records read", path.display(), out.len()));
            break;
        };
        let len_bytes = &header[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        if u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) != masked_crc(len_bytes) {
            warning = Some(format!("{}: corrupt record length at byte {pos}; reading stopped", path.display()));
            break;
        }
        let Some(body) = data.get(pos + 12..pos + 12 + len) else {
            warning = Some(format!("{}: record at byte {pos} cut short (run killed mid-write?); earlier records kept", path.display()));
            break;
        };
        let Some(crc) = data.get(pos + 12 + len..pos + 16 + len) else {
            warning = Some(format!("{}: record at byte {pos} cut short (run killed mid-write?); earlier records kept", path.display()));
            break;
        };
        if u32::from_le_bytes(crc.try_into().expect("4 bytes")) != masked_crc(body) {
            warning = Some(format!("{}: checksum mismatch at byte {pos}; reading stopped", path.display()));
            break;
        }
        pos += 16 + len;
        let (mut step, mut wall) = (0i64, 0.0);
        let mut values = Vec::new();
        for (f, v) in fields(body) {
            match (f, v) {
                (1, Field::Fixed64(bits)) => wall = f64::from_bits(bits),
                (2, Field::Varint(s)) => step = s as i64,
                (5, Field::Bytes(summary)) => {
                    for (sf, sv) in fields(summary) {
                        if let (1, Field::Bytes(value)) = (sf, sv) {
                            values.extend(value_scalar(value));
                        }
                    }
                }
                _ => {}
            }
        }
        out.extend(values.into_iter().map(|(tag, value)| ScalarEvent { tag, step, value, wall_time: wall }));
    }
    Ok((out, warning))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c::Mask of crc32c("") = 0 is 0xa282ead8; of "a" (0xc1d04330) computed by hand.
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        let c: u32 = 0xc1d0_4330;
        assert_eq!(crc32c::crc32c(b"a"), c);
        assert_eq!(masked_crc(b"a"), c.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn scalars_roundtrip_and_truncation_keeps_complete_records() {
        let dir = crate::io::TempDir::new().unwrap();
        let path = {
            let mut w = EventWriter::create(dir.path()).unwrap();
            for step in 0..5 {
                w.add_scalar("Performance/Validation/Top1", 90.0 + step as f64, step).unwrap();
            }
            w.add_histogram("conv1/weight", &Tensor::from_slice(&[0.0f32, 1.0, 2.0]), 4, 0).unwrap();
            w.add_text("notes", "hello", 0).unwrap();
            w.path().to_path_buf()
        };
        let (events, warning) = read_scalars(&path).unwrap();
        assert!(warning.is_none());
        assert_eq!(events.iter().map(|e| (e.step, e.value)).collect::<Vec<_>>(), (0..5).map(|s| (s, 90.0 + s as f64)).collect::<Vec<_>>());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let (events, warning) = read_scalars(&path).unwrap();
        assert_eq!(events.len(), 5, "the scalars before the cut record survive");
        assert!(warning.unwrap().contains("cut short"));
    }
}
