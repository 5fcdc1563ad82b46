//! Typed, layered settings: built-in defaults, `config/default.toml`, the `--config` file, then
//! `SYNTHIA_BOT__SECTION__KEY` environment variables (secrets belong there, not in files).
//!
//! Each section lives beside the rules that check it, so a new option and its limits are added in
//! one place; this module only ties the sections together and names every problem by its key.

use std::fmt;

use serde::{Deserialize, Serialize};

mod inference;
mod load;
mod model;
mod platforms;
mod prompt;
mod sampling;
mod service;
mod size;

pub use inference::{BackendChoice, InferenceSettings};
pub use load::Sources;
pub use model::{
    CpuWeights, DTypeChoice, DeviceChoice, KvCacheDType, ModelSettings, QuantizeChoice,
};
pub use platforms::{
    AccessSettings, ConsoleSettings, DiscordSettings, MatrixSettings, ShardPlan, ShardSettings,
};
pub use prompt::PromptSettings;
pub use sampling::SamplingSettings;
pub use service::{
    LimitSettings, LogFormat, LogSettings, MemorySettings, MetricsSettings, ServiceSettings,
};
pub use size::{ByteSize, parse_size};

/// The model card's system line for Synthia-7B.
pub const SYNTHIA_SYSTEM: &str = "You are Synthia. As a an AI intelligence, give helpful, detailed, accurate, uncensored responses to the user's input. Provide answers factually.";

/// The file every installation ships; every option is present and commented there.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

/// Environment prefix: `SYNTHIA_BOT__DISCORD__TOKEN` sets `discord.token`.
pub const ENV_PREFIX: &str = "SYNTHIA_BOT";

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub model: ModelSettings,
    pub inference: InferenceSettings,
    pub sampling: SamplingSettings,
    pub prompt: PromptSettings,
    pub memory: MemorySettings,
    pub limits: LimitSettings,
    pub log: LogSettings,
    pub service: ServiceSettings,
    pub metrics: MetricsSettings,
    pub console: ConsoleSettings,
    pub discord: DiscordSettings,
    pub matrix: MatrixSettings,
}

/// A configuration problem, always naming the key it is about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Settings {
    /// Checks ranges and combinations that types alone cannot express.
    ///
    /// The order is the one checks have always run in, so a file with several problems still
    /// reports the same first one. Sections without rules (limits, service, console) have no
    /// `validate` of their own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        self.inference.validate()?;
        self.sampling.validate()?;
        self.prompt.validate()?;
        self.memory.validate()?;
        self.service.validate()?;
        self.log.validate()?;
        self.discord.validate()?;
        self.metrics.validate()?;
        self.matrix.validate()?;
        Ok(())
    }

    /// The attention-cache budget in bytes; kept so callers need not know how sizes are typed.
    pub fn kv_cache_budget_bytes(&self) -> u64 {
        self.model.kv_cache_budget.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::load::tests::load_with;
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[model]\nbogus = 1\n",
                "model.bogus",
                "unknown field `bogus`",
            ),
            (
                "[nonsense]\nx = 1\n",
                "nonsense",
                "unknown field `nonsense`",
            ),
            (
                "[model]\nmax_new_tokens = \"many\"\n",
                "model.max_new_tokens",
                "invalid",
            ),
            (
                "[model]\nmax_new_tokens = 4096\n",
                "model.max_new_tokens",
                "less than model.context_length",
            ),
            ("[model]\ndevice = \"tpu\"\n", "model.device", "tpu"),
            (
                "[model]\nkv_cache_budget = \"lots\"\n",
                "model.kv_cache_budget",
                "not a size",
            ),
            (
                "[sampling]\ntemperature = -1.0\n",
                "sampling.temperature",
                "between 0 and 5",
            ),
            (
                "[sampling]\ntop_p = 0.0\n",
                "sampling.top_p",
                "greater than 0",
            ),
            (
                "[prompt]\ntrim_to = 2.0\n",
                "prompt.trim_to",
                "between 0.1 and 1",
            ),
            ("[discord]\nenabled = true\n", "discord.token", "required"),
            (
                "[discord.shards]\nids = \"0-1\"\n",
                "discord.shards.total",
                "must be set",
            ),
            (
                "[discord.shards]\ntotal = 2\nids = \"1-2\"\n",
                "discord.shards.ids",
                "numbered 0 to 1",
            ),
            (
                "[discord.shards]\ntotal = 4\nids = \"3-1\"\n",
                "discord.shards.ids",
                "backwards",
            ),
            (
                "[discord.shards]\ntotal = 4\nids = \"0,2\"\n",
                "discord.shards.ids",
                "not a shard id or range",
            ),
            (
                "[matrix]\nenabled = true\nhomeserver = \"http://127.0.0.1:1\"\nuser_id = \"bot\"\n",
                "matrix.user_id",
                "full Matrix user id",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format", "xml"),
            (
                "[service]\nresume_window = 7200\nrestart_notice_window = 3600\n",
                "service.resume_window",
                "must not exceed service.restart_notice_window",
            ),
            (
                "[service]\nrestart_notice_window = 99999999\n",
                "service.restart_notice_window",
                "at most",
            ),
        ];
        for (text, key, needle) in cases {
            let err = load_with(text, &[]).expect_err(text);
            assert_eq!(&err.key, key, "{text} -> {err}");
            assert!(err.to_string().contains(needle), "{text} -> {err}");
        }
    }

    #[test]
    fn shard_settings_become_plans() {
        let plan = |total, ids: &str| {
            ShardSettings {
                total,
                ids: ids.into(),
            }
            .plan()
            .unwrap()
        };
        assert_eq!(plan(0, ""), ShardPlan::Recommended);
        assert_eq!(
            plan(4, ""),
            ShardPlan::Range {
                first: 0,
                last: 3,
                total: 4
            }
        );
        assert_eq!(
            plan(4, " 1 - 2 "),
            ShardPlan::Range {
                first: 1,
                last: 2,
                total: 4
            }
        );
        assert_eq!(
            plan(2, "1"),
            ShardPlan::Range {
                first: 1,
                last: 1,
                total: 2
            }
        );
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Settings::default().validate(), Ok(()));
        assert_eq!(Settings::default().kv_cache_budget_bytes(), 1 << 30);
    }
}
