//! Building the prompt for a stored conversation: its history since the last reset, each answer
//! after its question, within the model's window. Needs no model weights, so
//! `synthia-bot prompt` can use it too.

use std::sync::Arc;

use super::CoreError;
use crate::chat::Role;
use crate::config::PromptSettings;
use crate::inference::tokenizer::TextTokenizer;
use crate::memory::{Conversation, Status, Store, StoredMessage, pair_answers};
use crate::prompt::{BuiltPrompt, Turn, budget::BudgetParams};

/// Builds prompts with the model's tokenizer and window.
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

/// The turns a prompt sees: questions up to `upto` and their stored answers (not failed, not
/// empty), each answer right after its question.
pub fn context_turns(history: &[StoredMessage], upto: Option<i64>, private: bool) -> Vec<Turn> {
    let mut turns = Vec::new();
    for (q, answers) in pair_answers(history) {
        if upto.is_some_and(|u| q.id > u) {
            continue;
        }
        turns.push(Turn {
            id: q.id,
            exchange: q.id,
            role: Role::User,
            speaker: if private { None } else { q.author_name.clone() },
            content: q.content.clone(),
            cached: q.token_count.zip(q.token_key),
        });
        for a in answers
            .into_iter()
            .filter(|a| a.status != Status::Failed && !a.content.trim().is_empty())
        {
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
