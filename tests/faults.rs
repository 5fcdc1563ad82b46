//! Memory that fails under the bot: another process holding SQLite's write lock, and a disk that
//! fills up. The core, the real worker on a tiny model and real SQLite files (the full disk is a
//! small tmpfs mounted for the test, so the test needs root, as CI runs it).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Call, Recorder};
use sqlx::Connection;
use synthia_bot::chat::{Author, ConversationKey, Incoming, Platform, Request};
use synthia_bot::config::Settings;
use synthia_bot::core::{Assistant, Outcome, text};
use synthia_bot::inference::WorkerOptions;
use synthia_bot::memory::Store;

fn key() -> ConversationKey {
    ConversationKey::new(Platform::Discord, "g1", "c1", "")
}

fn message(text: &str, id: &str) -> Incoming {
    let mut m = Incoming::question(
        key(),
        Author {
            id: "u1".into(),
            name: "u1-name".into(),
            roles: vec![],
        },
        text,
    );
    m.message_id = Some(id.into());
    m
}

async fn assistant(database: &Path, busy_timeout: Duration) -> (Arc<Assistant>, Store) {
    let mut settings = Settings::default();
    settings.model.max_new_tokens = 6;
    settings.sampling.temperature = 0.0;
    settings.memory.database = database.display().to_string();
    let store = Store::open(&settings.memory.database, busy_timeout)
        .await
        .unwrap();
    let worker = common::tiny_worker(WorkerOptions::default());
    (
        Arc::new(Assistant::new(store.clone(), worker, &settings)),
        store,
    )
}

fn answered(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Answered { .. })
}

/// A second connection, as another process would open it, holding the write lock.
async fn hold_write_lock(database: &Path) -> sqlx::SqliteConnection {
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", database.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_elsewhere_is_waited_out_then_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("locked.sqlite");
    let (assistant, store) = assistant(&database, Duration::from_millis(200)).await;
    assert!(answered(
        &assistant
            .handle(message("first", "l0"), &Recorder::default())
            .await
    ));

    // Held for 700 ms, well past the 200 ms busy timeout: retried, then answered.
    let mut holder = hold_write_lock(&database).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        holder
    });
    let sink = Recorder::default();
    let outcome = assistant.handle(message("second", "l1"), &sink).await;
    assert!(answered(&outcome), "{outcome:?} {:?}", sink.calls());
    drop(release.await.unwrap());

    // Held for good: a clear refusal within a few seconds, nothing stored, no crash.
    let mut holder = hold_write_lock(&database).await;
    let started = Instant::now();
    let sink = Recorder::default();
    let outcome = assistant.handle(message("third", "l2"), &sink).await;
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(
        sink.calls().last(),
        Some(&Call::Fail(text::STORAGE_FAILED.into()))
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!store.is_known(Platform::Discord, "l2").await.unwrap());

    // Released: the same message (a platform's retry, or the user again) is answered.
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let outcome = assistant
        .handle(message("third", "l2"), &Recorder::default())
        .await;
    assert!(answered(&outcome), "{outcome:?}");
    assert_integrity(&database).await;
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs to fill it and needs root (as CI runs it): {status:?}"
        );
        Self { path, _dir: dir }
    }

    /// Writes `filler` until the file system has no block left.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0x5a_u8; 4096];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        let _ = f.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// SQLite's own check of the file, from a connection of its own.
async fn assert_integrity(database: &Path) {
    let mut c = sqlx::SqliteConnection::connect(&format!("sqlite://{}", database.display()))
        .await
        .unwrap();
    let (report,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(report, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_a_clear_reply_serves_what_it_can_and_recovers() {
    let disk = SmallDisk::mount("2m");
    let database = disk.path.join("memory.sqlite");
    let (assistant, store) = assistant(&database, Duration::from_secs(1)).await;
    assert!(answered(
        &assistant
            .handle(message("before the disk fills", "d0"), &Recorder::default())
            .await
    ));

    let filler = disk.fill();
    // A remembered question cannot be stored: the user is told, nothing is answered.
    let sink = Recorder::default();
    let outcome = assistant
        .handle(message(&"a question to remember ".repeat(40), "d1"), &sink)
        .await;
    assert_eq!(outcome, Outcome::Failed, "{:?}", sink.calls());
    assert_eq!(
        sink.calls().last(),
        Some(&Call::Fail(text::STORAGE_FAILED.into()))
    );
    assert!(!sink.calls().iter().any(|c| matches!(c, Call::Update(_))));
    // What needs no writing still works: help, and a question asked not to be remembered.
    let help = Recorder::default();
    let mut cmd = message("help", "d2");
    cmd.message_id = None;
    cmd.request = Request::from_command_text("help");
    assert_eq!(assistant.handle(cmd, &help).await, Outcome::Command);
    assert_eq!(help.calls().last(), Some(&Call::Notice(text::HELP.into())));
    let mut private = message("answer without remembering", "d3");
    private.message_id = None;
    private.remember = false;
    let sink = Recorder::default();
    let outcome = assistant.handle(private, &sink).await;
    assert!(answered(&outcome), "{outcome:?} {:?}", sink.calls());

    // Space again: the next question is answered, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let sink = Recorder::default();
    let outcome = assistant
        .handle(message("after the disk has room again", "d4"), &sink)
        .await;
    assert!(answered(&outcome), "{outcome:?} {:?}", sink.calls());
    assert!(!store.is_known(Platform::Discord, "d1").await.unwrap());
    assert!(store.is_known(Platform::Discord, "d4").await.unwrap());
    assert_integrity(&database).await;
    // Every stored question has at most one reply, and every reply a question.
    let conv = store.conversation(&key()).await.unwrap();
    let history = store.all_messages(conv.id).await.unwrap();
    let questions = history
        .iter()
        .filter(|m| m.role == synthia_bot::chat::Role::User)
        .count();
    let replies = history.len() - questions;
    assert_eq!((questions, replies), (2, 2), "{history:?}");
    drop(assistant);
    store.close().await;
}
