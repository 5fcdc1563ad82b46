//! Memory that fails under the bot: another process holding SQLite's write lock, a disk that
//! fills up and a disk that turns read-only. The core, the real worker on a tiny model and real
//! SQLite files (the full disk is a small tmpfs mounted for the test, the read-only one a FUSE
//! file system built from tests/fixtures/rofuse, so these tests need root, as CI runs them).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
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

/// A disk under the memory that stops taking writes for a while.
trait FailingDisk {
    /// The folder on that disk.
    fn path(&self) -> &Path;
    fn refuse_writes(&self);
    fn take_writes_again(&self);
}

/// A tmpfs of `size` mounted on a fresh folder, unmounted when dropped; it refuses writes by
/// being filled up.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let status = Command::new("mount")
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

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }
}

impl FailingDisk for SmallDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the filler until the file system has no block left.
    fn refuse_writes(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.filler()).unwrap();
        let block = vec![0x5a_u8; 4096];
        loop {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        let _ = f.sync_all();
    }

    fn take_writes_again(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// tests/fixtures/rofuse built for this test process (parallel processes build aside, then
/// rename into place).
fn rofuse() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rofuse/rofuse.c");
        let flags = Command::new("pkg-config")
            .args(["--cflags", "--libs", "fuse3"])
            .output();
        let flags = match flags {
            Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
            _ => panic!(
                "this test builds a FUSE file system and needs libfuse3 with pkg-config: install \
                 Debian's fuse3 and libfuse3-dev (scripts/test does so when run as root)"
            ),
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(dir).unwrap();
        let scratch = dir.join(format!(".rofuse.{}", std::process::id()));
        let out = Command::new("cc")
            .arg(&source)
            .args(flags.split_whitespace())
            .arg("-o")
            .arg(&scratch)
            .output()
            .expect("running cc");
        assert!(
            out.status.success(),
            "building {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = dir.join("rofuse");
        std::fs::rename(&scratch, &binary).unwrap();
        binary
    })
}

/// A fresh folder passed through rofuse, which refuses writes with EROFS while `read_only` (a
/// file of this disk's own) exists; files open on it stay open. Unmounted, and its process
/// ended, when dropped.
struct ReadOnlyDisk {
    path: PathBuf,
    read_only: PathBuf,
    log: PathBuf,
    process: Child,
    dir: tempfile::TempDir,
}

impl ReadOnlyDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (backing, path) = (dir.path().join("backing"), dir.path().join("disk"));
        std::fs::create_dir(&backing).unwrap();
        std::fs::create_dir(&path).unwrap();
        let log = dir.path().join("rofuse.log");
        let output = std::fs::File::create(&log).unwrap();
        let read_only = dir.path().join("read-only");
        // In the foreground, so that it is this process's child and ends by its PID.
        let process = Command::new(rofuse())
            .arg(&backing)
            .arg(&read_only)
            .arg(&path)
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .expect("starting rofuse");
        let mut disk = Self {
            path,
            read_only,
            log,
            process,
            dir,
        };
        disk.wait_until_mounted();
        disk
    }

    /// Mounted once the folder is on a device of its own.
    fn wait_until_mounted(&mut self) {
        let outside = std::fs::metadata(self.dir.path()).unwrap().dev();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&self.path).unwrap().dev() == outside {
            let exited = self.process.try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "rofuse did not mount {} (it needs root and /dev/fuse, as CI has; {exited:?}): {}",
                self.path.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn set_read_only(&self, read_only: bool) {
        if read_only {
            std::fs::write(&self.read_only, "").unwrap();
        } else {
            std::fs::remove_file(&self.read_only).unwrap();
        }
    }
}

impl FailingDisk for ReadOnlyDisk {
    fn path(&self) -> &Path {
        &self.path
    }

    fn refuse_writes(&self) {
        self.set_read_only(true);
    }

    fn take_writes_again(&self) {
        self.set_read_only(false);
    }
}

impl Drop for ReadOnlyDisk {
    fn drop(&mut self) {
        // Lazily if need be: a connection a failed test left open must not keep it mounted.
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        // Unmounted, rofuse exits by itself; it is killed only if it does not.
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.process.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
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

/// Whatever the reason the disk refuses writes: a question to be remembered gets a clear reply
/// and no answer, what needs no writing still works, and once the disk takes writes again so
/// does the bot, without a restart, its database intact.
async fn serves_what_it_can_while_writes_fail(disk: impl FailingDisk) {
    // The bot's errors, shown when the test fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn,synthia_bot=info")
        .try_init();
    let database = disk.path().join("memory.sqlite");
    let (assistant, store) = assistant(&database, Duration::from_secs(1)).await;
    assert!(answered(
        &assistant
            .handle(message("before the disk fails", "d0"), &Recorder::default())
            .await
    ));

    disk.refuse_writes();
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
    // Several messages at once, each first checked for a duplicate: side by side, these reads
    // open connections while the disk refuses writes, which must not keep refusing them later.
    let checks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.is_known(Platform::Discord, &format!("x{i}")).await })
        })
        .collect();
    for check in checks {
        assert!(!check.await.unwrap().unwrap());
    }

    // Writes again: the next questions are answered and stored, without a restart.
    disk.take_writes_again();
    for id in ["d4", "d5", "d6"] {
        let sink = Recorder::default();
        let outcome = assistant
            .handle(message("after the disk takes writes again", id), &sink)
            .await;
        assert!(answered(&outcome), "{id}: {outcome:?} {:?}", sink.calls());
        assert!(store.is_known(Platform::Discord, id).await.unwrap());
    }
    assert!(!store.is_known(Platform::Discord, "d1").await.unwrap());
    assert_integrity(&database).await;
    // Every stored question has at most one reply, and every reply a question.
    let conv = store.conversation(&key()).await.unwrap();
    let history = store.all_messages(conv.id).await.unwrap();
    let questions = history
        .iter()
        .filter(|m| m.role == synthia_bot::chat::Role::User)
        .count();
    let replies = history.len() - questions;
    assert_eq!((questions, replies), (4, 4), "{history:?}");
    drop(assistant);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gets_a_clear_reply_serves_what_it_can_and_recovers() {
    serves_what_it_can_while_writes_fail(SmallDisk::mount("2m")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_disk_gets_a_clear_reply_serves_what_it_can_and_recovers() {
    serves_what_it_can_while_writes_fail(ReadOnlyDisk::mount()).await;
}
