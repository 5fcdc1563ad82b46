//! The one handle callers hold, whichever backend generates: the worker in this process or a
//! pool of inference servers. Both take the same requests and stream the same events, so the
//! core never knows which one answers.

use std::sync::Arc;
use std::time::Duration;

use super::load::LoadedModel;
use super::remote::{EndpointSnapshot, RemoteWorker};
use super::tokenizer::TextTokenizer;
use super::worker::{LocalWorker, WorkerOptions};
use super::{GenerationHandle, GenerationRequest, WorkerError};

#[derive(Clone)]
enum Backend {
    Local(LocalWorker),
    Remote(RemoteWorker),
}

/// Handle to the inference backend; clones share it.
#[derive(Clone)]
pub struct Worker(Backend);

impl From<LocalWorker> for Worker {
    fn from(w: LocalWorker) -> Self {
        Worker(Backend::Local(w))
    }
}

impl From<RemoteWorker> for Worker {
    fn from(w: RemoteWorker) -> Self {
        Worker(Backend::Remote(w))
    }
}

impl Worker {
    /// Starts the in-process worker on a loaded model.
    pub fn spawn(loaded: LoadedModel, opts: WorkerOptions) -> Worker {
        LocalWorker::spawn(loaded, opts).into()
    }

    /// Queues a request. Fails at once when the queue is full or the prompt cannot fit.
    pub fn submit(&self, req: GenerationRequest) -> Result<GenerationHandle, WorkerError> {
        match &self.0 {
            Backend::Local(w) => w.submit(req),
            Backend::Remote(w) => w.submit(req),
        }
    }

    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        match &self.0 {
            Backend::Local(w) => w.tokenizer(),
            Backend::Remote(w) => w.tokenizer(),
        }
    }

    /// Requests waiting for their first token (for metrics).
    pub fn queue_depth(&self) -> usize {
        match &self.0 {
            Backend::Local(w) => w.queue_depth(),
            Backend::Remote(w) => w.queue_depth(),
        }
    }

    /// The context window prompts must fit in; a server that says its window is smaller
    /// lowers it.
    pub fn context_length(&self) -> usize {
        match &self.0 {
            Backend::Local(w) => w.context_length(),
            Backend::Remote(w) => w.context_length(),
        }
    }

    /// How long ago the inference thread last made progress. Servers are watched by their own
    /// health checks, so a remote backend always answers zero.
    pub fn since_heartbeat(&self) -> Duration {
        match &self.0 {
            Backend::Local(w) => w.since_heartbeat(),
            Backend::Remote(_) => Duration::ZERO,
        }
    }

    /// Conversations decoded together (local only: servers batch as they are configured).
    pub fn set_max_batch(&self, n: usize) {
        if let Backend::Local(w) = &self.0 {
            w.set_max_batch(n);
        }
    }

    pub fn resume(&self) {
        if let Backend::Local(w) = &self.0 {
            w.resume();
        }
    }

    /// Each inference server's state and counts; empty for the local worker.
    pub fn endpoints(&self) -> Vec<EndpointSnapshot> {
        match &self.0 {
            Backend::Local(_) => Vec::new(),
            Backend::Remote(w) => w.endpoints(),
        }
    }

    /// Cancels the running generations and every waiting one.
    pub fn shutdown(&self) {
        match &self.0 {
            Backend::Local(w) => w.shutdown(),
            Backend::Remote(w) => w.shutdown(),
        }
    }
}
