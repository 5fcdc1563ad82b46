//! Errors by what a caller does next: a lock held past the timeout and the server's own
//! conflicts are retryable, constraint and syntax errors are not; a PostgreSQL URL is never a file.

use super::*;

/// A writer blocked past the busy timeout by another connection's lock gets an error the caller
/// may retry, told apart by SQLite's result code, not by the wording of its message.
#[tokio::test]
async fn a_held_sqlite_write_lock_is_retryable() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("memory.sqlite");
    let store = Store::open(path.to_str().unwrap(), Duration::from_millis(50))
        .await
        .unwrap();
    let conv = store
        .conversation(&ConversationKey::console("lock"))
        .await
        .unwrap();
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .unwrap();
    let err = store
        .append_user(&conv, &user("blocked", None))
        .await
        .expect_err("the lock is held");
    assert!(err.is_retryable(), "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    store.append_user(&conv, &user("free", None)).await.unwrap();
    // A constraint failure is not worth retrying.
    let bad = sqlx::query("INSERT INTO messages (id, conversation_id, role, content, status, created_at) VALUES (1, 999999, 'user', 'x', 'complete', 0)")
        .execute(&mut other)
        .await
        .map_err(MemoryError::from)
        .expect_err("no such conversation");
    assert!(!bad.is_retryable(), "{bad}");
}

/// A PostgreSQL URL names a server, never a file: opening it must not create a SQLite database
/// (or a folder named `postgres:`) in the working directory.
#[tokio::test]
async fn a_postgres_url_is_never_taken_for_a_file() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for scheme in ["postgres", "postgresql"] {
        let url = format!("{scheme}://user:pass@127.0.0.1:{port}/never_{port}");
        let result = Store::open(&url, Duration::from_millis(200)).await;
        let made = std::path::Path::new(&format!("{scheme}:")).exists();
        if made {
            std::fs::remove_dir_all(format!("{scheme}:")).unwrap();
        }
        assert!(!made, "{url} was taken for a file path");
        assert!(
            matches!(result, Err(MemoryError::Open { .. })),
            "nothing listens on {port}: {:?}",
            result.map(|_| ())
        );
    }
}

/// The PostgreSQL twin: a writer blocked past `lock_timeout` by another session's table lock gets
/// a retryable error (SQLSTATE 55P03), and goes through once the lock is released.
#[tokio::test]
async fn a_held_postgres_lock_is_retryable() {
    use sqlx::Connection;
    let db = postgres_db().await;
    let store = db.open_with(Duration::from_millis(50)).await;
    let conv = store
        .conversation(&ConversationKey::console("lock"))
        .await
        .unwrap();
    let mut other = sqlx::PgConnection::connect(&db.target).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut other)
        .await
        .unwrap();
    let err = store
        .append_user(&conv, &user("blocked", None))
        .await
        .expect_err("the lock is held");
    assert!(err.is_retryable(), "{err}");
    sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
    store.append_user(&conv, &user("free", None)).await.unwrap();
    let bad = sqlx::query("INSERT INTO messages (conversation_id, role, content, platform, status, created_at) VALUES (999999, 'user', 'x', 'console', 'complete', 0)")
        .execute(&mut other)
        .await
        .map_err(MemoryError::from)
        .expect_err("no such conversation");
    assert!(!bad.is_retryable(), "{bad}");
}

/// PostgreSQL's own errors, raised by the server with their SQLSTATEs: conflicts it broke by
/// rolling back and lost connections are retryable; constraint and syntax errors are not.
#[tokio::test]
async fn postgres_errors_are_classified_by_sqlstate() {
    use sqlx::Connection;
    let db = postgres_db().await;
    let mut conn = sqlx::PgConnection::connect(&db.target).await.unwrap();
    let cases = [
        ("40001", true),  // serialization_failure
        ("40P01", true),  // deadlock_detected
        ("55P03", true),  // lock_not_available
        ("57P01", true),  // admin_shutdown
        ("08006", true),  // connection_failure
        ("53300", true),  // too_many_connections
        ("23505", false), // unique_violation
        ("42601", false), // syntax_error
        ("22P02", false), // invalid_text_representation
    ];
    for (code, retryable) in cases {
        let sql = format!("DO $$ BEGIN RAISE EXCEPTION 'raised' USING ERRCODE = '{code}'; END $$");
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await
            .map_err(MemoryError::from)
            .expect_err("the block raises");
        assert_eq!(err.is_retryable(), retryable, "{code}: {err}");
    }
    // A real deadlock, broken by the server: one of two crossing transactions is rolled back.
    let store = db.open().await;
    let a = store
        .conversation(&ConversationKey::console("a"))
        .await
        .unwrap();
    let b = store
        .conversation(&ConversationKey::console("b"))
        .await
        .unwrap();
    let mut second = sqlx::PgConnection::connect(&db.target).await.unwrap();
    let lock = "UPDATE conversations SET trim_after = trim_after WHERE id = $1";
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut second).await.unwrap();
    sqlx::query(lock)
        .bind(a.id)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(lock)
        .bind(b.id)
        .execute(&mut second)
        .await
        .unwrap();
    let (first, other) = tokio::join!(
        sqlx::query(lock).bind(b.id).execute(&mut conn),
        sqlx::query(lock).bind(a.id).execute(&mut second),
    );
    let err = match (first, other) {
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => MemoryError::from(e),
        (first, other) => panic!("one side must be chosen as the victim: {first:?} {other:?}"),
    };
    assert!(err.is_retryable(), "{err}");
}
