//! Connecting to Discord: [`DiscordClient`] checks the API and token up front, refuses a
//! gateway on another host when `api_base` is a proxy, runs serenity until stopped, and maps
//! what went wrong to a [`ConnectError`] that says whether trying again can help.

use std::sync::Arc;
use std::time::Duration;

use serenity::all::{GatewayIntents, HttpBuilder};
use serenity::http::HttpError;

use super::handler::Handler;
use super::rest::{Priority, REQUEST_TIMEOUT, Rest};
use super::surface::no_mentions;
use crate::adapters::{ConnectError, until_stopped};
use crate::config::{DiscordSettings, ShardPlan};
use crate::core::Assistant;

/// Discord's own API; any other `api_base` is used as a proxy (tests, self-hosted proxies).
const DISCORD_BASE: &str = "https://discord.com";

/// A connected Discord client; `run` drives it until the connection ends for good.
pub struct DiscordClient {
    client: serenity::Client,
    shards: ShardPlan,
}

impl DiscordClient {
    /// Prepares the client. Fails with a clear message when the API cannot be reached or the
    /// token is refused, and never falls back to Discord's own gateway when `api_base` points
    /// elsewhere.
    pub async fn connect(
        settings: &DiscordSettings,
        assistant: Arc<Assistant>,
    ) -> Result<Self, ConnectError> {
        let shards = settings
            .shards
            .plan()
            .map_err(|e| ConnectError::Misconfigured(e.to_string()))?;
        let base = settings.api_base.trim_end_matches('/');
        let base = base.strip_suffix("/api/v10").unwrap_or(base);
        // One connection pool for serenity and the adapter's own requests, with a deadline on
        // each request so a dropped connection is retried instead of waited on for ever.
        let pool = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| {
                ConnectError::Misconfigured(format!("cannot set up HTTP for Discord: {e}"))
            })?;
        let http = || {
            let mut builder = HttpBuilder::new(&settings.token)
                .client(pool.clone())
                .default_allowed_mentions(no_mentions());
            if base != DISCORD_BASE {
                // serenity's rate limiter would bypass the proxy: `Rest` retries 429s itself.
                builder = builder.proxy(base).ratelimiter_disabled(true);
            }
            builder.build()
        };
        let rest = Arc::new(Rest::new(Arc::new(http()), pool.clone()));
        let http = http();
        let slot = rest.limiter().acquire(Priority::Normal).await;
        let gateway = http.get_gateway().await;
        drop(slot);
        let gateway = gateway.map_err(|e| connect_error(&e, base))?;
        if base != DISCORD_BASE && !is_loopback_or_same_host(&gateway.url, base) {
            return Err(ConnectError::Misconfigured(format!(
                "the API at {base} sent a gateway on another host ({}); refusing to connect",
                gateway.url
            )));
        }
        let slot = rest.limiter().acquire(Priority::Normal).await;
        let me = http.get_current_user().await;
        drop(slot);
        let me = me.map_err(|e| connect_error(&e, base))?;
        let intents = GatewayIntents::GUILDS
            | GatewayIntents::GUILD_MESSAGES
            | GatewayIntents::DIRECT_MESSAGES
            | GatewayIntents::MESSAGE_CONTENT;
        let handler = Handler::new(assistant, settings.clone(), me.id, rest);
        let client = serenity::client::ClientBuilder::new_with_http(http, intents)
            .event_handler(handler)
            .await
            .map_err(|e| {
                ConnectError::Misconfigured(format!("cannot create the Discord client: {e}"))
            })?;
        Ok(Self { client, shards })
    }

    /// Runs until the gateway connection ends for good (serenity reconnects and resumes on its
    /// own) or `stop` turns true, which closes the gateway cleanly.
    pub async fn run(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ConnectError> {
        let shards = self.client.shard_manager.clone();
        let plan = self.shards;
        let client = &mut self.client;
        let run = async move {
            match plan {
                ShardPlan::Recommended => client.start_autosharded().await,
                ShardPlan::Range { first, last, total } => {
                    tracing::info!(
                        first,
                        last,
                        total,
                        "running Discord shards {first} to {last} of {total}"
                    );
                    // serenity's range includes its end.
                    client.start_shard_range(first..last, total).await
                }
            }
        };
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r.map_err(|e| gateway_error(&e)),
            _ = until_stopped(&mut stop) => {
                shards.shutdown_all().await;
                let _ = tokio::time::timeout(Duration::from_secs(5), run).await;
                Ok(())
            }
        }
    }

    /// A handle to close the connection cleanly from elsewhere.
    pub fn shard_manager(&self) -> Arc<serenity::gateway::ShardManager> {
        self.client.shard_manager.clone()
    }
}

/// A refused token (401/403) only the operator can fix; anything else may pass with time.
fn connect_error(e: &serenity::Error, base: &str) -> ConnectError {
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r))
            if matches!(r.status_code.as_u16(), 401 | 403) =>
        {
            ConnectError::Refused(
                "Discord refused the bot token: check SYNTHIA_BOT__DISCORD__TOKEN (Developer Portal, Bot, Reset Token)".into(),
            )
        }
        _ => ConnectError::Unreachable(format!(
            "cannot reach the Discord API at {base}: {e}. Check discord.api_base and the network"
        )),
    }
}

/// Discord closes the gateway with "authentication failed" for a token it no longer accepts;
/// anything else is a connection that may come back.
fn gateway_error(e: &serenity::Error) -> ConnectError {
    match e {
        serenity::Error::Gateway(serenity::gateway::GatewayError::InvalidAuthentication) => {
            ConnectError::Refused(
                "Discord no longer accepts the bot token: check SYNTHIA_BOT__DISCORD__TOKEN".into(),
            )
        }
        _ => ConnectError::Unreachable(format!("Discord gateway connection failed: {e}")),
    }
}

/// Whether the gateway a proxy sent is on the proxy's own host or this machine.
fn is_loopback_or_same_host(gateway: &str, base: &str) -> bool {
    let host = |u: &str| {
        u.split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', '?']).next())
            .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h).to_string())
    };
    match (host(gateway), host(base)) {
        (Some(g), Some(b)) => g == b || g == "127.0.0.1" || g == "localhost" || g == "[::1]",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_hosts() {
        assert!(is_loopback_or_same_host(
            "ws://127.0.0.1:5555/gw",
            "http://127.0.0.1:5555"
        ));
        assert!(is_loopback_or_same_host(
            "wss://proxy.example:443",
            "https://proxy.example"
        ));
        assert!(!is_loopback_or_same_host(
            "wss://gateway.discord.gg",
            "http://127.0.0.1:5555"
        ));
    }
}
