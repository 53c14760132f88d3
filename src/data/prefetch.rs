//! Ordered parallel production with a bounded read-ahead: what a streaming dataset uses to decode the next
//! batches while the model trains on the current one.
//!
//! Job `j` of `0..total` goes to worker `j mod threads`; each worker sends its results through a channel of
//! `depth` slots and blocks when they are full, so at most `threads × depth` results wait in memory. The consumer
//! reads the channels round-robin, which returns the results in job order whatever the threads' timing. Dropping
//! the [`Prefetch`] closes the channels: each worker stops after the job in hand, and the drop waits for it.
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{Error, Result};

pub(crate) struct Prefetch<T> {
    receivers: Vec<Receiver<T>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Starts `threads` workers (at least 1, at most `total`) computing `produce(j)` for every job `j < total`.
    pub(crate) fn spawn(total: usize, threads: usize, depth: usize, produce: impl Fn(usize) -> T + Send + Sync + 'static) -> Self {
        let produce = Arc::new(produce);
        let threads = threads.clamp(1, total.max(1));
        let (mut receivers, mut workers) = (Vec::with_capacity(threads), Vec::with_capacity(threads));
        for first in 0..threads {
            let (sender, receiver) = sync_channel(depth.max(1));
            let produce = produce.clone();
            workers.push(std::thread::spawn(move || {
                for job in (first..total).step_by(threads) {
                    if sender.send(produce(job)).is_err() {
                        return;
                    }
                }
            }));
            receivers.push(receiver);
        }
        Prefetch { receivers, workers, next: 0, total }
    }

    /// The next result in job order; `None` after the last.
    pub(crate) fn next(&mut self) -> Option<Result<T>> {
        if self.next >= self.total {
            return None;
        }
        let received = self.receivers[self.next % self.receivers.len()].recv();
        self.next += 1;
        Some(received.map_err(|_| Error::invalid("data loading", "a loading thread stopped before its work was done (it panicked)")))
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        self.receivers.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_come_in_job_order_and_read_ahead_is_bounded() {
        // Later jobs finish first; the order is still 0, 1, 2, ...
        let mut p = Prefetch::spawn(9, 3, 1, |j| {
            std::thread::sleep(std::time::Duration::from_millis(((9 - j) * 3) as u64));
            j * 10
        });
        let got: Vec<usize> = std::iter::from_fn(|| p.next()).map(|r| r.unwrap()).collect();
        assert_eq!(got, (0..9).map(|j| j * 10).collect::<Vec<_>>());
        // With nobody reading, each of 2 workers computes its job in hand plus `depth` = 2 queued ones: 6 of 100.
        let started = Arc::new(AtomicUsize::new(0));
        let counter = started.clone();
        let p = Prefetch::spawn(100, 2, 2, move |j| {
            counter.fetch_add(1, Ordering::SeqCst);
            j
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(started.load(Ordering::SeqCst), 6);
        drop(p);
        assert_eq!(started.load(Ordering::SeqCst), 6, "dropping stops the workers");
    }

    #[test]
    fn a_panicking_worker_is_an_error_not_a_hang() {
        let mut p = Prefetch::spawn(4, 2, 1, |j| if j == 1 { panic!("worker") } else { j });
        assert_eq!(p.next().unwrap().unwrap(), 0);
        assert!(p.next().unwrap().unwrap_err().to_string().contains("loading thread stopped"));
    }
}
