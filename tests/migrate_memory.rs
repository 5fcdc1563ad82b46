//! `synthia-bot migrate-memory`: a SQLite memory made by the store as released, copied into a
//! real PostgreSQL database by the real binary; `export` says the same before and after, the copy
//! resumes, and the copied memory takes new messages.

mod common;

use std::path::Path;
use std::time::Duration;

use synthia_bot::chat::{ConversationKey, Platform};
use synthia_bot::memory::{Appended, ConversationSettings, NewUserTurn, Status, Store};

fn turn<'a>(text: &'a str, id: Option<&'a str>) -> NewUserTurn<'a> {
    NewUserTurn {
        author_id: "u1",
        author_name: "alice",
        content: text,
        platform_message_id: id,
    }
}

/// A memory with what a release writes: replies, a reset, settings, a trim point, a private
/// conversation, an edit, a cancelled reply, a restart notice and a turn without a platform id.
async fn fill(store: &Store) {
    let guild = store
        .conversation(&ConversationKey::new(Platform::Discord, "g1", "c1", ""))
        .await
        .unwrap();
    for (i, q) in ["first question", "second question"].iter().enumerate() {
        let id = format!("d{i}");
        let Appended::New(qid) = store
            .append_user(&guild, &turn(q, Some(&id)))
            .await
            .unwrap()
        else {
            panic!("new")
        };
        store
            .append_assistant(
                &guild,
                Some(qid),
                "an answer",
                Status::Complete,
                Some(&format!("r{i}")),
            )
            .await
            .unwrap();
    }
    store.reset(&guild).await.unwrap();
    let Appended::New(unanswered) = store
        .append_user(&guild, &turn("after the reset", Some("d9")))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    // Left unanswered by a restart, and told so.
    assert!(store.claim_restart_notice(unanswered).await.unwrap());
    store.mark_restart_notice_sent(unanswered).await.unwrap();
    store
        .edit_by_platform_id(Platform::Discord, "d9", "after the reset, edited")
        .await
        .unwrap();

    let room = store
        .conversation(&ConversationKey::new(
            Platform::Matrix,
            "",
            "!room:x",
            "$thread",
        ))
        .await
        .unwrap();
    store
        .set_settings(
            &room,
            &ConversationSettings {
                system_prompt: Some("Be brief.".into()),
                temperature: Some(0.25),
                max_new_tokens: Some(99),
            },
        )
        .await
        .unwrap();
    let Appended::New(q) = store
        .append_user(&room, &turn("long one", Some("$e1")))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    store.set_token_counts(&[(q, 12, 345)]).await.unwrap();
    store
        .append_assistant(&room, Some(q), "half of it", Status::Cancelled, None)
        .await
        .unwrap();
    store.set_trim_after(&room, q).await.unwrap();

    let console = store
        .conversation(&ConversationKey::console("default"))
        .await
        .unwrap();
    store.set_private(&console, true).await.unwrap();
    let Appended::New(q) = store
        .append_user(&console, &turn("hi", None))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    store
        .append_assistant(&console, Some(q), "hello", Status::Complete, None)
        .await
        .unwrap();
}

async fn synthia(dir: &Path, database: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_synthia-bot"))
        .args(args)
        .current_dir(dir)
        .env("SYNTHIA_BOT__MEMORY__DATABASE", database)
        .env("SYNTHIA_BOT_LOG", "warn")
        .output()
        .await
        .unwrap()
}

async fn export(dir: &Path, database: &str) -> String {
    let out = synthia(dir, database, &["export"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn migrate(dir: &Path, from: &str, to: &str) -> std::process::Output {
    synthia(dir, from, &["migrate-memory", "--from", from, "--to", to]).await
}

fn stdout_of(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn copies_sqlite_into_postgres_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("old.sqlite").display().to_string();
    let postgres = common::postgres::fresh_database().await;
    {
        let store = Store::open(&sqlite, Duration::from_secs(5)).await.unwrap();
        fill(&store).await;
        store.close().await;
    }
    let before = export(dir.path(), &sqlite).await;
    assert_eq!(before.lines().count(), 5, "{before}");

    let out = stdout_of(&migrate(dir.path(), &sqlite, &postgres).await);
    assert!(
        out.contains("copied 3 conversations (0 were already there); both hold 3 conversations and 9 messages"),
        "{out}"
    );
    assert_eq!(export(dir.path(), &postgres).await, before);

    // Every stored field came across: settings, boundaries, privacy, token counts, edits.
    let from = Store::open(&sqlite, Duration::from_secs(5)).await.unwrap();
    let to = Store::open(&postgres, Duration::from_secs(5))
        .await
        .unwrap();
    let convs = from.conversations().await.unwrap();
    assert_eq!(to.conversations().await.unwrap(), convs);
    for c in &convs {
        let messages = from.all_messages(c.id).await.unwrap();
        assert_eq!(to.all_messages(c.id).await.unwrap(), messages);
        for m in &messages {
            assert_eq!(
                to.restart_notice(m.id).await.unwrap(),
                from.restart_notice(m.id).await.unwrap(),
                "the notice of message {}",
                m.id
            );
        }
    }
    let noticed = convs
        .iter()
        .find(|c| c.key.platform == Platform::Discord)
        .unwrap();
    let last = to.all_messages(noticed.id).await.unwrap();
    assert_eq!(
        to.restart_notice(last.last().unwrap().id).await.unwrap(),
        Some(synthia_bot::memory::NoticeStatus::Sent),
        "the restart notice came across"
    );

    // Run again: nothing to do. Lose one conversation in the target (as if the copy had been
    // interrupted before it): only that one is copied.
    let out = stdout_of(&migrate(dir.path(), &sqlite, &postgres).await);
    assert!(
        out.contains("copied 0 conversations (3 were already there)"),
        "{out}"
    );
    to.forget(&convs[1]).await.unwrap();
    let out = stdout_of(&migrate(dir.path(), &sqlite, &postgres).await);
    assert!(
        out.contains("copied 1 conversations (2 were already there)"),
        "{out}"
    );
    assert_eq!(export(dir.path(), &postgres).await, before);

    // The copied memory goes on: new rows get ids past the copied ones, old ids stay claimed.
    let guild = to
        .find_conversation(&ConversationKey::new(Platform::Discord, "g1", "c1", ""))
        .await
        .unwrap()
        .unwrap();
    assert!(to.is_known(Platform::Discord, "d0").await.unwrap());
    let Appended::New(id) = to
        .append_user(&guild, &turn("new on postgres", Some("d10")))
        .await
        .unwrap()
    else {
        panic!("new")
    };
    let max_copied = from.counts().await.unwrap().messages as i64;
    assert!(id > max_copied, "{id} after {max_copied} copied messages");
    let fresh = to
        .conversation(&ConversationKey::console("new"))
        .await
        .unwrap();
    assert!(fresh.id > convs.last().unwrap().id);

    // The target now differs from the source: a further run says so and fails.
    to.forget(&fresh).await.unwrap();
    let out = migrate(dir.path(), &sqlite, &postgres).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has 6 messages in the target and 5 in the source"),
        "{err}"
    );
    from.close().await;
    to.close().await;
}

#[tokio::test]
async fn bad_databases_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sqlite").display().to_string();
    let out = migrate(dir.path(), &missing, "postgres://u:secret@127.0.0.1:1/db").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such file"), "{err}");
    assert!(
        !Path::new(&missing).exists(),
        "the missing source was not created"
    );

    let sqlite = dir.path().join("a.sqlite").display().to_string();
    Store::open(&sqlite, Duration::from_secs(5))
        .await
        .unwrap()
        .close()
        .await;
    let out = migrate(dir.path(), &sqlite, "mysql://u:p@h/db").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`mysql://`"), "{err}");

    // An unreachable server is named without its password.
    let out = migrate(dir.path(), &sqlite, "postgres://u:secret@127.0.0.1:1/db").await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://u:***@127.0.0.1:1/db"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}
