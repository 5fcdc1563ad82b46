//! Discord through serenity: mentions, DMs, replies, threads, slash commands and `!` commands.
//! Events become [`Incoming`]; replies stream into Discord by editing messages, at most one edit
//! per second per message, split over the 2,000-character limit, with every mention disabled.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serenity::all::{
    ChannelId, CommandDataOptionValue, CommandInteraction, CommandOptionType, Context,
    CreateAllowedMentions, CreateCommand, CreateCommandOption, CreateInteractionResponseFollowup,
    CreateMessage, EditInteractionResponse, EditMessage, EventHandler, GatewayIntents,
    GuildChannel, GuildId, HttpBuilder, Interaction, Message, MessageId, MessageType,
    MessageUpdateEvent, Ready, UserId,
};
use serenity::http::{Http, HttpError};

mod trigger;

pub use trigger::{Facts, classify, strip_mention};

use super::ConnectError;
use super::split::DISCORD_LIMIT;
use super::stream::{StreamedReply, Surface};
use crate::config::DiscordSettings;
use crate::chat::{
    Author, Command, ConversationKey, Incoming, Platform, Request, Setting, Trigger,
};
use crate::chat::command::TEMPERATURE_RANGE;
use crate::core::Assistant;

/// Discord's own API; any other `api_base` is used as a proxy (tests, self-hosted proxies).
const DISCORD_BASE: &str = "https://discord.com";

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

fn no_mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new()
}

/// Where a reply goes: a channel (as a reply to the question) or an interaction's response.
enum Target {
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
struct DiscordSurface {
    http: Arc<Http>,
    target: Target,
    /// Messages of the same interaction answered before this reply (a follow-up starts at 1).
    offset: usize,
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
                    let msg = with_backoff("edit response", || {
                        interaction.edit_response(
                            &self.http,
                            EditInteractionResponse::new()
                                .content(content)
                                .allowed_mentions(no_mentions()),
                        )
                    })
                    .await?;
                    Ok(msg.id)
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
                    with_backoff("edit response", || {
                        interaction.edit_response(
                            &self.http,
                            EditInteractionResponse::new()
                                .content(content)
                                .allowed_mentions(no_mentions()),
                        )
                    })
                    .await?;
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

fn discord_reply(
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

/// Serenity's event handler: turns events into calls on the core.
struct Handler {
    assistant: Arc<Assistant>,
    settings: DiscordSettings,
    bot_id: Mutex<Option<UserId>>,
    bot_threads: Mutex<HashSet<ChannelId>>,
}

impl Handler {
    fn bot_id(&self) -> u64 {
        self.bot_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|u| u.get())
            .unwrap_or(0)
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
            None => ConversationKey::new(Platform::Discord, &g.to_string(), &channel.to_string(), ""),
        }
    }

    fn commands() -> Vec<CreateCommand> {
        vec![
            CreateCommand::new("ask")
                .description("Ask Synthia a question")
                .add_option(
                    CreateCommandOption::new(CommandOptionType::String, "prompt", "Your question")
                        .required(true),
                )
                .add_option(CreateCommandOption::new(
                    CommandOptionType::Boolean,
                    "private",
                    "Only you see the answer, and it is not remembered",
                )),
            CreateCommand::new("reset").description("Start this conversation afresh"),
            CreateCommand::new("system")
                .description("Show or set Synthia's instructions here (admins)")
                .add_option(CreateCommandOption::new(
                    CommandOptionType::String,
                    "text",
                    "New instructions",
                )),
            CreateCommand::new("settings")
                .description("Change how Synthia answers here (admins)")
                .add_option(CreateCommandOption::new(
                    CommandOptionType::Number,
                    "temperature",
                    format!(
                        "{} to {}",
                        TEMPERATURE_RANGE.start(),
                        TEMPERATURE_RANGE.end()
                    ),
                ))
                .add_option(CreateCommandOption::new(
                    CommandOptionType::Integer,
                    "max_tokens",
                    "Longest reply",
                )),
            CreateCommand::new("stop").description("Stop the reply being written here"),
            CreateCommand::new("help").description("What Synthia can do"),
        ]
    }

    async fn on_message(&self, ctx: Context, msg: Message) {
        let bot_id = self.bot_id();
        if bot_id == 0 {
            return;
        }
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
        let sink = discord_reply(
            ctx.http.clone(),
            Target::Channel {
                channel: msg.channel_id,
                reply_to: Some(msg.id),
            },
            self.interval(),
            0,
        );
        self.assistant.handle(incoming, &sink).await;
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
        let deferred = if ephemeral {
            cmd.defer_ephemeral(&ctx.http).await
        } else {
            cmd.defer(&ctx.http).await
        };
        if let Err(e) = deferred {
            tracing::error!(error = %e, "cannot acknowledge the interaction");
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
            let sink = discord_reply(
                ctx.http.clone(),
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

/// What a slash command asks for, built from its options (never turned back into text).
/// `/settings` with both options is two requests, answered one below the other.
fn slash_requests<'a>(
    name: &str,
    option: &dyn Fn(&str) -> Option<&'a CommandDataOptionValue>,
) -> Option<Vec<Request>> {
    let requests = match name {
        "ask" => match option("prompt") {
            Some(CommandDataOptionValue::String(q)) => vec![Request::Question(q.clone())],
            _ => return None,
        },
        "system" => vec![Request::Command(Command::System(match option("text") {
            Some(CommandDataOptionValue::String(t)) if !t.trim().is_empty() => {
                Some(t.trim().to_string())
            }
            _ => None,
        }))],
        "settings" => {
            let mut requests = Vec::new();
            if let Some(CommandDataOptionValue::Number(t)) = option("temperature") {
                requests.push(setting(Setting::temperature(*t)));
            }
            if let Some(CommandDataOptionValue::Integer(n)) = option("max_tokens") {
                let n = u32::try_from(*n).map_err(|_| {
                    crate::chat::CommandError::BadValue(format!("`{n}` is not a whole number"))
                });
                requests.push(setting(n.and_then(Setting::max_tokens)));
            }
            if requests.is_empty() {
                requests.push(Request::Command(Command::Help));
            }
            requests
        }
        "reset" => vec![Request::Command(Command::Reset)],
        "stop" => vec![Request::Command(Command::Stop)],
        "help" => vec![Request::Command(Command::Help)],
        _ => return None,
    };
    Some(requests)
}

fn setting(s: Result<Setting, crate::chat::CommandError>) -> Request {
    match s {
        Ok(s) => Request::Command(Command::Set(s)),
        Err(e) => Request::Malformed(e),
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        *self.bot_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(ready.user.id);
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to Discord");
        let commands = Self::commands();
        let result = if self.settings.command_guilds.is_empty() {
            serenity::all::Command::set_global_commands(&ctx.http, commands)
                .await
                .map(|_| ())
        } else {
            let mut result = Ok(());
            for g in &self.settings.command_guilds {
                match g.parse::<u64>() {
                    Ok(id) if id != 0 => {
                        if let Err(e) = GuildId::new(id)
                            .set_commands(&ctx.http, commands.clone())
                            .await
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
        if thread
            .owner_id
            .is_some_and(|o| Some(o) == *self.bot_id.lock().unwrap_or_else(|e| e.into_inner()))
        {
            self.bot_threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(thread.id);
        }
    }
}

/// A connected Discord client; `run` drives it until the connection ends for good.
pub struct DiscordClient {
    client: serenity::Client,
}

impl DiscordClient {
    /// Prepares the client. Fails with a clear message when the API cannot be reached or the
    /// token is refused, and never falls back to Discord's own gateway when `api_base` points
    /// elsewhere.
    pub async fn connect(
        settings: &DiscordSettings,
        assistant: Arc<Assistant>,
    ) -> Result<Self, ConnectError> {
        let base = settings.api_base.trim_end_matches('/');
        let base = base.strip_suffix("/api/v10").unwrap_or(base);
        let mut builder = HttpBuilder::new(&settings.token).default_allowed_mentions(no_mentions());
        if base != DISCORD_BASE {
            // serenity's rate limiter would bypass the proxy: our own back-off handles 429s.
            builder = builder.proxy(base).ratelimiter_disabled(true);
        }
        let http = builder.build();
        let gateway = http
            .get_gateway()
            .await
            .map_err(|e| connect_error(&e, base))?;
        if base != DISCORD_BASE && !is_loopback_or_same_host(&gateway.url, base) {
            return Err(ConnectError::Misconfigured(format!(
                "the API at {base} sent a gateway on another host ({}); refusing to connect",
                gateway.url
            )));
        }
        http.get_current_user()
            .await
            .map_err(|e| connect_error(&e, base))?;
        let intents = GatewayIntents::GUILDS
            | GatewayIntents::GUILD_MESSAGES
            | GatewayIntents::DIRECT_MESSAGES
            | GatewayIntents::MESSAGE_CONTENT;
        let handler = Handler {
            assistant,
            settings: settings.clone(),
            bot_id: Mutex::new(None),
            bot_threads: Mutex::new(HashSet::new()),
        };
        let client = serenity::client::ClientBuilder::new_with_http(http, intents)
            .event_handler(handler)
            .await
            .map_err(|e| {
                ConnectError::Misconfigured(format!("cannot create the Discord client: {e}"))
            })?;
        Ok(Self { client })
    }

    /// Runs until the gateway connection ends for good (serenity reconnects and resumes on its
    /// own) or `stop` turns true, which closes the gateway cleanly.
    pub async fn run(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ConnectError> {
        let shards = self.client.shard_manager.clone();
        let run = self.client.start();
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r.map_err(|e| gateway_error(&e)),
            _ = super::until_stopped(&mut stop) => {
                shards.shutdown_all().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
                Ok(())
            }
        }
    }

    /// A handle to close the connection cleanly from elsewhere.
    pub fn shard_manager(&self) -> Arc<serenity::gateway::ShardManager> {
        self.client.shard_manager.clone()
    }
}

/// A refused token (401/403) only the operator can fix; anything else may pass with time.
fn connect_error(e: &serenity::Error, base: &str) -> ConnectError {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r))
            if matches!(r.status_code.as_u16(), 401 | 403) =>
        {
            ConnectError::Refused(
                "Discord refused the bot token: check SYNTHIA_BOT__DISCORD__TOKEN (Developer Portal, Bot, Reset Token)",
            )
        }
        _ => ConnectError::Unreachable(format!(
            "cannot reach the Discord API at {base}: {e}. Check discord.api_base and the network"
        )),
    }
}

/// Discord closes the gateway with "authentication failed" for a token it no longer accepts;
/// anything else is a connection that may come back.
fn gateway_error(e: &serenity::Error) -> ConnectError {
    match e {
        serenity::Error::Gateway(serenity::gateway::GatewayError::InvalidAuthentication) => {
            ConnectError::Refused(
                "Discord no longer accepts the bot token: check SYNTHIA_BOT__DISCORD__TOKEN".into(),
            )
        }
        _ => ConnectError::Unreachable(format!("Discord gateway connection failed: {e}")),
    }
}

fn is_loopback_or_same_host(gateway: &str, base: &str) -> bool {
    let host = |u: &str| {
        u.split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', '?']).next())
            .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string())
    };
    match (host(gateway), host(base)) {
        (Some(g), Some(b)) => g == b || g == "127.0.0.1" || g == "localhost" || g == "[::1]",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_hosts() {
        assert!(is_loopback_or_same_host(
            "ws://127.0.0.1:5555/gw",
            "http://127.0.0.1:5555"
        ));
        assert!(is_loopback_or_same_host(
            "wss://proxy.example:443",
            "https://proxy.example"
        ));
        assert!(!is_loopback_or_same_host(
            "wss://gateway.discord.gg",
            "http://127.0.0.1:5555"
        ));
    }
}
