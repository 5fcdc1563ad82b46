//! Persistent conversation memory in SQLite or PostgreSQL. The schema lives only in
//! `migrations/<dialect>/`; the store knows nothing of prompts or tokenizers, it keeps what it is
//! given.

mod conversations;
mod copy;
mod error;
mod export;
mod messages;
mod pool;
mod records;
mod target;
#[cfg(test)]
mod tests;
mod turns;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub use copy::{CopyReport, Counts};
pub use error::{MemoryError, Result};
pub use export::{Exchange, pair_answers};
pub use records::{
    Affected, Appended, Conversation, ConversationSettings, NewUserTurn, Status, StoredMessage,
};
pub use target::{Backend, Target, TargetError, redact_password};
pub use turns::ConversationTurn;

use pool::Pool;
use turns::TurnLocks;

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The memory: one pool on one database, the same operations on either backend.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// PostgreSQL only: conversations this daemon is answering, locked for every daemon.
    turns: Option<Arc<TurnLocks>>,
}

impl Store {
    /// Opens the database named by a path, a `sqlite://` URL or a `postgres://` URL and applies
    /// that dialect's migrations. SQLite files are created when missing (WAL and a busy timeout
    /// let readers and the writer work side by side); a PostgreSQL database must exist. On both,
    /// `lock_timeout` is how long a writer waits for another's lock before a retryable error.
    pub async fn open(target: &str, lock_timeout: Duration) -> Result<Store> {
        let parsed = Target::parse(target).map_err(|reason| MemoryError::Target {
            target: target::redact_password(target),
            reason,
        })?;
        let pool = Pool::open(&parsed, lock_timeout).await?;
        let turns = match &parsed {
            Target::Postgres(url) => {
                let options =
                    sqlx::postgres::PgConnectOptions::from_str(url).map_err(|source| {
                        MemoryError::Open {
                            target: parsed.to_string(),
                            source,
                        }
                    })?;
                Some(Arc::new(TurnLocks::new(options)))
            }
            Target::SqliteUrl(_) | Target::SqlitePath(_) => None,
        };
        Ok(Store { pool, turns })
    }

    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    pub async fn close(&self) {
        if let Some(turns) = &self.turns {
            turns.close().await;
        }
        self.pool.close().await;
    }
}
