//! The contract between the core and an adapter: where a reply goes, and what became of a
//! message.

use std::time::Duration;

use super::ReplyReport;
use crate::chat::Shown;
use crate::inference::FinishReason;

/// Where a reply goes. Adapters implement it; they pace edits to their platform's limits.
#[async_trait::async_trait]
pub trait ReplySink: Send + Sync {
    /// Shown at once: the bot is on it.
    async fn typing(&self);
    /// Waiting behind others; `position` 1 is next.
    async fn queued(&self, position: usize);
    /// The reply so far (called as text streams in).
    async fn update(&self, text_so_far: &str);
    /// The whole reply.
    async fn finish(&self, text: &str);
    /// A short user-facing error instead of (or ending) a reply.
    async fn fail(&self, message: &str);
    /// An informational answer (command results, notices).
    async fn notice(&self, text: &str);
    /// The platform messages showing this reply so far, as they can be found again after a
    /// restart; `None` where they cannot be (a terminal, an interaction's short-lived token).
    async fn shown(&self) -> Option<Shown> {
        None
    }
    /// What the reply cost, once it is written (before its final text is shown).
    async fn answered(&self, _report: &ReplyReport) {}
}

/// What became of a message, for adapters' bookkeeping and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answered {
        finish: FinishReason,
        reply_id: Option<i64>,
    },
    Command,
    Denied,
    Duplicate,
    RateLimited {
        retry_after: Duration,
    },
    Rejected,
    Failed,
}
