//! Taking up, after a restart, the questions the bot had accepted (stored) but not answered when
//! the process stopped: recent ones are answered in order per conversation, older ones get one
//! notice to ask again, ancient ones are left alone. Replies stored but not yet shown whole are
//! shown, and answers begun in messages the last run posted continue in those messages. Each platform's adapter calls
//! [`Assistant::resume`] once it is connected, with a way to build a reply's sink for a stored
//! question.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument;

use super::{Answering, Assistant, Outcome, ReplySink, text};
use crate::chat::{Author, ConversationKey, Incoming, Platform, Request, Shown};
use crate::memory::{Status, Unanswered, Unshown, now_ms};

/// A stored question as an adapter needs it to reply on its platform.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingQuestion {
    pub key: ConversationKey,
    /// The platform's id of the question (Discord snowflake, Matrix event id).
    pub message_id: Option<String>,
    /// The platform's id of who asked.
    pub author_id: Option<String>,
    /// Messages the last run posted for the answer, to be edited rather than posted again.
    pub shown: Option<Shown>,
}

/// How an adapter replies to a question it did not just receive: the platform knows how a
/// conversation key and a message id become a place to post.
#[async_trait::async_trait]
pub trait ResumeSinks: Send + Sync {
    /// The sink for a reply to `question`, or `None` when its channel or room can no longer be
    /// reached (the question is then left as it is).
    async fn sink_for(&self, question: &PendingQuestion) -> Option<Box<dyn ReplySink>>;
}

/// What start-up does with unanswered questions, from `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ResumeWindows {
    /// Questions accepted this recently before start-up are answered.
    pub(super) answer: Duration,
    /// Older ones within this get a restart notice.
    pub(super) notice: Duration,
}

/// Which platforms were taken up already, and from when this process answers live.
pub(super) struct ResumeState {
    pub(super) windows: ResumeWindows,
    /// Unix milliseconds of start-up: questions stored after it are this process's own.
    pub(super) started_ms: i64,
    done: Mutex<HashSet<Platform>>,
}

impl ResumeState {
    pub(super) fn new(windows: ResumeWindows) -> Self {
        Self {
            windows,
            started_ms: now_ms(),
            done: Mutex::new(HashSet::new()),
        }
    }

    /// True the first time only: a reconnect takes up nothing again.
    fn first_for(&self, platform: Platform) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(platform)
    }
}

/// What a resume pass did, for the log and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resumed {
    pub answered: usize,
    pub noticed: usize,
    /// Stored replies whose final text the last run did not get to show.
    pub shown: usize,
    /// Not taken up: unreachable, stopped, or failed (each logged).
    pub skipped: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Take {
    Answer,
    Notice,
    /// Show a stored reply's final text.
    Show {
        reply: String,
        status: Status,
    },
}

impl Take {
    fn kind(&self) -> &'static str {
        match self {
            Take::Answer => "answer",
            Take::Notice => "notice",
            Take::Show { .. } => "show",
        }
    }
}

impl Assistant {
    /// Takes up the platform's unanswered questions: each conversation in its own task, its
    /// questions in order while holding its turn, so a message arriving meanwhile waits behind
    /// them. Runs once per platform per process; later calls (reconnects) return at once.
    pub async fn resume(
        self: Arc<Self>,
        platform: Platform,
        sinks: Arc<dyn ResumeSinks>,
    ) -> Resumed {
        if !self.resume.first_for(platform) {
            return Resumed::default();
        }
        let windows = self.resume.windows;
        let started = self.resume.started_ms;
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let answer_since = started.saturating_sub(ms(windows.answer));
        let notice_since = started.saturating_sub(ms(windows.notice));
        // Replies stored but maybe not shown whole come first: their questions precede any
        // unanswered one in the same conversation.
        let unshown = match self
            .store
            .take_unshown(platform, notice_since, started)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(platform = %platform, error = %e, "cannot look for replies left half shown");
                self.observer().error(platform, "storage");
                Vec::new()
            }
        };
        let found = match self
            .store
            .take_unanswered(platform, notice_since, started)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(platform = %platform, error = %e, "cannot look for questions left unanswered");
                self.observer().error(platform, "storage");
                Vec::new()
            }
        };
        if found.is_empty() && unshown.is_empty() {
            return Resumed::default();
        }
        let mut by_conversation: BTreeMap<ConversationKey, Vec<(Unanswered, Take)>> =
            BTreeMap::new();
        for Unshown {
            pending,
            reply,
            status,
            ..
        } in unshown
        {
            by_conversation
                .entry(pending.key.clone())
                .or_default()
                .push((pending, Take::Show { reply, status }));
        }
        for q in found {
            let take = if q.question.created_at >= answer_since {
                Take::Answer
            } else {
                Take::Notice
            };
            by_conversation
                .entry(q.key.clone())
                .or_default()
                .push((q, take));
        }
        for questions in by_conversation.values_mut() {
            questions.sort_by_key(|(q, _)| q.question.id);
        }
        tracing::info!(
            platform = %platform,
            conversations = by_conversation.len(),
            "taking up questions left unanswered by the last run"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for (key, questions) in by_conversation {
            let (me, sinks) = (self.clone(), sinks.clone());
            let span = tracing::info_span!("resume", platform = %platform, conversation = %key);
            tasks.spawn(
                async move { me.resume_conversation(&key, questions, &*sinks).await }
                    .instrument(span),
            );
        }
        let mut total = Resumed::default();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(r) => {
                    total.answered += r.answered;
                    total.noticed += r.noticed;
                    total.shown += r.shown;
                    total.skipped += r.skipped;
                }
                Err(e) => tracing::error!(error = %e, "a resumed conversation's task failed"),
            }
        }
        tracing::info!(
            platform = %platform,
            answered = total.answered,
            noticed = total.noticed,
            shown = total.shown,
            skipped = total.skipped,
            "questions left unanswered taken up"
        );
        total
    }

    async fn resume_conversation(
        &self,
        key: &ConversationKey,
        questions: Vec<(Unanswered, Take)>,
        sinks: &dyn ResumeSinks,
    ) -> Resumed {
        let mut done = Resumed::default();
        let lock = self.conversation_lock(key);
        let _turn = lock.lock().await;
        // Daemons sharing a PostgreSQL memory answer one at a time here too.
        let conversation_id = questions.first().map(|(q, _)| q.question.conversation_id);
        let _shared_turn = match conversation_id {
            Some(id) => match self.store.take_turn(id).await {
                Ok(turn) => Some(turn),
                Err(e) => {
                    tracing::error!(error = %e, "cannot take the conversation's turn; its questions are left for the next start");
                    self.observer().error(key.platform, "storage");
                    done.skipped = questions.len();
                    return done;
                }
            },
            None => None,
        };
        for (q, take) in questions {
            let message_id = q.question.platform_message_id.clone();
            let span = tracing::info_span!(
                "resumed_question",
                message_id = message_id.as_deref().unwrap_or("-"),
                take = take.kind(),
            );
            let taken = self.resume_one(q, take, sinks).instrument(span).await;
            match taken {
                Some(Take::Answer) => done.answered += 1,
                Some(Take::Notice) => done.noticed += 1,
                Some(Take::Show { .. }) => done.shown += 1,
                None => done.skipped += 1,
            }
        }
        done
    }

    /// Answers or notices one question; what it did, or `None` when it did neither.
    async fn resume_one(&self, q: Unanswered, take: Take, sinks: &dyn ResumeSinks) -> Option<Take> {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.answering
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _answering = Answering(&self.answering);
        let pending = PendingQuestion {
            key: q.key.clone(),
            message_id: q.question.platform_message_id.clone(),
            author_id: q.question.author_id.clone(),
            shown: q.shown.clone(),
        };
        let Some(sink) = sinks.sink_for(&pending).await else {
            tracing::warn!("the question's conversation cannot be reached; left unanswered");
            return None;
        };
        match take {
            Take::Notice => match self.store.claim_restart_notice(q.question.id).await {
                Ok(true) => {
                    sink.notice(text::RESTARTED).await;
                    if let Err(e) = self.store.mark_restart_notice_sent(q.question.id).await {
                        tracing::error!(error = %e, "the restart notice went out but cannot be marked sent");
                    }
                    self.shown_whole(q.question.id).await;
                    tracing::info!("restart notice sent");
                    Some(Take::Notice)
                }
                Ok(false) => None,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record a restart notice; none sent");
                    self.observer().error(q.key.platform, "storage");
                    None
                }
            },
            Take::Show { reply, status } => {
                let shown = match status {
                    Status::Complete => reply,
                    Status::Cancelled => text::cancelled(&reply),
                    Status::Failed => text::failed_after(&reply, text::FAILED),
                };
                sink.finish(&shown).await;
                self.shown_whole(q.question.id).await;
                tracing::info!("a stored reply the last run did not show whole is shown");
                Some(Take::Show {
                    reply: String::new(),
                    status,
                })
            }
            Take::Answer => {
                let msg = Incoming {
                    key: q.key.clone(),
                    author: Author {
                        id: q.question.author_id.clone().unwrap_or_default(),
                        name: q.question.author_name.clone().unwrap_or_default(),
                        roles: Vec::new(),
                    },
                    request: Request::Question(q.question.content.clone()),
                    message_id: q.question.platform_message_id.clone(),
                    is_private: q.private,
                    remember: true,
                };
                sink.typing().await;
                let config = self.config();
                // Latency counts from when the question is taken up: its arrival was in a past
                // process.
                let arrived = std::time::Instant::now();
                match self
                    .generate(
                        &msg,
                        super::answer::Asked {
                            question: &q.question.content,
                            question_id: Some(q.question.id),
                            arrived,
                            resumed: true,
                            notices_shown: q.shown.as_ref().map_or(0, |s| s.notices),
                        },
                        &config,
                        &*sink,
                    )
                    .await
                {
                    Ok(Outcome::Answered { .. }) => {
                        tracing::info!("question answered after the restart");
                        Some(Take::Answer)
                    }
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "answering a resumed question failed");
                        self.observer().error(q.key.platform, e.kind());
                        sink.fail(e.user_text()).await;
                        None
                    }
                }
            }
        }
    }

    /// The answer to a taken-up question is on the platform: a later restart leaves it.
    async fn shown_whole(&self, question_id: i64) {
        if let Err(e) = self.store.mark_shown(question_id).await {
            tracing::warn!(error = %e, "the answer was shown but cannot be marked so; a restart shows it again");
        }
    }
}
