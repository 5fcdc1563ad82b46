//! Thin adapters between chat platforms and the core. Each turns its platform's events into
//! [`crate::core::Incoming`] and implements [`crate::core::ReplySink`].

pub mod console;
pub mod discord;
pub mod matrix;
pub mod split;
pub mod stream;

/// Why an adapter could not connect or lost its connection, by what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server answered and refused our credentials: only the operator can fix it.
    #[error("{0}")]
    Refused(String),
    /// The server could not be reached, or dropped us: trying again later may work.
    #[error("{0}")]
    Unreachable(String),
    /// The settings cannot work as they are (a gateway on another host, an unusable store).
    #[error("{0}")]
    Misconfigured(String),
}

impl ConnectError {
    /// Only an unreachable server is worth another attempt.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Unreachable(_))
    }
}

impl From<matrix::MatrixError> for ConnectError {
    fn from(e: matrix::MatrixError) -> Self {
        use matrix::MatrixError as M;
        let message = e.to_string();
        match e {
            M::Unreachable { .. } => ConnectError::Unreachable(message),
            M::LoginRefused { .. } | M::SessionRefused { .. } | M::SessionExpired => {
                ConnectError::Refused(message)
            }
            M::NoCredentials { .. } | M::OrphanStore { .. } | M::Store { .. } => {
                ConnectError::Misconfigured(message)
            }
        }
    }
}

/// Resolves once `stop` turns true; never, if its sender is gone without saying so.
pub async fn until_stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matrix::MatrixError;

    #[test]
    fn matrix_errors_keep_their_class() {
        let cases = [
            (
                MatrixError::Unreachable {
                    homeserver: "http://127.0.0.1:1".into(),
                    reason: "refused".into(),
                },
                true,
            ),
            (
                MatrixError::LoginRefused {
                    user: "@a:b".into(),
                    reason: "M_FORBIDDEN".into(),
                },
                false,
            ),
            (MatrixError::SessionExpired, false),
            (MatrixError::NoCredentials { path: "x".into() }, false),
        ];
        for (e, retryable) in cases {
            let text = e.to_string();
            let c = ConnectError::from(e);
            assert_eq!(c.is_retryable(), retryable, "{c:?}");
            assert_eq!(c.to_string(), text);
        }
        assert!(matches!(
            ConnectError::from(MatrixError::SessionExpired),
            ConnectError::Refused(_)
        ));
        assert!(matches!(
            ConnectError::from(MatrixError::OrphanStore { path: "x".into() }),
            ConnectError::Misconfigured(_)
        ));
    }
}
