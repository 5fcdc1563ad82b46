//! Writes to memory that meet a busy database (another process holding SQLite's write lock past
//! the busy timeout) are tried again a few times before the user is told: a backup or a second
//! tool on the same file should cost a delay, not a question.

use std::future::Future;
use std::time::Duration;

use super::CoreError;

/// Pauses between attempts; after the last one the error goes to the caller.
const BACKOFF: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_millis(1000),
];

/// Runs `write` until it succeeds, fails for a reason retrying cannot fix, or has been retried
/// [`BACKOFF`]`.len()` times. `write` must be safe to repeat: a failed attempt wrote nothing.
pub(super) async fn storing<T, F, Fut>(what: &'static str, mut write: F) -> Result<T, CoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CoreError>>,
{
    for (attempt, pause) in BACKOFF.iter().enumerate() {
        match write().await {
            Err(e @ CoreError::Memory(_)) if e.is_retryable() => {
                tracing::warn!(
                    error = %e,
                    write = what,
                    attempt = attempt + 1,
                    retry_in_ms = pause.as_millis() as u64,
                    "the database is busy; trying again"
                );
                tokio::time::sleep(*pause).await;
            }
            other => return other,
        }
    }
    write().await
}
