//! One message addressed to the bot, as every adapter hands it to the core.

use serde::Serialize;

use super::command::{Command, CommandError};
use super::key::ConversationKey;

/// Who wrote a turn, as the prompt and memory tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Author {
    pub id: String,
    pub name: String,
    /// Platform roles (Discord role ids), for role-based access rules.
    pub roles: Vec<String>,
}

/// What a message asks for, decided at the edge: text commands are parsed once by the adapter
/// that read them, slash commands are built from their options.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Question(String),
    Command(Command),
    /// A command that did not parse; the user is told why.
    Malformed(CommandError),
}

impl Request {
    /// A prefix command's text without its prefix (`reset`, `system Be brief`).
    pub fn from_command_text(text: &str) -> Self {
        match super::command::parse(text) {
            Ok(c) => Request::Command(c),
            Err(e) => Request::Malformed(e),
        }
    }
}

/// One message addressed to the bot, already stripped of platform details.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub key: ConversationKey,
    pub author: Author,
    pub request: Request,
    /// The platform's id of the message, for answering it once and following edits/deletes.
    pub message_id: Option<String>,
    /// A DM (or the terminal): its user owns the conversation.
    pub is_private: bool,
    /// False for a private one-off (`/ask private:true`): answered but kept out of memory.
    pub remember: bool,
}

impl Incoming {
    /// A question with the usual defaults (a group conversation, remembered).
    pub fn question(key: ConversationKey, author: Author, text: impl Into<String>) -> Self {
        Self::new(key, author, Request::Question(text.into()))
    }

    pub fn new(key: ConversationKey, author: Author, request: Request) -> Self {
        Self {
            key,
            author,
            request,
            message_id: None,
            is_private: false,
            remember: true,
        }
    }
}

/// Text as every store and platform can hold it: NUL (which a model can emit as a byte token,
/// and a user can type) becomes U+FFFD. PostgreSQL refuses NUL in text, and a reply must read the
/// same stored as shown.
pub fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod nul_tests {
    use super::without_nul;

    #[test]
    fn nul_becomes_the_replacement_character() {
        assert_eq!(without_nul("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert!(matches!(
            without_nul("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }
}
