//! Start-up wiring every command shares: settings, logging, the database, the model and the
//! signals a daemon listens for. `serve` and the other commands both build on it.

use anyhow::Context;

use crate::config::{BackendChoice, LogFormat, Settings, Sources};
use crate::inference::{self, RemoteOptions, RemoteWorker, Worker, WorkerOptions};
use crate::memory::{Store, redact_password};
use std::path::Path;

/// Loads settings for a command; errors name the key.
pub fn load_settings(config: Option<&Path>) -> anyhow::Result<Settings> {
    Settings::load(&Sources::standard(config))
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

/// Logs to stderr, journald-friendly: no colours unless stderr is a terminal.
pub fn init_logging(settings: &Settings) {
    use std::io::IsTerminal;
    let level = std::env::var("SYNTHIA_BOT_LOG").unwrap_or_else(|_| settings.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match settings.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Logs for a command whose screen belongs to a person (the interactive chat): appended to
/// `file` at the configured level; with no file, or one that cannot be opened, only warnings
/// and errors, on stderr.
pub fn init_logging_aside(settings: &Settings, file: &str) {
    let level = std::env::var("SYNTHIA_BOT_LOG").unwrap_or_else(|_| settings.log.level.clone());
    let opened = (!file.is_empty()).then(|| {
        let path = Path::new(file);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    });
    let (writer, level): (tracing_subscriber::fmt::writer::BoxMakeWriter, String) = match opened {
        Some(Ok(f)) => (
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Arc::new(f)),
            level,
        ),
        failed => {
            if let Some(Err(e)) = failed {
                eprintln!("warning: cannot open the log file {file}: {e}; warnings go here");
            }
            (
                tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
                "warn".into(),
            )
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    let _ = match settings.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Where matrix-sdk logs every failed request, at ERROR, the 404s of normal operation included
/// (a room's missing encryption state before its first send, an account without key backup).
/// Operators alert on ERROR, and the bot logs the failures that matter itself, with the
/// conversation they belong to; so this target is heard only when asked for by name.
const NOISY_AT_ERROR: &str = "matrix_sdk::http_client";

/// `log.level` as written, with [`NOISY_AT_ERROR`] off unless the level names it.
fn log_filter(level: &str) -> String {
    if level.contains(NOISY_AT_ERROR) {
        level.to_string()
    } else {
        format!("{level},{NOISY_AT_ERROR}=off")
    }
}

/// Opens the memory `memory.database` names (SQLite or PostgreSQL) and applies its migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let store = Store::open(
        &settings.memory.database,
        std::time::Duration::from_millis(u64::from(settings.memory.busy_timeout_ms)),
    )
    .await?;
    tracing::info!(
        backend = %store.backend(),
        database = %redact_password(&settings.memory.database),
        run = store.run_id(),
        "memory opened"
    );
    Ok(store)
}

/// The backend `inference.backend` names: the model loaded here, or the inference servers
/// (with the model's tokenizer alone, to build and count prompts). Must run inside the async
/// runtime.
pub fn load_worker(settings: &Settings) -> anyhow::Result<Worker> {
    if settings.inference.backend == BackendChoice::Openai {
        let tokenizer = inference::load::tokenizer_from_settings(&settings.model).context(
            "cannot load the model's tokenizer, which counts prompts for the inference servers (set model.tokenizer)",
        )?;
        let remote = RemoteWorker::spawn(
            RemoteOptions::from_settings(&settings.inference, &settings.model),
            std::sync::Arc::new(tokenizer),
        )?;
        return Ok(remote.into());
    }
    let started = std::time::Instant::now();
    let loaded = inference::load_from_settings(&settings.model).context("cannot load the model")?;
    tracing::info!(
        source = %loaded.source.display(),
        format = ?loaded.format,
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    Ok(Worker::spawn(
        loaded,
        WorkerOptions {
            queue_capacity: settings.model.queue_capacity as usize,
            kv_cache_budget_bytes: settings.kv_cache_budget_bytes(),
            prefill_chunk: settings.model.prefill_chunk as usize,
            context_length: settings.model.context_length as usize,
            start_paused: false,
            max_batch: settings.model.max_batch as usize,
        },
    ))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves on each SIGHUP (never elsewhere).
pub async fn reload_signal(hangup: &mut Option<tokio::signal::unix::Signal>) {
    match hangup {
        Some(h) => {
            h.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noisy_target_is_off_unless_named() {
        assert_eq!(log_filter("info"), "info,matrix_sdk::http_client=off");
        assert_eq!(
            log_filter("warn,matrix_sdk::http_client=debug"),
            "warn,matrix_sdk::http_client=debug"
        );
        for level in ["info", "debug,synthia_bot=trace"] {
            assert!(tracing_subscriber::EnvFilter::try_new(log_filter(level)).is_ok());
        }
    }
}
