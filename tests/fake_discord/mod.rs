//! A protocol-level fake of Discord on 127.0.0.1: the gateway websocket (HELLO, IDENTIFY/READY,
//! heartbeats, RESUME, dispatches) and the REST routes the bot uses. It records every REST call
//! so tests can assert on what the real serenity client sent. Like Discord it may announce
//! several shards: each IDENTIFY names its shard, and a guild's events go to the session of shard
//! `(guild_id >> 22) % total`, direct messages to shard 0.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State as AxState};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

pub const BOT_ID: u64 = 1000;
pub const APP_ID: u64 = 2000;
pub const GUILD: u64 = 3000;
pub const CHANNEL: u64 = 4000;
pub const DM_CHANNEL: u64 = 4001;

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub at: Instant,
    pub status: u16,
    /// The message a successful post or edit created or changed.
    pub message_id: Option<String>,
}

/// How the fake answers an edit instead of applying it.
#[derive(Debug, Clone, Copy)]
pub enum EditFailure {
    /// Discord's edge: 502 with an HTML page, no JSON.
    BadGateway,
    /// 429 with `retry_after` (seconds) in the body and in the `Retry-After` (whole seconds,
    /// rounded up) and `X-RateLimit-Reset-After` headers, as Discord sends them.
    RateLimited { retry_after: f64 },
    /// No answer for this long (the edit then goes through): a request left hanging.
    Hang { seconds: f64 },
}

enum GwCommand {
    Dispatch(String, Value),
    Close(u16),
}

#[derive(Default)]
struct Shared {
    addr: Mutex<Option<SocketAddr>>,
    calls: Mutex<Vec<Call>>,
    changed: Notify,
    next_id: AtomicU64,
    /// Shards `/gateway/bot` recommends; 0 is taken as 1.
    shards: AtomicU32,
    /// The live session of each shard, by shard id.
    gateways: Mutex<HashMap<u32, mpsc::UnboundedSender<GwCommand>>>,
    /// The `[shard, total]` of every IDENTIFY, in order.
    identified: Mutex<Vec<[u32; 2]>>,
    ready: Notify,
    identifies: AtomicUsize,
    resumes: AtomicUsize,
    fail_edits: AtomicUsize,
    edit_failures: Mutex<std::collections::VecDeque<EditFailure>>,
    /// Messages created with `enforce_nonce`, by nonce: Discord answers a repeat with the first.
    nonces: Mutex<std::collections::HashMap<String, Value>>,
    replay_on_resume: Mutex<Vec<(String, Value)>>,
    /// Events sent in the same burst as READY, just ahead of it.
    with_ready: Mutex<Vec<(String, Value)>>,
}

pub struct FakeDiscord {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn user(id: u64, name: &str, bot: bool) -> Value {
    json!({
        "id": id.to_string(), "username": name, "discriminator": "0000", "global_name": name,
        "avatar": null, "bot": bot, "mfa_enabled": false, "verified": true, "flags": 0
    })
}

/// A MESSAGE_CREATE payload. `mentions` are user ids; `reply_to` a message to quote.
pub fn message(
    id: u64,
    channel: u64,
    guild: Option<u64>,
    author: (u64, &str),
    content: &str,
    mentions: &[u64],
    reply_to: Option<Value>,
) -> Value {
    let mut m = json!({
        "id": id.to_string(),
        "channel_id": channel.to_string(),
        "author": user(author.0, author.1, author.0 == BOT_ID),
        "content": content,
        "timestamp": "2026-11-27T00:00:00.000000+00:00",
        "edited_timestamp": null,
        "tts": false,
        "mention_everyone": false,
        "mentions": mentions.iter().map(|u| user(*u, if *u == BOT_ID { "synthia" } else { "someone" }, *u == BOT_ID)).collect::<Vec<_>>(),
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": false,
        "type": if reply_to.is_some() { 19 } else { 0 },
    });
    if let Some(g) = guild {
        m["guild_id"] = json!(g.to_string());
        m["member"] = json!({ "roles": [], "joined_at": "2026-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false, "nick": null, "flags": 0 });
    }
    if let Some(r) = reply_to {
        m["message_reference"] = json!({ "message_id": r["id"], "channel_id": r["channel_id"] });
        m["referenced_message"] = r;
    }
    m
}

/// An INTERACTION_CREATE payload for a slash command in the test guild.
pub fn interaction(id: u64, name: &str, options: Value, author: (u64, &str)) -> Value {
    json!({
        "id": id.to_string(),
        "application_id": APP_ID.to_string(),
        "type": 2,
        "token": format!("token-{id}"),
        "version": 1,
        "data": { "id": "9001", "name": name, "type": 1, "options": options },
        "guild_id": GUILD.to_string(),
        "channel_id": CHANNEL.to_string(),
        "channel": { "id": CHANNEL.to_string(), "type": 0 },
        "member": {
            "user": user(author.0, author.1, false),
            "roles": [], "joined_at": "2026-01-01T00:00:00.000000+00:00", "deaf": false, "mute": false,
            "flags": 0, "permissions": "0"
        },
        "app_permissions": "0",
        "locale": "en-US",
        "guild_locale": "en-US",
        "entitlements": [],
        "authorizing_integration_owners": {},
        "attachment_size_limit": 8388608
    })
}

impl FakeDiscord {
    pub async fn start() -> Self {
        let shared = Arc::new(Shared {
            next_id: AtomicU64::new(900_000),
            ..Shared::default()
        });
        let app = Router::new()
            .route("/api/v10/gateway", get(gateway_url))
            .route("/api/v10/gateway/bot", get(gateway_url))
            .route("/api/v10/users/@me", get(current_user))
            .route("/api/v10/applications/{app}/commands", put(commands))
            .route(
                "/api/v10/applications/{app}/guilds/{guild}/commands",
                put(commands),
            )
            .route("/api/v10/channels/{channel}/messages", post(create_message))
            .route(
                "/api/v10/channels/{channel}/messages/{message}",
                patch(edit_message),
            )
            .route("/api/v10/channels/{channel}/typing", post(no_content))
            .route(
                "/api/v10/interactions/{id}/{token}/callback",
                post(no_content),
            )
            .route("/api/v10/webhooks/{app}/{token}", post(create_followup))
            .route(
                "/api/v10/webhooks/{app}/{token}/messages/{message}",
                patch(edit_webhook),
            )
            .route("/gw", get(gateway_ws))
            .fallback(unknown)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        *shared.addr.lock().unwrap() = Some(addr);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for the client's IDENTIFY to be answered with READY.
    pub async fn wait_ready(&self) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.shared.identifies.load(Ordering::SeqCst) == 0
                || self.shared.gateways.lock().unwrap().is_empty()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the bot never identified on the fake gateway");
        // serenity handles READY (and registers commands) right after; give it a moment.
        self.wait_for("command registration", |c| {
            c.iter().any(|c| c.path.contains("/commands"))
        })
        .await;
    }

    /// Sends an event to the session of the shard Discord would route it to.
    pub fn dispatch(&self, t: &str, d: Value) {
        let shard = self.shard_of(&d);
        self.dispatch_to(shard, t, d);
    }

    /// Sends an event to one shard's session, wherever Discord would route it (a message
    /// delivered twice, as during an overlapping restart).
    pub fn dispatch_to(&self, shard: u32, t: &str, d: Value) {
        let tx = self
            .shared
            .gateways
            .lock()
            .unwrap()
            .get(&shard)
            .cloned()
            .unwrap_or_else(|| panic!("no gateway connection for shard {shard}"));
        tx.send(GwCommand::Dispatch(t.to_string(), d))
            .expect("gateway connection gone");
    }

    /// Like [`Self::dispatch`], but answers false instead of failing while no client is
    /// connected (a test that kills the bot keeps sending).
    pub fn try_dispatch(&self, t: &str, d: Value) -> bool {
        let shard = self.shard_of(&d);
        let tx = self.shared.gateways.lock().unwrap().get(&shard).cloned();
        tx.is_some_and(|tx| tx.send(GwCommand::Dispatch(t.to_string(), d)).is_ok())
    }

    /// The shard Discord sends an event to: by its guild, direct messages to shard 0.
    pub fn shard_of(&self, d: &Value) -> u32 {
        let total = u64::from(self.shared.shards.load(Ordering::SeqCst).max(1));
        let guild = d["guild_id"]
            .as_str()
            .and_then(|g| g.parse::<u64>().ok())
            .or_else(|| d["guild_id"].as_u64());
        guild.map_or(0, |g| ((g >> 22) % total) as u32)
    }

    /// How many shards `/gateway/bot` recommends.
    pub fn set_shards(&self, total: u32) {
        self.shared.shards.store(total, Ordering::SeqCst);
    }

    /// The `[shard, total]` of every IDENTIFY so far.
    pub fn identified(&self) -> Vec<[u32; 2]> {
        self.shared.identified.lock().unwrap().clone()
    }

    /// Waits until every one of `shards` has a live session.
    pub async fn wait_shards(&self, shards: &[u32]) {
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let all = {
                    let live = self.shared.gateways.lock().unwrap();
                    shards.iter().all(|s| live.contains_key(s))
                };
                if all {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "shards {shards:?} never all identified: {:?}",
                self.identified()
            )
        });
    }

    /// Closes the gateway with 4000 (the client resumes); `replay` is sent again after RESUMED,
    /// as Discord replays events the client missed.
    pub async fn close_for_resume(&self, replay: Vec<(String, Value)>) {
        *self.shared.replay_on_resume.lock().unwrap() = replay;
        let tx = self
            .shared
            .gateways
            .lock()
            .unwrap()
            .remove(&0)
            .expect("no gateway connection");
        let _ = tx.send(GwCommand::Close(4000));
        tokio::time::timeout(Duration::from_secs(30), async {
            while self.shared.resumes.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the bot did not resume");
    }

    pub fn resumes(&self) -> usize {
        self.shared.resumes.load(Ordering::SeqCst)
    }

    pub fn identifies(&self) -> usize {
        self.shared.identifies.load(Ordering::SeqCst)
    }

    /// Events to send in the same burst as the next READY, just ahead of it, so the client
    /// handles them before its ready handler has run (the race serenity's concurrent handlers
    /// allow when they arrive right behind READY, made certain).
    pub fn send_with_ready(&self, events: Vec<(String, Value)>) {
        *self.shared.with_ready.lock().unwrap() = events;
    }

    /// The next `n` message edits are answered 429.
    pub fn fail_next_edits(&self, n: usize) {
        self.shared.fail_edits.store(n, Ordering::SeqCst);
    }

    /// The next edits are answered with `failures`, in order, before any edit succeeds.
    pub fn fail_edits_with(&self, failures: Vec<EditFailure>) {
        self.shared.edit_failures.lock().unwrap().extend(failures);
    }

    /// Forgets the edit failures not used yet.
    pub fn clear_edit_failures(&self) {
        self.shared.edit_failures.lock().unwrap().clear();
    }

    /// When the client first called `path`.
    pub fn first_call_at(&self, path: &str) -> Option<Instant> {
        self.calls().iter().find(|c| c.path == path).map(|c| c.at)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the recorded calls; fails loudly with them otherwise.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.shared.changed.notified();
            let calls = self.calls();
            if done(&calls) {
                return calls;
            }
            if Instant::now() > deadline {
                let listing: Vec<String> = calls
                    .iter()
                    .map(|c| format!("{} {} {}", c.method, c.path, c.body))
                    .collect();
                panic!(
                    "timed out waiting for {what}; calls:\n{}",
                    listing.join("\n")
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

fn record(s: &Shared, method: &str, path: &str, body: Value, status: u16) {
    record_message(s, method, path, body, status, None);
}

fn record_message(
    s: &Shared,
    method: &str,
    path: &str,
    body: Value,
    status: u16,
    message_id: Option<String>,
) {
    s.calls.lock().unwrap().push(Call {
        method: method.into(),
        path: path.into(),
        body,
        at: Instant::now(),
        status,
        message_id,
    });
    s.changed.notify_waiters();
}

fn parse(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn bot_message(s: &Shared, channel: &str, body: &Value, id: Option<String>) -> Value {
    let id = id.unwrap_or_else(|| s.next_id.fetch_add(1, Ordering::SeqCst).to_string());
    let mut m = message(
        0,
        1,
        None,
        (BOT_ID, "synthia"),
        body["content"].as_str().unwrap_or(""),
        &[],
        None,
    );
    m["id"] = json!(id);
    m["channel_id"] = json!(channel);
    m
}

/// The token the fake refuses, as Discord refuses a reset or mistyped one.
pub const REFUSED_TOKEN: &str = "refused-token";

fn refused(headers: &axum::http::HeaderMap) -> Option<Response> {
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    (auth == format!("Bot {REFUSED_TOKEN}")).then(|| {
        (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(json!({ "message": "401: Unauthorized", "code": 0 })),
        )
            .into_response()
    })
}

async fn gateway_url(AxState(s): AxState<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(r) = refused(&headers) {
        record(&s, "GET", "/api/v10/gateway", Value::Null, 401);
        return r;
    }
    let addr = s.addr.lock().unwrap().expect("bound");
    record(&s, "GET", "/api/v10/gateway", Value::Null, 200);
    let shards = s.shards.load(Ordering::SeqCst).max(1);
    axum::Json(json!({ "url": format!("ws://{addr}/gw"), "shards": shards,
        "session_start_limit": { "total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1 } }))
    .into_response()
}

async fn current_user(
    AxState(s): AxState<Arc<Shared>>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(r) = refused(&headers) {
        record(&s, "GET", "/api/v10/users/@me", Value::Null, 401);
        return r;
    }
    record(&s, "GET", "/api/v10/users/@me", Value::Null, 200);
    axum::Json(user(BOT_ID, "synthia", true)).into_response()
}

async fn commands(AxState(s): AxState<Arc<Shared>>, uri: Uri, body: String) -> Response {
    record(&s, "PUT", uri.path(), parse(&body), 200);
    axum::Json(json!([])).into_response()
}

async fn create_message(
    AxState(s): AxState<Arc<Shared>>,
    Path(channel): Path<String>,
    uri: Uri,
    body: String,
) -> Response {
    let body = parse(&body);
    let nonce = body["nonce"]
        .as_str()
        .filter(|_| body["enforce_nonce"] == json!(true))
        .map(str::to_string);
    if let Some(n) = &nonce
        && let Some(first) = s.nonces.lock().unwrap().get(n).cloned()
    {
        let id = first["id"].as_str().map(str::to_string);
        record_message(&s, "POST", uri.path(), body, 200, id);
        return axum::Json(first).into_response();
    }
    let m = bot_message(&s, &channel, &body, None);
    if let Some(n) = nonce {
        s.nonces.lock().unwrap().insert(n, m.clone());
    }
    let id = m["id"].as_str().map(str::to_string);
    record_message(&s, "POST", uri.path(), body, 200, id);
    axum::Json(m).into_response()
}

/// Discord's edge answering for an API it cannot reach.
const BAD_GATEWAY_PAGE: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n";

fn edit_failure(f: EditFailure) -> Response {
    match f {
        EditFailure::Hang { .. } => StatusCode::OK.into_response(),
        EditFailure::BadGateway => (
            StatusCode::BAD_GATEWAY,
            [("content-type", "text/html")],
            BAD_GATEWAY_PAGE,
        )
            .into_response(),
        EditFailure::RateLimited { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("retry-after", retry_after.ceil().to_string()),
                ("x-ratelimit-reset-after", format!("{retry_after:.3}")),
                ("x-ratelimit-scope", "user".to_string()),
            ],
            axum::Json(json!({ "message": "You are being rate limited.", "retry_after": retry_after, "global": false, "code": 0 })),
        )
            .into_response(),
    }
}

async fn edit_message(
    AxState(s): AxState<Arc<Shared>>,
    Path((channel, id)): Path<(String, String)>,
    uri: Uri,
    body: String,
) -> Response {
    let body = parse(&body);
    let scripted = s.edit_failures.lock().unwrap().pop_front();
    if let Some(EditFailure::Hang { seconds }) = scripted {
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    } else if let Some(f) = scripted {
        let status = match f {
            EditFailure::BadGateway => 502,
            EditFailure::RateLimited { .. } => 429,
            EditFailure::Hang { .. } => unreachable!("answered above"),
        };
        record(&s, "PATCH", uri.path(), body, status);
        return edit_failure(f);
    }
    let failing = s
        .fail_edits
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        record(&s, "PATCH", uri.path(), body, 429);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1"), ("x-ratelimit-scope", "user")],
            axum::Json(json!({ "message": "You are being rate limited.", "retry_after": 0.5, "global": false, "code": 0 })),
        )
            .into_response();
    }
    record_message(&s, "PATCH", uri.path(), body.clone(), 200, Some(id.clone()));
    axum::Json(bot_message(&s, &channel, &body, Some(id))).into_response()
}

async fn create_followup(AxState(s): AxState<Arc<Shared>>, uri: Uri, body: String) -> Response {
    let body = parse(&body);
    let m = bot_message(&s, &CHANNEL.to_string(), &body, None);
    let id = m["id"].as_str().map(str::to_string);
    record_message(&s, "POST", uri.path(), body, 200, id);
    axum::Json(m).into_response()
}

async fn edit_webhook(
    AxState(s): AxState<Arc<Shared>>,
    Path((_app, _token, id)): Path<(String, String, String)>,
    uri: Uri,
    body: String,
) -> Response {
    let body = parse(&body);
    record(&s, "PATCH", uri.path(), body.clone(), 200);
    let id = if id == "@original" {
        "800001".to_string()
    } else {
        id
    };
    axum::Json(bot_message(&s, &CHANNEL.to_string(), &body, Some(id))).into_response()
}

async fn no_content(AxState(s): AxState<Arc<Shared>>, uri: Uri, body: String) -> Response {
    record(&s, "POST", uri.path(), parse(&body), 204);
    StatusCode::NO_CONTENT.into_response()
}

async fn unknown(
    AxState(s): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: String,
) -> Response {
    record(&s, method.as_str(), uri.path(), parse(&body), 404);
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "message": "Unknown route in the fake", "code": 0 })),
    )
        .into_response()
}

async fn gateway_ws(AxState(s): AxState<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve_gateway(s, socket))
}

fn frame(op: u8, t: Option<&str>, seq: Option<u64>, d: Value) -> WsMessage {
    WsMessage::Text(
        json!({ "op": op, "t": t, "s": seq, "d": d })
            .to_string()
            .into(),
    )
}

async fn serve_gateway(s: Arc<Shared>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if socket
        .send(frame(
            10,
            None,
            None,
            json!({ "heartbeat_interval": 41250 }),
        ))
        .await
        .is_err()
    {
        return;
    }
    let addr = s.addr.lock().unwrap().expect("bound");
    // Sequence numbers count per session, as Discord's do; a resumed session goes on from the
    // client's last.
    let mut seq: u64 = 0;
    let mut shard: u32;
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let Some(Ok(msg)) = incoming else { break };
                let WsMessage::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                match v["op"].as_u64() {
                    Some(1) => {
                        let _ = socket.send(WsMessage::Text(json!({ "op": 11 }).to_string().into())).await;
                    }
                    Some(2) => {
                        s.identifies.fetch_add(1, Ordering::SeqCst);
                        let pair = &v["d"]["shard"];
                        shard = pair[0].as_u64().unwrap_or(0) as u32;
                        let total = pair[1].as_u64().unwrap_or(1) as u32;
                        s.identified.lock().unwrap().push([shard, total]);
                        seq = 0;
                        let ready = json!({
                            "v": 10, "user": user(BOT_ID, "synthia", true), "guilds": [],
                            "session_id": format!("session-{shard}"),
                            "resume_gateway_url": format!("ws://{addr}/gw"),
                            "shard": [shard, total], "application": { "id": APP_ID.to_string(), "flags": 0 }
                        });
                        // The burst goes out first, so serenity has these events in hand before
                        // READY: their handlers run with the ready handler not yet run.
                        let burst = std::mem::take(&mut *s.with_ready.lock().unwrap());
                        for (t, d) in burst {
                            seq += 1;
                            let _ = socket.send(frame(0, Some(&t), Some(seq), d)).await;
                        }
                        seq += 1;
                        let _ = socket.send(frame(0, Some("READY"), Some(seq), ready)).await;
                        s.gateways.lock().unwrap().insert(shard, tx.clone());
                    }
                    Some(6) => {
                        s.resumes.fetch_add(1, Ordering::SeqCst);
                        shard = v["d"]["session_id"]
                            .as_str()
                            .and_then(|id| id.strip_prefix("session-"))
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        seq = v["d"]["seq"].as_u64().unwrap_or(0);
                        seq += 1;
                        let _ = socket.send(frame(0, Some("RESUMED"), Some(seq), json!({}))).await;
                        let replay = std::mem::take(&mut *s.replay_on_resume.lock().unwrap());
                        for (t, d) in replay {
                            seq += 1;
                            let _ = socket.send(frame(0, Some(&t), Some(seq), d)).await;
                        }
                        s.gateways.lock().unwrap().insert(shard, tx.clone());
                    }
                    _ => {}
                }
            }
            command = rx.recv() => {
                match command {
                    Some(GwCommand::Dispatch(t, d)) => {
                        seq += 1;
                        if socket.send(frame(0, Some(&t), Some(seq), d)).await.is_err() {
                            break;
                        }
                    }
                    Some(GwCommand::Close(code)) => {
                        let _ = socket.send(WsMessage::Close(Some(CloseFrame { code, reason: "test".into() }))).await;
                        break;
                    }
                    None => break,
                }
            }
        }
    }
}
