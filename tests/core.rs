//! The assistant core with a recording sink, the real worker on a tiny random model, the real
//! tokenizer and a real SQLite file.

mod common;

use common::sink::{Call, Recorder};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use synthia_bot::chat::{Author, Incoming, Request};
use synthia_bot::chat::{ConversationKey, Platform, Role};
use synthia_bot::config::Settings;
use synthia_bot::core::{Assistant, Outcome, ReplySink, text};
use synthia_bot::inference::{FinishReason, Worker, WorkerOptions};
use synthia_bot::memory::{Status, Store};

struct Fixture {
    assistant: Arc<Assistant>,
    store: Store,
    worker: Worker,
    _dir: tempfile::TempDir,
}

async fn fixture(edit: impl FnOnce(&mut Settings)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.model.max_new_tokens = 12;
    settings.sampling.temperature = 0.0;
    settings.memory.database = dir.path().join("core.sqlite").display().to_string();
    edit(&mut settings);
    let store = Store::open(&settings.memory.database, Duration::from_secs(5))
        .await
        .unwrap();
    let worker = common::tiny_worker(WorkerOptions::default());
    let assistant = Arc::new(Assistant::new(store.clone(), worker.clone(), &settings));
    Fixture {
        assistant,
        store,
        worker,
        _dir: dir,
    }
}

fn key() -> ConversationKey {
    ConversationKey::new(Platform::Discord, "g1", "c1", "")
}

fn message(user: &str, text: &str, id: &str) -> Incoming {
    let mut m = Incoming::question(
        key(),
        Author {
            id: user.into(),
            name: format!("{user}-name"),
            roles: vec![],
        },
        text,
    );
    m.message_id = Some(id.into());
    m
}

fn command(user: &str, text: &str, private: bool) -> Incoming {
    let mut m = message(user, text, &format!("cmd-{text}-{user}"));
    m.message_id = None;
    m.request = Request::from_command_text(text);
    m.is_private = private;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_and_are_stored_once() {
    let f = fixture(|_| {}).await;
    let sink = Recorder::default();
    let outcome = f
        .assistant
        .handle(message("u1", "Hello, who are you?", "m1"), &sink)
        .await;
    let Outcome::Answered {
        finish,
        reply_id: Some(reply_id),
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(finish, FinishReason::Length);
    let calls = sink.calls();
    assert_eq!(calls[0], Call::Typing);
    assert!(calls.iter().any(|c| matches!(c, Call::Update(_))));
    let Some(Call::Finish(final_text)) = calls.last() else {
        panic!("{calls:?}")
    };
    let stored = f.store.message(reply_id).await.unwrap().unwrap();
    assert_eq!(&stored.content, final_text);
    assert_eq!(stored.status, Status::Complete);
    // Every update is a prefix of the final text.
    for c in &calls {
        if let Call::Update(t) = c {
            assert!(
                final_text.starts_with(t.as_str()),
                "{t:?} vs {final_text:?}"
            );
        }
    }

    // The same platform message again: answered once, no sink call at all.
    let again = Recorder::default();
    assert_eq!(
        f.assistant
            .handle(message("u1", "Hello, who are you?", "m1"), &again)
            .await,
        Outcome::Duplicate
    );
    assert!(again.calls().is_empty());
    let conv = f.store.find_conversation(&key()).await.unwrap().unwrap();
    assert_eq!(f.store.since_reset(&conv).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_deny_silently_and_store_nothing() {
    let f = fixture(|s| s.discord.access.allowed_users = vec!["u1".into()]).await;
    let sink = Recorder::default();
    assert_eq!(
        f.assistant
            .handle(message("intruder", "hi", "m1"), &sink)
            .await,
        Outcome::Denied
    );
    assert!(sink.calls().is_empty());
    assert!(f.store.find_conversation(&key()).await.unwrap().is_none());
    // Each platform has its own rules: Matrix's allow-list, not Discord's, decides there.
    let f = fixture(|s| s.matrix.access.allowed_users = vec!["@u1:x".into()]).await;
    let mut other = message("u1", "hi", "m2");
    other.key = ConversationKey::new(Platform::Matrix, "", "!r:x", "");
    assert_eq!(f.assistant.handle(other, &sink).await, Outcome::Denied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_says_when_to_retry_and_queues_nothing() {
    let f = fixture(|s| {
        s.limits.user_per_minute = 2;
        s.model.max_new_tokens = 2;
    })
    .await;
    for i in 0..2 {
        let sink = Recorder::default();
        let out = f
            .assistant
            .handle(message("u1", "hi", &format!("m{i}")), &sink)
            .await;
        assert!(matches!(out, Outcome::Answered { .. }), "{out:?}");
    }
    let sink = Recorder::default();
    let out = f.assistant.handle(message("u1", "hi", "m9"), &sink).await;
    let Outcome::RateLimited { retry_after } = out else {
        panic!("{out:?}")
    };
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(60));
    let calls = sink.calls();
    assert_eq!(calls.len(), 1);
    assert!(
        matches!(&calls[0], Call::Fail(t) if t.contains("Try again in")),
        "{calls:?}"
    );
    assert!(
        !f.store.is_known(Platform::Discord, "m9").await.unwrap(),
        "nothing stored or queued"
    );
    // Another user is not affected.
    let out = f
        .assistant
        .handle(message("u2", "hi", "m10"), &Recorder::default())
        .await;
    assert!(matches!(out, Outcome::Answered { .. }), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generation_per_conversation_in_arrival_order() {
    let f = fixture(|s| s.model.max_new_tokens = 6).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let a = f.assistant.clone();
        let id = format!("q{i}");
        tasks.push(tokio::spawn(async move {
            let sink = Recorder::default();
            let out = a
                .handle(message("u1", &format!("question {i}"), &id), &sink)
                .await;
            (out, sink.calls())
        }));
        // Wait until this question is stored, so arrival order is known.
        let store = f.store.clone();
        let qid = format!("q{i}");
        tokio::time::timeout(Duration::from_secs(30), async move {
            while !store.is_known(Platform::Discord, &qid).await.unwrap() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }
    for t in tasks {
        let (out, calls) = t.await.unwrap();
        assert!(matches!(out, Outcome::Answered { .. }), "{out:?} {calls:?}");
    }
    let conv = f.store.find_conversation(&key()).await.unwrap().unwrap();
    let msgs = f.store.since_reset(&conv).await.unwrap();
    let questions: Vec<i64> = msgs
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.id)
        .collect();
    let answered: Vec<i64> = msgs
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .map(|m| m.reply_to.unwrap())
        .collect();
    assert_eq!(
        answered, questions,
        "replies stored in the order the questions arrived"
    );
    // Each reply was generated from a prompt holding only the earlier exchanges: the prompt of
    // the last question, rebuilt now, has every question before it answered in order.
    let prepared = f
        .assistant
        .prompter()
        .prepare(
            &f.store,
            &conv,
            Some(*questions.last().unwrap()),
            None,
            false,
        )
        .await
        .unwrap();
    let text = prepared.built.text;
    let positions: Vec<usize> = (0..4)
        .map(|i| text.find(&format!("question {i}")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert_eq!(
        text.matches("\nASSISTANT:").count(),
        5,
        "four answers, each after its question, and the cue: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_failure_gives_a_user_facing_error_and_keeps_the_question() {
    let f = fixture(|_| {}).await;
    f.worker.shutdown();
    let sink = Recorder::default();
    assert_eq!(
        f.assistant
            .handle(message("u1", "are you there?", "m1"), &sink)
            .await,
        Outcome::Failed
    );
    assert_eq!(
        sink.calls().last(),
        Some(&Call::Fail(text::UNAVAILABLE.into()))
    );
    assert!(
        f.store.is_known(Platform::Discord, "m1").await.unwrap(),
        "the question is not lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_respect_admins_and_private_owners() {
    let f = fixture(|s| s.discord.access.admins = vec!["boss".into()]).await;
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "reset", false), &sink)
        .await;
    assert_eq!(sink.calls(), vec![Call::Notice(text::NOT_ALLOWED.into())]);
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "system be rude", false), &sink)
        .await;
    assert_eq!(sink.calls(), vec![Call::Notice(text::NOT_ALLOWED.into())]);
    let sink = Recorder::default();
    f.assistant
        .handle(command("boss", "system Be brief.", false), &sink)
        .await;
    assert_eq!(
        sink.calls(),
        vec![Call::Notice(text::system_set("Be brief."))]
    );
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "system", false), &sink)
        .await;
    assert_eq!(
        sink.calls(),
        vec![Call::Notice(text::system_is("Be brief.", true))]
    );
    // In a DM the user owns the conversation.
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "reset", true), &sink)
        .await;
    assert_eq!(sink.calls(), vec![Call::Notice(text::RESET_DONE.into())]);
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "frobnicate", false), &sink)
        .await;
    assert!(
        matches!(&sink.calls()[0], Call::Notice(t) if t.contains("unknown command `frobnicate`"))
    );
    let sink = Recorder::default();
    f.assistant
        .handle(command("u1", "stop", false), &sink)
        .await;
    assert_eq!(
        sink.calls(),
        vec![Call::Notice(text::NOTHING_TO_STOP.into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_delete_cancel_a_reply_in_progress() {
    let f = fixture(|s| s.model.max_new_tokens = 2000).await;
    let a = f.assistant.clone();
    let task = tokio::spawn(async move {
        let sink = Recorder::default();
        let out = a
            .handle(message("u1", "tell me everything", "long"), &sink)
            .await;
        (out, sink.calls())
    });
    // Wait until it is generating, then stop it.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !f.assistant.stop(&key()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let (out, calls) = task.await.unwrap();
    let Outcome::Answered {
        finish: FinishReason::Cancelled,
        reply_id: Some(id),
    } = out
    else {
        panic!("{out:?}")
    };
    assert!(matches!(calls.last(), Some(Call::Finish(t)) if t.ends_with(text::CANCELLED_SUFFIX)));
    assert_eq!(
        f.store.message(id).await.unwrap().unwrap().status,
        Status::Cancelled
    );

    // Deleting the question on the platform cancels its reply and removes it from memory.
    let a = f.assistant.clone();
    let task = tokio::spawn(async move {
        a.handle(
            message("u1", "another long one", "doomed"),
            &Recorder::default(),
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while !f.store.is_known(Platform::Discord, "doomed").await.unwrap() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        f.assistant
            .message_deleted(Platform::Discord, "doomed")
            .await
            .unwrap()
    );
    let out = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            out,
            Outcome::Answered {
                finish: FinishReason::Cancelled,
                reply_id: None
            } | Outcome::Rejected
        ),
        "{out:?}"
    );
    assert!(!f.store.is_known(Platform::Discord, "doomed").await.unwrap());
    let conv = f.store.find_conversation(&key()).await.unwrap().unwrap();
    assert!(
        f.store
            .since_reset(&conv)
            .await
            .unwrap()
            .iter()
            .all(|m| !m.content.contains("another long one"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_private_questions() {
    let f = fixture(|s| s.prompt.max_message_chars = 50).await;
    let sink = Recorder::default();
    let out = f
        .assistant
        .handle(message("u1", &"x".repeat(51), "big"), &sink)
        .await;
    assert_eq!(out, Outcome::Rejected);
    assert_eq!(sink.calls(), vec![Call::Fail(text::too_long(51, 50))]);
    assert!(!f.store.is_known(Platform::Discord, "big").await.unwrap());
    // A private one-off is answered but not remembered.
    let mut m = message("u1", "secret question", "p1");
    m.remember = false;
    let out = f.assistant.handle(m, &Recorder::default()).await;
    assert!(
        matches!(out, Outcome::Answered { reply_id: None, .. }),
        "{out:?}"
    );
    assert!(!f.store.is_known(Platform::Discord, "p1").await.unwrap());
    // Speaker names appear in group conversations.
    f.assistant
        .handle(message("u1", "named", "n1"), &Recorder::default())
        .await;
    let conv = f.store.find_conversation(&key()).await.unwrap().unwrap();
    let p = f
        .assistant
        .prompter()
        .prepare(&f.store, &conv, None, None, false)
        .await
        .unwrap();
    assert!(
        p.built.text.contains("\nUSER: u1-name: named"),
        "{}",
        p.built.text
    );
    assert!(!p.built.text.contains("secret question"));
}

/// Two daemons (each its own assistant, worker and store) on one PostgreSQL memory: given the
/// same message, one answers and the other drops it; given two questions of one conversation at
/// once, they answer one after the other, the second starting after the first reply is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_postgres_answer_once_and_in_turn() {
    let database = common::postgres::fresh_database().await;
    let mut settings = Settings::default();
    settings.model.max_new_tokens = 12;
    settings.sampling.temperature = 0.0;
    settings.memory.database = database.clone();
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let store = Store::open(&database, Duration::from_secs(5))
            .await
            .unwrap();
        let worker = common::tiny_worker(WorkerOptions::default());
        daemons.push(Arc::new(Assistant::new(store, worker, &settings)));
    }
    let store = Store::open(&database, Duration::from_secs(5))
        .await
        .unwrap();

    for round in 0..3 {
        let id = format!("same-{round}");
        let (a, b) = (Recorder::default(), Recorder::default());
        let (x, y) = tokio::join!(
            daemons[0].handle(message("u1", "Who answers?", &id), &a),
            daemons[1].handle(message("u1", "Who answers?", &id), &b),
        );
        let answered = [&x, &y]
            .iter()
            .filter(|o| matches!(o, Outcome::Answered { .. }))
            .count();
        let dropped = [&x, &y]
            .iter()
            .filter(|o| matches!(o, Outcome::Duplicate))
            .count();
        assert_eq!((answered, dropped), (1, 1), "round {round}: {x:?} {y:?}");
    }
    assert_eq!(
        common::stored_replies(&store, &key()).await,
        3,
        "one reply per message"
    );

    // Two questions of one conversation, one on each daemon, at the same moment: the second to
    // get its turn streams its first words only after the first has finished.
    let (a, b) = (Timed::default(), Timed::default());
    let (x, y) = tokio::join!(
        daemons[0].handle(message("u1", "first of two", "q-a"), &a),
        daemons[1].handle(message("u2", "second of two", "q-b"), &b),
    );
    assert!(
        matches!(
            x,
            Outcome::Answered {
                reply_id: Some(_),
                ..
            }
        ) && matches!(
            y,
            Outcome::Answered {
                reply_id: Some(_),
                ..
            }
        ),
        "both answered: {x:?} {y:?}"
    );
    let (a, b) = (a.times(), b.times());
    let (earlier, later) = if a.1 <= b.1 { (a, b) } else { (b, a) };
    assert!(
        later.0 > earlier.1,
        "the second began streaming {:?} before the first finished",
        earlier.1.duration_since(later.0)
    );
}

/// When a reply first streamed and when it finished.
#[derive(Default)]
struct Timed(Mutex<(Option<std::time::Instant>, Option<std::time::Instant>)>);

impl Timed {
    fn times(&self) -> (std::time::Instant, std::time::Instant) {
        let t = self.0.lock().unwrap();
        (t.0.expect("streamed"), t.1.expect("finished"))
    }
}

#[async_trait::async_trait]
impl ReplySink for Timed {
    async fn typing(&self) {}
    async fn queued(&self, _position: usize) {}
    async fn update(&self, _text_so_far: &str) {
        let mut t = self.0.lock().unwrap();
        t.0.get_or_insert_with(std::time::Instant::now);
    }
    async fn finish(&self, _text: &str) {
        let mut t = self.0.lock().unwrap();
        let now = std::time::Instant::now();
        t.0.get_or_insert(now);
        t.1 = Some(now);
    }
    async fn fail(&self, message: &str) {
        panic!("failed: {message}");
    }
    async fn notice(&self, _text: &str) {}
}

/// A platform whose every edit takes `delay`, as a slow or rate-limited one does.
struct SlowSink {
    inner: Recorder,
    delay: Duration,
}

#[async_trait::async_trait]
impl ReplySink for SlowSink {
    async fn typing(&self) {}
    async fn queued(&self, position: usize) {
        self.inner.queued(position).await
    }
    async fn update(&self, text_so_far: &str) {
        tokio::time::sleep(self.delay).await;
        self.inner.update(text_so_far).await
    }
    async fn finish(&self, text: &str) {
        self.inner.finish(text).await
    }
    async fn fail(&self, message: &str) {
        self.inner.fail(message).await
    }
    async fn notice(&self, text: &str) {
        self.inner.notice(text).await
    }
}

#[derive(Default)]
struct Reports(Mutex<Vec<synthia_bot::core::ReplyReport>>);

impl synthia_bot::core::Observer for Reports {
    fn answered(&self, _platform: Platform, report: &synthia_bot::core::ReplyReport) {
        self.0.lock().unwrap().push(report.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_counts_from_arrival_and_generation_time_is_the_workers_own() {
    let f = fixture(|s| s.model.max_new_tokens = 4).await;
    let reports = Arc::new(Reports::default());
    f.assistant.set_observer(reports.clone());

    // The first reply's platform takes 700 ms per edit, so its whole reply takes seconds while
    // the worker needs a fraction of that; the second question waits for the first's turn.
    let first = {
        let assistant = f.assistant.clone();
        tokio::spawn(async move {
            let sink = SlowSink {
                inner: Recorder::default(),
                delay: Duration::from_millis(700),
            };
            assistant
                .handle(message("u1", "first question", "t1"), &sink)
                .await;
            (std::time::Instant::now(), sink.inner.calls())
        })
    };
    common::daemon::eventually(
        "the first reply started",
        Duration::from_secs(30),
        || async {
            f.store
                .is_known(Platform::Discord, "t1")
                .await
                .unwrap()
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second_arrived = std::time::Instant::now();
    let sink = Recorder::default();
    f.assistant
        .handle(message("u2", "second question", "t2"), &sink)
        .await;
    let (first_done, first_calls) = first.await.unwrap();
    let updates = first_calls
        .iter()
        .filter(|c| matches!(c, Call::Update(_)))
        .count();
    assert!(updates >= 2, "{first_calls:?}");

    let reports = reports.0.lock().unwrap().clone();
    assert_eq!(reports.len(), 2, "{reports:?}");
    // The first: the worker's own time, without the 700 ms edits.
    let platform_time = Duration::from_millis(700) * updates as u32;
    assert!(
        reports[0].generation_time < platform_time / 2,
        "generation {:?} includes the platform's {platform_time:?}",
        reports[0].generation_time
    );
    // The second: its first token counts from its arrival, the wait for the first included.
    let waited = first_done.saturating_duration_since(second_arrived);
    let ttft = reports[1].time_to_first_token.expect("a first token");
    assert!(
        ttft >= waited.mul_f32(0.9),
        "time to first token {ttft:?} leaves out the {waited:?} waited for the turn"
    );
}
