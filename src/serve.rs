//! `synthia-bot serve`: the daemon. Loads the model once, opens the database, keeps every enabled
//! chat platform connected (each on its own, retried with back-off), tells systemd how it is
//! doing, reloads on SIGHUP and shuts down gracefully on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::adapters::ConnectError;
use crate::adapters::discord::DiscordClient;
use crate::adapters::matrix::MatrixClient;
use crate::app::{load_settings, load_worker, open_store, reload_signal, shutdown_signal};
use crate::chat::Platform;
use crate::config::Settings;
use crate::core::Assistant;
use crate::metrics::Metrics;
use crate::service::Notifier;

/// Longest pause between two connection attempts of one platform.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The platforms `serve` connects to (the terminal is `chat`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Remote {
    Discord,
    Matrix,
}

impl Remote {
    fn platform(self) -> Platform {
        match self {
            Remote::Discord => Platform::Discord,
            Remote::Matrix => Platform::Matrix,
        }
    }
}

enum Connection {
    Discord(DiscordClient),
    Matrix(MatrixClient),
}

impl Connection {
    async fn open(
        platform: Remote,
        settings: &Settings,
        assistant: Arc<Assistant>,
    ) -> Result<Self, ConnectError> {
        match platform {
            Remote::Discord => DiscordClient::connect(&settings.discord, assistant)
                .await
                .map(Connection::Discord),
            Remote::Matrix => MatrixClient::connect(&settings.matrix, assistant)
                .await
                .map(Connection::Matrix)
                .map_err(ConnectError::from),
        }
    }

    async fn run(self, stop: watch::Receiver<bool>) -> Result<(), ConnectError> {
        match self {
            Connection::Discord(c) => c.run(stop).await,
            Connection::Matrix(c) => c.run(stop).await.map_err(ConnectError::from),
        }
    }
}

/// Keeps one platform connected until `stop`: reconnects with growing pauses after network
/// failures, gives up on errors only the operator can fix. The first attempt's result goes to
/// `first`, so start-up can report it.
async fn supervise(
    platform: Remote,
    settings: Settings,
    assistant: Arc<Assistant>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    first: oneshot::Sender<Result<(), ConnectError>>,
) {
    let name = platform.platform();
    let mut first = Some(first);
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        let opened = tokio::select! {
            r = Connection::open(platform, &settings, assistant.clone()) => r,
            _ = crate::adapters::until_stopped(&mut stop) => return,
        };
        match opened {
            Ok(connection) => {
                if let Some(f) = first.take() {
                    let _ = f.send(Ok(()));
                } else {
                    tracing::info!(platform = %name, "reconnected");
                }
                metrics.set_connected(name, true);
                backoff = Duration::from_secs(1);
                let result = connection.run(stop.clone()).await;
                metrics.set_connected(name, false);
                if *stop.borrow() {
                    return;
                }
                match result {
                    Ok(()) => tracing::warn!(platform = %name, "connection ended; reconnecting"),
                    Err(e) if e.is_retryable() => {
                        metrics.adapter_error(name, "connection");
                        tracing::error!(platform = %name, error = %e, "connection failed; reconnecting")
                    }
                    Err(e) => {
                        metrics.adapter_error(name, "connection");
                        tracing::error!(platform = %name, error = %e, "connection refused; this platform stays off until the configuration is fixed");
                        return;
                    }
                }
            }
            Err(e) => {
                metrics.adapter_error(name, "connect");
                let retryable = e.is_retryable();
                match first.take() {
                    Some(f) => {
                        let _ = f.send(Err(e));
                    }
                    None => {
                        tracing::error!(platform = %name, error = %e, retry_in_s = backoff.as_secs(), "cannot connect")
                    }
                }
                if !retryable {
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::adapters::until_stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs the daemon inside a span naming it (`service.instance`), so every line it logs says
/// which of several daemons sharing one memory wrote it.
pub async fn serve(settings: Settings, config: Option<PathBuf>) -> anyhow::Result<()> {
    let instance = settings.service.instance_name();
    let span = tracing::info_span!("serve", instance = %instance);
    run(settings, config, instance).instrument(span).await
}

async fn run(settings: Settings, config: Option<PathBuf>, instance: String) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting");
    let mut platforms = Vec::new();
    if settings.discord.enabled {
        platforms.push(Remote::Discord);
    }
    if settings.matrix.enabled {
        platforms.push(Remote::Matrix);
    }
    if platforms.is_empty() {
        bail!(
            "nothing to serve: enable a chat platform (discord.enabled = true with SYNTHIA_BOT__DISCORD__TOKEN, or matrix.enabled = true with matrix.homeserver, matrix.user_id and SYNTHIA_BOT__MATRIX__PASSWORD)"
        );
    }
    let metrics = Arc::new(Metrics::new());
    metrics.set_instance(&instance);
    let metrics_server = match &settings.metrics.listen {
        l if l.is_empty() => None,
        l => Some(crate::metrics::serve(l, metrics.clone()).await?),
    };
    let store = open_store(&settings).await?;
    let worker = match extending_start(|| load_worker(&settings)) {
        Ok(w) => w,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    let assistant = Arc::new(Assistant::new(store.clone(), worker.clone(), &settings));
    assistant.set_observer(metrics.clone());
    {
        let worker = worker.clone();
        metrics.set_queue_source(move || worker.queue_depth() as i64);
    }
    {
        let worker = worker.clone();
        metrics.set_endpoint_source(move || worker.endpoints());
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut firsts = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for &p in &platforms {
        let (tx, rx) = oneshot::channel();
        tasks.spawn(
            supervise(
                p,
                settings.clone(),
                assistant.clone(),
                metrics.clone(),
                stop_rx.clone(),
                tx,
            )
            .in_current_span(),
        );
        firsts.push((p, rx));
    }
    let (mut up, mut retrying, mut refused) = (0, 0, Vec::new());
    for (p, rx) in firsts {
        match rx.await {
            Ok(Ok(())) => {
                up += 1;
                tracing::info!(platform = p.platform().as_str(), "connected");
            }
            Ok(Err(e)) if e.is_retryable() => {
                retrying += 1;
                tracing::error!(platform = p.platform().as_str(), error = %e, "cannot connect; retrying in the background");
            }
            Ok(Err(e)) => {
                tracing::error!(platform = p.platform().as_str(), error = %e, "cannot connect; this platform stays off until the configuration is fixed");
                refused.push(format!("{}: {e}", p.platform().as_str()));
            }
            Err(_) => refused.push(format!(
                "{}: the connection task ended",
                p.platform().as_str()
            )),
        }
    }
    if up + retrying == 0 {
        let _ = stop_tx.send(true);
        worker.shutdown();
        store.close().await;
        bail!("{}", refused.join("; "));
    }

    let notifier = Arc::new(Notifier::from_env());
    notifier.ready();
    tracing::info!(connected = up, retrying, "serving");
    // Watchdog pings stop when the inference thread stops making progress, so systemd restarts
    // a stuck daemon.
    let watchdog = notifier.watchdog_interval().map(|every| {
        let (notifier, worker) = (notifier.clone(), worker.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if worker.since_heartbeat() < every {
                    notifier.watchdog_ping();
                } else {
                    tracing::error!(
                        stuck_s = worker.since_heartbeat().as_secs(),
                        "the inference thread is not responding"
                    );
                }
            }
        })
    });
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let signalled = loop {
        tokio::select! {
            r = tasks.join_next() => {
                if r.is_none() {
                    break false;
                }
            }
            _ = &mut shutdown => break true,
            _ = reload_signal(&mut hangup) => {
                notifier.reloading();
                match load_settings(config.as_deref()) {
                    Ok(new) => {
                        let changed = assistant.reload(&new);
                        if new.model != settings.model
                            || new.memory != settings.memory
                            || new.discord.token != settings.discord.token
                            || new.discord.api_base != settings.discord.api_base
                            || new.matrix.homeserver != settings.matrix.homeserver
                            || new.matrix.user_id != settings.matrix.user_id
                            || new.metrics != settings.metrics
                        {
                            tracing::warn!("model, memory, metrics and connection settings change only on restart");
                        }
                        tracing::info!(changed = ?changed, "configuration reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
                }
                notifier.ready();
            }
        }
    };
    notifier.stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    if !signalled {
        worker.shutdown();
        store.close().await;
        bail!("every chat platform stopped; see the errors above");
    }
    // Stop taking messages, give replies in progress their grace period, then cancel the rest
    // (they are stored as cancelled) and close everything.
    tracing::info!(grace_s = settings.service.shutdown_grace, "shutting down");
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(u64::from(settings.service.shutdown_grace));
    let deadline = tokio::time::Instant::now() + grace;
    while assistant.answering() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if assistant.answering() > 0 {
        tracing::info!(
            replies = assistant.answering(),
            "cancelling replies still in progress"
        );
        assistant.stop_all();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while assistant.answering() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Adapters close their connections (Discord's gateway, Matrix's sync) on the stop signal.
    if tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("a chat connection did not close in time");
        tasks.abort_all();
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    worker.shutdown();
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `load` (loading the model) while telling systemd the start goes on: a first start
/// downloads and quantises the model, which takes longer than any fixed start timeout.
fn extending_start<T>(load: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let notifier = Notifier::from_env();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let notifier = &notifier;
    std::thread::scope(|s| {
        s.spawn(move || {
            loop {
                notifier.extend_start(
                    Duration::from_secs(90),
                    "loading the model (a first start downloads and quantises it)",
                );
                if finished.recv_timeout(Duration::from_secs(30))
                    != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    break;
                }
            }
        });
        let loaded = load();
        drop(done);
        loaded
    })
}
