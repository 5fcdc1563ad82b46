//! The local worker's side of the queue: the lock and wake-up its thread waits on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub(super) use crate::inference::queue::{Pending, Queue};

pub(super) struct Shared {
    pub(super) queue: Mutex<Queue>,
    pub(super) wake: Condvar,
    pub(super) max_batch: AtomicUsize,
    /// Milliseconds since `epoch` when the thread last made progress or woke from waiting.
    pub(super) heartbeat: std::sync::atomic::AtomicU64,
    pub(super) epoch: Instant,
}

impl Shared {
    pub(super) fn beat(&self) {
        self.heartbeat
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent: keep serving.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}
