//! The platform-neutral heart of the bot. Adapters hand it an [`Incoming`] and a [`ReplySink`];
//! it checks access and rate limits, runs commands, stores the user turn before generating,
//! builds the prompt, streams the worker's reply into the sink and stores the reply.

pub mod access;
pub mod commands;
pub mod text;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tracing::Instrument;

pub use access::Access;
pub use commands::{Command, CommandError, Setting};

use crate::config::{PromptSettings, SamplingSettings, Settings};
use crate::inference::tokenizer::TextTokenizer;
use crate::inference::{
    CancelToken, FinishReason, GenerationEvent, GenerationRequest, SamplingParams, Worker,
    WorkerError,
};
use crate::memory::{
    Appended, Conversation, ConversationKey, MemoryError, NewUserTurn, Role, Status, Store,
    StoredMessage,
};
use crate::prompt::{BuiltPrompt, PromptError, Turn, budget::BudgetParams};

/// Who wrote a message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Author {
    pub id: String,
    pub name: String,
    /// Platform roles (Discord role ids), for role-based access rules.
    pub roles: Vec<String>,
}

/// One message addressed to the bot, already stripped of platform details.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub key: ConversationKey,
    pub author: Author,
    /// The text; for a command, the command without its prefix (`reset`, `system Be brief`).
    pub text: String,
    /// The platform's id of the message, for answering it once and following edits/deletes.
    pub message_id: Option<String>,
    /// A DM (or the terminal): its user owns the conversation.
    pub is_private: bool,
    pub is_command: bool,
    /// False for a private one-off (`/ask private:true`): answered but kept out of memory.
    pub remember: bool,
}

impl Incoming {
    pub fn message(key: ConversationKey, author: Author, text: impl Into<String>) -> Self {
        Self {
            key,
            author,
            text: text.into(),
            message_id: None,
            is_private: false,
            is_command: false,
            remember: true,
        }
    }
}

/// Where a reply goes. Adapters implement it; they pace edits to their platform's limits.
#[async_trait::async_trait]
pub trait ReplySink: Send + Sync {
    /// Shown at once: the bot is on it.
    async fn typing(&self);
    /// Waiting behind others; `position` 1 is next.
    async fn queued(&self, position: usize);
    /// The reply so far (called as text streams in).
    async fn update(&self, text_so_far: &str);
    /// The whole reply.
    async fn finish(&self, text: &str);
    /// A short user-facing error instead of (or ending) a reply.
    async fn fail(&self, message: &str);
    /// An informational answer (command results, notices).
    async fn notice(&self, text: &str);
}

/// What became of a message, for adapters' bookkeeping and tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Answered {
        finish: FinishReason,
        reply_id: Option<i64>,
    },
    Command,
    Denied,
    Duplicate,
    RateLimited {
        retry_after: Duration,
    },
    Rejected,
    Failed,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl CoreError {
    pub fn is_retryable(&self) -> bool {
        match self {
            CoreError::Memory(e) => e.is_retryable(),
            CoreError::Worker(e) => e.is_retryable(),
            CoreError::Prompt(_) => false,
        }
    }

    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CoreError::Memory(_) => "storage",
            CoreError::Prompt(_) => "prompt",
            CoreError::Worker(WorkerError::Busy { .. }) => "busy",
            CoreError::Worker(WorkerError::Stopped) => "worker_stopped",
            CoreError::Worker(_) => "worker",
        }
    }

    fn user_text(&self) -> &'static str {
        match self {
            CoreError::Worker(WorkerError::Busy { .. }) => text::BUSY,
            CoreError::Worker(WorkerError::Stopped) => text::UNAVAILABLE,
            CoreError::Memory(_) => text::STORAGE_FAILED,
            _ => text::FAILED,
        }
    }
}

/// One finished reply, for metrics.
#[derive(Debug, Clone)]
pub struct ReplyReport {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose attention cache was reused (0: a cache miss).
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Option<Duration>,
    /// From submitting to the worker to the last token.
    pub generation_time: Duration,
    /// Old turns left out of the prompt to fit the context window.
    pub trimmed_turns: usize,
}

/// What the core reports as it works (metrics). Every method does nothing by default.
pub trait Observer: Send + Sync {
    fn received(&self, _platform: &str) {}
    /// A message not answered: `denied`, `duplicate`, `rate_limited`, `rejected`.
    fn refused(&self, _platform: &str, _reason: &'static str) {}
    fn command(&self, _platform: &str) {}
    fn answered(&self, _platform: &str, _report: &ReplyReport) {}
    /// A failure, by [`CoreError::kind`].
    fn error(&self, _platform: &str, _kind: &'static str) {}
}

struct NoObserver;
impl Observer for NoObserver {}

/// Builds prompts for stored conversations with the model's tokenizer and window. Needs no
/// model weights, so `synthia-bot prompt` can use it too.
#[derive(Clone)]
pub struct Prompter {
    pub tokenizer: Arc<TextTokenizer>,
    pub context_length: usize,
    pub settings: PromptSettings,
    pub default_max_new_tokens: u32,
}

/// A prompt ready to send, with what went into it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub built: BuiltPrompt,
    pub max_new_tokens: usize,
    pub system: String,
}

impl Prompter {
    /// The prompt for answering the conversation's question `upto` (or, with `extra`, a question
    /// not stored). `persist` stores the trim boundary and new token counts.
    pub async fn prepare(
        &self,
        store: &Store,
        conv: &Conversation,
        upto: Option<i64>,
        extra: Option<Turn>,
        persist: bool,
    ) -> Result<Prepared, CoreError> {
        let history = store.since_reset(conv).await?;
        let mut turns = context_turns(&history, upto, conv.private || !self.settings.speaker_names);
        turns.extend(extra);
        let max_new = self.max_new_tokens(conv);
        let system = conv
            .settings
            .system_prompt
            .clone()
            .unwrap_or_else(|| self.settings.system.clone());
        let built = crate::prompt::build(
            &self.tokenizer,
            &system,
            &turns,
            conv.trim_after,
            BudgetParams {
                context_length: self.context_length,
                max_new_tokens: max_new,
                trim_to: self.settings.trim_to,
            },
        )?;
        if persist {
            store.set_token_counts(&built.new_counts).await?;
            if built.trim_after != conv.trim_after {
                store.set_trim_after(conv, built.trim_after).await?;
            }
        }
        Ok(Prepared {
            built,
            max_new_tokens: max_new,
            system,
        })
    }

    /// The conversation's reply length, within what the window allows.
    pub fn max_new_tokens(&self, conv: &Conversation) -> usize {
        let wanted = conv
            .settings
            .max_new_tokens
            .unwrap_or(self.default_max_new_tokens) as usize;
        wanted.clamp(1, self.context_length / 2)
    }
}

/// The turns a prompt sees: questions up to `upto` and their stored answers, each answer right
/// after its question (answers are stored later than questions that arrived meanwhile).
pub fn context_turns(history: &[StoredMessage], upto: Option<i64>, private: bool) -> Vec<Turn> {
    let mut answers: HashMap<i64, Vec<&StoredMessage>> = HashMap::new();
    for a in history.iter().filter(|m| {
        m.role == Role::Assistant && m.status != Status::Failed && !m.content.trim().is_empty()
    }) {
        if let Some(q) = a.reply_to {
            answers.entry(q).or_default().push(a);
        }
    }
    let mut turns = Vec::new();
    for q in history
        .iter()
        .filter(|m| m.role == Role::User && upto.is_none_or(|u| m.id <= u))
    {
        turns.push(Turn {
            id: q.id,
            exchange: q.id,
            role: Role::User,
            speaker: if private { None } else { q.author_name.clone() },
            content: q.content.clone(),
            cached: q.token_count.zip(q.token_key),
        });
        for a in answers.get(&q.id).into_iter().flatten() {
            turns.push(Turn {
                id: a.id,
                exchange: q.id,
                role: Role::Assistant,
                speaker: None,
                content: a.content.clone(),
                cached: a.token_count.zip(a.token_key),
            });
        }
    }
    turns
}

/// Settings the core reads on every message; replaceable while running.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub sampling: SamplingSettings,
    pub access: HashMap<String, Access>,
}

impl CoreConfig {
    pub fn from_settings(s: &Settings) -> Self {
        let mut access = HashMap::new();
        access.insert("console".to_string(), Access::open());
        access.insert("discord".to_string(), Access::new(s.discord.access.clone()));
        access.insert("matrix".to_string(), Access::new(s.matrix.access.clone()));
        Self {
            sampling: s.sampling.clone(),
            access,
        }
    }

    pub fn access(&self, platform: &str) -> Access {
        self.access
            .get(platform)
            .cloned()
            .unwrap_or_else(Access::closed)
    }
}

type Limiter = DefaultKeyedRateLimiter<String>;

struct InFlight {
    message_id: Option<String>,
    cancel: CancelToken,
}

/// Rate limiters with the settings they were built from (rebuilt only when those change).
struct Limits {
    per_minute: (u32, u32),
    user: Option<Arc<Limiter>>,
    conversation: Option<Arc<Limiter>>,
}

impl Limits {
    fn new(user: u32, conversation: u32) -> Self {
        Self {
            per_minute: (user, conversation),
            user: limiter(user).map(Arc::new),
            conversation: limiter(conversation).map(Arc::new),
        }
    }
}

pub struct Assistant {
    store: Store,
    worker: Worker,
    prompter: RwLock<Prompter>,
    config: RwLock<CoreConfig>,
    limits: RwLock<Limits>,
    locks: Mutex<HashMap<ConversationKey, Arc<tokio::sync::Mutex<()>>>>,
    in_flight: Mutex<HashMap<ConversationKey, Vec<InFlight>>>,
    /// Questions being answered or waiting for their conversation's turn.
    answering: std::sync::atomic::AtomicUsize,
    /// Set by `stop_all`: nothing new starts generating.
    closing: std::sync::atomic::AtomicBool,
    observer: RwLock<Arc<dyn Observer>>,
}

/// Counts a question as being answered for as long as it lives.
struct Answering<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

fn limiter(per_minute: u32) -> Option<Limiter> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
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
            in_flight: Mutex::new(HashMap::new()),
            answering: std::sync::atomic::AtomicUsize::new(0),
            closing: std::sync::atomic::AtomicBool::new(false),
            observer: RwLock::new(Arc::new(NoObserver)),
        }
    }

    /// Where the core reports what it does (metrics).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        *self.observer.write().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    fn observer(&self) -> Arc<dyn Observer> {
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
        for platform in ["discord", "matrix"] {
            if old.access.get(platform) != new.access.get(platform) {
                changed.push(if platform == "discord" {
                    "discord.access"
                } else {
                    "matrix.access"
                });
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

    /// Handles one message from start to finish.
    pub async fn handle(&self, msg: Incoming, sink: &dyn ReplySink) -> Outcome {
        let span = tracing::info_span!(
            "message",
            platform = %msg.key.platform,
            conversation = %msg.key,
            message_id = msg.message_id.as_deref().unwrap_or("-"),
        );
        let platform = msg.key.platform.clone();
        let observer = self.observer();
        observer.received(&platform);
        let outcome = self.handle_inner(msg, sink).instrument(span).await;
        match &outcome {
            Outcome::Denied => observer.refused(&platform, "denied"),
            Outcome::Duplicate => observer.refused(&platform, "duplicate"),
            Outcome::RateLimited { .. } => observer.refused(&platform, "rate_limited"),
            Outcome::Rejected => observer.refused(&platform, "rejected"),
            Outcome::Command => observer.command(&platform),
            Outcome::Answered { .. } | Outcome::Failed => {}
        }
        outcome
    }

    async fn handle_inner(&self, msg: Incoming, sink: &dyn ReplySink) -> Outcome {
        let config = self.config();
        let access = config.access(&msg.key.platform);
        if !access.allows(&msg) {
            tracing::info!(author = %msg.author.id, "message refused by access rules");
            return Outcome::Denied;
        }
        if let Some(id) = &msg.message_id {
            match self.store.is_known(&msg.key.platform, id).await {
                Ok(true) => {
                    tracing::debug!("already handled");
                    return Outcome::Duplicate;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot check for duplicates");
                    self.observer().error(&msg.key.platform, "storage");
                    sink.fail(text::STORAGE_FAILED).await;
                    return Outcome::Failed;
                }
            }
        }
        let command = if msg.is_command {
            match commands::parse(&msg.text) {
                Ok(c) => Some(c),
                Err(e) => {
                    sink.notice(&text::bad_command(&e)).await;
                    return Outcome::Command;
                }
            }
        } else {
            None
        };
        let exempt = access.is_open() || matches!(command, Some(Command::Stop | Command::Help));
        if !exempt && let Some(wait) = self.rate_limited(&msg) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            tracing::info!(retry_after = secs, "rate limited");
            sink.fail(&text::rate_limited(secs)).await;
            return Outcome::RateLimited { retry_after: wait };
        }
        match command {
            Some(Command::Ask(question)) => {
                let mut msg = msg;
                msg.text = question;
                self.answer(msg, &config, sink).await
            }
            Some(cmd) => {
                let admin = access.is_admin(&msg) || msg.is_private;
                if cmd.needs_admin() && !admin {
                    sink.notice(text::NOT_ALLOWED).await;
                    return Outcome::Command;
                }
                if let Err(e) = self.execute(&cmd, &msg, sink).await {
                    tracing::error!(error = %e, "command failed");
                    self.observer().error(&msg.key.platform, e.kind());
                    sink.fail(e.user_text()).await;
                    return Outcome::Failed;
                }
                Outcome::Command
            }
            None => self.answer(msg, &config, sink).await,
        }
    }

    fn rate_limited(&self, msg: &Incoming) -> Option<Duration> {
        let now = DefaultClock::default().now();
        let user_key = format!("{}:{}", msg.key.platform, msg.author.id);
        let (user, conversation) = {
            let limits = self.limits.read().unwrap_or_else(|e| e.into_inner());
            (limits.user.clone(), limits.conversation.clone())
        };
        for (limiter, key) in [(&user, user_key), (&conversation, msg.key.to_string())] {
            if let Some(l) = limiter {
                // Forget users whose quota has refilled, so the map does not grow forever.
                if l.len() > 10_000 {
                    l.retain_recent();
                }
                if let Err(not_until) = l.check_key(&key) {
                    return Some(not_until.wait_time_from(now));
                }
            }
        }
        None
    }

    async fn execute(
        &self,
        cmd: &Command,
        msg: &Incoming,
        sink: &dyn ReplySink,
    ) -> Result<(), CoreError> {
        match cmd {
            Command::Help => sink.notice(text::HELP).await,
            Command::Stop => {
                if self.stop(&msg.key) {
                    sink.notice(text::STOPPED).await;
                } else {
                    sink.notice(text::NOTHING_TO_STOP).await;
                }
            }
            Command::Reset => {
                let conv = self.store.conversation(&msg.key).await?;
                self.store.reset(&conv).await?;
                sink.notice(text::RESET_DONE).await;
            }
            Command::Forget => {
                self.stop(&msg.key);
                if let Some(conv) = self.store.find_conversation(&msg.key).await? {
                    self.store.forget(&conv).await?;
                }
                sink.notice(text::FORGET_DONE).await;
            }
            Command::System(None) => {
                let conv = self.store.conversation(&msg.key).await?;
                let custom = conv.settings.system_prompt.clone();
                let shown = custom
                    .clone()
                    .unwrap_or_else(|| self.prompter().settings.system);
                sink.notice(&text::system_is(&shown, custom.is_some()))
                    .await;
            }
            Command::System(Some(system)) => {
                let conv = self.store.conversation(&msg.key).await?;
                let mut settings = conv.settings.clone();
                settings.system_prompt = Some(system.clone());
                self.store.set_settings(&conv, &settings).await?;
                sink.notice(&text::system_set(system)).await;
            }
            Command::Set(setting) => {
                let conv = self.store.conversation(&msg.key).await?;
                let mut settings = conv.settings.clone();
                let reply = match setting {
                    Setting::Temperature(t) => {
                        settings.temperature = Some(*t);
                        text::temperature_set(*t)
                    }
                    Setting::MaxTokens(n) => {
                        settings.max_new_tokens = Some(*n);
                        let effective = self.prompter().max_new_tokens(&Conversation {
                            settings: settings.clone(),
                            ..conv.clone()
                        });
                        text::max_tokens_set(*n, effective as u32)
                    }
                };
                self.store.set_settings(&conv, &settings).await?;
                sink.notice(&reply).await;
            }
            Command::Ask(_) => {}
        }
        Ok(())
    }

    /// Questions being answered or waiting for their turn (for a graceful shutdown).
    pub fn answering(&self) -> usize {
        self.answering.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stores the question, waits for the conversation's turn, generates and stores the reply.
    async fn answer(&self, msg: Incoming, config: &CoreConfig, sink: &dyn ReplySink) -> Outcome {
        self.answering
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _answering = Answering(&self.answering);
        let text_in = msg.text.trim();
        if text_in.is_empty() {
            sink.notice(text::EMPTY).await;
            return Outcome::Rejected;
        }
        let chars = text_in.chars().count();
        let limit = self.prompter().settings.max_message_chars as usize;
        if chars > limit {
            sink.fail(&text::too_long(chars, limit)).await;
            return Outcome::Rejected;
        }
        // The user turn is stored before anything else, so a crash or restart loses nothing.
        let stored = async {
            let conv = self.store.conversation(&msg.key).await?;
            if conv.private != msg.is_private {
                self.store.set_private(&conv, msg.is_private).await?;
            }
            let question = if msg.remember {
                Some(
                    self.store
                        .append_user(
                            &conv,
                            &NewUserTurn {
                                author_id: &msg.author.id,
                                author_name: &msg.author.name,
                                content: &msg.text,
                                platform_message_id: msg.message_id.as_deref(),
                            },
                        )
                        .await?,
                )
            } else {
                None
            };
            Ok::<_, CoreError>(question)
        }
        .await;
        let question_id = match stored {
            Ok(Some(Appended::Duplicate(_))) => return Outcome::Duplicate,
            Ok(Some(Appended::New(id))) => Some(id),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot store the question");
                self.observer().error(&msg.key.platform, e.kind());
                sink.fail(e.user_text()).await;
                return Outcome::Failed;
            }
        };
        sink.typing().await;

        // One generation per conversation at a time; later messages wait in arrival order.
        let lock = self.conversation_lock(&msg.key);
        let _turn = lock.lock().await;
        match self.generate(&msg, question_id, config, sink).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, retryable = e.is_retryable(), "answering failed");
                self.observer().error(&msg.key.platform, e.kind());
                sink.fail(e.user_text()).await;
                Outcome::Failed
            }
        }
    }

    async fn generate(
        &self,
        msg: &Incoming,
        question_id: Option<i64>,
        config: &CoreConfig,
        sink: &dyn ReplySink,
    ) -> Result<Outcome, CoreError> {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(WorkerError::Stopped.into());
        }
        // Reload: settings may have changed while this message waited its turn.
        let conv = self.store.conversation(&msg.key).await?;
        if let Some(id) = question_id
            && self.store.message(id).await?.is_none()
        {
            tracing::info!("question deleted before its turn came");
            return Ok(Outcome::Rejected);
        }
        let extra = match question_id {
            Some(_) => None,
            None => Some(Turn {
                id: i64::MAX,
                exchange: i64::MAX,
                role: Role::User,
                speaker: (!conv.private && self.prompter().settings.speaker_names)
                    .then(|| msg.author.name.clone()),
                content: msg.text.clone(),
                cached: None,
            }),
        };
        let prepared = self
            .prompter()
            .prepare(&self.store, &conv, question_id, extra, msg.remember)
            .await?;
        if let Some(cut) = prepared.built.cut_chars {
            sink.notice(&text::cut(cut)).await;
        }
        tracing::debug!(
            prompt_tokens = prepared.built.token_count(),
            trimmed_turns = prepared.built.trimmed_turns,
            "prompt built"
        );
        let mut sampling = SamplingParams::from_settings(&config.sampling);
        if let Some(t) = conv.settings.temperature {
            sampling.temperature = t;
        }
        let request = GenerationRequest {
            conversation: msg.key.to_string(),
            prompt: prepared.built.ids.clone(),
            sampling,
            max_new_tokens: prepared.max_new_tokens,
            stop: crate::prompt::ROLE_STOPS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let submitted = std::time::Instant::now();
        let mut handle = self.worker.submit(request)?;
        let cancel = handle.cancel_token();
        self.track(&msg.key, msg.message_id.clone(), cancel.clone());
        let mut text_so_far = String::new();
        let mut result = None;
        while let Some(event) = handle.next().await {
            match event {
                GenerationEvent::Queued { position } => sink.queued(position).await,
                GenerationEvent::Started { .. } => {}
                GenerationEvent::Delta(d) => {
                    text_so_far.push_str(&d);
                    sink.update(&text_so_far).await;
                }
                GenerationEvent::Finished(r) => {
                    result = Some(r);
                    break;
                }
            }
        }
        self.untrack(&msg.key, &cancel);
        let Some(result) = result else {
            return Err(WorkerError::Stopped.into());
        };
        let status = match result.finish {
            FinishReason::Eos | FinishReason::Stop | FinishReason::Length => Status::Complete,
            FinishReason::Cancelled => Status::Cancelled,
            FinishReason::Error => Status::Failed,
        };
        self.observer().answered(
            &msg.key.platform,
            &ReplyReport {
                finish: result.finish,
                prompt_tokens: result.prompt_tokens,
                reused_tokens: result.reused_tokens,
                completion_tokens: result.completion_tokens,
                time_to_first_token: result.time_to_first_token,
                generation_time: submitted.elapsed(),
                trimmed_turns: prepared.built.trimmed_turns,
            },
        );
        if result.finish == FinishReason::Error {
            self.observer().error(&msg.key.platform, "generation");
        }
        tracing::info!(
            finish = ?result.finish,
            prompt_tokens = result.prompt_tokens,
            reused_tokens = result.reused_tokens,
            completion_tokens = result.completion_tokens,
            "reply generated"
        );
        // Not stored when the question was deleted while the reply was written.
        let reply_id = match question_id {
            Some(q) if msg.remember => {
                self.store
                    .append_assistant(&conv, Some(q), &result.text, status, None)
                    .await?
            }
            _ => None,
        };
        match result.finish {
            FinishReason::Error => {
                tracing::error!(
                    error = result.error.as_deref().unwrap_or("unknown"),
                    "generation failed"
                );
                sink.fail(text::FAILED).await;
            }
            FinishReason::Cancelled => {
                sink.finish(&format!("{}{}", result.text, text::CANCELLED_SUFFIX))
                    .await;
            }
            _ => sink.finish(&result.text).await,
        }
        Ok(Outcome::Answered {
            finish: result.finish,
            reply_id,
        })
    }

    fn conversation_lock(&self, key: &ConversationKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Drop locks nobody holds or waits for, so the map does not grow without bound.
        locks.retain(|k, l| k == key || Arc::strong_count(l) > 1);
        locks.entry(key.clone()).or_default().clone()
    }

    fn track(&self, key: &ConversationKey, message_id: Option<String>, cancel: CancelToken) {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone())
            .or_default()
            .push(InFlight { message_id, cancel });
    }

    fn untrack(&self, key: &ConversationKey, cancel: &CancelToken) {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get_mut(key) {
            list.retain(|f| !f.cancel.same_as(cancel));
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Cancels the reply being written in a conversation. True if there was one.
    pub fn stop(&self, key: &ConversationKey) -> bool {
        let map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(list) if !list.is_empty() => {
                list.iter().for_each(|f| f.cancel.cancel());
                true
            }
            _ => false,
        }
    }

    /// Cancels every reply in progress, and lets none start after (shutdown).
    pub fn stop_all(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        map.values().flatten().for_each(|f| f.cancel.cancel());
    }

    /// A question was edited on the platform: the stored turn follows.
    pub async fn message_edited(
        &self,
        platform: &str,
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
        platform: &str,
        message_id: &str,
    ) -> Result<bool, CoreError> {
        let deleted = self
            .store
            .delete_by_platform_id(platform, message_id)
            .await?
            .is_some();
        let map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for f in map
            .iter()
            .filter(|(k, _)| k.platform == platform)
            .flat_map(|(_, l)| l)
        {
            if f.message_id.as_deref() == Some(message_id) {
                f.cancel.cancel();
            }
        }
        Ok(deleted)
    }
}
