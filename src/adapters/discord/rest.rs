//! Every REST request the Discord adapter makes once connected goes through [`Rest`]: one
//! limiter shared by all of them keeps the bot within Discord's global 50 requests a second, and
//! what may pass with time (5xx such as the edge's HTML 502, 429, timeouts, dropped connections)
//! is retried with back-off, waiting at least as long as a 429 asks. serenity's error response
//! keeps neither the headers nor the body's `retry_after`, and its own rate limiter is off
//! behind a proxy, so requests are built from serenity's routes and builders but sent and read
//! here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::de::DeserializeOwned;
use serenity::http::{Http, Request};

/// Requests the bot starts per window, all routes together: two under Discord's global limit
/// of 50 a second. Requests that start in order can arrive out of step (a slow connection, a
/// busy machine: 51 within one second were seen at 50 per window), and Discord counts them as
/// they arrive.
pub(super) const GLOBAL_LIMIT: usize = 48;
/// A little longer than Discord's second, for the same reason.
pub(super) const GLOBAL_WINDOW: Duration = Duration::from_millis(1050);
/// Tries per request before giving up: back-off 0.5, 1, 2 and 4 s between them.
const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// A longer wait than this is not worth holding a reply for: the request fails instead.
const LONGEST_WAIT: Duration = Duration::from_secs(60);
/// How long one request may take, answer included, before it counts as failed and is retried.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a request failed, by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Discord refused it (4xx other than 429): trying again cannot help.
    #[error("Discord refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
    /// It kept failing in ways that may pass (5xx, 429, timeouts, dropped connections).
    #[error("Discord did not take the request after {attempts} tries: {last}")]
    Unavailable { attempts: u32, last: String },
    /// It could not be built, or Discord's answer could not be read as what was asked for.
    #[error("a Discord request could not be built or its answer read: {0}")]
    Invalid(String),
}

impl RestError {
    /// Whether the platform may take it later: the reply can go another way meanwhile.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// Which requests go first when the bot is short of its global limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Priority {
    /// What users wait for: an answer's first post, and the final text of a reply or notice.
    Urgent,
    /// The rest: queue notices, start-up lookups.
    Normal,
}

/// Counts a waiting caller until it is served or gives up (its future dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// At most `limit` requests start within any `window`. Waiting callers queue in arrival order
/// within their [`Priority`], and a free slot goes to an urgent caller before any other: under
/// load, answers' first posts and final texts do not wait behind queue notices. A 429 that
/// Discord marks global pauses everyone.
pub(super) struct Limiter {
    limit: usize,
    window: Duration,
    sent: std::sync::Mutex<VecDeque<Instant>>,
    /// One line per priority: its first caller is the one that watches the slots.
    urgent_line: tokio::sync::Mutex<()>,
    normal_line: tokio::sync::Mutex<()>,
    urgent_waiting: AtomicUsize,
    normal_waiting: AtomicUsize,
    paused_until: std::sync::Mutex<Option<Instant>>,
}

/// How often a normal caller looks again while urgent ones take the free slots.
const YIELD_TO_URGENT: Duration = Duration::from_millis(2);

impl Limiter {
    pub(super) fn new(limit: usize, window: Duration) -> Self {
        Self {
            limit: limit.max(1),
            window,
            sent: std::sync::Mutex::new(VecDeque::new()),
            urgent_line: tokio::sync::Mutex::new(()),
            normal_line: tokio::sync::Mutex::new(()),
            urgent_waiting: AtomicUsize::new(0),
            normal_waiting: AtomicUsize::new(0),
            paused_until: std::sync::Mutex::new(None),
        }
    }

    fn prune(&self, sent: &mut VecDeque<Instant>, now: Instant) {
        while sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            sent.pop_front();
        }
    }

    fn pause_left(&self) -> Option<Duration> {
        let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Takes a slot if `priority` may have one now; otherwise how long to wait before looking
    /// again.
    fn take_or_wait(&self, priority: Priority) -> Option<Duration> {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        self.prune(&mut sent, now);
        if sent.len() >= self.limit {
            let oldest = sent.front().copied().unwrap_or(now);
            return Some(self.window.saturating_sub(now.duration_since(oldest)));
        }
        if priority == Priority::Normal && self.urgent_waiting.load(Ordering::Acquire) > 0 {
            return Some(YIELD_TO_URGENT);
        }
        sent.push_back(now);
        None
    }

    /// Waits for a slot, behind every caller of the same priority that came first, and behind
    /// every urgent one.
    pub(super) async fn acquire(&self, priority: Priority) {
        let (line, count) = match priority {
            Priority::Urgent => (&self.urgent_line, &self.urgent_waiting),
            Priority::Normal => (&self.normal_line, &self.normal_waiting),
        };
        let _waiting = Waiting::new(count);
        let _first = line.lock().await;
        loop {
            if let Some(wait) = self.pause_left() {
                tokio::time::sleep(wait).await;
                continue;
            }
            match self.take_or_wait(priority) {
                None => return,
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// A slot only if one is free now and nobody waits: for requests that may be skipped.
    pub(super) fn try_acquire(&self) -> bool {
        if self.pause_left().is_some()
            || self.urgent_waiting.load(Ordering::Acquire) > 0
            || self.normal_waiting.load(Ordering::Acquire) > 0
        {
            return false;
        }
        self.take_or_wait(Priority::Urgent).is_none()
    }

    /// Discord said every request must wait (a global 429).
    fn pause(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
        }
    }
}

/// How long a 429 (or a 503) asks to wait: the longest of the body's `retry_after` and the
/// `Retry-After` and `X-RateLimit-Reset-After` headers, whichever are there.
pub(super) fn retry_after(headers: &reqwest::header::HeaderMap, body: &str) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let from_body = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["retry_after"].as_f64());
    [
        from_body,
        header("retry-after"),
        header("x-ratelimit-reset-after"),
    ]
    .into_iter()
    .flatten()
    .filter(|s| s.is_finite() && *s >= 0.0)
    .map(Duration::from_secs_f64)
    .max()
}

/// Whether a 429 applies to every request the bot makes.
fn is_global(headers: &reqwest::header::HeaderMap, body: &str) -> bool {
    headers.contains_key("x-ratelimit-global")
        || serde_json::from_str::<serde_json::Value>(body)
            .is_ok_and(|v| v["global"] == serde_json::Value::Bool(true))
}

/// Discord's own explanation in a JSON error, or the status alone (an HTML page says nothing
/// worth logging).
fn error_message(status: reqwest::StatusCode, body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.to_string())
}

/// One try's result.
enum Tried {
    Done(String),
    Again { why: String, wait: Option<Duration> },
    Failed(RestError),
}

/// The adapter's way to Discord's REST API; shared by every handler and reply.
pub(super) struct Rest {
    http: Arc<Http>,
    client: reqwest::Client,
    limiter: Limiter,
}

impl Rest {
    /// Requests over `client` (the one `http` was built with, so they share connections),
    /// authorised and routed as `http` is.
    pub(super) fn new(http: Arc<Http>, client: reqwest::Client) -> Self {
        Self {
            http,
            client,
            limiter: Limiter::new(GLOBAL_LIMIT, GLOBAL_WINDOW),
        }
    }

    /// The limiter every request takes a slot from, also those sent by serenity's own methods.
    pub(super) fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// Sends `req` and reads the JSON answer as `T`.
    pub(super) async fn json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        priority: Priority,
        req: Request<'_>,
    ) -> Result<T, RestError> {
        let body = self.send(what, priority, req).await?;
        serde_json::from_str(&body)
            .map_err(|e| RestError::Invalid(format!("{what}: unexpected answer: {e}")))
    }

    /// Sends `req`; the answer's body, if any, is not needed.
    pub(super) async fn empty(
        &self,
        what: &'static str,
        priority: Priority,
        req: Request<'_>,
    ) -> Result<(), RestError> {
        self.send(what, priority, req).await.map(|_| ())
    }

    /// Sends `req` once, taking a slot only if one is free now: a request worth skipping
    /// rather than queueing behind replies (typing). `None` when skipped.
    pub(super) async fn try_once(&self, req: Request<'_>) -> Option<Result<(), RestError>> {
        if !self.limiter.try_acquire() {
            return None;
        }
        Some(match self.try_send(req).await {
            Tried::Done(_) => Ok(()),
            Tried::Again { why, .. } => Err(RestError::Unavailable {
                attempts: 1,
                last: why,
            }),
            Tried::Failed(e) => Err(e),
        })
    }

    /// Sends `req`, retrying what may pass with back-off (at least as long as Discord asks),
    /// each try taking a slot from the shared limiter.
    async fn send(
        &self,
        what: &'static str,
        priority: Priority,
        req: Request<'_>,
    ) -> Result<String, RestError> {
        let (mut backoff, mut attempt) = (FIRST_BACKOFF, 0);
        loop {
            attempt += 1;
            self.limiter.acquire(priority).await;
            let (why, asked) = match self.try_send(req.clone()).await {
                Tried::Done(body) => return Ok(body),
                Tried::Failed(e) => return Err(e),
                Tried::Again { why, wait } => (why, wait),
            };
            if attempt >= ATTEMPTS {
                return Err(RestError::Unavailable {
                    attempts: ATTEMPTS,
                    last: why,
                });
            }
            // A little jitter, so replies that failed together do not retry together.
            let jitter = rand::rng().random_range(0.0..0.2);
            let wait = asked.unwrap_or_default().max(backoff.mul_f64(1.0 + jitter));
            if wait > LONGEST_WAIT {
                return Err(RestError::Unavailable {
                    attempts: attempt,
                    last: format!("{why}; Discord asked to wait {wait:?}"),
                });
            }
            tracing::warn!(
                request = what,
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %why,
                "Discord request failed; trying again"
            );
            tokio::time::sleep(wait).await;
            backoff *= 2;
        }
    }

    /// One try, through serenity's own rate limiter where it is on.
    async fn try_send(&self, req: Request<'_>) -> Tried {
        let sent = match &self.http.ratelimiter {
            Some(limiter) => limiter.perform(req).await,
            None => match req.build(&self.client, self.http.token(), self.http.proxy.as_deref()) {
                Ok(builder) => builder
                    .send()
                    .await
                    .map_err(|e| serenity::Error::Http(e.into())),
                Err(e) => Err(e),
            },
        };
        let response = match sent {
            Ok(r) => r,
            Err(serenity::Error::Http(serenity::http::HttpError::Request(e)))
                if !e.is_builder() =>
            {
                return Tried::Again {
                    why: format!("no answer: {e}"),
                    wait: None,
                };
            }
            Err(e) => return Tried::Failed(RestError::Invalid(e.to_string())),
        };
        let status = response.status();
        let headers = response.headers().clone();
        let body = match response.text().await {
            Ok(b) => b,
            Err(e) => {
                return Tried::Again {
                    why: format!("the answer was cut off: {e}"),
                    wait: None,
                };
            }
        };
        if status.is_success() {
            return Tried::Done(body);
        }
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let wait = retry_after(&headers, &body);
            if is_global(&headers, &body) {
                self.limiter.pause(wait.unwrap_or(Duration::from_secs(1)));
            }
            return Tried::Again {
                why: format!("rate limited: {}", error_message(status, &body)),
                wait,
            };
        }
        if status.is_server_error() {
            return Tried::Again {
                why: format!("Discord answered {}", error_message(status, &body)),
                wait: retry_after(&headers, &body),
            };
        }
        Tried::Failed(RestError::Refused {
            status: status.as_u16(),
            message: error_message(status, &body),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn retry_after_takes_the_longest_of_body_and_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, "<html>502</html>"), None);
        assert_eq!(
            retry_after(&h, r#"{"retry_after": 2.5, "global": false}"#),
            Some(Duration::from_millis(2500))
        );
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(
            retry_after(&h, r#"{"retry_after": 2.5}"#),
            Some(Duration::from_secs(3))
        );
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-after", HeaderValue::from_static("1.25"));
        assert_eq!(retry_after(&h, ""), Some(Duration::from_millis(1250)));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, ""), Some(Duration::from_millis(1250)));
    }

    #[test]
    fn global_429s_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_global(&h, r#"{"global": false}"#));
        assert!(is_global(&h, r#"{"global": true}"#));
        h.insert("x-ratelimit-global", HeaderValue::from_static("true"));
        assert!(is_global(&h, "<html></html>"));
    }

    /// No window of the limiter's length ever holds more than its limit, and waiting callers
    /// are served as soon as the oldest slot frees.
    #[tokio::test]
    async fn the_limiter_never_lets_more_than_its_limit_through_in_a_window() {
        let limiter = Arc::new(Limiter::new(5, Duration::from_millis(200)));
        let started = Instant::now();
        let tasks: Vec<_> = (0..15)
            .map(|_| {
                let l = limiter.clone();
                tokio::spawn(async move {
                    l.acquire(Priority::Normal).await;
                    Instant::now()
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_millis(200))
                .count();
            assert!(in_window <= 5, "{in_window} within one window");
        }
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(900),
            "{took:?}"
        );
        assert!(!limiter.try_acquire(), "the window is full");
    }

    /// With the window full, urgent callers that came last get the next slots before normal
    /// ones that came first; the limit still holds.
    #[tokio::test]
    async fn urgent_requests_take_free_slots_before_normal_ones() {
        let limiter = Arc::new(Limiter::new(2, Duration::from_millis(150)));
        limiter.acquire(Priority::Normal).await;
        limiter.acquire(Priority::Normal).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spawn = |priority: Priority, name: &'static str| {
            let (l, order) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                l.acquire(priority).await;
                order.lock().unwrap().push((name, Instant::now()));
            })
        };
        let mut tasks = vec![
            spawn(Priority::Normal, "normal 1"),
            spawn(Priority::Normal, "normal 2"),
        ];
        tokio::time::sleep(Duration::from_millis(20)).await;
        tasks.push(spawn(Priority::Urgent, "urgent 1"));
        tasks.push(spawn(Priority::Urgent, "urgent 2"));
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let names: Vec<&str> = order.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["urgent 1", "urgent 2", "normal 1", "normal 2"]);
        assert!(
            order[2].1.duration_since(order[0].1) >= Duration::from_millis(140),
            "the normal ones waited for the next window: {order:?}"
        );
    }
}
