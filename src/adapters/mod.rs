//! Thin adapters between chat platforms and the core. Each turns its platform's events into
//! [`crate::core::Incoming`] and implements [`crate::core::ReplySink`].

pub mod console;
pub mod discord;
pub mod matrix;
pub mod split;
pub mod stream;

/// Why an adapter could not connect, and whether trying again later may help (the server was
/// unreachable) or only the operator can fix it (credentials refused).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    pub message: String,
    pub retryable: bool,
}

impl ConnectError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

impl From<matrix::MatrixError> for ConnectError {
    fn from(e: matrix::MatrixError) -> Self {
        Self {
            retryable: e.is_retryable(),
            message: e.to_string(),
        }
    }
}

/// Resolves once `stop` turns true; never, if its sender is gone without saying so.
pub async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}
