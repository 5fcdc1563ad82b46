//! Discord through serenity: mentions, DMs, replies, threads, slash commands and `!` commands.
//! Events become [`Incoming`](crate::chat::Incoming); replies stream into Discord by editing
//! messages, at most one edit per second per message, split over the 2,000-character limit,
//! with every mention disabled.
//!
//! - `trigger`: whether a message is for the bot (pure rules, tested as a table).
//! - `slash`: the slash commands and the requests their options build.
//! - `handler`: serenity's event handler, from events to calls on the core.
//! - `surface`: posting and editing a reply's messages, with 429 back-off.
//! - `client`: connecting, running and the connection errors.

mod client;
mod handler;
mod slash;
mod surface;
mod trigger;

pub use client::DiscordClient;
pub use trigger::{Facts, classify, strip_mention};
