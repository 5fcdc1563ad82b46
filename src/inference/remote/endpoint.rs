//! One inference server as the pool sees it: how busy it is, whether it is up, when to probe it
//! again after a failure, and what it has done (for metrics).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Back-off after the first failure; doubled per failure in a row, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
struct Health {
    up: bool,
    failures: u32,
    retry_at: Instant,
}

/// What one endpoint has done since start; read at each metrics scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointStats {
    pub requests: u64,
    /// Failures by kind: `connect`, `timeout`, `server_error`, `cut`, `busy`, `rejected`,
    /// `context`.
    pub errors: BTreeMap<&'static str, u64>,
    /// Streams that produced a first token, and their summed time to it.
    pub first_tokens: u64,
    pub first_token_seconds: f64,
    /// Tokens streamed, and the time spent streaming them after the first.
    pub tokens: u64,
    pub decode_seconds: f64,
}

/// An endpoint's state and counts, for metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSnapshot {
    pub url: String,
    pub up: bool,
    pub in_flight: usize,
    pub stats: EndpointStats,
}

#[derive(Debug)]
pub(super) struct Endpoint {
    /// The base URL without a trailing slash: `…/v1`.
    pub(super) base: String,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
    stats: Mutex<EndpointStats>,
}

/// Holds one of an endpoint's request slots until dropped.
pub(super) struct Slot<'a>(&'a Endpoint);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Endpoint {
    pub(super) fn new(base: &str) -> Self {
        Self {
            base: base.trim().trim_end_matches('/').to_string(),
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health {
                up: true,
                failures: 0,
                retry_at: Instant::now(),
            }),
            stats: Mutex::new(EndpointStats::default()),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, EndpointStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_up(&self) -> bool {
        self.health().up
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether a down endpoint's back-off has passed, so a request or probe may try it.
    pub(super) fn probe_due(&self, now: Instant) -> bool {
        let h = self.health();
        !h.up && h.retry_at <= now
    }

    pub(super) fn take_slot(&self) -> Slot<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.stats().requests += 1;
        Slot(self)
    }

    /// After a failure that says the server is not serving: skipped until the back-off passes.
    pub(super) fn mark_down(&self, kind: &'static str, message: &str) {
        let mut h = self.health();
        h.failures = h.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (h.failures - 1).min(5))
            .min(MAX_BACKOFF);
        h.retry_at = Instant::now() + backoff;
        if h.up {
            tracing::warn!(
                endpoint = %self.base,
                kind,
                error = message,
                "inference server is down; skipping it and probing every so often"
            );
        }
        h.up = false;
        drop(h);
        self.count_error(kind);
    }

    pub(super) fn mark_up(&self) {
        let mut h = self.health();
        if !h.up {
            tracing::info!(endpoint = %self.base, "inference server is back up");
        }
        h.up = true;
        h.failures = 0;
    }

    pub(super) fn count_error(&self, kind: &'static str) {
        *self.stats().errors.entry(kind).or_default() += 1;
    }

    /// A stream's first token came `after` the request was sent.
    pub(super) fn count_first_token(&self, after: Duration) {
        let mut s = self.stats();
        s.first_tokens += 1;
        s.first_token_seconds += after.as_secs_f64();
    }

    pub(super) fn count_tokens(&self, tokens: u64, streaming: Duration) {
        let mut s = self.stats();
        s.tokens += tokens;
        s.decode_seconds += streaming.as_secs_f64();
    }

    pub(super) fn snapshot(&self) -> EndpointSnapshot {
        EndpointSnapshot {
            url: self.base.clone(),
            up: self.is_up(),
            in_flight: self.in_flight(),
            stats: self.stats().clone(),
        }
    }
}

/// The endpoint a request goes to: the least busy one that is up and has a free slot; failing
/// that, a down one whose back-off has passed (the request is its probe). `skip` holds the
/// indices this request already failed on.
pub(super) fn choose(
    endpoints: &[Endpoint],
    max_in_flight: usize,
    skip: &[usize],
) -> Option<usize> {
    let now = Instant::now();
    let open = |i: &usize| !skip.contains(i);
    let up = (0..endpoints.len())
        .filter(open)
        .filter(|&i| endpoints[i].is_up() && endpoints[i].in_flight() < max_in_flight)
        .min_by_key(|&i| endpoints[i].in_flight());
    up.or_else(|| {
        (0..endpoints.len())
            .filter(open)
            .find(|&i| endpoints[i].probe_due(now))
    })
    .or_else(|| {
        // Every open endpoint is up but full (the dispatcher's count lags a finishing reply).
        (0..endpoints.len())
            .filter(open)
            .filter(|&i| endpoints[i].is_up())
            .min_by_key(|&i| endpoints[i].in_flight())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_busy_endpoint_that_is_up_is_chosen() {
        let eps = [Endpoint::new("http://a/v1/"), Endpoint::new("http://b/v1")];
        assert_eq!(eps[0].base, "http://a/v1");
        let _a = eps[0].take_slot();
        assert_eq!(choose(&eps, 4, &[]), Some(1));
        let _b1 = eps[1].take_slot();
        let _b2 = eps[1].take_slot();
        assert_eq!(choose(&eps, 4, &[]), Some(0));
        // One this request failed on is not tried again.
        assert_eq!(choose(&eps, 4, &[0]), Some(1));
        assert_eq!(choose(&eps, 4, &[0, 1]), None);
        drop(_b1);
        drop(_b2);
        assert_eq!(eps[1].in_flight(), 0);
        assert_eq!(eps[1].snapshot().stats.requests, 2);
    }

    #[test]
    fn a_down_endpoint_is_skipped_until_its_back_off_passes() {
        let eps = [Endpoint::new("http://a/v1"), Endpoint::new("http://b/v1")];
        eps[0].mark_down("connect", "refused");
        assert!(!eps[0].is_up());
        assert_eq!(choose(&eps, 4, &[]), Some(1));
        // Only the down one left and still backing off: nothing to try.
        assert_eq!(choose(&eps, 4, &[1]), None);
        eps[0].health().retry_at = Instant::now();
        assert_eq!(choose(&eps, 4, &[1]), Some(0));
        // Failures in a row back off longer, to the cap.
        for _ in 0..10 {
            eps[0].mark_down("connect", "refused");
        }
        let wait = eps[0].health().retry_at - Instant::now();
        assert!(
            wait > Duration::from_secs(20) && wait <= MAX_BACKOFF,
            "{wait:?}"
        );
        eps[0].mark_up();
        assert!(eps[0].is_up());
        assert_eq!(eps[0].snapshot().stats.errors["connect"], 11);
    }
}
