//! Where a Discord reply is written: [`DiscordSurface`] posts and edits the messages of one
//! streamed reply, in a channel (as a reply to the question) or as an interaction's response
//! and follow-ups, with every mention disabled and 429s retried with back-off.

use std::sync::Arc;
use std::time::Duration;

use serenity::all::{
    ChannelId, CommandInteraction, CreateAllowedMentions, CreateInteractionResponseFollowup,
    CreateMessage, EditInteractionResponse, EditMessage, Message, MessageId,
};
use serenity::http::Http;

use crate::adapters::split::DISCORD_LIMIT;
use crate::adapters::stream::{StreamedReply, Surface};

fn is_rate_limited(e: &serenity::Error) -> bool {
    matches!(e, serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(r)) if r.status_code.as_u16() == 429)
}

/// Retries a request Discord answered with 429, backing off 1 s, 2 s, 4 s, 8 s.
async fn with_backoff<T, F, Fut>(what: &str, f: F) -> serenity::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = serenity::Result<T>>,
{
    let mut wait = Duration::from_secs(1);
    for _ in 0..4 {
        match f().await {
            Err(e) if is_rate_limited(&e) => {
                tracing::warn!(
                    request = what,
                    wait_s = wait.as_secs(),
                    "Discord rate limit; backing off"
                );
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
    f().await
}

pub(super) fn no_mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new()
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
    http: Arc<Http>,
    target: Target,
    /// Messages of the same interaction answered before this reply (a follow-up starts at 1).
    offset: usize,
}

impl DiscordSurface {
    /// The interaction's deferred response is its first message: posting and editing it are
    /// the same request.
    async fn edit_response(
        &self,
        interaction: &CommandInteraction,
        content: &str,
    ) -> serenity::Result<Message> {
        with_backoff("edit response", || {
            interaction.edit_response(
                &self.http,
                EditInteractionResponse::new()
                    .content(content)
                    .allowed_mentions(no_mentions()),
            )
        })
        .await
    }
}

#[async_trait::async_trait]
impl Surface for DiscordSurface {
    type Id = MessageId;
    type Error = serenity::Error;

    fn limit(&self) -> usize {
        DISCORD_LIMIT
    }

    async fn post(&self, index: usize, content: &str) -> serenity::Result<MessageId> {
        let index = index + self.offset;
        match &self.target {
            Target::Channel { channel, reply_to } => {
                let msg = with_backoff("send message", || {
                    let mut m = CreateMessage::new()
                        .content(content)
                        .allowed_mentions(no_mentions());
                    if index == 0
                        && let Some(q) = reply_to
                    {
                        m = m.reference_message((*channel, *q));
                    }
                    channel.send_message(&self.http, m)
                })
                .await?;
                Ok(msg.id)
            }
            Target::Interaction {
                interaction,
                ephemeral,
            } => {
                if index == 0 {
                    Ok(self.edit_response(interaction, content).await?.id)
                } else {
                    let msg = with_backoff("follow-up", || {
                        interaction.create_followup(
                            &self.http,
                            CreateInteractionResponseFollowup::new()
                                .content(content)
                                .ephemeral(*ephemeral)
                                .allowed_mentions(no_mentions()),
                        )
                    })
                    .await?;
                    Ok(msg.id)
                }
            }
        }
    }

    async fn edit(&self, index: usize, id: &MessageId, content: &str) -> serenity::Result<()> {
        let (index, id) = (index + self.offset, *id);
        match &self.target {
            Target::Channel { channel, .. } => {
                with_backoff("edit message", || {
                    channel.edit_message(
                        &self.http,
                        id,
                        EditMessage::new()
                            .content(content)
                            .allowed_mentions(no_mentions()),
                    )
                })
                .await?;
            }
            Target::Interaction { interaction, .. } => {
                if index == 0 {
                    self.edit_response(interaction, content).await?;
                } else {
                    with_backoff("edit follow-up", || {
                        interaction.edit_followup(
                            &self.http,
                            id,
                            CreateInteractionResponseFollowup::new()
                                .content(content)
                                .allowed_mentions(no_mentions()),
                        )
                    })
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// Only channels show typing; Discord shows it for about 10 s and ends it with the message.
    fn typing_interval(&self) -> Option<Duration> {
        matches!(self.target, Target::Channel { .. }).then_some(Duration::from_secs(8))
    }

    async fn set_typing(&self, on: bool) {
        if let (true, Target::Channel { channel, .. }) = (on, &self.target)
            && let Err(e) = channel.broadcast_typing(&self.http).await
        {
            tracing::debug!(error = %e, "typing indicator failed");
        }
    }
}

pub(super) fn discord_reply(
    http: Arc<Http>,
    target: Target,
    interval: Duration,
    offset: usize,
) -> StreamedReply<DiscordSurface> {
    StreamedReply::new(
        DiscordSurface {
            http,
            target,
            offset,
        },
        interval,
    )
}
