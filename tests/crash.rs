//! Crash and restart lose nothing accepted: `serve` as a child process against the fake Discord
//! (and, for the crash loop, the Synapse from `scripts/with-synapse`). A question stored without
//! a reply is answered after the restart, once, on its platform; one too old to answer gets one
//! restart notice; `serve` killed with SIGKILL at random moments while replies stream leaves a
//! database that opens, no reply marked complete that is not whole, and in the end every accepted
//! question with exactly one answer or one notice, on the platform and in the store.

mod common;
mod fake_discord;
mod synapse;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, eventually};
use fake_discord::{CHANNEL, FakeDiscord, GUILD};
use synthia_bot::chat::{ConversationKey, Platform, Role};
use synthia_bot::core::text;
use synthia_bot::memory::{NewUserTurn, Status, Store};

const WAIT: Duration = Duration::from_secs(90);
const DISCORD_TOKEN: &str = "discord-crash-token";

/// `serve` with the tiny model and a database in `dir`, Discord on the fake.
fn serve(dir: &Path, fake: &FakeDiscord) -> tokio::process::Command {
    serve_writing(dir, fake, "24")
}

/// The same, with replies of up to `max_new` tokens.
fn serve_writing(dir: &Path, fake: &FakeDiscord, max_new: &str) -> tokio::process::Command {
    let mut c = common::daemon::serve_command(dir, max_new, "10");
    c.env("SYNTHIA_BOT__LIMITS__USER_PER_MINUTE", "0")
        .env("SYNTHIA_BOT__LIMITS__CONVERSATION_PER_MINUTE", "0")
        .env("SYNTHIA_BOT__DISCORD__ENABLED", "true")
        .env("SYNTHIA_BOT__DISCORD__TOKEN", DISCORD_TOKEN)
        .env("SYNTHIA_BOT__DISCORD__API_BASE", fake.api_base())
        .env("SYNTHIA_BOT__DISCORD__EDIT_INTERVAL_MS", "100");
    c
}

async fn open_store(dir: &Path) -> Store {
    Store::open(
        &dir.join("bot.sqlite").display().to_string(),
        Duration::from_secs(5),
    )
    .await
    .expect("the database opens")
}

/// A second connection straight to the file, for what the store's API does not show (moving a
/// question back in time, the restart notices' table).
async fn raw(dir: &Path) -> sqlx::SqlitePool {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("bot.sqlite"))
        .busy_timeout(Duration::from_secs(5));
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap()
}

fn discord_key() -> ConversationKey {
    ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    )
}

/// One bot message on the fake Discord: the question it replies to and every text it showed.
#[derive(Debug, Clone)]
struct Shown {
    replies_to: Option<String>,
    texts: Vec<String>,
}

impl Shown {
    fn final_text(&self) -> &str {
        self.texts.last().map(String::as_str).unwrap_or("")
    }
}

/// Every message the bot posted on the fake Discord, with its edits, in posting order.
fn discord_shown(fake: &FakeDiscord) -> Vec<Shown> {
    let mut out: Vec<(String, Shown)> = Vec::new();
    for c in fake.calls() {
        if c.status != 200 || !c.path.starts_with("/api/v10/channels/") {
            continue;
        }
        let content = c.body["content"].as_str().unwrap_or("").to_string();
        match c.method.as_str() {
            "POST" if c.path.ends_with("/messages") => {
                let Some(id) = c.message_id.clone() else {
                    continue;
                };
                out.push((
                    id,
                    Shown {
                        replies_to: c.body["message_reference"]["message_id"]
                            .as_str()
                            .map(str::to_string),
                        texts: vec![content],
                    },
                ));
            }
            "PATCH" => {
                let id = c.path.rsplit('/').next().unwrap_or("");
                if let Some((_, s)) = out.iter_mut().find(|(i, _)| i == id) {
                    s.texts.push(content);
                }
            }
            _ => {}
        }
    }
    out.into_iter().map(|(_, s)| s).collect()
}

/// The stored replies to the question with this platform id.
async fn replies_to(
    store: &Store,
    key: &ConversationKey,
    platform_id: &str,
) -> Vec<(i64, String, Status)> {
    let Ok(Some(conv)) = store.find_conversation(key).await else {
        return Vec::new();
    };
    let messages = store.all_messages(conv.id).await.unwrap();
    let Some(q) = messages
        .iter()
        .find(|m| m.platform_message_id.as_deref() == Some(platform_id))
    else {
        return Vec::new();
    };
    messages
        .iter()
        .filter(|m| m.role == Role::Assistant && m.reply_to == Some(q.id))
        .map(|a| (a.id, a.content.clone(), a.status))
        .collect()
}

/// Whether the question's restart notice is recorded, and how far ('claimed', 'sent').
async fn notice_status(pool: &sqlx::SqlitePool, platform_id: &str) -> Option<String> {
    sqlx::query_scalar(
        "SELECT n.status FROM restart_notices n JOIN messages m ON m.id = n.question_id
         WHERE m.platform_message_id = ?",
    )
    .bind(platform_id)
    .fetch_optional(pool)
    .await
    .expect("the restart notices' table")
}

/// Questions stored by an earlier run that died before answering: the two recent ones are
/// answered after the restart, in order, once, as replies on Discord, and stored; one an hour
/// old gets one restart notice; one two days old and one already answered are left alone. A
/// second restart posts nothing and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_left_unanswered_are_taken_up_once_after_a_restart() {
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = discord_key();
    {
        let store = open_store(dir.path()).await;
        let conv = store.conversation(&key).await.unwrap();
        for (id, text) in [
            ("7001", "two days ago: what is a comet?"),
            ("7002", "an hour ago: what is a planet?"),
            ("7003", "already answered: what is a moon?"),
            ("7004", "just now: what is a star?"),
            ("7005", "just now too: and a galaxy?"),
        ] {
            store
                .append_user(
                    &conv,
                    &NewUserTurn {
                        author_id: "5001",
                        author_name: "alice",
                        content: text,
                        platform_message_id: Some(id),
                    },
                )
                .await
                .unwrap();
        }
        let answered = store.all_messages(conv.id).await.unwrap()[2].id;
        store
            .append_assistant(
                &conv,
                Some(answered),
                "A moon orbits a planet.",
                Status::Complete,
                None,
            )
            .await
            .unwrap();
        store.close().await;
        let pool = raw(dir.path()).await;
        let now = chrono::Utc::now().timestamp_millis();
        for (id, age_ms) in [("7001", 2 * 24 * 3600 * 1000), ("7002", 3600 * 1000)] {
            sqlx::query("UPDATE messages SET created_at = ? WHERE platform_message_id = ?")
                .bind(now - age_ms)
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
        pool.close().await;
    }

    let daemon = Daemon::spawn(serve(dir.path(), &fake));
    fake.wait_ready().await;
    let store = open_store(dir.path()).await;
    for id in ["7004", "7005"] {
        eventually(&format!("a stored reply to {id}"), WAIT, || async {
            let r = replies_to(&store, &key, id).await;
            (!r.is_empty()).then_some(())
        })
        .await;
    }
    eventually("the restart notice on Discord", WAIT, || async {
        discord_shown(&fake)
            .iter()
            .any(|s| s.replies_to.as_deref() == Some("7002") && s.final_text() == text::RESTARTED)
            .then_some(())
    })
    .await;
    let first = replies_to(&store, &key, "7004").await;
    let second = replies_to(&store, &key, "7005").await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(
        first[0].0 < second[0].0,
        "answered in order: {first:?} {second:?}"
    );
    // What Discord shows: each recent question answered by one reply carrying the stored text.
    let settle = || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        discord_shown(&fake)
    };
    let shown = settle().await;
    for (id, stored) in [("7004", &first[0].1), ("7005", &second[0].1)] {
        let to: Vec<&Shown> = shown
            .iter()
            .filter(|s| s.replies_to.as_deref() == Some(id))
            .collect();
        assert_eq!(to.len(), 1, "one reply to {id}: {shown:?}");
        assert_eq!(to[0].final_text(), stored.as_str(), "{id}: {shown:?}");
    }
    let to = |id: &str| {
        shown
            .iter()
            .filter(|s| s.replies_to.as_deref() == Some(id))
            .count()
    };
    assert_eq!(to("7002"), 1, "one restart notice: {shown:?}");
    assert_eq!(
        to("7001"),
        0,
        "a question two days old is left alone: {shown:?}"
    );
    assert_eq!(
        to("7003"),
        0,
        "an answered question is not answered again: {shown:?}"
    );
    assert!(
        replies_to(&store, &key, "7002").await.is_empty(),
        "a notice is no answer"
    );
    assert!(replies_to(&store, &key, "7001").await.is_empty());
    assert_eq!(replies_to(&store, &key, "7003").await.len(), 1);
    let pool = raw(dir.path()).await;
    assert_eq!(notice_status(&pool, "7002").await.as_deref(), Some("sent"));
    assert_eq!(notice_status(&pool, "7001").await, None);
    // Export and prompts pair questions with messages only: the notice is in neither.
    let conv = store.find_conversation(&key).await.unwrap().unwrap();
    let exchanges = store.exchanges(&conv).await.unwrap();
    let planet = exchanges
        .iter()
        .find(|e| e.prompt.contains("planet"))
        .expect("the noticed question is exported");
    assert_eq!(planet.answer, None, "{planet:?}");
    daemon.stop().await;

    // A second restart finds nothing to take up.
    let posted_before = discord_shown(&fake).len();
    let stored_before = store.all_messages(conv.id).await.unwrap().len();
    let daemon = Daemon::spawn(serve(dir.path(), &fake));
    daemon.wait_log("connected to Discord", WAIT).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = daemon.stop().await;
    assert_eq!(
        discord_shown(&fake).len(),
        posted_before,
        "nothing posted after the second restart:\n{log}"
    );
    assert_eq!(
        store.all_messages(conv.id).await.unwrap().len(),
        stored_before,
        "nothing stored after the second restart"
    );
    assert_eq!(notice_status(&pool, "7002").await.as_deref(), Some("sent"));
}

/// Where the store says the answer to the question with this platform id is shown: `None`
/// once shown whole (or never recorded).
async fn shown_in(pool: &sqlx::SqlitePool, platform_id: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>(
        "SELECT shown_in FROM messages WHERE platform_message_id = ?",
    )
    .bind(platform_id)
    .fetch_optional(pool)
    .await
    .expect("the messages' table")
    .flatten()
}

/// A mention of the bot in the test channel.
fn ask(fake: &FakeDiscord, id: u64, text: &str) {
    let bot = fake_discord::BOT_ID;
    fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            id,
            CHANNEL,
            Some(GUILD),
            (5001, "alice"),
            &format!("<@{bot}> {text}"),
            &[bot],
            None,
        ),
    );
}

/// Killed while an answer was half shown, or stored but not yet shown whole: after the restart
/// each finishes in the message the killed run posted, showing the stored text, with no second
/// message and no second answer. Before answers recorded where they are shown, the first was
/// answered again in a new message under the half-written one, and the second stayed half
/// shown for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cut_off_by_a_kill_finish_in_their_own_message_after_the_restart() {
    use fake_discord::EditFailure;
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = discord_key();
    let store = open_store(dir.path()).await;
    let pool = raw(dir.path()).await;
    let bot_messages_to = |id: &str| -> Vec<Shown> {
        discord_shown(&fake)
            .into_iter()
            .filter(|s| s.replies_to.as_deref() == Some(id))
            .collect()
    };

    // 1. Half shown: the first part is posted, then an edit hangs, holding the reply before it
    // is stored; the process dies there.
    let mut daemon = Daemon::spawn(serve_writing(dir.path(), &fake, "200"));
    fake.wait_ready().await;
    fake.fail_edits_with(vec![EditFailure::Hang { seconds: 30.0 }; 4]);
    ask(&fake, 8001, "tell me about stars");
    let recorded = eventually("the first part's message recorded", WAIT, || async {
        shown_in(&pool, "8001").await.filter(|s| !s.is_empty())
    })
    .await;
    daemon.sigkill().await;
    assert!(
        replies_to(&store, &key, "8001").await.is_empty(),
        "killed before the reply was stored"
    );
    let first_post = bot_messages_to("8001");
    assert_eq!(first_post.len(), 1, "{first_post:?}");
    fake.clear_edit_failures();
    let daemon = Daemon::spawn(serve_writing(dir.path(), &fake, "200"));
    fake.wait_ready().await;
    let answer = eventually("the answer after the restart", WAIT, || async {
        let r = replies_to(&store, &key, "8001").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(answer.len(), 1, "{answer:?}");
    eventually("the answer shown whole", WAIT, || async {
        shown_in(&pool, "8001").await.is_none().then_some(())
    })
    .await;
    let shown = bot_messages_to("8001");
    assert_eq!(
        shown.len(),
        1,
        "one message, edited over (recorded {recorded:?}): {shown:?}\n{}",
        daemon.log()
    );
    assert_eq!(shown[0].final_text(), answer[0].1, "{shown:?}");

    // 2. Stored but not shown whole: every edit is refused for a minute, so the final text
    // waits; the process dies once the reply is stored.
    fake.fail_edits_with(vec![EditFailure::RateLimited { retry_after: 60.0 }; 64]);
    let mut daemon = daemon;
    ask(&fake, 8002, "and about planets?");
    let stored = eventually("the second reply stored", WAIT, || async {
        let r = replies_to(&store, &key, "8002").await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    daemon.sigkill().await;
    let before = bot_messages_to("8002");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_ne!(
        before[0].final_text(),
        stored[0].1,
        "the kill came before the final text showed"
    );
    assert!(shown_in(&pool, "8002").await.is_some());
    fake.clear_edit_failures();
    let daemon = Daemon::spawn(serve_writing(dir.path(), &fake, "200"));
    fake.wait_ready().await;
    eventually("the stored reply shown whole", WAIT, || async {
        shown_in(&pool, "8002").await.is_none().then_some(())
    })
    .await;
    let log = daemon.stop().await;
    let shown = bot_messages_to("8002");
    assert_eq!(shown.len(), 1, "no second message: {shown:?}\n{log}");
    assert_eq!(shown[0].final_text(), stored[0].1, "{shown:?}\n{log}");
    assert_eq!(
        replies_to(&store, &key, "8002").await,
        stored,
        "not answered again"
    );
    assert_eq!(bot_messages_to("8001").len(), 1);
    pool.close().await;
    store.close().await;
}

/// What one accepted question ended with, in the store and on its platform.
#[derive(Debug, Default)]
struct Tally {
    questions: usize,
    answers: usize,
    notices: usize,
    notices_claimed_not_sent: usize,
    /// Bot messages left showing part of a reply when the process was killed.
    interrupted_messages: usize,
    /// Answers stored before the kill whose final edit never reached the platform.
    stored_but_shown_in_part: usize,
    unanswered: Vec<String>,
}

/// After a kill: the file opens (migrations run again), SQLite finds it sound, every reply
/// points at a question and no question has two replies or a reply and a notice.
async fn check_store_after_kill(dir: &Path) {
    let store = open_store(dir).await;
    store.close().await;
    let pool = raw(dir).await;
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
    let orphans: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages a WHERE a.role = 'assistant'
         AND NOT EXISTS (SELECT 1 FROM messages q WHERE q.id = a.reply_to AND q.role = 'user')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "every stored reply answers a stored question");
    let doubled: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages q WHERE q.role = 'user' AND
           (SELECT COUNT(*) FROM messages a WHERE a.reply_to = q.id)
         + (SELECT COUNT(*) FROM restart_notices n WHERE n.question_id = q.id) > 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        doubled, 0,
        "no question answered twice or answered and noticed"
    );
    pool.close().await;
}

/// Every stored question with how many replies and whether a notice is recorded.
async fn outcomes(
    pool: &sqlx::SqlitePool,
) -> Vec<(String, String, Vec<(String, String)>, Option<String>)> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT m.id, c.platform, m.platform_message_id FROM messages m
         JOIN conversations c ON c.id = m.conversation_id WHERE m.role = 'user' ORDER BY m.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = Vec::new();
    for (id, platform, platform_id) in rows {
        let replies: Vec<(String, String)> =
            sqlx::query_as("SELECT content, status FROM messages WHERE reply_to = ? ORDER BY id")
                .bind(id)
                .fetch_all(pool)
                .await
                .unwrap();
        let notice: Option<String> =
            sqlx::query_scalar("SELECT status FROM restart_notices WHERE question_id = ?")
                .bind(id)
                .fetch_optional(pool)
                .await
                .unwrap();
        out.push((platform, platform_id, replies, notice));
    }
    out
}

/// Whether every stored question has its one reply or notice.
async fn all_taken_up(pool: &sqlx::SqlitePool) -> bool {
    let left: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages q WHERE q.role = 'user'
         AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = q.id)
         AND NOT EXISTS (SELECT 1 FROM restart_notices n WHERE n.question_id = q.id)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    left == 0
}

/// `serve` on both platforms is killed with SIGKILL 20 times at seeded random moments while
/// questions arrive on both without pause and replies stream. After each kill the database
/// opens and is sound; at the end every accepted (stored) question has exactly one answer or one
/// restart notice in the store, and the platforms show at most one finished answer or notice
/// for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress: minutes of SIGKILLs on both platforms; run by scripts/stress"]
async fn crash_loop_loses_nothing_and_answers_nothing_twice() {
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let seed: u64 = std::env::var("SYNTHIA_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    let kills: usize = std::env::var("SYNTHIA_STRESS_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let synapse = synapse::Synapse::from_env();
    let fake = FakeDiscord::start().await;
    let alice = synapse.human("alice").await;
    let (bot_user, bot_password) = synapse.register("synthia").await;
    let dir = tempfile::tempdir().unwrap();
    let matrix_store = dir.path().join("matrix");
    let command = || {
        let mut c = serve(dir.path(), &fake);
        c.env("SYNTHIA_BOT__MATRIX__ENABLED", "true")
            .env("SYNTHIA_BOT__MATRIX__HOMESERVER", &synapse.url)
            .env("SYNTHIA_BOT__MATRIX__USER_ID", bot_user.as_str())
            .env("SYNTHIA_BOT__MATRIX__PASSWORD", &bot_password)
            .env("SYNTHIA_BOT__MATRIX__STORE_PATH", &matrix_store)
            .env("SYNTHIA_BOT__MATRIX__EDIT_INTERVAL_MS", "250")
            .env(
                "SYNTHIA_BOT__MATRIX__ACCESS__ALLOWED_USERS",
                alice.user_id.as_str(),
            )
            // Short, so questions kept waiting across several kills age into restart notices.
            .env("SYNTHIA_BOT__SERVICE__RESUME_WINDOW", "20");
        c
    };
    let mut daemon = Daemon::spawn(command());
    daemon.wait_log("serving", WAIT).await;
    fake.wait_ready().await;
    let room = alice.create_room(&[&bot_user], false, false).await;
    let room_id = room.room_id().to_owned();
    alice.wait_joined(&room_id, &bot_user, WAIT).await;

    // Questions on both platforms without pause, across the kills.
    let sending = Arc::new(AtomicBool::new(true));
    let discord_sender = {
        let (sending, fake) = (sending.clone(), &fake);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 1);
        let mut id = 10_000u64;
        let mut sent = 0usize;
        async move {
            while sending.load(Ordering::Acquire) {
                id += 1;
                let m = fake_discord::message(
                    id,
                    CHANNEL,
                    Some(GUILD),
                    (5001, "alice"),
                    &format!(
                        "<@{}> question {id}: tell me something",
                        fake_discord::BOT_ID
                    ),
                    &[fake_discord::BOT_ID],
                    None,
                );
                if fake.try_dispatch("MESSAGE_CREATE", m) {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
            }
            sent
        }
    };
    let matrix_sender = {
        let sending = sending.clone();
        let (alice, room, bot_user) = (&alice, &room, &bot_user);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 2);
        async move {
            let mut sent = 0usize;
            while sending.load(Ordering::Acquire) {
                sent += 1;
                alice
                    .send(
                        room,
                        &format!("question {sent}: tell me more"),
                        Some(bot_user),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
            }
            sent
        }
    };
    let killer = async {
        for k in 0..kills {
            tokio::time::sleep(Duration::from_millis(rng.random_range(1500..7000))).await;
            daemon.sigkill().await;
            check_store_after_kill(dir.path()).await;
            // Some restarts come at once, some after a pause; once the bot stays away past the
            // resume window, so what it had accepted gets restart notices.
            if k == kills / 2 {
                tokio::time::sleep(Duration::from_secs(22)).await;
            } else if k % 4 == 3 {
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
            }
            daemon = Daemon::spawn(command());
            daemon.wait_log("serving", WAIT).await;
        }
        sending.store(false, Ordering::Release);
    };
    let (discord_sent, matrix_sent, ()) = tokio::join!(discord_sender, matrix_sender, killer);

    // The last run takes up what the last kill left and answers what is still arriving.
    let pool = raw(dir.path()).await;
    eventually(
        "every stored question answered or noticed",
        Duration::from_secs(300),
        || async { all_taken_up(&pool).await.then_some(()) },
    )
    .await;
    // The last edits settle before anything is compared.
    tokio::time::sleep(Duration::from_secs(3)).await;
    daemon.stop().await;
    check_store_after_kill(dir.path()).await;

    let discord = discord_shown(&fake);
    let matrix = alice.replies_from(&room_id, &bot_user);
    let mut tally = Tally::default();
    let mut shown_finished: HashMap<String, usize> = HashMap::new();
    for (platform, platform_id, replies, notice) in outcomes(&pool).await {
        tally.questions += 1;
        let finished: Option<String> = match (&replies[..], &notice) {
            ([(content, status)], None) => {
                assert_eq!(status, "complete", "{platform_id}: {replies:?}");
                tally.answers += 1;
                Some(content.trim().to_string())
            }
            ([], Some(status)) => {
                tally.notices += 1;
                if status == "claimed" {
                    tally.notices_claimed_not_sent += 1;
                }
                Some(text::RESTARTED.to_string())
            }
            ([], None) => {
                tally.unanswered.push(platform_id.clone());
                None
            }
            _ => panic!("{platform_id} answered more than once: {replies:?} {notice:?}"),
        };
        let texts: Vec<Vec<String>> = if platform == "discord" {
            discord
                .iter()
                .filter(|s| s.replies_to.as_deref() == Some(platform_id.as_str()))
                .map(|s| s.texts.clone())
                .collect()
        } else {
            matrix
                .iter()
                .filter(|r| {
                    r.replies_to().as_ref().map(|e| e.as_str()) == Some(platform_id.as_str())
                })
                .map(|r| {
                    let mut t = vec![r.first_body.clone()];
                    t.extend(r.edits.iter().cloned());
                    t
                })
                .collect()
        };
        let Some(finished) = finished else { continue };
        let mut complete = 0;
        for t in &texts {
            let last = t.last().map(|s| s.trim().to_string()).unwrap_or_default();
            if last == finished {
                complete += 1;
            } else {
                tally.interrupted_messages += 1;
            }
            // A stored reply is whole: no message ever showed more of it than was stored.
            if finished != text::RESTARTED && !finished.is_empty() {
                for shown in t {
                    let shown = shown.trim();
                    assert!(
                        !(shown.len() > finished.len() && shown.starts_with(&finished)),
                        "{platform_id}: stored {finished:?} but the platform showed more: {shown:?}"
                    );
                }
            }
        }
        assert!(
            complete <= 1,
            "{platform_id} shown answered {complete} times: {texts:?}"
        );
        if complete == 0 {
            tally.stored_but_shown_in_part += 1;
        }
        *shown_finished.entry(platform).or_default() += complete;
    }
    eprintln!(
        "crash loop: seed {seed}, {kills} kills, sent {discord_sent} to Discord and {matrix_sent} to Matrix, {tally:?}, shown finished {shown_finished:?}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    assert!(tally.unanswered.is_empty(), "{tally:?}");
    // A stored reply cut off by a kill is shown whole by the next run, in its own message.
    assert_eq!(tally.stored_but_shown_in_part, 0, "{tally:?}");
    assert!(
        tally.questions > kills,
        "questions kept arriving: {tally:?}"
    );
    assert!(
        tally.answers > 0 && tally.notices > 0,
        "both outcomes happened: {tally:?}"
    );
}
