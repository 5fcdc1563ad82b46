//! The session saved beside matrix-sdk's store: the store keeps the sync token and the encryption
//! keys but not the access token, so homeserver, user, device and token are written to
//! `session.json` in the store directory (owner-only), to be restored on the next start.

use std::path::{Path, PathBuf};

use matrix_sdk::authentication::matrix::MatrixSession;

use super::error::{MatrixError, store_error};

/// What is saved beside the store: matrix-sdk keeps sync token and keys, not the access token.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedSession {
    homeserver: String,
    #[serde(flatten)]
    session: MatrixSession,
}

fn session_path(store: &Path) -> PathBuf {
    store.join("session.json")
}

/// Creates the store directory (owner-only) if need be and reads the session saved there, if
/// any. A store that holds encryption keys but no session cannot be reused.
pub(super) fn load(store: &Path) -> Result<Option<MatrixSession>, MatrixError> {
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(store)
            .map_err(|e| store_error(store, &e))?;
    }
    let session_file = session_path(store);
    let saved: Option<SavedSession> = match std::fs::read(&session_file) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes).map_err(|e| MatrixError::Store {
                path: session_file.display().to_string(),
                reason: format!("unreadable session file: {e}"),
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(store_error(store, &e)),
    };
    if saved.is_none() && store.join("matrix-sdk-crypto.sqlite3").exists() {
        return Err(MatrixError::OrphanStore {
            path: store.display().to_string(),
        });
    }
    Ok(saved.map(|s| s.session))
}

/// Saves the session of a logged-in client for the next start.
pub(super) fn save(
    store: &Path,
    homeserver: &str,
    session: MatrixSession,
) -> Result<(), MatrixError> {
    save_session(
        &session_path(store),
        &SavedSession {
            homeserver: homeserver.to_string(),
            session,
        },
    )
    .map_err(|e| store_error(store, &e))
}

/// Writes the file readable by its owner only, through a temporary file so a crash leaves the
/// old one whole.
fn save_session(path: &Path, saved: &SavedSession) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
