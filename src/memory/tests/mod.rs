//! The store against a real SQLite file and a real PostgreSQL database: every test body runs
//! on both, each on a database of its own. Here the helpers and the store's everyday work; errors,
//! several daemons and unanswered questions in files of their own.

mod daemons;
mod errors;
mod pending;

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
            "../../../migrations/sqlite/0001_conversations_and_messages.sql"
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
            "../../../migrations/sqlite/0002_restart_notices.sql"
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
    let later = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
        .unwrap()
        .count();
    assert_eq!(rows.len(), later, "and the later ones applied: {rows:?}");
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
