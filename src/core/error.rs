//! Why the core could not answer, classified by what happens next: retried later (a busy
//! worker or a locked database) or reported to the user.

use super::text;
use crate::inference::WorkerError;
use crate::memory::MemoryError;
use crate::prompt::PromptError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl CoreError {
    pub fn is_retryable(&self) -> bool {
        match self {
            CoreError::Memory(e) => e.is_retryable(),
            CoreError::Worker(e) => e.is_retryable(),
            CoreError::Prompt(_) => false,
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CoreError::Memory(_) => "storage",
            CoreError::Prompt(_) => "prompt",
            CoreError::Worker(WorkerError::Busy { .. }) => "busy",
            CoreError::Worker(WorkerError::Stopped) => "worker_stopped",
            CoreError::Worker(_) => "worker",
        }
    }

    /// What the user is told.
    pub(super) fn user_text(&self) -> &'static str {
        match self {
            CoreError::Worker(WorkerError::Busy { .. }) => text::BUSY,
            CoreError::Worker(WorkerError::Stopped) => text::UNAVAILABLE,
            CoreError::Memory(_) => text::STORAGE_FAILED,
            _ => text::FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        let busy = CoreError::from(WorkerError::Busy { waiting: 3 });
        assert!(busy.is_retryable());
        assert_eq!(busy.kind(), "busy");
        assert_eq!(busy.user_text(), text::BUSY);
        let stopped = CoreError::from(WorkerError::Stopped);
        assert!(!stopped.is_retryable());
        assert_eq!(stopped.user_text(), text::UNAVAILABLE);
        let storage = CoreError::from(MemoryError::Corrupt("nothing".into()));
        assert!(!storage.is_retryable());
        assert_eq!(storage.kind(), "storage");
        assert_eq!(storage.user_text(), text::STORAGE_FAILED);
        let empty = CoreError::from(WorkerError::EmptyPrompt);
        assert_eq!(empty.kind(), "worker");
        assert_eq!(empty.user_text(), text::FAILED);
    }
}
