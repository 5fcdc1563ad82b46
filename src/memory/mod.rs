//! Persistent conversation memory in SQLite. The schema lives only in `migrations/`; the store
//! knows nothing of prompts or tokenizers, it keeps what it is given.

mod conversations;
mod error;
mod export;
mod messages;
mod pending;
mod records;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use error::{MemoryError, Result};
pub use export::{Exchange, pair_answers};
pub use pending::{NoticeStatus, Unanswered};
pub use records::{
    Affected, Appended, Conversation, ConversationSettings, NewUserTurn, Status, StoredMessage,
};

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

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
}
