//! The words every layer shares: which platform, which conversation, who spoke, in what role,
//! and what they asked for. Nothing here knows SQLite, a tokenizer or a chat library, so memory,
//! the prompt, the core and every adapter can name the same things with the same types.

pub mod command;
pub mod key;
pub mod message;
pub mod platform;
pub mod shown;
pub mod trigger;

pub use command::{Command, CommandError, Setting};
pub use key::{ConversationKey, KeyError};
pub use message::{Author, Incoming, Request, Role, without_nul};
pub use platform::{Platform, UnknownPlatform};
pub use shown::Shown;
pub use trigger::Trigger;
