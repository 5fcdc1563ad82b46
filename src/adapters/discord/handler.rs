//! Serenity's event handler: turns gateway events (messages, edits, deletes, slash commands,
//! threads) into calls on the core, and decides which conversation each belongs to.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serenity::all::{
    ApplicationId, ChannelId, CommandDataOptionValue, CommandInteraction, Context, CreateCommand,
    CreateInteractionResponse, CreateInteractionResponseMessage, EventHandler, GuildChannel,
    GuildId, Interaction, Message, MessageId, MessageType, MessageUpdateEvent, Ready, UserId,
};
use serenity::http::{LightMethod, Request as HttpRequest, Route};

use super::rest::{Priority, Rest, RestError};
use super::slash::{self, slash_requests};
use super::surface::{Replies, Target};
use super::trigger::{Facts, classify, strip_mention};
use crate::chat::{Author, ConversationKey, Incoming, Platform, Request};
use crate::config::DiscordSettings;
use crate::core::{Assistant, PendingQuestion, ReplySink, ResumeSinks};

/// Serenity's event handler: turns events into calls on the core.
pub(super) struct Handler {
    assistant: Arc<Assistant>,
    settings: DiscordSettings,
    /// Known before the gateway connects (the token check asks who we are): serenity runs
    /// handlers concurrently, so a message in the same burst as READY may be handled first.
    bot_id: UserId,
    bot_threads: Mutex<HashSet<ChannelId>>,
    /// Every request to Discord after connecting goes this way: one limit, retries.
    replies: Replies,
}

impl Handler {
    /// A handler for the bot user `bot_id`, knowing no thread it started yet.
    pub(super) fn new(
        assistant: Arc<Assistant>,
        settings: DiscordSettings,
        bot_id: UserId,
        rest: Arc<Rest>,
    ) -> Self {
        Self {
            assistant,
            settings,
            bot_id,
            bot_threads: Mutex::new(HashSet::new()),
            replies: Replies::new(rest),
        }
    }

    fn rest(&self) -> &Rest {
        &self.replies.rest
    }

    fn bot_id(&self) -> u64 {
        self.bot_id.get()
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.settings.edit_interval_ms.max(1)))
    }

    /// A channel is a conversation, a DM another, a thread its own: (guild, parent, thread),
    /// so allow-lists by channel cover the channel's threads.
    fn key(ctx: &Context, guild: Option<GuildId>, channel: ChannelId) -> ConversationKey {
        let Some(g) = guild else {
            return ConversationKey::new(Platform::Discord, "", &channel.to_string(), "");
        };
        let parent = ctx.cache.guild(g).and_then(|guild| {
            guild
                .threads
                .iter()
                .find(|t| t.id == channel)
                .and_then(|t| t.parent_id)
        });
        match parent {
            Some(p) => ConversationKey::new(
                Platform::Discord,
                &g.to_string(),
                &p.to_string(),
                &channel.to_string(),
            ),
            None => {
                ConversationKey::new(Platform::Discord, &g.to_string(), &channel.to_string(), "")
            }
        }
    }

    async fn on_message(&self, ctx: Context, msg: Message) {
        let bot_id = self.bot_id();
        let facts = Facts {
            bot_id,
            content: &msg.content,
            author_is_bot: msg.author.bot,
            is_regular: matches!(msg.kind, MessageType::Regular | MessageType::InlineReply),
            is_dm: msg.guild_id.is_none(),
            mentions_bot: msg.mentions.iter().any(|u| u.id.get() == bot_id),
            replies_to_bot: msg
                .referenced_message
                .as_ref()
                .is_some_and(|r| r.author.id.get() == bot_id),
            in_bot_thread: self
                .bot_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&msg.channel_id),
            always_answer: self
                .settings
                .always_answer
                .contains(&msg.channel_id.to_string()),
            prefix: &self.settings.command_prefix,
        };
        let Some(request) = classify(&facts).into_request() else {
            return;
        };
        let name = msg
            .member
            .as_ref()
            .and_then(|m| m.nick.clone())
            .or_else(|| msg.author.global_name.clone())
            .unwrap_or_else(|| msg.author.name.clone());
        let incoming = Incoming {
            key: Self::key(&ctx, msg.guild_id, msg.channel_id),
            author: Author {
                id: msg.author.id.to_string(),
                name,
                roles: msg
                    .member
                    .as_ref()
                    .map(|m| m.roles.iter().map(|r| r.to_string()).collect())
                    .unwrap_or_default(),
            },
            request,
            message_id: Some(msg.id.to_string()),
            is_private: msg.guild_id.is_none(),
            remember: true,
        };
        let sink = self.replies.reply(
            Target::Channel {
                channel: msg.channel_id,
                reply_to: Some(msg.id),
            },
            self.interval(),
            0,
        );
        self.assistant.handle(incoming, &sink).await;
    }

    /// Acknowledges the interaction, its answer to follow by editing the response.
    async fn defer(&self, cmd: &CommandInteraction, ephemeral: bool) -> Result<(), RestError> {
        let mut message = CreateInteractionResponseMessage::new();
        if ephemeral {
            message = message.ephemeral(true);
        }
        let response = CreateInteractionResponse::Defer(message);
        let body = serde_json::to_vec(&response)
            .map_err(|e| RestError::Invalid(format!("deferral: {e}")))?;
        let req = HttpRequest::new(
            Route::InteractionResponse {
                interaction_id: cmd.id,
                token: &cmd.token,
            },
            LightMethod::Post,
        )
        .body(Some(body));
        // Discord drops an interaction not answered within 3 s.
        self.rest()
            .empty("defer interaction", Priority::Urgent, req)
            .await
    }

    /// Replaces the slash commands, globally or in one guild.
    async fn register(
        &self,
        app: ApplicationId,
        guild: Option<GuildId>,
        commands: &[CreateCommand],
    ) -> Result<(), RestError> {
        let body = serde_json::to_vec(commands)
            .map_err(|e| RestError::Invalid(format!("slash commands: {e}")))?;
        let route = match guild {
            Some(guild_id) => Route::GuildCommands {
                application_id: app,
                guild_id,
            },
            None => Route::Commands {
                application_id: app,
            },
        };
        let req = HttpRequest::new(route, LightMethod::Put).body(Some(body));
        self.rest()
            .empty("register commands", Priority::Normal, req)
            .await
    }

    async fn on_command(&self, ctx: Context, cmd: CommandInteraction) {
        let option = |name: &str| {
            cmd.data
                .options
                .iter()
                .find(|o| o.name == name)
                .map(|o| &o.value)
        };
        let private = matches!(
            option("private"),
            Some(CommandDataOptionValue::Boolean(true))
        );
        let Some(requests) = slash_requests(&cmd.data.name, &option) else {
            tracing::warn!(command = %cmd.data.name, "unknown or incomplete slash command");
            return;
        };
        // Discord wants an answer within 3 s: defer at once, then edit the response.
        let ephemeral = private || cmd.data.name != "ask";
        let deferred = self.defer(&cmd, ephemeral).await;
        if let Err(e) = deferred {
            tracing::error!(interaction = %cmd.id, channel = %cmd.channel_id, error = %e, "cannot acknowledge the interaction");
            return;
        }
        let name = cmd
            .member
            .as_ref()
            .and_then(|m| m.nick.clone())
            .or_else(|| cmd.user.global_name.clone())
            .unwrap_or_else(|| cmd.user.name.clone());
        let roles: Vec<String> = cmd
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default();
        for (i, request) in requests.into_iter().enumerate() {
            let is_question = matches!(request, Request::Question(_));
            let incoming = Incoming {
                key: Self::key(&ctx, cmd.guild_id, cmd.channel_id),
                author: Author {
                    id: cmd.user.id.to_string(),
                    name: name.clone(),
                    roles: roles.clone(),
                },
                request,
                message_id: is_question.then(|| format!("interaction-{}", cmd.id)),
                is_private: cmd.guild_id.is_none(),
                remember: !private,
            };
            // Later parts of one /settings call answer in follow-ups below the first.
            let sink = self.replies.reply(
                Target::Interaction {
                    interaction: Box::new(cmd.clone()),
                    ephemeral,
                },
                self.interval(),
                i,
            );
            self.assistant.handle(incoming, &sink).await;
        }
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        if ready.user.id != self.bot_id {
            tracing::warn!(ready = %ready.user.id, token = %self.bot_id, "the gateway names another bot user than the token check did");
        }
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), shard = ?ready.shard, "connected to Discord");
        let commands = slash::commands();
        let app = ready.application.id;
        let result = if self.settings.command_guilds.is_empty() {
            self.register(app, None, &commands).await
        } else {
            let mut result = Ok(());
            for g in &self.settings.command_guilds {
                match g.parse::<u64>() {
                    Ok(id) if id != 0 => {
                        if let Err(e) = self.register(app, Some(GuildId::new(id)), &commands).await
                        {
                            result = Err(e);
                        }
                    }
                    _ => tracing::error!(guild = %g, "discord.command_guilds: not a guild id"),
                }
            }
            result
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot register slash commands");
        }
        // Questions the last run accepted but never answered; the core takes them up once.
        let replies = Arc::new(ResumedReplies {
            replies: self.replies.clone(),
            interval: self.interval(),
        });
        tokio::spawn(self.assistant.clone().resume(Platform::Discord, replies));
    }

    async fn message(&self, ctx: Context, msg: Message) {
        self.on_message(ctx, msg).await;
    }

    async fn message_update(
        &self,
        _ctx: Context,
        _old: Option<Message>,
        _new: Option<Message>,
        event: MessageUpdateEvent,
    ) {
        let Some(content) = event.content else { return };
        let text = strip_mention(&content, self.bot_id());
        match self
            .assistant
            .message_edited(Platform::Discord, &event.id.to_string(), &text)
            .await
        {
            Ok(true) => tracing::info!(message = %event.id, "question edited"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot apply an edit"),
        }
    }

    async fn message_delete(
        &self,
        _ctx: Context,
        _channel: ChannelId,
        id: MessageId,
        _guild: Option<GuildId>,
    ) {
        match self
            .assistant
            .message_deleted(Platform::Discord, &id.to_string())
            .await
        {
            Ok(true) => tracing::info!(message = %id, "question deleted"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot apply a delete"),
        }
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Interaction::Command(cmd) = interaction {
            self.on_command(ctx, cmd).await;
        }
    }

    async fn thread_create(&self, _ctx: Context, thread: GuildChannel) {
        if thread.owner_id.is_some_and(|o| o == self.bot_id) {
            self.bot_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(thread.id);
        }
    }
}

/// Replies to stored questions after a restart: in the question's thread or channel, as a reply
/// to its message, or in the messages the last run had posted for it. A slash command's interaction has expired by then, so its answer is posted
/// in the channel without a reference.
struct ResumedReplies {
    replies: Replies,
    interval: Duration,
}

#[async_trait::async_trait]
impl ResumeSinks for ResumedReplies {
    async fn sink_for(&self, question: &PendingQuestion) -> Option<Box<dyn ReplySink>> {
        let key = &question.key;
        let place = if key.thread.is_empty() {
            &key.channel
        } else {
            &key.thread
        };
        let channel = match place.parse::<u64>() {
            Ok(id) if id != 0 => ChannelId::new(id),
            _ => {
                tracing::warn!(conversation = %key, "a stored Discord conversation without a channel id");
                return None;
            }
        };
        let reply_to = question
            .message_id
            .as_deref()
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|&id| id != 0)
            .map(MessageId::new);
        // Messages the last run posted for this answer are edited, not posted again.
        let earlier = question.shown.as_ref().and_then(|shown| {
            let ids = shown
                .ids
                .iter()
                .map(|id| id.parse::<u64>().ok().filter(|&id| id != 0).map(MessageId::new))
                .collect::<Option<Vec<_>>>();
            if ids.is_none() {
                tracing::warn!(conversation = %key, "messages of an earlier answer with unreadable ids; posting anew");
            }
            ids.filter(|ids| !ids.is_empty()).map(|ids| (shown.notices, ids))
        });
        Some(Box::new(match earlier {
            Some((notices, ids)) => {
                self.replies
                    .reply_showing(channel, reply_to, self.interval, notices, ids)
            }
            None => self
                .replies
                .reply(Target::Channel { channel, reply_to }, self.interval, 0),
        }))
    }
}
