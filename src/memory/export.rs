//! Questions paired with their answers: one rule for the prompt's history and for `export`.

use std::collections::HashMap;

use serde::Serialize;

use super::records::{Conversation, Status, StoredMessage};
use super::{Result, Store};
use crate::chat::Role;

/// One question and its answer, for export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exchange {
    pub conversation: String,
    pub author: Option<String>,
    pub prompt: String,
    pub answer: Option<String>,
    pub status: Option<Status>,
    /// RFC 3339 time of the question.
    pub time: String,
    pub in_context: bool,
}

/// Each question in id order with the replies that answer it, oldest first. Replies are stored
/// after questions that arrived while they were written, so order alone cannot pair them:
/// `reply_to` does.
pub fn pair_answers(messages: &[StoredMessage]) -> Vec<(&StoredMessage, Vec<&StoredMessage>)> {
    let mut answers: HashMap<i64, Vec<&StoredMessage>> = HashMap::new();
    for a in messages.iter().filter(|m| m.role == Role::Assistant) {
        if let Some(q) = a.reply_to {
            answers.entry(q).or_default().push(a);
        }
    }
    messages
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|q| (q, answers.remove(&q.id).unwrap_or_default()))
        .collect()
}

impl Store {
    /// Question/answer pairs in conversation order, for `export`.
    pub async fn exchanges(&self, conversation: &Conversation) -> Result<Vec<Exchange>> {
        let messages = self.all_messages(conversation.id).await?;
        let key = conversation.key.to_string();
        let boundary = conversation.reset_after;
        let mut out = Vec::new();
        for (question, answers) in pair_answers(&messages) {
            // The newest reply is the one the question ended with.
            let answer = answers.last().copied();
            out.push(Exchange {
                conversation: key.clone(),
                author: question.author_name.clone(),
                prompt: question.content.clone(),
                answer: answer.map(|a| a.content.clone()),
                status: answer.map(|a| a.status),
                time: chrono::DateTime::from_timestamp_millis(question.created_at)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default(),
                in_context: question.id > boundary,
            });
        }
        Ok(out)
    }
}
