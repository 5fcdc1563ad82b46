//! How the daemon itself runs: its database, rate limits, logging, shutdown and metrics.
//!
//! Grouped because none of them changes what a reply says; they are the operator's side of the
//! process around the model.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySettings {
    /// SQLite file path or `sqlite://` URL.
    pub database: String,
    /// How long a writer waits for a lock before failing, in milliseconds.
    pub busy_timeout_ms: u32,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            database: "data/synthia-bot.sqlite".into(),
            busy_timeout_ms: 5000,
        }
    }
}

impl MemorySettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.trim().is_empty() {
            return Err(ConfigError::new(
                "memory.database",
                "must name a SQLite file or sqlite:// URL",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Messages one user may send per minute (bursts up to this many); 0 = unlimited.
    pub user_per_minute: u32,
    /// Messages one conversation may receive per minute; 0 = unlimited.
    pub conversation_per_minute: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            user_per_minute: 10,
            conversation_per_minute: 30,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `synthia_bot=debug,info`.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl LogSettings {
    /// The filter is parsed here, not when logging starts, so a typo is reported under its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::try_new(&self.level)
            .map_err(|e| ConfigError::new("log.level", format!("not a valid filter: {e}")))?;
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Seconds replies in progress get to finish on SIGTERM/SIGINT before they are cancelled.
    pub shutdown_grace: u32,
    /// Seconds back from start-up within which a stored question left without a reply (the
    /// process died or was stopped first) is answered once its platform connects; 0 = none.
    pub resume_window: u32,
    /// Seconds back from start-up within which an unanswered question too old to resume gets,
    /// once, a notice that the bot restarted and to ask again; older ones are left alone.
    pub restart_notice_window: u32,
}

/// Questions older than this are never answered or noticed after a restart: a month-old
/// question needs no reply, and the pending query stays small.
pub const MAX_RESTART_NOTICE_WINDOW: u32 = 30 * 24 * 3600;

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            shutdown_grace: 20,
            resume_window: 600,
            restart_notice_window: 24 * 3600,
        }
    }
}

impl ServiceSettings {
    /// The notice window covers what is too old to resume, so it may not be shorter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.restart_notice_window > MAX_RESTART_NOTICE_WINDOW {
            return Err(ConfigError::new(
                "service.restart_notice_window",
                format!("must be at most {MAX_RESTART_NOTICE_WINDOW} seconds (30 days)"),
            ));
        }
        if self.resume_window > self.restart_notice_window {
            return Err(ConfigError::new(
                "service.resume_window",
                format!(
                    "must not exceed service.restart_notice_window ({} s): questions too old to answer are the ones that get a restart notice",
                    self.restart_notice_window
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Loopback address for Prometheus metrics (`127.0.0.1:9464` serves `/metrics`); empty = off.
    pub listen: String,
}

impl MetricsSettings {
    /// Only loopback is accepted: `/metrics` answers anyone who can reach it, and sharing it
    /// further is a proxy's job.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Ok(());
        }
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => Ok(()),
            Ok(_) => Err(ConfigError::new(
                "metrics.listen",
                "must be a loopback address such as 127.0.0.1:9464 (metrics are not for the open network; put a proxy in front to share them)",
            )),
            Err(_) => Err(ConfigError::new(
                "metrics.listen",
                "must be an address and port such as 127.0.0.1:9464, or empty to turn metrics off",
            )),
        }
    }
}
