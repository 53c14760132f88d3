//! How a model's 4-D tensors lie in memory.
//!
//! libtorch's CPU convolutions (oneDNN) work on channels-last data: given the usual NCHW layout they reorder the
//! input into a blocked layout and the output back at every call, which on 32×32 CIFAR feature maps costs more
//! than the convolution itself (a 16→16-channel 3×3 convolution of a batch of 64: 5.1 ms row-major, 1.4 ms
//! channels-last, on the project's 2-core machine). A model kept channels-last ([`Model::to_memory_format`])
//! skips those reorders: ResNet-56's forward pass on a batch of 64 ran 15–25% faster, dense or thinned
//! (`cargo bench --bench thinning`). Values do not change, only strides, so every layer computes the same
//! function; convolutions may sum in another order, so outputs agree to float rounding.
//!
//! Training gains too: in `cargo bench --bench train_step` a ResNet-20 step took 61 ms against 80 ms row-major at
//! batch 32, 109 ms against 138 ms at batch 64 (LeNet's, on 28×28 digits, did not change). Its float32 gradients
//! round differently: over ten SGD steps on one batch (lr 0.01) they agreed with float64 within 1e-5
//! (row-major: 3e-6) wherever every ReLU saw the same signs, and at eight steps one to three ReLU inputs, among
//! 1.5 million, lay on the other side of zero than in float64, which moved some weight's gradient by 0.2–15%.
//! Row-major float32's gradients differed from float64's as much at five of those steps. Three steps from one
//! start gave losses within 2e-5 of float64's in either layout, and either layout is deterministic on its own.
//!
//! [`Model::to_memory_format`]: super::Model::to_memory_format
use tch::Tensor;

use crate::Result;

/// The memory layout of a model's 4-D parameters, buffers and inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryFormat {
    /// Row-major NCHW, libtorch's default.
    #[default]
    Contiguous,
    /// NHWC in memory, with the logical NCHW shape unchanged (PyTorch's `torch.channels_last`).
    ChannelsLast,
}

impl MemoryFormat {
    /// The format `t` is laid out in: `ChannelsLast` for a dense NHWC 4-D tensor that is not also row-major (a
    /// tensor with one channel or one pixel is both, and counts as `Contiguous`), `Contiguous` otherwise.
    pub fn of(t: &Tensor) -> MemoryFormat {
        if t.dim() == 4 && !t.is_contiguous() && t.permute([0, 2, 3, 1]).is_contiguous() {
            MemoryFormat::ChannelsLast
        } else {
            MemoryFormat::Contiguous
        }
    }

    /// `t` laid out in this format, copied only when its layout differs: `Contiguous` makes any tensor row-major;
    /// `ChannelsLast` lays out a 4-D tensor NHWC and leaves other ranks as they are (as shallow clones), since only
    /// 4-D tensors have a channels-last layout.
    ///
    /// ```
    /// use distill::nn::MemoryFormat;
    /// let x = tch::Tensor::arange(24, (tch::Kind::Float, tch::Device::Cpu)).view([1, 2, 3, 4]);
    /// let nhwc = MemoryFormat::ChannelsLast.apply(&x)?;
    /// assert_eq!(MemoryFormat::of(&nhwc), MemoryFormat::ChannelsLast);
    /// assert_eq!(nhwc.size(), [1, 2, 3, 4]);
    /// assert_eq!(nhwc.stride(), [24, 1, 8, 2]);
    /// assert!(nhwc.equal(&x));
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn apply(self, t: &Tensor) -> Result<Tensor> {
        // libtorch's contiguous() returns the tensor itself when it already is.
        Ok(match self {
            MemoryFormat::Contiguous => t.f_contiguous()?,
            MemoryFormat::ChannelsLast if t.dim() == 4 => t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_permute([0, 3, 1, 2])?,
            MemoryFormat::ChannelsLast => t.shallow_clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn formats_are_recognized_and_round_trip_without_changing_values() {
        let x = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(MemoryFormat::of(&x), MemoryFormat::Contiguous);
        let nhwc = MemoryFormat::ChannelsLast.apply(&x).unwrap();
        assert_eq!(nhwc.stride(), [60, 1, 15, 3]);
        assert_eq!(MemoryFormat::of(&nhwc), MemoryFormat::ChannelsLast);
        assert!(nhwc.equal(&x));
        let back = MemoryFormat::Contiguous.apply(&nhwc).unwrap();
        assert!(back.is_contiguous() && back.equal(&x));
        // One channel: both layouts at once, reported as contiguous and left alone.
        let one = Tensor::randn([2, 1, 4, 5], (Kind::Float, Device::Cpu));
        assert_eq!(MemoryFormat::of(&MemoryFormat::ChannelsLast.apply(&one).unwrap()), MemoryFormat::Contiguous);
        // A transposed view is neither: contiguous() makes it row-major.
        let t = x.transpose(2, 3);
        assert_eq!(MemoryFormat::of(&t), MemoryFormat::Contiguous);
        assert!(MemoryFormat::Contiguous.apply(&t).unwrap().is_contiguous());
        // Other ranks pass through.
        let v = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        assert_eq!(MemoryFormat::ChannelsLast.apply(&v).unwrap().stride(), [4, 1]);
    }
}
