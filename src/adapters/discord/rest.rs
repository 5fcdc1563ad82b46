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

/// At most `limit` requests start within any `window`, and a request keeps its slot until a
/// `window` after its answer came back: however late a request reaches Discord (it arrives
/// between its start and its answer), no window there can hold more than `limit` of them, on a
/// slow connection or a busy machine alike. Waiting callers queue in arrival order
/// within their [`Priority`], and a free slot goes to an urgent caller before any other: under
/// load, answers' first posts and final texts do not wait behind queue notices. A 429 that
/// Discord marks global pauses everyone.
pub(super) struct Limiter {
    limit: usize,
    window: Duration,
    /// The slots taken: `None` while the request is out, then when its answer came.
    slots: std::sync::Mutex<Slots>,
    /// One line per priority: its first caller is the one that watches the slots.
    urgent_line: tokio::sync::Mutex<()>,
    normal_line: tokio::sync::Mutex<()>,
    urgent_waiting: AtomicUsize,
    normal_waiting: AtomicUsize,
    paused_until: std::sync::Mutex<Option<Instant>>,
}

/// How often a normal caller looks again while urgent ones take the free slots.
const YIELD_TO_URGENT: Duration = Duration::from_millis(2);
/// The limiter's taken slots, by id.
#[derive(Default)]
struct Slots {
    next_id: u64,
    taken: VecDeque<(u64, Option<Instant>)>,
}

impl Slots {
    fn take(&mut self) -> u64 {
        self.next_id += 1;
        self.taken.push_back((self.next_id, None));
        self.next_id
    }

    /// Frees the slots whose answers came a `window` or more before `now`.
    fn free_before(&mut self, now: Instant, window: Duration) {
        self.taken
            .retain(|(_, done)| done.is_none_or(|d| now.duration_since(d) < window));
    }
}

/// A request's place in the limiter: held while the request is out; dropping it (the answer
/// came, or the request was given up) starts the window after which the place frees.
#[must_use = "the slot is the request's place until its answer comes"]
pub(super) struct Slot<'a> {
    limiter: &'a Limiter,
    id: u64,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut slots = self.limiter.slots();
        if let Some(entry) = slots.taken.iter_mut().find(|(id, _)| *id == self.id) {
            entry.1 = Some(now);
        }
    }
}

impl Limiter {
    pub(super) fn new(limit: usize, window: Duration) -> Self {
        Self {
            limit: limit.max(1),
            window,
            slots: std::sync::Mutex::new(Slots::default()),
            urgent_line: tokio::sync::Mutex::new(()),
            normal_line: tokio::sync::Mutex::new(()),
            urgent_waiting: AtomicUsize::new(0),
            normal_waiting: AtomicUsize::new(0),
            paused_until: std::sync::Mutex::new(None),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pause_left(&self) -> Option<Duration> {
        let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        until
            .map(|u| u.saturating_duration_since(Instant::now()))
            .filter(|d| !d.is_zero())
    }

    /// Takes a slot if `priority` may have one now; otherwise how long to wait before looking
    /// again.
    fn take_or_wait(&self, priority: Priority) -> Result<Slot<'_>, Duration> {
        let mut slots = self.slots();
        let now = Instant::now();
        slots.free_before(now, self.window);
        if slots.taken.len() >= self.limit {
            // The earliest answered slot frees a window after its answer; one still out
            // frees no sooner than a window from now.
            let next = slots
                .taken
                .iter()
                .filter_map(|(_, done)| *done)
                .min()
                .map(|done| self.window.saturating_sub(now.duration_since(done)));
            return Err(next.unwrap_or(self.window));
        }
        if priority == Priority::Normal && self.urgent_waiting.load(Ordering::Acquire) > 0 {
            return Err(YIELD_TO_URGENT);
        }
        Ok(Slot {
            limiter: self,
            id: slots.take(),
        })
    }

    /// Waits for a slot, behind every caller of the same priority that came first, and behind
    /// every urgent one.
    pub(super) async fn acquire(&self, priority: Priority) -> Slot<'_> {
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
                Ok(slot) => return slot,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// A slot only if one is free now and nobody waits: for requests that may be skipped.
    pub(super) fn try_acquire(&self) -> Option<Slot<'_>> {
        if self.pause_left().is_some()
            || self.urgent_waiting.load(Ordering::Acquire) > 0
            || self.normal_waiting.load(Ordering::Acquire) > 0
        {
            return None;
        }
        self.take_or_wait(Priority::Urgent).ok()
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
        let _slot = self.limiter.try_acquire()?;
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
            let slot = self.limiter.acquire(priority).await;
            let tried = self.try_send(req.clone()).await;
            drop(slot);
            let (why, asked) = match tried {
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
                    drop(l.acquire(Priority::Normal).await);
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
        assert!(limiter.try_acquire().is_none(), "the window is full");
    }

    /// A request still out keeps its slot, and the slot frees only a window after its answer:
    /// requests that reach Discord late cannot crowd a window there.
    #[tokio::test]
    async fn a_slot_frees_a_window_after_its_answer_not_after_its_start() {
        let window = Duration::from_millis(100);
        let limiter = Arc::new(Limiter::new(2, window));
        let started = Instant::now();
        let a = limiter.acquire(Priority::Normal).await;
        let b = limiter.acquire(Priority::Normal).await;
        let third = {
            let l = limiter.clone();
            tokio::spawn(async move {
                drop(l.acquire(Priority::Normal).await);
                Instant::now()
            })
        };
        // Both requests are out for longer than a window.
        tokio::time::sleep(Duration::from_millis(180)).await;
        assert!(limiter.try_acquire().is_none(), "slots are held while out");
        assert!(!third.is_finished(), "no slot while both requests are out");
        let answered = Instant::now();
        drop(a);
        drop(b);
        let got = third.await.unwrap();
        assert!(
            got.duration_since(answered) >= window,
            "the slot freed {:?} after the answer",
            got.duration_since(answered)
        );
        assert!(got.duration_since(started) < Duration::from_millis(600));
    }

    /// With the window full, urgent callers that came last get the next slots before normal
    /// ones that came first; the limit still holds.
    #[tokio::test]
    async fn urgent_requests_take_free_slots_before_normal_ones() {
        let limiter = Arc::new(Limiter::new(2, Duration::from_millis(150)));
        drop(limiter.acquire(Priority::Normal).await);
        drop(limiter.acquire(Priority::Normal).await);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spawn = |priority: Priority, name: &'static str| {
            let (l, order) = (limiter.clone(), order.clone());
            tokio::spawn(async move {
                drop(l.acquire(priority).await);
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
