//! Persistent conversation memory in SQLite. The schema lives only in `migrations/`; the store
//! knows nothing of prompts or tokenizers, it keeps what it is given.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot open the database {target}: {source}")]
    Open {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("invalid conversation key `{0}`")]
    BadKey(String),
}

impl MemoryError {
    /// Whether trying again later can succeed (a locked or busy database).
    pub fn is_retryable(&self) -> bool {
        match self {
            MemoryError::Db(sqlx::Error::Database(e)) => {
                let msg = e.message();
                msg.contains("locked") || msg.contains("busy")
            }
            MemoryError::Db(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, MemoryError>;

/// Identifies one conversation: a channel, a thread (its own conversation) or a DM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConversationKey {
    pub platform: String,
    pub space: String,
    pub channel: String,
    pub thread: String,
}

impl ConversationKey {
    pub fn new(platform: &str, space: &str, channel: &str, thread: &str) -> Self {
        Self {
            platform: platform.into(),
            space: space.into(),
            channel: channel.into(),
            thread: thread.into(),
        }
    }

    /// The terminal chat's conversation `console:<name>`.
    pub fn console(name: &str) -> Self {
        Self::new("console", "", name, "")
    }
}

fn escape(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

fn unescape(part: &str) -> String {
    part.replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%25", "%")
}

/// Written `platform:channel`, `platform:space:channel` or `platform:space:channel:thread`,
/// with `:` inside a part written `%3A` (Matrix room ids contain colons).
impl fmt::Display for ConversationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = escape(&self.platform);
        match (self.space.is_empty(), self.thread.is_empty()) {
            (true, true) => write!(f, "{p}:{}", escape(&self.channel)),
            (false, true) => write!(f, "{p}:{}:{}", escape(&self.space), escape(&self.channel)),
            _ => write!(
                f,
                "{p}:{}:{}:{}",
                escape(&self.space),
                escape(&self.channel),
                escape(&self.thread)
            ),
        }
    }
}

impl FromStr for ConversationKey {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<String> = s.split(':').map(unescape).collect();
        let bad = || MemoryError::BadKey(s.to_string());
        if parts.iter().take(1).any(String::is_empty) {
            return Err(bad());
        }
        match parts.as_slice() {
            [p, c] if !c.is_empty() => Ok(Self::new(p, "", c, "")),
            [p, sp, c] if !c.is_empty() => Ok(Self::new(p, sp, c, "")),
            [p, sp, c, t] if !c.is_empty() => Ok(Self::new(p, sp, c, t)),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Complete,
    Cancelled,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Complete => "complete",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "cancelled" => Status::Cancelled,
            "failed" => Status::Failed,
            _ => Status::Complete,
        }
    }
}

/// Per-conversation overrides of the configured defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConversationSettings {
    pub system_prompt: Option<String>,
    pub temperature: Option<f64>,
    pub max_new_tokens: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: i64,
    pub key: ConversationKey,
    pub private: bool,
    pub reset_after: i64,
    pub trim_after: i64,
    pub settings: ConversationSettings,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    pub id: i64,
    pub conversation_id: i64,
    pub role: Role,
    pub author_id: Option<String>,
    pub author_name: Option<String>,
    pub content: String,
    pub platform_message_id: Option<String>,
    pub reply_to: Option<i64>,
    pub status: Status,
    pub token_count: Option<u32>,
    pub token_key: Option<i64>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub edited_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct NewUserTurn<'a> {
    pub author_id: &'a str,
    pub author_name: &'a str,
    pub content: &'a str,
    pub platform_message_id: Option<&'a str>,
}

/// Result of appending a user turn: the same platform message id is stored once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(i64),
    Duplicate(i64),
}

/// A message changed or removed through its platform id.
#[derive(Debug, Clone, PartialEq)]
pub struct Affected {
    pub message_id: i64,
    pub conversation_id: i64,
}

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

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

const MESSAGE_COLUMNS: &str = "id, conversation_id, role, author_id, author_name, content, platform_message_id, reply_to, status, token_count, token_key, created_at, edited_at";

impl Store {
    /// Opens (creating if needed) the database at a path or `sqlite://` URL and applies the
    /// migrations. WAL and a busy timeout let readers and the writer work side by side, and a
    /// crash at any point leaves a history that still loads.
    pub async fn open(target: &str, busy_timeout: Duration) -> Result<Store> {
        let open_err = |source| MemoryError::Open {
            target: target.to_string(),
            source,
        };
        let options = if target.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(target).map_err(open_err)?
        } else {
            if let Some(parent) = Path::new(target).parent()
                && !parent.as_os_str().is_empty()
                && !parent.exists()
            {
                std::fs::create_dir_all(parent).map_err(|e| MemoryError::Open {
                    target: target.to_string(),
                    source: sqlx::Error::Io(e),
                })?;
            }
            SqliteConnectOptions::new().filename(target)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Store { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Gets the conversation, creating it on first use.
    pub async fn conversation(&self, key: &ConversationKey) -> Result<Conversation> {
        sqlx::query(
            "INSERT INTO conversations (platform, space, channel, thread, created_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(&key.platform)
        .bind(&key.space)
        .bind(&key.channel)
        .bind(&key.thread)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.find_conversation(key)
            .await?
            .ok_or_else(|| MemoryError::BadKey(key.to_string()))
    }

    pub async fn find_conversation(&self, key: &ConversationKey) -> Result<Option<Conversation>> {
        let row = sqlx::query(
            "SELECT id, platform, space, channel, thread, reset_after, trim_after, system_prompt,
                    temperature, max_new_tokens, private
             FROM conversations WHERE platform = ? AND space = ? AND channel = ? AND thread = ?",
        )
        .bind(&key.platform)
        .bind(&key.space)
        .bind(&key.channel)
        .bind(&key.thread)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| conversation_from_row(&r)))
    }

    pub async fn conversations(&self) -> Result<Vec<Conversation>> {
        let rows = sqlx::query(
            "SELECT id, platform, space, channel, thread, reset_after, trim_after, system_prompt,
                    temperature, max_new_tokens, private
             FROM conversations ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(conversation_from_row).collect())
    }

    /// Whether a platform message id was already stored (handled) on this platform.
    pub async fn is_known(&self, platform: &str, platform_message_id: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 FROM messages WHERE platform = ? AND platform_message_id = ?")
                .bind(platform)
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
        .bind(&conversation.key.platform)
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
        .bind(&conversation.key.platform)
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
        .bind(&conversation.key.platform)
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

    /// Applies an edit made on the platform; the cached token count goes with the old text.
    pub async fn edit_by_platform_id(
        &self,
        platform: &str,
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
        .bind(platform)
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
        platform: &str,
        platform_message_id: &str,
    ) -> Result<Option<Affected>> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query("SELECT id, conversation_id FROM messages WHERE platform = ? AND platform_message_id = ?")
            .bind(platform)
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

    /// Question/answer pairs in conversation order, for `export`.
    pub async fn exchanges(&self, conversation: &Conversation) -> Result<Vec<Exchange>> {
        let messages = self.all_messages(conversation.id).await?;
        let key = conversation.key.to_string();
        let boundary = conversation.reset_after;
        let mut out = Vec::new();
        // The last reply to each question, found in one pass.
        let mut answers: std::collections::HashMap<i64, &StoredMessage> =
            std::collections::HashMap::new();
        for m in messages.iter().filter(|m| m.role == Role::Assistant) {
            if let Some(q) = m.reply_to {
                answers.insert(q, m);
            }
        }
        for question in messages.iter().filter(|m| m.role == Role::User) {
            let answer = answers.get(&question.id).copied();
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

fn conversation_from_row(r: &sqlx::sqlite::SqliteRow) -> Conversation {
    Conversation {
        id: r.get(0),
        key: ConversationKey {
            platform: r.get(1),
            space: r.get(2),
            channel: r.get(3),
            thread: r.get(4),
        },
        reset_after: r.get(5),
        trim_after: r.get(6),
        settings: ConversationSettings {
            system_prompt: r.get(7),
            temperature: r.get(8),
            max_new_tokens: r
                .get::<Option<i64>, _>(9)
                .map(|v| v.clamp(0, u32::MAX as i64) as u32),
        },
        private: r.get::<i64, _>(10) != 0,
    }
}

fn message_from_row(r: &sqlx::sqlite::SqliteRow) -> StoredMessage {
    let role: String = r.get(2);
    let status: String = r.get(8);
    StoredMessage {
        id: r.get(0),
        conversation_id: r.get(1),
        role: if role == "assistant" {
            Role::Assistant
        } else {
            Role::User
        },
        author_id: r.get(3),
        author_name: r.get(4),
        content: r.get(5),
        platform_message_id: r.get(6),
        reply_to: r.get(7),
        status: Status::parse(&status),
        token_count: r
            .get::<Option<i64>, _>(9)
            .map(|v| v.clamp(0, u32::MAX as i64) as u32),
        token_key: r.get(10),
        created_at: r.get(11),
        edited_at: r.get(12),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(dir: &tempfile::TempDir) -> Store {
        let path = dir.path().join("memory.sqlite");
        Store::open(path.to_str().unwrap(), Duration::from_secs(5))
            .await
            .unwrap()
    }

    fn user<'a>(text: &'a str, id: Option<&'a str>) -> NewUserTurn<'a> {
        NewUserTurn {
            author_id: "u1",
            author_name: "alice",
            content: text,
            platform_message_id: id,
        }
    }

    #[tokio::test]
    async fn persists_across_reopen_and_migrates_twice() {
        let dir = tempfile::tempdir().unwrap();
        let key = ConversationKey::new("discord", "g1", "c1", "");
        {
            let store = open(&dir).await;
            let conv = store.conversation(&key).await.unwrap();
            let q = store
                .append_user(&conv, &user("hello", Some("m1")))
                .await
                .unwrap();
            let Appended::New(qid) = q else { panic!("new") };
            store
                .append_assistant(&conv, Some(qid), "hi there", Status::Complete, None)
                .await
                .unwrap();
            store.close().await;
        }
        // Second open runs the migrator against an already migrated file.
        let store = open(&dir).await;
        let conv = store
            .find_conversation(&key)
            .await
            .unwrap()
            .expect("conversation persisted");
        let msgs = store.since_reset(&conv).await.unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].content, "hello");
        assert_eq!(msgs[0].author_name.as_deref(), Some("alice"));
        assert_eq!(msgs[1].role, Role::Assistant);
        assert_eq!(msgs[1].reply_to, Some(msgs[0].id));
    }

    #[tokio::test]
    async fn duplicate_platform_ids_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let conv = store
            .conversation(&ConversationKey::console("x"))
            .await
            .unwrap();
        let first = store
            .append_user(&conv, &user("a", Some("same")))
            .await
            .unwrap();
        let second = store
            .append_user(&conv, &user("a again", Some("same")))
            .await
            .unwrap();
        let Appended::New(id) = first else {
            panic!("first is new")
        };
        assert_eq!(second, Appended::Duplicate(id));
        assert!(store.is_known("console", "same").await.unwrap());
        assert!(!store.is_known("discord", "same").await.unwrap());
        // Messages without platform ids never collide.
        assert!(matches!(
            store.append_user(&conv, &user("b", None)).await.unwrap(),
            Appended::New(_)
        ));
        assert!(matches!(
            store.append_user(&conv, &user("c", None)).await.unwrap(),
            Appended::New(_)
        ));
        assert_eq!(store.since_reset(&conv).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn reset_hides_history_from_context_but_keeps_it_for_export() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let key = ConversationKey::console("r");
        let conv = store.conversation(&key).await.unwrap();
        store.append_user(&conv, &user("old", None)).await.unwrap();
        store.reset(&conv).await.unwrap();
        let conv = store.conversation(&key).await.unwrap();
        assert!(store.since_reset(&conv).await.unwrap().is_empty());
        store.append_user(&conv, &user("new", None)).await.unwrap();
        let ctx = store.since_reset(&conv).await.unwrap();
        assert_eq!(
            ctx.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
            vec!["new"]
        );
        let ex = store.exchanges(&conv).await.unwrap();
        assert_eq!(ex.len(), 2);
        assert!(!ex[0].in_context && ex[1].in_context);
    }

    #[tokio::test]
    async fn forget_deletes_for_real() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let key = ConversationKey::console("f");
        let conv = store.conversation(&key).await.unwrap();
        store
            .append_user(&conv, &user("secret", Some("p1")))
            .await
            .unwrap();
        assert_eq!(store.forget(&conv).await.unwrap(), 1);
        assert!(store.find_conversation(&key).await.unwrap().is_none());
        assert!(!store.is_known("console", "p1").await.unwrap());
    }

    #[tokio::test]
    async fn edit_and_delete_by_platform_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let conv = store
            .conversation(&ConversationKey::new("matrix", "", "!r:x", ""))
            .await
            .unwrap();
        let Appended::New(q) = store
            .append_user(&conv, &user("typo", Some("$e1")))
            .await
            .unwrap()
        else {
            panic!()
        };
        store.set_token_counts(&[(q, 7, 42)]).await.unwrap();
        store
            .append_assistant(&conv, Some(q), "answer", Status::Complete, None)
            .await
            .unwrap();
        let edited = store
            .edit_by_platform_id("matrix", "$e1", "fixed")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(edited.message_id, q);
        let m = store.message(q).await.unwrap().unwrap();
        assert_eq!(m.content, "fixed");
        assert!(m.edited_at.is_some());
        assert_eq!(m.token_count, None, "stale token count dropped");
        assert!(
            store
                .edit_by_platform_id("matrix", "$nope", "x")
                .await
                .unwrap()
                .is_none()
        );
        let gone = store
            .delete_by_platform_id("matrix", "$e1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gone.conversation_id, conv.id);
        assert!(
            store.since_reset(&conv).await.unwrap().is_empty(),
            "question and its answer removed"
        );
    }

    #[tokio::test]
    async fn settings_and_trim_point() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let key = ConversationKey::console("s");
        let conv = store.conversation(&key).await.unwrap();
        let settings = ConversationSettings {
            system_prompt: Some("Be brief.".into()),
            temperature: Some(0.2),
            max_new_tokens: Some(64),
        };
        store.set_settings(&conv, &settings).await.unwrap();
        store.set_trim_after(&conv, 5).await.unwrap();
        let conv = store.conversation(&key).await.unwrap();
        assert_eq!(conv.settings, settings);
        assert_eq!(conv.trim_after, 5);
        let other = store
            .conversation(&ConversationKey::console("other"))
            .await
            .unwrap();
        assert_eq!(other.settings, ConversationSettings::default());
    }

    #[test]
    fn keys_round_trip() {
        let cases = [
            ConversationKey::console("default"),
            ConversationKey::new("discord", "123", "456", ""),
            ConversationKey::new("discord", "123", "456", "789"),
            ConversationKey::new("matrix", "", "!room:example.org", "$ev%1"),
        ];
        for key in cases {
            let text = key.to_string();
            assert_eq!(text.parse::<ConversationKey>().unwrap(), key, "{text}");
        }
        assert_eq!(
            ConversationKey::console("default").to_string(),
            "console:default"
        );
        for bad in ["", "console", ":x", "a:b:c:d:e", "console:"] {
            assert!(bad.parse::<ConversationKey>().is_err(), "{bad}");
        }
    }
}
