//! Keeps the memory a training step frees inside the process.
//!
//! glibc's `malloc` returns freed memory at the top of its heap to the operating system once more than the
//! trim threshold is free (by default twice the largest recently freed block, a few MiB for activations), so
//! the tens of MiB a training step frees after its backward pass are handed back at every step and the next
//! step faults every page in again, zeroed by the kernel. On the project's 2-core machine that cost ResNet-20
//! about 10 ms per step, more where a step holds more memory (quantization-aware training keeps a mask and a
//! quantized copy of every activation). Fixed thresholds stop it: blocks up to 32 MiB come from the heap and
//! up to 1 GiB of free heap stays mapped. The setting is process-wide and lasts; it only changes when memory
//! goes back to the system, never how much a program may allocate.
use std::sync::OnceLock;

/// Raises glibc's trim and mmap thresholds once per process (a no-op on other C libraries); true when they are
/// raised. The training loop ([`super::train_epoch`], [`super::fit`]) calls it; a hand-written loop may call it
/// before its first step. Set `DISTILL_MALLOC_DEFAULTS=1` in the environment to keep glibc's dynamic thresholds.
pub fn retain_freed_memory() -> bool {
    static RETAINED: OnceLock<bool> = OnceLock::new();
    *RETAINED.get_or_init(|| {
        let defaults = std::env::var_os("DISTILL_MALLOC_DEFAULTS").is_some_and(|v| v != "0");
        !defaults && set_thresholds()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds() -> bool {
    // glibc's <malloc.h>.
    const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    // SAFETY: mallopt only adjusts allocator parameters; both values are within glibc's accepted ranges
    // (the mmap threshold may not exceed 32 MiB on 64-bit systems). It returns 1 on success.
    unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> bool {
    false
}
