//! The Matrix connection as the daemon sees it: `connect` puts the pieces together (a logged-in
//! client, key recovery, the handlers, a first sync that skips the backlog) and `run` keeps
//! syncing until told to stop.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::Client;
use matrix_sdk::RoomState;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::events::relation::Thread;
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId};
use tokio::sync::watch;

use super::PLATFORM;
use super::error::{MatrixError, store_error, unreachable};
use super::shared::Shared;
use super::surface::{MatrixSurface, Question};
use super::{handlers, login};
use crate::adapters::stream::StreamedReply;
use crate::adapters::until_stopped;
use crate::config::MatrixSettings;
use crate::core::{Assistant, PendingQuestion, ReplySink, ResumeSinks};

pub struct MatrixClient {
    client: Client,
    next_batch: String,
}

impl MatrixClient {
    /// Logs in (or restores the saved session), recovers keys if configured, joins pending
    /// invites and skips the backlog; returns once the bot is ready to answer.
    pub async fn connect(
        settings: &MatrixSettings,
        assistant: Arc<Assistant>,
    ) -> Result<Self, MatrixError> {
        let client = login::client_for(settings).await?;
        login::recover_keys(&client, settings).await;
        let (user_id, display_name) = identity(&client, settings).await?;
        let shared = Arc::new(Shared::new(assistant, settings, user_id, display_name));

        // Invites that arrived while the bot was away are still wanted.
        handlers::watch_invites(&client, &shared);
        // The first sync brings the backlog; no message handler sees it.
        let first = client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .map_err(|e| match e {
                matrix_sdk::Error::Http(h) => unreachable(settings, h.to_string()),
                other => store_error(Path::new(&settings.store_path), &other),
            })?;
        handlers::watch_rooms(&client, &shared);
        // Questions the last run accepted but never answered; the core takes them up once.
        let replies = Arc::new(ResumedReplies {
            client: client.clone(),
            shared: shared.clone(),
        });
        tokio::spawn(shared.assistant.clone().resume(PLATFORM, replies));
        tracing::info!(user = %shared.user_id, name = %shared.display_name, rooms = client.joined_rooms().len(), "connected to Matrix");
        Ok(Self {
            client,
            next_batch: first.next_batch,
        })
    }

    /// Syncs until `stop` turns true; the sync in flight is dropped, the token of the last
    /// completed one is already in the store. Network failures are retried with growing pauses
    /// (up to a minute); a session the server no longer accepts ends the loop with an error.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) -> Result<(), MatrixError> {
        let mut settings = SyncSettings::default()
            .timeout(Duration::from_secs(30))
            .token(self.next_batch.clone());
        let mut backoff = Duration::from_secs(1);
        loop {
            if *stopped.borrow() {
                return Ok(());
            }
            tokio::select! {
                _ = until_stopped(&mut stopped) => return Ok(()),
                r = self.client.sync_once(settings.clone()) => match r {
                    Ok(response) => {
                        settings = settings.token(response.next_batch);
                        backoff = Duration::from_secs(1);
                    }
                    Err(e) => {
                        if let Some(matrix_sdk::ruma::api::error::ErrorKind::UnknownToken(_)) =
                            e.client_api_error_kind()
                        {
                            return Err(MatrixError::SessionExpired);
                        }
                        tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "Matrix sync failed");
                        tokio::select! {
                            _ = until_stopped(&mut stopped) => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }
}

/// Who the bot is: its user id, and the display name mentions may use (the localpart when it has
/// none).
async fn identity(
    client: &Client,
    settings: &MatrixSettings,
) -> Result<(OwnedUserId, String), MatrixError> {
    let user_id = client
        .user_id()
        .map(|u| u.to_owned())
        .ok_or_else(|| store_error(Path::new(&settings.store_path), &"no user id after login"))?;
    let display_name = match client.account().get_display_name().await {
        Ok(Some(n)) if !n.trim().is_empty() => n,
        _ => user_id.localpart().to_string(),
    };
    Ok((user_id, display_name))
}

/// Replies to stored questions after a restart: in the question's room (and thread), as a reply
/// to its event (or in the events the last run had sent for it), while the bot is still in the
/// room.
struct ResumedReplies {
    client: Client,
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl ResumeSinks for ResumedReplies {
    async fn sink_for(&self, question: &PendingQuestion) -> Option<Box<dyn ReplySink>> {
        let key = &question.key;
        let room_id = OwnedRoomId::try_from(key.channel.as_str()).ok()?;
        let event_id = OwnedEventId::try_from(question.message_id.as_deref()?).ok()?;
        let sender = OwnedUserId::try_from(question.author_id.as_deref()?).ok()?;
        let room = self.client.get_room(&room_id)?;
        if room.state() != RoomState::Joined {
            tracing::info!(room = %room_id, "no longer in the room of a stored question");
            return None;
        }
        let thread = match key.thread.as_str() {
            "" => None,
            root => Some(Thread::plain(
                OwnedEventId::try_from(root).ok()?,
                event_id.clone(),
            )),
        };
        let surface = MatrixSurface {
            room,
            question: Question {
                event_id,
                sender,
                thread,
            },
            shared: self.shared.clone(),
        };
        // Events the last run sent for this answer are replaced, not sent again.
        let earlier = question.shown.as_ref().and_then(|shown| {
            let ids = shown
                .ids
                .iter()
                .map(|id| OwnedEventId::try_from(id.as_str()).ok())
                .collect::<Option<Vec<_>>>();
            if ids.is_none() {
                tracing::warn!(room = %room_id, "events of an earlier answer with unreadable ids; sending anew");
            }
            ids.filter(|ids| !ids.is_empty()).map(|ids| (shown.notices, ids))
        });
        let interval = self.shared.interval();
        Some(Box::new(match earlier {
            Some((notices, ids)) => StreamedReply::showing(surface, interval, notices, ids),
            None => StreamedReply::new(surface, interval),
        }))
    }
}
