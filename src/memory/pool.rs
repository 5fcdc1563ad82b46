//! The connection pool under the store: SQLite or PostgreSQL, opened and migrated with its own
//! dialect's migrations. Queries are written once with numbered placeholders (`$1`), which both
//! drivers accept; `on_pool!` compiles one body for each driver.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::target::{Backend, Target};
use super::{MemoryError, Result};

/// Connections per daemon on PostgreSQL: several conversations store turns at once, and the
/// server is shared with other daemons.
const POSTGRES_CONNECTIONS: u32 = 8;
/// SQLite has one writer at a time; a few readers beside it are plenty.
const SQLITE_CONNECTIONS: u32 = 4;

#[derive(Debug, Clone)]
pub(super) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs one body against whichever pool the store holds; the body is compiled once per driver,
/// so a query stated once serves both.
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            $crate::memory::pool::Pool::Sqlite($p) => $body,
            $crate::memory::pool::Pool::Postgres($p) => $body,
        }
    };
}
pub(super) use on_pool;

impl Pool {
    pub(super) async fn open(target: &Target, lock_timeout: Duration) -> Result<Pool> {
        let open_err = |source| MemoryError::Open {
            target: target.to_string(),
            source,
        };
        match target {
            Target::SqliteUrl(url) => {
                let options = SqliteConnectOptions::from_str(url).map_err(open_err)?;
                open_sqlite(target, options, lock_timeout).await
            }
            Target::SqlitePath(path) => {
                create_parent(path).map_err(|e| open_err(sqlx::Error::Io(e)))?;
                let options = SqliteConnectOptions::new().filename(path);
                open_sqlite(target, options, lock_timeout).await
            }
            Target::Postgres(url) => {
                let options = PgConnectOptions::from_str(url)
                    .map_err(open_err)?
                    .application_name("synthia-bot")
                    // The same meaning as SQLite's busy timeout: a writer blocked this long by
                    // another's lock gets a retryable error instead of waiting forever.
                    .options([("lock_timeout", lock_timeout.as_millis().to_string())]);
                let pool = PgPoolOptions::new()
                    .max_connections(POSTGRES_CONNECTIONS)
                    .connect_with(options)
                    .await
                    .map_err(open_err)?;
                // The migrator holds an advisory lock, so daemons starting together apply each
                // migration once.
                sqlx::migrate!("./migrations/postgres").run(&pool).await?;
                Ok(Pool::Postgres(pool))
            }
        }
    }

    pub(super) fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub(super) async fn close(&self) {
        on_pool!(self, |p| p.close().await)
    }
}

/// WAL and a busy timeout let readers and the writer work side by side, and a crash at any point
/// leaves a history that still loads.
async fn open_sqlite(
    target: &Target,
    options: SqliteConnectOptions,
    busy_timeout: Duration,
) -> Result<Pool> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(busy_timeout);
    let pool = SqlitePoolOptions::new()
        .max_connections(SQLITE_CONNECTIONS)
        // SQLite opens a file it may not write read-only, without a word, and such a connection
        // stays read-only after the disk takes writes again: it serves while it is out, then is
        // closed rather than pooled, so the next one opens afresh.
        .after_release(|conn, _| {
            Box::pin(async move {
                let mut handle = conn.lock_handle().await?;
                let db = handle.as_raw_handle().as_ptr();
                // SAFETY: the handle is locked and live for the call.
                Ok(unsafe { libsqlite3_sys::sqlite3_db_readonly(db, c"main".as_ptr()) } == 0)
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| MemoryError::Open {
            target: target.to_string(),
            source,
        })?;
    sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
    Ok(Pool::Sqlite(pool))
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() && !parent.exists() => {
            std::fs::create_dir_all(parent)
        }
        _ => Ok(()),
    }
}
