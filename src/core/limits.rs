//! Rate limits per user and per conversation, rebuilt only when their settings change.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::chat::Incoming;

type Limiter = DefaultKeyedRateLimiter<String>;

/// Rate limiters with the settings they were built from.
pub(super) struct Limits {
    pub(super) per_minute: (u32, u32),
    user: Option<Arc<Limiter>>,
    conversation: Option<Arc<Limiter>>,
}

fn limiter(per_minute: u32) -> Option<Limiter> {
    NonZeroU32::new(per_minute).map(|n| RateLimiter::keyed(Quota::per_minute(n)))
}

impl Limits {
    pub(super) fn new(user: u32, conversation: u32) -> Self {
        Self {
            per_minute: (user, conversation),
            user: limiter(user).map(Arc::new),
            conversation: limiter(conversation).map(Arc::new),
        }
    }

    /// How long the message's sender or conversation must wait, if either is over its quota.
    /// Takes one unit of quota from each when it passes.
    pub(super) fn check(&self, msg: &Incoming) -> Option<Duration> {
        let now = DefaultClock::default().now();
        let user_key = format!("{}:{}", msg.key.platform, msg.author.id);
        for (limiter, key) in [
            (&self.user, user_key),
            (&self.conversation, msg.key.to_string()),
        ] {
            if let Some(l) = limiter {
                // Forget users whose quota has refilled, so the map does not grow forever.
                if l.len() > 10_000 {
                    l.retain_recent();
                }
                if let Err(not_until) = l.check_key(&key) {
                    return Some(not_until.wait_time_from(now));
                }
            }
        }
        None
    }
}
