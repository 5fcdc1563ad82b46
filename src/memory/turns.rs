//! One answer at a time per conversation across every daemon sharing a PostgreSQL memory.
//!
//! Each daemon keeps one session for its conversation locks (session-level advisory locks keyed
//! by conversation id). A lock ends with its session, so a daemon that dies, or loses its
//! connection, releases every conversation it held at once and another daemon takes them over.
//! Waiting is polling with `pg_try_advisory_lock`, so the session is never blocked and no pooled
//! connection is held while a conversation waits. A SQLite file belongs to one daemon, whose
//! in-process order is all there is: there a turn is granted at once.
//!
//! The same session holds, for as long as it lasts, one more lock that stands for this run
//! ([`RUN_SPACE`], the run's id): another daemon that can take it knows the run is gone, and takes
//! over the questions it left unanswered (`pending.rs`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::{Result, Store};

/// How often a waiting conversation asks again whether the other daemon is done.
const POLL: Duration = Duration::from_millis(50);

/// First half of the two-part advisory lock key ("SYNT"): the two-part key space is apart from
/// the one-part one (which sqlx's migrator uses), and this half keeps ours apart from other
/// programs' locks in the same database.
pub(super) const LOCK_SPACE: i32 = 0x5359_4E54;

/// First half of the key of the lock that says a run is alive ("SYNU"); the second is its id.
pub(super) const RUN_SPACE: i32 = 0x5359_4E55;

/// Second half: the conversation id (wrapping past 2^32 conversations, where two share a lock
/// and so merely take turns).
fn lock_key(conversation_id: i64) -> i32 {
    conversation_id as u32 as i32
}

/// This daemon's lock session and the conversations it holds through it.
pub(super) struct TurnLocks {
    options: PgConnectOptions,
    /// This run's id, the second half of its alive lock.
    run_key: i32,
    session: tokio::sync::Mutex<Option<PgConnection>>,
    /// Whether the open session holds this run's alive lock.
    run_lock: std::sync::atomic::AtomicBool,
    /// Advisory locks are re-entrant within a session; this keeps two tasks of this daemon from
    /// both being granted the same conversation.
    held: Mutex<HashSet<i64>>,
}

impl std::fmt::Debug for TurnLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnLocks").finish_non_exhaustive()
    }
}

impl TurnLocks {
    pub(super) fn new(options: PgConnectOptions, run_key: i32) -> TurnLocks {
        TurnLocks {
            options: options.application_name("synthia-bot turns"),
            run_key,
            session: tokio::sync::Mutex::new(None),
            run_lock: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(HashSet::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One attempt: true if this daemon now holds the conversation.
    async fn try_take(&self, conversation_id: i64) -> Result<bool> {
        let mut session = self.session.lock().await;
        // Checked under the session lock, so no other task of ours is granted it meanwhile.
        if self.held().contains(&conversation_id) {
            return Ok(false);
        }
        let conn = self.session(&mut session).await?;
        let taken = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LOCK_SPACE)
            .bind(lock_key(conversation_id))
            .fetch_one(&mut *conn)
            .await;
        match taken {
            Ok(true) => Ok(self.held().insert(conversation_id)),
            Ok(false) => Ok(false),
            Err(e) => {
                // The session is gone, and with it every lock it held: start afresh.
                *session = None;
                self.held().clear();
                Err(e.into())
            }
        }
    }

    /// The open session, connected when there was none, holding this run's alive lock. Taking
    /// it never waits: a lost session of ours the server has not noticed yet may still hold it
    /// (the run is alive either way), and it is tried again on every use until this one has it.
    async fn session<'s>(
        &self,
        session: &'s mut Option<PgConnection>,
    ) -> Result<&'s mut PgConnection> {
        use std::sync::atomic::Ordering;
        if session.is_none() {
            *session = Some(PgConnection::connect_with(&self.options).await?);
            self.run_lock.store(false, Ordering::Release);
        }
        if !self.run_lock.load(Ordering::Acquire)
            && let Some(conn) = session.as_mut()
        {
            let taken = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1, $2)")
                .bind(RUN_SPACE)
                .bind(self.run_key)
                .fetch_one(&mut *conn)
                .await;
            match taken {
                Ok(taken) => self.run_lock.store(taken, Ordering::Release),
                Err(e) => {
                    // The session is gone, and with it every lock it held: start afresh.
                    *session = None;
                    self.held().clear();
                    return Err(e.into());
                }
            }
        }
        match session.as_mut() {
            Some(conn) => Ok(conn),
            None => Err(sqlx::Error::PoolClosed.into()),
        }
    }

    /// Opens the session now, so this run counts as alive before it accepts anything.
    pub(super) async fn connect(&self) -> Result<()> {
        let mut session = self.session.lock().await;
        self.session(&mut session).await.map(|_| ())
    }

    /// Whether another run's daemon still holds its session: if its alive lock can be taken, the
    /// run is gone (the lock is let go again at once).
    pub(super) async fn run_alive(&self, run_key: i32) -> Result<bool> {
        let mut session = self.session.lock().await;
        let conn = self.session(&mut session).await?;
        let outcome = async {
            let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(RUN_SPACE)
                .bind(run_key)
                .fetch_one(&mut *conn)
                .await?;
            if free {
                sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(RUN_SPACE)
                    .bind(run_key)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok::<_, sqlx::Error>(!free)
        }
        .await;
        match outcome {
            Ok(alive) => Ok(alive),
            Err(e) => {
                *session = None;
                self.held().clear();
                Err(e.into())
            }
        }
    }

    async fn release(&self, conversation_id: i64) {
        let mut session = self.session.lock().await;
        if !self.held().remove(&conversation_id) {
            return;
        }
        if let Some(conn) = session.as_mut() {
            let released = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1, $2)")
                .bind(LOCK_SPACE)
                .bind(lock_key(conversation_id))
                .fetch_one(&mut *conn)
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, conversation_id, "lost the lock session; its locks ended with it");
                *session = None;
                self.held().clear();
            }
        }
    }

    pub(super) async fn close(&self) {
        if let Some(conn) = self.session.lock().await.take() {
            let _ = conn.close().await;
        }
        self.held().clear();
    }
}

/// This daemon's turn in one conversation; the next daemon's begins when it is dropped.
#[must_use = "the turn ends when this is dropped"]
#[derive(Debug)]
pub struct ConversationTurn {
    locks: Option<Arc<TurnLocks>>,
    conversation_id: i64,
}

impl Drop for ConversationTurn {
    fn drop(&mut self) {
        let Some(locks) = self.locks.take() else {
            return;
        };
        let id = self.conversation_id;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move { locks.release(id).await });
            }
            // No runtime left (the process is ending): the session ends with it.
            Err(_) => {
                locks.held().remove(&id);
            }
        }
    }
}

impl TurnLocks {
    /// One attempt, as a task of its own: a caller that gives up waiting cannot cut the
    /// attempt between the server granting the lock and the grant being recorded. A turn
    /// granted to a caller that is gone is dropped with the task's output, which releases it.
    async fn attempt(self: Arc<Self>, conversation_id: i64) -> Result<Option<ConversationTurn>> {
        let taken = self.try_take(conversation_id).await?;
        Ok(taken.then(|| ConversationTurn {
            locks: Some(self),
            conversation_id,
        }))
    }
}

impl Store {
    /// Waits until no other daemon is answering in this conversation, then holds it until the
    /// returned turn is dropped.
    pub async fn take_turn(&self, conversation_id: i64) -> Result<ConversationTurn> {
        let Some(locks) = &self.turns else {
            return Ok(ConversationTurn {
                locks: None,
                conversation_id,
            });
        };
        loop {
            match tokio::spawn(locks.clone().attempt(conversation_id)).await {
                Ok(Ok(Some(turn))) => return Ok(turn),
                Ok(Ok(None)) => tokio::time::sleep(POLL).await,
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(_) => return Err(sqlx::Error::PoolClosed.into()),
            }
        }
    }
}
