//! The bot on llama.cpp's own server (`inference.backend = "openai"`): the real binary and the
//! real server (llama-cpp-python, `scripts/with-llama-cpp`) serving a GGUF model our writer
//! made, with a fault-injecting proxy between them for busy and failing answers, cut streams
//! and a server killed mid-reply.

mod common;
mod fake_discord;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault_proxy::{Fault, FaultProxy};
use common::llama_server::{LlamaServer, complete, free_port};
use fake_discord::{BOT_ID, CHANNEL, FakeDiscord, GUILD};
use synthia_bot::chat::{ConversationKey, Platform, Role};
use synthia_bot::core::text;
use synthia_bot::inference::{
    FinishReason, GenerationEvent, GenerationRequest, RemoteOptions, RemoteWorker, SamplingParams,
    Worker,
};
use synthia_bot::memory::Store;

const BIN: &str = env!("CARGO_BIN_EXE_synthia-bot");

struct Env {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn server(&self, name: &str, n_ctx: usize, port: u16) -> LlamaServer {
        LlamaServer::start(
            &common::tiny_gguf("f32"),
            n_ctx,
            port,
            self.dir.path().join(format!("{name}.log")),
        )
    }

    fn proxy(&self, server: &LlamaServer) -> FaultProxy {
        self.rt.block_on(FaultProxy::start(server.port))
    }

    /// The binary on the servers at `endpoints`, greedy, no model weights anywhere.
    fn command(&self, endpoints: &[String], args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(self.dir.path())
            .env("SYNTHIA_BOT__INFERENCE__BACKEND", "openai")
            .env("SYNTHIA_BOT__INFERENCE__ENDPOINTS", endpoints.join(","))
            .env("SYNTHIA_BOT__INFERENCE__MAX_IN_FLIGHT", "1")
            .env("SYNTHIA_BOT__INFERENCE__CONNECT_TIMEOUT_S", "2")
            .env("SYNTHIA_BOT__MODEL__TOKENIZER", common::tokenizer_path())
            .env("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", "12")
            .env("SYNTHIA_BOT__SAMPLING__TEMPERATURE", "0")
            .env(
                "SYNTHIA_BOT__MEMORY__DATABASE",
                self.dir.path().join("memory.sqlite"),
            )
            .env("SYNTHIA_BOT__PROMPT__SYSTEM", "You are a test.")
            .env_remove("SYNTHIA_BOT__MODEL__PATH")
            .env_remove("SYNTHIA_BOT_LOG");
        c
    }

    fn chat(&self, endpoints: &[String], input: &str, extra: &[(&str, &str)]) -> Output {
        let mut cmd = self.command(endpoints, &["chat"]);
        cmd.envs(extra.iter().copied());
        common::run_piped(&mut cmd, input)
    }

    fn run(&self, endpoints: &[String], args: &[&str]) -> String {
        let out = self.command(endpoints, args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn export(&self) -> Vec<serde_json::Value> {
        common::json_lines(&self.run(&["http://127.0.0.1:9/v1".into()], &["export"]))
    }
}

use common::chat_answers as answers;

#[test]
fn a_reply_streams_from_llama_cpp_with_our_prompt_byte_for_byte_and_is_stored() {
    let env = Env::new();
    let server = env.server("server", 2048, free_port());
    let proxy = env.proxy(&server);
    let endpoints = [proxy.base()];
    let out = env.chat(&endpoints, "Hello there\nWhat is two plus two?\n", &[]);
    assert_eq!(answers(&out), 2, "{}", String::from_utf8_lossy(&out.stdout));

    let sent = proxy.completions();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let second = sent[1].json();
    let prompt = second["prompt"].as_str().unwrap();
    assert_eq!(second["stream"], true);
    assert_eq!(second["max_tokens"], 12);
    assert_eq!(second["temperature"], 0.0);
    assert!(
        second["stop"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "\nUSER:"),
        "{second}"
    );
    // What the server got is what `synthia-bot prompt` renders, byte for byte: the prompt for
    // the next message begins with it, followed by the reply the server gave.
    let rendered = env.run(&endpoints, &["prompt", "--conversation", "console:default"]);
    assert!(
        prompt.starts_with("SYSTEM: You are a test.\nUSER: Hello there\nASSISTANT:"),
        "{prompt:?}"
    );
    assert!(
        prompt.ends_with("\nUSER: What is two plus two?\nASSISTANT:"),
        "{prompt:?}"
    );
    assert!(
        rendered.starts_with(prompt),
        "sent:\n{prompt:?}\nrendered:\n{rendered:?}"
    );

    // Greedy text through the bot equals the server's own answer to the same request.
    let exported = env.export();
    assert_eq!(exported.len(), 2);
    for (e, seen) in exported.iter().zip(&sent) {
        assert_eq!(e["status"], "complete", "{e}");
        let mut direct = seen.json();
        direct["stream"] = false.into();
        let answer = env.rt.block_on(complete(&server.base(), &direct));
        let text = answer["choices"][0]["text"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{answer}");
        assert_eq!(e["answer"].as_str().unwrap(), text.trim(), "{answer}");
    }
}

/// llama.cpp's server refuses an overlong prompt with a 400 naming its window; the proxy gives
/// that answer for the third question (llama-cpp-python 0.3.36 itself answers such prompts with a
/// 500 from a bug in its prefix handling), in front of a real server whose window is that size,
/// so the prompt built again must truly fit it, and so must every later one.
#[test]
fn a_prompt_too_long_for_the_servers_window_is_built_again_for_it_once() {
    let env = Env::new();
    let server = env.server("small", 160, free_port());
    let proxy = env.proxy(&server);
    proxy.plan([
        Fault::Pass,
        Fault::Pass,
        Fault::Body(
            400,
            r#"{"error":{"code":400,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error","n_prompt_tokens":200,"n_ctx":160}}"#.into(),
        ),
    ]);
    let endpoints = [proxy.base()];
    let long = "tell me about the weather and the sea ".repeat(5);
    let input = format!("{long}one\n{long}two\n{long}three\n{long}four\n");
    let out = env.chat(
        &endpoints,
        &input,
        &[("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", "8")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answers(&out), 4, "{stdout}\n{err}");
    assert!(!stdout.contains(text::FAILED), "{stdout}");
    assert!(err.contains("refused the prompt as too long"), "{err}");
    assert!(
        err.contains("building the prompt again for the server's window"),
        "{err}"
    );
    for e in env.export() {
        assert_eq!(e["status"], "complete", "{e}");
    }
    let sent = proxy.completions();
    assert_eq!(sent.len(), 5, "{sent:?}");
    let tokenizer =
        synthia_bot::inference::tokenizer::TextTokenizer::from_file(&common::tokenizer_path())
            .unwrap();
    let tokens = |i: usize| {
        let p = sent[i].json()["prompt"].as_str().unwrap().to_string();
        (tokenizer.encode(&p, true).unwrap().len(), p)
    };
    let (refused_len, refused) = tokens(2);
    let (again_len, again) = tokens(3);
    assert!(refused_len > 160, "{refused_len}");
    assert!(again_len + 8 <= 160, "{again_len}: {again:?}");
    // The same question, with less history before it.
    let question = &refused[refused.rfind("\nUSER: ").unwrap()..];
    assert!(again.ends_with(question), "{again:?}");
    // Built for the learned window from the start: the fourth question was not refused.
    let (last_len, _) = tokens(4);
    assert!(last_len + 8 <= 160, "{last_len}");
}

#[test]
fn busy_and_failing_servers_are_waited_out_or_left_for_the_other() {
    let env = Env::new();
    let one = env.server("one", 2048, free_port());
    let two = env.server("two", 2048, free_port());
    let (p1, p2) = (env.proxy(&one), env.proxy(&two));
    let endpoints = [p1.base(), p2.base()];
    // The first endpoint fails with a 500; the second answers busy twice, then serves.
    p1.plan([Fault::Status(500, None)]);
    p2.plan([Fault::Status(429, Some(0)), Fault::Status(503, None)]);
    let out = env.chat(&endpoints, "Hello there\n", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(answers(&out), 1, "{err}");
    assert!(err.contains("inference server is down"), "{err}");
    assert_eq!(p1.completions().len(), 1);
    assert_eq!(p2.completions().len(), 3);
    assert_eq!(env.export()[0]["status"], "complete");
}

/// Reads a child's output on a thread, so a test can wait for what it prints.
struct Reader(Arc<Mutex<String>>);

impl Reader {
    fn start(out: impl Read + Send + 'static) -> Self {
        Self(common::gather(out))
    }

    fn wait_for(&self, what: &str, times: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.0.lock().unwrap().clone();
            if text.matches(what).count() >= times {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {times}x {what:?} in:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn a_server_killed_mid_reply_is_replaced_and_both_down_is_a_clear_error_until_one_returns() {
    let env = Env::new();
    let port = free_port();
    let one = Arc::new(Mutex::new(env.server("one", 2048, port)));
    let mut two = env.server("two", 2048, free_port());
    let (p1, p2) = (env.proxy(&one.lock().unwrap()), env.proxy(&two));
    let endpoints = [p1.base(), p2.base()];
    let killed = one.clone();
    p1.plan([Fault::HookAfter(
        3,
        Box::new(move || killed.lock().unwrap().kill()),
    )]);
    let mut child = env
        .command(&endpoints, &["chat"])
        .env("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", "48")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Reader::start(child.stdout.take().unwrap());
    let stderr = Reader::start(child.stderr.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Tell me a long story\n").unwrap();
    stderr.wait_for("reply generated", 1);
    // The reply went on on the second server from where the first stopped.
    assert_eq!(p2.completions().len(), 1);
    let first = p1.completions()[0].json();
    let resumed = p2.completions()[0].json();
    let (first_prompt, resumed_prompt) = (
        first["prompt"].as_str().unwrap(),
        resumed["prompt"].as_str().unwrap(),
    );
    assert!(
        resumed_prompt.starts_with(first_prompt) && resumed_prompt.len() > first_prompt.len(),
        "{first_prompt:?} then {resumed_prompt:?}"
    );
    assert!(resumed["max_tokens"].as_u64().unwrap() < 48);

    // Both down: a clear answer, the question kept.
    two.kill();
    stdin.write_all(b"Are you there?\n").unwrap();
    stdout.wait_for(text::SERVERS_DOWN, 1);

    // One comes back on its port: the probes find it without a restart or a failed question.
    *one.lock().unwrap() = env.server("one-again", 2048, port);
    stderr.wait_for("inference server is back up", 1);
    stdin.write_all(b"And now?\n").unwrap();
    stderr.wait_for("reply generated", 3);
    drop(stdin);
    assert!(
        child.wait().unwrap().success(),
        "{}",
        stderr.0.lock().unwrap()
    );
    let err = stderr.0.lock().unwrap().clone();
    assert!(err.contains("continuing it on another server"), "{err}");
    assert!(err.contains("inference server is back up"), "{err}");

    let exported = env.export();
    let prompts: Vec<&str> = exported
        .iter()
        .map(|e| e["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(
        prompts,
        ["Tell me a long story", "Are you there?", "And now?"]
    );
    assert_eq!(exported[0]["status"], "complete");
    assert!(!exported[0]["answer"].as_str().unwrap().is_empty());
    assert_eq!(exported[1]["status"], "failed", "{}", exported[1]);
    assert_eq!(exported[2]["status"], "complete");
}

/// `/stop` and deleted questions cancel through the request's token: the backend drops the
/// request, and the server sees its client leave mid-stream.
#[test]
fn cancelling_drops_the_request_mid_stream() {
    let env = Env::new();
    let server = env.server("server", 2048, free_port());
    let proxy = env.proxy(&server);
    let tokenizer = common::llama2();
    env.rt.block_on(async {
        let worker = remote_worker(&proxy, tokenizer.clone());
        let mut handle = worker
            .submit(request(
                &tokenizer,
                "SYSTEM: s\nUSER: a very long story please\nASSISTANT:",
                1500,
            ))
            .unwrap();
        let result = loop {
            match handle.next().await {
                Some(GenerationEvent::Delta(_)) => handle.cancel(),
                Some(GenerationEvent::Finished(r)) => break r,
                Some(_) => {}
                None => panic!("no result"),
            }
        };
        assert_eq!(result.finish, FinishReason::Cancelled);
        assert!(result.completion_tokens < 1500);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !proxy.completions()[0].client_left {
            assert!(Instant::now() < deadline, "{:?}", proxy.completions());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker.shutdown();
    });
}

/// A busy server (429, 503) is waited out as it asks, the request told its place meanwhile.
#[test]
fn busy_answers_are_waited_out_with_the_place_in_line_told() {
    let env = Env::new();
    let server = env.server("server", 2048, free_port());
    let proxy = env.proxy(&server);
    proxy.plan([Fault::Status(429, Some(0)), Fault::Status(503, Some(0))]);
    let tokenizer = common::llama2();
    let events = env.rt.block_on(async {
        let worker = remote_worker(&proxy, tokenizer.clone());
        let mut handle = worker
            .submit(request(&tokenizer, "SYSTEM: s\nUSER: hi\nASSISTANT:", 6))
            .unwrap();
        let mut events = Vec::new();
        while let Some(e) = handle.next().await {
            let last = matches!(e, GenerationEvent::Finished(_));
            events.push(e);
            if last {
                break;
            }
        }
        let endpoints = worker.endpoints();
        worker.shutdown();
        (events, endpoints)
    });
    let (events, endpoints) = events;
    let queued = events
        .iter()
        .position(|e| *e == GenerationEvent::Queued { position: 1 })
        .expect("told its place");
    let first_text = events
        .iter()
        .position(|e| matches!(e, GenerationEvent::Delta(_)))
        .expect("text after the wait");
    assert!(queued < first_text, "{events:?}");
    match events.last() {
        Some(GenerationEvent::Finished(r)) => {
            assert!(r.error.is_none(), "{r:?}");
            assert!(r.completion_tokens > 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(proxy.completions().len(), 3);
    // Counted per endpoint, for the metrics.
    assert_eq!(endpoints[0].stats.errors["busy"], 2, "{endpoints:?}");
    assert_eq!(endpoints[0].stats.requests, 3);
    assert_eq!(endpoints[0].stats.first_tokens, 1);
    assert!(endpoints[0].up);
}

/// A greedy request for `text`, as the core would send it.
fn request(
    tokenizer: &synthia_bot::inference::tokenizer::TextTokenizer,
    text: &str,
    max_new: usize,
) -> GenerationRequest {
    GenerationRequest {
        conversation: "c".into(),
        prompt: tokenizer.encode(text, true).unwrap(),
        prompt_text: Some(text.into()),
        sampling: SamplingParams::greedy(),
        max_new_tokens: max_new,
        stop: vec![],
    }
}

/// The backend alone, on the server behind `proxy`.
fn remote_worker(
    proxy: &FaultProxy,
    tokenizer: Arc<synthia_bot::inference::tokenizer::TextTokenizer>,
) -> Worker {
    remote_worker_at(&proxy.base(), tokenizer)
}

fn remote_worker_at(
    base: &str,
    tokenizer: Arc<synthia_bot::inference::tokenizer::TextTokenizer>,
) -> Worker {
    RemoteWorker::spawn(
        RemoteOptions {
            endpoints: vec![base.to_string()],
            api_key: String::new(),
            model: String::new(),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_in_flight: 1,
            busy_wait: Duration::from_secs(10),
            queue_capacity: 8,
            context_length: 2048,
        },
        tokenizer,
    )
    .unwrap()
    .into()
}

/// vLLM lists its window as `max_model_len` under `/v1/models`; llama.cpp's server has `n_ctx`
/// in `/props`. Either lowers the window prompts are built for (here from 2,048).
#[test]
fn a_servers_window_is_read_from_its_model_list_or_its_props() {
    let env = Env::new();
    let tokenizer = common::llama2();
    env.rt.block_on(async {
        for (path, body, window) in [
            (
                "/v1/models",
                serde_json::json!({"object": "list", "data": [{"id": "m", "max_model_len": 512}]}),
                512,
            ),
            (
                "/props",
                serde_json::json!({"default_generation_settings": {"n_ctx": 300}}),
                300,
            ),
        ] {
            let app = axum::Router::new().route(
                path,
                axum::routing::get(move || {
                    let body = body.clone();
                    async move { axum::Json(body) }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            let worker = remote_worker_at(&format!("http://{addr}/v1"), tokenizer.clone());
            let deadline = Instant::now() + Duration::from_secs(10);
            while worker.context_length() != window {
                assert!(
                    Instant::now() < deadline,
                    "{path}: {}",
                    worker.context_length()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // A prompt the window cannot hold is refused before anything is sent.
            let long = vec![1u32; window];
            assert!(matches!(
                worker.submit(GenerationRequest {
                    conversation: "c".into(),
                    prompt: long,
                    prompt_text: None,
                    sampling: SamplingParams::greedy(),
                    max_new_tokens: 4,
                    stop: vec![],
                }),
                Err(synthia_bot::inference::WorkerError::PromptTooLong { .. })
            ));
            worker.shutdown();
        }
    });
}

/// With one server, a stream cut mid-reply is taken up once more on the same server, from the
/// text it had reached; the reply is stored once, whole.
#[test]
fn a_cut_stream_goes_on_from_where_it_stopped() {
    let env = Env::new();
    let server = env.server("server", 2048, free_port());
    let proxy = env.proxy(&server);
    proxy.plan([Fault::CutAfter(4)]);
    let out = env.chat(
        &[proxy.base()],
        "Tell me a story\n",
        &[("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", "24")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(answers(&out), 1, "{err}");
    assert!(err.contains("continuing it on another server"), "{err}");
    let sent = proxy.completions();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (first, again) = (sent[0].json(), sent[1].json());
    let (a, b) = (
        first["prompt"].as_str().unwrap(),
        again["prompt"].as_str().unwrap(),
    );
    assert!(b.starts_with(a) && b.len() > a.len(), "{a:?} then {b:?}");
    let rest = again["max_tokens"].as_u64().unwrap();
    assert!(rest < 24 && rest >= 24 - sent[0].events as u64, "{rest}");
    let exported = env.export();
    assert_eq!(exported.len(), 1);
    assert_eq!(exported[0]["status"], "complete");
    // The stored reply holds what the first stream gave and what the second added.
    let answer = exported[0]["answer"].as_str().unwrap();
    assert!(b[a.len()..].trim().len() <= answer.len(), "{answer:?}");
    assert!(
        answer.starts_with(b[a.len()..].trim()),
        "{answer:?} / {:?}",
        &b[a.len()..]
    );
}

#[test]
fn check_config_names_a_bad_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[inference]\nbackend = \"openai\"\nendpoints = [\"http://127.0.0.1:8080/v1\", \"127.0.0.1:8081\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--config", file.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inference.endpoints[1]"), "{err}");
    assert!(err.contains("127.0.0.1:8081"), "{err}");
}

/// `synthia-bot serve` against the fake Discord, generating on llama.cpp's server behind a proxy,
/// `max_new` tokens a reply; its database is `serve.sqlite` in the folder returned.
async fn serve_on_a_server(
    max_new: &str,
) -> (
    tempfile::TempDir,
    LlamaServer,
    FaultProxy,
    FakeDiscord,
    common::daemon::Daemon,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = LlamaServer::start(
        &common::tiny_gguf("f32"),
        2048,
        free_port(),
        dir.path().join("server.log"),
    );
    let proxy = FaultProxy::start(server.port).await;
    let fake = FakeDiscord::start().await;
    let mut cmd = common::daemon::serve_command(dir.path(), max_new, "1");
    cmd.env_remove("SYNTHIA_BOT__MODEL__PATH")
        .env("SYNTHIA_BOT__DISCORD__ENABLED", "true")
        .env("SYNTHIA_BOT__INFERENCE__BACKEND", "openai")
        .env("SYNTHIA_BOT__INFERENCE__ENDPOINTS", proxy.base())
        .env("SYNTHIA_BOT__MODEL__TOKENIZER", common::tokenizer_path())
        .env("SYNTHIA_BOT__SAMPLING__TEMPERATURE", "0")
        .env(
            "SYNTHIA_BOT__MEMORY__DATABASE",
            dir.path().join("serve.sqlite"),
        )
        .env("SYNTHIA_BOT__DISCORD__TOKEN", "fake-token")
        .env("SYNTHIA_BOT__DISCORD__API_BASE", fake.api_base());
    let daemon = common::daemon::Daemon::spawn(cmd);
    fake.wait_ready().await;
    (dir, server, proxy, fake, daemon)
}

/// `synthia-bot serve` on Discord (the fake, through the real serenity client), generating on
/// llama.cpp's server: a mention is answered, streamed and stored with the server's own text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_discord_from_the_server() {
    let (dir, server, proxy, fake, daemon) = serve_on_a_server("12").await;
    let db = dir.path().join("serve.sqlite");
    fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            9001,
            CHANNEL,
            Some(GUILD),
            (5001, "alice"),
            &format!("<@{BOT_ID}> hello there"),
            &[BOT_ID],
            None,
        ),
    );
    let store = Store::open(&db.display().to_string(), Duration::from_secs(5))
        .await
        .unwrap();
    let key = ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    );
    let stored = common::daemon::eventually("the stored reply", Duration::from_secs(60), || {
        let (store, key) = (store.clone(), key.clone());
        async move {
            let conv = store.find_conversation(&key).await.ok()??;
            let msgs = store.since_reset(&conv).await.ok()?;
            msgs.iter()
                .find(|m| m.role == Role::Assistant)
                .map(|m| m.content.clone())
        }
    })
    .await;
    fake.wait_for("the final text shown", |calls| {
        calls
            .iter()
            .any(|c| c.method != "GET" && c.body["content"].as_str() == Some(stored.as_str()))
    })
    .await;
    let sent = proxy.completions();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].json()["prompt"]
            .as_str()
            .unwrap()
            .ends_with("USER: alice: hello there\nASSISTANT:")
            || sent[0].json()["prompt"]
                .as_str()
                .unwrap()
                .ends_with("USER: hello there\nASSISTANT:"),
        "{}",
        sent[0].body
    );
    let mut direct = sent[0].json();
    direct["stream"] = false.into();
    let answer = complete(&server.base(), &direct).await;
    assert_eq!(
        answer["choices"][0]["text"].as_str().unwrap().trim(),
        stored
    );
    store.close().await;
    daemon.stop().await;
}

/// A question deleted on Discord while its answer streams from the server: `serve` drops the
/// request (the server sees its client leave) and stores no reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_question_drops_its_request_to_the_server() {
    let (dir, _server, proxy, fake, daemon) = serve_on_a_server("1500").await;
    let db = dir.path().join("serve.sqlite");
    fake.dispatch(
        "MESSAGE_CREATE",
        fake_discord::message(
            9101,
            CHANNEL,
            Some(GUILD),
            (5001, "alice"),
            &format!("<@{BOT_ID}> tell me everything"),
            &[BOT_ID],
            None,
        ),
    );
    common::daemon::eventually("the reply streaming", Duration::from_secs(60), || {
        let sent = proxy.completions();
        async move { sent.first().filter(|s| s.events >= 2).map(|_| ()) }
    })
    .await;
    fake.dispatch(
        "MESSAGE_DELETE",
        serde_json::json!({ "id": "9101", "channel_id": CHANNEL.to_string(), "guild_id": GUILD.to_string() }),
    );
    common::daemon::eventually("the server's client gone", Duration::from_secs(30), || {
        let sent = proxy.completions();
        async move { sent[0].client_left.then_some(()) }
    })
    .await;
    let sent = proxy.completions();
    assert!(sent[0].events < 1500, "{} events", sent[0].events);
    let store = Store::open(&db.display().to_string(), Duration::from_secs(5))
        .await
        .unwrap();
    let key = ConversationKey::new(
        Platform::Discord,
        &GUILD.to_string(),
        &CHANNEL.to_string(),
        "",
    );
    if let Some(conv) = store.find_conversation(&key).await.unwrap() {
        let msgs = store.since_reset(&conv).await.unwrap();
        assert!(msgs.iter().all(|m| m.role != Role::Assistant), "{msgs:?}");
    }
    store.close().await;
    daemon.stop().await;
}
