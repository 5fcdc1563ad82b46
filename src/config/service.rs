//! How the daemon itself runs: its database, rate limits, logging, shutdown and metrics.
//!
//! Grouped because none of them changes what a reply says; they are the operator's side of the
//! process around the model.

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MemorySettings {
    /// SQLite file path or `sqlite://` URL, or a `postgres://` (`postgresql://`) URL.
    pub database: String,
    /// How long a writer waits for a lock before failing, in milliseconds (SQLite's busy
    /// timeout, PostgreSQL's `lock_timeout`).
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
    /// A value with a scheme must be one the store opens: a `postgres://` URL that parses, or
    /// `sqlite://`; anything else would be taken for a file name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const KEY: &str = "memory.database";
        let value = self.database.trim();
        if value.is_empty() {
            return Err(ConfigError::new(
                KEY,
                "must name a SQLite file, a sqlite:// URL or a postgres:// URL",
            ));
        }
        let Some((scheme, _)) = value.split_once("://").filter(|(s, _)| {
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }) else {
            return Ok(());
        };
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(()),
            "postgres" | "postgresql" => {
                <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(value)
                    .map(|_| ())
                    .map_err(|e| {
                        ConfigError::new(KEY, format!("is not a valid PostgreSQL URL: {e}"))
                    })
            }
            other => Err(ConfigError::new(
                KEY,
                format!(
                    "uses the scheme `{other}://`; use a SQLite path, sqlite://… or postgres://…"
                ),
            )),
        }
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
    /// This daemon's name in logs and metrics, so several sharing one memory can be told apart;
    /// empty = the host name.
    pub instance: String,
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
            instance: String::new(),
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

impl ServiceSettings {
    /// `service.instance`, or the host name when it is empty (`unknown` if even that fails).
    pub fn instance_name(&self) -> String {
        let configured = self.instance.trim();
        if !configured.is_empty() {
            return configured.to_string();
        }
        host_name().unwrap_or_else(|| "unknown".to_string())
    }
}

fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
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

#[cfg(test)]
mod tests {
    use super::super::load::tests::load_with;

    #[test]
    fn memory_database_names_sqlite_or_postgres() {
        for ok in [
            "data/synthia-bot.sqlite",
            "sqlite://memory.sqlite?mode=rwc",
            "postgres://synthia:secret@db.example:5432/synthia",
            "postgresql://synthia@127.0.0.1/synthia?sslmode=disable",
        ] {
            let text = format!("[memory]\ndatabase = \"{ok}\"\n");
            let settings = load_with(&text, &[]).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(settings.memory.database, ok);
        }
        for (bad, needle) in [
            ("", "must name"),
            ("mysql://u:p@host/db", "mysql://"),
            ("postgres://u@host:port/db", "not a valid PostgreSQL URL"),
        ] {
            let text = format!("[memory]\ndatabase = \"{bad}\"\n");
            let err = load_with(&text, &[]).expect_err(bad);
            assert_eq!(err.key, "memory.database", "{bad}: {err}");
            assert!(err.to_string().contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn the_instance_defaults_to_the_host_name() {
        let settings = load_with("", &[]).unwrap();
        assert_eq!(settings.service.instance, "");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(settings.service.instance_name(), host.trim());
        let named = load_with("[service]\ninstance = \"eu-1\"\n", &[]).unwrap();
        assert_eq!(named.service.instance_name(), "eu-1");
    }

    #[test]
    fn the_database_url_may_come_from_the_environment() {
        let url = "postgres://synthia:from-env@127.0.0.1:5432/synthia";
        let settings = load_with(
            "[memory]\ndatabase = \"data/file.sqlite\"\n",
            &[("SYNTHIA_BOT__MEMORY__DATABASE", url)],
        )
        .unwrap();
        assert_eq!(settings.memory.database, url);
    }
}
