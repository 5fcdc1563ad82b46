//! The waiting requests of either backend: round-robin across conversations, each told its
//! place in line.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use std::time::Duration;

use tokio::sync::mpsc::unbounded_channel;

use super::{
    CancelToken, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest,
    GenerationResult,
};

pub(crate) struct Pending {
    pub(crate) req: GenerationRequest,
    pub(crate) tx: UnboundedSender<GenerationEvent>,
    pub(crate) cancel: CancelToken,
    pub(crate) position: Arc<AtomicUsize>,
    pub(crate) submitted: Instant,
}

impl Pending {
    /// A request ready to queue, and the caller's handle to it.
    pub(crate) fn new(req: GenerationRequest) -> (Pending, GenerationHandle) {
        let (tx, rx) = unbounded_channel();
        let cancel = CancelToken::default();
        let position = Arc::new(AtomicUsize::new(0));
        let handle = GenerationHandle {
            events: rx,
            cancel: cancel.clone(),
            position: position.clone(),
        };
        let pending = Pending {
            req,
            tx,
            cancel,
            position,
            submitted: Instant::now(),
        };
        (pending, handle)
    }

    /// The record of this request with nothing generated (yet), ending as `finish`.
    pub(crate) fn empty_result(&self, finish: FinishReason) -> GenerationResult {
        GenerationResult {
            text: String::new(),
            tokens: Vec::new(),
            finish,
            error: None,
            prompt_tokens: self.req.prompt.len(),
            reused_tokens: 0,
            completion_tokens: 0,
            queue_time: self.submitted.elapsed(),
            prefill_time: Duration::ZERO,
            time_to_first_token: None,
            decode_time: Duration::ZERO,
            failure: None,
        }
    }
}

#[derive(Default)]
pub(crate) struct Queue {
    pub(crate) per_conversation: HashMap<String, VecDeque<Pending>>,
    /// Conversations with waiting requests, in the order they will be served next.
    pub(crate) order: VecDeque<String>,
    pub(crate) waiting: usize,
    pub(crate) paused: bool,
    pub(crate) shutdown: bool,
    pub(crate) serial: u64,
}

impl Queue {
    /// Adds a request behind its conversation's earlier ones and tells everyone their place.
    pub(crate) fn push(&mut self, pending: Pending) {
        let conv = pending.req.conversation.clone();
        let list = self.per_conversation.entry(conv.clone()).or_default();
        list.push_back(pending);
        if list.len() == 1 {
            self.order.push_back(conv);
        }
        self.waiting += 1;
        self.reposition();
    }

    pub(crate) fn pop(&mut self) -> Option<Pending> {
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
    pub(crate) fn reposition(&self) {
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
