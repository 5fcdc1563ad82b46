//! `synthia-bot serve` as a service: Discord (the real serenity client against the fake Discord)
//! and Matrix (matrix-sdk against the Synapse from `scripts/with-synapse`) at once on one worker,
//! readiness, metrics, secrets kept out of the log, SIGTERM mid-reply, and broken setups.

mod common;
mod fake_discord;
mod synapse;

use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, eventually};
use fake_discord::{BOT_ID, CHANNEL, FakeDiscord, GUILD, REFUSED_TOKEN};
use synapse::Synapse;
use synthia_bot::chat::{ConversationKey, Platform, Role};
use synthia_bot::memory::{Status, Store};

const WAIT: Duration = Duration::from_secs(60);
const DISCORD_TOKEN: &str = "discord-secret-token-4f1c";

/// `serve` with the tiny model and a database in `dir`; platforms are switched on by the caller.
fn serve(dir: &Path, max_new: &str) -> tokio::process::Command {
    common::daemon::serve_command(dir, max_new, "1")
}

fn with_discord(c: &mut tokio::process::Command, fake: &FakeDiscord, token: &str) {
    c.env("SYNTHIA_BOT__DISCORD__ENABLED", "true")
        .env("SYNTHIA_BOT__DISCORD__TOKEN", token)
        .env("SYNTHIA_BOT__DISCORD__API_BASE", fake.api_base());
}

fn with_matrix(
    c: &mut tokio::process::Command,
    homeserver: &str,
    user: &str,
    password: &str,
    store: &Path,
) {
    c.env("SYNTHIA_BOT__MATRIX__ENABLED", "true")
        .env("SYNTHIA_BOT__MATRIX__HOMESERVER", homeserver)
        .env("SYNTHIA_BOT__MATRIX__USER_ID", user)
        .env("SYNTHIA_BOT__MATRIX__PASSWORD", password)
        .env("SYNTHIA_BOT__MATRIX__STORE_PATH", store)
        .env("SYNTHIA_BOT__MATRIX__EDIT_INTERVAL_MS", "250");
}

fn discord_mention(id: u64, text: &str) -> serde_json::Value {
    fake_discord::message(
        id,
        CHANNEL,
        Some(GUILD),
        (5001, "alice"),
        &format!("<@{BOT_ID}> {text}"),
        &[BOT_ID],
        None,
    )
}

async fn stored_reply_by_id(
    store: &Store,
    key: &ConversationKey,
    platform_id: &str,
) -> Option<(String, Status)> {
    let conv = store.find_conversation(key).await.ok()??;
    let messages = store.all_messages(conv.id).await.ok()?;
    let q = messages
        .iter()
        .find(|m| m.platform_message_id.as_deref() == Some(platform_id))?;
    messages
        .iter()
        .find(|m| m.role == Role::Assistant && m.reply_to == Some(q.id))
        .map(|a| (a.content.clone(), a.status))
}

async fn wait_stored(store: &Store, key: &ConversationKey, platform_id: &str) -> (String, Status) {
    eventually(
        &format!("a stored reply to {platform_id} in {key}"),
        WAIT,
        || stored_reply_by_id(store, key, platform_id),
    )
    .await
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Both platforms at once on one worker: each gets its answer, metrics show both, readiness
/// comes after start-up, SIGTERM mid-reply exits 0 with the reply stored, and no secret is
/// ever logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_discord_and_matrix_at_once() {
    let synapse = Synapse::from_env();
    let fake = FakeDiscord::start().await;
    let alice = synapse.human("alice").await;
    let (bot_user, bot_password) = synapse.register("synthia").await;
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("matrix");
    let metrics_port = free_port();

    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();

    // Long enough for a reply to be streaming when SIGTERM comes, short enough that a tiny model
    // that rarely writes its end token answers every question within the wait: 2,000 tokens took
    // 48 s for one reply under the full suite's load.
    let mut cmd = serve(dir.path(), "400");
    with_discord(&mut cmd, &fake, DISCORD_TOKEN);
    with_matrix(
        &mut cmd,
        &synapse.url,
        bot_user.as_str(),
        &bot_password,
        &store_path,
    );
    cmd.env(
        "SYNTHIA_BOT__MATRIX__ACCESS__ALLOWED_USERS",
        alice.user_id.as_str(),
    )
    .env(
        "SYNTHIA_BOT__METRICS__LISTEN",
        format!("127.0.0.1:{metrics_port}"),
    )
    .env("NOTIFY_SOCKET", &notify_path)
    .env("SYNTHIA_BOT__SERVICE__INSTANCE", "serve-test-1");
    let mut daemon = Daemon::spawn(cmd);

    // While the model loads the start timeout is extended (a first start downloads and
    // quantises it); readiness comes after.
    let (before, ready, ready_at) = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 512];
        let mut before = Vec::new();
        loop {
            let n = notify.recv(&mut buf).expect("a readiness notification");
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            if text.contains("READY=1") {
                return (before, text, Instant::now());
            }
            before.push(text);
        }
    })
    .await
    .unwrap();
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(
        before
            .first()
            .is_some_and(|m| m.contains("EXTEND_TIMEOUT_USEC=90000000")
                && m.contains("STATUS=loading the model")),
        "{before:?}"
    );
    // Readiness only after start-up: Discord's token was checked and Matrix logged in (the
    // session is saved before the adapter reports itself connected).
    let token_checked = fake
        .first_call_at("/api/v10/users/@me")
        .expect("the Discord token was checked before readiness");
    assert!(token_checked <= ready_at);
    assert!(
        store_path.join("session.json").exists(),
        "Matrix logged in before readiness"
    );
    daemon.wait_log("serving", WAIT).await;

    // Discord.
    fake.wait_ready().await;
    fake.dispatch(
        "MESSAGE_CREATE",
        discord_mention(8101, "hello from discord"),
    );
    let store = Store::open(
        &dir.path().join("bot.sqlite").display().to_string(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let discord_key = ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    );
    let (_, status) = wait_stored(&store, &discord_key, "8101").await;
    assert!(
        matches!(status, Status::Complete),
        "{status:?}\n{}",
        daemon.log()
    );

    // Matrix.
    let room = alice.create_room(&[&bot_user], false, false).await;
    let room_id = room.room_id().to_owned();
    alice.wait_joined(&room_id, &bot_user, WAIT).await;
    let q = alice
        .send(&room, "hello from matrix", Some(&bot_user))
        .await;
    let matrix_key = ConversationKey::new(Platform::Matrix, "", room_id.as_str(), "");
    let (_, status) = wait_stored(&store, &matrix_key, q.as_str()).await;
    assert!(
        matches!(status, Status::Complete),
        "{status:?}\n{}",
        daemon.log()
    );

    // Metrics show both platforms.
    let text = scrape(metrics_port).await;
    for line in [
        "synthia_messages_received_total{platform=\"discord\"} 1",
        "synthia_messages_received_total{platform=\"matrix\"} 1",
        "synthia_platform_connected{platform=\"discord\"} 1",
        "synthia_platform_connected{platform=\"matrix\"} 1",
        "synthia_time_to_first_token_seconds_count{platform=\"matrix\"} 1",
        "synthia_generation_seconds_count{platform=\"discord\"} 1",
        "synthia_queue_depth 0",
        "synthia_instance_info{instance=\"serve-test-1\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    for platform in ["discord", "matrix"] {
        assert!(
            text.contains(&format!(
                "synthia_messages_answered_total{{platform=\"{platform}\",finish="
            )),
            "{text}"
        );
    }

    // SIGTERM while a long Matrix reply streams: exit 0 within the grace period (plus the
    // closing), the reply stored as complete or cancelled.
    let long = alice
        .send(
            &room,
            "write a very long story about everything",
            Some(&bot_user),
        )
        .await;
    eventually("the long reply streaming", WAIT, || async {
        alice
            .replies_from(&room_id, &bot_user)
            .iter()
            .any(|r| r.replies_to().as_ref() == Some(&long) && !r.edits.is_empty())
            .then_some(())
    })
    .await;
    let asked_to_stop = Instant::now();
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    let log = daemon.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        asked_to_stop.elapsed() < Duration::from_secs(15),
        "took {:?} to stop",
        asked_to_stop.elapsed()
    );
    let (_, status) = stored_reply_by_id(&store, &matrix_key, long.as_str())
        .await
        .expect("the interrupted reply is stored");
    assert!(
        matches!(status, Status::Complete | Status::Cancelled),
        "{status:?}"
    );

    // No secret in a whole session's log.
    let session: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store_path.join("session.json")).unwrap()).unwrap();
    let access_token = session["access_token"]
        .as_str()
        .expect("a saved access token");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        log.contains("serve{instance=serve-test-1}") && log.contains("memory opened"),
        "the daemon's lines name its instance:\n{log}"
    );
    // Operators alert on ERROR: a whole ordinary session (login, first sends, a reply cut by
    // SIGTERM) logs nothing there.
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in an ordinary session:\n{errors:#?}"
    );
    for (what, secret) in [
        ("the Discord token", DISCORD_TOKEN),
        ("the Matrix password", bot_password.as_str()),
        ("the Matrix access token", access_token),
    ] {
        assert!(!log.contains(secret), "{what} reached the log:\n{log}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(store_path.join("session.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the session file is private: {mode:o}");
}

async fn fails_with(cmd: tokio::process::Command, needles: &[&str]) -> String {
    let mut daemon = Daemon::spawn(cmd);
    let status = daemon.wait_exit(WAIT).await;
    let log = daemon.log();
    assert!(!status.success(), "expected a failure:\n{log}");
    for n in needles {
        assert!(log.contains(n), "`{n}` missing from:\n{log}");
    }
    log
}

/// Each broken setup gives its own clear line; a healthy platform keeps running when another
/// one's server is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_setups_say_what_is_wrong() {
    let synapse = Synapse::from_env();
    let fake = FakeDiscord::start().await;
    let dir = tempfile::tempdir().unwrap();

    // The model is missing.
    let mut c = serve(dir.path(), "8");
    with_discord(&mut c, &fake, DISCORD_TOKEN);
    c.env("SYNTHIA_BOT__MODEL__PATH", dir.path().join("no-such-model"));
    fails_with(c, &["cannot load the model", "no-such-model"]).await;

    // The database cannot be created (its folder is a file).
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "x").unwrap();
    let mut c = serve(dir.path(), "8");
    with_discord(&mut c, &fake, DISCORD_TOKEN);
    c.env("SYNTHIA_BOT__MEMORY__DATABASE", blocker.join("bot.sqlite"));
    fails_with(c, &["not-a-folder/bot.sqlite"]).await;

    // Discord refuses the token.
    let mut c = serve(dir.path(), "8");
    with_discord(&mut c, &fake, REFUSED_TOKEN);
    let log = fails_with(
        c,
        &[
            "Discord refused the bot token",
            "SYNTHIA_BOT__DISCORD__TOKEN",
        ],
    )
    .await;
    assert!(!log.contains(REFUSED_TOKEN), "{log}");

    // The homeserver refuses the password.
    let (user, _) = synapse.register("synthia").await;
    let mut c = serve(dir.path(), "8");
    with_matrix(
        &mut c,
        &synapse.url,
        user.as_str(),
        "wrong-password-9d2e",
        &dir.path().join("m1"),
    );
    let log = fails_with(c, &["refused to log in", "SYNTHIA_BOT__MATRIX__PASSWORD"]).await;
    assert!(!log.contains("wrong-password-9d2e"), "{log}");

    // The homeserver is down while Discord is fine: Discord keeps answering, Matrix is retried.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (user, password) = synapse.register("synthia").await;
    let mut c = serve(dir.path(), "8");
    with_discord(&mut c, &fake, DISCORD_TOKEN);
    with_matrix(
        &mut c,
        &closed,
        user.as_str(),
        &password,
        &dir.path().join("m2"),
    );
    let mut daemon = Daemon::spawn(c);
    daemon
        .wait_log("cannot reach the Matrix homeserver", WAIT)
        .await;
    daemon.wait_log("serving", WAIT).await;
    fake.wait_ready().await;
    fake.dispatch("MESSAGE_CREATE", discord_mention(8201, "still there?"));
    let store = Store::open(
        &dir.path().join("bot.sqlite").display().to_string(),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let key = ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    );
    wait_stored(&store, &key, "8201").await;
    daemon.sigterm();
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{}", daemon.log());
}
