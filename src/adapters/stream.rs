//! Showing a reply while it is written, the same way on every chat platform: post the first part,
//! edit it as text streams in (at most one round of edits per interval), continue in new
//! messages past the platform's length limit, replace a queue notice by the reply, and end with
//! the whole text, with the typing indicator kept alive meanwhile. Platforms supply only "post",
//! "edit" and "typing" ([`Surface`]); [`StreamedReply`] is the core's [`ReplySink`].

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::split::split_message;
use crate::core::{ReplySink, text};

/// One platform's way of posting and editing the messages of a reply.
#[async_trait::async_trait]
pub trait Surface: Send + Sync {
    type Id: Clone + Send + Sync;
    type Error: Display + Send;

    /// Longest part one message may show, in characters.
    fn limit(&self) -> usize;
    /// Posts part `index` (0 = the first message of the reply).
    async fn post(&self, index: usize, part: &str) -> Result<Self::Id, Self::Error>;
    async fn edit(&self, index: usize, id: &Self::Id, part: &str) -> Result<(), Self::Error>;
    /// How often the typing indicator must be renewed; `None` where there is none.
    fn typing_interval(&self) -> Option<Duration>;
    async fn set_typing(&self, on: bool);
}

struct Shown<Id> {
    /// Messages of the reply so far and the text each shows.
    messages: Vec<(Id, String)>,
    last_edit: Option<Instant>,
    finished: bool,
    /// What is shown is only a queue notice, to be replaced.
    placeholder: bool,
}

pub struct StreamedReply<S: Surface> {
    surface: Arc<S>,
    interval: Duration,
    shown: tokio::sync::Mutex<Shown<S::Id>>,
    typing: Typing,
}

impl<S: Surface + 'static> StreamedReply<S> {
    pub fn new(surface: S, interval: Duration) -> Self {
        Self {
            surface: Arc::new(surface),
            interval,
            typing: Typing::default(),
            shown: tokio::sync::Mutex::new(Shown {
                messages: Vec::new(),
                last_edit: None,
                finished: false,
                placeholder: false,
            }),
        }
    }

    /// Makes the platform show `text`: edits the messages whose part changed, posts new ones for
    /// parts beyond them. Skipped within the interval of the last round, unless `force` (which
    /// waits for the interval instead).
    async fn render(&self, text: &str, force: bool) -> bool {
        let mut shown = self.shown.lock().await;
        if shown.finished {
            return false;
        }
        if let Some(last) = shown.last_edit {
            let since = last.elapsed();
            if since < self.interval {
                if !force {
                    return false;
                }
                tokio::time::sleep(self.interval - since).await;
            }
        }
        let parts = split_message(text, self.surface.limit());
        for (i, part) in parts.iter().enumerate() {
            let result = match shown.messages.get(i) {
                Some((_, old)) if old == part => Ok(()),
                Some((id, _)) => {
                    let id = id.clone();
                    self.surface
                        .edit(i, &id, part)
                        .await
                        .map(|_| shown.messages[i].1 = part.clone())
                }
                None => self
                    .surface
                    .post(i, part)
                    .await
                    .map(|id| shown.messages.push((id, part.clone()))),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot show the reply");
                break;
            }
        }
        shown.last_edit = Some(Instant::now());
        true
    }

    /// Stops the typing indicator (the reply is over, or was never started).
    pub async fn end_typing(&self) {
        if self.typing.stop() {
            self.surface.set_typing(false).await;
        }
    }

    /// Waiting behind others: a notice, shown only until the reply itself starts.
    async fn show_queued(&self, position: usize) {
        let placeholder = {
            let shown = self.shown.lock().await;
            shown.messages.is_empty() || shown.placeholder
        };
        if position > 1 && placeholder {
            self.render(&text::queued(position), true).await;
            self.shown.lock().await.placeholder = true;
        }
    }

    async fn show_update(&self, text_so_far: &str) {
        if self.render(text_so_far, false).await {
            self.shown.lock().await.placeholder = false;
        }
    }

    /// The whole text (an empty reply shows an ellipsis); nothing changes afterwards.
    async fn show_final(&self, text: &str) {
        self.render(if text.trim().is_empty() { "…" } else { text }, true)
            .await;
        self.shown.lock().await.finished = true;
        self.end_typing().await;
    }

    /// Ends with an error: after what was written so far, or instead of a queue notice.
    async fn show_failure(&self, message: &str) {
        let (current, placeholder) = {
            let shown = self.shown.lock().await;
            let text: Vec<&str> = shown.messages.iter().map(|(_, t)| t.as_str()).collect();
            (text.join(""), shown.placeholder)
        };
        let text = if current.is_empty() || placeholder {
            message.to_string()
        } else {
            format!("{current}\n\n⚠️ {message}")
        };
        self.show_final(&text).await;
    }
}

#[async_trait::async_trait]
impl<S: Surface + 'static> ReplySink for StreamedReply<S> {
    async fn typing(&self) {
        if let Some(every) = self.surface.typing_interval() {
            let surface = self.surface.clone();
            self.typing.start(every, move || {
                let surface = surface.clone();
                async move { surface.set_typing(true).await }
            });
        }
    }

    async fn queued(&self, position: usize) {
        self.show_queued(position).await;
    }

    async fn update(&self, text_so_far: &str) {
        self.show_update(text_so_far).await;
    }

    async fn finish(&self, text: &str) {
        self.show_final(text).await;
    }

    async fn fail(&self, message: &str) {
        self.show_failure(message).await;
    }

    async fn notice(&self, text: &str) {
        self.show_final(text).await;
    }
}

/// A typing indicator kept alive by a task until the reply ends.
#[derive(Default)]
pub struct Typing(Mutex<Option<tokio::task::JoinHandle<()>>>);

impl Typing {
    /// Runs `renew` now and then every `every`, replacing any earlier indicator task.
    pub fn start<F, Fut>(&self, every: Duration, renew: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let task = tokio::spawn(async move {
            loop {
                renew().await;
                tokio::time::sleep(every).await;
            }
        });
        if let Some(old) = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    /// Stops renewing; true if an indicator was running.
    pub fn stop(&self) -> bool {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(t) => {
                t.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for Typing {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records posts and edits.
    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<String>>>);

    #[async_trait::async_trait]
    impl Surface for Log {
        type Id = usize;
        type Error = String;
        fn limit(&self) -> usize {
            80
        }
        async fn post(&self, index: usize, part: &str) -> Result<usize, String> {
            self.0.lock().unwrap().push(format!("post {index} {part}"));
            Ok(index)
        }
        async fn edit(&self, index: usize, id: &usize, part: &str) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .push(format!("edit {index}/{id} {part}"));
            Ok(())
        }
        fn typing_interval(&self) -> Option<Duration> {
            Some(Duration::from_secs(3600))
        }
        async fn set_typing(&self, on: bool) {
            self.0.lock().unwrap().push(format!("typing {on}"));
        }
    }

    #[tokio::test]
    async fn paces_edits_splits_and_replaces_the_queue_notice() {
        let log = Log::default();
        let reply = StreamedReply::new(log.clone(), Duration::from_millis(500));
        reply.typing().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        reply.queued(2).await;
        // Within the interval of the notice: skipped, the notice stays.
        reply.update("Hello").await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        reply.update("Hello you").await;
        let long = "word ".repeat(30);
        reply.finish(&long).await;
        reply.update("ignored after the end").await;
        let parts = split_message(&long, 80);
        assert!(parts.len() >= 2, "{parts:?}");
        let mut want = vec![
            "typing true".to_string(),
            format!("post 0 {}", text::queued(2)),
            "edit 0/0 Hello you".to_string(),
            format!("edit 0/0 {}", parts[0]),
        ];
        want.extend((1..parts.len()).map(|i| format!("post {i} {}", parts[i])));
        want.push("typing false".to_string());
        assert_eq!(log.0.lock().unwrap().clone(), want);
    }

    #[tokio::test]
    async fn failure_follows_the_text_or_replaces_the_notice() {
        let log = Log::default();
        let reply = StreamedReply::new(log.clone(), Duration::from_millis(10));
        reply.queued(3).await;
        reply.fail("oops").await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got.last().unwrap(), "edit 0/0 oops", "{got:?}");

        let log = Log::default();
        let reply = StreamedReply::new(log.clone(), Duration::from_millis(10));
        reply.update("abc").await;
        reply.fail("bad").await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(got.last().unwrap(), "edit 0/0 abc\n\n⚠️ bad", "{got:?}");
    }
}
