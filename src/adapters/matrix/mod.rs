//! Matrix adapter (matrix-sdk): password or token login with the session saved beside
//! matrix-sdk's SQLite store, end-to-end encryption, invites, mentions, DMs, threads, `!` commands,
//! replies as `m.notice` streamed by `m.replace` edits.
//!
//! The backlog is never answered: the first sync after start runs before the message handler is
//! registered, older events are dropped by timestamp, and the core refuses event ids it has
//! already stored, so even a bot that lost its Matrix store answers nothing twice.

pub mod trigger;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matrix_sdk::authentication::matrix::MatrixSession;
use matrix_sdk::config::SyncSettings;
use matrix_sdk::encryption::{BackupDownloadStrategy, EncryptionSettings};
use matrix_sdk::ruma::events::relation::Thread;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::member::{
    MembershipState, OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::ruma::events::room::message::{
    AddMentions, ForwardThread, MessageType, OriginalSyncRoomMessageEvent, Relation,
    ReplacementMetadata, ReplyMetadata, RoomMessageEventContent,
    RoomMessageEventContentWithoutRelation,
};
use matrix_sdk::ruma::events::room::redaction::OriginalSyncRoomRedactionEvent;
use matrix_sdk::ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId};
use matrix_sdk::store::RoomLoadSettings;
use matrix_sdk::{Client, Room, RoomMemberships, RoomState, SessionMeta, SessionTokens};
use tokio::sync::watch;
use tracing::Instrument;

use super::stream::{StreamedReply, Surface};
use crate::chat::{Author, ConversationKey, Incoming, Platform};
use crate::config::MatrixSettings;
use crate::core::{Assistant, text};
use trigger::Facts;

pub const PLATFORM: Platform = Platform::Matrix;

/// Characters per event: a streamed edit carries the text four times (body, HTML, and both again
/// in `m.new_content`) and an event may not exceed 64 KiB.
const MATRIX_PART_CHARS: usize = 8000;

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

impl MatrixError {
    /// Errors a later attempt may not repeat (the server was down), as opposed to ones only the
    /// operator can fix.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MatrixError::Unreachable { .. })
    }
}

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

/// A Matrix error answer means the server is up and said no (`refused`); anything else means it
/// could not be reached.
fn http_error(
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

fn login_refused(settings: &MatrixSettings) -> impl FnOnce(String) -> MatrixError + '_ {
    |reason| MatrixError::LoginRefused {
        user: settings.user_id.clone(),
        reason,
    }
}

/// Who sent recent events (the bot or not), so replies and thread roots are checked without
/// a request each time; senders never change, so entries never go stale, only old.
#[derive(Default)]
struct Senders {
    by_bot: HashMap<OwnedEventId, bool>,
    order: VecDeque<OwnedEventId>,
}

impl Senders {
    const KEEP: usize = 4096;

    fn insert(&mut self, id: OwnedEventId, by_bot: bool) {
        if self.by_bot.insert(id.clone(), by_bot).is_none() {
            self.order.push_back(id);
            if self.order.len() > Self::KEEP
                && let Some(old) = self.order.pop_front()
            {
                self.by_bot.remove(&old);
            }
        }
    }

    fn get(&self, id: &matrix_sdk::ruma::EventId) -> Option<bool> {
        self.by_bot.get(id).copied()
    }
}

/// State the event handlers share.
struct Shared {
    assistant: Arc<Assistant>,
    settings: MatrixSettings,
    user_id: OwnedUserId,
    display_name: String,
    /// Events from before this moment are backlog.
    started: MilliSecondsSinceUnixEpoch,
    senders: Mutex<Senders>,
    /// Whether each room is a DM, until its membership changes.
    direct: Mutex<HashMap<OwnedRoomId, bool>>,
    /// When each room was last told that a message could not be decrypted.
    undecryptable: Mutex<HashMap<OwnedRoomId, Instant>>,
}

impl Shared {
    fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.settings.edit_interval_ms.max(1)))
    }

    fn access(&self) -> crate::core::access::Access {
        self.assistant.config().access(PLATFORM)
    }

    fn remember_sender(&self, id: OwnedEventId, by_bot: bool) {
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, by_bot);
    }

    /// Whether an event in the room was sent by the bot: known senders first, else the server.
    async fn is_bots_event(&self, room: &Room, id: &matrix_sdk::ruma::EventId) -> bool {
        let known = self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id);
        if let Some(by_bot) = known {
            return by_bot;
        }
        match room.event(id, None).await {
            Ok(ev) => {
                let by_bot = ev
                    .raw()
                    .get_field::<OwnedUserId>("sender")
                    .ok()
                    .flatten()
                    .is_some_and(|s| s == self.user_id);
                self.remember_sender(id.to_owned(), by_bot);
                by_bot
            }
            Err(e) => {
                tracing::debug!(error = %e, event = %id, "cannot fetch the replied-to event");
                false
            }
        }
    }

    /// A room marked direct, or one with nobody but the bot and one other (joined or invited).
    /// Remembered per room until a membership changes, so busy rooms don't list their members
    /// for every message.
    async fn is_direct(&self, room: &Room) -> bool {
        let known = self
            .direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(room.room_id())
            .copied();
        if let Some(direct) = known {
            return direct;
        }
        let direct = room.is_direct().await.unwrap_or(false)
            || match room.members(RoomMemberships::ACTIVE).await {
                Ok(members) => members.len() <= 2,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list members");
                    return false;
                }
            };
        self.direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room.room_id().to_owned(), direct);
        direct
    }

    async fn on_message(self: Arc<Self>, ev: OriginalSyncRoomMessageEvent, room: Room) {
        if room.state() != RoomState::Joined || ev.sender == self.user_id {
            return;
        }
        if ev.origin_server_ts < self.started {
            tracing::debug!(event = %ev.event_id, "skipping a message from before the start");
            return;
        }
        if let Some(Relation::Replacement(r)) = &ev.content.relates_to {
            let body = match &r.new_content.msgtype {
                MessageType::Text(t) => t.body.clone(),
                _ => return,
            };
            match self
                .assistant
                .message_edited(PLATFORM, r.event_id.as_str(), &body)
                .await
            {
                Ok(true) => tracing::info!(event = %r.event_id, "question edited"),
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "cannot apply an edit"),
            }
            return;
        }
        // Notices are what bots send; answering them invites loops.
        let MessageType::Text(content) = &ev.content.msgtype else {
            return;
        };
        let body = trigger::strip_reply_fallback(&content.body);
        let formatted = content
            .formatted
            .as_ref()
            .map(|f| f.body.as_str())
            .unwrap_or("");
        let thread: Option<Thread> = match &ev.content.relates_to {
            Some(Relation::Thread(t)) => Some(t.clone()),
            _ => None,
        };
        let replied_to = match &ev.content.relates_to {
            Some(Relation::Reply(r)) => Some(r.in_reply_to.event_id.clone()),
            Some(Relation::Thread(t)) if !t.is_falling_back => {
                t.in_reply_to.as_ref().map(|r| r.event_id.clone())
            }
            _ => None,
        };
        let room_id = room.room_id().to_owned();
        let key = ConversationKey::new(
            PLATFORM,
            "",
            room_id.as_str(),
            thread.as_ref().map_or("", |t| t.event_id.as_str()),
        );
        let mentioned_ids = ev
            .content
            .mentions
            .as_ref()
            .is_some_and(|m| m.user_ids.contains(&self.user_id));
        let is_direct = self.is_direct(&room).await;
        let reply_to_bot = match &replied_to {
            Some(id) => self.is_bots_event(&room, id).await,
            None => false,
        };
        let in_bot_thread = match &thread {
            Some(t) => {
                matches!(
                    self.assistant.store().find_conversation(&key).await,
                    Ok(Some(_))
                ) || self.is_bots_event(&room, &t.event_id).await
            }
            None => false,
        };
        let facts = Facts {
            body: &body,
            formatted,
            mentioned_ids,
            bot_id: self.user_id.as_str(),
            bot_name: &self.display_name,
            command_prefix: &self.settings.command_prefix,
            is_direct,
            reply_to_bot,
            in_bot_thread,
            always_answer: self
                .settings
                .always_answer
                .iter()
                .any(|r| r == room_id.as_str()),
        };
        let Some(request) = trigger::classify(&facts).into_request() else {
            return;
        };
        let name = match room.get_member_no_sync(&ev.sender).await {
            Ok(Some(m)) => m.name().to_string(),
            _ => ev.sender.localpart().to_string(),
        };
        let incoming = Incoming {
            key,
            author: Author {
                id: ev.sender.to_string(),
                name,
                roles: Vec::new(),
            },
            request,
            message_id: Some(ev.event_id.to_string()),
            is_private: is_direct,
            remember: true,
        };
        let interval = self.interval();
        let sink = StreamedReply::new(
            MatrixSurface {
                room,
                question: Question {
                    event_id: ev.event_id.clone(),
                    sender: ev.sender.clone(),
                    thread,
                },
                shared: self.clone(),
            },
            interval,
        );
        let assistant = self.assistant.clone();
        let span = tracing::info_span!("matrix", room = %room_id, event = %ev.event_id);
        // Replies run beside the sync loop, never inside it: a send in an encrypted room can wait
        // on a key query that only the next sync makes.
        tokio::spawn(
            async move {
                let outcome = assistant.handle(incoming, &sink).await;
                tracing::debug!(?outcome, "handled");
                sink.end_typing().await;
            }
            .instrument(span),
        );
    }

    async fn on_redaction(self: Arc<Self>, ev: OriginalSyncRoomRedactionEvent) {
        let Some(id) = ev.redacts.clone().or(ev.content.redacts.clone()) else {
            return;
        };
        match self.assistant.message_deleted(PLATFORM, id.as_str()).await {
            Ok(true) => tracing::info!(event = %id, "redacted question removed from memory"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot apply a redaction"),
        }
    }

    async fn on_undecryptable(self: Arc<Self>, ev: OriginalSyncRoomEncryptedEvent, room: Room) {
        if ev.sender == self.user_id || ev.origin_server_ts < self.started {
            return;
        }
        tracing::warn!(room = %room.room_id(), event = %ev.event_id, sender = %ev.sender, "cannot decrypt a message");
        let due = {
            let mut last = self.undecryptable.lock().unwrap_or_else(|e| e.into_inner());
            let due = last
                .get(room.room_id())
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
            if due {
                last.insert(room.room_id().to_owned(), Instant::now());
            }
            due
        };
        if due {
            let content = RoomMessageEventContent::notice_plain(text::UNDECRYPTABLE);
            tokio::spawn(async move {
                if let Err(e) = room.send(content).await {
                    tracing::warn!(error = %e, "cannot send the decryption notice");
                }
            });
        }
    }

    async fn on_invite(self: Arc<Self>, ev: StrippedRoomMemberEvent, room: Room) {
        if ev.state_key != self.user_id || room.state() != RoomState::Invited {
            return;
        }
        let room_id = room.room_id().to_owned();
        if !self.access().admits(ev.sender.as_str(), room_id.as_str()) {
            tracing::info!(room = %room_id, inviter = %ev.sender, "declining an invite from someone not allowed");
            if let Err(e) = room.leave().await {
                tracing::warn!(error = %e, "cannot decline the invite");
            }
            return;
        }
        tokio::spawn(async move {
            // Synapse can refuse a join that races the invite; try again for about a minute.
            let mut wait = Duration::from_millis(500);
            for attempt in 1..=8 {
                match room.join().await {
                    Ok(()) => {
                        tracing::info!(room = %room_id, inviter = %ev.sender, "joined");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(room = %room_id, attempt, error = %e, "cannot join yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(16));
                    }
                }
            }
            tracing::error!(room = %room_id, "giving up joining");
        });
    }

    /// Leaves a room once nobody it is there for remains.
    async fn on_member(self: Arc<Self>, ev: OriginalSyncRoomMemberEvent, room: Room) {
        self.direct
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(room.room_id());
        if room.state() != RoomState::Joined
            || ev.state_key == self.user_id
            || !matches!(
                ev.content.membership,
                MembershipState::Leave | MembershipState::Ban
            )
        {
            return;
        }
        let members = match room.members(RoomMemberships::JOIN).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list members");
                return;
            }
        };
        let access = self.access();
        let anyone = members
            .iter()
            .any(|m| m.user_id() != self.user_id && access.admits_user(m.user_id().as_str()));
        if !anyone {
            tracing::info!(room = %room.room_id(), "leaving a room with nobody allowed left");
            if let Err(e) = room.leave().await {
                tracing::warn!(error = %e, "cannot leave the room");
            }
        }
    }
}

/// The message being answered.
struct Question {
    event_id: OwnedEventId,
    sender: OwnedUserId,
    thread: Option<Thread>,
}

/// Posting and editing the events of one reply: `m.notice`s replying to the question (in its
/// thread, if any), Markdown rendered to HTML, edited by `m.replace`.
struct MatrixSurface {
    room: Room,
    question: Question,
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl Surface for MatrixSurface {
    type Id = OwnedEventId;
    type Error = matrix_sdk::Error;

    fn limit(&self) -> usize {
        MATRIX_PART_CHARS
    }

    async fn post(&self, _index: usize, part: &str) -> matrix_sdk::Result<OwnedEventId> {
        let q = &self.question;
        let content = RoomMessageEventContentWithoutRelation::notice_markdown(part).make_reply_to(
            ReplyMetadata::new(&q.event_id, &q.sender, q.thread.as_ref()),
            ForwardThread::Yes,
            AddMentions::No,
        );
        let id = self.room.send(content).await?.response.event_id;
        self.shared.remember_sender(id.clone(), true);
        Ok(id)
    }

    async fn edit(&self, _index: usize, id: &OwnedEventId, part: &str) -> matrix_sdk::Result<()> {
        let content = RoomMessageEventContentWithoutRelation::notice_markdown(part)
            .make_replacement(ReplacementMetadata::new(id.clone(), None));
        self.room.send(content).await?;
        Ok(())
    }

    /// A notice lasts 4 s; matrix-sdk resends it at most every 3 s.
    fn typing_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(3))
    }

    async fn set_typing(&self, on: bool) {
        if let Err(e) = self.room.typing_notice(on).await {
            tracing::debug!(error = %e, "typing notice failed");
        }
    }
}

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
        let store = PathBuf::from(&settings.store_path);
        let store_str = store.display().to_string();
        let store_error = |e: &dyn std::fmt::Display| MatrixError::Store {
            path: store_str.clone(),
            reason: e.to_string(),
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&store)
                .map_err(|e| store_error(&e))?;
        }
        let session_file = session_path(&store);
        let saved: Option<SavedSession> = match std::fs::read(&session_file) {
            Ok(bytes) => Some(
                serde_json::from_slice(&bytes).map_err(|e| MatrixError::Store {
                    path: session_file.display().to_string(),
                    reason: format!("unreadable session file: {e}"),
                })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(store_error(&e)),
        };
        if saved.is_none() && store.join("matrix-sdk-crypto.sqlite3").exists() {
            return Err(MatrixError::OrphanStore { path: store_str });
        }
        let passphrase =
            (!settings.store_passphrase.is_empty()).then_some(settings.store_passphrase.as_str());
        let client = Client::builder()
            .homeserver_url(&settings.homeserver)
            .sqlite_store(&store, passphrase)
            .with_encryption_settings(EncryptionSettings {
                auto_enable_cross_signing: true,
                backup_download_strategy: BackupDownloadStrategy::AfterDecryptionFailure,
                auto_enable_backups: false,
            })
            .build()
            .await
            .map_err(|e| store_error(&e))?;
        let unreachable = |reason: String| MatrixError::Unreachable {
            homeserver: settings.homeserver.clone(),
            reason,
        };
        if let Err(e) = client.server_versions().await {
            return Err(unreachable(e.to_string()));
        }

        match saved {
            Some(saved) => {
                client
                    .matrix_auth()
                    .restore_session(saved.session, RoomLoadSettings::default())
                    .await
                    .map_err(|e| store_error(&e))?;
                if let Err(e) = client.whoami().await {
                    return Err(http_error(&e, &settings.homeserver, |reason| {
                        MatrixError::SessionRefused {
                            path: store_str,
                            reason,
                        }
                    }));
                }
                tracing::info!(user = %settings.user_id, "Matrix session restored");
            }
            None if !settings.password.is_empty() => {
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
                        other => store_error(&other),
                    });
                }
                tracing::info!(user = %settings.user_id, "logged in to Matrix as a new device");
            }
            None if !settings.access_token.is_empty() => {
                let meta = token_owner(settings).await?;
                client
                    .matrix_auth()
                    .restore_session(
                        MatrixSession {
                            meta,
                            tokens: SessionTokens {
                                access_token: settings.access_token.clone(),
                                refresh_token: None,
                            },
                        },
                        RoomLoadSettings::default(),
                    )
                    .await
                    .map_err(|e| store_error(&e))?;
                tracing::info!(user = %settings.user_id, "using the configured Matrix access token");
            }
            None => return Err(MatrixError::NoCredentials { path: store_str }),
        }
        let Some(session) = client.matrix_auth().session() else {
            return Err(store_error(&"no session after login"));
        };
        save_session(
            &session_file,
            &SavedSession {
                homeserver: settings.homeserver.clone(),
                session,
            },
        )
        .map_err(|e| store_error(&e))?;

        if !settings.recovery_key.is_empty() {
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

        let user_id = client
            .user_id()
            .map(|u| u.to_owned())
            .ok_or_else(|| store_error(&"no user id after login"))?;
        let display_name = match client.account().get_display_name().await {
            Ok(Some(n)) if !n.trim().is_empty() => n,
            _ => user_id.localpart().to_string(),
        };
        let shared = Arc::new(Shared {
            assistant,
            settings: settings.clone(),
            user_id,
            display_name,
            started: MilliSecondsSinceUnixEpoch::now(),
            senders: Mutex::new(Senders::default()),
            direct: Mutex::new(HashMap::new()),
            undecryptable: Mutex::new(HashMap::new()),
        });

        // Invites that arrived while the bot was away are still wanted.
        let s = shared.clone();
        client.add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
            let s = s.clone();
            async move { s.on_invite(ev, room).await }
        });
        // The first sync brings the backlog; no message handler sees it.
        let first = client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .map_err(|e| match e {
                matrix_sdk::Error::Http(h) => unreachable(h.to_string()),
                other => store_error(&other),
            })?;
        let s = shared.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
            let s = s.clone();
            async move { s.on_message(ev, room).await }
        });
        let s = shared.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomRedactionEvent| {
            let s = s.clone();
            async move { s.on_redaction(ev).await }
        });
        let s = shared.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent, room: Room| {
            let s = s.clone();
            async move { s.on_undecryptable(ev, room).await }
        });
        let s = shared.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMemberEvent, room: Room| {
            let s = s.clone();
            async move { s.on_member(ev, room).await }
        });
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
                _ = super::until_stopped(&mut stopped) => return Ok(()),
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
                            _ = super::until_stopped(&mut stopped) => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }
}

/// Asks the server whose access token this is, for the device id a session needs.
async fn token_owner(settings: &MatrixSettings) -> Result<SessionMeta, MatrixError> {
    let probe = Client::builder()
        .homeserver_url(&settings.homeserver)
        .build()
        .await
        .map_err(|e| MatrixError::Unreachable {
            homeserver: settings.homeserver.clone(),
            reason: e.to_string(),
        })?;
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
                tokens: SessionTokens {
                    access_token: settings.access_token.clone(),
                    refresh_token: None,
                },
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
