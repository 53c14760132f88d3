//! Sub-byte integer storage: `b`-bit codes packed end to end into bytes, so 4-bit weights take half the bytes of
//! 8-bit ones and 3-bit weights three eighths.
//!
//! Layout: element `i` (in the tensor's row-major order) is stored as the unsigned code `q_i − low`, which
//! occupies bits `i·b … i·b + b − 1` of the little-endian bit stream: bit `k` of the stream is bit `k mod 8` of
//! byte `k / 8`. At 4 bits, element `2j` is the low nibble of byte `j` and element `2j + 1` its high nibble (the
//! order of ONNX's INT4 and of PyTorch's `quint4x2`). The last byte's unused high bits are 0.
//!
//! ```
//! use distill::quantization::bit_packing::{pack, unpack};
//! let q = tch::Tensor::from_slice(&[-8i64, -1, 0, 7, 3]);
//! let packed = pack(&q, 4, -8)?;
//! assert_eq!(Vec::<u8>::try_from(&packed)?, vec![0x70, 0xf8, 0x0b]);
//! assert!(unpack(&packed, 4, -8, &[5])?.equal(&q));
//! # Ok::<(), distill::Error>(())
//! ```
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The bits that codes of the integer range `[low, high]` need (`⌈log2(high − low + 1)⌉`, at least 1).
pub fn bits_for_range(low: f64, high: f64) -> u32 {
    let levels = (high - low + 1.0).max(1.0);
    (levels.log2().ceil() as u32).max(1)
}

/// Packs the integer values of `values` (any shape, integer-valued of any kind) as `bits`-bit codes `q − low`
/// into a 1-D uint8 tensor of `⌈n·bits/8⌉` bytes. A value outside `[low, low + 2^bits − 1]`, or not a whole
/// number, is an error.
pub fn pack(values: &Tensor, bits: u32, low: i64) -> Result<Tensor> {
    check_bits(bits)?;
    let flat = values.f_flatten(0, -1)?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?;
    let values: Vec<f64> = Vec::<f64>::try_from(&flat)?;
    let max_code = (1u64 << bits) - 1;
    let mut bytes = vec![0u8; (values.len() * bits as usize).div_ceil(8)];
    let (mut acc, mut filled, mut at) = (0u64, 0u32, 0usize);
    for (i, &v) in values.iter().enumerate() {
        let code = v - low as f64;
        if !(code >= 0.0 && code <= max_code as f64 && code.fract() == 0.0) {
            return Err(Error::invalid("bit packing", format!("element {i} is {v}, which is not a whole number in [{low}, {}] ({bits} bits from {low})", low + max_code as i64)));
        }
        acc |= (code as u64) << filled;
        filled += bits;
        while filled >= 8 {
            bytes[at] = (acc & 0xff) as u8;
            (acc, filled, at) = (acc >> 8, filled - 8, at + 1);
        }
    }
    if filled > 0 {
        bytes[at] = (acc & 0xff) as u8;
    }
    Ok(Tensor::from_slice(&bytes))
}

/// The int64 tensor of `shape` that [`pack`] stored in `packed` with these `bits` and `low`. A byte count that
/// does not match the shape is an error.
pub fn unpack(packed: &Tensor, bits: u32, low: i64, shape: &[i64]) -> Result<Tensor> {
    check_bits(bits)?;
    if packed.kind() != Kind::Uint8 || packed.dim() != 1 {
        return Err(Error::Shape(format!("packed codes must be a 1-D uint8 tensor, not {:?} of shape {:?}", packed.kind(), packed.size())));
    }
    if shape.iter().any(|&d| d < 0) {
        return Err(Error::Shape(format!("shape {shape:?} has a negative dimension")));
    }
    let n = shape.iter().try_fold(1i64, |a, &d| a.checked_mul(d)).ok_or_else(|| Error::Shape(format!("shape {shape:?} holds more values than fit in 64 bits")))?;
    let expected = (n as u128 * bits as u128).div_ceil(8);
    let bytes: Vec<u8> = Vec::<u8>::try_from(&packed.f_to_device(tch::Device::Cpu)?)?;
    if bytes.len() as u128 != expected {
        return Err(Error::Shape(format!("{} packed bytes do not hold {n} codes of {bits} bits ({expected} bytes expected for shape {shape:?})", bytes.len())));
    }
    let mask = (1u64 << bits) - 1;
    let mut values = Vec::with_capacity(n as usize);
    let (mut acc, mut filled) = (0u64, 0u32);
    let mut next = bytes.iter();
    for _ in 0..n {
        while filled < bits {
            acc |= (*next.next().unwrap_or(&0) as u64) << filled;
            filled += 8;
        }
        values.push((acc & mask) as i64 + low);
        (acc, filled) = (acc >> bits, filled - bits);
    }
    Ok(Tensor::from_slice(&values).f_reshape(shape)?)
}

fn check_bits(bits: u32) -> Result<()> {
    if (1..=16).contains(&bits) {
        Ok(())
    } else {
        Err(Error::invalid("bit packing", format!("{bits} bits: packing takes 1 to 16 bits per value")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every width from 1 to 16 bits round-trips a range's extremes and a pseudo-random sequence, in the
    /// documented byte count; at 3 bits the bytes are the stream written out by hand.
    #[test]
    fn every_width_round_trips_in_the_documented_layout() {
        for bits in 1..=16u32 {
            let low = -(1i64 << (bits - 1));
            let high = low + (1i64 << bits) - 1;
            let mut values = vec![low, high, 0, low + 1, high - 1];
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ bits as u64;
            for _ in 0..37 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                values.push(low + ((state >> 33) as i64).rem_euclid(1 << bits));
            }
            let t = Tensor::from_slice(&values).reshape([2, 21]);
            let packed = pack(&t, bits, low).unwrap();
            assert_eq!(packed.size(), [(42 * bits as i64 + 7) / 8], "{bits} bits");
            assert!(unpack(&packed, bits, low, &[2, 21]).unwrap().equal(&t), "{bits} bits");
        }
        // 3 bits, codes 1, 2, 7, 5 from 0: stream 001 010 111 101 (LSB first) = bits 1,0,0, 0,1,0, 1,1,1, 1,0,1.
        // Byte 0: bits 0..8 = 1,0,0,0,1,0,1,1 -> 0b1101_0001; byte 1: bits 8..12 = 1,1,0,1 -> 0b1011.
        let packed = pack(&Tensor::from_slice(&[1i64, 2, 7, 5]), 3, 0).unwrap();
        assert_eq!(Vec::<u8>::try_from(&packed).unwrap(), vec![0b1101_0001, 0b0000_1011]);
        // Float tensors holding whole numbers (the simulated quantized weights) pack the same.
        let as_float = Tensor::from_slice(&[1.0f32, 2.0, 7.0, 5.0]);
        assert!(pack(&as_float, 3, 0).unwrap().equal(&packed));
    }

    #[test]
    fn values_outside_the_range_and_bad_shapes_are_errors() {
        let q = Tensor::from_slice(&[0i64, 8]);
        assert!(pack(&q, 3, 0).unwrap_err().to_string().contains("element 1 is 8"));
        assert!(pack(&Tensor::from_slice(&[0.5f64]), 4, 0).unwrap_err().to_string().contains("not a whole number"));
        assert!(pack(&Tensor::from_slice(&[f64::NAN]), 4, 0).is_err());
        assert!(pack(&q, 0, 0).unwrap_err().to_string().contains("1 to 16"));
        let packed = pack(&Tensor::from_slice(&[1i64, 2, 3]), 4, 0).unwrap();
        assert!(unpack(&packed, 4, 0, &[5]).unwrap_err().to_string().contains("do not hold 5 codes"));
        assert!(unpack(&Tensor::from_slice(&[1i64]), 4, 0, &[1]).unwrap_err().to_string().contains("uint8"));
        // A damaged shape cannot make it allocate: the byte count must match first.
        assert!(unpack(&packed, 4, 0, &[i64::MAX, 2]).unwrap_err().to_string().contains("more values than fit"));
        assert!(unpack(&packed, 4, 0, &[1 << 40, 1 << 20]).unwrap_err().to_string().contains("do not hold"));
        assert!(unpack(&packed, 4, 0, &[-1, 3]).unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn the_bits_a_range_needs() {
        assert_eq!(bits_for_range(0.0, 15.0), 4);
        assert_eq!(bits_for_range(-7.0, 7.0), 4);
        assert_eq!(bits_for_range(-8.0, 7.0), 4);
        assert_eq!(bits_for_range(0.0, 16.0), 5);
        assert_eq!(bits_for_range(0.0, 255.0), 8);
        assert_eq!(bits_for_range(0.0, 0.0), 1);
    }
}
