//! Discord through serenity: mentions, DMs, replies, threads, slash commands and `!` commands.
//! Events become [`Incoming`](crate::chat::Incoming); replies stream into Discord by editing
//! messages, at most one edit per second per message, split over the 2,000-character limit,
//! with every mention disabled.
//!
//! - `trigger`: whether a message is for the bot (pure rules, tested as a table).
//! - `slash`: the slash commands and the requests their options build.
//! - `handler`: serenity's event handler, from events to calls on the core.
//! - `rest`: every request to Discord once connected: the global limit, retries, `retry_after`.
//! - `typing`: one typing indicator per channel, shared by the replies in progress there.
//! - `surface`: posting and editing a reply's messages; text an edit could not show continues
//!   in a new message.
//! - `client`: connecting, running and the connection errors.

mod client;
mod handler;
mod rest;
mod slash;
mod surface;
mod trigger;
mod typing;

pub use client::DiscordClient;
pub use rest::RestError;
pub use trigger::{Facts, classify, strip_mention};
