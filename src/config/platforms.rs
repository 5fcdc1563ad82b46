//! Where the bot talks (terminal, Discord, Matrix) and who may talk to it there.
//!
//! Together because Discord and Matrix share one shape of access rules ([`AccessSettings`]),
//! which the core applies the same way on both.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Who may talk to the bot on one platform. Empty allow-lists allow everyone.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    pub allowed_users: Vec<String>,
    pub allowed_roles: Vec<String>,
    pub allowed_channels: Vec<String>,
    pub allowed_spaces: Vec<String>,
    pub admins: Vec<String>,
    pub admin_roles: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Display name of the terminal user in the database.
    pub user_name: String,
    /// Where the interactive chat keeps what was typed, across runs; empty: nowhere.
    pub history: String,
    /// Where the interactive chat logs (the screen holds only the conversation unless
    /// `chat --verbose`); empty: warnings and errors on stderr.
    pub log_file: String,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            user_name: "operator".into(),
            history: "data/chat-history".into(),
            log_file: "data/chat.log".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordSettings {
    pub enabled: bool,
    /// Bot token; set it through `SYNTHIA_BOT__DISCORD__TOKEN`.
    pub token: String,
    /// Where the REST API lives (requests go to `{api_base}/api/v10/...`); anything but Discord's
    /// own is used as a proxy.
    pub api_base: String,
    /// Prefix of message commands (`!reset`), for servers without slash commands.
    pub command_prefix: String,
    /// Guild ids to register slash commands in (instant); empty = global (can take an hour).
    pub command_guilds: Vec<String>,
    /// Least time between two edits of a streamed reply, in milliseconds.
    pub edit_interval_ms: u32,
    /// Channels where every message is answered, mention or not.
    pub always_answer: Vec<String>,
    /// Which gateway shards this process runs; unset = all, as many as Discord recommends.
    pub shards: ShardSettings,
    pub access: AccessSettings,
}

/// `discord.shards`: a bot in many guilds splits its gateway into shards, and several processes
/// can each run some of them (Discord sends a guild's events to shard `(guild_id >> 22) % total`
/// and direct messages to shard 0).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShardSettings {
    /// Shards the bot runs across every process; 0 = let Discord say (`/gateway/bot`) and run
    /// them all here.
    pub total: u32,
    /// The shards of this process: `"2"` or `"0-1"` (inclusive); empty = all of `total`.
    pub ids: String,
}

/// What `discord.shards` asks for, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardPlan {
    /// Every shard, as many as Discord recommends.
    Recommended,
    /// Shards `first..=last` of `total`.
    Range { first: u32, last: u32, total: u32 },
}

impl ShardSettings {
    pub fn plan(&self) -> Result<ShardPlan, ConfigError> {
        let ids = self.ids.trim();
        if self.total == 0 {
            if ids.is_empty() {
                return Ok(ShardPlan::Recommended);
            }
            return Err(ConfigError::new(
                "discord.shards.total",
                "must be set when discord.shards.ids is: every process must agree on it",
            ));
        }
        let bad = |why: String| ConfigError::new("discord.shards.ids", why);
        let number = |s: &str| {
            s.trim().parse::<u32>().map_err(|_| {
                bad(format!(
                    "`{ids}` is not a shard id or range such as \"0\" or \"0-1\""
                ))
            })
        };
        let (first, last) = if ids.is_empty() {
            (0, self.total - 1)
        } else if let Some((a, b)) = ids.split_once('-') {
            (number(a)?, number(b)?)
        } else {
            let id = number(ids)?;
            (id, id)
        };
        if first > last {
            return Err(bad(format!("`{ids}` runs backwards")));
        }
        if last >= self.total {
            return Err(bad(format!(
                "`{ids}` names shard {last}, but shards are numbered 0 to {} (discord.shards.total = {})",
                self.total - 1,
                self.total
            )));
        }
        Ok(ShardPlan::Range {
            first,
            last,
            total: self.total,
        })
    }
}

impl Default for DiscordSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            token: String::new(),
            api_base: "https://discord.com".into(),
            command_prefix: "!".into(),
            command_guilds: Vec::new(),
            edit_interval_ms: 1000,
            always_answer: Vec::new(),
            shards: ShardSettings::default(),
            access: AccessSettings::default(),
        }
    }
}

impl DiscordSettings {
    /// The edit interval is only enforced against Discord itself: a proxy or a test server sets
    /// its own limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.edit_interval_ms < 1000
            && self
                .api_base
                .trim_end_matches('/')
                .starts_with("https://discord.com")
        {
            return Err(ConfigError::new(
                "discord.edit_interval_ms",
                "must be at least 1000: Discord allows about one edit per second per message",
            ));
        }
        if !self.api_base.starts_with("http://") && !self.api_base.starts_with("https://") {
            return Err(ConfigError::new(
                "discord.api_base",
                "must be an http:// or https:// URL",
            ));
        }
        if self.enabled && self.token.trim().is_empty() {
            return Err(ConfigError::new(
                "discord.token",
                "required when discord.enabled = true (set SYNTHIA_BOT__DISCORD__TOKEN)",
            ));
        }
        self.shards.plan()?;
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixSettings {
    pub enabled: bool,
    pub homeserver: String,
    pub user_id: String,
    /// Used on first start; set it through `SYNTHIA_BOT__MATRIX__PASSWORD`.
    pub password: String,
    pub access_token: String,
    pub device_name: String,
    pub store_path: String,
    pub store_passphrase: String,
    pub recovery_key: String,
    /// Prefix of commands (`!reset`).
    pub command_prefix: String,
    /// Least time between two edits of a streamed reply, in milliseconds.
    pub edit_interval_ms: u32,
    /// Rooms (ids) where every message is answered, mention or not.
    pub always_answer: Vec<String>,
    pub access: AccessSettings,
}

impl Default for MatrixSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            homeserver: String::new(),
            user_id: String::new(),
            password: String::new(),
            access_token: String::new(),
            device_name: "synthia-bot".into(),
            store_path: "data/matrix".into(),
            store_passphrase: String::new(),
            recovery_key: String::new(),
            command_prefix: "!".into(),
            edit_interval_ms: 1000,
            always_answer: Vec::new(),
            access: AccessSettings::default(),
        }
    }
}

impl MatrixSettings {
    /// Nothing is checked while Matrix is off, so the shipped defaults need no homeserver.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if self.homeserver.trim().is_empty() {
            return Err(ConfigError::new(
                "matrix.homeserver",
                "required when matrix.enabled = true",
            ));
        }
        if !self.user_id.starts_with('@') || !self.user_id.contains(':') {
            return Err(ConfigError::new(
                "matrix.user_id",
                "must be a full Matrix user id such as @synthia:example.org",
            ));
        }
        if !self.homeserver.starts_with("http://") && !self.homeserver.starts_with("https://") {
            return Err(ConfigError::new(
                "matrix.homeserver",
                "must be an http:// or https:// URL such as https://matrix.example.org",
            ));
        }
        if self.store_path.trim().is_empty() {
            return Err(ConfigError::new(
                "matrix.store_path",
                "required: the session and encryption keys are kept there",
            ));
        }
        if self.command_prefix.trim().is_empty() {
            return Err(ConfigError::new(
                "matrix.command_prefix",
                "must not be empty",
            ));
        }
        Ok(())
    }
}
