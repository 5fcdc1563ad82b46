#![recursion_limit = "256"]
//! synthia-bot: a self-hosted daemon that puts a local Synthia-7B into Discord, Matrix and the
//! terminal, with persistent memory.
//!
//! The shape: adapters turn platform events into [`core::Incoming`] and give the core a
//! [`core::ReplySink`]; the core stores turns in [`memory`], builds the prompt with [`prompt`] and
//! streams from the one [`inference`] worker. The core never imports an adapter.

pub mod adapters;
pub mod app;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod config;
pub mod core;
pub mod inference;
pub mod memory;
pub mod metrics;
pub mod prompt;
pub mod serve;
pub mod service;
