//! The Synapse that `scripts/with-synapse` starts on 127.0.0.1, and "human" matrix-sdk clients
//! that talk to the bot through it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room::v3::Request as CreateRoom;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::{
    MessageType, OriginalSyncRoomMessageEvent, Relation, RoomMessageEventContent,
};
use matrix_sdk::ruma::events::typing::SyncTypingEvent;
use matrix_sdk::ruma::events::{InitialStateEvent, Mentions};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room};
use serde_json::{Value, json};

pub struct Synapse {
    pub url: String,
    secret: String,
}

impl Synapse {
    /// The homeserver `scripts/with-synapse` started. Tests of the Matrix adapter need it; run
    /// them through `scripts/test`, which starts one.
    pub fn from_env() -> Self {
        let url = std::env::var("SYNTHIA_TEST_SYNAPSE_URL").expect(
            "SYNTHIA_TEST_SYNAPSE_URL is not set: the Matrix tests need a Synapse; run them with scripts/test (or scripts/with-synapse cargo test)",
        );
        let secret = std::env::var("SYNTHIA_TEST_SYNAPSE_SECRET")
            .expect("SYNTHIA_TEST_SYNAPSE_SECRET is not set (scripts/with-synapse sets it)");
        Self { url, secret }
    }

    /// Registers a fresh user (a random suffix keeps parallel tests apart) through the
    /// shared-secret admin API. Returns the full user id and the password.
    pub async fn register(&self, name: &str) -> (OwnedUserId, String) {
        let localpart = format!("{name}-{:08x}", rand_u32());
        let password = format!("pw-{:08x}{:08x}", rand_u32(), rand_u32());
        let http = reqwest::Client::new();
        let endpoint = format!("{}/_synapse/admin/v1/register", self.url);
        let nonce: Value = http
            .get(&endpoint)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let nonce = nonce["nonce"].as_str().unwrap().to_string();
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(self.secret.as_bytes()).unwrap();
        mac.update(nonce.as_bytes());
        mac.update(b"\0");
        mac.update(localpart.as_bytes());
        mac.update(b"\0");
        mac.update(password.as_bytes());
        mac.update(b"\0");
        mac.update(b"notadmin");
        let digest = hex::encode(mac.finalize().into_bytes());
        let response = http
            .post(&endpoint)
            .json(&json!({
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "displayname": name,
                "admin": false,
                "mac": digest,
            }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "registering {localpart}: {body}");
        let user_id = UserId::parse(body["user_id"].as_str().unwrap()).unwrap();
        (user_id, password)
    }

    /// A logged-in person with a matrix-sdk client (in-memory store, encryption on) that syncs
    /// in the background and records what it sees.
    pub async fn human(&self, name: &str) -> Human {
        let (user_id, password) = self.register(name).await;
        let client = Client::builder()
            .homeserver_url(&self.url)
            .build()
            .await
            .unwrap();
        client
            .matrix_auth()
            .login_username(user_id.as_str(), &password)
            .initial_device_display_name(name)
            .send()
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        {
            let seen = seen.clone();
            client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
                let seen = seen.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .messages
                        .push((room.room_id().to_owned(), ev));
                }
            });
        }
        {
            let seen = seen.clone();
            client.add_event_handler(move |ev: SyncTypingEvent, room: Room| {
                let seen = seen.clone();
                async move {
                    let mut s = seen.lock().unwrap();
                    for u in ev.content.user_ids {
                        s.typing.push((room.room_id().to_owned(), u));
                    }
                }
            });
        }
        let first = client
            .sync_once(SyncSettings::default().timeout(Duration::ZERO))
            .await
            .unwrap();
        // Its own loop rather than `Client::sync`, which pauses a second between quick syncs and
        // could miss a short typing notice.
        let sync = {
            let client = client.clone();
            tokio::spawn(async move {
                let mut settings = SyncSettings::default()
                    .timeout(Duration::from_secs(5))
                    .token(first.next_batch);
                loop {
                    match client.sync_once(settings.clone()).await {
                        Ok(r) => settings = settings.token(r.next_batch),
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            })
        };
        Human {
            user_id,
            password,
            client,
            seen,
            sync,
        }
    }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

#[derive(Default)]
pub struct Seen {
    pub messages: Vec<(OwnedRoomId, OriginalSyncRoomMessageEvent)>,
    pub typing: Vec<(OwnedRoomId, OwnedUserId)>,
}

pub struct Human {
    pub user_id: OwnedUserId,
    pub password: String,
    pub client: Client,
    pub seen: Arc<Mutex<Seen>>,
    sync: tokio::task::JoinHandle<()>,
}

impl Drop for Human {
    fn drop(&mut self) {
        self.sync.abort();
    }
}

/// A reply of the bot as the human sees it: the first event and every edit of it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub event_id: OwnedEventId,
    pub first_body: String,
    pub is_notice: bool,
    pub relates_to: Option<
        Relation<matrix_sdk::ruma::events::room::message::RoomMessageEventContentWithoutRelation>,
    >,
    pub edits: Vec<String>,
    pub formatted: Option<String>,
}

impl Reply {
    pub fn final_text(&self) -> String {
        self.edits
            .last()
            .cloned()
            .unwrap_or_else(|| self.first_body.clone())
    }

    pub fn replies_to(&self) -> Option<OwnedEventId> {
        match &self.relates_to {
            Some(Relation::Reply(r)) => Some(r.in_reply_to.event_id.clone()),
            Some(Relation::Thread(t)) => t.in_reply_to.as_ref().map(|r| r.event_id.clone()),
            _ => None,
        }
    }

    pub fn thread_root(&self) -> Option<OwnedEventId> {
        match &self.relates_to {
            Some(Relation::Thread(t)) => Some(t.event_id.clone()),
            _ => None,
        }
    }
}

fn body_of(msgtype: &MessageType) -> String {
    match msgtype {
        MessageType::Text(t) => t.body.clone(),
        MessageType::Notice(n) => n.body.clone(),
        other => other.body().to_string(),
    }
}

impl Human {
    /// Creates a room and invites `others`; encrypted rooms carry `m.room.encryption` from the
    /// start.
    pub async fn create_room(&self, others: &[&UserId], encrypted: bool, direct: bool) -> Room {
        let mut request = CreateRoom::new();
        request.invite = others.iter().map(|u| u.to_owned().to_owned()).collect();
        request.is_direct = direct;
        if encrypted {
            request.initial_state = vec![
                InitialStateEvent::with_empty_state_key(
                    RoomEncryptionEventContent::with_recommended_defaults(),
                )
                .to_raw_any(),
            ];
        }
        self.client.create_room(request).await.unwrap()
    }

    pub fn room(&self, id: &RoomId) -> Room {
        self.client.get_room(id).expect("a room the human knows")
    }

    /// Sends a text message; `mention` adds the user to `m.mentions` and as a pill.
    pub async fn send(&self, room: &Room, text: &str, mention: Option<&UserId>) -> OwnedEventId {
        let mut content = RoomMessageEventContent::text_plain(text);
        if let Some(u) = mention {
            content = RoomMessageEventContent::text_html(
                text,
                format!(
                    "<a href=\"https://matrix.to/#/{u}\">{}</a> {text}",
                    u.localpart()
                ),
            )
            .add_mentions(Mentions::with_user_ids([u.to_owned()]));
        }
        self.send_content(room, content).await
    }

    pub async fn send_content(
        &self,
        room: &Room,
        content: RoomMessageEventContent,
    ) -> OwnedEventId {
        room.send(content).await.unwrap().response.event_id
    }

    /// Waits until `user` has joined the room (as this client sees it).
    pub async fn wait_joined(&self, room_id: &RoomId, user: &UserId, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(room) = self.client.get_room(room_id)
                && let Ok(Some(m)) = room.get_member_no_sync(user).await
                && *m.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Join
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{user} did not join {room_id} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until this client knows a device of `user`, so what it encrypts reaches it.
    pub async fn wait_device_of(&self, user: &UserId, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(devices) = self.client.encryption().get_user_devices(user).await
                && devices.devices().count() > 0
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no device of {user} known within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Messages from `sender` in the room, in arrival order, edits folded into what they edit.
    pub fn replies_from(&self, room_id: &RoomId, sender: &UserId) -> Vec<Reply> {
        let seen = self.seen.lock().unwrap();
        let mut out: Vec<Reply> = Vec::new();
        for (r, ev) in &seen.messages {
            if r != room_id || ev.sender != sender {
                continue;
            }
            match &ev.content.relates_to {
                Some(Relation::Replacement(rep)) => {
                    if let Some(orig) = out.iter_mut().find(|o| o.event_id == rep.event_id) {
                        orig.edits.push(body_of(&rep.new_content.msgtype));
                    }
                }
                other => out.push(Reply {
                    event_id: ev.event_id.clone(),
                    first_body: body_of(&ev.content.msgtype),
                    is_notice: matches!(ev.content.msgtype, MessageType::Notice(_)),
                    relates_to: other.clone(),
                    edits: Vec::new(),
                    formatted: match &ev.content.msgtype {
                        MessageType::Notice(n) => n.formatted.as_ref().map(|f| f.body.clone()),
                        _ => None,
                    },
                }),
            }
        }
        out
    }

    /// Waits for a reply to `question` whose last edit has stopped changing for `settle`.
    pub async fn wait_reply_to(
        &self,
        room_id: &RoomId,
        bot: &UserId,
        question: &OwnedEventId,
        within: Duration,
    ) -> Reply {
        let deadline = Instant::now() + within;
        let mut last: Option<(String, usize, Instant)> = None;
        loop {
            let found = self
                .replies_from(room_id, bot)
                .into_iter()
                .find(|r| r.replies_to().as_ref() == Some(question));
            if let Some(r) = found {
                let state = (r.final_text(), r.edits.len());
                match &last {
                    Some((t, n, since))
                        if *t == state.0
                            && *n == state.1
                            && since.elapsed() > Duration::from_secs(3) =>
                    {
                        return r;
                    }
                    Some((t, n, _)) if *t == state.0 && *n == state.1 => {}
                    _ => last = Some((state.0, state.1, Instant::now())),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no settled reply to {question} within {within:?}; saw {:?}",
                self.replies_from(room_id, bot)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn saw_typing(&self, room_id: &RoomId, user: &UserId) -> bool {
        self.seen
            .lock()
            .unwrap()
            .typing
            .iter()
            .any(|(r, u)| r == room_id && u == user)
    }
}

impl Human {
    /// Waits for an invite to the room and accepts it.
    pub async fn wait_invited_and_join(&self, room_id: &RoomId) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(room) = self.client.get_room(room_id)
                && room.state() == matrix_sdk::RoomState::Invited
            {
                room.join().await.unwrap();
                return;
            }
            assert!(Instant::now() < deadline, "no invite to {room_id}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
