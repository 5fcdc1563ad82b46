//! The inference thread's loop: take requests as batch room allows, prefill in chunks, decode
//! every active sequence in one pass, sample, stream text, and finish each request once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::cache_pool::CachePool;
use super::queue::{Pending, Shared};
use crate::inference::model::{BatchItem, LlamaModel, SeqCache};
use crate::inference::stop::{Scan, StopScanner, TextStream};
use crate::inference::tokenizer::TextTokenizer;
use crate::inference::{FinishReason, GenerationEvent, GenerationResult};

pub(super) struct State {
    pub(super) model: LlamaModel,
    pub(super) tokenizer: Arc<TextTokenizer>,
    pub(super) eos: Vec<u32>,
    pub(super) caches: CachePool,
    pub(super) context_length: usize,
    pub(super) prefill_chunk: usize,
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
    sampler: crate::inference::sampling::Sampler,
    stream: TextStream,
    scanner: StopScanner,
    max_new: usize,
    started: Instant,
    decode_started: Option<Instant>,
    result: GenerationResult,
    finish: Option<FinishReason>,
}

impl State {
    pub(super) fn serve(&mut self, shared: &Shared) {
        let started = Instant::now();
        match self.model.warm_up() {
            Ok(()) => tracing::info!(ms = started.elapsed().as_millis() as u64, "model warmed up"),
            Err(e) => tracing::warn!(error = %e, "warm-up forward failed"),
        }
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
                            let _ = p.tx.send(GenerationEvent::Finished(
                                p.empty_result(FinishReason::Cancelled),
                            ));
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
            let _ = p.tx.send(GenerationEvent::Finished(
                p.empty_result(FinishReason::Cancelled),
            ));
            return None;
        }
        let mut result = p.empty_result(FinishReason::Length);
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
            sampler: crate::inference::sampling::Sampler::new(&p.req.sampling),
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
        let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let token = a.sampler.sample(logits, &a.context);
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
