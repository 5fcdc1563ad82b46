//! Where a Discord reply is written: [`DiscordSurface`] posts and edits the messages of one
//! streamed reply, in a channel (as a reply to the question) or as an interaction's response
//! and follow-ups, with every mention disabled, through [`Rest`] (shared limit, retries). An
//! edit Discord keeps refusing to take is not lost: the rest of the text goes out as a new
//! message, so what the channel shows still adds up to the stored reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serenity::all::{
    ChannelId, CommandInteraction, CreateAllowedMentions, CreateInteractionResponseFollowup,
    CreateMessage, EditInteractionResponse, EditMessage, Message, MessageId, Nonce,
};
use serenity::http::{LightMethod, Request, Route};

use super::rest::{Priority, Rest, RestError};
use super::typing::{ChannelTyping, RENEW_EVERY};
use crate::adapters::split::DISCORD_LIMIT;
use crate::adapters::stream::{Render, StreamedReply, Surface, TypingHold};
use crate::core::text;

pub(super) fn no_mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new()
}

fn body(what: &str, builder: &impl serde::Serialize) -> Result<Vec<u8>, RestError> {
    serde_json::to_vec(builder).map_err(|e| RestError::Invalid(format!("{what}: {e}")))
}

/// Whether `text` is a queue notice (`text::queued` with some place in it).
fn is_queue_notice(text: &str) -> bool {
    let shape = |t: &str| -> String { t.chars().filter(|c| !c.is_ascii_digit()).collect() };
    text.chars().any(|c| c.is_ascii_digit()) && shape(text) == shape(&text::queued(0))
}

/// A queue notice can wait for a free request; any other text is what a user waits for.
fn priority_of(content: &str) -> Priority {
    if is_queue_notice(content) {
        Priority::Normal
    } else {
        Priority::Urgent
    }
}

/// A nonce Discord keeps for a few minutes with `enforce_nonce`: a post retried after a lost
/// answer is not shown twice.
fn nonce() -> Nonce {
    Nonce::String(format!("{:x}", rand::random::<u64>()))
}

/// Where a reply goes: a channel (as a reply to the question) or an interaction's response.
pub(super) enum Target {
    Channel {
        channel: ChannelId,
        reply_to: Option<MessageId>,
    },
    Interaction {
        interaction: Box<CommandInteraction>,
        ephemeral: bool,
    },
}

/// Posting and editing the messages of one reply, in a channel or an interaction's response.
pub(super) struct DiscordSurface {
    rest: Arc<Rest>,
    typing: Arc<ChannelTyping>,
    target: Target,
    /// Messages of the same interaction answered before this reply (a follow-up starts at 1).
    offset: usize,
    /// What each message of the reply shows, as Discord last took it.
    shown: Mutex<HashMap<MessageId, String>>,
    /// A message whose edits kept failing, and the message its text continues in.
    continued: Mutex<HashMap<MessageId, MessageId>>,
}

impl DiscordSurface {
    fn shows(&self, id: MessageId) -> Option<String> {
        self.shown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn record(&self, id: MessageId, content: &str) {
        self.shown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, content.to_string());
    }

    fn continuation(&self, id: MessageId) -> Option<MessageId> {
        self.continued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }

    /// A channel message, quoting `reply_to` when given.
    async fn post_in_channel(
        &self,
        channel: ChannelId,
        reply_to: Option<MessageId>,
        content: &str,
    ) -> Result<MessageId, RestError> {
        let mut m = CreateMessage::new()
            .content(content)
            .allowed_mentions(no_mentions())
            .nonce(nonce())
            .enforce_nonce(true);
        if let Some(q) = reply_to {
            m = m.reference_message((channel, q));
        }
        let req = Request::new(
            Route::ChannelMessages {
                channel_id: channel,
            },
            LightMethod::Post,
        )
        .body(Some(body("send message", &m)?));
        let msg: Message = self
            .rest
            .json("send message", priority_of(content), req)
            .await?;
        Ok(msg.id)
    }

    async fn post_followup(
        &self,
        interaction: &CommandInteraction,
        ephemeral: bool,
        content: &str,
    ) -> Result<MessageId, RestError> {
        let f = CreateInteractionResponseFollowup::new()
            .content(content)
            .ephemeral(ephemeral)
            .allowed_mentions(no_mentions());
        let req = Request::new(
            Route::WebhookFollowupMessages {
                application_id: interaction.application_id,
                token: &interaction.token,
            },
            LightMethod::Post,
        )
        .body(Some(body("follow-up", &f)?));
        let msg: Message = self
            .rest
            .json("follow-up", priority_of(content), req)
            .await?;
        Ok(msg.id)
    }

    /// The interaction's deferred response is its first message: posting and editing it are
    /// the same request.
    async fn edit_response(
        &self,
        interaction: &CommandInteraction,
        content: &str,
    ) -> Result<MessageId, RestError> {
        let e = EditInteractionResponse::new()
            .content(content)
            .allowed_mentions(no_mentions());
        let req = Request::new(
            Route::WebhookOriginalInteractionResponse {
                application_id: interaction.application_id,
                token: &interaction.token,
            },
            LightMethod::Patch,
        )
        .body(Some(body("edit response", &e)?));
        let msg: Message = self
            .rest
            .json("edit response", priority_of(content), req)
            .await?;
        Ok(msg.id)
    }

    /// One edit of message `id` (`response`: the interaction's own response). An `optional`
    /// one goes only if the request limit has room now; `Ok(false)` when it was skipped.
    async fn edit_once(
        &self,
        response: bool,
        id: MessageId,
        content: &str,
        optional: bool,
    ) -> Result<bool, RestError> {
        let (what, req) = match &self.target {
            Target::Channel { channel, .. } => {
                let e = EditMessage::new()
                    .content(content)
                    .allowed_mentions(no_mentions());
                let route = Route::ChannelMessage {
                    channel_id: *channel,
                    message_id: id,
                };
                let body = body("edit message", &e)?;
                (
                    "edit message",
                    Request::new(route, LightMethod::Patch).body(Some(body)),
                )
            }
            Target::Interaction { interaction, .. } if response => {
                let e = EditInteractionResponse::new()
                    .content(content)
                    .allowed_mentions(no_mentions());
                let route = Route::WebhookOriginalInteractionResponse {
                    application_id: interaction.application_id,
                    token: &interaction.token,
                };
                let body = body("edit response", &e)?;
                (
                    "edit response",
                    Request::new(route, LightMethod::Patch).body(Some(body)),
                )
            }
            Target::Interaction { interaction, .. } => {
                let f = CreateInteractionResponseFollowup::new()
                    .content(content)
                    .allowed_mentions(no_mentions());
                let route = Route::WebhookFollowupMessage {
                    application_id: interaction.application_id,
                    token: &interaction.token,
                    message_id: id,
                };
                let body = body("edit follow-up", &f)?;
                (
                    "edit follow-up",
                    Request::new(route, LightMethod::Patch).body(Some(body)),
                )
            }
        };
        if optional {
            return self
                .rest
                .try_once(req)
                .await
                .transpose()
                .map(|r| r.is_some());
        }
        self.rest
            .empty(what, Priority::Urgent, req)
            .await
            .map(|()| true)
    }

    /// A new message after the reply's others, for text an edit could not show.
    async fn post_continuation(&self, content: &str) -> Result<MessageId, RestError> {
        match &self.target {
            Target::Channel { channel, .. } => self.post_in_channel(*channel, None, content).await,
            Target::Interaction {
                interaction,
                ephemeral,
            } => self.post_followup(interaction, *ephemeral, content).await,
        }
    }

    /// Where the reply's ids go in the log.
    fn place(&self) -> (Option<ChannelId>, Option<MessageId>, Option<u64>) {
        match &self.target {
            Target::Channel { channel, reply_to } => (Some(*channel), *reply_to, None),
            Target::Interaction { interaction, .. } => (
                Some(interaction.channel_id),
                None,
                Some(interaction.id.get()),
            ),
        }
    }
}

#[async_trait::async_trait]
impl Surface for DiscordSurface {
    type Id = MessageId;
    type Error = RestError;

    fn limit(&self) -> usize {
        DISCORD_LIMIT
    }

    async fn post(&self, index: usize, content: &str) -> Result<MessageId, RestError> {
        let index = index + self.offset;
        let posted = match &self.target {
            Target::Channel { channel, reply_to } => {
                let quote = if index == 0 { *reply_to } else { None };
                self.post_in_channel(*channel, quote, content).await
            }
            Target::Interaction {
                interaction,
                ephemeral,
            } => {
                if index == 0 {
                    self.edit_response(interaction, content).await
                } else {
                    self.post_followup(interaction, *ephemeral, content).await
                }
            }
        };
        match posted {
            Ok(id) => {
                self.record(id, content);
                Ok(id)
            }
            Err(e) => {
                let (channel, question, interaction) = self.place();
                tracing::error!(?channel, ?question, ?interaction, part = index, error = %e, "cannot post a part of the reply");
                Err(e)
            }
        }
    }

    /// Edits message `id`; where an earlier edit of it kept failing, the text past what it
    /// still shows goes to the message continuing it. When this edit keeps failing too, the
    /// rest is posted as a new message. Progress goes only while the request limit has room
    /// now: under load the answers' first posts and final texts come first.
    async fn edit(
        &self,
        index: usize,
        id: &MessageId,
        content: &str,
        render: Render,
    ) -> Result<bool, RestError> {
        // The interaction's response is its first message; continuations are follow-ups.
        let mut response = index + self.offset == 0;
        let (mut id, mut content) = (*id, content.to_string());
        while let Some(next) = self.continuation(id) {
            let stuck = self.shows(id).unwrap_or_default();
            match content.strip_prefix(stuck.as_str()) {
                Some(rest) => {
                    content = rest.to_string();
                    id = next;
                    response = false;
                }
                None => break,
            }
        }
        let before = self.shows(id).unwrap_or_default();
        if before == content {
            return Ok(true);
        }
        // The answer taking over its queue notice is never skipped: the notice would go on
        // saying the question waits.
        let takes_over_notice = is_queue_notice(&before) && !is_queue_notice(&content);
        let optional = render == Render::Progress && !takes_over_notice;
        let (channel, question, interaction) = self.place();
        let error = match self.edit_once(response, id, &content, optional).await {
            Ok(sent) => {
                if sent {
                    self.record(id, &content);
                }
                return Ok(sent);
            }
            Err(e) if optional => {
                tracing::debug!(?channel, ?question, message = %id, error = %e, "a progress edit was skipped");
                return Ok(false);
            }
            Err(e) => e,
        };
        let rest = content
            .strip_prefix(before.as_str())
            .filter(|r| !r.trim().is_empty());
        let (true, Some(rest)) = (error.is_retryable(), rest) else {
            tracing::error!(?channel, ?question, ?interaction, message = %id, error = %error,
                "cannot edit the reply; the message shows older text");
            return Err(error);
        };
        match self.post_continuation(rest).await {
            Ok(next) => {
                tracing::warn!(?channel, ?question, ?interaction, message = %id, continued_in = %next, error = %error,
                    "an edit kept failing; the rest of the reply continues in a new message");
                self.record(next, rest);
                self.continued
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, next);
                Ok(true)
            }
            Err(e) => {
                tracing::error!(?channel, ?question, ?interaction, message = %id, edit_error = %error, error = %e,
                    "an edit kept failing and the rest of the reply could not be posted either");
                Err(e)
            }
        }
    }

    /// A channel message can be edited by id after a restart; an interaction's messages only
    /// through its token, which expires.
    fn lasting_id(&self, id: &MessageId) -> Option<String> {
        matches!(self.target, Target::Channel { .. }).then(|| id.get().to_string())
    }

    /// Only channels show typing; Discord shows it for about 10 s and ends it with the message.
    fn typing_interval(&self) -> Option<Duration> {
        matches!(self.target, Target::Channel { .. }).then_some(RENEW_EVERY)
    }

    /// Discord's indicator ends by itself; it is the channel's loop that stops.
    async fn set_typing(&self, _on: bool) {}

    /// One indicator per channel, shared by every reply in progress there.
    fn hold_typing(self: Arc<Self>) -> Option<TypingHold> {
        match &self.target {
            Target::Channel { channel, .. } => Some(TypingHold::new(self.typing.hold(*channel))),
            Target::Interaction { .. } => None,
        }
    }
}

/// What every reply needs from the adapter: the way to Discord and the channels' indicators.
#[derive(Clone)]
pub(super) struct Replies {
    pub(super) rest: Arc<Rest>,
    pub(super) typing: Arc<ChannelTyping>,
}

impl Replies {
    pub(super) fn new(rest: Arc<Rest>) -> Self {
        Self {
            typing: ChannelTyping::new(rest.clone()),
            rest,
        }
    }

    fn surface(&self, target: Target, offset: usize) -> DiscordSurface {
        DiscordSurface {
            rest: self.rest.clone(),
            typing: self.typing.clone(),
            target,
            offset,
            shown: Mutex::new(HashMap::new()),
            continued: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn reply(
        &self,
        target: Target,
        interval: Duration,
        offset: usize,
    ) -> StreamedReply<DiscordSurface> {
        StreamedReply::new(self.surface(target, offset), interval)
    }

    /// A reply going on in channel messages an earlier process posted (see
    /// [`StreamedReply::showing`]).
    pub(super) fn reply_showing(
        &self,
        channel: ChannelId,
        reply_to: Option<MessageId>,
        interval: Duration,
        notices: usize,
        ids: Vec<MessageId>,
    ) -> StreamedReply<DiscordSurface> {
        let target = Target::Channel { channel, reply_to };
        StreamedReply::showing(self.surface(target, 0), interval, notices, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_notices_are_recognised_whatever_the_place() {
        assert!(is_queue_notice(&text::queued(2)));
        assert!(is_queue_notice(&text::queued(1234)));
        assert!(!is_queue_notice("Hello there"));
        assert!(!is_queue_notice(text::BUSY));
        assert!(!is_queue_notice(&format!("{} 12", text::queued(3))));
    }
}
