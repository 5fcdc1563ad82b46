//! Who sent an event, the bot or someone else: replies and thread roots count as "to the bot"
//! only when the bot sent them. Recent answers are remembered (senders never change, so entries
//! never go stale, only old); anything else is asked of the server once.

use std::collections::{HashMap, VecDeque};

use matrix_sdk::Room;
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId};

use super::shared::Shared;

/// Who sent recent events (the bot or not), so replies and thread roots are checked without
/// a request each time; senders never change, so entries never go stale, only old.
#[derive(Default)]
pub(super) struct Senders {
    by_bot: HashMap<OwnedEventId, bool>,
    order: VecDeque<OwnedEventId>,
}

impl Senders {
    const KEEP: usize = 4096;

    fn insert(&mut self, id: OwnedEventId, by_bot: bool) {
        if self.by_bot.insert(id.clone(), by_bot).is_none() {
            self.order.push_back(id);
            if self.order.len() > Self::KEEP
                && let Some(old) = self.order.pop_front()
            {
                self.by_bot.remove(&old);
            }
        }
    }

    fn get(&self, id: &matrix_sdk::ruma::EventId) -> Option<bool> {
        self.by_bot.get(id).copied()
    }
}

impl Shared {
    pub(super) fn remember_sender(&self, id: OwnedEventId, by_bot: bool) {
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, by_bot);
    }

    /// Whether an event in the room was sent by the bot: known senders first, else the server.
    pub(super) async fn is_bots_event(&self, room: &Room, id: &matrix_sdk::ruma::EventId) -> bool {
        let known = self
            .senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id);
        if let Some(by_bot) = known {
            return by_bot;
        }
        match room.event(id, None).await {
            Ok(ev) => {
                let by_bot = ev
                    .raw()
                    .get_field::<OwnedUserId>("sender")
                    .ok()
                    .flatten()
                    .is_some_and(|s| s == self.user_id);
                self.remember_sender(id.to_owned(), by_bot);
                by_bot
            }
            Err(e) => {
                tracing::debug!(error = %e, event = %id, "cannot fetch the replied-to event");
                false
            }
        }
    }
}
