//! The state every event handler and reply shares: the assistant, the Matrix settings, who the
//! bot is, when it started (older events are backlog) and the caches the handlers keep. The
//! handlers themselves are methods on it, in `handlers` and `rooms`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use matrix_sdk::ruma::{MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId};

use super::PLATFORM;
use super::senders::Senders;
use crate::config::MatrixSettings;
use crate::core::Assistant;

/// State the event handlers share.
pub(super) struct Shared {
    pub(super) assistant: Arc<Assistant>,
    pub(super) settings: MatrixSettings,
    pub(super) user_id: OwnedUserId,
    pub(super) display_name: String,
    /// Events from before this moment are backlog.
    pub(super) started: MilliSecondsSinceUnixEpoch,
    pub(super) senders: Mutex<Senders>,
    /// Whether each room is a DM, until its membership changes.
    pub(super) direct: Mutex<HashMap<OwnedRoomId, bool>>,
    /// When each room was last told that a message could not be decrypted.
    pub(super) undecryptable: Mutex<HashMap<OwnedRoomId, Instant>>,
}

impl Shared {
    /// The bot's state from now on: events older than this call are backlog.
    pub(super) fn new(
        assistant: Arc<Assistant>,
        settings: &MatrixSettings,
        user_id: OwnedUserId,
        display_name: String,
    ) -> Self {
        Shared {
            assistant,
            settings: settings.clone(),
            user_id,
            display_name,
            started: MilliSecondsSinceUnixEpoch::now(),
            senders: Mutex::new(Senders::default()),
            direct: Mutex::new(HashMap::new()),
            undecryptable: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.settings.edit_interval_ms.max(1)))
    }

    pub(super) fn access(&self) -> crate::core::access::Access {
        self.assistant.config().access(PLATFORM)
    }
}
