//! Reading settings from their layers: built-in defaults, the base file, the `--config` file,
//! then the environment.
//!
//! The defaults enter as the first layer (serialized from [`Settings::default`]) so every later
//! layer only has to name what it changes, and every error is turned into a [`ConfigError`] that
//! names its key.

use std::path::{Path, PathBuf};

use super::{ConfigError, DEFAULT_CONFIG_PATH, ENV_PREFIX, Settings};

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
}

/// List-valued keys, so environment variables can carry comma-separated lists.
const LIST_KEYS: &[&str] = &[
    "inference.endpoints",
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::SYNTHIA_SYSTEM;

    /// Loads `toml_text` as the `--config` file over the built-in defaults, with `env` as the
    /// whole environment; shared with the validation tests beside [`Settings::validate`].
    pub(in crate::config) fn load_with(
        toml_text: &str,
        env: &[(&str, &str)],
    ) -> Result<Settings, ConfigError> {
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

    /// A size from a file or from the environment (where a bare number arrives as an integer)
    /// keeps the text it was written as.
    #[test]
    fn sizes_load_from_files_and_environment() {
        let s = load_with("[model]\nkv_cache_budget = \"512MiB\"\n", &[]).unwrap();
        assert_eq!(s.kv_cache_budget_bytes(), 512 << 20);
        assert_eq!(s.model.kv_cache_budget.as_str(), "512MiB");
        let s = load_with("[model]\nkv_cache_budget = 1000\n", &[]).unwrap();
        assert_eq!(s.kv_cache_budget_bytes(), 1000);
        let s = load_with("", &[("SYNTHIA_BOT__MODEL__KV_CACHE_BUDGET", "2048")]).unwrap();
        assert_eq!(s.kv_cache_budget_bytes(), 2048);
        let s = load_with("", &[("SYNTHIA_BOT__MODEL__KV_CACHE_BUDGET", "2GiB")]).unwrap();
        assert_eq!(s.model.kv_cache_budget.as_str(), "2GiB");
        assert_eq!(s.kv_cache_budget_bytes(), 2 << 30);
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
