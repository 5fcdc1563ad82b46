//! Why the Matrix adapter could not start (or lost its session), each with what to do about it,
//! and the one mapping of homeserver errors onto those reasons: the server said no (refused)
//! versus it could not be reached.

use std::path::Path;

use crate::config::MatrixSettings;

/// Why the Matrix adapter could not start, each with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MatrixError {
    #[error(
        "cannot reach the Matrix homeserver at {homeserver}: {reason}. Check matrix.homeserver and that the server is up"
    )]
    Unreachable { homeserver: String, reason: String },
    #[error(
        "the homeserver refused to log in {user}: {reason}. Check matrix.user_id and SYNTHIA_BOT__MATRIX__PASSWORD (or SYNTHIA_BOT__MATRIX__ACCESS_TOKEN)"
    )]
    LoginRefused { user: String, reason: String },
    #[error(
        "the saved Matrix session in {path} was refused ({reason}); the device was probably logged out. Delete {path} to log in as a new device"
    )]
    SessionRefused { path: String, reason: String },
    #[error(
        "no Matrix session is saved in {path} and no credentials are configured: set SYNTHIA_BOT__MATRIX__PASSWORD (first start) or SYNTHIA_BOT__MATRIX__ACCESS_TOKEN"
    )]
    NoCredentials { path: String },
    #[error(
        "the Matrix store in {path} holds encryption keys but no saved session, so it cannot be reused. Delete {path} to start a new device"
    )]
    OrphanStore { path: String },
    #[error(
        "cannot open the Matrix store in {path}: {reason}. Check matrix.store_path and matrix.store_passphrase"
    )]
    Store { path: String, reason: String },
    #[error(
        "the homeserver no longer accepts the Matrix session (logged out?): delete matrix.store_path and restart to log in again"
    )]
    SessionExpired,
}

/// A Matrix error answer means the server is up and said no (`refused`); anything else means it
/// could not be reached.
pub(super) fn http_error(
    e: &matrix_sdk::HttpError,
    homeserver: &str,
    refused: impl FnOnce(String) -> MatrixError,
) -> MatrixError {
    match e.as_client_api_error() {
        Some(api) => refused(api.to_string()),
        None => MatrixError::Unreachable {
            homeserver: homeserver.to_string(),
            reason: e.to_string(),
        },
    }
}

pub(super) fn login_refused(settings: &MatrixSettings) -> impl FnOnce(String) -> MatrixError + '_ {
    |reason| MatrixError::LoginRefused {
        user: settings.user_id.clone(),
        reason,
    }
}

/// The configured homeserver could not be reached.
pub(super) fn unreachable(settings: &MatrixSettings, reason: String) -> MatrixError {
    MatrixError::Unreachable {
        homeserver: settings.homeserver.clone(),
        reason,
    }
}

/// The store in `store` (matrix.store_path) cannot be used.
pub(super) fn store_error(store: &Path, reason: &dyn std::fmt::Display) -> MatrixError {
    MatrixError::Store {
        path: store.display().to_string(),
        reason: reason.to_string(),
    }
}
