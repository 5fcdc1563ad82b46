//! The Discord adapter end to end: the real serenity client against a protocol-level fake
//! Discord on 127.0.0.1, the real core, the tiny random model and a real SQLite file.

mod common;
mod fake_discord;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_discord::{BOT_ID, CHANNEL, Call, DM_CHANNEL, FakeDiscord, GUILD};
use serde_json::{Value, json};
use synthia_bot::adapters::discord::DiscordClient;
use synthia_bot::chat::{ConversationKey, Platform, Role};
use synthia_bot::config::Settings;
use synthia_bot::core::{Assistant, text};
use synthia_bot::inference::WorkerOptions;
use synthia_bot::memory::Store;

const ALICE: (u64, &str) = (5001, "alice");
const ADMIN: u64 = 5999;

struct Bot {
    fake: FakeDiscord,
    store: Store,
    task: tokio::task::JoinHandle<Result<(), synthia_bot::adapters::ConnectError>>,
    _dir: tempfile::TempDir,
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(edit: impl FnOnce(&mut Settings)) -> Bot {
    start_with(edit, |_| {}).await
}

/// `start`, with the fake prepared before the bot connects.
async fn start_with(edit: impl FnOnce(&mut Settings), prepare: impl FnOnce(&FakeDiscord)) -> Bot {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn,synthia_bot=info")
        .try_init();
    let fake = FakeDiscord::start().await;
    prepare(&fake);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.model.max_new_tokens = 40;
    settings.sampling.temperature = 0.0;
    settings.memory.database = dir.path().join("discord.sqlite").display().to_string();
    settings.discord.enabled = true;
    settings.discord.token = "fake-token".into();
    settings.discord.api_base = fake.api_base();
    settings.discord.access.admins = vec![ADMIN.to_string()];
    edit(&mut settings);
    let store = Store::open(&settings.memory.database, Duration::from_secs(5))
        .await
        .unwrap();
    let worker = common::tiny_worker(WorkerOptions::default());
    let assistant = Arc::new(Assistant::new(store.clone(), worker, &settings));
    let client = DiscordClient::connect(&settings.discord, assistant)
        .await
        .unwrap();
    let task = tokio::spawn(client.run(tokio::sync::watch::channel(false).1));
    fake.wait_ready().await;
    Bot {
        fake,
        store,
        task,
        _dir: dir,
    }
}

fn channel_key() -> ConversationKey {
    ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    )
}

async fn stored_reply_to(store: &Store, key: &ConversationKey, question: &str) -> Option<String> {
    let conv = store.find_conversation(key).await.unwrap()?;
    let msgs = store.since_reset(&conv).await.unwrap();
    let q = msgs
        .iter()
        .find(|m| m.platform_message_id.as_deref() == Some(question))?;
    msgs.iter()
        .find(|m| m.role == Role::Assistant && m.reply_to == Some(q.id))
        .map(|m| m.content.clone())
}

async fn wait_reply(store: &Store, key: &ConversationKey, question: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = stored_reply_to(store, key, question).await {
            return r;
        }
        assert!(Instant::now() < deadline, "no reply stored for {question}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn content(c: &Call) -> String {
    c.body["content"].as_str().unwrap_or_default().to_string()
}

fn mention(id: u64, text: &str) -> Value {
    fake_discord::message(
        id,
        CHANNEL,
        Some(GUILD),
        ALICE,
        &format!("<@{BOT_ID}> {text}"),
        &[BOT_ID],
        None,
    )
}

/// The text Discord shows for a reply: the last content of each of its messages, in order.
fn shown_text(calls: &[Call], channel: u64) -> Vec<String> {
    let posts: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == "POST" && c.path == format!("/api/v10/channels/{channel}/messages"))
        .collect();
    posts
        .iter()
        .enumerate()
        .map(|(i, _)| {
            // Fake ids are handed out in order from 900000.
            let id = 900_000 + i as u64;
            calls
                .iter()
                .rev()
                .find(|c| {
                    c.status == 200
                        && c.method == "PATCH"
                        && c.path.ends_with(&format!("/messages/{id}"))
                })
                .map(content)
                .unwrap_or_else(|| content(posts[i]))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mention_gets_typing_a_streamed_reply_and_the_stored_text() {
    let bot = start(|_| {}).await;
    let t0 = Instant::now();
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7001, "hello there"));
    let stored = wait_reply(&bot.store, &channel_key(), "7001").await;
    let calls = bot
        .fake
        .wait_for("the final edit", |c| {
            shown_text(c, CHANNEL).concat() == stored
        })
        .await;
    let typing = calls
        .iter()
        .position(|c| c.path == format!("/api/v10/channels/{CHANNEL}/typing"))
        .expect("typing");
    let first_post = calls
        .iter()
        .position(|c| c.method == "POST" && c.path.ends_with("/messages"))
        .expect("a reply");
    assert!(typing < first_post, "typing comes first");
    let post = &calls[first_post];
    assert_eq!(post.body["message_reference"]["message_id"], json!("7001"));
    assert_eq!(
        post.body["allowed_mentions"]["parse"],
        json!([]),
        "{}",
        post.body
    );
    let edits: Vec<&Call> = calls.iter().filter(|c| c.method == "PATCH").collect();
    assert!(!edits.is_empty(), "streamed by editing");
    for e in &edits {
        assert_eq!(e.body["allowed_mentions"]["parse"], json!([]));
    }
    // At most one edit per second per message.
    let mut times: Vec<Instant> = vec![post.at];
    times.extend(edits.iter().map(|e| e.at));
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(990),
            "edits {:?} apart",
            w[1] - w[0]
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
    // The question is stored without the bot's mention.
    let conv = bot
        .store
        .find_conversation(&channel_key())
        .await
        .unwrap()
        .unwrap();
    let q = &bot.store.since_reset(&conv).await.unwrap()[0];
    assert_eq!(q.content, "hello there");
    assert_eq!(q.author_name.as_deref(), Some("alice"));
}

/// serenity runs event handlers concurrently, so messages in the same burst as READY can be
/// handled before the ready handler (about one start in six); the fake sends them just ahead of
/// READY to make that certain. The bot must know its own id before the gateway connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_in_the_ready_burst_are_answered() {
    let ids: Vec<u64> = (7050..7058).collect();
    let bot = start_with(
        |_| {},
        |fake| {
            fake.send_with_ready(
                ids.iter()
                    .map(|id| ("MESSAGE_CREATE".to_string(), mention(*id, "early bird")))
                    .collect(),
            )
        },
    )
    .await;
    for id in &ids {
        let stored = wait_reply(&bot.store, &channel_key(), &id.to_string()).await;
        assert!(!stored.is_empty(), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_continues_in_new_messages() {
    let bot = start(|s| s.model.max_new_tokens = 1800).await;
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7101, "tell me everything"));
    let stored = wait_reply(&bot.store, &channel_key(), "7101").await;
    assert!(
        stored.chars().count() >= 5000,
        "a long answer: {} chars",
        stored.chars().count()
    );
    let calls = bot
        .fake
        .wait_for("all parts shown", |c| {
            let shown = shown_text(c, CHANNEL);
            shown.len() >= 3
                && shown.concat().split_whitespace().collect::<String>()
                    == stored.split_whitespace().collect::<String>()
        })
        .await;
    for part in shown_text(&calls, CHANNEL) {
        assert!(part.chars().count() <= 2000);
        assert_eq!(part.matches("```").count() % 2, 0, "no code fence broken");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slash_ask_is_deferred_then_edits_the_original_response() {
    let bot = start(|_| {}).await;
    let sent = Instant::now();
    bot.fake.dispatch(
        "INTERACTION_CREATE",
        fake_discord::interaction(
            8001,
            "ask",
            json!([{ "name": "prompt", "type": 3, "value": "What is Rust?" }]),
            ALICE,
        ),
    );
    let calls = bot
        .fake
        .wait_for("the deferral", |c| {
            c.iter()
                .any(|c| c.path == "/api/v10/interactions/8001/token-8001/callback")
        })
        .await;
    let defer = calls
        .iter()
        .find(|c| c.path.ends_with("/callback"))
        .unwrap();
    assert_eq!(defer.body["type"], json!(5));
    assert!(
        defer.at - sent < Duration::from_secs(3),
        "deferred within Discord's 3 s"
    );
    let stored = wait_reply(&bot.store, &channel_key(), "interaction-8001").await;
    let original = format!(
        "/api/v10/webhooks/{}/token-8001/messages/@original",
        fake_discord::APP_ID
    );
    let calls = bot
        .fake
        .wait_for("the final @original edit", |c| {
            c.iter()
                .rev()
                .find(|c| c.path == original)
                .is_some_and(|c| content(c) == stored)
        })
        .await;
    assert!(
        calls.iter().filter(|c| c.path == original).count() >= 2,
        "streamed by editing @original"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ask_is_ephemeral_and_not_remembered() {
    let bot = start(|_| {}).await;
    bot.fake.dispatch(
        "INTERACTION_CREATE",
        fake_discord::interaction(
            8101,
            "ask",
            json!([{ "name": "prompt", "type": 3, "value": "a secret" }, { "name": "private", "type": 5, "value": true }]),
            ALICE,
        ),
    );
    let original = format!(
        "/api/v10/webhooks/{}/token-8101/messages/@original",
        fake_discord::APP_ID
    );
    let calls = bot
        .fake
        .wait_for("an answer", |c| c.iter().any(|c| c.path == original))
        .await;
    let defer = calls
        .iter()
        .find(|c| c.path.ends_with("/callback"))
        .unwrap();
    assert_eq!(defer.body["type"], json!(5));
    assert_eq!(
        defer.body["data"]["flags"],
        json!(64),
        "ephemeral: {}",
        defer.body
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conv = bot.store.find_conversation(&channel_key()).await.unwrap();
    let stored = match conv {
        Some(c) => bot.store.since_reset(&c).await.unwrap(),
        None => vec![],
    };
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_from_non_admins_are_refused_politely() {
    let bot = start(|_| {}).await;
    for (id, name, options) in [
        (8201u64, "reset", json!([])),
        (
            8202,
            "system",
            json!([{ "name": "text", "type": 3, "value": "be evil" }]),
        ),
    ] {
        bot.fake.dispatch(
            "INTERACTION_CREATE",
            fake_discord::interaction(id, name, options, ALICE),
        );
        let original = format!(
            "/api/v10/webhooks/{}/token-{id}/messages/@original",
            fake_discord::APP_ID
        );
        let calls = bot
            .fake
            .wait_for(name, |c| c.iter().any(|c| c.path == original))
            .await;
        let reply = calls.iter().find(|c| c.path == original).unwrap();
        assert_eq!(content(reply), text::NOT_ALLOWED);
    }
    // The message-command form too, and an admin may.
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(8301, CHANNEL, Some(GUILD), ALICE, "!reset", &[], None),
    );
    let calls = bot
        .fake
        .wait_for("!reset refusal", |c| {
            c.iter()
                .any(|c| c.body["message_reference"]["message_id"] == json!("8301"))
        })
        .await;
    let reply = calls
        .iter()
        .find(|c| c.body["message_reference"]["message_id"] == json!("8301"))
        .unwrap();
    assert_eq!(content(reply), text::NOT_ALLOWED);
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            8302,
            CHANNEL,
            Some(GUILD),
            (ADMIN, "boss"),
            "!system Be brief.",
            &[],
            None,
        ),
    );
    let calls = bot
        .fake
        .wait_for("admin !system", |c| {
            c.iter()
                .any(|c| c.body["message_reference"]["message_id"] == json!("8302"))
        })
        .await;
    let reply = calls
        .iter()
        .find(|c| c.body["message_reference"]["message_id"] == json!("8302"))
        .unwrap();
    assert_eq!(content(reply), text::system_set("Be brief."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_users_get_no_call_at_all() {
    let bot = start(|s| s.discord.access.allowed_users = vec![ADMIN.to_string()]).await;
    let before = bot.fake.calls().len();
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7201, "let me in"));
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(7202, DM_CHANNEL, None, ALICE, "psst", &[], None),
    );
    // An allowed user's message afterwards proves the events were processed.
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            7203,
            CHANNEL,
            Some(GUILD),
            (ADMIN, "boss"),
            &format!("<@{BOT_ID}> hi"),
            &[BOT_ID],
            None,
        ),
    );
    wait_reply(&bot.store, &channel_key(), "7203").await;
    let after: Vec<Call> = bot.fake.calls().into_iter().skip(before).collect();
    for c in &after {
        assert!(
            c.body["message_reference"]["message_id"] != json!("7201")
                && c.body["message_reference"]["message_id"] != json!("7202"),
            "{c:?}"
        );
        assert!(!c.path.contains(&DM_CHANNEL.to_string()), "{c:?}");
    }
    assert!(!bot.store.is_known(Platform::Discord, "7201").await.unwrap());
    // Messages that do not address the bot, and bots, are ignored too.
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            7204,
            CHANNEL,
            Some(GUILD),
            (ADMIN, "boss"),
            "just chatting",
            &[],
            None,
        ),
    );
    bot.fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            7205,
            CHANNEL,
            Some(GUILD),
            (BOT_ID, "synthia"),
            &format!("<@{BOT_ID}> me"),
            &[BOT_ID],
            None,
        ),
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!bot.store.is_known(Platform::Discord, "7204").await.unwrap());
    assert!(!bot.store.is_known(Platform::Discord, "7205").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_message_after_resume_is_answered_once() {
    let bot = start(|_| {}).await;
    let msg = mention(7301, "only once please");
    bot.fake.dispatch("MESSAGE_CREATE", msg.clone());
    wait_reply(&bot.store, &channel_key(), "7301").await;
    bot.fake
        .close_for_resume(vec![("MESSAGE_CREATE".into(), msg)])
        .await;
    assert_eq!(bot.fake.identifies(), 1, "resumed, not re-identified");
    // A new message after the replay is answered; the replayed one is not.
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7302, "and this one"));
    wait_reply(&bot.store, &channel_key(), "7302").await;
    let calls = bot.fake.calls();
    let replies_to_first = calls
        .iter()
        .filter(|c| {
            c.method == "POST" && c.body["message_reference"]["message_id"] == json!("7301")
        })
        .count();
    assert_eq!(replies_to_first, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_follow_the_question() {
    let bot = start(|_| {}).await;
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7401, "typo questoin"));
    wait_reply(&bot.store, &channel_key(), "7401").await;
    bot.fake.dispatch(
        "MESSAGE_UPDATE",
        json!({ "id": "7401", "channel_id": CHANNEL.to_string(), "guild_id": GUILD.to_string(),
                "content": format!("<@{BOT_ID}> fixed question") }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conv = bot
            .store
            .find_conversation(&channel_key())
            .await
            .unwrap()
            .unwrap();
        let msgs = bot.store.since_reset(&conv).await.unwrap();
        if msgs.iter().any(|m| m.content == "fixed question") {
            break;
        }
        assert!(Instant::now() < deadline, "edit not applied: {msgs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bot.fake.dispatch(
        "MESSAGE_DELETE",
        json!({ "id": "7401", "channel_id": CHANNEL.to_string(), "guild_id": GUILD.to_string() }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while bot.store.is_known(Platform::Discord, "7401").await.unwrap() {
        assert!(Instant::now() < deadline, "delete not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conv = bot
        .store
        .find_conversation(&channel_key())
        .await
        .unwrap()
        .unwrap();
    assert!(
        bot.store.since_reset(&conv).await.unwrap().is_empty(),
        "question and answer gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_edit_is_retried_and_the_final_text_arrives() {
    let bot = start(|s| s.model.max_new_tokens = 60).await;
    bot.fake.fail_next_edits(1);
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7501, "go slowly"));
    let stored = wait_reply(&bot.store, &channel_key(), "7501").await;
    let calls = bot
        .fake
        .wait_for("the final text after a 429", |c| {
            shown_text(c, CHANNEL).concat() == stored
        })
        .await;
    let limited = calls
        .iter()
        .position(|c| c.status == 429)
        .expect("a 429 was served");
    let retry = calls[limited + 1..]
        .iter()
        .find(|c| c.method == "PATCH" && c.status == 200)
        .expect("retried");
    assert!(
        retry.at - calls[limited].at >= Duration::from_millis(900),
        "waited before retrying"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_fails_loudly_instead_of_reaching_out() {
    // Nothing listens on this port: connecting must fail at once, never fall back to Discord.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.discord.token = "fake-token".into();
    settings.discord.api_base = format!("http://127.0.0.1:{port}");
    let store = Store::open(
        dir.path().join("x.sqlite").to_str().unwrap(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let assistant = Arc::new(Assistant::new(
        store,
        common::tiny_worker(WorkerOptions::default()),
        &settings,
    ));
    let started = Instant::now();
    let err = match DiscordClient::connect(&settings.discord, assistant).await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot reach the Discord API"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// The daemon binary set up against the fake, with the tiny model and a database in `dir`.
fn serve_command(
    fake: &FakeDiscord,
    dir: &std::path::Path,
    db: &std::path::Path,
    max_new: &str,
) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_synthia-bot"));
    c.current_dir(dir)
        .env("SYNTHIA_BOT__MODEL__PATH", common::tiny_hf())
        .env("SYNTHIA_BOT__MODEL__THREADS", "1")
        .env("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", max_new)
        .env("SYNTHIA_BOT__MEMORY__DATABASE", db)
        .env("SYNTHIA_BOT__DISCORD__TOKEN", "fake-token")
        .env("SYNTHIA_BOT__DISCORD__API_BASE", fake.api_base())
        .env("SYNTHIA_BOT__SERVICE__SHUTDOWN_GRACE", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    c
}

/// `synthia-bot serve` as an operator runs it: answers, then SIGTERM mid-reply ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_and_shuts_down_cleanly_on_sigterm() {
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("serve.sqlite");
    // systemd's notify socket, played by the test.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let notify = Arc::new(notify);
    let receive = {
        let notify = notify.clone();
        move || {
            let mut buf = [0u8; 512];
            let n = notify.recv(&mut buf).expect("a notification");
            (
                String::from_utf8_lossy(&buf[..n]).to_string(),
                Instant::now(),
            )
        }
    };
    let mut child = serve_command(&fake, dir.path(), &db, "2000")
        .arg("serve")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("SYNTHIA_BOT__DISCORD__ENABLED", "true")
        .spawn()
        .unwrap();
    let (ready, ready_at) = tokio::task::spawn_blocking(receive.clone()).await.unwrap();
    assert!(ready.contains("READY=1"), "{ready}");
    // Readiness comes only after start-up: the model loaded and the token checked with Discord.
    let token_checked = fake
        .first_call_at("/api/v10/users/@me")
        .expect("the token was checked before readiness");
    assert!(token_checked <= ready_at);
    fake.wait_ready().await;
    fake.dispatch("MESSAGE_CREATE", mention(7601, "write a very long story"));
    // Once the reply is streaming, ask the daemon to stop.
    fake.wait_for("the reply to start", |c| {
        c.iter()
            .any(|c| c.method == "POST" && c.path.ends_with("/messages"))
    })
    .await;
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling the child this test started, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let waited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    if waited.is_err() {
        let _ = child.start_kill();
    }
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let status = waited
        .unwrap_or_else(|_| panic!("serve did not exit within 30 s of SIGTERM: {stderr}"))
        .unwrap();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(
        !stderr.contains("fake-token"),
        "the token never reaches the log"
    );
    // The reply is stored, cancelled (or complete), never missing.
    let store = Store::open(db.to_str().unwrap(), Duration::from_secs(5))
        .await
        .unwrap();
    let conv = store
        .find_conversation(&channel_key())
        .await
        .unwrap()
        .unwrap();
    let msgs = store.since_reset(&conv).await.unwrap();
    let reply = msgs
        .iter()
        .find(|m| m.role == Role::Assistant)
        .expect("the reply is stored");
    assert!(
        matches!(
            reply.status,
            synthia_bot::memory::Status::Cancelled | synthia_bot::memory::Status::Complete
        ),
        "{reply:?}"
    );
}

#[test]
fn serve_refuses_to_start_with_nothing_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synthia-bot"))
        .arg("serve")
        .current_dir(dir.path())
        .env("SYNTHIA_BOT__MODEL__PATH", common::tiny_hf())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to serve"), "{err}");
}

/// SIGHUP re-reads the configuration: here the allow-list shrinks and alice is no longer answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_access_rules() {
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("reload.sqlite");
    let config = dir.path().join("bot.toml");
    let write_config = |users: &str| {
        std::fs::write(
            &config,
            format!("[discord]\nenabled = true\n\n[discord.access]\nallowed_users = [{users}]\n"),
        )
        .unwrap()
    };
    write_config(&format!("\"{}\", \"{ADMIN}\"", ALICE.0));
    let mut child = serve_command(&fake, dir.path(), &db, "8")
        .args(["serve", "--config", config.to_str().unwrap()])
        .spawn()
        .unwrap();
    fake.wait_ready().await;
    let store = Store::open(db.to_str().unwrap(), Duration::from_secs(5))
        .await
        .unwrap();
    fake.dispatch("MESSAGE_CREATE", mention(7701, "am I allowed?"));
    wait_reply(&store, &channel_key(), "7701").await;

    write_config(&format!("\"{ADMIN}\""));
    let pid = child.id().unwrap() as i32;
    // SAFETY: signalling the child this test started, by its pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    // The reload is done once a later message from the admin is answered; alice's, sent after
    // the signal, is not.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fake.dispatch("MESSAGE_CREATE", mention(7702, "still allowed?"));
    fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            7703,
            CHANNEL,
            Some(GUILD),
            (ADMIN, "boss"),
            &format!("<@{BOT_ID}> hi"),
            &[BOT_ID],
            None,
        ),
    );
    wait_reply(&store, &channel_key(), "7703").await;
    assert!(
        !store.is_known(Platform::Discord, "7702").await.unwrap(),
        "alice is no longer answered"
    );
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("configuration reloaded") && stderr.contains("discord.access"),
        "{stderr}"
    );
}
