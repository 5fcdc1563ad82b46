//! Answering a question: stored before anything else, one generation per conversation at a time,
//! streamed into the sink, and the reply stored whole.

use super::{
    Answering, Assistant, CoreConfig, CoreError, Outcome, ReplyReport, ReplySink, retry, text,
};
use crate::chat::{ConversationKey, Incoming, Role, Shown, without_nul};
use crate::inference::{
    Failure, FinishReason, GenerationEvent, GenerationRequest, SamplingParams, WorkerError,
};
use crate::memory::{Appended, Conversation, NewUserTurn, Status};
use crate::prompt::Turn;

/// The question a generation answers.
pub(super) struct Asked<'a> {
    pub(super) question: &'a str,
    /// Its stored row; `None` when it is not remembered.
    pub(super) question_id: Option<i64>,
    /// When it reached the core, where latency metrics count from.
    pub(super) arrived: std::time::Instant,
    /// Taken up after a restart rather than just received.
    pub(super) resumed: bool,
    /// Notes shown before an answer the last run began (a question cut to fit): not shown again.
    pub(super) notices_shown: usize,
}

/// Keeps the question's row saying where its answer is shown, written only when the reply's
/// messages change (a post, not an edit), so a restart can finish it in the same place.
struct ShownRecorder {
    question_id: Option<i64>,
    last: Option<Shown>,
}

impl ShownRecorder {
    /// After the sink may have posted: records a change.
    async fn check(&mut self, store: &crate::memory::Store, sink: &dyn ReplySink) {
        self.record(store, sink, false).await;
    }

    /// Just before the reply is stored: records even that nothing is posted yet, so a restart
    /// that finds the reply stored shows it.
    async fn before_storing(&mut self, store: &crate::memory::Store, sink: &dyn ReplySink) {
        self.record(store, sink, true).await;
    }

    async fn record(
        &mut self,
        store: &crate::memory::Store,
        sink: &dyn ReplySink,
        even_empty: bool,
    ) {
        let Some(question_id) = self.question_id else {
            return;
        };
        let Some(shown) = sink.shown().await else {
            return;
        };
        if (shown.ids.is_empty() && !even_empty) || self.last.as_ref() == Some(&shown) {
            return;
        }
        if let Err(e) = store.set_shown(question_id, &shown).await {
            tracing::warn!(error = %e, "cannot record where the answer is shown; a restart would post it anew");
        }
        self.last = Some(shown);
    }
}

impl Assistant {
    /// The conversation, created on its first message. Looked up before anything is written, so
    /// a conversation that exists is served even while the database cannot be written.
    async fn conversation(&self, key: &ConversationKey) -> Result<Conversation, CoreError> {
        Ok(match self.store.find_conversation(key).await? {
            Some(conv) => conv,
            None => self.store.conversation(key).await?,
        })
    }

    /// Stores the question, waits for the conversation's turn, generates and stores the reply.
    pub(super) async fn answer(
        &self,
        msg: Incoming,
        question: String,
        arrived: std::time::Instant,
        config: &CoreConfig,
        sink: &dyn ReplySink,
    ) -> Outcome {
        self.answering
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _answering = Answering(&self.answering);
        // As it is stored and shown: no NUL.
        let question = without_nul(&question).into_owned();
        let text_in = question.trim();
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
        let stored = retry::storing("question", || async {
            let conv = self.conversation(&msg.key).await?;
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
                                content: &question,
                                platform_message_id: msg.message_id.as_deref(),
                            },
                        )
                        .await?,
                )
            } else {
                None
            };
            Ok::<_, CoreError>((conv.id, question))
        })
        .await;
        let (conversation_id, question_id) = match stored {
            Ok((_, Some(Appended::Duplicate(_)))) => return Outcome::Duplicate,
            Ok((conv, Some(Appended::New(id)))) => (conv, Some(id)),
            Ok((conv, None)) => (conv, None),
            Err(e) => {
                tracing::error!(error = %e, "cannot store the question");
                self.observer().error(msg.key.platform, e.kind());
                sink.fail(e.user_text()).await;
                return Outcome::Failed;
            }
        };
        sink.typing().await;

        // One generation per conversation at a time; later messages wait in arrival order.
        let lock = self.conversation_lock(&msg.key);
        let _turn = lock.lock().await;
        // And across daemons sharing one PostgreSQL memory; a daemon that dies releases it.
        let answered = match self.store.take_turn(conversation_id).await {
            Ok(_shared_turn) => {
                self.generate(
                    &msg,
                    Asked {
                        question: &question,
                        question_id,
                        arrived,
                        resumed: false,
                        notices_shown: 0,
                    },
                    config,
                    sink,
                )
                .await
            }
            Err(e) => Err(e.into()),
        };
        match answered {
            Ok(outcome) => outcome,
            Err(e) => {
                // A full queue is load, not a fault: operators alert on ERROR.
                if e.is_retryable() {
                    tracing::warn!(error = %e, "not answered now; the user was told to retry");
                } else {
                    tracing::error!(error = %e, "answering failed");
                }
                self.observer().error(msg.key.platform, e.kind());
                sink.fail(e.user_text()).await;
                Outcome::Failed
            }
        }
    }

    /// Generates and stores the reply to `asked.question` (stored as `asked.question_id`, unless
    /// not remembered). A resumed question, taken up after a restart, has its reply stored only
    /// if it has none yet.
    pub(super) async fn generate(
        &self,
        msg: &Incoming,
        asked: Asked<'_>,
        config: &CoreConfig,
        sink: &dyn ReplySink,
    ) -> Result<Outcome, CoreError> {
        let Asked {
            question,
            question_id,
            arrived,
            resumed,
            notices_shown,
        } = asked;
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(WorkerError::Stopped.into());
        }
        // Reload: settings may have changed while this message waited its turn.
        let conv = self.conversation(&msg.key).await?;
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
                content: question.to_string(),
                cached: None,
            }),
        };
        let mut recorder = ShownRecorder {
            question_id: question_id.filter(|_| msg.remember),
            last: None,
        };
        let mut sampling = SamplingParams::from_settings(&config.sampling);
        if let Some(t) = conv.settings.temperature {
            sampling.temperature = t;
        }
        let mut prompter = self.prompter();
        // A backend whose server said its window is smaller than the configured one.
        let mut retried_smaller = false;
        let (prepared, result, cancel, first_token) = loop {
            prompter.context_length = prompter.context_length.min(self.worker.context_length());
            let prepared = prompter
                .prepare(&self.store, &conv, question_id, extra.clone(), msg.remember)
                .await?;
            if let Some(cut) = prepared.built.cut_chars
                && notices_shown == 0
                && !retried_smaller
            {
                sink.notice(&text::cut(cut)).await;
                recorder.check(&self.store, sink).await;
            }
            tracing::debug!(
                prompt_tokens = prepared.built.token_count(),
                trimmed_turns = prepared.built.trimmed_turns,
                "prompt built"
            );
            let request = GenerationRequest {
                conversation: msg.key.to_string(),
                prompt: prepared.built.ids.clone(),
                prompt_text: Some(prepared.built.text.clone()),
                sampling: sampling.clone(),
                max_new_tokens: prepared.max_new_tokens,
                stop: crate::prompt::ROLE_STOPS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            };
            let mut handle = self.worker.submit(request)?;
            let cancel = handle.cancel_token();
            self.in_flight
                .track(&msg.key, msg.message_id.clone(), cancel.clone());
            let mut text_so_far = String::new();
            let mut result = None;
            let mut first_token = None;
            while let Some(event) = handle.next().await {
                match event {
                    GenerationEvent::Queued { position } => {
                        sink.queued(position).await;
                        recorder.check(&self.store, sink).await;
                    }
                    GenerationEvent::Started { .. } => {}
                    GenerationEvent::Delta(d) => {
                        first_token.get_or_insert_with(|| arrived.elapsed());
                        text_so_far.push_str(&without_nul(&d));
                        sink.update(&text_so_far).await;
                        recorder.check(&self.store, sink).await;
                    }
                    GenerationEvent::Finished(r) => {
                        result = Some(r);
                        break;
                    }
                }
            }
            // Refused before a word was written: once more, built for the server's window.
            if let Some(r) = &result
                && let Some(Failure::ContextTooSmall { window }) = r.failure
                && text_so_far.is_empty()
                && !retried_smaller
                && window < prompter.context_length
            {
                self.in_flight.untrack(&msg.key, &cancel);
                retried_smaller = true;
                tracing::info!(window, "building the prompt again for the server's window");
                prompter.context_length = window;
                continue;
            }
            break (prepared, result, cancel, first_token);
        };
        self.in_flight.untrack(&msg.key, &cancel);
        let Some(mut result) = result else {
            return Err(WorkerError::Stopped.into());
        };
        // Stored and shown alike: a NUL the model wrote (a byte token) as U+FFFD.
        if result.text.contains('\0') {
            result.text = without_nul(&result.text).into_owned();
        }
        let status = match result.finish {
            FinishReason::Eos | FinishReason::Stop | FinishReason::Length => Status::Complete,
            FinishReason::Cancelled => Status::Cancelled,
            FinishReason::Error => Status::Failed,
        };
        let report = ReplyReport {
            finish: result.finish,
            prompt_tokens: result.prompt_tokens,
            reused_tokens: result.reused_tokens,
            completion_tokens: result.completion_tokens,
            // A reply whose first token ended it streamed nothing: its first token came
            // with the result.
            time_to_first_token: first_token
                .or_else(|| (result.time_to_first_token.is_some()).then(|| arrived.elapsed())),
            generation_time: result.prefill_time + result.decode_time,
            decode_time: result.decode_time,
            trimmed_turns: prepared.built.trimmed_turns,
        };
        self.observer().answered(msg.key.platform, &report);
        sink.answered(&report).await;
        if result.finish == FinishReason::Error {
            self.observer().error(msg.key.platform, "generation");
        }
        tracing::info!(
            finish = ?result.finish,
            prompt_tokens = result.prompt_tokens,
            reused_tokens = result.reused_tokens,
            completion_tokens = result.completion_tokens,
            "reply generated"
        );
        recorder.before_storing(&self.store, sink).await;
        // Not stored when the question was deleted while the reply was written.
        let reply_id = match question_id {
            Some(q) if msg.remember && resumed => {
                retry::storing("reply", || async {
                    Ok(self
                        .store
                        .append_only_reply(conv.id, q, &result.text, status)
                        .await?)
                })
                .await?
            }
            Some(q) if msg.remember => {
                retry::storing("reply", || async {
                    Ok(self
                        .store
                        .append_assistant(&conv, Some(q), &result.text, status, None)
                        .await?)
                })
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
                sink.fail(match result.failure {
                    Some(Failure::Unavailable) => text::SERVERS_DOWN,
                    _ => text::FAILED,
                })
                .await;
            }
            FinishReason::Cancelled => sink.finish(&text::cancelled(&result.text)).await,
            _ => sink.finish(&result.text).await,
        }
        if let Some(q) = recorder.question_id
            && let Err(e) = self.store.mark_shown(q).await
        {
            tracing::warn!(error = %e, "the answer was shown but cannot be marked so; a restart shows it again");
        }
        Ok(Outcome::Answered {
            finish: result.finish,
            reply_id,
        })
    }
}
