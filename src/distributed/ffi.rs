//! The C functions of `bridge/c10d.cpp`. Each returns NULL on success or a malloc'd message, which [`check`]
//! turns into an [`Error::Distributed`] and frees.
use std::ffi::{c_char, c_void, CStr};

use crate::{Error, Result};

/// A `c10d::Store` (TCPStore) behind the bridge.
#[repr(C)]
pub(super) struct RawStore {
    _private: [u8; 0],
}

/// A `c10d::Backend` (ProcessGroupGloo) behind the bridge.
#[repr(C)]
pub(super) struct RawGroup {
    _private: [u8; 0],
}

#[cfg(distill_c10d)]
extern "C" {
    pub(super) fn distill_c10d_free_message(message: *mut c_char);
    pub(super) fn distill_c10d_tcp_store(
        host: *const c_char,
        port: u16,
        world_size: i32,
        is_server: i32,
        listen_fd: i32,
        timeout_ms: i64,
        out: *mut *mut RawStore,
    ) -> *mut c_char;
    pub(super) fn distill_c10d_free_store(store: *mut RawStore);
    pub(super) fn distill_c10d_store_add(store: *mut RawStore, key: *const c_char, value: i64, out: *mut i64) -> *mut c_char;
    pub(super) fn distill_c10d_store_set_i64(store: *mut RawStore, key: *const c_char, value: i64) -> *mut c_char;
    pub(super) fn distill_c10d_store_get_i64(store: *mut RawStore, key: *const c_char, out: *mut i64) -> *mut c_char;
    pub(super) fn distill_c10d_gloo_group(store: *mut RawStore, rank: i32, size: i32, timeout_ms: i64, out: *mut *mut RawGroup) -> *mut c_char;
    pub(super) fn distill_c10d_free_group(group: *mut RawGroup);
    pub(super) fn distill_c10d_all_reduce(group: *mut RawGroup, tensor: *mut c_void, op: i32) -> *mut c_char;
    pub(super) fn distill_c10d_broadcast(group: *mut RawGroup, tensor: *mut c_void, root: i32) -> *mut c_char;
    pub(super) fn distill_c10d_all_gather(group: *mut RawGroup, outputs: *const *mut c_void, n: usize, input: *mut c_void) -> *mut c_char;
    pub(super) fn distill_c10d_barrier(group: *mut RawGroup) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    pub(super) fn distill_c10d_sync_batch_norm(
        group: *mut RawGroup,
        input: *mut c_void,
        weight: *mut c_void,
        bias: *mut c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
}

// Without the bridge (see build.rs) the same functions exist and fail with a message saying why, so the rest of
// the module compiles unchanged and a process group can never be formed.
#[cfg(not(distill_c10d))]
mod unavailable {
    use super::*;

    pub(in crate::distributed) fn unavailable_message() -> *mut c_char {
        std::ffi::CString::new(UNAVAILABLE).expect("no NUL in the message").into_raw()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_free_message(message: *mut c_char) {
        if !message.is_null() {
            drop(std::ffi::CString::from_raw(message));
        }
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_tcp_store(
        _host: *const c_char,
        _port: u16,
        _world_size: i32,
        _is_server: i32,
        _listen_fd: i32,
        _timeout_ms: i64,
        _out: *mut *mut RawStore,
    ) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_free_store(_store: *mut RawStore) {}

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_store_add(_store: *mut RawStore, _key: *const c_char, _value: i64, _out: *mut i64) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_store_set_i64(_store: *mut RawStore, _key: *const c_char, _value: i64) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_store_get_i64(_store: *mut RawStore, _key: *const c_char, _out: *mut i64) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_gloo_group(_store: *mut RawStore, _rank: i32, _size: i32, _timeout_ms: i64, _out: *mut *mut RawGroup) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_free_group(_group: *mut RawGroup) {}

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_all_reduce(_group: *mut RawGroup, _tensor: *mut c_void, _op: i32) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_broadcast(_group: *mut RawGroup, _tensor: *mut c_void, _root: i32) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_all_gather(_group: *mut RawGroup, _outputs: *const *mut c_void, _n: usize, _input: *mut c_void) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc)]
    pub(in crate::distributed) unsafe fn distill_c10d_barrier(_group: *mut RawGroup) -> *mut c_char {
        unavailable_message()
    }

    #[allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
    pub(in crate::distributed) unsafe fn distill_c10d_sync_batch_norm(
        _group: *mut RawGroup,
        _input: *mut c_void,
        _weight: *mut c_void,
        _bias: *mut c_void,
        _running_mean: *mut c_void,
        _running_var: *mut c_void,
        _momentum: f64,
        _eps: f64,
        _out: *mut *mut c_void,
    ) -> *mut c_char {
        unavailable_message()
    }
}
#[cfg(not(distill_c10d))]
pub(super) use unavailable::*;

/// `Ok` for a NULL message; otherwise the message, prefixed by what was being done, as an error.
pub(super) fn check(message: *mut c_char, doing: &str) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL result is a NUL-terminated string malloc'd by the bridge, freed here exactly once.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { distill_c10d_free_message(message) };
    Err(Error::Distributed(format!("{doing}: {text}")))
}

#[cfg(not(distill_c10d))]
const UNAVAILABLE: &str =
    "this build of distill has no c10d bridge: it needs Linux and a libtorch with c10d's headers (the PyPI wheel that scripts/setup.sh installs)";
