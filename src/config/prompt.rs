//! How a conversation is turned into the prompt the model reads.
//!
//! Apart from sampling because these act before the model runs: what history is kept, how
//! speakers are named, and which messages are too long to take at all.

use serde::{Deserialize, Serialize};

use super::{ConfigError, SYNTHIA_SYSTEM};

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromptSettings {
    pub system: String,
    /// In group conversations, put the speaker's display name on the user line (`USER: alice: hi`).
    pub speaker_names: bool,
    /// When history must be trimmed, trim down to this fraction of the budget so the prompt's
    /// beginning stays the same for several turns (and the attention cache stays reusable).
    pub trim_to: f64,
    /// Longest message accepted from a user, in characters.
    pub max_message_chars: u32,
}

impl Default for PromptSettings {
    fn default() -> Self {
        Self {
            system: SYNTHIA_SYSTEM.into(),
            speaker_names: true,
            trim_to: 0.75,
            max_message_chars: 100_000,
        }
    }
}

impl PromptSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.trim_to >= 0.1 && self.trim_to <= 1.0) {
            return Err(ConfigError::new(
                "prompt.trim_to",
                "must be between 0.1 and 1",
            ));
        }
        if self.max_message_chars == 0 {
            return Err(ConfigError::new(
                "prompt.max_message_chars",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
