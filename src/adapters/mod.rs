//! Thin adapters between chat platforms and the core. Each turns its platform's events into
//! [`crate::core::Incoming`] and implements [`crate::core::ReplySink`].

pub mod console;
pub mod discord;
