//! `distill train --nproc N`: N local processes of the same command, launched the way `torchrun
//! --standalone` does (each gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use super::group::MAX_WORLD_SIZE;
use crate::{Error, Result};

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it), for a local rendezvous.
pub fn free_local_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::Distributed(format!("no free local port for the rendezvous: {e}")))?;
    Ok(listener.local_addr().map_err(|e| Error::Distributed(e.to_string()))?.port())
}

/// Runs `make_command(rank)` for ranks `0..nproc` as child processes joined by a rendezvous on `127.0.0.1`, and
/// waits for all of them. When one fails, the others get `grace` to fail on their own (their next collective
/// reports the lost peer) and are then killed. Returns the first failure's status, or success.
pub fn run_local(nproc: usize, grace: Duration, mut make_command: impl FnMut(usize) -> Command) -> Result<ExitStatus> {
    if nproc == 0 || nproc > MAX_WORLD_SIZE {
        return Err(Error::invalid("--nproc", format!("{nproc} must lie in 1..={MAX_WORLD_SIZE}")));
    }
    let port = free_local_port()?;
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut command = make_command(rank);
        command
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        match command.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::Distributed(format!("could not start rank {rank}: {e}")));
            }
        }
    }
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
