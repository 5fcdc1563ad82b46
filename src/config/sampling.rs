//! How the next token is picked from the model's output.
//!
//! These are used on every reply, so their ranges are checked at load: a bad value stops the
//! daemon at start rather than at the first message.

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::chat::command::TEMPERATURE_RANGE;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSettings {
    /// 0 = greedy.
    pub temperature: f64,
    /// 0 = no top-k cut.
    pub top_k: u32,
    pub top_p: f64,
    pub repetition_penalty: f32,
    pub repeat_last_n: u32,
    /// Fixed seed for reproducible replies; 0 = a fresh seed per reply.
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self {
            temperature: 0.75,
            top_k: 50,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingSettings {
    /// Written so that NaN fails every range, not just the ones that mention it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The same range `/set temperature` allows in a conversation.
        if !TEMPERATURE_RANGE.contains(&self.temperature) {
            return Err(ConfigError::new(
                "sampling.temperature",
                format!(
                    "must be between {} and {} (0 = greedy)",
                    TEMPERATURE_RANGE.start(),
                    TEMPERATURE_RANGE.end()
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ConfigError::new(
                "sampling.top_p",
                "must be greater than 0 and at most 1",
            ));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty <= 10.0) {
            return Err(ConfigError::new(
                "sampling.repetition_penalty",
                "must be greater than 0 and at most 10 (1 = off)",
            ));
        }
        Ok(())
    }
}
