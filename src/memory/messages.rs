//! Messages: user turns stored once per platform id, replies stored whole in one statement, and
//! the edits and deletes platforms report.

use sqlx::{AssertSqlSafe, Row};

use super::records::{
    Affected, Appended, Conversation, MESSAGE_COLUMNS, NewUserTurn, Status, StoredMessage,
    message_from_row,
};
use super::{Result, Store, now_ms};
use crate::chat::Platform;

impl Store {
    /// Whether a platform message id was already stored (handled) on this platform.
    pub async fn is_known(&self, platform: Platform, platform_message_id: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 FROM messages WHERE platform = ? AND platform_message_id = ?")
                .bind(platform.as_str())
                .bind(platform_message_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Stores a user turn. A platform message id seen before is not stored again; the caller
    /// learns it was a duplicate and which row holds it.
    pub async fn append_user(
        &self,
        conversation: &Conversation,
        turn: &NewUserTurn<'_>,
    ) -> Result<Appended> {
        let result = sqlx::query(
            "INSERT INTO messages (conversation_id, role, author_id, author_name, content, platform,
                                   platform_message_id, status, created_at)
             VALUES (?, 'user', ?, ?, ?, ?, ?, 'complete', ?)
             ON CONFLICT DO NOTHING",
        )
        .bind(conversation.id)
        .bind(turn.author_id)
        .bind(turn.author_name)
        .bind(turn.content)
        .bind(conversation.key.platform.as_str())
        .bind(turn.platform_message_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 1 {
            return Ok(Appended::New(result.last_insert_rowid()));
        }
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM messages WHERE platform = ? AND platform_message_id = ?",
        )
        .bind(conversation.key.platform.as_str())
        .bind(turn.platform_message_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Appended::Duplicate(id))
    }

    /// Stores a finished (or cancelled, or failed) reply, in one statement, so a crash never
    /// leaves half a reply marked complete. A reply to a question that is gone (deleted on the
    /// platform meanwhile) is not stored: `None`. The check and the insert are one statement, so
    /// no delete can slip between them.
    pub async fn append_assistant(
        &self,
        conversation: &Conversation,
        reply_to: Option<i64>,
        content: &str,
        status: Status,
        platform_message_id: Option<&str>,
    ) -> Result<Option<i64>> {
        let result = sqlx::query(
            "INSERT INTO messages (conversation_id, role, author_id, author_name, content, platform,
                                   platform_message_id, reply_to, status, created_at)
             SELECT ?, 'assistant', NULL, NULL, ?, ?, ?, ?, ?, ?
             WHERE ? IS NULL OR EXISTS (SELECT 1 FROM messages WHERE id = ?)",
        )
        .bind(conversation.id)
        .bind(content)
        .bind(conversation.key.platform.as_str())
        .bind(platform_message_id)
        .bind(reply_to)
        .bind(status.as_str())
        .bind(now_ms())
        .bind(reply_to)
        .bind(reply_to)
        .execute(&self.pool)
        .await?;
        Ok((result.rows_affected() == 1).then(|| result.last_insert_rowid()))
    }

    /// Every message after the reset boundary, in id order.
    pub async fn since_reset(&self, conversation: &Conversation) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = ? AND id > (SELECT reset_after FROM conversations WHERE id = ?)
             ORDER BY id"
        )))
        .bind(conversation.id)
        .bind(conversation.id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    /// Every message of the conversation, reset or not, in id order.
    pub async fn all_messages(&self, conversation_id: i64) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id"
        )))
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(message_from_row).collect())
    }

    pub async fn message(&self, id: i64) -> Result<Option<StoredMessage>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(message_from_row))
    }

    /// Applies an edit made on the platform; the cached token count goes with the old text.
    pub async fn edit_by_platform_id(
        &self,
        platform: Platform,
        platform_message_id: &str,
        content: &str,
    ) -> Result<Option<Affected>> {
        let row = sqlx::query(
            "UPDATE messages SET content = ?, edited_at = ?, token_count = NULL, token_key = NULL
             WHERE platform = ? AND platform_message_id = ?
             RETURNING id, conversation_id",
        )
        .bind(content)
        .bind(now_ms())
        .bind(platform.as_str())
        .bind(platform_message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Affected {
            message_id: r.get(0),
            conversation_id: r.get(1),
        }))
    }

    /// Removes a message deleted on the platform, with the replies that answered it.
    pub async fn delete_by_platform_id(
        &self,
        platform: Platform,
        platform_message_id: &str,
    ) -> Result<Option<Affected>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT id, conversation_id FROM messages WHERE platform = ? AND platform_message_id = ?")
            .bind(platform.as_str())
            .bind(platform_message_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let affected = Affected {
            message_id: row.get(0),
            conversation_id: row.get(1),
        };
        sqlx::query("DELETE FROM messages WHERE reply_to = ?")
            .bind(affected.message_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM messages WHERE id = ?")
            .bind(affected.message_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(affected))
    }

    /// Caches token counts (message id, count, fingerprint of what was counted) in one transaction.
    pub async fn set_token_counts(&self, counts: &[(i64, u32, i64)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for (id, count, key) in counts {
            sqlx::query("UPDATE messages SET token_count = ?, token_key = ? WHERE id = ?")
                .bind(i64::from(*count))
                .bind(key)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
