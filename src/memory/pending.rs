//! Questions left without a reply when the process stopped, and the restart notices sent for
//! them. A resumed reply is stored only while its question exists and has no reply yet, and a
//! notice is claimed in a row before it is sent, so neither can happen twice.

use sqlx::{AssertSqlSafe, Row};

use super::records::{MESSAGE_COLUMNS, Status, message_from_row};
use super::{MemoryError, Result, Store, StoredMessage, now_ms};
use crate::chat::{ConversationKey, Platform};

/// A stored question with no reply and no restart notice, with the conversation it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Unanswered {
    pub key: ConversationKey,
    pub private: bool,
    pub question: StoredMessage,
}

/// Where a question's restart notice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeStatus {
    /// Recorded before sending; it stays so if the process died before the notice went out.
    Claimed,
    Sent,
}

impl Store {
    /// The platform's questions accepted in `[since_ms, before_ms)` that have no reply and no
    /// restart notice, after their conversation's reset boundary, oldest first.
    pub async fn unanswered(
        &self,
        platform: Platform,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<Unanswered>> {
        let columns: String = MESSAGE_COLUMNS
            .split(", ")
            .map(|c| format!("m.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {columns}, c.platform, c.space, c.channel, c.thread, c.private
             FROM messages m JOIN conversations c ON c.id = m.conversation_id
             WHERE m.role = 'user' AND c.platform = ? AND m.created_at >= ? AND m.created_at < ?
               AND m.id > c.reset_after
               AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = m.id)
               AND NOT EXISTS (SELECT 1 FROM restart_notices n WHERE n.question_id = m.id)
             ORDER BY m.id"
        )))
        .bind(platform.as_str())
        .bind(since_ms)
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        let first = MESSAGE_COLUMNS.split(", ").count();
        rows.iter()
            .map(|r| {
                let platform: String = r.get(first);
                let platform = platform
                    .parse()
                    .map_err(|e| MemoryError::Corrupt(format!("a conversation of {e}")))?;
                Ok(Unanswered {
                    key: ConversationKey {
                        platform,
                        space: r.get(first + 1),
                        channel: r.get(first + 2),
                        thread: r.get(first + 3),
                    },
                    private: r.get::<i64, _>(first + 4) != 0,
                    question: message_from_row(r),
                })
            })
            .collect()
    }

    /// Stores the reply to a question answered after a restart, in one statement, only while
    /// the question exists and has no reply yet: `None` when it is gone or already answered.
    pub async fn append_only_reply(
        &self,
        conversation_id: i64,
        question_id: i64,
        content: &str,
        status: Status,
    ) -> Result<Option<i64>> {
        let result = sqlx::query(
            "INSERT INTO messages (conversation_id, role, author_id, author_name, content, platform,
                                   platform_message_id, reply_to, status, created_at)
             SELECT q.conversation_id, 'assistant', NULL, NULL, ?, q.platform, NULL, q.id, ?, ?
             FROM messages q
             WHERE q.id = ? AND q.conversation_id = ? AND q.role = 'user'
               AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = q.id)",
        )
        .bind(content)
        .bind(status.as_str())
        .bind(now_ms())
        .bind(question_id)
        .bind(conversation_id)
        .execute(&self.pool)
        .await?;
        Ok((result.rows_affected() == 1).then(|| result.last_insert_rowid()))
    }

    /// Records, before it is sent, that a question gets its restart notice. False when it was
    /// recorded before, or the question has a reply or is gone: then no notice is sent.
    pub async fn claim_restart_notice(&self, question_id: i64) -> Result<bool> {
        let result = sqlx::query(
            "INSERT INTO restart_notices (question_id, status, created_at)
             SELECT q.id, 'claimed', ? FROM messages q
             WHERE q.id = ? AND q.role = 'user'
               AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = q.id)
             ON CONFLICT DO NOTHING",
        )
        .bind(now_ms())
        .bind(question_id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// The claimed notice went out.
    pub async fn mark_restart_notice_sent(&self, question_id: i64) -> Result<()> {
        sqlx::query("UPDATE restart_notices SET status = 'sent' WHERE question_id = ?")
            .bind(question_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether, and how far, a question's restart notice was recorded.
    pub async fn restart_notice(&self, question_id: i64) -> Result<Option<NoticeStatus>> {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM restart_notices WHERE question_id = ?")
                .bind(question_id)
                .fetch_optional(&self.pool)
                .await?;
        status
            .map(|s| match s.as_str() {
                "claimed" => Ok(NoticeStatus::Claimed),
                "sent" => Ok(NoticeStatus::Sent),
                other => Err(MemoryError::Corrupt(format!(
                    "a restart notice with status {other:?}"
                ))),
            })
            .transpose()
    }
}
