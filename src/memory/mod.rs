//! Persistent conversation memory in SQLite or PostgreSQL. The schema lives only in
//! `migrations/<dialect>/`; the store knows nothing of prompts or tokenizers, it keeps what it is
//! given.

mod conversations;
mod copy;
mod error;
mod export;
mod messages;
mod pending;
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
pub use pending::{NoticeStatus, Unanswered, Unshown};
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
    /// This run's id, recorded on every question it accepts, so that after a restart only the
    /// questions of runs that are gone are taken up (see `pending.rs`).
    run_id: i64,
}

/// A random id for this run: never 0 (which stands for questions stored before runs were
/// recorded), and within `i32`, as PostgreSQL's two-part advisory lock keys are.
fn new_run_id() -> i64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        // std seeds each `RandomState` from the OS; that is all the randomness this needs.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let id = i64::from(h.finish() as u32 as i32);
        if id != 0 {
            return id;
        }
    }
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
        let run_id = new_run_id();
        let turns = match &parsed {
            Target::Postgres(url) => {
                let options =
                    sqlx::postgres::PgConnectOptions::from_str(url).map_err(|source| {
                        MemoryError::Open {
                            target: parsed.to_string(),
                            source,
                        }
                    })?;
                let locks = Arc::new(TurnLocks::new(options, run_id as i32));
                // The run is alive for other daemons from now on, before any question.
                locks.connect().await.map_err(|e| match e {
                    MemoryError::Db(source) => MemoryError::Open {
                        target: parsed.to_string(),
                        source,
                    },
                    other => other,
                })?;
                Some(locks)
            }
            Target::SqliteUrl(_) | Target::SqlitePath(_) => None,
        };
        Ok(Store {
            pool,
            turns,
            run_id,
        })
    }

    /// This run's id, as recorded on the questions it accepts.
    pub fn run_id(&self) -> i64 {
        self.run_id
    }

    /// Whether the run that accepted a question is still working: this run is; on SQLite, whose
    /// file one daemon owns, no other run is; on PostgreSQL, a run is alive while its daemon's
    /// lock session lasts.
    async fn run_alive(&self, run_id: i64) -> Result<bool> {
        if run_id == self.run_id {
            return Ok(true);
        }
        match (&self.turns, i32::try_from(run_id)) {
            (Some(locks), Ok(key)) if run_id != 0 => locks.run_alive(key).await,
            _ => Ok(false),
        }
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
