//! Several `serve` daemons sharing one bot: the fake Discord announces two shards, each daemon
//! runs one of them, and both keep their memory in one real PostgreSQL database. A guild's
//! messages are answered by the daemon holding its shard, a message delivered to both is
//! answered once, a daemon killed mid-reply frees its conversation for the other at once, and
//! many conversations over both daemons lose and repeat nothing.

mod common;
mod fake_discord;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, eventually};
use fake_discord::{BOT_ID, Call, EditFailure, FakeDiscord};
use synthia_bot::core::text;

const TOKEN: &str = "discord-shard-token";
const WAIT: Duration = Duration::from_secs(90);

/// A guild whose events Discord sends to `shard` of two.
fn guild_on(shard: u64) -> u64 {
    (10 + shard) << 22
}

/// `serve` running `shard` of two, on the shared PostgreSQL memory.
fn serve(
    dir: &std::path::Path,
    fake: &FakeDiscord,
    database: &str,
    shard: u32,
    max_new: &str,
) -> tokio::process::Command {
    let mut c = common::daemon::serve_command(dir, max_new, "5");
    c.env("SYNTHIA_BOT__MEMORY__DATABASE", database)
        .env("SYNTHIA_BOT__SERVICE__INSTANCE", format!("shard-{shard}"))
        .env("SYNTHIA_BOT__LIMITS__USER_PER_MINUTE", "0")
        .env("SYNTHIA_BOT__LIMITS__CONVERSATION_PER_MINUTE", "0")
        .env("SYNTHIA_BOT__MODEL__QUEUE_CAPACITY", "512")
        .env("SYNTHIA_BOT__DISCORD__ENABLED", "true")
        .env("SYNTHIA_BOT__DISCORD__TOKEN", TOKEN)
        .env("SYNTHIA_BOT__DISCORD__API_BASE", fake.api_base())
        .env("SYNTHIA_BOT__DISCORD__EDIT_INTERVAL_MS", "100")
        .env("SYNTHIA_BOT__DISCORD__SHARDS__TOTAL", "2")
        .env("SYNTHIA_BOT__DISCORD__SHARDS__IDS", shard.to_string());
    c
}

/// The run id a daemon logged when it opened the memory.
async fn run_of(daemon: &Daemon) -> i64 {
    daemon.wait_log("memory opened", WAIT).await;
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("memory opened")).unwrap();
    line.split("run=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {line}"))
}

/// Starts the daemon for `shard` and waits until its shard's session is ready.
async fn start(
    dir: &std::path::Path,
    fake: &FakeDiscord,
    database: &str,
    shard: u32,
    max_new: &str,
) -> (Daemon, i64) {
    let daemon = Daemon::spawn(serve(dir, fake, database, shard, max_new));
    let run = run_of(&daemon).await;
    daemon
        .wait_log(
            &format!("shard=Some(ShardInfo {{ id: ShardId({shard})"),
            WAIT,
        )
        .await;
    fake.wait_shards(&[shard]).await;
    (daemon, run)
}

fn question(id: u64, channel: u64, guild: u64, text: &str) -> serde_json::Value {
    fake_discord::message(
        id,
        channel,
        Some(guild),
        (20_000 + id % 1000, "user"),
        &format!("<@{BOT_ID}> {text}"),
        &[BOT_ID],
        None,
    )
}

/// What the fake Discord shows in reply to each question: the bot's posts replying to it, and
/// the last text of the first of them.
#[derive(Debug, Default, Clone)]
struct Shown {
    posts: usize,
    text: String,
    first_post_at: Option<Instant>,
}

fn shown(calls: &[Call]) -> HashMap<String, Shown> {
    let mut by_question: HashMap<String, Shown> = HashMap::new();
    let mut owner: HashMap<String, String> = HashMap::new();
    for c in calls {
        if c.status != 200 {
            continue;
        }
        let content = c.body["content"].as_str().unwrap_or("").to_string();
        if c.method == "POST"
            && let Some(q) = c.body["message_reference"]["message_id"].as_str()
            && let Some(id) = c.message_id.clone()
        {
            let s = by_question.entry(q.to_string()).or_default();
            s.posts += 1;
            if s.posts == 1 {
                s.text = content;
                s.first_post_at = Some(c.at);
                owner.insert(id, q.to_string());
            }
        } else if c.method == "PATCH"
            && let Some(id) = c.message_id.as_deref()
            && let Some(q) = owner.get(id)
            && let Some(s) = by_question.get_mut(q)
        {
            s.text = content;
        }
    }
    by_question
}

/// Each stored question by platform id: the run that accepted it (or took it over) and its
/// stored replies.
async fn stored(pool: &sqlx::PgPool) -> HashMap<String, (i64, Vec<String>)> {
    let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
        "SELECT q.platform_message_id, COALESCE(q.accepted_by, 0), a.content
         FROM messages q LEFT JOIN messages a ON a.reply_to = q.id
         WHERE q.role = 'user' AND q.platform_message_id IS NOT NULL
         ORDER BY q.id, a.id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out: HashMap<String, (i64, Vec<String>)> = HashMap::new();
    for (q, run, reply) in rows {
        let entry = out.entry(q).or_insert((run, Vec::new()));
        entry.1.extend(reply);
    }
    out
}

/// A stored reply as Discord shows it (an empty one is shown as an ellipsis).
fn as_shown(reply: &str) -> String {
    if reply.trim().is_empty() {
        "…".into()
    } else {
        reply.into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_split_the_shards_and_answer_each_message_once() {
    let fake = FakeDiscord::start().await;
    fake.set_shards(2);
    let database = common::postgres::fresh_database().await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (mut a, run_a) = start(dir_a.path(), &fake, &database, 0, "16").await;
    let (b, run_b) = start(dir_b.path(), &fake, &database, 1, "16").await;
    assert_ne!(run_a, run_b);
    let mut identified = fake.identified();
    identified.sort();
    assert_eq!(
        identified,
        vec![[0, 2], [1, 2]],
        "each shard identified once"
    );

    // Two conversations per shard: each answered once, by the daemon holding its shard.
    let mut expected_run = HashMap::new();
    for i in 0..4u64 {
        let shard = i % 2;
        let id = 7_000 + i;
        fake.dispatch(
            "MESSAGE_CREATE",
            question(id, 5_000 + i, guild_on(shard), &format!("question {i}")),
        );
        expected_run.insert(id.to_string(), if shard == 0 { run_a } else { run_b });
    }
    let answered = eventually("the four questions answered", WAIT, || async {
        let s = stored(&pool).await;
        expected_run
            .keys()
            .all(|q| s.get(q).is_some_and(|(_, r)| !r.is_empty()))
            .then_some(s)
    })
    .await;
    for (q, run) in &expected_run {
        let (by, replies) = &answered[q];
        assert_eq!(by, run, "question {q} answered by the daemon of its shard");
        assert_eq!(replies.len(), 1, "question {q}: {replies:?}");
    }

    // The same message delivered to both daemons: one stores and answers it, the other drops it.
    let twice = question(7_100, 5_100, guild_on(0), "delivered twice");
    fake.dispatch_to(0, "MESSAGE_CREATE", twice.clone());
    fake.dispatch_to(1, "MESSAGE_CREATE", twice);
    eventually(
        "the twice-delivered message answered and shown",
        WAIT,
        || async {
            let s = stored(&pool).await;
            let reply = s.get("7100").and_then(|(_, r)| r.first().cloned())?;
            let on = shown(&fake.calls());
            (on.get("7100")?.text == as_shown(&reply)).then_some(())
        },
    )
    .await;

    // A holds a conversation mid-reply: its edits are rate-limited for a minute, so the reply
    // (and the conversation's turn) stays open. A question after it reaching A waits in A; the
    // next reaching B waits for the turn. When A is killed its session ends, and B answers at
    // once; what A had accepted but not answered is taken up when A's shard comes back.
    // (Progress edits may be skipped when Discord pushes back, the final one may not: enough
    // failures that the final edit meets one.)
    fake.fail_edits_with(vec![EditFailure::RateLimited { retry_after: 60.0 }; 40]);
    let (channel, guild) = (5_200, guild_on(0));
    fake.dispatch(
        "MESSAGE_CREATE",
        question(7_200, channel, guild, "a reply cut by a crash"),
    );
    fake.wait_for("A's first post of the long reply", |calls| {
        shown(calls).get("7200").is_some_and(|s| s.posts == 1)
    })
    .await;
    fake.dispatch(
        "MESSAGE_CREATE",
        question(7_202, channel, guild, "waiting in A"),
    );
    fake.dispatch_to(
        1,
        "MESSAGE_CREATE",
        question(7_201, channel, guild, "the next question, on B"),
    );
    eventually("both later questions stored", WAIT, || async {
        let s = stored(&pool).await;
        (s.contains_key("7201") && s.contains_key("7202")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !shown(&fake.calls()).contains_key("7201"),
        "B answered while A still held the conversation"
    );
    let killed = Instant::now();
    a.sigkill().await;
    fake.clear_edit_failures();
    fake.wait_for("B's answer to the next question", |calls| {
        shown(calls).contains_key("7201")
    })
    .await;
    let freed_after = killed.elapsed();
    println!("B answered {freed_after:?} after A was killed");
    assert!(
        freed_after < Duration::from_secs(10),
        "the dead daemon's conversation was freed after {freed_after:?}"
    );
    let s = stored(&pool).await;
    assert_eq!(s["7201"].0, run_b);
    assert_eq!(s["7202"].0, run_a);
    assert!(s["7202"].1.is_empty(), "A died before answering it");

    // A comes back on its shard and takes up what its dead run left: answered once.
    let (a2, run_a2) = start(dir_a.path(), &fake, &database, 0, "16").await;
    let taken = eventually(
        "the waiting question answered after the restart",
        WAIT,
        || async {
            let s = stored(&pool).await;
            (!s["7202"].1.is_empty()).then_some(s)
        },
    )
    .await;
    assert_eq!(taken["7202"].0, run_a2, "taken over by the new run");

    // Everything once: one stored reply and one post per question, showing the stored text (but
    // the reply A was showing when it died, which stays as it was).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = stored(&pool).await;
    let shown_now = shown(&fake.calls());
    for q in [
        "7000", "7001", "7002", "7003", "7100", "7200", "7201", "7202",
    ] {
        let (_, replies) = &s[q];
        assert_eq!(replies.len(), 1, "question {q}: {replies:?}");
        let on_discord = &shown_now[q];
        assert_eq!(on_discord.posts, 1, "question {q} posted {on_discord:?}");
        if q != "7200" {
            assert_eq!(on_discord.text, as_shown(&replies[0]), "question {q}");
        }
    }
    let log_b = b.stop().await;
    assert!(log_b.contains("serve{instance=shard-1}"), "{log_b}");
    a2.stop().await;
}

/// 200 conversations x 5 questions spread over two daemons on two shards: every question is
/// answered once (or told the bot is busy, its question kept), by the daemon of its shard, and
/// what Discord shows equals what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_over_two_daemons_loses_and_repeats_nothing() {
    let conversations: u64 = 200;
    let per: u64 = 5;
    let fake = FakeDiscord::start().await;
    fake.set_shards(2);
    let database = common::postgres::fresh_database().await;
    let pool = sqlx::PgPool::connect(&database).await.unwrap();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, run_a) = start(dir_a.path(), &fake, &database, 0, "8").await;
    let (b, run_b) = start(dir_b.path(), &fake, &database, 1, "8").await;
    let t0 = Instant::now();
    let mut expected_run = HashMap::new();
    for m in 0..per {
        for c in 0..conversations {
            let id = 1_000_000 + c * 100 + m;
            let shard = c % 2;
            fake.dispatch(
                "MESSAGE_CREATE",
                question(
                    id,
                    10_000 + c,
                    guild_on(shard),
                    &format!("question {m} of {c}"),
                ),
            );
            expected_run.insert(id.to_string(), if shard == 0 { run_a } else { run_b });
            if id % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
    }
    let total = expected_run.len();
    // Until every question shows its final text, or nothing moved for a minute.
    let settled = |s: &HashMap<String, (i64, Vec<String>)>, on: &HashMap<String, Shown>| {
        expected_run
            .keys()
            .filter(|q| match (s.get(*q), on.get(*q)) {
                (Some((_, r)), Some(shown)) if r.len() == 1 => shown.text == as_shown(&r[0]),
                (Some((_, r)), Some(shown)) if r.is_empty() => shown.text == text::BUSY,
                _ => false,
            })
            .count()
    };
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let done = settled(&stored(&pool).await, &shown(&fake.calls()));
        if done == total || moved.elapsed() > Duration::from_secs(60) {
            break;
        }
        if done != last {
            (last, moved) = (done, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let wall = t0.elapsed();
    let s = stored(&pool).await;
    let on = shown(&fake.calls());
    let (mut answered, mut busy, mut lost, mut repeated, mut misrouted) =
        (0, 0, Vec::new(), Vec::new(), Vec::new());
    for (q, run) in &expected_run {
        match (s.get(q), on.get(q)) {
            (Some((by, replies)), Some(shown)) => {
                if by != run {
                    misrouted.push(q.clone());
                }
                if replies.len() > 1 || shown.posts > 1 {
                    repeated.push(format!(
                        "{q}: {} stored, {} posts",
                        replies.len(),
                        shown.posts
                    ));
                } else if replies.len() == 1 && shown.text == as_shown(&replies[0]) {
                    answered += 1;
                } else if replies.is_empty() && shown.text == text::BUSY {
                    busy += 1;
                } else {
                    lost.push(format!("{q}: stored {replies:?}, shown {shown:?}"));
                }
            }
            (stored, shown) => lost.push(format!("{q}: stored {stored:?}, shown {shown:?}")),
        }
    }
    println!(
        "two daemons, {conversations} conversations x {per}: {answered} answered, {busy} told busy, {} lost, {} repeated, {} misrouted, {:.1} s",
        lost.len(),
        repeated.len(),
        misrouted.len(),
        wall.as_secs_f64()
    );
    assert!(lost.is_empty(), "lost: {lost:#?}");
    assert!(repeated.is_empty(), "repeated: {repeated:#?}");
    assert!(
        misrouted.is_empty(),
        "answered off their shard: {misrouted:?}"
    );
    assert_eq!(answered + busy, total);
    assert!(answered > 0);
    a.stop().await;
    b.stop().await;
}
