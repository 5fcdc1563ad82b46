//! The inference engine: loading a model and its tokenizer, and the worker, one OS thread that
//! owns the model and serves every conversation of every platform, fairly, streaming text back.
//! It knows nothing of chat platforms, prompts or memory.

mod allocator;
mod backend;
mod cache;
pub mod kernels;
pub mod load;
pub mod model;
mod projection;
mod queue;
pub mod remote;
pub mod sampling;
pub mod stop;
pub mod tokenizer;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

pub use allocator::tune_for_inference;
pub use backend::Worker;
pub use load::{LoadError, LoadOptions, LoadedModel, WeightFormat, load, load_from_settings};
pub use model::{LlamaModel, LlamaShape, SeqCache};
pub use remote::{EndpointSnapshot, RemoteError, RemoteOptions, RemoteWorker};
pub use worker::{LocalWorker, WorkerOptions};

/// How to pick each next token. Temperature 0 is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }

    pub fn from_settings(s: &crate::config::SamplingSettings) -> Self {
        Self {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: s.repeat_last_n as usize,
            seed: s.seed,
        }
    }
}

/// What the worker is asked to do.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Conversation id, for fairness and for reusing its attention cache.
    pub conversation: String,
    /// Prompt token ids, BOS first.
    pub prompt: Vec<u32>,
    /// The text the ids were encoded from (without BOS), for servers that take text; `None`
    /// sends the ids decoded.
    pub prompt_text: Option<String>,
    pub sampling: SamplingParams,
    pub max_new_tokens: usize,
    /// Text that ends the reply (never shown), besides the end-of-sequence token.
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
    Cancelled,
    Error,
}

/// The record at the end of every generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationResult {
    pub text: String,
    /// Generated token ids (without the end-of-sequence token).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub error: Option<String>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose computation was reused from the conversation's cache.
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    pub queue_time: Duration,
    pub prefill_time: Duration,
    pub time_to_first_token: Option<Duration>,
    pub decode_time: Duration,
    /// Set when the caller can do something about a failure.
    pub failure: Option<Failure>,
}

/// Why a generation failed, where the caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No inference server could be reached; the question can be asked again later.
    Unavailable,
    /// The server's window is smaller than the one the prompt was built for: build it again
    /// for `window` tokens and submit once more.
    ContextTooSmall { window: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Waiting; `position` 1 is next.
    Queued {
        position: usize,
    },
    /// The worker took the request; `serial` counts starts across all requests.
    Started {
        serial: u64,
    },
    Delta(String),
    Finished(GenerationResult),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkerError {
    #[error("the model is busy: {waiting} requests are already waiting")]
    Busy { waiting: usize },
    #[error("the prompt has {tokens} tokens; the context window is {context}")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the inference worker has stopped")]
    Stopped,
}

impl WorkerError {
    /// Busy clears by itself; the others do not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WorkerError::Busy { .. })
    }
}

/// Cancels one generation from anywhere; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Whether both tokens cancel the same generation.
    pub fn same_as(&self, other: &CancelToken) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The caller's side of one generation. Dropping it cancels the generation.
pub struct GenerationHandle {
    events: tokio::sync::mpsc::UnboundedReceiver<GenerationEvent>,
    cancel: CancelToken,
    position: Arc<AtomicUsize>,
}

impl GenerationHandle {
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// For callers outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Place in the queue: 1 = next, 0 = running or done.
    pub fn queue_position(&self) -> usize {
        self.position.load(Ordering::Acquire)
    }

    /// Waits for the end, collecting the text; for scripts and tests.
    pub async fn finish(mut self) -> GenerationResult {
        while let Some(ev) = self.next().await {
            if let GenerationEvent::Finished(r) = ev {
                return r;
            }
        }
        stopped_result()
    }

    pub fn blocking_finish(mut self) -> GenerationResult {
        while let Some(ev) = self.blocking_next() {
            if let GenerationEvent::Finished(r) = ev {
                return r;
            }
        }
        stopped_result()
    }
}

impl Drop for GenerationHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn stopped_result() -> GenerationResult {
    GenerationResult {
        text: String::new(),
        tokens: Vec::new(),
        finish: FinishReason::Error,
        error: Some(WorkerError::Stopped.to_string()),
        prompt_tokens: 0,
        reused_tokens: 0,
        completion_tokens: 0,
        queue_time: Duration::ZERO,
        prefill_time: Duration::ZERO,
        time_to_first_token: None,
        decode_time: Duration::ZERO,
        failure: None,
    }
}

/// Sets the CPU thread count for candle. It reads the variables once, on first use, so this
/// must run at start-up before any other thread exists.
///
/// # Safety
/// Changes the process environment: call before any thread is spawned.
pub unsafe fn set_cpu_threads(threads: usize) {
    let n = if threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        threads
    };
    // SAFETY: the caller guarantees no other thread reads the environment concurrently.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
