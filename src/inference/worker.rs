//! The worker thread and its scheduler: round-robin across conversations, a bounded queue,
//! cancellation, and each recent conversation's attention cache kept for its next turn.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::loader::LoadedModel;
use super::model::{LlamaModel, SeqCache};
use super::stop::{Scan, StopScanner};
use super::{
    CancelToken, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest,
    GenerationResult, WorkerError,
};
use crate::prompt::TextTokenizer;

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
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            kv_cache_budget_bytes: 1 << 30,
            prefill_chunk: 512,
            context_length: 4096,
            start_paused: false,
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
    current: Option<CancelToken>,
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
}

impl Shared {
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
    description: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

impl Inner {
    fn shutdown_now(&self) {
        {
            let mut q = self.shared.lock();
            q.shutdown = true;
            if let Some(c) = &q.current {
                c.cancel();
            }
        }
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
        });
        let tokenizer = loaded.tokenizer.clone();
        let description = format!("{} ({:?})", loaded.source.display(), loaded.format);
        let bytes_per_token = loaded.model.shape.kv_bytes_per_token(loaded.model.dtype()) as u64;
        let mut state = State {
            model: loaded.model,
            tokenizer: loaded.tokenizer,
            eos: loaded.eos_ids,
            caches: CachePool::new(opts.kv_cache_budget_bytes, bytes_per_token),
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
                description,
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

    /// The context window requests must fit in.
    pub fn context_length(&self) -> usize {
        self.inner.context_length
    }

    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// Requests waiting (not counting the one running).
    pub fn waiting(&self) -> usize {
        self.inner.shared.lock().waiting
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
    bytes_per_token: u64,
}

impl CachePool {
    fn new(budget: u64, bytes_per_token: u64) -> Self {
        Self {
            entries: HashMap::new(),
            tick: 0,
            budget,
            bytes_per_token: bytes_per_token.max(1),
        }
    }

    fn take(&mut self, conv: &str) -> Option<SeqCache> {
        self.entries.remove(conv).map(|(c, _)| c)
    }

    fn put(&mut self, conv: String, cache: SeqCache) {
        if cache.is_empty() || cache.len() as u64 * self.bytes_per_token > self.budget {
            return;
        }
        self.tick += 1;
        self.entries.insert(conv, (cache, self.tick));
        while self.used() > self.budget {
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
        self.entries
            .values()
            .map(|(c, _)| c.len() as u64 * self.bytes_per_token)
            .sum()
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

impl State {
    fn serve(&mut self, shared: &Shared) {
        loop {
            let (pending, serial) = {
                let mut q = shared.lock();
                loop {
                    if q.shutdown {
                        // Nothing waiting is served after shutdown: say so to each caller.
                        while let Some(p) = q.pop() {
                            p.position.store(0, Ordering::Release);
                            let _ = p.tx.send(GenerationEvent::Finished(cancelled(&p, 0)));
                        }
                        q.current = None;
                        return;
                    }
                    if !q.paused && !q.order.is_empty() {
                        break;
                    }
                    q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                let Some(p) = q.pop() else { continue };
                q.serial += 1;
                q.current = Some(p.cancel.clone());
                q.reposition();
                (p, q.serial)
            };
            pending.position.store(0, Ordering::Release);
            let conv = pending.req.conversation.clone();
            let span = tracing::info_span!("generate", conversation = %conv, serial);
            let _enter = span.enter();
            self.run(pending, serial);
            shared.lock().current = None;
        }
    }

    fn run(&mut self, p: Pending, serial: u64) {
        let queue_time = p.submitted.elapsed();
        if p.cancel.is_cancelled() {
            let _ = p.tx.send(GenerationEvent::Finished(cancelled(&p, 0)));
            return;
        }
        let _ = p.tx.send(GenerationEvent::Started { serial });
        let conv = p.req.conversation.clone();
        let mut cache = self
            .caches
            .take(&conv)
            .unwrap_or_else(|| self.model.new_cache());
        let mut result = GenerationResult {
            text: String::new(),
            finish: FinishReason::Error,
            error: None,
            prompt_tokens: p.req.prompt.len(),
            reused_tokens: 0,
            completion_tokens: 0,
            queue_time,
            prefill_time: Duration::ZERO,
            time_to_first_token: None,
            decode_time: Duration::ZERO,
        };
        match self.generate(&p, &mut cache, &mut result) {
            Ok(()) => {
                tracing::debug!(
                    finish = ?result.finish,
                    prompt = result.prompt_tokens,
                    reused = result.reused_tokens,
                    completion = result.completion_tokens,
                    "generation finished"
                );
                self.caches.put(conv, cache);
            }
            Err(e) => {
                // The cache may be half-updated: drop it, the next turn recomputes.
                tracing::error!(error = %e, "generation failed");
                result.finish = FinishReason::Error;
                result.error = Some(e.to_string());
            }
        }
        let _ = p.tx.send(GenerationEvent::Finished(result));
    }

    fn generate(
        &mut self,
        p: &Pending,
        cache: &mut SeqCache,
        out: &mut GenerationResult,
    ) -> candle_core::Result<()> {
        let start = Instant::now();
        let prompt = &p.req.prompt;
        let ctx = self.context_length;
        if prompt.len() >= ctx {
            candle_core::bail!(
                "prompt of {} tokens does not fit the context of {ctx}",
                prompt.len()
            );
        }
        let max_new = p.req.max_new_tokens.min(ctx - prompt.len());

        // Reuse the cached prefix; always recompute at least the last prompt token.
        let common = cache
            .tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let reuse = common.min(prompt.len() - 1);
        cache.truncate(reuse)?;
        out.reused_tokens = reuse;
        let mut logits = None;
        for piece in prompt[reuse..].chunks(self.prefill_chunk) {
            if p.cancel.is_cancelled() {
                out.finish = FinishReason::Cancelled;
                out.prefill_time = start.elapsed();
                return Ok(());
            }
            logits = Some(self.model.forward(piece, cache)?);
        }
        out.prefill_time = start.elapsed();
        let Some(mut logits) = logits else {
            candle_core::bail!("empty prompt");
        };

        let mut sampler = p.req.sampling.processor();
        let mut scanner = StopScanner::new(&p.req.stop);
        let mut decoder = self.tokenizer.inner().decode_stream(true);
        let mut context: Vec<u32> = prompt.clone();
        let decode_start = Instant::now();
        let finish = loop {
            if p.cancel.is_cancelled() {
                break FinishReason::Cancelled;
            }
            let rp = p.req.sampling.repetition_penalty;
            if (rp - 1.0).abs() > f32::EPSILON {
                let from = context.len().saturating_sub(p.req.sampling.repeat_last_n);
                logits = candle_transformers::utils::apply_repeat_penalty(
                    &logits,
                    rp,
                    &context[from..],
                )?;
            }
            let token = sampler.sample(&logits)?;
            out.completion_tokens += 1;
            if out.time_to_first_token.is_none() {
                out.time_to_first_token = Some(start.elapsed());
            }
            if self.eos.contains(&token) {
                break FinishReason::Eos;
            }
            context.push(token);
            let piece = decoder
                .step(token)
                .map_err(|e| candle_core::Error::Msg(format!("decoding token {token}: {e}")))?;
            if let Some(piece) = piece {
                match scanner.push(&piece) {
                    Scan::Emit(text) => {
                        if !text.is_empty() && p.tx.send(GenerationEvent::Delta(text)).is_err() {
                            // Nobody listens any more.
                            break FinishReason::Cancelled;
                        }
                    }
                    Scan::Stop(text) => {
                        if !text.is_empty() {
                            let _ = p.tx.send(GenerationEvent::Delta(text));
                        }
                        break FinishReason::Stop;
                    }
                }
            }
            if out.completion_tokens >= max_new || cache.len() + 1 >= ctx {
                break FinishReason::Length;
            }
            logits = self.model.forward(&[token], cache)?;
        };
        if matches!(finish, FinishReason::Eos | FinishReason::Length) {
            let rest = scanner.finish();
            if !rest.is_empty() {
                let _ = p.tx.send(GenerationEvent::Delta(rest));
            }
        }
        out.decode_time = decode_start.elapsed();
        out.text = scanner.text().to_string();
        out.finish = finish;
        Ok(())
    }
}

fn cancelled(p: &Pending, reused: usize) -> GenerationResult {
    GenerationResult {
        text: String::new(),
        finish: FinishReason::Cancelled,
        error: None,
        prompt_tokens: p.req.prompt.len(),
        reused_tokens: reused,
        completion_tokens: 0,
        queue_time: p.submitted.elapsed(),
        prefill_time: Duration::ZERO,
        time_to_first_token: None,
        decode_time: Duration::ZERO,
    }
}
