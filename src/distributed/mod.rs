//! Data-parallel training across processes on PyTorch's own distributed engine, c10d: a TCPStore for the
//! rendezvous and Gloo for the collectives on CPU tensors. distill calls them through a small C++ bridge
//! (`bridge/c10d.cpp`, built by build.rs against the headers of the libtorch that tch links), so it uses the
//! very code `torch.distributed` runs, and launches the way `torchrun` does.
//!
//! - [`Rendezvous`] reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` (what `torchrun`
//!   sets); [`launch::run_local`] starts N local processes with them (`distill train --nproc N`).
//! - [`ProcessGroup`] joins the run and offers `all_reduce`, `broadcast`, `all_gather` and `barrier` on tch
//!   tensors; every c10d failure (a dead peer, a timeout) comes back as [`crate::Error::Distributed`].
//! - [`data_parallel`] holds the steps of DDP-style training, which [`crate::train::Trainer`] runs when
//!   [`crate::train::TrainConfig::distributed`] is set.
mod ffi;
mod group;

pub mod data_parallel;
pub mod launch;

pub use group::{ProcessGroup, ReduceOp, Rendezvous, DEFAULT_TIMEOUT, MAX_WORLD_SIZE};

/// Whether this build has the c10d bridge (Linux, against a libtorch with c10d's headers).
pub fn available() -> bool {
    cfg!(distill_c10d)
}
