//! Conversations: found or created by key, their boundaries (reset, trim) and their settings.

use sqlx::AssertSqlSafe;

use super::pool::on_pool;
use super::records::{CONVERSATION_COLUMNS, Conversation, ConversationRow, ConversationSettings};
use super::{MemoryError, Result, Store, now_ms};
use crate::chat::{ConversationKey, without_nul};

impl Store {
    /// Gets the conversation, creating it on first use.
    pub async fn conversation(&self, key: &ConversationKey) -> Result<Conversation> {
        on_pool!(&self.pool, |p| {
            sqlx::query(
                "INSERT INTO conversations (platform, space, channel, thread, created_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(key.platform.as_str())
            .bind(&key.space)
            .bind(&key.channel)
            .bind(&key.thread)
            .bind(now_ms())
            .execute(p)
            .await?;
        });
        self.find_conversation(key).await?.ok_or_else(|| {
            MemoryError::Corrupt(format!("no row for {key} right after creating it"))
        })
    }

    pub async fn find_conversation(&self, key: &ConversationKey) -> Result<Option<Conversation>> {
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations
             WHERE platform = $1 AND space = $2 AND channel = $3 AND thread = $4"
        );
        let row: Option<ConversationRow> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(key.platform.as_str())
                .bind(&key.space)
                .bind(&key.channel)
                .bind(&key.thread)
                .fetch_optional(p)
                .await?
        });
        row.map(ConversationRow::into_conversation).transpose()
    }

    pub async fn conversations(&self) -> Result<Vec<Conversation>> {
        let sql = format!("SELECT {CONVERSATION_COLUMNS} FROM conversations ORDER BY id");
        let rows: Vec<ConversationRow> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?
        });
        rows.into_iter()
            .map(ConversationRow::into_conversation)
            .collect()
    }

    /// Writes a context boundary: older turns stay for export but leave the prompt.
    pub async fn reset(&self, conversation: &Conversation) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query(
                "UPDATE conversations
                 SET reset_after = (SELECT COALESCE(MAX(id), 0) FROM messages), trim_after = 0
                 WHERE id = $1",
            )
            .bind(conversation.id)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Deletes the conversation and all of its messages for real.
    pub async fn forget(&self, conversation: &Conversation) -> Result<u64> {
        on_pool!(&self.pool, |p| {
            let mut tx = p.begin().await?;
            let deleted = sqlx::query("DELETE FROM messages WHERE conversation_id = $1")
                .bind(conversation.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM conversations WHERE id = $1")
                .bind(conversation.id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(deleted)
        })
    }

    pub async fn set_settings(
        &self,
        conversation: &Conversation,
        settings: &ConversationSettings,
    ) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query(
                "UPDATE conversations SET system_prompt = $1, temperature = $2, max_new_tokens = $3
                 WHERE id = $4",
            )
            .bind(
                settings
                    .system_prompt
                    .as_deref()
                    .map(|p| without_nul(p).into_owned()),
            )
            .bind(settings.temperature)
            .bind(settings.max_new_tokens.map(i64::from))
            .bind(conversation.id)
            .execute(p)
            .await?;
        });
        Ok(())
    }

    /// Records whether the conversation is private (a DM or the terminal).
    pub async fn set_private(&self, conversation: &Conversation, private: bool) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query("UPDATE conversations SET private = $1 WHERE id = $2")
                .bind(private)
                .bind(conversation.id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Moves the chunked-trim boundary: prompts start after this message id.
    pub async fn set_trim_after(&self, conversation: &Conversation, after_id: i64) -> Result<()> {
        on_pool!(&self.pool, |p| {
            sqlx::query("UPDATE conversations SET trim_after = $1 WHERE id = $2")
                .bind(after_id)
                .bind(conversation.id)
                .execute(p)
                .await?;
        });
        Ok(())
    }
}
