//! A process group on c10d's Gloo backend, and the rendezvous that forms it.
use std::time::Duration;

use tch::Tensor;

use super::ffi::{self, check, RawGroup, RawStore};
use crate::{Error, Result};

/// How a process finds its peers: the variables `torchrun` sets (`MASTER_ADDR`, `MASTER_PORT`, `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`), and how long to wait for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Host of rank 0, which serves the rendezvous (c10d's TCPStore).
    pub master_addr: String,
    /// Port of that store on `master_addr`.
    pub master_port: u16,
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes of this machine (picks the GPU when there are several).
    pub local_rank: usize,
    /// How long to wait for peers to join and for any one collective to complete.
    pub timeout: Duration,
    /// For rank 0: a socket already listening on `master_port`, which its store then serves on instead of binding
    /// the port itself (c10d's `masterListenFd`). A launcher that binds the port and hands the socket over leaves
    /// no moment in which another process could take the port; `distill train --nproc` does so through
    /// `DISTILL_MASTER_LISTEN_FD`. The store takes ownership of the descriptor and closes it.
    pub listen_fd: Option<i32>,
}

/// The default [`Rendezvous::timeout`]: 10 minutes (PyTorch's is 30).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The most ranks one run accepts: more is a typo in `WORLD_SIZE`.
pub const MAX_WORLD_SIZE: usize = 1 << 16;

impl Rendezvous {
    /// A rendezvous of `world_size` processes on this machine, served by rank 0 at `127.0.0.1:port`.
    pub fn local(rank: usize, world_size: usize, port: u16) -> Rendezvous {
        Rendezvous { master_addr: "127.0.0.1".into(), master_port: port, rank, world_size, local_rank: rank, timeout: DEFAULT_TIMEOUT, listen_fd: None }
    }

    /// The rendezvous of every rank of a `world_size` world on this machine, in rank order: one local port, bound
    /// here and handed to rank 0 as its [`Rendezvous::listen_fd`], so no other process can take it before rank 0's
    /// store serves on it. For ranks run as threads of one process (tests, benchmarks); `distill train --nproc`
    /// hands the socket to a child process instead. Rank 0's rendezvous owns the descriptor: pass it to
    /// [`ProcessGroup::new`](super::ProcessGroup::new), which closes it.
    ///
    /// ```
    /// let ranks = distill::distributed::Rendezvous::local_world(2, std::time::Duration::from_secs(60))?;
    /// assert_eq!((ranks[1].rank, ranks[1].master_port), (1, ranks[0].master_port));
    /// assert!(ranks[0].listen_fd.is_some() && ranks[1].listen_fd.is_none());
    /// # Ok::<(), distill::Error>(())
    /// ```
    pub fn local_world(world_size: usize, timeout: Duration) -> Result<Vec<Rendezvous>> {
        use std::os::fd::IntoRawFd;
        if world_size == 0 || world_size > MAX_WORLD_SIZE {
            return Err(Error::Distributed(format!("a world of {world_size} ranks: it needs 1 to {MAX_WORLD_SIZE}")));
        }
        let (listener, port) = super::launch::local_listener()?;
        let mut listener = Some(listener);
        Ok((0..world_size)
            .map(|rank| {
                let listen_fd = if rank == 0 { listener.take().map(|l| l.into_raw_fd()) } else { None };
                Rendezvous { timeout, listen_fd, ..Rendezvous::local(rank, world_size, port) }
            })
            .collect())
    }

    /// Reads the launch variables `torchrun` sets. `None` when neither `RANK` nor `WORLD_SIZE` is set (a plain
    /// single-process run); an error when they are inconsistent or incomplete. `DISTILL_DIST_TIMEOUT` (seconds)
    /// overrides the default timeout.
    pub fn from_env() -> Result<Option<Rendezvous>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Rendezvous::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
        let (rank, world) = (var("RANK"), var("WORLD_SIZE"));
        if rank.is_none() && world.is_none() {
            return Ok(None);
        }
        let number = |name: &str, value: Option<String>| -> Result<usize> {
            let value = value.ok_or_else(|| {
                Error::Distributed(format!("{name} is not set: a distributed launch sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun does)"))
            })?;
            value.trim().parse().map_err(|_| Error::Distributed(format!("{name}={value:?} is not a non-negative integer")))
        };
        let world_size = number("WORLD_SIZE", world)?;
        let rank = number("RANK", rank)?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        let master_addr = var("MASTER_ADDR").filter(|a| !a.trim().is_empty()).ok_or_else(|| {
            Error::Distributed("MASTER_ADDR is not set: give the host of rank 0 (for one machine, 127.0.0.1)".into())
        })?;
        let port = var("MASTER_PORT").ok_or_else(|| Error::Distributed("MASTER_PORT is not set: give a free port on MASTER_ADDR (torchrun uses 29500)".into()))?;
        let master_port = match port.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(Error::Distributed(format!("MASTER_PORT={port:?} is not a port number in 1..=65535"))),
        };
        let timeout = match var("DISTILL_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Duration::from_secs_f64(s),
                _ => return Err(Error::Distributed(format!("DISTILL_DIST_TIMEOUT={v:?} must be a number of seconds in (0, 86400]"))),
            },
        };
        let listen_fd = match var("DISTILL_MASTER_LISTEN_FD") {
            None => None,
            Some(v) => match v.trim().parse::<i32>() {
                Ok(fd) if fd >= 0 => Some(fd),
                _ => return Err(Error::Distributed(format!("DISTILL_MASTER_LISTEN_FD={v:?} is not a file descriptor"))),
            },
        };
        let rendezvous = Rendezvous { master_addr: master_addr.trim().to_string(), master_port, rank, world_size, local_rank, timeout, listen_fd };
        rendezvous.check()?;
        Ok(Some(rendezvous))
    }

    /// Refuses a rank outside the world, an empty or oversized world and a zero timeout.
    pub fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.world_size > MAX_WORLD_SIZE {
            return Err(Error::Distributed(format!("WORLD_SIZE={} must lie in 1..={MAX_WORLD_SIZE}", self.world_size)));
        }
        if self.rank >= self.world_size {
            return Err(Error::Distributed(format!(
                "RANK={} is outside WORLD_SIZE={}: ranks run from 0 to {}",
                self.rank,
                self.world_size,
                self.world_size - 1
            )));
        }
        if self.master_addr.contains('\0') || self.master_addr.is_empty() {
            return Err(Error::Distributed(format!("MASTER_ADDR={:?} is not a host name", self.master_addr)));
        }
        if self.timeout.is_zero() {
            return Err(Error::Distributed("the timeout must be positive".into()));
        }
        if self.listen_fd.is_some() && self.rank != 0 {
            return Err(Error::Distributed(format!("rank {} was handed a listening socket (DISTILL_MASTER_LISTEN_FD): only rank 0 serves the rendezvous", self.rank)));
        }
        Ok(())
    }
}

/// How [`ProcessGroup::all_reduce`] combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise product.
    Product,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
}

/// The processes of one distributed run, joined through c10d (a TCPStore served by rank 0, and Gloo for the
/// collectives). Every collective must be called by every rank in the same order, as in PyTorch.
///
/// ```no_run
/// use distill::distributed::{ProcessGroup, ReduceOp, Rendezvous};
/// # fn main() -> distill::Result<()> {
/// // Under torchrun (or `distill train --nproc 2`), each process reads its rank from the environment.
/// let rendezvous = Rendezvous::from_env()?.expect("launched by torchrun");
/// let group = ProcessGroup::new(&rendezvous)?;
/// let mut t = tch::Tensor::from_slice(&[group.rank() as f32]);
/// group.all_reduce(&mut t, ReduceOp::Sum)?; // 0 + 1 + ... on every rank
/// # Ok(()) }
/// ```
pub struct ProcessGroup {
    group: *mut RawGroup,
    store: *mut RawStore,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    timeout: Duration,
}

// SAFETY: c10d's process group and store may be used from any thread (one call at a time, which &mut-free
// collectives on a single owner guarantee only in order; c10d serializes them internally).
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessGroup(gloo, rank {} of {})", self.rank, self.world_size)
    }
}

impl ProcessGroup {
    /// Joins the run: rank 0 serves the rendezvous store at `master_addr:master_port`, every rank connects to
    /// it and to every other rank. Waits up to `timeout` for the others; an address nobody serves, a port in
    /// use or a rank claimed twice is an error, never a hang.
    pub fn new(rendezvous: &Rendezvous) -> Result<ProcessGroup> {
        rendezvous.check()?;
        let Rendezvous { master_addr, master_port, rank, world_size, local_rank, timeout, listen_fd } = rendezvous;
        let host = std::ffi::CString::new(master_addr.as_str()).map_err(|_| Error::Distributed("MASTER_ADDR holds a NUL byte".into()))?;
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let mut store = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the bridge catches every C++ exception.
        check(
            unsafe { ffi::distill_c10d_tcp_store(host.as_ptr(), *master_port, *world_size as i32, (*rank == 0) as i32, listen_fd.unwrap_or(-1), timeout_ms, &mut store) },
            &format!("rank {rank} could not join the rendezvous at {master_addr}:{master_port} (rank 0 serves it; check MASTER_ADDR, MASTER_PORT and that rank 0 runs)"),
        )?;
        let mut group =
            ProcessGroup { group: std::ptr::null_mut(), store, rank: *rank, world_size: *world_size, local_rank: *local_rank, timeout: *timeout };
        if group.store_add(&format!("distill/rank/{rank}"), 1)? != 1 {
            return Err(Error::Distributed(format!("two processes claim RANK={rank}: give each process its own rank in 0..{world_size}")));
        }
        // Every rank publishes its WORLD_SIZE; rank 0 checks everyone's and the others check rank 0's, so a
        // mismatch fails at once instead of when Gloo gives up waiting for a rank that will never come.
        group.store_set(&format!("distill/world_size/{rank}"), *world_size as i64)?;
        let peers: Vec<usize> = if *rank == 0 { (1..*world_size).collect() } else { vec![0] };
        for peer in peers {
            let theirs = group.store_get(&format!("distill/world_size/{peer}")).map_err(|e| {
                Error::Distributed(format!("rank {peer} did not join within {:.0} s ({e}): check that all {world_size} processes run, with the same MASTER_ADDR and MASTER_PORT", timeout.as_secs_f64()))
            })?;
            if theirs != *world_size as i64 {
                return Err(Error::Distributed(format!(
                    "rank {peer} was started with WORLD_SIZE={theirs} and rank {rank} with WORLD_SIZE={world_size}: give every process the same WORLD_SIZE"
                )));
            }
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: the store is live and outlives the group (dropped after it).
        check(
            unsafe { ffi::distill_c10d_gloo_group(group.store, *rank as i32, *world_size as i32, timeout_ms, &mut raw) },
            &format!("rank {rank} could not connect to the other {} rank(s) through Gloo", world_size - 1),
        )?;
        group.group = raw;
        Ok(group)
    }

    fn store_add(&self, key: &str, value: i64) -> Result<i64> {
        let key = std::ffi::CString::new(key).map_err(|_| Error::Distributed("a store key holds a NUL byte".into()))?;
        let mut out = 0i64;
        // SAFETY: the store is live; key and out-pointer valid.
        check(unsafe { ffi::distill_c10d_store_add(self.store, key.as_ptr(), value, &mut out) }, "the rendezvous store")?;
        Ok(out)
    }

    fn store_set(&self, key: &str, value: i64) -> Result<()> {
        let key = std::ffi::CString::new(key).map_err(|_| Error::Distributed("a store key holds a NUL byte".into()))?;
        // SAFETY: the store is live; key valid.
        check(unsafe { ffi::distill_c10d_store_set_i64(self.store, key.as_ptr(), value) }, "the rendezvous store")
    }

    /// Waits for `key` up to the timeout.
    fn store_get(&self, key: &str) -> Result<i64> {
        let key = std::ffi::CString::new(key).map_err(|_| Error::Distributed("a store key holds a NUL byte".into()))?;
        let mut out = 0i64;
        // SAFETY: the store is live; key and out-pointer valid.
        check(unsafe { ffi::distill_c10d_store_get_i64(self.store, key.as_ptr(), &mut out) }, "the rendezvous store")?;
        Ok(out)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// This process's rank among those of its machine (`LOCAL_RANK`): which GPU it should use.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Number of processes.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// How long a collective may wait for the others.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Combines `tensor` across ranks in place: afterwards every rank holds the same result.
    pub fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_tensor(tensor, "all_reduce")?;
        let op = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Product => 1,
            ReduceOp::Min => 2,
            ReduceOp::Max => 3,
        };
        self.call("all_reduce", |g| unsafe { ffi::distill_c10d_all_reduce(g, tensor.as_mut_ptr().cast(), op) })
    }

    /// Copies rank `root`'s `tensor` into every rank's `tensor` (same shape and dtype on all ranks).
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_tensor(tensor, "broadcast")?;
        if root >= self.world_size {
            return Err(Error::invalid("broadcast root", format!("{root} is not a rank of this group of {}", self.world_size)));
        }
        self.call("broadcast", |g| unsafe { ffi::distill_c10d_broadcast(g, tensor.as_mut_ptr().cast(), root as i32) })
    }

    /// Every rank's `tensor`, in rank order (each rank passes a tensor of the same shape and dtype).
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        check_tensor(tensor, "all_gather")?;
        let mut input = tensor.shallow_clone();
        let mut outputs = (0..self.world_size).map(|_| tensor.f_empty_like()).collect::<Result<Vec<_>, _>>()?;
        let mut pointers: Vec<*mut std::ffi::c_void> = outputs.iter_mut().map(|t| t.as_mut_ptr().cast()).collect();
        let n = pointers.len();
        self.call("all_gather", |g| unsafe { ffi::distill_c10d_all_gather(g, pointers.as_mut_ptr().cast_const(), n, input.as_mut_ptr().cast()) })?;
        Ok(outputs)
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        self.call("barrier", |g| unsafe { ffi::distill_c10d_barrier(g) })
    }

    /// Batch normalization in training mode over the samples of every rank (PyTorch's `SyncBatchNorm`): each
    /// channel's mean and biased variance are those of all ranks' `input`s together (one all-reduce, in float64),
    /// the running statistics move towards them (unbiased variance, `momentum`) identically on every rank, and the
    /// backward pass sums across ranks what the input's gradient needs, so that each rank's input gradient is the
    /// one a single process holding every rank's samples computes for this rank's samples. The gradients of
    /// `weight` and `bias` stay this rank's, to be averaged with the others' as data-parallel training does.
    /// Exact when every rank's loss is the mean over an equal share of the global batch (as with DDP).
    ///
    /// `input` is `[N, C, ...]` on the CPU, `weight`, `bias` and the running statistics `[C]`. Every rank must
    /// call it at the same point of its forward pass; its backward pass is a collective too.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(&self, input: &Tensor, weight: &Tensor, bias: &Tensor, running_mean: &Tensor, running_var: &Tensor, momentum: f64, eps: f64) -> Result<Tensor> {
        let channels = input.size().get(1).copied().unwrap_or(0);
        if input.dim() < 2 || channels == 0 {
            return Err(Error::Shape(format!("synchronized batch norm needs an input of [N, C, ...], not {:?}", input.size())));
        }
        for (name, t) in [("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)] {
            if t.size() != [channels] {
                return Err(Error::Shape(format!("synchronized batch norm: {name} is {:?} for {channels} channels", t.size())));
            }
        }
        if input.device() != tch::Device::Cpu {
            return Err(Error::invalid("synchronized batch norm", format!("the input is on {:?}: Gloo reduces CPU tensors (NCCL is not bridged yet)", input.device())));
        }
        let (mut x, mut w, mut b, mut m, mut v) = (input.f_contiguous()?, weight.shallow_clone(), bias.shallow_clone(), running_mean.shallow_clone(), running_var.shallow_clone());
        let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
        self.call("synchronized batch norm", |g| unsafe {
            ffi::distill_c10d_sync_batch_norm(g, x.as_mut_ptr().cast(), w.as_mut_ptr().cast(), b.as_mut_ptr().cast(), m.as_mut_ptr().cast(), v.as_mut_ptr().cast(), momentum, eps, &mut out)
        })?;
        // SAFETY: on success the bridge stored a new heap-allocated at::Tensor, whose ownership passes to tch here.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }

    fn call(&self, what: &str, f: impl FnOnce(*mut RawGroup) -> *mut std::ffi::c_char) -> Result<()> {
        check(
            f(self.group),
            &format!("{what} on rank {} of {} failed (another rank may have stopped; its own output says why)", self.rank, self.world_size),
        )
    }

}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: each pointer is either null or owned by self; the group goes before the store it uses.
        unsafe {
            if !self.group.is_null() {
                ffi::distill_c10d_free_group(self.group);
            }
            if !self.store.is_null() {
                ffi::distill_c10d_free_store(self.store);
            }
        }
    }
}

/// Gloo reads and writes a tensor's memory directly: it must be dense and contiguous.
fn check_tensor(tensor: &Tensor, what: &str) -> Result<()> {
    if !tensor.defined() {
        return Err(Error::invalid(what, "the tensor is undefined"));
    }
    if !tensor.is_contiguous() {
        return Err(Error::invalid(what, format!("the tensor of shape {:?} is not contiguous: pass `.contiguous()`", tensor.size())));
    }
    if tensor.is_sparse() {
        return Err(Error::invalid(what, "sparse tensors are not supported"));
    }
    Ok(())
}
