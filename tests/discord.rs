//! The Discord adapter end to end: the real serenity client against a protocol-level fake
//! Discord on 127.0.0.1, the real core, the tiny random model and a real SQLite file.

mod common;
mod fake_discord;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_discord::{BOT_ID, CHANNEL, Call, DM_CHANNEL, EditFailure, FakeDiscord, GUILD};
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
    start_bot(edit, prepare, WorkerOptions::default()).await
}

/// `start_with`, the worker set up with `opts`.
async fn start_bot(
    edit: impl FnOnce(&mut Settings),
    prepare: impl FnOnce(&FakeDiscord),
    opts: WorkerOptions,
) -> Bot {
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
    let worker = common::tiny_worker(opts);
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
    wait_reply_within(store, key, question, Duration::from_secs(60)).await
}

/// `wait_reply` for a reply that takes long to generate: a guard against a hang, not a timing.
async fn wait_reply_within(
    store: &Store,
    key: &ConversationKey,
    question: &str,
    limit: Duration,
) -> String {
    let deadline = Instant::now() + limit;
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

/// The text Discord shows in `channel`: the last content of each message posted there, in order.
fn shown_text(calls: &[Call], channel: u64) -> Vec<String> {
    let posts_path = format!("/api/v10/channels/{channel}/messages");
    let mut ids: Vec<(&str, &Call)> = Vec::new();
    for c in calls {
        if c.method == "POST"
            && c.path == posts_path
            && let Some(id) = c.message_id.as_deref()
            && !ids.iter().any(|(i, _)| *i == id)
        {
            ids.push((id, c));
        }
    }
    ids.iter()
        .map(|(id, post)| {
            calls
                .iter()
                .rev()
                .find(|c| {
                    c.status == 200 && c.method == "PATCH" && c.message_id.as_deref() == Some(*id)
                })
                .map(content)
                .unwrap_or_else(|| content(post))
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
    // 1,800 tokens from the unoptimised test build: about 50 s on two busy cores.
    let stored =
        wait_reply_within(&bot.store, &channel_key(), "7101", Duration::from_secs(300)).await;
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

/// The gateway goes away while a reply streams (its edit held back by a 2 s rate limit), and
/// Discord replays the question on RESUME: the reply goes on over REST, ends showing the stored
/// text, in one message, stored once; the replayed question is not answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_restart_mid_reply_completes_the_reply_once() {
    let bot = start(|_| {}).await;
    bot.fake
        .fail_edits_with(vec![EditFailure::RateLimited { retry_after: 2.0 }]);
    let msg = mention(7351, "answer me through a gateway restart");
    bot.fake.dispatch("MESSAGE_CREATE", msg.clone());
    bot.fake
        .wait_for("the reply's first post", |calls| {
            replies_by_question(calls).contains_key("7351")
        })
        .await;
    bot.fake
        .close_for_resume(vec![("MESSAGE_CREATE".into(), msg)])
        .await;
    let stored = wait_reply(&bot.store, &channel_key(), "7351").await;
    let want = if stored.trim().is_empty() {
        "…".to_string()
    } else {
        stored.clone()
    };
    let calls = bot
        .fake
        .wait_for("the final text shown", |calls| {
            replies_by_question(calls)
                .get("7351")
                .and_then(|s| s.now())
                .is_some_and(|now| now == want)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shown = replies_by_question(&calls);
    assert_eq!(shown["7351"].ids.len(), 1, "one message for the reply");
    let later = bot.fake.calls();
    let posts = later
        .iter()
        .filter(|c| {
            c.method == "POST" && c.body["message_reference"]["message_id"] == json!("7351")
        })
        .count();
    assert_eq!(posts, 1, "the replayed question was answered again");
    assert_eq!(
        common::stored_replies(&bot.store, &channel_key()).await,
        1,
        "stored once"
    );
    assert_eq!(bot.fake.identifies(), 1, "resumed, not re-identified");
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

/// Discord's edge answers 502 with an HTML page, and a 429 says how long to wait in its body and
/// headers: the final edit is retried until it lands, waiting as long as the 429 asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gateway_or_rate_limited_final_edit_is_retried_as_discord_asks() {
    // A long interval: the answer is posted once and then shown whole by one final edit.
    let bot = start(|s| s.discord.edit_interval_ms = 2000).await;
    bot.fake.fail_edits_with(vec![
        EditFailure::RateLimited { retry_after: 2.5 },
        EditFailure::BadGateway,
        EditFailure::BadGateway,
        EditFailure::BadGateway,
    ]);
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7511, "through the storm"));
    let stored = wait_reply(&bot.store, &channel_key(), "7511").await;
    let calls = bot
        .fake
        .wait_for("the final text after 429 and 502s", |c| {
            shown_text(c, CHANNEL).concat() == stored
        })
        .await;
    let edits: Vec<&Call> = calls.iter().filter(|c| c.method == "PATCH").collect();
    let limited = edits
        .iter()
        .position(|c| c.status == 429)
        .expect("a 429 was served");
    assert!(
        edits[limited + 1].at - edits[limited].at >= Duration::from_millis(2500),
        "retried {:?} after a 429 asking for 2.5 s",
        edits[limited + 1].at - edits[limited].at
    );
    assert_eq!(edits.iter().filter(|c| c.status == 502).count(), 3);
    let last_failure = edits.iter().rposition(|c| c.status != 200).unwrap();
    assert!(
        edits[last_failure + 1..].iter().any(|c| c.status == 200),
        "an edit after the 502s succeeded"
    );
    assert_eq!(
        shown_text(&calls, CHANNEL).len(),
        1,
        "one message: {calls:?}"
    );
}

/// When edits keep failing, the rest of the answer is posted as a new message: what the channel
/// shows still adds up to the stored answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_that_keeps_failing_continues_in_a_new_message() {
    let bot = start(|s| s.discord.edit_interval_ms = 2000).await;
    bot.fake.fail_edits_with(vec![EditFailure::BadGateway; 40]);
    bot.fake
        .dispatch("MESSAGE_CREATE", mention(7521, "say a lot"));
    let stored = wait_reply(&bot.store, &channel_key(), "7521").await;
    let calls = bot
        .fake
        .wait_for("the answer continued in a new message", |c| {
            shown_text(c, CHANNEL).concat() == stored
        })
        .await;
    let shown = shown_text(&calls, CHANNEL);
    assert!(shown.len() >= 2, "continued in a new message: {shown:?}");
    assert!(
        calls.iter().all(|c| c.status != 200 || c.method != "PATCH"),
        "every edit failed"
    );
}

/// Questions waiting in one channel share one typing indicator, renewed at one loop's pace,
/// not one loop per question; it stops when the last answer is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_waiting_in_one_channel_share_one_typing_loop() {
    let bot = start(|s| s.model.max_new_tokens = 150).await;
    let ids: Vec<u64> = (7801..7806).collect();
    for id in &ids {
        bot.fake
            .dispatch("MESSAGE_CREATE", mention(*id, "take your time"));
    }
    for id in &ids {
        wait_reply(&bot.store, &channel_key(), &id.to_string()).await;
    }
    let typing_path = format!("/api/v10/channels/{CHANNEL}/typing");
    let typing = |calls: &[Call]| -> Vec<Instant> {
        calls
            .iter()
            .filter(|c| c.path == typing_path)
            .map(|c| c.at)
            .collect()
    };
    // The last reply's final text follows its storing; typing lasts until then.
    let messages_path = format!("/api/v10/channels/{CHANNEL}/messages");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = bot.fake.calls();
    let times = typing(&calls);
    assert!(!times.is_empty(), "typing was shown");
    for w in times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(7500),
            "typing calls {:?} apart: {} calls for {} questions",
            w[1] - w[0],
            times.len(),
            ids.len()
        );
    }
    let last_shown = calls
        .iter()
        .filter(|c| c.path.starts_with(&messages_path))
        .map(|c| c.at)
        .max()
        .unwrap();
    let span = last_shown - times[0];
    assert!(
        times.len() as f64 <= 1.0 + span.as_secs_f64() / 8.0,
        "{} typing calls over {span:?}",
        times.len()
    );
    // Once every answer is done the loop stops.
    let before = times.len();
    tokio::time::sleep(Duration::from_millis(8500)).await;
    assert_eq!(typing(&bot.fake.calls()).len(), before, "typing went on");
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
        .env("SYNTHIA_BOT__MODEL__QUANTIZE", "none")
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
            // Start-timeout extensions while the model loads come first; they are checked in
            // tests/serve.rs.
            loop {
                let n = notify.recv(&mut buf).expect("a notification");
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if !text.contains("EXTEND_TIMEOUT_USEC") {
                    return (text, Instant::now());
                }
            }
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

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value at fraction `q` of sorted durations.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// What the fake shows for one question: the reply's first message, what it shows now, and
/// when each text reached it.
struct Shown<'a> {
    ids: Vec<&'a str>,
    /// Posts and successful edits of the reply's first message, in order.
    texts: Vec<&'a Call>,
}

impl Shown<'_> {
    fn now(&self) -> Option<String> {
        self.texts.last().map(|c| content(c))
    }
}

/// Every question's reply in `calls`, by question id.
fn replies_by_question(calls: &[Call]) -> std::collections::HashMap<String, Shown<'_>> {
    let mut by_q: std::collections::HashMap<String, Shown<'_>> = Default::default();
    let mut owner: std::collections::HashMap<&str, String> = Default::default();
    for c in calls {
        if c.status != 200 {
            continue;
        }
        if c.method == "POST"
            && let Some(q) = c.body["message_reference"]["message_id"].as_str()
            && let Some(id) = c.message_id.as_deref()
        {
            let shown = by_q.entry(q.to_string()).or_insert(Shown {
                ids: vec![],
                texts: vec![],
            });
            if !shown.ids.contains(&id) {
                shown.ids.push(id);
                owner.insert(id, q.to_string());
            }
            shown.texts.push(c);
        } else if c.method == "PATCH"
            && let Some(id) = c.message_id.as_deref()
            && let Some(q) = owner.get(id)
            && let Some(shown) = by_q.get_mut(q)
        {
            shown.texts.push(c);
        }
    }
    by_q
}

/// Many conversations at once through the fake Discord: every question is answered once (or
/// told the bot is busy, its question kept), every answer shows exactly what is stored, and
/// the bot never sends Discord more than 50 requests in any second. Prints the figures (about a
/// minute on two cores; `scripts/stress` runs it alone, with its output, at any size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_many_conversations_answered_once_within_the_request_limit() {
    let conversations = env_or("SYNTHIA_STRESS_CONVERSATIONS", 200) as u64;
    let per = env_or("SYNTHIA_STRESS_MESSAGES", 5) as u64;
    let max_new = env_or("SYNTHIA_STRESS_MAX_NEW_TOKENS", 8) as u32;
    let bot = start_bot(
        |s| {
            s.model.max_new_tokens = max_new;
            s.limits.user_per_minute = 0;
            s.limits.conversation_per_minute = 0;
        },
        |_| {},
        WorkerOptions {
            queue_capacity: 256,
            ..WorkerOptions::default()
        },
    )
    .await;
    let channel_of = |c: u64| 10_000 + c;
    let question = |c: u64, m: u64| 1_000_000 + c * 100 + m;
    let (epoch_ms, epoch) = (synthia_bot::memory::now_ms(), Instant::now());
    let at = |ms: i64| epoch + Duration::from_millis((ms - epoch_ms).max(0) as u64);
    let mut arrived: std::collections::HashMap<String, Instant> = Default::default();
    let before = bot.fake.calls().len();
    let t0 = Instant::now();
    // Spread over about two seconds, each conversation's questions in order.
    for m in 0..per {
        for c in 0..conversations {
            let id = question(c, m);
            bot.fake.dispatch(
                "MESSAGE_CREATE",
                fake_discord::message(
                    id,
                    channel_of(c),
                    Some(GUILD),
                    (20_000 + c, "user"),
                    &format!("<@{BOT_ID}> question {m} of conversation {c}"),
                    &[BOT_ID],
                    None,
                ),
            );
            arrived.insert(id.to_string(), Instant::now());
            if id % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
    }
    let sent_in = t0.elapsed();
    let total = arrived.len();
    // Stored questions and replies, by question id: (reply text, reply stored at).
    let stored = async || {
        let mut out: std::collections::HashMap<String, Option<(String, i64)>> = Default::default();
        for c in 0..conversations {
            let key = ConversationKey::new(
                Platform::Discord,
                &GUILD.to_string(),
                &channel_of(c).to_string(),
                "",
            );
            let Some(conv) = bot.store.find_conversation(&key).await.unwrap() else {
                continue;
            };
            let msgs = bot.store.since_reset(&conv).await.unwrap();
            for q in msgs.iter().filter(|m| m.role == Role::User) {
                let reply = msgs
                    .iter()
                    .find(|r| r.role == Role::Assistant && r.reply_to == Some(q.id))
                    .map(|r| (r.content.clone(), r.created_at));
                out.insert(q.platform_message_id.clone().unwrap_or_default(), reply);
            }
        }
        out
    };
    let expected = |text: &str| {
        if text.trim().is_empty() {
            "…".to_string()
        } else {
            text.to_string()
        }
    };
    // Until every question has its final text, or nothing moved for a minute.
    let (mut last_done, mut last_change) = (0, Instant::now());
    loop {
        let calls = bot.fake.calls();
        let shown = replies_by_question(&calls[before..]);
        let kept = stored().await;
        let done = arrived
            .keys()
            .filter(|q| {
                let now = shown.get(*q).and_then(|s| s.now());
                match kept.get(*q) {
                    Some(Some((text, _))) => now == Some(expected(text)),
                    Some(None) => now.as_deref() == Some(text::BUSY),
                    None => false,
                }
            })
            .count();
        if done == total {
            break;
        }
        if done != last_done {
            (last_done, last_change) = (done, Instant::now());
        }
        if last_change.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = t0.elapsed();
    let calls = bot.fake.calls();
    let calls = &calls[before..];
    let shown = replies_by_question(calls);
    let kept = stored().await;
    let (mut answered, mut busy, mut lost, mut duplicated) = (0, 0, Vec::new(), Vec::new());
    let (mut to_first_post, mut to_first_text, mut to_finish, mut shown_after_finish) =
        (vec![], vec![], vec![], vec![]);
    let mut last_finish = t0;
    for (q, arrival) in &arrived {
        let reply = shown.get(q);
        if reply.is_some_and(|r| r.ids.len() > 1) {
            duplicated.push(q.clone());
        }
        let now = reply.and_then(|r| r.now());
        match kept.get(q) {
            Some(Some((text, stored_ms))) if now == Some(expected(text)) => {
                answered += 1;
                let r = reply.unwrap();
                let want = expected(text);
                let finish = at(*stored_ms);
                last_finish = last_finish.max(finish);
                to_first_post.push((r.texts[0].at - *arrival).as_secs_f64());
                let first_text = r
                    .texts
                    .iter()
                    .find(|c| {
                        let t = content(c);
                        !t.is_empty() && want.starts_with(&t)
                    })
                    .unwrap();
                to_first_text.push((first_text.at - *arrival).as_secs_f64());
                to_finish.push((finish - *arrival).as_secs_f64());
                let final_at = r.texts.iter().find(|c| content(c) == want).unwrap().at;
                shown_after_finish.push(
                    final_at.duration_since(finish).as_secs_f64()
                        - finish.duration_since(final_at).as_secs_f64(),
                );
            }
            Some(None) if now.as_deref() == Some(text::BUSY) => busy += 1,
            _ => lost.push(format!("{q}: stored {:?}, shown {now:?}", kept.get(q))),
        }
    }
    // Every request the fake saw from the bot, in any one second.
    let mut times: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    times.sort();
    let (mut peak, mut j) = (0, 0);
    for i in 0..times.len() {
        while j < times.len() && times[j] - times[i] < Duration::from_secs(1) {
            j += 1;
        }
        peak = peak.max(j - i);
    }
    for v in [
        &mut to_first_post,
        &mut to_first_text,
        &mut to_finish,
        &mut shown_after_finish,
    ] {
        v.sort_by(f64::total_cmp);
    }
    let typing = calls.iter().filter(|c| c.path.ends_with("/typing")).count();
    println!(
        "load: {conversations} conversations x {per} questions = {total}, sent in {:.2} s, max_new_tokens {max_new}",
        sent_in.as_secs_f64()
    );
    println!(
        "answered {answered}, busy {busy}, lost {}, duplicated {}",
        lost.len(),
        duplicated.len()
    );
    println!(
        "arrival -> first post: p50 {:.2} s, p99 {:.2} s; -> first answer text: p50 {:.2} s, p99 {:.2} s",
        quantile(&to_first_post, 0.5),
        quantile(&to_first_post, 0.99),
        quantile(&to_first_text, 0.5),
        quantile(&to_first_text, 0.99)
    );
    println!(
        "arrival -> worker finish (reply stored): p50 {:.2} s, p99 {:.2} s; worker drained {:.2} s after the first question",
        quantile(&to_finish, 0.5),
        quantile(&to_finish, 0.99),
        (last_finish - t0).as_secs_f64()
    );
    println!(
        "final text shown after the worker's finish: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        quantile(&shown_after_finish, 0.5),
        quantile(&shown_after_finish, 0.99),
        shown_after_finish.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "requests {} ({typing} typing), peak {peak} in any 1 s; total wall time {:.2} s",
        calls.len(),
        wall.as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "lost {}: {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert_eq!(answered + busy, total);
    for q in arrived.keys() {
        assert!(
            bot.store.is_known(Platform::Discord, q).await.unwrap(),
            "question {q} kept"
        );
    }
    assert!(peak <= 50, "{peak} requests within one second");
}
