//! Questions left without a reply when a daemon stopped, and the restart notices sent for them.
//! A resumed reply is stored only while its question exists and has no reply yet, and a notice is
//! claimed in a row before it is sent, so neither can happen twice.
//!
//! Every question also records where its answer is shown (`shown_in`, [`Shown`]) until the final
//! text went out, so a restart finishes a half-shown answer in the messages that show it.
//!
//! Every question records the run that accepted it (`accepted_by`, [`Store::run_id`]). A daemon
//! starting up takes over only the questions of runs that are gone, each in one statement, so of
//! several daemons sharing a PostgreSQL memory none answers a question another is still working
//! on, and no two take over the same one.

use std::collections::HashMap;

use sqlx::AssertSqlSafe;

use super::pool::on_pool;
use super::records::{MESSAGE_COLUMNS, MessageRow, Status};
use super::{MemoryError, Result, Store, StoredMessage, now_ms};
use crate::chat::{ConversationKey, Platform, Shown, without_nul};

/// A stored question with no reply and no restart notice, with the conversation it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Unanswered {
    pub key: ConversationKey,
    pub private: bool,
    pub question: StoredMessage,
    /// The messages already showing part of an answer (the process died writing it); `None`
    /// when nothing is known of them.
    pub shown: Option<Shown>,
}

/// A stored reply whose final text may not have reached the platform: the process died between
/// storing it and showing it whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Unshown {
    /// The question, and where its answer is shown so far (no ids: nothing was posted yet).
    pub pending: Unanswered,
    pub reply_id: i64,
    pub reply: String,
    pub status: Status,
}

/// Where a question's restart notice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeStatus {
    /// Recorded before sending; it stays so if the process died before the notice went out.
    Claimed,
    Sent,
}

#[derive(sqlx::FromRow)]
struct PendingRow {
    #[sqlx(flatten)]
    message: MessageRow,
    conv_platform: String,
    conv_space: String,
    conv_channel: String,
    conv_thread: String,
    conv_private: bool,
    /// 0 for questions stored before runs were recorded.
    owner: i64,
    shown_in: Option<String>,
}

impl PendingRow {
    fn key(&self) -> Result<ConversationKey> {
        let platform = self
            .conv_platform
            .parse()
            .map_err(|e| MemoryError::Corrupt(format!("a conversation of {e}")))?;
        Ok(ConversationKey {
            platform,
            space: self.conv_space.clone(),
            channel: self.conv_channel.clone(),
            thread: self.conv_thread.clone(),
        })
    }

    fn shown(&self) -> Option<Shown> {
        let text = self.shown_in.as_deref()?;
        let shown = Shown::parse(text);
        if shown.is_none() {
            tracing::warn!(
                question = self.message.id(),
                "where an answer is shown cannot be read; it is shown anew"
            );
        }
        shown
    }
}

#[derive(sqlx::FromRow)]
struct UnshownRow {
    #[sqlx(flatten)]
    pending: PendingRow,
    reply_id: i64,
    reply_content: String,
    reply_status: String,
}

/// The question columns, prefixed for a query that joins `messages m`.
fn question_columns() -> String {
    MESSAGE_COLUMNS
        .split(", ")
        .map(|c| format!("m.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The conversation's and ownership columns every pending query selects beside the question's.
const PENDING_COLUMNS: &str = "c.platform AS conv_platform, c.space AS conv_space,
    c.channel AS conv_channel, c.thread AS conv_thread, c.private AS conv_private,
    COALESCE(m.accepted_by, 0) AS owner, m.shown_in AS shown_in";

impl Store {
    /// Takes over the platform's questions accepted in `[since_ms, before_ms)` that have no
    /// reply and no restart notice, after their conversation's reset boundary, oldest first:
    /// only those whose accepting run is gone, and only those this run took over (another
    /// daemon starting at the same moment takes each of the others). Questions of this run
    /// itself are never returned, so a second call returns none of the first call's.
    pub async fn take_unanswered(
        &self,
        platform: Platform,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<Unanswered>> {
        let rows: Vec<PendingRow> = self
            .pending_rows(
                "",
                "",
                "AND m.id > c.reset_after
                 AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = m.id)
                 AND NOT EXISTS (SELECT 1 FROM restart_notices n WHERE n.question_id = m.id)",
                (platform, since_ms, before_ms),
            )
            .await?;
        let mut taken = Vec::new();
        for row in self.taken_over(rows, |r| r).await? {
            taken.push(Unanswered {
                key: row.key()?,
                private: row.conv_private,
                shown: row.shown(),
                question: row.message.into(),
            });
        }
        Ok(taken)
    }

    /// Takes over the platform's replies stored in `[since_ms, before_ms)` whose final text may
    /// not have been shown (the process died first), oldest first, on the same terms as
    /// [`Store::take_unanswered`]: only a gone run's, each taken by one daemon.
    pub async fn take_unshown(
        &self,
        platform: Platform,
        since_ms: i64,
        before_ms: i64,
    ) -> Result<Vec<Unshown>> {
        let rows: Vec<UnshownRow> = self
            .pending_rows(
                ", r.id AS reply_id, r.content AS reply_content, r.status AS reply_status",
                "JOIN messages r ON r.reply_to = m.id AND r.role = 'assistant'",
                "AND m.shown_in IS NOT NULL",
                (platform, since_ms, before_ms),
            )
            .await?;
        let mut taken = Vec::new();
        for row in self.taken_over(rows, |r| &r.pending).await? {
            let pending = Unanswered {
                key: row.pending.key()?,
                private: row.pending.conv_private,
                shown: Some(row.pending.shown().unwrap_or_default()),
                question: row.pending.message.into(),
            };
            taken.push(Unshown {
                pending,
                reply_id: row.reply_id,
                reply: row.reply_content,
                status: Status::parse(&row.reply_status),
            });
        }
        Ok(taken)
    }

    /// The platform's questions accepted in `[since_ms, before_ms)` by runs other than this
    /// one, oldest first, with the conversation and ownership columns, and `columns`, `join` and
    /// `condition` added to the one query both lookups share.
    async fn pending_rows<R>(
        &self,
        columns: &str,
        join: &str,
        condition: &str,
        (platform, since_ms, before_ms): (Platform, i64, i64),
    ) -> Result<Vec<R>>
    where
        R: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
    {
        let sql = format!(
            "SELECT {}, {PENDING_COLUMNS}{columns}
             FROM messages m JOIN conversations c ON c.id = m.conversation_id {join}
             WHERE m.role = 'user' AND c.platform = $1 AND m.created_at >= $2
               AND m.created_at < $3 AND COALESCE(m.accepted_by, 0) <> $4 {condition}
             ORDER BY m.id",
            question_columns()
        );
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(platform.as_str())
                .bind(since_ms)
                .bind(before_ms)
                .bind(self.run_id)
                .fetch_all(p)
                .await?
        }))
    }

    /// The rows whose question this run took over: their accepting run is gone, and this run's
    /// statement was the one that moved each to it.
    async fn taken_over<R>(
        &self,
        rows: Vec<R>,
        pending: impl Fn(&R) -> &PendingRow,
    ) -> Result<Vec<R>> {
        let mut alive: HashMap<i64, bool> = HashMap::new();
        let mut taken = Vec::new();
        for row in rows {
            let (owner, id) = {
                let p = pending(&row);
                (p.owner, p.message.id())
            };
            let owner_alive = match alive.get(&owner) {
                Some(a) => *a,
                None => {
                    let a = self.run_alive(owner).await?;
                    alive.insert(owner, a);
                    a
                }
            };
            if owner_alive || !self.take_over(id, owner).await? {
                continue;
            }
            taken.push(row);
        }
        Ok(taken)
    }

    /// Records where the answer to `question_id` is shown so far (nothing posted yet: an empty
    /// [`Shown`]), until [`Store::mark_shown`].
    pub async fn set_shown(&self, question_id: i64, shown: &Shown) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query("UPDATE messages SET shown_in = $1 WHERE id = $2")
                .bind(shown.to_text())
                .bind(question_id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// The answer to `question_id` was shown whole (or ended with a notice): a restart leaves it.
    pub async fn mark_shown(&self, question_id: i64) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query("UPDATE messages SET shown_in = NULL WHERE id = $1")
                .bind(question_id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Where the answer to `question_id` is recorded as shown: `None` once shown whole.
    pub async fn shown(&self, question_id: i64) -> Result<Option<Shown>> {
        let text: Option<Option<String>> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT shown_in FROM messages WHERE id = $1")
                .bind(question_id)
                .fetch_optional(p)
                .await?
        });
        Ok(text.flatten().and_then(|t| Shown::parse(&t)))
    }

    /// Makes this run the question's owner, if `from` still is: one statement, so of two
    /// daemons taking over the same question exactly one gets it.
    async fn take_over(&self, question_id: i64, from: i64) -> Result<bool> {
        let affected = on_pool!(&self.pool, |p| {
            sqlx::query(
                "UPDATE messages SET accepted_by = $1
                 WHERE id = $2 AND COALESCE(accepted_by, 0) = $3",
            )
            .bind(self.run_id)
            .bind(question_id)
            .bind(from)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
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
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_scalar(
                "INSERT INTO messages (conversation_id, role, author_id, author_name, content,
                                       platform, platform_message_id, reply_to, status, created_at)
                 SELECT q.conversation_id, 'assistant', NULL, NULL, $1, q.platform, NULL, q.id,
                        $2, $3
                 FROM messages q
                 WHERE q.id = $4 AND q.conversation_id = $5 AND q.role = 'user'
                   AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = q.id)
                 RETURNING id",
            )
            .bind(without_nul(content).into_owned())
            .bind(status.as_str())
            .bind(now_ms())
            .bind(question_id)
            .bind(conversation_id)
            .fetch_all(p)
            .await?
            .into_iter()
            .next()
        }))
    }

    /// Records, before it is sent, that a question gets its restart notice. False when it was
    /// recorded before, or the question has a reply or is gone: then no notice is sent.
    pub async fn claim_restart_notice(&self, question_id: i64) -> Result<bool> {
        let affected = on_pool!(&self.pool, |p| {
            sqlx::query(
                "INSERT INTO restart_notices (question_id, status, created_at)
                 SELECT q.id, 'claimed', $1 FROM messages q
                 WHERE q.id = $2 AND q.role = 'user'
                   AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = q.id)
                 ON CONFLICT DO NOTHING",
            )
            .bind(now_ms())
            .bind(question_id)
            .execute(p)
            .await?
            .rows_affected()
        });
        Ok(affected == 1)
    }

    /// The claimed notice went out.
    pub async fn mark_restart_notice_sent(&self, question_id: i64) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query("UPDATE restart_notices SET status = 'sent' WHERE question_id = $1")
                .bind(question_id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Whether, and how far, a question's restart notice was recorded.
    pub async fn restart_notice(&self, question_id: i64) -> Result<Option<NoticeStatus>> {
        let status: Option<String> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT status FROM restart_notices WHERE question_id = $1")
                .bind(question_id)
                .fetch_optional(p)
                .await?
        });
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
