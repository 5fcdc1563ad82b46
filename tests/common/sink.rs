//! A reply sink that records what the core asked of it, in order.

use std::sync::Mutex;

use synthia_bot::core::ReplySink;

#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Typing,
    Queued(usize),
    Update(String),
    Finish(String),
    Fail(String),
    Notice(String),
}

#[derive(Default)]
pub struct Recorder(Mutex<Vec<Call>>);

impl Recorder {
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl ReplySink for Recorder {
    async fn typing(&self) {
        self.0.lock().unwrap().push(Call::Typing);
    }
    async fn queued(&self, position: usize) {
        self.0.lock().unwrap().push(Call::Queued(position));
    }
    async fn update(&self, text_so_far: &str) {
        self.0
            .lock()
            .unwrap()
            .push(Call::Update(text_so_far.into()));
    }
    async fn finish(&self, text: &str) {
        self.0.lock().unwrap().push(Call::Finish(text.into()));
    }
    async fn fail(&self, message: &str) {
        self.0.lock().unwrap().push(Call::Fail(message.into()));
    }
    async fn notice(&self, text: &str) {
        self.0.lock().unwrap().push(Call::Notice(text.into()));
    }
}
