//! The worker thread and its scheduler: round-robin across conversations, a bounded queue,
//! cancellation, and each recent conversation's attention cache kept for its next turn.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::load::LoadedModel;
use super::model::{BatchItem, LlamaModel, SeqCache};
use super::stop::{Scan, StopScanner, TextStream};
use super::tokenizer::TextTokenizer;
use super::{
    CancelToken, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest,
    GenerationResult, WorkerError,
};

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
    /// Start without serving until [`Worker::resume`]; lets tests line up a queue.
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

struct Pending {
    req: GenerationRequest,
    tx: UnboundedSender<GenerationEvent>,
    cancel: CancelToken,
    position: Arc<AtomicUsize>,
    submitted: Instant,
}

#[derive(Default)]
struct Queue {
    per_conversation: HashMap<String, VecDeque<Pending>>,
    /// Conversations with waiting requests, in the order they will be served next.
    order: VecDeque<String>,
    waiting: usize,
    paused: bool,
    shutdown: bool,
    serial: u64,
}

impl Queue {
    fn pop(&mut self) -> Option<Pending> {
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
    fn reposition(&self) {
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

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    max_batch: AtomicUsize,
    /// Milliseconds since `epoch` when the thread last made progress or woke from waiting.
    heartbeat: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn beat(&self) {
        self.heartbeat
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent: keep serving.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
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

/// Handle to the one inference worker; clones share it. The thread ends with the last clone.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Inner>,
}

impl Worker {
    pub fn spawn(loaded: LoadedModel, opts: WorkerOptions) -> Worker {
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
        Worker {
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
        let (tx, rx) = unbounded_channel();
        let cancel = CancelToken::default();
        let position = Arc::new(AtomicUsize::new(0));
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
            let conv = req.conversation.clone();
            let pending = Pending {
                req,
                tx,
                cancel: cancel.clone(),
                position: position.clone(),
                submitted: Instant::now(),
            };
            let list = q.per_conversation.entry(conv.clone()).or_default();
            list.push_back(pending);
            if list.len() == 1 {
                q.order.push_back(conv);
            }
            q.waiting += 1;
            q.reposition();
        }
        self.inner.shared.wake.notify_one();
        Ok(GenerationHandle {
            events: rx,
            cancel,
            position,
        })
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

/// Attention caches of recent conversations, evicted least-recently-used over a byte budget.
struct CachePool {
    entries: HashMap<String, (SeqCache, u64)>,
    tick: u64,
    budget: u64,
}

impl CachePool {
    fn new(budget: u64) -> Self {
        Self {
            entries: HashMap::new(),
            tick: 0,
            budget,
        }
    }

    fn take(&mut self, conv: &str) -> Option<SeqCache> {
        self.entries.remove(conv).map(|(c, _)| c)
    }

    /// Keeps a finished conversation's cache; `in_use` is what running sequences hold, which
    /// counts against the same budget.
    fn put(&mut self, conv: String, cache: SeqCache, in_use: u64) {
        if cache.is_empty() || cache.bytes() as u64 + in_use > self.budget {
            return;
        }
        self.tick += 1;
        self.entries.insert(conv, (cache, self.tick));
        while self.used() + in_use > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            tracing::debug!(conversation = %oldest, "evicting attention cache");
            self.entries.remove(&oldest);
        }
    }

    fn used(&self) -> u64 {
        self.entries.values().map(|(c, _)| c.bytes() as u64).sum()
    }
}

struct State {
    model: LlamaModel,
    tokenizer: Arc<TextTokenizer>,
    eos: Vec<u32>,
    caches: CachePool,
    context_length: usize,
    prefill_chunk: usize,
}

/// A generation in progress.
struct Active {
    p: Pending,
    cache: SeqCache,
    /// Next prompt position to compute; the prompt is read in chunks between decode steps.
    cursor: usize,
    /// The token to feed next while decoding.
    next: Option<u32>,
    context: Vec<u32>,
    sampler: candle_transformers::generation::LogitsProcessor,
    stream: TextStream,
    scanner: StopScanner,
    max_new: usize,
    started: Instant,
    decode_started: Option<Instant>,
    result: GenerationResult,
    finish: Option<FinishReason>,
}

impl State {
    fn serve(&mut self, shared: &Shared) {
        let mut active: Vec<Active> = Vec::new();
        loop {
            shared.beat();
            let max_batch = shared.max_batch.load(Ordering::Acquire).max(1);
            let admitted = {
                let mut q = shared.lock();
                loop {
                    if q.shutdown {
                        for a in active.drain(..) {
                            a.p.cancel.cancel();
                            let mut a = a;
                            a.finish = Some(FinishReason::Cancelled);
                            self.complete(a, 0);
                        }
                        // Nothing waiting is served after shutdown: say so to each caller.
                        while let Some(p) = q.pop() {
                            p.position.store(0, Ordering::Release);
                            let _ = p.tx.send(GenerationEvent::Finished(empty_result(
                                &p,
                                FinishReason::Cancelled,
                            )));
                        }
                        return;
                    }
                    if !q.paused && active.len() < max_batch && !q.order.is_empty() {
                        break;
                    }
                    if !active.is_empty() {
                        break;
                    }
                    // Wake now and then even when idle, so the heartbeat shows the thread alive.
                    q = shared
                        .wake
                        .wait_timeout(q, Duration::from_millis(500))
                        .map(|(q, _)| q)
                        .unwrap_or_else(|e| e.into_inner().0);
                    shared.beat();
                }
                // New requests join at this step; round-robin picks which.
                let mut admitted = Vec::new();
                while !q.paused && active.len() + admitted.len() < max_batch {
                    let Some(p) = q.pop() else { break };
                    q.serial += 1;
                    admitted.push((p, q.serial));
                }
                if !admitted.is_empty() {
                    q.reposition();
                }
                admitted
            };
            for (p, serial) in admitted {
                p.position.store(0, Ordering::Release);
                if let Some(a) = self.start(p, serial) {
                    active.push(a);
                }
            }
            if active.is_empty() {
                continue;
            }
            self.step(&mut active);
            let (done, running): (Vec<Active>, Vec<Active>) =
                active.into_iter().partition(|a| a.finish.is_some());
            active = running;
            let in_use: u64 = active.iter().map(|a| a.cache.bytes() as u64).sum();
            for a in done {
                self.complete(a, in_use);
            }
        }
    }

    /// Takes a request on: its conversation's cache, the reusable prefix, its sampler.
    fn start(&mut self, p: Pending, serial: u64) -> Option<Active> {
        let conv = p.req.conversation.clone();
        if p.cancel.is_cancelled() {
            let _ = p.tx.send(GenerationEvent::Finished(empty_result(
                &p,
                FinishReason::Cancelled,
            )));
            return None;
        }
        let mut result = empty_result(&p, FinishReason::Length);
        let _ = p.tx.send(GenerationEvent::Started { serial });
        let span = tracing::debug_span!("generate", conversation = %conv, serial);
        let _enter = span.enter();
        let mut cache = self
            .caches
            .take(&conv)
            .unwrap_or_else(|| self.model.new_cache());
        let prompt = &p.req.prompt;
        result.reused_tokens = cache.reuse_prefix(prompt);
        let max_new = p
            .req
            .max_new_tokens
            .min(self.context_length.saturating_sub(prompt.len()));
        Some(Active {
            cursor: cache.len(),
            cache,
            next: None,
            context: prompt.clone(),
            sampler: p.req.sampling.processor(),
            stream: TextStream::default(),
            scanner: StopScanner::new(&p.req.stop),
            max_new,
            started: Instant::now(),
            decode_started: None,
            result,
            finish: None,
            p,
        })
    }

    /// One pass over the weights for every active sequence: decode steps, plus prompt chunks
    /// (at most `prefill_chunk` prompt tokens per step, so running replies never freeze).
    fn step(&mut self, active: &mut [Active]) {
        for a in active.iter_mut() {
            if a.p.cancel.is_cancelled() {
                a.finish = Some(FinishReason::Cancelled);
            }
        }
        let mut prefill_left = self.prefill_chunk;
        let mut chosen: Vec<(usize, usize, usize)> = Vec::new(); // (index, from, to) of the prompt
        for (i, a) in active.iter().enumerate() {
            if a.finish.is_some() {
                continue;
            }
            if a.next.is_some() {
                chosen.push((i, 0, 0));
            } else if prefill_left > 0 {
                let take = (a.p.req.prompt.len() - a.cursor).min(prefill_left);
                prefill_left -= take;
                chosen.push((i, a.cursor, a.cursor + take));
            }
        }
        if chosen.is_empty() {
            return;
        }
        let decode_tokens: Vec<[u32; 1]> = chosen
            .iter()
            .map(|&(i, _, _)| [active[i].next.unwrap_or_default()])
            .collect();
        let outcome = {
            let mut items = Vec::with_capacity(chosen.len());
            let mut picks = chosen.iter().zip(&decode_tokens).peekable();
            for (i, a) in active.iter_mut().enumerate() {
                let Some(&(&(ci, from, to), one)) = picks.peek() else {
                    break;
                };
                if ci != i {
                    continue;
                }
                picks.next();
                let Active { p, cache, next, .. } = a;
                let tokens: &[u32] = if next.is_some() {
                    one
                } else {
                    &p.req.prompt[from..to]
                };
                items.push(BatchItem { tokens, cache });
            }
            self.model.forward_batch(&mut items)
        };
        let logits = match outcome {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "inference step failed");
                for &(i, _, _) in &chosen {
                    let a = &mut active[i];
                    a.result.error = Some(e.to_string());
                    a.finish = Some(FinishReason::Error);
                    a.cache = self.model.new_cache();
                }
                return;
            }
        };
        for (row, &(i, _, to)) in chosen.iter().enumerate() {
            let a = &mut active[i];
            if a.next.is_none() {
                a.cursor = to;
                if a.cursor < a.p.req.prompt.len() {
                    continue;
                }
                a.result.prefill_time = a.started.elapsed();
                a.decode_started = Some(Instant::now());
            }
            let sampled = logits.get(row).and_then(|l| self.sample(a, l));
            match sampled {
                Ok(()) => {}
                Err(e) => {
                    a.result.error = Some(e.to_string());
                    a.finish = Some(FinishReason::Error);
                }
            }
        }
    }

    /// Picks the next token of one sequence and streams what it adds.
    fn sample(&self, a: &mut Active, logits: candle_core::Tensor) -> candle_core::Result<()> {
        let rp = a.p.req.sampling.repetition_penalty;
        let logits = if (rp - 1.0).abs() > f32::EPSILON {
            let from = a
                .context
                .len()
                .saturating_sub(a.p.req.sampling.repeat_last_n);
            candle_transformers::utils::apply_repeat_penalty(&logits, rp, &a.context[from..])?
        } else {
            logits
        };
        let token = a.sampler.sample(&logits)?;
        a.result.completion_tokens += 1;
        if a.result.time_to_first_token.is_none() {
            a.result.time_to_first_token = Some(a.started.elapsed());
        }
        if self.eos.contains(&token) {
            a.finish = Some(FinishReason::Eos);
            return Ok(());
        }
        a.context.push(token);
        let piece = a
            .stream
            .step(&self.tokenizer, token)
            .map_err(|e| candle_core::Error::Msg(format!("decoding token {token}: {e}")))?;
        if let Some(piece) = piece {
            match a.scanner.push(&piece) {
                Scan::Emit(text) => {
                    if !text.is_empty() && a.p.tx.send(GenerationEvent::Delta(text)).is_err() {
                        // Nobody listens any more.
                        a.finish = Some(FinishReason::Cancelled);
                        return Ok(());
                    }
                }
                Scan::Stop(text) => {
                    if !text.is_empty() {
                        let _ = a.p.tx.send(GenerationEvent::Delta(text));
                    }
                    a.finish = Some(FinishReason::Stop);
                    return Ok(());
                }
            }
        }
        if a.result.completion_tokens >= a.max_new || a.cache.len() + 1 >= self.context_length {
            a.finish = Some(FinishReason::Length);
            return Ok(());
        }
        a.next = Some(token);
        Ok(())
    }

    /// Sends the final record and keeps the conversation's cache for its next turn.
    fn complete(&mut self, mut a: Active, in_use: u64) {
        let finish = a.finish.unwrap_or(FinishReason::Error);
        if matches!(finish, FinishReason::Eos | FinishReason::Length) {
            let rest = a.scanner.finish();
            if !rest.is_empty() {
                let _ = a.p.tx.send(GenerationEvent::Delta(rest));
            }
        }
        if let Some(d) = a.decode_started {
            a.result.decode_time = d.elapsed();
        }
        if a.result.prefill_time.is_zero() {
            a.result.prefill_time = a.started.elapsed();
        }
        a.result.text = a.scanner.text().to_string();
        a.result.tokens = a.context.split_off(a.p.req.prompt.len());
        a.result.finish = finish;
        tracing::debug!(
            conversation = %a.p.req.conversation,
            finish = ?finish,
            prompt = a.result.prompt_tokens,
            reused = a.result.reused_tokens,
            completion = a.result.completion_tokens,
            "generation finished"
        );
        if finish != FinishReason::Error {
            // A cancelled prompt read may stop mid-way: the cache still covers a valid prefix.
            self.caches
                .put(a.p.req.conversation.clone(), a.cache, in_use);
        }
        let _ = a.p.tx.send(GenerationEvent::Finished(a.result));
    }
}

/// The record of a request with nothing generated (yet), ending as `finish`.
fn empty_result(p: &Pending, finish: FinishReason) -> GenerationResult {
    GenerationResult {
        text: String::new(),
        tokens: Vec::new(),
        finish,
        error: None,
        prompt_tokens: p.req.prompt.len(),
        reused_tokens: 0,
        completion_tokens: 0,
        queue_time: p.submitted.elapsed(),
        prefill_time: Duration::ZERO,
        time_to_first_token: None,
        decode_time: Duration::ZERO,
    }
}
