//! Prometheus metrics (`prometheus-client`), served on a loopback address at `/metrics`.
//! The core reports through [`crate::core::Observer`]; adapters report their connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::chat::Platform;
use crate::core::{Observer, ReplyReport};
use crate::inference::{EndpointSnapshot, FinishReason};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn seconds_histogram() -> Histogram {
    // 25 ms to about 100 s.
    Histogram::new(exponential_buckets(0.025, 2.0, 13))
}

type QueueSource = Box<dyn Fn() -> i64 + Send + Sync>;
type EndpointSource = Box<dyn Fn() -> Vec<EndpointSnapshot> + Send + Sync>;
type Seconds = Counter<f64, std::sync::atomic::AtomicU64>;

/// Each inference server's counts, copied from the backend's own at each scrape.
#[derive(Default)]
struct EndpointMetrics {
    up: Family<Labels, Gauge>,
    in_flight: Family<Labels, Gauge>,
    requests: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    first_tokens: Family<Labels, Counter>,
    first_token_seconds: Family<Labels, Seconds>,
    tokens: Family<Labels, Counter>,
    decode_seconds: Family<Labels, Seconds>,
}

/// Raises a counter to a total counted elsewhere (totals only grow).
fn catch_up(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

fn catch_up_seconds(counter: &Seconds, total: f64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl EndpointMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "inference_endpoint_up",
            "1 while an inference server answers, 0 while it is skipped and probed",
            self.up.clone(),
        );
        registry.register(
            "inference_endpoint_in_flight",
            "Requests an inference server is serving now",
            self.in_flight.clone(),
        );
        for (name, help, family) in [
            (
                "inference_endpoint_requests",
                "Requests sent to an inference server",
                &self.requests,
            ),
            (
                "inference_endpoint_errors",
                "An inference server's failures, by kind",
                &self.errors,
            ),
            (
                "inference_endpoint_first_tokens",
                "Streams that reached their first token",
                &self.first_tokens,
            ),
            (
                "inference_endpoint_tokens",
                "Tokens streamed from an inference server",
                &self.tokens,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "inference_endpoint_first_token_seconds",
            "Summed time from sending a request to its first token (divide by first_tokens)",
            self.first_token_seconds.clone(),
        );
        registry.register(
            "inference_endpoint_decode_seconds",
            "Summed time streaming after the first token (tokens divided by it: tokens/s)",
            self.decode_seconds.clone(),
        );
    }

    fn update(&self, snapshots: &[EndpointSnapshot]) {
        for e in snapshots {
            let l = labels(&[("endpoint", &e.url)]);
            self.up.get_or_create(&l).set(i64::from(e.up));
            self.in_flight.get_or_create(&l).set(e.in_flight as i64);
            catch_up(&self.requests.get_or_create(&l), e.stats.requests);
            catch_up(&self.first_tokens.get_or_create(&l), e.stats.first_tokens);
            catch_up(&self.tokens.get_or_create(&l), e.stats.tokens);
            catch_up_seconds(
                &self.first_token_seconds.get_or_create(&l),
                e.stats.first_token_seconds,
            );
            catch_up_seconds(
                &self.decode_seconds.get_or_create(&l),
                e.stats.decode_seconds,
            );
            for (kind, n) in &e.stats.errors {
                catch_up(
                    &self
                        .errors
                        .get_or_create(&labels(&[("endpoint", &e.url), ("kind", kind)])),
                    *n,
                );
            }
        }
    }
}

pub struct Metrics {
    registry: Registry,
    received: Family<Labels, Counter>,
    answered: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    commands: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    tokens_generated: Family<Labels, Counter>,
    prompt_tokens: Family<Labels, Counter>,
    turns_trimmed: Family<Labels, Counter>,
    cache_hits: Family<Labels, Counter>,
    cache_misses: Family<Labels, Counter>,
    time_to_first_token: Family<Labels, Histogram>,
    generation_time: Family<Labels, Histogram>,
    queue_depth: Gauge,
    connected: Family<Labels, Gauge>,
    instance: Family<Labels, Gauge>,
    queue_source: Mutex<Option<QueueSource>>,
    endpoints: EndpointMetrics,
    endpoint_source: Mutex<Option<EndpointSource>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("synthia"),
            received: Family::default(),
            answered: Family::default(),
            refused: Family::default(),
            commands: Family::default(),
            errors: Family::default(),
            tokens_generated: Family::default(),
            prompt_tokens: Family::default(),
            turns_trimmed: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            time_to_first_token: Family::new_with_constructor(seconds_histogram),
            generation_time: Family::new_with_constructor(seconds_histogram),
            queue_depth: Gauge::default(),
            connected: Family::default(),
            instance: Family::default(),
            queue_source: Mutex::new(None),
            endpoints: EndpointMetrics::default(),
            endpoint_source: Mutex::new(None),
        };
        m.endpoints.register(&mut m.registry);
        for (name, help, family) in [
            (
                "messages_received",
                "Messages addressed to the bot",
                &m.received,
            ),
            (
                "messages_answered",
                "Replies generated, by how they ended",
                &m.answered,
            ),
            (
                "messages_refused",
                "Messages not answered, by reason",
                &m.refused,
            ),
            ("commands", "Commands executed", &m.commands),
            ("errors", "Failures, by kind", &m.errors),
            (
                "tokens_generated",
                "Tokens generated in replies",
                &m.tokens_generated,
            ),
            (
                "prompt_tokens",
                "Tokens in prompts sent to the model",
                &m.prompt_tokens,
            ),
            (
                "turns_trimmed",
                "Old turns left out of prompts to fit the context window",
                &m.turns_trimmed,
            ),
            (
                "kv_cache_hits",
                "Replies that reused a cached prompt prefix",
                &m.cache_hits,
            ),
            (
                "kv_cache_misses",
                "Replies computed from the first prompt token",
                &m.cache_misses,
            ),
        ] {
            m.registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "time_to_first_token_seconds",
                "From a message's arrival to its reply's first token: turn, queue and prefill included",
                &m.time_to_first_token,
            ),
            (
                "generation_seconds",
                "The worker's time from taking a request to its last token; queue and platform edits excluded",
                &m.generation_time,
            ),
        ] {
            m.registry.register(name, help, family.clone());
        }
        m.registry.register(
            "queue_depth",
            "Requests waiting for the inference worker",
            m.queue_depth.clone(),
        );
        m.registry.register(
            "platform_connected",
            "1 while a chat platform is connected",
            m.connected.clone(),
        );
        m.registry.register(
            "instance_info",
            "1, labelled with this daemon's service.instance",
            m.instance.clone(),
        );
        m
    }

    /// Names this daemon (`service.instance`), so scrapes of several can be told apart.
    pub fn set_instance(&self, name: &str) {
        self.instance.clear();
        self.instance
            .get_or_create(&labels(&[("instance", name)]))
            .set(1);
    }

    /// Where the queue depth is read at each scrape.
    pub fn set_queue_source(&self, source: impl Fn() -> i64 + Send + Sync + 'static) {
        *self.queue_source.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(source));
    }

    /// Where the inference servers' states and counts are read at each scrape.
    pub fn set_endpoint_source(
        &self,
        source: impl Fn() -> Vec<EndpointSnapshot> + Send + Sync + 'static,
    ) {
        *self
            .endpoint_source
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Box::new(source));
    }

    pub fn set_connected(&self, platform: Platform, up: bool) {
        self.connected
            .get_or_create(&labels(&[("platform", platform.as_str())]))
            .set(i64::from(up));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(source) = &*self.queue_source.lock().unwrap_or_else(|e| e.into_inner()) {
            self.queue_depth.set(source());
        }
        if let Some(source) = &*self
            .endpoint_source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            self.endpoints.update(&source());
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Observer for Metrics {
    fn received(&self, platform: Platform) {
        self.received
            .get_or_create(&labels(&[("platform", platform.as_str())]))
            .inc();
    }

    fn refused(&self, platform: Platform, reason: &'static str) {
        self.refused
            .get_or_create(&labels(&[
                ("platform", platform.as_str()),
                ("reason", reason),
            ]))
            .inc();
    }

    fn command(&self, platform: Platform) {
        self.commands
            .get_or_create(&labels(&[("platform", platform.as_str())]))
            .inc();
    }

    fn answered(&self, platform: Platform, r: &ReplyReport) {
        let finish = match r.finish {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        };
        let p = labels(&[("platform", platform.as_str())]);
        self.answered
            .get_or_create(&labels(&[
                ("platform", platform.as_str()),
                ("finish", finish),
            ]))
            .inc();
        self.tokens_generated
            .get_or_create(&p)
            .inc_by(r.completion_tokens as u64);
        self.prompt_tokens
            .get_or_create(&p)
            .inc_by(r.prompt_tokens as u64);
        self.turns_trimmed
            .get_or_create(&p)
            .inc_by(r.trimmed_turns as u64);
        if r.reused_tokens > 0 {
            self.cache_hits.get_or_create(&p).inc();
        } else {
            self.cache_misses.get_or_create(&p).inc();
        }
        if let Some(t) = r.time_to_first_token {
            self.time_to_first_token
                .get_or_create(&p)
                .observe(t.as_secs_f64());
        }
        self.generation_time
            .get_or_create(&p)
            .observe(r.generation_time.as_secs_f64());
    }

    fn error(&self, platform: Platform, kind: &'static str) {
        self.errors
            .get_or_create(&labels(&[("platform", platform.as_str()), ("kind", kind)]))
            .inc();
    }
}

impl Metrics {
    /// A failure outside the core (a platform's connection).
    pub fn adapter_error(&self, platform: Platform, kind: &'static str) {
        Observer::error(self, platform, kind);
    }
}

/// Serves `GET /metrics` on `listen` (validated as loopback by the configuration).
pub async fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("metrics.listen: not an address: {listen}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tracing::info!(%addr, "metrics at /metrics");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_what_was_observed() {
        let m = Metrics::new();
        m.set_queue_source(|| 3);
        m.received(Platform::Matrix);
        m.refused(Platform::Discord, "denied");
        m.answered(
            Platform::Matrix,
            &ReplyReport {
                finish: FinishReason::Eos,
                prompt_tokens: 40,
                reused_tokens: 0,
                completion_tokens: 7,
                time_to_first_token: Some(Duration::from_millis(120)),
                generation_time: Duration::from_millis(900),
                decode_time: Duration::from_millis(700),
                trimmed_turns: 2,
            },
        );
        m.set_connected(Platform::Discord, true);
        m.set_instance("eu-1");
        let text = m.render();
        for line in [
            "synthia_messages_received_total{platform=\"matrix\"} 1",
            "synthia_messages_refused_total{platform=\"discord\",reason=\"denied\"} 1",
            "synthia_messages_answered_total{platform=\"matrix\",finish=\"eos\"} 1",
            "synthia_tokens_generated_total{platform=\"matrix\"} 7",
            "synthia_prompt_tokens_total{platform=\"matrix\"} 40",
            "synthia_turns_trimmed_total{platform=\"matrix\"} 2",
            "synthia_kv_cache_misses_total{platform=\"matrix\"} 1",
            "synthia_time_to_first_token_seconds_count{platform=\"matrix\"} 1",
            "synthia_generation_seconds_sum{platform=\"matrix\"} 0.9",
            "synthia_queue_depth 3",
            "synthia_platform_connected{platform=\"discord\"} 1",
            "synthia_instance_info{instance=\"eu-1\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn each_inference_server_has_its_own_counts() {
        use crate::inference::remote::EndpointStats;
        let m = Metrics::new();
        let snapshot = |requests: u64, up: bool| {
            vec![EndpointSnapshot {
                url: "http://127.0.0.1:9/v1".into(),
                up,
                in_flight: 2,
                stats: EndpointStats {
                    requests,
                    errors: [("cut", 1), ("busy", 3)].into_iter().collect(),
                    first_tokens: requests,
                    first_token_seconds: 0.5,
                    tokens: 40,
                    decode_seconds: 2.0,
                },
            }]
        };
        let shared = Arc::new(Mutex::new(snapshot(4, true)));
        let source = shared.clone();
        m.set_endpoint_source(move || source.lock().unwrap().clone());
        let e = "endpoint=\"http://127.0.0.1:9/v1\"";
        let text = m.render();
        for line in [
            format!("synthia_inference_endpoint_up{{{e}}} 1"),
            format!("synthia_inference_endpoint_in_flight{{{e}}} 2"),
            format!("synthia_inference_endpoint_requests_total{{{e}}} 4"),
            format!("synthia_inference_endpoint_errors_total{{{e},kind=\"cut\"}} 1"),
            format!("synthia_inference_endpoint_errors_total{{{e},kind=\"busy\"}} 3"),
            format!("synthia_inference_endpoint_tokens_total{{{e}}} 40"),
            format!("synthia_inference_endpoint_decode_seconds_total{{{e}}} 2.0"),
            format!("synthia_inference_endpoint_first_token_seconds_total{{{e}}} 0.5"),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        // Later scrapes follow the backend's totals, and the state.
        *shared.lock().unwrap() = snapshot(9, false);
        let text = m.render();
        assert!(
            text.contains(&format!(
                "synthia_inference_endpoint_requests_total{{{e}}} 9"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("synthia_inference_endpoint_up{{{e}}} 0")),
            "{text}"
        );
    }
}
