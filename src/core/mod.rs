//! The platform-neutral heart of the bot. Adapters hand it an [`Incoming`] and a [`ReplySink`];
//! it checks access and rate limits, runs commands, stores the user turn before generating,
//! builds the prompt, streams the worker's reply into the sink and stores the reply.

pub mod access;
mod answer;
mod error;
mod execute;
mod handle;
mod in_flight;
mod limits;
mod live;
mod observer;
mod prompter;
mod resume;
mod retry;
mod sink;
pub mod text;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use access::Access;
pub use error::CoreError;
pub use live::CoreConfig;
pub use observer::{Observer, ReplyReport};
pub use prompter::{Prepared, Prompter, context_turns};
pub use resume::{PendingQuestion, ResumeSinks, Resumed};
pub use sink::{Outcome, ReplySink};

use crate::chat::{ConversationKey, Incoming, Platform};
use crate::config::Settings;
use crate::inference::Worker;
use crate::memory::Store;
use in_flight::InFlight;
use limits::Limits;
use observer::NoObserver;
use resume::{ResumeState, ResumeWindows};

pub struct Assistant {
    store: Store,
    worker: Worker,
    prompter: RwLock<Prompter>,
    config: RwLock<CoreConfig>,
    limits: RwLock<Limits>,
    locks: Mutex<HashMap<ConversationKey, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: InFlight,
    /// Questions being answered or waiting for their conversation's turn.
    answering: std::sync::atomic::AtomicUsize,
    /// Set by `stop_all`: nothing new starts generating.
    closing: std::sync::atomic::AtomicBool,
    observer: RwLock<Arc<dyn Observer>>,
    /// Questions the last run left unanswered, taken up once per platform.
    resume: ResumeState,
}

/// Counts a question as being answered for as long as it lives.
pub(super) struct Answering<'a>(pub(super) &'a std::sync::atomic::AtomicUsize);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Assistant {
    pub fn new(store: Store, worker: Worker, settings: &Settings) -> Self {
        let prompter = Prompter {
            tokenizer: worker.tokenizer(),
            context_length: worker.context_length(),
            settings: settings.prompt.clone(),
            default_max_new_tokens: settings.model.max_new_tokens,
        };
        Self {
            store,
            worker,
            prompter: RwLock::new(prompter),
            config: RwLock::new(CoreConfig::from_settings(settings)),
            limits: RwLock::new(Limits::new(
                settings.limits.user_per_minute,
                settings.limits.conversation_per_minute,
            )),
            locks: Mutex::new(HashMap::new()),
            in_flight: InFlight::default(),
            answering: std::sync::atomic::AtomicUsize::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            observer: RwLock::new(Arc::new(NoObserver)),
            resume: ResumeState::new(ResumeWindows {
                answer: Duration::from_secs(u64::from(settings.service.resume_window)),
                notice: Duration::from_secs(u64::from(settings.service.restart_notice_window)),
            }),
        }
    }

    /// Where the core reports what it does (metrics).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    pub(super) fn observer(&self) -> Arc<dyn Observer> {
        self.observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    pub fn prompter(&self) -> Prompter {
        self.prompter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies the settings that can change while running (system prompt and prompt rules,
    /// sampling, reply length, access rules, rate limits) and names what changed. Model, memory
    /// and platform connection settings need a restart.
    pub fn reload(&self, settings: &Settings) -> Vec<&'static str> {
        let mut changed = Vec::new();
        {
            let mut prompter = self.prompter.write().unwrap_or_else(|e| e.into_inner());
            if prompter.settings != settings.prompt {
                prompter.settings = settings.prompt.clone();
                changed.push("prompt");
            }
            if prompter.default_max_new_tokens != settings.model.max_new_tokens {
                prompter.default_max_new_tokens = settings.model.max_new_tokens;
                changed.push("model.max_new_tokens");
            }
        }
        let new = CoreConfig::from_settings(settings);
        let old = self.config();
        if old.sampling != new.sampling {
            changed.push("sampling");
        }
        for (platform, key) in [
            (Platform::Discord, "discord.access"),
            (Platform::Matrix, "matrix.access"),
        ] {
            if old.access.get(&platform) != new.access.get(&platform) {
                changed.push(key);
            }
        }
        self.set_config(new);
        let wanted = (
            settings.limits.user_per_minute,
            settings.limits.conversation_per_minute,
        );
        let mut limits = self.limits.write().unwrap_or_else(|e| e.into_inner());
        if limits.per_minute != wanted {
            *limits = Limits::new(wanted.0, wanted.1);
            changed.push("limits");
        }
        changed
    }

    pub fn config(&self) -> CoreConfig {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_config(&self, config: CoreConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    fn rate_limited(&self, msg: &Incoming) -> Option<Duration> {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check(msg)
    }

    /// Questions being answered or waiting for their turn (for a graceful shutdown).
    pub fn answering(&self) -> usize {
        self.answering.load(std::sync::atomic::Ordering::Acquire)
    }

    fn conversation_lock(&self, key: &ConversationKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Drop locks nobody holds or waits for, so the map does not grow without bound.
        locks.retain(|k, l| k == key || Arc::strong_count(l) > 1);
        locks.entry(key.clone()).or_default().clone()
    }

    /// Cancels the reply being written in a conversation. True if there was one.
    pub fn stop(&self, key: &ConversationKey) -> bool {
        self.in_flight.cancel_conversation(key)
    }

    /// Cancels every reply in progress, and lets none start after (shutdown).
    pub fn stop_all(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        self.in_flight.cancel_all();
    }

    /// A question was edited on the platform: the stored turn follows.
    pub async fn message_edited(
        &self,
        platform: Platform,
        message_id: &str,
        text: &str,
    ) -> Result<bool, CoreError> {
        Ok(self
            .store
            .edit_by_platform_id(platform, message_id, text)
            .await?
            .is_some())
    }

    /// A question was deleted on the platform: it leaves memory, and its reply stops. The
    /// delete comes first, so the cancelled reply finds its question gone and is not stored.
    pub async fn message_deleted(
        &self,
        platform: Platform,
        message_id: &str,
    ) -> Result<bool, CoreError> {
        let deleted = self
            .store
            .delete_by_platform_id(platform, message_id)
            .await?
            .is_some();
        self.in_flight.cancel_message(platform, message_id);
        Ok(deleted)
    }
}
