//! What can go wrong with memory, classified by what the caller does next: a busy or locked
//! database, a transaction the server rolled back to break a conflict, or a lost connection is
//! worth retrying; anything else is reported.

use super::target::TargetError;

/// SQLite's primary result codes for "another connection holds the lock" (extended codes keep
/// these in their low byte).
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

/// PostgreSQL's SQLSTATEs worth another try: the server broke a conflict by rolling back
/// (serialization failure, deadlock), a lock was not granted within `lock_timeout`, the server
/// is shutting down or out of connections. Class `08` (connection exceptions) is matched whole.
const POSTGRES_RETRYABLE: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
    "55P03", // lock_not_available
    "57P01", // admin_shutdown
    "57P02", // crash_shutdown
    "57P03", // cannot_connect_now
    "53300", // too_many_connections
];

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// `memory.database` names no database the store can open; nothing was created.
    #[error("memory.database `{target}` {reason}")]
    Target { target: String, reason: TargetError },
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
    /// Two memories that should agree do not (a copy into a database holding other data, or
    /// counts that differ after a copy).
    #[error("the memories differ: {0}")]
    Mismatch(String),
    /// A row the store wrote reads back as something it never writes.
    #[error("the database holds {0}")]
    Corrupt(String),
}

impl MemoryError {
    /// Whether trying again later can succeed: another connection held a lock past the timeout,
    /// the server rolled back one side of a conflict, the connection was lost, or no pooled
    /// connection was free.
    pub fn is_retryable(&self) -> bool {
        match self {
            MemoryError::Db(sqlx::Error::Database(e)) => {
                if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    let code = e.code().and_then(|c| c.parse::<i32>().ok());
                    return code.is_some_and(|c| matches!(c & 0xff, SQLITE_BUSY | SQLITE_LOCKED));
                }
                if let Some(e) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    let code = e.code();
                    return code.starts_with("08") || POSTGRES_RETRYABLE.contains(&code);
                }
                false
            }
            // The socket to the server broke mid-query.
            MemoryError::Db(sqlx::Error::Io(_)) => true,
            MemoryError::Db(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, MemoryError>;
