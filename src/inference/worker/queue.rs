//! The waiting requests: round-robin across conversations, each told its place in line.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::inference::{CancelToken, GenerationEvent, GenerationRequest};

pub(super) struct Pending {
    pub(super) req: GenerationRequest,
    pub(super) tx: UnboundedSender<GenerationEvent>,
    pub(super) cancel: CancelToken,
    pub(super) position: Arc<AtomicUsize>,
    pub(super) submitted: Instant,
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) per_conversation: HashMap<String, VecDeque<Pending>>,
    /// Conversations with waiting requests, in the order they will be served next.
    pub(super) order: VecDeque<String>,
    pub(super) waiting: usize,
    pub(super) paused: bool,
    pub(super) shutdown: bool,
    pub(super) serial: u64,
}

impl Queue {
    pub(super) fn pop(&mut self) -> Option<Pending> {
        let conv = self.order.pop_front()?;
        let list = self.per_conversation.get_mut(&conv)?;
        let p = list.pop_front();
        if list.is_empty() {
            self.per_conversation.remove(&conv);
        } else {
            // Round-robin: this conversation's next request waits behind the others.
            self.order.push_back(conv);
        }
        if p.is_some() {
            self.waiting -= 1;
        }
        p
    }

    /// Tells every waiting request its place in the round-robin serving order.
    pub(super) fn reposition(&self) {
        let mut place = 0;
        let mut round = 0;
        loop {
            let mut any = false;
            for conv in &self.order {
                if let Some(p) = self.per_conversation.get(conv).and_then(|l| l.get(round)) {
                    any = true;
                    place += 1;
                    if p.position.swap(place, Ordering::AcqRel) != place {
                        let _ = p.tx.send(GenerationEvent::Queued { position: place });
                    }
                }
            }
            if !any {
                break;
            }
            round += 1;
        }
    }
}

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
