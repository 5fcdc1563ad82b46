//! Messages: user turns stored once per platform id, replies stored whole in one statement, and
//! the edits and deletes platforms report.

use sqlx::AssertSqlSafe;

use super::pool::on_pool;
use super::records::{
    Affected, Appended, Conversation, MESSAGE_COLUMNS, MessageRow, NewUserTurn, Status,
    StoredMessage,
};
use super::{Result, Store, now_ms};
use crate::chat::{Platform, without_nul};

impl Store {
    /// Whether a platform message id was already stored (handled) on this platform.
    pub async fn is_known(&self, platform: Platform, platform_message_id: &str) -> Result<bool> {
        let found: Option<i64> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar(
                "SELECT id FROM messages WHERE platform = $1 AND platform_message_id = $2",
            )
            .bind(platform.as_str())
            .bind(platform_message_id)
            .fetch_optional(p)
            .await?
        });
        Ok(found.is_some())
    }

    /// Stores a user turn. A platform message id seen before is not stored again; the caller
    /// learns it was a duplicate and which row holds it. The insert is the claim: of several
    /// daemons given the same message, exactly one gets `New`.
    pub async fn append_user(
        &self,
        conversation: &Conversation,
        turn: &NewUserTurn<'_>,
    ) -> Result<Appended> {
        // Every `RETURNING` statement is read to its end (`fetch_all`): SQLite commits, and
        // reports a full disk, only after the returned row, and `fetch_optional` stops at the row.
        let inserted: Option<i64> = on_pool!(&self.pool, |p| {
            sqlx::query_scalar(
                "INSERT INTO messages (conversation_id, role, author_id, author_name, content,
                                       platform, platform_message_id, status, created_at,
                                       accepted_by)
                 VALUES ($1, 'user', $2, $3, $4, $5, $6, 'complete', $7, $8)
                 ON CONFLICT DO NOTHING
                 RETURNING id",
            )
            .bind(conversation.id)
            .bind(turn.author_id)
            .bind(without_nul(turn.author_name).into_owned())
            .bind(without_nul(turn.content).into_owned())
            .bind(conversation.key.platform.as_str())
            .bind(turn.platform_message_id)
            .bind(now_ms())
            .bind(self.run_id)
            .fetch_all(p)
            .await?
            .into_iter()
            .next()
        });
        if let Some(id) = inserted {
            return Ok(Appended::New(id));
        }
        let id: i64 = on_pool!(&self.pool, |p| {
            sqlx::query_scalar(
                "SELECT id FROM messages WHERE platform = $1 AND platform_message_id = $2",
            )
            .bind(conversation.key.platform.as_str())
            .bind(turn.platform_message_id)
            .fetch_one(p)
            .await?
        });
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
        Ok(on_pool!(&self.pool, |p| {
            sqlx::query_scalar(
                "INSERT INTO messages (conversation_id, role, author_id, author_name, content,
                                       platform, platform_message_id, reply_to, status, created_at)
                 SELECT $1, 'assistant', NULL, NULL, $2, $3, $4, $5, $6, $7
                 WHERE $5 IS NULL OR EXISTS (SELECT 1 FROM messages WHERE id = $5)
                 RETURNING id",
            )
            .bind(conversation.id)
            .bind(without_nul(content).into_owned())
            .bind(conversation.key.platform.as_str())
            .bind(platform_message_id)
            .bind(reply_to)
            .bind(status.as_str())
            .bind(now_ms())
            .fetch_all(p)
            .await?
            .into_iter()
            .next()
        }))
    }

    /// Every message after the reset boundary, in id order.
    pub async fn since_reset(&self, conversation: &Conversation) -> Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages
             WHERE conversation_id = $1
               AND id > (SELECT reset_after FROM conversations WHERE id = $1)
             ORDER BY id"
        );
        let rows: Vec<MessageRow> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(conversation.id)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(StoredMessage::from).collect())
    }

    /// Every message of the conversation, reset or not, in id order.
    pub async fn all_messages(&self, conversation_id: i64) -> Result<Vec<StoredMessage>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 ORDER BY id"
        );
        let rows: Vec<MessageRow> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(conversation_id)
                .fetch_all(p)
                .await?
        });
        Ok(rows.into_iter().map(StoredMessage::from).collect())
    }

    pub async fn message(&self, id: i64) -> Result<Option<StoredMessage>> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        let row: Option<MessageRow> = on_pool!(&self.pool, |p| {
            sqlx::query_as(AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(p)
                .await?
        });
        Ok(row.map(StoredMessage::from))
    }

    /// Applies an edit made on the platform; the cached token count goes with the old text.
    pub async fn edit_by_platform_id(
        &self,
        platform: Platform,
        platform_message_id: &str,
        content: &str,
    ) -> Result<Option<Affected>> {
        let row: Option<(i64, i64)> = on_pool!(&self.pool, |p| {
            sqlx::query_as(
                "UPDATE messages
                 SET content = $1, edited_at = $2, token_count = NULL, token_key = NULL
                 WHERE platform = $3 AND platform_message_id = $4
                 RETURNING id, conversation_id",
            )
            .bind(without_nul(content).into_owned())
            .bind(now_ms())
            .bind(platform.as_str())
            .bind(platform_message_id)
            .fetch_all(p)
            .await?
            .into_iter()
            .next()
        });
        Ok(row.map(|(message_id, conversation_id)| Affected {
            message_id,
            conversation_id,
        }))
    }

    /// Removes a message deleted on the platform, with the replies that answered it.
    pub async fn delete_by_platform_id(
        &self,
        platform: Platform,
        platform_message_id: &str,
    ) -> Result<Option<Affected>> {
        on_pool!(&self.pool, |p| {
            let mut tx = p.begin().await?;
            let row: Option<(i64, i64)> = sqlx::query_as(
                "SELECT id, conversation_id FROM messages
                 WHERE platform = $1 AND platform_message_id = $2",
            )
            .bind(platform.as_str())
            .bind(platform_message_id)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((message_id, conversation_id)) = row else {
                return Ok(None);
            };
            sqlx::query("DELETE FROM messages WHERE reply_to = $1")
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM messages WHERE id = $1")
                .bind(message_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(Affected {
                message_id,
                conversation_id,
            }))
        })
    }

    /// Caches token counts (message id, count, fingerprint of what was counted) in one
    /// transaction.
    pub async fn set_token_counts(&self, counts: &[(i64, u32, i64)]) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        on_pool!(&self.pool, |p| {
            let mut tx = p.begin().await?;
            for (id, count, key) in counts {
                sqlx::query("UPDATE messages SET token_count = $1, token_key = $2 WHERE id = $3")
                    .bind(i64::from(*count))
                    .bind(key)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }
}
