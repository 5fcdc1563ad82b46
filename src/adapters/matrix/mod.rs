//! Matrix adapter (matrix-sdk): password or token login with the session saved beside
//! matrix-sdk's SQLite store, end-to-end encryption, invites, mentions, DMs, threads, `!` commands,
//! replies as `m.notice` streamed by `m.replace` edits.
//!
//! The backlog is never answered: the first sync after start runs before the message handler is
//! registered, older events are dropped by timestamp, and the core refuses event ids it has
//! already stored, so even a bot that lost its Matrix store answers nothing twice.
//!
//! Where things are: `client` (connecting and the sync loop), `login` and `session` (getting a
//! logged-in client, the session saved beside the store), `handlers` (timeline events),
//! `rooms` (invites, membership, DMs), `senders` (who sent an event), `shared` (the state the
//! handlers share), `surface` (posting and editing a reply), `trigger` (whether a message is for
//! the bot), `error` (why it could not start).

mod client;
mod error;
mod handlers;
mod login;
mod rooms;
mod senders;
mod session;
mod shared;
mod surface;
pub mod trigger;

pub use client::MatrixClient;
pub use error::MatrixError;

use crate::chat::Platform;

pub const PLATFORM: Platform = Platform::Matrix;
