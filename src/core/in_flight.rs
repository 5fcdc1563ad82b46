//! Replies being written, by conversation, so `/stop`, a deleted question or a shutdown can
//! cancel them.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::chat::{ConversationKey, Platform};
use crate::inference::CancelToken;

struct Reply {
    message_id: Option<String>,
    cancel: CancelToken,
}

#[derive(Default)]
pub(super) struct InFlight {
    map: Mutex<HashMap<ConversationKey, Vec<Reply>>>,
}

impl InFlight {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationKey, Vec<Reply>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn track(
        &self,
        key: &ConversationKey,
        message_id: Option<String>,
        cancel: CancelToken,
    ) {
        self.map()
            .entry(key.clone())
            .or_default()
            .push(Reply { message_id, cancel });
    }

    pub(super) fn untrack(&self, key: &ConversationKey, cancel: &CancelToken) {
        let mut map = self.map();
        if let Some(list) = map.get_mut(key) {
            list.retain(|f| !f.cancel.same_as(cancel));
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Cancels the conversation's replies; true if there was one.
    pub(super) fn cancel_conversation(&self, key: &ConversationKey) -> bool {
        match self.map().get(key) {
            Some(list) if !list.is_empty() => {
                list.iter().for_each(|f| f.cancel.cancel());
                true
            }
            _ => false,
        }
    }

    /// Cancels the reply to one platform message.
    pub(super) fn cancel_message(&self, platform: Platform, message_id: &str) {
        let map = self.map();
        for f in map
            .iter()
            .filter(|(k, _)| k.platform == platform)
            .flat_map(|(_, l)| l)
        {
            if f.message_id.as_deref() == Some(message_id) {
                f.cancel.cancel();
            }
        }
    }

    pub(super) fn cancel_all(&self) {
        self.map()
            .values()
            .flatten()
            .for_each(|f| f.cancel.cancel());
    }
}
