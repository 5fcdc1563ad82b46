//! Generating on OpenAI-compatible inference servers (llama.cpp's server, vLLM, TGI, Ollama)
//! behind the same contract as the local worker: requests wait in the same round-robin queue,
//! go to the least busy server that is up (`endpoint.rs`), and stream back as the same events
//! (`run.rs`), through the raw-text completions endpoint with the prompt we rendered
//! (`client.rs`).

mod client;
mod endpoint;
mod run;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub use endpoint::{EndpointSnapshot, EndpointStats};

use super::queue::{Pending, Queue};
use super::tokenizer::TextTokenizer;
use super::{
    CancelToken, FinishReason, GenerationEvent, GenerationHandle, GenerationRequest, WorkerError,
};
use crate::config::{InferenceSettings, ModelSettings};
use endpoint::Endpoint;

/// How often down endpoints are looked at for a probe.
const PROBE_TICK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct RemoteOptions {
    pub endpoints: Vec<String>,
    pub api_key: String,
    pub model: String,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_in_flight: usize,
    pub busy_wait: Duration,
    /// Requests that may wait; more are refused as busy.
    pub queue_capacity: usize,
    /// The window prompts are built for, until a server says its own is smaller.
    pub context_length: usize,
}

impl RemoteOptions {
    pub fn from_settings(inference: &InferenceSettings, model: &ModelSettings) -> Self {
        Self {
            endpoints: inference.endpoints.clone(),
            api_key: inference.api_key.clone(),
            model: inference.model.clone(),
            connect_timeout: Duration::from_secs(u64::from(inference.connect_timeout_s)),
            idle_timeout: Duration::from_secs(u64::from(inference.idle_timeout_s)),
            max_in_flight: inference.max_in_flight.max(1) as usize,
            busy_wait: Duration::from_secs(u64::from(inference.busy_wait_s)),
            queue_capacity: model.queue_capacity.max(1) as usize,
            context_length: model.context_length as usize,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    #[error("no inference server configured: set inference.endpoints")]
    NoEndpoints,
    #[error("the remote backend must start inside the async runtime")]
    NoRuntime,
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

struct Inner {
    endpoints: Vec<Endpoint>,
    client: reqwest::Client,
    opts: RemoteOptions,
    tokenizer: Arc<TextTokenizer>,
    /// The window prompts must fit: the configured one, lowered by what servers say.
    context_length: AtomicUsize,
    queue: Mutex<Queue>,
    /// Requests sent and not finished, by serial, so shutdown can cancel them.
    running: Mutex<HashMap<u64, CancelToken>>,
    /// Requests waiting while every server answers busy, oldest first: their places in line.
    busy_line: Mutex<Vec<u64>>,
    serial: AtomicU64,
    wake: Arc<Notify>,
    shutdown: AtomicBool,
}

impl Inner {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn running(&self) -> MutexGuard<'_, HashMap<u64, CancelToken>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn context_length(&self) -> usize {
        self.context_length.load(Ordering::Acquire)
    }

    /// Lowers the window to what a server says it holds; never raises it.
    fn learn_window(&self, window: usize, from: &str) {
        let before = self.context_length.fetch_min(window, Ordering::AcqRel);
        if window < before {
            tracing::info!(
                endpoint = from,
                window,
                was = before,
                "the inference server's window is smaller; prompts are built for it from now on"
            );
        }
    }

    /// Requests the servers can take now: `max_in_flight` for each endpoint that is up or due a
    /// probe (at least one, so requests still reach a down pool and fail or probe it).
    fn capacity(&self) -> usize {
        let now = Instant::now();
        let usable = self
            .endpoints
            .iter()
            .filter(|e| e.is_up() || e.probe_due(now))
            .count();
        usable.max(1) * self.opts.max_in_flight
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// Handle to the pool of inference servers; clones share it.
#[derive(Clone)]
pub struct RemoteWorker {
    inner: Arc<Inner>,
}

impl RemoteWorker {
    /// Starts the dispatcher and the health probes on the current async runtime; the servers'
    /// windows are asked for in the background.
    pub fn spawn(
        opts: RemoteOptions,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<RemoteWorker, RemoteError> {
        if opts.endpoints.is_empty() {
            return Err(RemoteError::NoEndpoints);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RemoteError::NoRuntime)?;
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .build()
            .map_err(|e| RemoteError::Client(e.to_string()))?;
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            endpoints: opts.endpoints.iter().map(|e| Endpoint::new(e)).collect(),
            client,
            context_length: AtomicUsize::new(opts.context_length),
            opts,
            tokenizer,
            queue: Mutex::new(Queue::default()),
            running: Mutex::new(HashMap::new()),
            busy_line: Mutex::new(Vec::new()),
            serial: AtomicU64::new(0),
            wake: wake.clone(),
            shutdown: AtomicBool::new(false),
        });
        runtime.spawn(dispatch(Arc::downgrade(&inner), wake));
        runtime.spawn(probe(Arc::downgrade(&inner)));
        for i in 0..inner.endpoints.len() {
            runtime.spawn(discover_window(Arc::downgrade(&inner), i));
        }
        tracing::info!(
            endpoints = ?inner.opts.endpoints,
            max_in_flight = inner.opts.max_in_flight,
            "generating on inference servers"
        );
        Ok(RemoteWorker { inner })
    }

    /// Queues a request. Fails at once when the queue is full or the prompt cannot fit.
    pub fn submit(&self, req: GenerationRequest) -> Result<GenerationHandle, WorkerError> {
        if req.prompt.is_empty() {
            return Err(WorkerError::EmptyPrompt);
        }
        let context = self.inner.context_length();
        if req.prompt.len() >= context {
            return Err(WorkerError::PromptTooLong {
                tokens: req.prompt.len(),
                context,
            });
        }
        if self.inner.shutdown.load(Ordering::Acquire) {
            return Err(WorkerError::Stopped);
        }
        let (pending, handle) = Pending::new(req);
        {
            let mut q = self.inner.queue();
            if q.waiting >= self.inner.opts.queue_capacity {
                return Err(WorkerError::Busy { waiting: q.waiting });
            }
            q.push(pending);
        }
        self.inner.wake.notify_one();
        Ok(handle)
    }

    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        self.inner.tokenizer.clone()
    }

    pub fn queue_depth(&self) -> usize {
        self.inner.queue().waiting
    }

    pub fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    pub fn endpoints(&self) -> Vec<EndpointSnapshot> {
        self.inner
            .endpoints
            .iter()
            .map(Endpoint::snapshot)
            .collect()
    }

    /// Cancels every request sent and every waiting one; later submissions are refused.
    pub fn shutdown(&self) {
        self.inner.shutdown.store(true, Ordering::Release);
        for cancel in self.inner.running().values() {
            cancel.cancel();
        }
        let mut q = self.inner.queue();
        while let Some(p) = q.pop() {
            let _ = p.tx.send(GenerationEvent::Finished(
                p.empty_result(FinishReason::Cancelled),
            ));
        }
        drop(q);
        self.inner.wake.notify_one();
    }
}

/// Sends waiting requests out, fairly, while the servers have free slots.
async fn dispatch(inner: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            if inner.shutdown.load(Ordering::Acquire) {
                return;
            }
            while inner.running().len() < inner.capacity() {
                let next = {
                    let mut q = inner.queue();
                    let p = q.pop();
                    q.reposition();
                    p
                };
                let Some(p) = next else { break };
                if p.cancel.is_cancelled() {
                    let _ = p.tx.send(GenerationEvent::Finished(
                        p.empty_result(FinishReason::Cancelled),
                    ));
                    continue;
                }
                p.position.store(0, Ordering::Release);
                let serial = inner.serial.fetch_add(1, Ordering::AcqRel) + 1;
                inner.running().insert(serial, p.cancel.clone());
                let inner = inner.clone();
                tokio::spawn(async move {
                    run::serve(&inner, p, serial).await;
                    inner.running().remove(&serial);
                    inner.wake.notify_one();
                });
            }
        }
        wake.notified().await;
    }
}

/// Probes down endpoints whose back-off has passed (`GET …/models`), so one that comes back
/// is used again without a request having to fail on it first.
async fn probe(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(PROBE_TICK).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.shutdown.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        for ep in inner.endpoints.iter().filter(|e| e.probe_due(now)) {
            match models(&inner, &ep.base).await {
                Ok(_) => {
                    ep.mark_up();
                    inner.wake.notify_one();
                }
                Err(e) => ep.mark_down("connect", &e),
            }
        }
    }
}

/// `GET {base}/models`; any answer below 500 means the server is serving.
async fn models(inner: &Inner, base: &str) -> Result<serde_json::Value, String> {
    let mut req = inner
        .client
        .get(format!("{base}/models"))
        .timeout(inner.opts.connect_timeout * 2);
    if !inner.opts.api_key.is_empty() {
        req = req.bearer_auth(&inner.opts.api_key);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if resp.status().is_server_error() {
        return Err(format!("HTTP {}", resp.status()));
    }
    Ok(resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Asks one server for its window: vLLM lists `max_model_len` under `/models`, llama.cpp's
/// server has `n_ctx` in `/props`. Servers that say neither keep `model.context_length`, and a
/// refusal later teaches it.
async fn discover_window(inner: Weak<Inner>, index: usize) {
    let Some(inner) = inner.upgrade() else { return };
    let base = inner.endpoints[index].base.clone();
    let mut found = None;
    if let Ok(listing) = models(&inner, &base).await {
        found = listing["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| inner.opts.model.is_empty() || m["id"] == inner.opts.model.as_str())
            .filter_map(|m| m["max_model_len"].as_u64())
            .min();
    }
    if found.is_none() {
        let root = base.strip_suffix("/v1").unwrap_or(&base);
        if let Ok(resp) = inner
            .client
            .get(format!("{root}/props"))
            .timeout(inner.opts.connect_timeout * 2)
            .send()
            .await
            && resp.status().is_success()
            && let Ok(props) = resp.json::<serde_json::Value>().await
        {
            found = props["default_generation_settings"]["n_ctx"]
                .as_u64()
                .or_else(|| props["n_ctx"].as_u64());
        }
    }
    if let Some(window) = found {
        inner.learn_window(window as usize, &base);
    }
}
