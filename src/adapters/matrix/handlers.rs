//! The event handlers and their registration: messages (questions, and edits of them),
//! redactions, messages that cannot be decrypted, and membership changes (whose handling lives in
//! `rooms`). Invites are watched from before the first sync; everything else only after it, so
//! no handler sees the backlog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use matrix_sdk::ruma::events::relation::Thread;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::member::{
    OriginalSyncRoomMemberEvent, StrippedRoomMemberEvent,
};
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::room::redaction::OriginalSyncRoomRedactionEvent;
use matrix_sdk::{Client, Room, RoomState};
use tracing::Instrument;

use super::PLATFORM;
use super::shared::Shared;
use super::surface::{MatrixSurface, Question};
use super::trigger::{self, Facts};
use crate::adapters::stream::StreamedReply;
use crate::chat::{Author, ConversationKey, Incoming};
use crate::core::text;

/// Handles invites, including those that arrived while the bot was away.
pub(super) fn watch_invites(client: &Client, shared: &Arc<Shared>) {
    let s = shared.clone();
    client.add_event_handler(move |ev: StrippedRoomMemberEvent, room: Room| {
        let s = s.clone();
        async move { s.on_invite(ev, room).await }
    });
}

/// Handles messages, redactions, undecryptable messages and membership changes from now on.
pub(super) fn watch_rooms(client: &Client, shared: &Arc<Shared>) {
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
}

impl Shared {
    /// Answers a text message meant for the bot, beside the sync loop; an edit of a question
    /// updates what the core remembers instead.
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
        let span = tracing::info_span!("room_event", room = %room_id, event = %ev.event_id);
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

    /// Forgets a question that was redacted.
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

    /// Logs a message that cannot be decrypted and tells its room so, at most once an hour.
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
}
