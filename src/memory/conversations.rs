//! Conversations: found or created by key, their boundaries (reset, trim) and their settings.

use sqlx::AssertSqlSafe;

use super::records::{
    CONVERSATION_COLUMNS, Conversation, ConversationSettings, conversation_from_row,
};
use super::{MemoryError, Result, Store, now_ms};
use crate::chat::ConversationKey;

impl Store {
    /// Gets the conversation, creating it on first use.
    pub async fn conversation(&self, key: &ConversationKey) -> Result<Conversation> {
        sqlx::query(
            "INSERT INTO conversations (platform, space, channel, thread, created_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(key.platform.as_str())
        .bind(&key.space)
        .bind(&key.channel)
        .bind(&key.thread)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.find_conversation(key).await?.ok_or_else(|| {
            MemoryError::Corrupt(format!("no row for {key} right after creating it"))
        })
    }

    pub async fn find_conversation(&self, key: &ConversationKey) -> Result<Option<Conversation>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations
             WHERE platform = ? AND space = ? AND channel = ? AND thread = ?"
        )))
        .bind(key.platform.as_str())
        .bind(&key.space)
        .bind(&key.channel)
        .bind(&key.thread)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| conversation_from_row(&r)).transpose()
    }

    pub async fn conversations(&self) -> Result<Vec<Conversation>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations ORDER BY id"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(conversation_from_row).collect()
    }

    /// Writes a context boundary: older turns stay for export but leave the prompt.
    pub async fn reset(&self, conversation: &Conversation) -> Result<()> {
        sqlx::query(
            "UPDATE conversations
             SET reset_after = (SELECT COALESCE(MAX(id), 0) FROM messages), trim_after = 0
             WHERE id = ?",
        )
        .bind(conversation.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the conversation and all of its messages for real.
    pub async fn forget(&self, conversation: &Conversation) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM messages WHERE conversation_id = ?")
            .bind(conversation.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM conversations WHERE id = ?")
            .bind(conversation.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    pub async fn set_settings(
        &self,
        conversation: &Conversation,
        settings: &ConversationSettings,
    ) -> Result<()> {
        sqlx::query("UPDATE conversations SET system_prompt = ?, temperature = ?, max_new_tokens = ? WHERE id = ?")
            .bind(settings.system_prompt.as_deref())
            .bind(settings.temperature)
            .bind(settings.max_new_tokens.map(i64::from))
            .bind(conversation.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records whether the conversation is private (a DM or the terminal).
    pub async fn set_private(&self, conversation: &Conversation, private: bool) -> Result<()> {
        sqlx::query("UPDATE conversations SET private = ? WHERE id = ?")
            .bind(private)
            .bind(conversation.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Moves the chunked-trim boundary: prompts start after this message id.
    pub async fn set_trim_after(&self, conversation: &Conversation, after_id: i64) -> Result<()> {
        sqlx::query("UPDATE conversations SET trim_after = ? WHERE id = ?")
            .bind(after_id)
            .bind(conversation.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
