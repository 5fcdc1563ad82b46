//! Typed, layered settings: built-in defaults, `config/default.toml`, the `--config` file, then
//! `SYNTHIA_BOT__SECTION__KEY` environment variables (secrets belong there, not in files).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when built with the `cuda` feature and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// f32 on CPU (bf16 on CPU is about 4x slower), f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// A Hugging Face model directory or a `.gguf` file. Empty: use `repo`.
    pub path: String,
    /// A Hugging Face repo id fetched once into the local cache when `path` is empty.
    pub repo: String,
    pub revision: String,
    /// File inside `repo` to fetch for GGUF repos (`synthia-7b-v1.2.Q4_K_M.gguf`).
    pub file: String,
    /// `tokenizer.json` to use; default: beside the model (or from `tokenizer_repo`).
    pub tokenizer: String,
    /// Repo to take `tokenizer.json` from when a GGUF repo has none.
    pub tokenizer_repo: String,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub context_length: u32,
    pub max_new_tokens: u32,
    /// CPU threads for inference; 0 = one per core.
    pub threads: u32,
    /// Memory kept for conversations' attention caches, e.g. "1GiB", "512MiB".
    pub kv_cache_budget: String,
    /// Requests waiting for the worker before new ones are refused as busy.
    pub queue_capacity: u32,
    /// Conversations decoded together in one pass over the weights; 1 = no batching.
    pub max_batch: u32,
    /// Prompt tokens read per step while other replies keep decoding.
    pub prefill_chunk: u32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: String::new(),
            repo: String::new(),
            revision: "main".into(),
            file: String::new(),
            tokenizer: String::new(),
            tokenizer_repo: String::new(),
            device: DeviceChoice::Auto,
            dtype: DTypeChoice::Auto,
            context_length: 4096,
            max_new_tokens: 512,
            threads: 0,
            kv_cache_budget: "1GiB".into(),
            queue_capacity: 64,
            max_batch: 8,
            prefill_chunk: 512,
        }
    }
}

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

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Seconds replies in progress get to finish on SIGTERM/SIGINT before they are cancelled.
    pub shutdown_grace: u32,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self { shutdown_grace: 20 }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Loopback address for Prometheus metrics (`127.0.0.1:9464` serves `/metrics`); empty = off.
    pub listen: String,
}

/// Who may talk to the bot on one platform. Empty allow-lists allow everyone.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    pub allowed_users: Vec<String>,
    pub allowed_roles: Vec<String>,
    pub allowed_channels: Vec<String>,
    pub allowed_spaces: Vec<String>,
    pub admins: Vec<String>,
    pub admin_roles: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Display name of the terminal user in the database.
    pub user_name: String,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            user_name: "operator".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiscordSettings {
    pub enabled: bool,
    /// Bot token; set it through `SYNTHIA_BOT__DISCORD__TOKEN`.
    pub token: String,
    /// Where the REST API lives (requests go to `{api_base}/api/v10/...`); anything but Discord's
    /// own is used as a proxy.
    pub api_base: String,
    /// Prefix of message commands (`!reset`), for servers without slash commands.
    pub command_prefix: String,
    /// Guild ids to register slash commands in (instant); empty = global (can take an hour).
    pub command_guilds: Vec<String>,
    /// Least time between two edits of a streamed reply, in milliseconds.
    pub edit_interval_ms: u32,
    /// Channels where every message is answered, mention or not.
    pub always_answer: Vec<String>,
    pub access: AccessSettings,
}

impl Default for DiscordSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            token: String::new(),
            api_base: "https://discord.com".into(),
            command_prefix: "!".into(),
            command_guilds: Vec::new(),
            edit_interval_ms: 1000,
            always_answer: Vec::new(),
            access: AccessSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MatrixSettings {
    pub enabled: bool,
    pub homeserver: String,
    pub user_id: String,
    /// Used on first start; set it through `SYNTHIA_BOT__MATRIX__PASSWORD`.
    pub password: String,
    pub access_token: String,
    pub device_name: String,
    pub store_path: String,
    pub store_passphrase: String,
    pub recovery_key: String,
    /// Prefix of commands (`!reset`).
    pub command_prefix: String,
    /// Least time between two edits of a streamed reply, in milliseconds.
    pub edit_interval_ms: u32,
    /// Rooms (ids) where every message is answered, mention or not.
    pub always_answer: Vec<String>,
    pub access: AccessSettings,
}

impl Default for MatrixSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            homeserver: String::new(),
            user_id: String::new(),
            password: String::new(),
            access_token: String::new(),
            device_name: "synthia-bot".into(),
            store_path: "data/matrix".into(),
            store_passphrase: String::new(),
            recovery_key: String::new(),
            command_prefix: "!".into(),
            edit_interval_ms: 1000,
            always_answer: Vec::new(),
            access: AccessSettings::default(),
        }
    }
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

/// Where settings come from; tests pass their own environment instead of the process's.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `config/default.toml` or another base file; skipped when it does not exist.
    pub base: Option<PathBuf>,
    /// The `--config` file; must exist when given.
    pub file: Option<PathBuf>,
    /// Environment variables to read (`None`: the process environment).
    pub env: Option<Vec<(String, String)>>,
}

impl Sources {
    /// The usual layering for the binary: `config/default.toml` if present, then `--config`.
    pub fn standard(file: Option<&Path>) -> Self {
        Self {
            base: Some(PathBuf::from(DEFAULT_CONFIG_PATH)),
            file: file.map(Path::to_path_buf),
            env: None,
        }
    }
}

impl Settings {
    /// Loads and validates settings from every layer.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let defaults = config::Config::try_from(&Settings::default())
            .map_err(|e| ConfigError::new("", format!("built-in defaults: {e}")))?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(base) = &sources.base
            && base.exists()
        {
            builder = builder.add_source(file_source(base)?);
        }
        if let Some(file) = &sources.file {
            if !file.exists() {
                return Err(ConfigError::new(
                    "",
                    format!("configuration file {} does not exist", file.display()),
                ));
            }
            builder = builder.add_source(file_source(file)?);
        }
        let mut env = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",");
        for key in LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
        if let Some(vars) = &sources.env {
            env = env.source(Some(vars.iter().cloned().collect()));
        }
        let merged = builder
            .add_source(env)
            .build()
            .map_err(|e| ConfigError::new("", e.to_string()))?;
        let settings: Settings = serde_path_to_error::deserialize(merged).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::new(
                if key == "." { String::new() } else { key },
                clean_serde_message(&e.into_inner().to_string()),
            )
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks ranges and combinations that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        if m.context_length < 64 {
            return Err(ConfigError::new(
                "model.context_length",
                "must be at least 64",
            ));
        }
        if m.max_new_tokens == 0 {
            return Err(ConfigError::new(
                "model.max_new_tokens",
                "must be at least 1",
            ));
        }
        if m.max_new_tokens >= m.context_length {
            return Err(ConfigError::new(
                "model.max_new_tokens",
                format!(
                    "must be less than model.context_length ({}), or no room is left for the prompt",
                    m.context_length
                ),
            ));
        }
        if m.max_batch == 0 || m.max_batch > 256 {
            return Err(ConfigError::new(
                "model.max_batch",
                "must be between 1 and 256",
            ));
        }
        if m.prefill_chunk == 0 {
            return Err(ConfigError::new(
                "model.prefill_chunk",
                "must be at least 1",
            ));
        }
        if m.queue_capacity == 0 {
            return Err(ConfigError::new(
                "model.queue_capacity",
                "must be at least 1",
            ));
        }
        parse_size(&m.kv_cache_budget).map_err(|e| ConfigError::new("model.kv_cache_budget", e))?;
        if !m.path.is_empty() && !m.repo.is_empty() {
            return Err(ConfigError::new(
                "model.repo",
                "set either model.path (local files) or model.repo (download), not both",
            ));
        }
        let s = &self.sampling;
        if !(0.0..=5.0).contains(&s.temperature) || s.temperature.is_nan() {
            return Err(ConfigError::new(
                "sampling.temperature",
                "must be between 0 and 5 (0 = greedy)",
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(ConfigError::new(
                "sampling.top_p",
                "must be greater than 0 and at most 1",
            ));
        }
        if !(s.repetition_penalty > 0.0 && s.repetition_penalty <= 10.0) {
            return Err(ConfigError::new(
                "sampling.repetition_penalty",
                "must be greater than 0 and at most 10 (1 = off)",
            ));
        }
        let p = &self.prompt;
        if !(p.trim_to >= 0.1 && p.trim_to <= 1.0) {
            return Err(ConfigError::new(
                "prompt.trim_to",
                "must be between 0.1 and 1",
            ));
        }
        if p.max_message_chars == 0 {
            return Err(ConfigError::new(
                "prompt.max_message_chars",
                "must be at least 1",
            ));
        }
        if self.memory.database.trim().is_empty() {
            return Err(ConfigError::new(
                "memory.database",
                "must name a SQLite file or sqlite:// URL",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", format!("not a valid filter: {e}")))?;
        if self.discord.edit_interval_ms < 1000
            && self
                .discord
                .api_base
                .trim_end_matches('/')
                .starts_with("https://discord.com")
        {
            return Err(ConfigError::new(
                "discord.edit_interval_ms",
                "must be at least 1000: Discord allows about one edit per second per message",
            ));
        }
        if !self.discord.api_base.starts_with("http://")
            && !self.discord.api_base.starts_with("https://")
        {
            return Err(ConfigError::new(
                "discord.api_base",
                "must be an http:// or https:// URL",
            ));
        }
        if self.discord.enabled && self.discord.token.trim().is_empty() {
            return Err(ConfigError::new(
                "discord.token",
                "required when discord.enabled = true (set SYNTHIA_BOT__DISCORD__TOKEN)",
            ));
        }
        if !self.metrics.listen.is_empty() {
            match self.metrics.listen.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => {
                    return Err(ConfigError::new(
                        "metrics.listen",
                        "must be a loopback address such as 127.0.0.1:9464 (metrics are not for the open network; put a proxy in front to share them)",
                    ));
                }
                Err(_) => {
                    return Err(ConfigError::new(
                        "metrics.listen",
                        "must be an address and port such as 127.0.0.1:9464, or empty to turn metrics off",
                    ));
                }
            }
        }
        if self.matrix.enabled {
            let mx = &self.matrix;
            if mx.homeserver.trim().is_empty() {
                return Err(ConfigError::new(
                    "matrix.homeserver",
                    "required when matrix.enabled = true",
                ));
            }
            if !mx.user_id.starts_with('@') || !mx.user_id.contains(':') {
                return Err(ConfigError::new(
                    "matrix.user_id",
                    "must be a full Matrix user id such as @synthia:example.org",
                ));
            }
            if !mx.homeserver.starts_with("http://") && !mx.homeserver.starts_with("https://") {
                return Err(ConfigError::new(
                    "matrix.homeserver",
                    "must be an http:// or https:// URL such as https://matrix.example.org",
                ));
            }
            if mx.store_path.trim().is_empty() {
                return Err(ConfigError::new(
                    "matrix.store_path",
                    "required: the session and encryption keys are kept there",
                ));
            }
            if mx.command_prefix.trim().is_empty() {
                return Err(ConfigError::new(
                    "matrix.command_prefix",
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    /// The attention-cache budget in bytes (validated at load).
    pub fn kv_cache_budget_bytes(&self) -> u64 {
        parse_size(&self.model.kv_cache_budget).unwrap_or(1 << 30)
    }
}

/// List-valued keys, so environment variables can carry comma-separated lists.
const LIST_KEYS: &[&str] = &[
    "discord.always_answer",
    "discord.command_guilds",
    "discord.access.allowed_users",
    "discord.access.allowed_roles",
    "discord.access.allowed_channels",
    "discord.access.allowed_spaces",
    "discord.access.admins",
    "discord.access.admin_roles",
    "matrix.always_answer",
    "matrix.access.allowed_users",
    "matrix.access.allowed_roles",
    "matrix.access.allowed_channels",
    "matrix.access.allowed_spaces",
    "matrix.access.admins",
    "matrix.access.admin_roles",
];

fn file_source(
    path: &Path,
) -> Result<config::File<config::FileSourceFile, config::FileFormat>, ConfigError> {
    // Parse first so a syntax error names the file and line, not a generic failure.
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str::<toml::Table>(&text)
        .map_err(|e| ConfigError::new("", format!("{} is not valid TOML: {e}", path.display())))?;
    Ok(config::File::from(path)
        .format(config::FileFormat::Toml)
        .required(true))
}

fn clean_serde_message(message: &str) -> String {
    message.trim().to_string()
}

/// Parses sizes such as `1GiB`, `512MiB`, `300MB` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 512MiB or 2GiB"))?;
    let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (use B, KiB, MiB or GiB)"
            ));
        }
    };
    Ok((value * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(toml_text: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.toml");
        std::fs::write(&path, toml_text).unwrap();
        Settings::load(&Sources {
            base: None,
            file: Some(path),
            env: Some(
                env.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        })
    }

    #[test]
    fn empty_file_gives_defaults() {
        let s = load_with("", &[]).unwrap();
        assert_eq!(s, Settings::default());
        assert_eq!(s.model.context_length, 4096);
        assert_eq!(s.sampling.temperature, 0.75);
        assert_eq!(s.prompt.system, SYNTHIA_SYSTEM);
    }

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
                "[matrix]\nenabled = true\nhomeserver = \"http://127.0.0.1:1\"\nuser_id = \"bot\"\n",
                "matrix.user_id",
                "full Matrix user id",
            ),
            ("[log]\nformat = \"xml\"\n", "log.format", "xml"),
        ];
        for (text, key, needle) in cases {
            let err = load_with(text, &[]).expect_err(text);
            assert_eq!(&err.key, key, "{text} -> {err}");
            assert!(err.to_string().contains(needle), "{text} -> {err}");
        }
    }

    #[test]
    fn broken_toml_names_the_file() {
        let err = load_with("[model\npath = 1", &[]).unwrap_err();
        assert!(
            err.to_string().contains("test.toml is not valid TOML"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_files() {
        let s = load_with(
            "[discord]\ntoken = \"from-file\"\n[model]\nmax_new_tokens = 100\n",
            &[
                ("SYNTHIA_BOT__DISCORD__TOKEN", "from-env"),
                ("SYNTHIA_BOT__MODEL__MAX_NEW_TOKENS", "200"),
                ("SYNTHIA_BOT__DISCORD__ACCESS__ADMINS", "1,2"),
            ],
        )
        .unwrap();
        assert_eq!(s.discord.token, "from-env");
        assert_eq!(s.model.max_new_tokens, 200);
        assert_eq!(
            s.discord.access.admins,
            vec!["1".to_string(), "2".to_string()]
        );
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Settings::load(&Sources {
            base: None,
            file: Some("/nonexistent/synthia.toml".into()),
            env: Some(vec![]),
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn sizes() {
        for (text, want) in [
            ("1GiB", 1u64 << 30),
            ("512MiB", 512 << 20),
            ("1000", 1000),
            ("2 GB", 2_000_000_000),
        ] {
            assert_eq!(parse_size(text).unwrap(), want, "{text}");
        }
        assert!(parse_size("12 parsecs").is_err());
    }

    /// Every shipped configuration parses, and default.toml documents exactly the built-in
    /// defaults, so neither can go stale.
    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let default = Settings::load(&Sources {
            base: None,
            file: Some(root.join("default.toml")),
            env: Some(vec![]),
        })
        .unwrap();
        assert_eq!(
            default,
            Settings::default(),
            "config/default.toml and the built-in defaults differ"
        );
        let mut files = vec![];
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    files.push(path);
                }
            }
        }
        assert!(files.len() >= 3, "{files:?}");
        let secrets = vec![
            (
                "SYNTHIA_BOT__DISCORD__TOKEN".to_string(),
                "token-from-env".to_string(),
            ),
            (
                "SYNTHIA_BOT__MATRIX__PASSWORD".to_string(),
                "password-from-env".to_string(),
            ),
        ];
        for file in files {
            let s = Settings::load(&Sources {
                base: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml")),
                file: Some(file.clone()),
                env: Some(secrets.clone()),
            });
            assert!(s.is_ok(), "{}: {}", file.display(), s.unwrap_err());
        }
    }
}
