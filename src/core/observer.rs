//! What the core reports as it works, for metrics; the core never depends on who listens.

use std::time::Duration;

use crate::chat::Platform;
use crate::inference::FinishReason;

/// One finished reply, for metrics.
#[derive(Debug, Clone)]
pub struct ReplyReport {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose attention cache was reused (0: a cache miss).
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    /// From the message reaching the core to the first token reaching it: waiting for the
    /// conversation's turn, building the prompt, the worker's queue and prefill included.
    pub time_to_first_token: Option<Duration>,
    /// The worker's own time, from taking the request to its last token: the queue before it
    /// and the platform's edits after it are not included.
    pub generation_time: Duration,
    /// The part of it spent writing the reply, after the prompt was read.
    pub decode_time: Duration,
    /// Old turns left out of the prompt to fit the context window.
    pub trimmed_turns: usize,
}

/// Every method does nothing by default.
pub trait Observer: Send + Sync {
    fn received(&self, _platform: Platform) {}
    /// A message not answered: `denied`, `duplicate`, `rate_limited`, `rejected`.
    fn refused(&self, _platform: Platform, _reason: &'static str) {}
    fn command(&self, _platform: Platform) {}
    fn answered(&self, _platform: Platform, _report: &ReplyReport) {}
    /// A failure, by [`super::CoreError::kind`].
    fn error(&self, _platform: Platform, _kind: &'static str) {}
}

pub(super) struct NoObserver;
impl Observer for NoObserver {}
