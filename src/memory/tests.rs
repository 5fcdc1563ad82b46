//! The store against a real SQLite file and a real PostgreSQL database: every test body runs
//! on both, each on a database of its own.

use std::time::Duration;

use super::*;
use crate::chat::{ConversationKey, Platform, Role};

/// The server `scripts/with-postgres` starts; `scripts/test` always provides it.
const POSTGRES_ENV: &str = "SYNTHIA_TEST_POSTGRES";

/// One fresh database for one test: a SQLite file in a temporary folder, or a database of its
/// own on the test PostgreSQL server.
struct TestDb {
    target: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    async fn open(&self) -> Store {
        self.open_with(Duration::from_secs(5)).await
    }

    async fn open_with(&self, lock_timeout: Duration) -> Store {
        let store = Store::open(&self.target, lock_timeout)
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.target));
        println!("== on {}", store.backend());
        store
    }
}

fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("memory.sqlite").display().to_string();
    TestDb {
        target,
        _dir: Some(dir),
    }
}

/// A new, empty database on the test server. Without the server's URL this fails: the
/// PostgreSQL half of a memory test is never skipped.
async fn postgres_db() -> TestDb {
    use sqlx::Connection;
    let admin = std::env::var(POSTGRES_ENV).unwrap_or_else(|_| {
        panic!(
            "{POSTGRES_ENV} is not set: memory tests run on PostgreSQL too; run them through \
             scripts/test or scripts/with-postgres"
        )
    });
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "synthia_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        now_ms()
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connecting to {POSTGRES_ENV}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    TestDb {
        target: with_database(&admin, &name),
        _dir: None,
    }
}

/// The same server URL naming another database.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").expect("a URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// A fresh database on each backend, SQLite first.
async fn databases() -> Vec<TestDb> {
    vec![sqlite_db(), postgres_db().await]
}

/// A store open on its own database, which lives as long as it does.
struct OpenStore {
    store: Store,
    _db: TestDb,
}

impl std::ops::Deref for OpenStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// A freshly opened store on each backend.
async fn stores() -> Vec<OpenStore> {
    let mut out = Vec::new();
    for db in databases().await {
        let store = db.open().await;
        out.push(OpenStore { store, _db: db });
    }
    out
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
    for db in databases().await {
        let key = ConversationKey::new(Platform::Discord, "g1", "c1", "");
        {
            let store = db.open().await;
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
        // Second open runs the migrator against an already migrated database.
        let store = db.open().await;
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
}

#[tokio::test]
async fn duplicate_platform_ids_are_stored_once() {
    for store in stores().await {
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
        assert!(store.is_known(Platform::Console, "same").await.unwrap());
        assert!(!store.is_known(Platform::Discord, "same").await.unwrap());
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
}

#[tokio::test]
async fn reset_hides_history_from_context_but_keeps_it_for_export() {
    for store in stores().await {
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
}

#[tokio::test]
async fn forget_deletes_for_real() {
    for store in stores().await {
        let key = ConversationKey::console("f");
        let conv = store.conversation(&key).await.unwrap();
        store
            .append_user(&conv, &user("secret", Some("p1")))
            .await
            .unwrap();
        assert_eq!(store.forget(&conv).await.unwrap(), 1);
        assert!(store.find_conversation(&key).await.unwrap().is_none());
        assert!(!store.is_known(Platform::Console, "p1").await.unwrap());
    }
}

#[tokio::test]
async fn edit_and_delete_by_platform_id() {
    for store in stores().await {
        let conv = store
            .conversation(&ConversationKey::new(Platform::Matrix, "", "!r:x", ""))
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
            .edit_by_platform_id(Platform::Matrix, "$e1", "fixed")
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
                .edit_by_platform_id(Platform::Matrix, "$nope", "x")
                .await
                .unwrap()
                .is_none()
        );
        let gone = store
            .delete_by_platform_id(Platform::Matrix, "$e1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gone.conversation_id, conv.id);
        assert!(
            store.since_reset(&conv).await.unwrap().is_empty(),
            "question and its answer removed"
        );
    }
}

#[tokio::test]
async fn settings_and_trim_point() {
    for store in stores().await {
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
        assert!(!conv.private);
        store.set_private(&conv, true).await.unwrap();
        assert!(store.conversation(&key).await.unwrap().private);
        let other = store
            .conversation(&ConversationKey::console("other"))
            .await
            .unwrap();
        assert_eq!(other.settings, ConversationSettings::default());
    }
}

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

/// Two stores on one database (two daemons) given the same platform message: the insert is the
/// claim, so exactly one of them stores it as new and the other learns it is a duplicate.
#[tokio::test]
async fn two_stores_claim_one_message_once() {
    for db in databases().await {
        let first = db.open().await;
        let second = db.open().await;
        let key = ConversationKey::new(Platform::Discord, "g", "c", "");
        let conv_a = first.conversation(&key).await.unwrap();
        let conv_b = second.conversation(&key).await.unwrap();
        assert_eq!(conv_a.id, conv_b.id, "one conversation for one key");
        for round in 0..20 {
            let id = format!("m{round}");
            let turn = user("hi", Some(&id));
            let (a, b) = tokio::join!(
                first.append_user(&conv_a, &turn),
                second.append_user(&conv_b, &turn),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            match (a, b) {
                (Appended::New(x), Appended::Duplicate(y))
                | (Appended::Duplicate(y), Appended::New(x)) => assert_eq!(x, y),
                other => panic!("round {round}: exactly one claim must win: {other:?}"),
            }
        }
        assert_eq!(first.since_reset(&conv_a).await.unwrap().len(), 20);
    }
}

/// A SQLite memory written before the migrations moved to `migrations/sqlite/` (schema applied
/// and recorded by sqlx as versions 1 and 2, with the checksums of those files) opens untouched:
/// the moved files keep their versions and their bytes.
#[tokio::test]
async fn a_database_migrated_by_the_old_layout_still_opens() {
    use sqlx::Connection;
    // SHA-384 of `migrations/0001_conversations_and_messages.sql` as released.
    const RELEASED_0001: &str = "e5df19cb08b97c7c5c46406ef55f83c1e93acf2bd3fd97c0884128f3a95740bd17548892fcbe6b1388dca2a726d87a4b";
    // And of `migrations/0002_restart_notices.sql`.
    const RELEASED_0002: &str = "43cb0f7c1d2b3a54dabcacc78ce377efec878206961093539e96862f2d3ad74d64c16c2ccb7cfd2e143c5223d4694ce8";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    {
        let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(include_str!(
            "../../migrations/sqlite/0001_conversations_and_messages.sql"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        // The bookkeeping table exactly as sqlx created and filled it.
        sqlx::raw_sql(
            "CREATE TABLE _sqlx_migrations (
                version BIGINT PRIMARY KEY,
                description TEXT NOT NULL,
                installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
                success BOOLEAN NOT NULL,
                checksum BLOB NOT NULL,
                execution_time BIGINT NOT NULL
            )",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql(include_str!(
            "../../migrations/sqlite/0002_restart_notices.sql"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        for (version, description, hex) in [
            (1, "conversations and messages", RELEASED_0001),
            (2, "restart notices", RELEASED_0002),
        ] {
            let checksum: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, TRUE, $3, 1234)")
                .bind(version)
                .bind(description)
                .bind(checksum)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        sqlx::raw_sql("INSERT INTO conversations (platform, channel, created_at) VALUES ('console', 'old', 1);
                       INSERT INTO messages (conversation_id, role, content, platform, status, created_at) VALUES (1, 'user', 'from before', 'console', 'complete', 1)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let store = Store::open(path.to_str().unwrap(), Duration::from_secs(5))
        .await
        .expect("the moved migration matches the applied one");
    let conv = store
        .find_conversation(&ConversationKey::console("old"))
        .await
        .unwrap()
        .expect("the old conversation");
    let msgs = store.since_reset(&conv).await.unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].content, "from before");
    store.close().await;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT version, execution_time FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        rows.get(..2),
        Some(&[(1, 1234), (2, 1234)][..]),
        "versions 1 and 2 not applied again"
    );
    assert_eq!(rows.len(), 3, "and the later ones applied: {rows:?}");
}

/// Two daemons on one PostgreSQL memory answer one conversation at a time: the second waits
/// for the first's turn to end, other conversations do not wait, and a daemon whose session dies
/// (a crash) releases its conversations at once.
#[tokio::test]
async fn turns_order_one_conversation_across_daemons() {
    use sqlx::Connection;
    let db = postgres_db().await;
    let first = db.open().await;
    let second = db.open().await;
    let conv = first
        .conversation(&ConversationKey::console("busy"))
        .await
        .unwrap();
    let other = first
        .conversation(&ConversationKey::console("free"))
        .await
        .unwrap();
    let wait = Duration::from_millis(400);

    let turn = first.take_turn(conv.id).await.unwrap();
    assert!(
        tokio::time::timeout(wait, second.take_turn(conv.id))
            .await
            .is_err(),
        "the second daemon waits while the first answers"
    );
    // The same daemon's next task waits too.
    assert!(
        tokio::time::timeout(wait, first.take_turn(conv.id))
            .await
            .is_err(),
        "one turn per conversation within a daemon as well"
    );
    let free = tokio::time::timeout(wait, second.take_turn(other.id))
        .await
        .expect("another conversation does not wait")
        .unwrap();
    drop(free);
    drop(turn);
    let taken = tokio::time::timeout(Duration::from_secs(5), second.take_turn(conv.id))
        .await
        .expect("the turn passes once the first is done")
        .unwrap();
    drop(taken);

    // A crash: the first daemon's lock session ends without releasing anything.
    let _held = tokio::time::timeout(Duration::from_secs(5), first.take_turn(conv.id))
        .await
        .expect("the first takes it back")
        .unwrap();
    let mut admin = sqlx::PgConnection::connect(&db.target).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks
         WHERE locktype = 'advisory' AND classid::bigint = $1 AND objid::bigint = $2
           AND objsubid = 2
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(i64::from(super::turns::LOCK_SPACE))
    .bind(conv.id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(ended, vec![true], "one session held the conversation");
    let started = std::time::Instant::now();
    let _taken = tokio::time::timeout(Duration::from_secs(5), second.take_turn(conv.id))
        .await
        .expect("a dead daemon's conversation is free at once")
        .unwrap();
    println!("taken over after {:?}", started.elapsed());
}

/// On SQLite one daemon owns the file: a turn is granted at once.
#[tokio::test]
async fn sqlite_turns_are_granted_at_once() {
    let db = sqlite_db();
    let store = db.open().await;
    let conv = store
        .conversation(&ConversationKey::console("t"))
        .await
        .unwrap();
    let turn = tokio::time::timeout(Duration::from_secs(1), store.take_turn(conv.id))
        .await
        .expect("no wait")
        .unwrap();
    drop(turn);
}

/// Questions a run left unanswered are taken up by the next: once, only those of its
/// platform and window, with their notices claimed once.
#[tokio::test]
async fn unanswered_questions_are_found_and_taken_up_once() {
    for db in databases().await {
        let key = ConversationKey::new(Platform::Matrix, "", "!room:example.org", "");
        let (q1, q2, q3) = {
            // The run that stopped with questions left.
            let store = db.open().await;
            let conv = store.conversation(&key).await.unwrap();
            let other = store
                .conversation(&ConversationKey::new(Platform::Discord, "g", "c", ""))
                .await
                .unwrap();
            let new = |a: Appended| match a {
                Appended::New(id) => id,
                Appended::Duplicate(_) => panic!("new"),
            };
            let q1 = new(store
                .append_user(&conv, &user("one", Some("$1")))
                .await
                .unwrap());
            let q2 = new(store
                .append_user(&conv, &user("two", Some("$2")))
                .await
                .unwrap());
            let q3 = new(store
                .append_user(&conv, &user("three", Some("$3")))
                .await
                .unwrap());
            store
                .append_user(&other, &user("elsewhere", Some("d1")))
                .await
                .unwrap();
            store
                .append_assistant(&conv, Some(q2), "answered", Status::Complete, None)
                .await
                .unwrap();
            let until = now_ms() + 1;
            assert!(
                store
                    .take_unanswered(Platform::Matrix, 0, until)
                    .await
                    .unwrap()
                    .is_empty(),
                "a run's own questions are its own to answer"
            );
            store.close().await;
            (q1, q2, q3)
        };
        let store = db.open().await;
        let conv = store.conversation(&key).await.unwrap();
        let until = now_ms() + 1;
        assert!(
            store
                .take_unanswered(Platform::Matrix, until, until + 1000)
                .await
                .unwrap()
                .is_empty(),
            "the window bounds by acceptance time"
        );
        let found = store
            .take_unanswered(Platform::Matrix, 0, until)
            .await
            .unwrap();
        let ids: Vec<i64> = found.iter().map(|u| u.question.id).collect();
        assert_eq!(
            ids,
            vec![q1, q3],
            "answered and other platforms' questions are not pending"
        );
        assert_eq!(found[0].key, key);
        assert_eq!(found[0].private, conv.private);
        assert_eq!(found[0].question.platform_message_id.as_deref(), Some("$1"));
        assert!(
            store
                .take_unanswered(Platform::Matrix, 0, until)
                .await
                .unwrap()
                .is_empty(),
            "taken over once"
        );
        // A resumed reply is stored once; a second one for the same question is refused.
        let first = store
            .append_only_reply(conv.id, q1, "late answer", Status::Complete)
            .await
            .unwrap();
        assert!(first.is_some());
        assert_eq!(
            store
                .append_only_reply(conv.id, q1, "again", Status::Complete)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .append_only_reply(conv.id, q2, "again", Status::Complete)
                .await
                .unwrap(),
            None,
            "a question answered live is not answered again"
        );

        // A notice is claimed once, never for an answered question, and marked sent.
        assert!(!store.claim_restart_notice(q1).await.unwrap());
        assert!(store.claim_restart_notice(q3).await.unwrap());
        assert!(!store.claim_restart_notice(q3).await.unwrap());
        assert_eq!(
            store.restart_notice(q3).await.unwrap(),
            Some(NoticeStatus::Claimed)
        );
        store.mark_restart_notice_sent(q3).await.unwrap();
        assert_eq!(
            store.restart_notice(q3).await.unwrap(),
            Some(NoticeStatus::Sent)
        );
        assert!(
            store
                .take_unanswered(Platform::Matrix, 0, until)
                .await
                .unwrap()
                .is_empty()
        );
        // The notice is not a message: the prompt's history and export do not see it.
        assert_eq!(store.since_reset(&conv).await.unwrap().len(), 5);
        let exchanges = store.exchanges(&conv).await.unwrap();
        assert_eq!(exchanges[2].answer, None);

        // Deleting the question on the platform takes its notice with it.
        store
            .delete_by_platform_id(Platform::Matrix, "$3")
            .await
            .unwrap();
        assert_eq!(store.restart_notice(q3).await.unwrap(), None);
    }
}

/// Several daemons on one PostgreSQL memory: the questions of a daemon that is still running
/// are left to it, and when it is gone, of two daemons looking at once exactly one takes each.
#[tokio::test]
async fn a_live_daemons_questions_are_left_to_it_and_a_gone_ones_taken_over_once() {
    let db = postgres_db().await;
    let live = db.open().await;
    let key = ConversationKey::new(Platform::Discord, "g", "c", "");
    let conv = live.conversation(&key).await.unwrap();
    let Appended::New(q) = live
        .append_user(&conv, &user("still being answered", Some("d1")))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    let (b, c) = (db.open().await, db.open().await);
    let until = now_ms() + 1;
    for other in [&b, &c] {
        assert!(
            other
                .take_unanswered(Platform::Discord, 0, until)
                .await
                .unwrap()
                .is_empty(),
            "a running daemon's question is taken over"
        );
    }
    live.close().await;
    let (x, y) = tokio::join!(
        b.take_unanswered(Platform::Discord, 0, until),
        c.take_unanswered(Platform::Discord, 0, until),
    );
    let taken: Vec<i64> = x
        .unwrap()
        .into_iter()
        .chain(y.unwrap())
        .map(|u| u.question.id)
        .collect();
    assert_eq!(taken, vec![q], "exactly one daemon takes the question over");
}

/// PostgreSQL refuses NUL in text; SQLite keeps it. Both store it as U+FFFD, in questions,
/// names, replies, edits and system prompts, so a NUL a model or a user wrote loses nothing.
#[tokio::test]
async fn nul_characters_are_stored_alike_on_both_backends() {
    for store in stores().await {
        let conv = store
            .conversation(&ConversationKey::console("nul"))
            .await
            .unwrap();
        let turn = NewUserTurn {
            author_id: "u1",
            author_name: "al\0ice",
            content: "a\0b",
            platform_message_id: Some("n1"),
        };
        let Appended::New(q) = store.append_user(&conv, &turn).await.unwrap() else {
            panic!("new")
        };
        store
            .append_assistant(&conv, Some(q), "re\0ply", Status::Complete, None)
            .await
            .unwrap();
        store
            .set_settings(
                &conv,
                &ConversationSettings {
                    system_prompt: Some("sys\0tem".into()),
                    ..ConversationSettings::default()
                },
            )
            .await
            .unwrap();
        let msgs = store.since_reset(&conv).await.unwrap();
        assert_eq!(msgs[0].content, "a\u{FFFD}b");
        assert_eq!(msgs[0].author_name.as_deref(), Some("al\u{FFFD}ice"));
        assert_eq!(msgs[1].content, "re\u{FFFD}ply");
        store
            .edit_by_platform_id(Platform::Console, "n1", "ed\0it")
            .await
            .unwrap();
        assert_eq!(
            store.since_reset(&conv).await.unwrap()[0].content,
            "ed\u{FFFD}it"
        );
        let conv = store
            .find_conversation(&ConversationKey::console("nul"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            conv.settings.system_prompt.as_deref(),
            Some("sys\u{FFFD}tem")
        );
    }
}
