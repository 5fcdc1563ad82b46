//! Copying a whole memory into another database (SQLite to PostgreSQL, or any pair): every
//! conversation with its settings and boundaries, every message (with the run that accepted it, and where its answer is shown)
//! and every restart notice, ids kept so boundaries and reply links stay true. One transaction per conversation, so an interrupted copy leaves each
//! conversation whole or absent, and running it again copies only what is missing.

use sqlx::AssertSqlSafe;

use super::pool::{Pool, on_pool};
use super::{MemoryError, Result, Store};

const CONVERSATION_ROW: &str = "id, platform, space, channel, thread, created_at, private, reset_after, trim_after, system_prompt, temperature, max_new_tokens";

const MESSAGE_ROW: &str = "id, conversation_id, role, author_id, author_name, content, platform, platform_message_id, reply_to, status, token_count, token_key, created_at, edited_at, accepted_by, shown_in";

/// A conversation row, every column.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct ConversationCopy {
    id: i64,
    platform: String,
    space: String,
    channel: String,
    thread: String,
    created_at: i64,
    private: bool,
    reset_after: i64,
    trim_after: i64,
    system_prompt: Option<String>,
    temperature: Option<f64>,
    max_new_tokens: Option<i64>,
}

/// A message row, every column.
#[derive(Debug, Clone, sqlx::FromRow)]
struct MessageCopy {
    id: i64,
    conversation_id: i64,
    role: String,
    author_id: Option<String>,
    author_name: Option<String>,
    content: String,
    platform: String,
    platform_message_id: Option<String>,
    reply_to: Option<i64>,
    status: String,
    token_count: Option<i64>,
    token_key: Option<i64>,
    created_at: i64,
    edited_at: Option<i64>,
    accepted_by: Option<i64>,
    shown_in: Option<String>,
}

/// A restart notice row, every column.
#[derive(Debug, Clone, sqlx::FromRow)]
struct NoticeCopy {
    question_id: i64,
    status: String,
    created_at: i64,
}

/// What a copy did, and the counts it checked on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Conversations copied by this run.
    pub copied: u64,
    /// Conversations already in the target from an earlier run, left as they were.
    pub skipped: u64,
    /// Totals, equal in source and target once the copy is verified.
    pub conversations: u64,
    pub messages: u64,
}

/// Counts of a memory's rows, to compare two memories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub conversations: u64,
    pub messages: u64,
}

impl Store {
    /// Copies every conversation missing from `target` into it, then verifies that both hold the
    /// same number of conversations and of messages, per conversation and in all. `progress` is
    /// told of each conversation (its key's text, whether it was copied now).
    pub async fn copy_into(
        &self,
        target: &Store,
        mut progress: impl FnMut(&str, bool),
    ) -> Result<CopyReport> {
        let sql = format!("SELECT {CONVERSATION_ROW} FROM conversations ORDER BY id");
        let conversations: Vec<ConversationCopy> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?
        });
        let (mut copied, mut skipped) = (0, 0);
        for conv in &conversations {
            let name = format!(
                "{}:{}:{}:{}",
                conv.platform, conv.space, conv.channel, conv.thread
            );
            let messages = self.message_rows(conv.id).await?;
            let existing = target.conversation_row(conv.id).await?;
            match existing {
                Some(there) if same_key(&there, conv) => {
                    let there_count = target.message_count(conv.id).await?;
                    if there_count != messages.len() as u64 {
                        return Err(MemoryError::Mismatch(format!(
                            "conversation {} ({name}) has {there_count} messages in the target and {} in the source; it was changed after an earlier copy",
                            conv.id,
                            messages.len()
                        )));
                    }
                    skipped += 1;
                    progress(&name, false);
                }
                Some(there) => {
                    return Err(MemoryError::Mismatch(format!(
                        "the target already holds conversation {} as {}:{}:{}:{}, not {name}: copy into an empty database",
                        conv.id, there.platform, there.space, there.channel, there.thread
                    )));
                }
                None => {
                    let notices = self.notice_rows(conv.id).await?;
                    target.insert_copy(conv, &messages, &notices).await?;
                    copied += 1;
                    progress(&name, true);
                }
            }
        }
        target.advance_ids().await?;
        let (from, to) = (self.counts().await?, target.counts().await?);
        if from != to {
            return Err(MemoryError::Mismatch(format!(
                "after the copy the source holds {} conversations and {} messages, the target {} and {}",
                from.conversations, from.messages, to.conversations, to.messages
            )));
        }
        Ok(CopyReport {
            copied,
            skipped,
            conversations: to.conversations,
            messages: to.messages,
        })
    }

    /// How many conversations and messages the memory holds.
    pub async fn counts(&self) -> Result<Counts> {
        let (conversations, messages): (i64, i64) = on_pool!(&self.pool, |p| {
            sqlx::query_as(
                "SELECT (SELECT COUNT(*) FROM conversations), (SELECT COUNT(*) FROM messages)",
            )
            .fetch_one(p)
            .await?
        });
        Ok(Counts {
            conversations: conversations.max(0) as u64,
            messages: messages.max(0) as u64,
        })
    }

    async fn conversation_row(&self, id: i64) -> Result<Option<ConversationCopy>> {
        let sql = format!("SELECT {CONVERSATION_ROW} FROM conversations WHERE id = $1");
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(p)
                .await?
        }))
    }

    async fn message_rows(&self, conversation_id: i64) -> Result<Vec<MessageCopy>> {
        let sql =
            format!("SELECT {MESSAGE_ROW} FROM messages WHERE conversation_id = $1 ORDER BY id");
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(conversation_id)
                .fetch_all(p)
                .await?
        }))
    }

    async fn notice_rows(&self, conversation_id: i64) -> Result<Vec<NoticeCopy>> {
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_as(
                "SELECT n.question_id, n.status, n.created_at
                 FROM restart_notices n JOIN messages m ON m.id = n.question_id
                 WHERE m.conversation_id = $1 ORDER BY n.question_id",
            )
            .bind(conversation_id)
            .fetch_all(p)
            .await?
        }))
    }

    async fn message_count(&self, conversation_id: i64) -> Result<u64> {
        let n: i64 = on_pool!(&self.pool, |p| {
            sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE conversation_id = $1")
                .bind(conversation_id)
                .fetch_one(p)
                .await?
        });
        Ok(n.max(0) as u64)
    }

    /// The conversation, its messages and their notices, ids as they were, in one transaction.
    async fn insert_copy(
        &self,
        conv: &ConversationCopy,
        messages: &[MessageCopy],
        notices: &[NoticeCopy],
    ) -> Result<()> {
        let conversation_sql = format!(
            "INSERT INTO conversations ({CONVERSATION_ROW})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        );
        let message_sql = format!(
            "INSERT INTO messages ({MESSAGE_ROW})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        );
        on_pool!(&self.pool, |p| {
            let mut tx = p.begin().await?;
            sqlx::query(AssertSqlSafe(conversation_sql))
                .bind(conv.id)
                .bind(&conv.platform)
                .bind(&conv.space)
                .bind(&conv.channel)
                .bind(&conv.thread)
                .bind(conv.created_at)
                .bind(conv.private)
                .bind(conv.reset_after)
                .bind(conv.trim_after)
                .bind(&conv.system_prompt)
                .bind(conv.temperature)
                .bind(conv.max_new_tokens)
                .execute(&mut *tx)
                .await?;
            for m in messages {
                sqlx::query(AssertSqlSafe(message_sql.as_str()))
                    .bind(m.id)
                    .bind(m.conversation_id)
                    .bind(&m.role)
                    .bind(&m.author_id)
                    .bind(&m.author_name)
                    .bind(&m.content)
                    .bind(&m.platform)
                    .bind(&m.platform_message_id)
                    .bind(m.reply_to)
                    .bind(&m.status)
                    .bind(m.token_count)
                    .bind(m.token_key)
                    .bind(m.created_at)
                    .bind(m.edited_at)
                    .bind(m.accepted_by)
                    .bind(&m.shown_in)
                    .execute(&mut *tx)
                    .await?;
            }
            for n in notices {
                sqlx::query(
                    "INSERT INTO restart_notices (question_id, status, created_at)
                     VALUES ($1, $2, $3)",
                )
                .bind(n.question_id)
                .bind(&n.status)
                .bind(n.created_at)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Rows copied with their ids leave PostgreSQL's identity sequences behind; new rows must
    /// get ids past them. SQLite's AUTOINCREMENT follows explicit ids by itself.
    async fn advance_ids(&self) -> Result<()> {
        if let Pool::Postgres(p) = &self.pool {
            for table in ["conversations", "messages"] {
                let sql = format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'),
                                   GREATEST((SELECT COALESCE(MAX(id), 0) FROM {table}), 1),
                                   (SELECT COUNT(*) > 0 FROM {table}))"
                );
                sqlx::query(AssertSqlSafe(sql)).execute(p).await?;
            }
        }
        Ok(())
    }
}

fn same_key(a: &ConversationCopy, b: &ConversationCopy) -> bool {
    (&a.platform, &a.space, &a.channel, &a.thread) == (&b.platform, &b.space, &b.channel, &b.thread)
}
