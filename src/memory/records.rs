//! The records memory keeps, as Rust types, and how rows read back into them.

use serde::Serialize;
use sqlx::Row;

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

    fn parse(s: &str) -> Status {
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

pub(super) fn conversation_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Conversation> {
    let platform: String = r.get(1);
    let platform = platform
        .parse()
        .map_err(|e| MemoryError::Corrupt(format!("a conversation of {e}")))?;
    Ok(Conversation {
        id: r.get(0),
        key: ConversationKey {
            platform,
            space: r.get(2),
            channel: r.get(3),
            thread: r.get(4),
        },
        reset_after: r.get(5),
        trim_after: r.get(6),
        settings: ConversationSettings {
            system_prompt: r.get(7),
            temperature: r.get(8),
            max_new_tokens: r
                .get::<Option<i64>, _>(9)
                .map(|v| v.clamp(0, u32::MAX as i64) as u32),
        },
        private: r.get::<i64, _>(10) != 0,
    })
}

pub(super) fn message_from_row(r: &sqlx::sqlite::SqliteRow) -> StoredMessage {
    let role: String = r.get(2);
    let status: String = r.get(8);
    StoredMessage {
        id: r.get(0),
        conversation_id: r.get(1),
        role: if role == "assistant" {
            Role::Assistant
        } else {
            Role::User
        },
        author_id: r.get(3),
        author_name: r.get(4),
        content: r.get(5),
        platform_message_id: r.get(6),
        reply_to: r.get(7),
        status: Status::parse(&status),
        token_count: r
            .get::<Option<i64>, _>(9)
            .map(|v| v.clamp(0, u32::MAX as i64) as u32),
        token_key: r.get(10),
        created_at: r.get(11),
        edited_at: r.get(12),
    }
}
