//! What can go wrong with memory, classified by what the caller does next: a busy or locked
//! database is worth retrying; anything else is reported.

/// SQLite's primary result codes for "another connection holds the lock" (extended codes keep
/// these in their low byte).
const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// A row the store wrote reads back as something it never writes.
    #[error("the database holds {0}")]
    Corrupt(String),
}

impl MemoryError {
    /// Whether trying again later can succeed: another connection held the database lock past
    /// the busy timeout, or no pooled connection was free.
    pub fn is_retryable(&self) -> bool {
        match self {
            MemoryError::Db(sqlx::Error::Database(e)) => e
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|code| matches!(code & 0xff, SQLITE_BUSY | SQLITE_LOCKED)),
            MemoryError::Db(sqlx::Error::PoolTimedOut) => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, MemoryError>;
