//! One request on the servers, start to finish: an endpoint chosen, busy answers waited out
//! (the user told their place), a context refusal handed back for a smaller prompt, the stream
//! scanned for our stops, and a stream cut mid-reply continued once on another server from the
//! text it had reached, so the user's message simply goes on.

use std::time::{Duration, Instant};

use super::Inner;
use super::client::{self, Chunk, Completion, Refusal};
use super::endpoint::choose;
use crate::inference::queue::Pending;
use crate::inference::stop::{Scan, StopScanner};
use crate::inference::{CancelToken, Failure, FinishReason, GenerationEvent, GenerationResult};

/// Shortest and longest pause between tries while servers answer busy.
const BUSY_PAUSE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(10));

/// How one stream ended.
enum StreamEnd {
    Finished(FinishReason),
    Cancelled,
    /// Broken, timed out, or closed before the server said it was done.
    Cut(String),
}

/// Resolves once the token is cancelled; dropping a request's future drops its connection,
/// which is how servers learn to stop.
async fn cancelled(token: &CancelToken) {
    while !token.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes a request from the busy line when it stops waiting.
struct BusyPlace<'a> {
    inner: &'a Inner,
    serial: u64,
}

impl BusyPlace<'_> {
    fn position(&self) -> usize {
        let line = self
            .inner
            .busy_line
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        line.iter()
            .position(|s| *s == self.serial)
            .map_or(1, |i| i + 1)
    }
}

impl Drop for BusyPlace<'_> {
    fn drop(&mut self) {
        let mut line = self
            .inner
            .busy_line
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        line.retain(|s| *s != self.serial);
    }
}

struct Run<'a> {
    inner: &'a Inner,
    p: &'a Pending,
    serial: u64,
    /// The rendered prompt, as the servers get it.
    prompt: String,
    scanner: StopScanner,
    /// Everything the servers generated, before our stop scanning.
    raw: String,
    /// Text chunks streamed: one token each on the servers we know.
    chunks: usize,
    started: Instant,
    first_token: Option<Instant>,
}

/// Serves one request and sends its events.
pub(super) async fn serve(inner: &Inner, p: Pending, serial: u64) {
    let _ = p.tx.send(GenerationEvent::Started { serial });
    let prompt = match &p.req.prompt_text {
        Some(text) => text.clone(),
        None => {
            let ids = p
                .req
                .prompt
                .strip_prefix(&[inner.tokenizer.bos()][..])
                .unwrap_or(&p.req.prompt);
            inner.tokenizer.decode(ids).unwrap_or_default()
        }
    };
    let mut run = Run {
        inner,
        p: &p,
        serial,
        prompt: plain_special_text(&prompt),
        scanner: StopScanner::new(&p.req.stop),
        raw: String::new(),
        chunks: 0,
        started: Instant::now(),
        first_token: None,
    };
    let result = run.go().await;
    tracing::debug!(
        conversation = %p.req.conversation,
        finish = ?result.finish,
        completion = result.completion_tokens,
        "remote generation finished"
    );
    let _ = p.tx.send(GenerationEvent::Finished(result));
}

impl Run<'_> {
    async fn go(&mut self) -> GenerationResult {
        let inner = self.inner;
        let opts = &inner.opts;
        let mut skip: Vec<usize> = Vec::new();
        let mut continued = false;
        let mut last_error = String::from("every inference server is down");
        let serial = self.serial;
        let mut busy: Option<(Instant, BusyPlace<'_>)> = None;
        loop {
            if self.p.cancel.is_cancelled() {
                return self.finish(FinishReason::Cancelled);
            }
            let Some(i) = choose(&inner.endpoints, opts.max_in_flight, &skip) else {
                return self.fail(
                    format!("no inference server could be reached: {last_error}"),
                    Some(Failure::Unavailable),
                );
            };
            let ep = &inner.endpoints[i];
            let _slot = ep.take_slot();
            let body = self.completion(true).body();
            let sent = Instant::now();
            let opened = tokio::select! {
                r = client::open(&inner.client, &ep.base, &opts.api_key, &body) => r,
                _ = cancelled(&self.p.cancel) => return self.finish(FinishReason::Cancelled),
            };
            let resp = match opened {
                Ok(resp) => resp,
                Err(Refusal::Busy { retry_after }) => {
                    ep.count_error("busy");
                    let (since, place) = busy.get_or_insert_with(|| {
                        let mut line = inner.busy_line.lock().unwrap_or_else(|e| e.into_inner());
                        line.push(serial);
                        (Instant::now(), BusyPlace { inner, serial })
                    });
                    if since.elapsed() >= opts.busy_wait {
                        return self.fail(
                            format!(
                                "the inference servers stayed busy for {} s",
                                opts.busy_wait.as_secs()
                            ),
                            None,
                        );
                    }
                    let position = place.position();
                    if self
                        .p
                        .position
                        .swap(position, std::sync::atomic::Ordering::AcqRel)
                        != position
                    {
                        let _ = self.p.tx.send(GenerationEvent::Queued { position });
                    }
                    let pause = retry_after
                        .unwrap_or(Duration::from_secs(1))
                        .clamp(BUSY_PAUSE.0, BUSY_PAUSE.1);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = cancelled(&self.p.cancel) => return self.finish(FinishReason::Cancelled),
                    }
                    continue;
                }
                Err(Refusal::Context { window }) => {
                    ep.count_error("context");
                    return self.refused(window, &ep.base);
                }
                Err(Refusal::Down { kind, message }) => {
                    ep.mark_down(kind, &message);
                    skip.push(i);
                    last_error = format!("{}: {message}", ep.base);
                    continue;
                }
                Err(Refusal::Rejected { message, .. }) => {
                    ep.count_error("rejected");
                    return self.fail(format!("{} refused the request: {message}", ep.base), None);
                }
            };
            if busy.take().is_some() {
                self.p
                    .position
                    .store(0, std::sync::atomic::Ordering::Release);
            }
            ep.mark_up();
            let chunks_before = self.chunks;
            let end = self.stream(resp).await;
            let streamed = self.chunks - chunks_before;
            if let Some(first) = self.first_token.filter(|_| streamed > 0) {
                if chunks_before == 0 {
                    ep.count_first_token(first.saturating_duration_since(sent));
                }
                ep.count_tokens(streamed as u64, first.max(sent).elapsed());
            }
            match end {
                StreamEnd::Finished(finish) => return self.finish(finish),
                StreamEnd::Cancelled => return self.finish(FinishReason::Cancelled),
                StreamEnd::Cut(message) => {
                    // Another server takes over if there is one; alone, this one tries once more.
                    let mut others = skip.clone();
                    others.push(i);
                    if choose(&inner.endpoints, opts.max_in_flight, &others).is_some() {
                        ep.mark_down("cut", &message);
                        skip.push(i);
                    } else {
                        ep.count_error("cut");
                    }
                    last_error = format!("{}: {message}", ep.base);
                    if continued {
                        return self.fail(
                            format!("the reply's stream was cut twice: {last_error}"),
                            None,
                        );
                    }
                    continued = true;
                    tracing::warn!(
                        endpoint = %ep.base,
                        error = %message,
                        generated = self.chunks,
                        "the reply's stream was cut; continuing it on another server (or the same one, when alone)"
                    );
                }
            }
        }
    }

    fn completion(&self, stream: bool) -> Completion<'_> {
        Completion {
            model: &self.inner.opts.model,
            prompt: &self.prompt,
            max_tokens: self.p.req.max_new_tokens.saturating_sub(self.chunks).max(1),
            sampling: &self.p.req.sampling,
            stop: &self.p.req.stop,
            stream,
        }
    }

    /// Reads one stream until it ends, showing what our stop scan lets through.
    async fn stream(&mut self, resp: reqwest::Response) -> StreamEnd {
        use futures_util::StreamExt;
        let idle = self.inner.opts.idle_timeout;
        let mut events = client::events(resp);
        let mut finish: Option<FinishReason> = None;
        // One timer each for the whole stream, not one per chunk.
        let token = self.p.cancel.clone();
        let cancel = cancelled(&token);
        tokio::pin!(cancel);
        let silence = tokio::time::sleep(idle);
        tokio::pin!(silence);
        loop {
            let next = tokio::select! {
                n = events.next() => Ok(n),
                _ = &mut silence => Err(()),
                _ = &mut cancel => return StreamEnd::Cancelled,
            };
            silence.as_mut().reset(tokio::time::Instant::now() + idle);
            let chunk = match next {
                Err(()) => {
                    return StreamEnd::Cut(format!("no data for {} s", idle.as_secs()));
                }
                Ok(None) => {
                    return match finish {
                        Some(f) => StreamEnd::Finished(f),
                        None => {
                            StreamEnd::Cut("the stream ended before the server finished".into())
                        }
                    };
                }
                Ok(Some(Err(e))) => {
                    return match finish {
                        Some(f) => StreamEnd::Finished(f),
                        None => StreamEnd::Cut(e),
                    };
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            match chunk {
                Chunk::Done => return StreamEnd::Finished(finish.unwrap_or(FinishReason::Eos)),
                Chunk::Text { text, finish: f } => {
                    if !text.is_empty() {
                        self.first_token.get_or_insert_with(Instant::now);
                        self.chunks += 1;
                        // Continuing after a cut, the servers get the prompt and the text so far.
                        self.prompt.push_str(&text);
                        self.raw.push_str(&text);
                        match self.scanner.push(&text) {
                            Scan::Emit(s) => self.delta(s),
                            Scan::Stop(s) => {
                                self.delta(s);
                                return StreamEnd::Finished(FinishReason::Stop);
                            }
                        }
                    }
                    if let Some(reason) = f {
                        finish = Some(match reason.as_str() {
                            "length" => FinishReason::Length,
                            _ => FinishReason::Eos,
                        });
                    }
                }
            }
        }
    }

    fn delta(&self, text: String) {
        if !text.is_empty() {
            let _ = self.p.tx.send(GenerationEvent::Delta(text));
        }
    }

    /// The server's window is smaller than the prompt: the caller builds a smaller prompt.
    fn refused(&mut self, window: Option<usize>, base: &str) -> GenerationResult {
        // A server that does not say its window gets prompts a quarter shorter each time.
        let window = window
            .unwrap_or(self.p.req.prompt.len() * 3 / 4)
            .min(self.inner.context_length());
        self.inner.learn_window(window, base);
        tracing::warn!(
            endpoint = base,
            prompt_tokens = self.p.req.prompt.len(),
            window,
            "the inference server refused the prompt as too long for its window"
        );
        self.fail(
            format!(
                "{base} holds {window} tokens; the prompt has {}",
                self.p.req.prompt.len()
            ),
            Some(Failure::ContextTooSmall { window }),
        )
    }

    fn fail(&mut self, error: String, failure: Option<Failure>) -> GenerationResult {
        let mut r = self.finish(FinishReason::Error);
        r.error = Some(error);
        r.failure = failure;
        r
    }

    fn finish(&mut self, finish: FinishReason) -> GenerationResult {
        if matches!(
            finish,
            FinishReason::Eos | FinishReason::Length | FinishReason::Cancelled
        ) {
            let tail = self.scanner.finish();
            if finish != FinishReason::Cancelled {
                self.delta(tail);
            }
        }
        let text = self.scanner.text().to_string();
        let tokens = self
            .inner
            .tokenizer
            .encode(&self.raw, false)
            .unwrap_or_default();
        let now = Instant::now();
        let first = self.first_token;
        GenerationResult {
            completion_tokens: tokens.len(),
            tokens,
            text,
            finish,
            error: None,
            prompt_tokens: self.p.req.prompt.len(),
            reused_tokens: 0,
            queue_time: self.started.saturating_duration_since(self.p.submitted),
            prefill_time: first.map_or(now - self.started, |f| f - self.started),
            time_to_first_token: first.map(|f| f - self.p.submitted),
            decode_time: first.map_or(Duration::ZERO, |f| now - f),
            failure: None,
        }
    }
}

/// A server reads control tokens out of prompt text (`</s>` would end the turn), while our
/// tokenizer keeps them as text: a word joiner after the `<` keeps such text plain there too.
pub(super) fn plain_special_text(prompt: &str) -> String {
    let mut out = prompt.to_string();
    for special in ["<s>", "</s>", "<unk>"] {
        if out.contains(special) {
            out = out.replace(special, &format!("<\u{2060}{}", &special[1..]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_token_text_reaches_servers_as_plain_text() {
        assert_eq!(
            plain_special_text("a </s> b <s><unk>"),
            "a <\u{2060}/s> b <\u{2060}s><\u{2060}unk>"
        );
        assert_eq!(
            plain_special_text("SYSTEM: x\nUSER: <b>"),
            "SYSTEM: x\nUSER: <b>"
        );
    }
}
