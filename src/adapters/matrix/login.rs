//! Getting a logged-in client: open the encrypted SQLite store, then restore the saved session,
//! log in by password as a new device, or adopt the configured access token (asking the server
//! which device it belongs to); the session is then saved for the next start. Also recovering
//! the encryption keys from the server-side backup.

use std::path::{Path, PathBuf};

use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::encryption::{BackupDownloadStrategy, EncryptionSettings};
use matrix_sdk::ruma::OwnedUserId;
use matrix_sdk::store::RoomLoadSettings;
use matrix_sdk::{Client, SessionMeta, SessionTokens};

use super::error::{MatrixError, http_error, login_refused, store_error, unreachable};
use super::session;
use crate::config::MatrixSettings;

/// A client logged in as `matrix.user_id`, its session saved beside the store.
pub(super) async fn client_for(settings: &MatrixSettings) -> Result<Client, MatrixError> {
    let store = PathBuf::from(&settings.store_path);
    let saved = session::load(&store)?;
    let client = open(settings, &store).await?;
    match saved {
        Some(saved) => restore_saved(&client, saved, settings, &store).await?,
        None if !settings.password.is_empty() => {
            log_in_by_password(&client, settings, &store).await?
        }
        None if !settings.access_token.is_empty() => {
            adopt_access_token(&client, settings, &store).await?
        }
        None => {
            return Err(MatrixError::NoCredentials {
                path: store.display().to_string(),
            });
        }
    }
    let Some(session) = client.matrix_auth().session() else {
        return Err(store_error(&store, &"no session after login"));
    };
    session::save(&store, &settings.homeserver, session)?;
    Ok(client)
}

/// A client on the store, encryption set up, once the homeserver answers.
async fn open(settings: &MatrixSettings, store: &Path) -> Result<Client, MatrixError> {
    let passphrase =
        (!settings.store_passphrase.is_empty()).then_some(settings.store_passphrase.as_str());
    let client = Client::builder()
        .homeserver_url(&settings.homeserver)
        .sqlite_store(store, passphrase)
        .with_encryption_settings(EncryptionSettings {
            auto_enable_cross_signing: true,
            backup_download_strategy: BackupDownloadStrategy::AfterDecryptionFailure,
            auto_enable_backups: false,
        })
        .build()
        .await
        .map_err(|e| store_error(store, &e))?;
    if let Err(e) = client.server_versions().await {
        return Err(unreachable(settings, e.to_string()));
    }
    Ok(client)
}

/// Restores the saved session and checks that the server still accepts it.
async fn restore_saved(
    client: &Client,
    saved: MatrixSession,
    settings: &MatrixSettings,
    store: &Path,
) -> Result<(), MatrixError> {
    client
        .matrix_auth()
        .restore_session(saved, RoomLoadSettings::default())
        .await
        .map_err(|e| store_error(store, &e))?;
    if let Err(e) = client.whoami().await {
        return Err(http_error(&e, &settings.homeserver, |reason| {
            MatrixError::SessionRefused {
                path: store.display().to_string(),
                reason,
            }
        }));
    }
    tracing::info!(user = %settings.user_id, "Matrix session restored");
    Ok(())
}

/// Logs in with `matrix.password` as a new device named `matrix.device_name`.
async fn log_in_by_password(
    client: &Client,
    settings: &MatrixSettings,
    store: &Path,
) -> Result<(), MatrixError> {
    let response = client
        .matrix_auth()
        .login_username(&settings.user_id, &settings.password)
        .initial_device_display_name(&settings.device_name)
        .send()
        .await;
    if let Err(e) = response {
        return Err(match e {
            matrix_sdk::Error::Http(h) => {
                http_error(&h, &settings.homeserver, login_refused(settings))
            }
            other => store_error(store, &other),
        });
    }
    tracing::info!(user = %settings.user_id, "logged in to Matrix as a new device");
    Ok(())
}

/// Uses `matrix.access_token` as the session of the device it belongs to.
async fn adopt_access_token(
    client: &Client,
    settings: &MatrixSettings,
    store: &Path,
) -> Result<(), MatrixError> {
    let meta = token_owner(settings).await?;
    client
        .matrix_auth()
        .restore_session(
            MatrixSession {
                meta,
                tokens: configured_tokens(settings),
            },
            RoomLoadSettings::default(),
        )
        .await
        .map_err(|e| store_error(store, &e))?;
    tracing::info!(user = %settings.user_id, "using the configured Matrix access token");
    Ok(())
}

fn configured_tokens(settings: &MatrixSettings) -> SessionTokens {
    SessionTokens {
        access_token: settings.access_token.clone(),
        refresh_token: None,
    }
}

/// Asks the server whose access token this is, for the device id a session needs.
async fn token_owner(settings: &MatrixSettings) -> Result<SessionMeta, MatrixError> {
    let probe = Client::builder()
        .homeserver_url(&settings.homeserver)
        .build()
        .await
        .map_err(|e| unreachable(settings, e.to_string()))?;
    let user_id = OwnedUserId::try_from(settings.user_id.as_str())
        .map_err(|e| login_refused(settings)(e.to_string()))?;
    probe
        .matrix_auth()
        .restore_session(
            MatrixSession {
                meta: SessionMeta {
                    user_id,
                    device_id: "UNKNOWN".into(),
                },
                tokens: configured_tokens(settings),
            },
            RoomLoadSettings::default(),
        )
        .await
        .map_err(|e| login_refused(settings)(e.to_string()))?;
    let who = probe
        .whoami()
        .await
        .map_err(|e| http_error(&e, &settings.homeserver, login_refused(settings)))?;
    let Some(device_id) = who.device_id else {
        return Err(login_refused(settings)(
            "the access token belongs to no device".into(),
        ));
    };
    if who.user_id.as_str() != settings.user_id {
        return Err(login_refused(settings)(format!(
            "the access token belongs to {}",
            who.user_id
        )));
    }
    Ok(SessionMeta {
        user_id: who.user_id,
        device_id,
    })
}

/// Unlocks the server-side key backup with `matrix.recovery_key`, if one is configured, so older
/// encrypted messages become readable; a failure is logged, not fatal.
pub(super) async fn recover_keys(client: &Client, settings: &MatrixSettings) {
    if settings.recovery_key.is_empty() {
        return;
    }
    match client
        .encryption()
        .recovery()
        .recover(&settings.recovery_key)
        .await
    {
        Ok(()) => tracing::info!("encryption keys recovered from the server-side backup"),
        Err(e) => tracing::error!(
            error = %e,
            "matrix.recovery_key did not unlock the server-side key backup; older encrypted messages stay unreadable"
        ),
    }
}
