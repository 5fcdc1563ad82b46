//! The store against a real SQLite file.

use std::time::Duration;

use super::*;
use crate::chat::{ConversationKey, Platform, Role};

async fn open(dir: &tempfile::TempDir) -> Store {
    let path = dir.path().join("memory.sqlite");
    Store::open(path.to_str().unwrap(), Duration::from_secs(5))
        .await
        .unwrap()
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
    let dir = tempfile::tempdir().unwrap();
    let key = ConversationKey::new(Platform::Discord, "g1", "c1", "");
    {
        let store = open(&dir).await;
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
    // Second open runs the migrator against an already migrated file.
    let store = open(&dir).await;
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

#[tokio::test]
async fn duplicate_platform_ids_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn reset_hides_history_from_context_but_keeps_it_for_export() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn forget_deletes_for_real() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn edit_and_delete_by_platform_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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

#[tokio::test]
async fn settings_and_trim_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
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
    let other = store
        .conversation(&ConversationKey::console("other"))
        .await
        .unwrap();
    assert_eq!(other.settings, ConversationSettings::default());
}

/// A writer blocked past the busy timeout by another connection's lock gets an error the caller
/// may retry, told apart by SQLite's result code, not by the wording of its message.
#[tokio::test]
async fn a_held_write_lock_is_retryable() {
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

#[tokio::test]
async fn unanswered_questions_are_found_and_taken_up_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let key = ConversationKey::new(Platform::Matrix, "", "!room:example.org", "");
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
    let found = store.unanswered(Platform::Matrix, 0, until).await.unwrap();
    let ids: Vec<i64> = found.iter().map(|u| u.question.id).collect();
    assert_eq!(
        ids,
        vec![q1, q3],
        "answered and other platforms' questions are not pending"
    );
    assert_eq!(found[0].key, key);
    assert_eq!(found[0].question.platform_message_id.as_deref(), Some("$1"));
    assert!(
        store
            .unanswered(Platform::Matrix, until, until + 1000)
            .await
            .unwrap()
            .is_empty(),
        "the window bounds by acceptance time"
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
            .unanswered(Platform::Matrix, 0, until)
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
