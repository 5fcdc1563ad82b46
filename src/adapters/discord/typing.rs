//! One typing indicator per channel: Discord shows "typing" for a channel, not for a reply, so
//! every reply in progress there shares one loop renewing it. The loop starts with the first
//! reply and stops when the last one lets go; renewals are skipped, not queued, when the bot is
//! at its request limit, since replies matter more than the indicator.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serenity::all::ChannelId;
use serenity::http::{LightMethod, Request, Route};

use super::rest::Rest;

/// Discord shows the indicator for about 10 s (or until the bot posts).
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(8);
/// After a renewal skipped at the request limit, the next try comes this soon.
const RETRY_SKIPPED: Duration = Duration::from_secs(1);

struct Loop {
    holders: usize,
    task: tokio::task::JoinHandle<()>,
}

/// The channels where the bot is typing, each with how many replies keep it on.
pub(super) struct ChannelTyping {
    rest: Arc<Rest>,
    channels: Mutex<HashMap<ChannelId, Loop>>,
}

/// Keeps `channel`'s indicator on while it lives.
pub(super) struct TypingHold {
    registry: Arc<ChannelTyping>,
    channel: ChannelId,
}

impl Drop for TypingHold {
    fn drop(&mut self) {
        self.registry.release(self.channel);
    }
}

impl ChannelTyping {
    pub(super) fn new(rest: Arc<Rest>) -> Arc<Self> {
        Arc::new(Self {
            rest,
            channels: Mutex::new(HashMap::new()),
        })
    }

    /// Typing stays on in `channel` until the hold, and every other hold there, is dropped.
    pub(super) fn hold(self: &Arc<Self>, channel: ChannelId) -> TypingHold {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        match channels.get_mut(&channel) {
            Some(l) => l.holders += 1,
            None => {
                let rest = self.rest.clone();
                let task = tokio::spawn(renew(rest, channel));
                channels.insert(channel, Loop { holders: 1, task });
            }
        }
        TypingHold {
            registry: self.clone(),
            channel,
        }
    }

    fn release(&self, channel: ChannelId) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = channels.get_mut(&channel) {
            l.holders -= 1;
            if l.holders == 0 {
                l.task.abort();
                channels.remove(&channel);
            }
        }
    }

    /// Channels with an indicator on now.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

async fn renew(rest: Arc<Rest>, channel: ChannelId) {
    loop {
        let req = Request::new(
            Route::ChannelTyping {
                channel_id: channel,
            },
            LightMethod::Post,
        );
        let next = match rest.try_once(req).await {
            Some(Ok(())) => RENEW_EVERY,
            Some(Err(e)) => {
                tracing::debug!(channel = %channel, error = %e, "typing indicator failed");
                RENEW_EVERY
            }
            None => {
                tracing::debug!(channel = %channel, "typing skipped: at the request limit");
                RETRY_SKIPPED
            }
        };
        tokio::time::sleep(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop lives while any hold does, and only one per channel.
    #[tokio::test]
    async fn holds_are_counted_per_channel() {
        let http = Arc::new(
            serenity::http::HttpBuilder::new("t")
                .proxy("http://127.0.0.1:9")
                .ratelimiter_disabled(true)
                .build(),
        );
        let registry = ChannelTyping::new(Arc::new(Rest::new(http, reqwest::Client::new())));
        let (a, b) = (ChannelId::new(1), ChannelId::new(2));
        let first = registry.hold(a);
        let second = registry.hold(a);
        let other = registry.hold(b);
        assert_eq!(registry.active(), 2);
        drop(first);
        assert_eq!(
            registry.active(),
            2,
            "a reply in the channel still holds it"
        );
        drop(second);
        assert_eq!(registry.active(), 1);
        drop(other);
        assert_eq!(registry.active(), 0);
    }
}
