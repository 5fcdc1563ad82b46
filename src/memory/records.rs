//! The records memory keeps, as Rust types, and how rows read back into them.

use serde::Serialize;

use super::{MemoryError, Result};
use crate::chat::{ConversationKey, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Complete,
    Cancelled,
    Failed,
}

impl Status {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }

    pub(super) fn parse(s: &str) -> Status {
        match s {
            "cancelled" => Status::Cancelled,
            "failed" => Status::Failed,
            _ => Status::Complete,
        }
    }
}

/// Per-conversation overrides of the configured defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConversationSettings {
    pub system_prompt: Option<String>,
    pub temperature: Option<f64>,
    pub max_new_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: i64,
    pub key: ConversationKey,
    pub private: bool,
    pub reset_after: i64,
    pub trim_after: i64,
    pub settings: ConversationSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    pub id: i64,
    pub conversation_id: i64,
    pub role: Role,
    pub author_id: Option<String>,
    pub author_name: Option<String>,
    pub content: String,
    pub platform_message_id: Option<String>,
    pub reply_to: Option<i64>,
    pub status: Status,
    pub token_count: Option<u32>,
    pub token_key: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub edited_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct NewUserTurn<'a> {
    pub author_id: &'a str,
    pub author_name: &'a str,
    pub content: &'a str,
    pub platform_message_id: Option<&'a str>,
}

/// Result of appending a user turn: the same platform message id is stored once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(i64),
    Duplicate(i64),
}

/// A message changed or removed through its platform id.
#[derive(Debug, Clone, PartialEq)]
pub struct Affected {
    pub message_id: i64,
    pub conversation_id: i64,
}

pub(super) const MESSAGE_COLUMNS: &str = "id, conversation_id, role, author_id, author_name, content, platform_message_id, reply_to, status, token_count, token_key, created_at, edited_at";

pub(super) const CONVERSATION_COLUMNS: &str = "id, platform, space, channel, thread, reset_after, trim_after, system_prompt, temperature, max_new_tokens, private";

/// A `conversations` row as both drivers decode it (integers are 64-bit on both).
#[derive(sqlx::FromRow)]
pub(super) struct ConversationRow {
    id: i64,
    platform: String,
    space: String,
    channel: String,
    thread: String,
    reset_after: i64,
    trim_after: i64,
    system_prompt: Option<String>,
    temperature: Option<f64>,
    max_new_tokens: Option<i64>,
    private: bool,
}

impl ConversationRow {
    pub(super) fn into_conversation(self) -> Result<Conversation> {
        let platform = self
            .platform
            .parse()
            .map_err(|e| MemoryError::Corrupt(format!("a conversation of {e}")))?;
        Ok(Conversation {
            id: self.id,
            key: ConversationKey {
                platform,
                space: self.space,
                channel: self.channel,
                thread: self.thread,
            },
            reset_after: self.reset_after,
            trim_after: self.trim_after,
            settings: ConversationSettings {
                system_prompt: self.system_prompt,
                temperature: self.temperature,
                max_new_tokens: self.max_new_tokens.map(clamp_u32),
            },
            private: self.private,
        })
    }
}

/// A `messages` row as both drivers decode it.
#[derive(sqlx::FromRow)]
pub(super) struct MessageRow {
    id: i64,
    conversation_id: i64,
    role: String,
    author_id: Option<String>,
    author_name: Option<String>,
    content: String,
    platform_message_id: Option<String>,
    reply_to: Option<i64>,
    status: String,
    token_count: Option<i64>,
    token_key: Option<i64>,
    created_at: i64,
    edited_at: Option<i64>,
}

impl MessageRow {
    pub(super) fn id(&self) -> i64 {
        self.id
    }
}

impl From<MessageRow> for StoredMessage {
    fn from(r: MessageRow) -> StoredMessage {
        StoredMessage {
            id: r.id,
            conversation_id: r.conversation_id,
            role: if r.role == "assistant" {
                Role::Assistant
            } else {
                Role::User
            },
            author_id: r.author_id,
            author_name: r.author_name,
            content: r.content,
            platform_message_id: r.platform_message_id,
            reply_to: r.reply_to,
            status: Status::parse(&r.status),
            token_count: r.token_count.map(clamp_u32),
            token_key: r.token_key,
            created_at: r.created_at,
            edited_at: r.edited_at,
        }
    }
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}
