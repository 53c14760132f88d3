//! `distill train --nproc N`: N local processes of the same command, launched the way `torchrun
//! --standalone` does (each gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::group::MAX_WORLD_SIZE;
use crate::{Error, Result};

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it), for a local rendezvous.
/// Prefer [`local_listener`] where the socket can be handed to rank 0: this port can be taken before it is used.
pub fn free_local_port() -> Result<u16> {
    Ok(local_listener()?.1)
}

/// A socket listening on a port of 127.0.0.1 that the OS picked, with that port: handed to rank 0 as
/// [`Rendezvous::listen_fd`](super::Rendezvous::listen_fd), it keeps the port taken from the moment it is chosen.
pub fn local_listener() -> Result<(TcpListener, u16)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::Distributed(format!("no free local port for the rendezvous: {e}")))?;
    let port = listener.local_addr().map_err(|e| Error::Distributed(e.to_string()))?.port();
    Ok((listener, port))
}

/// Runs `make_command(rank)` for ranks `0..nproc` as child processes joined by a rendezvous on `127.0.0.1`, and
/// waits for all of them. When one fails, the others get `grace` to fail on their own (their next collective
/// reports the lost peer) and are then killed. Returns the first failure's status, or success.
///
/// The rendezvous port is bound here and its listening socket inherited by rank 0 (`DISTILL_MASTER_LISTEN_FD`),
/// as torchrun hands its agent's store socket over, so no other process can take the port before rank 0 serves
/// on it.
pub fn run_local(nproc: usize, grace: Duration, mut make_command: impl FnMut(usize) -> Command) -> Result<ExitStatus> {
    if nproc == 0 || nproc > MAX_WORLD_SIZE {
        return Err(Error::invalid("--nproc", format!("{nproc} must lie in 1..={MAX_WORLD_SIZE}")));
    }
    let (listener, port) = local_listener()?;
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut command = make_command(rank);
        command
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env_remove("DISTILL_MASTER_LISTEN_FD");
        if rank == 0 {
            inherit_socket(&mut command, &listener);
        }
        match command.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::Distributed(format!("could not start rank {rank}: {e}")));
            }
        }
    }
    // Rank 0 holds its own copy of the socket now.
    drop(listener);
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut failed_at: Option<Instant> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait() {
                Ok(Some(status)) => {
                    let (rank, _) = children.swap_remove(i);
                    if !status.success() && first_failure.is_none() {
                        first_failure = Some((rank, status));
                        failed_at = Some(Instant::now());
                    }
                }
                Ok(None) => i += 1,
                Err(e) => {
                    kill_all(&mut children);
                    return Err(Error::Distributed(format!("waiting for the ranks: {e}")));
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            kill_all(&mut children);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match first_failure {
        Some((rank, status)) => {
            eprintln!("distill: rank {rank} of {nproc} failed ({status}); the other ranks were stopped");
            Ok(status)
        }
        None => Ok(ExitStatus::default()),
    }
}

fn kill_all(children: &mut Vec<(usize, Child)>) {
    for (_, child) in children.iter_mut() {
        let _ = child.kill();
    }
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
    children.clear();
}

/// Lets `command`'s process inherit `listener` (Rust opens every socket close-on-exec) and tells it the
/// descriptor's number.
#[cfg(unix)]
fn inherit_socket(command: &mut Command, listener: &TcpListener) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    command.env("DISTILL_MASTER_LISTEN_FD", fd.to_string());
    // SAFETY: between fork and exec only fcntl runs, which is async-signal-safe, on a descriptor this process owns.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Elsewhere rank 0 binds the port itself, a moment after it was found free.
#[cfg(not(unix))]
fn inherit_socket(_command: &mut Command, _listener: &TcpListener) {}
