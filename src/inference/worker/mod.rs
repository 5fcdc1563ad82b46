//! The worker: one thread that owns the model, and the handle every caller shares. Requests
//! wait in a bounded round-robin queue (`queue.rs`), run in the thread's loop (`step.rs`), and
//! leave each conversation's attention cache for its next turn (`cache_pool.rs`).

mod cache_pool;
mod queue;
mod step;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::load::LoadedModel;
use super::tokenizer::TextTokenizer;
use super::{GenerationHandle, GenerationRequest, WorkerError};
use cache_pool::CachePool;
use queue::{Pending, Queue, Shared};
use step::State;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Requests that may wait; more are refused as busy.
    pub queue_capacity: usize,
    /// Memory for conversations' attention caches kept between turns.
    pub kv_cache_budget_bytes: u64,
    /// Prompt tokens computed per step; cancellation is checked between steps.
    pub prefill_chunk: usize,
    /// Context window (clamped to the model's own).
    pub context_length: usize,
    /// Start without serving until [`LocalWorker::resume`]; lets tests line up a queue.
    pub start_paused: bool,
    /// Sequences decoded together in one pass over the weights; 1 turns batching off.
    pub max_batch: usize,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            kv_cache_budget_bytes: 1 << 30,
            prefill_chunk: 512,
            context_length: 4096,
            start_paused: false,
            max_batch: 8,
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tokenizer: Arc<TextTokenizer>,
    context_length: usize,
    capacity: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

impl Inner {
    fn shutdown_now(&self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// Handle to the in-process inference worker; clones share it. The thread ends with the last
/// clone.
#[derive(Clone)]
pub struct LocalWorker {
    inner: Arc<Inner>,
}

impl LocalWorker {
    pub fn spawn(loaded: LoadedModel, opts: WorkerOptions) -> LocalWorker {
        let context_length = opts.context_length.min(loaded.model.shape.max_position);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                paused: opts.start_paused,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            max_batch: AtomicUsize::new(opts.max_batch.max(1)),
            heartbeat: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let tokenizer = loaded.tokenizer.clone();
        let mut state = State {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            eos: loaded.eos_ids,
            caches: CachePool::new(opts.kv_cache_budget_bytes),
            context_length,
            prefill_chunk: opts.prefill_chunk.max(1),
        };
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || state.serve(&thread_shared))
            .ok();
        if thread.is_none() {
            tracing::error!("could not start the inference thread");
        }
        LocalWorker {
            inner: Arc::new(Inner {
                shared,
                thread: Mutex::new(thread),
                tokenizer,
                context_length,
                capacity: opts.queue_capacity.max(1),
            }),
        }
    }

    /// Queues a request. Fails at once when the queue is full or the prompt cannot fit.
    pub fn submit(&self, req: GenerationRequest) -> Result<GenerationHandle, WorkerError> {
        if req.prompt.is_empty() {
            return Err(WorkerError::EmptyPrompt);
        }
        if req.prompt.len() >= self.inner.context_length {
            return Err(WorkerError::PromptTooLong {
                tokens: req.prompt.len(),
                context: self.inner.context_length,
            });
        }
        let (pending, handle) = Pending::new(req);
        {
            let mut q = self.inner.shared.lock();
            if q.shutdown
                || self
                    .inner
                    .thread
                    .lock()
                    .map(|t| t.is_none())
                    .unwrap_or(true)
            {
                return Err(WorkerError::Stopped);
            }
            if q.waiting >= self.inner.capacity {
                return Err(WorkerError::Busy { waiting: q.waiting });
            }
            q.push(pending);
        }
        self.inner.shared.wake.notify_one();
        Ok(handle)
    }

    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        self.inner.tokenizer.clone()
    }

    /// Requests waiting for their first token (for metrics).
    pub fn queue_depth(&self) -> usize {
        self.inner.shared.lock().waiting
    }

    /// The context window requests must fit in.
    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    /// How long ago the inference thread last made progress (or woke up idle). A value that keeps
    /// growing means the thread is stuck: the service watchdog stops pinging.
    pub fn since_heartbeat(&self) -> Duration {
        let shared = &self.inner.shared;
        let now = shared.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(shared.heartbeat.load(Ordering::Acquire)))
    }

    /// Changes how many conversations decode together (1 = one at a time), from the next step.
    pub fn set_max_batch(&self, n: usize) {
        self.inner
            .shared
            .max_batch
            .store(n.max(1), Ordering::Release);
        self.inner.shared.wake.notify_all();
    }

    pub fn resume(&self) {
        self.inner.shared.lock().paused = false;
        self.inner.shared.wake.notify_all();
    }

    /// Cancels the running generation and every waiting one, and ends the thread.
    pub fn shutdown(&self) {
        self.inner.shutdown_now();
    }
}
