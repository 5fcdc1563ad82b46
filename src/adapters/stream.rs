//! Showing a reply while it is written, the same way on every chat platform: post the first part,
//! edit it as text streams in (at most one round of edits per interval), continue in new
//! messages past the platform's length limit, replace a queue notice by the reply, and end with
//! the whole text, with the typing indicator kept alive meanwhile. Platforms supply only "post",
//! "edit" and "typing" ([`Surface`]); [`StreamedReply`] is the core's [`ReplySink`].

use std::fmt::Display;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::split::split_message;
use crate::chat;
use crate::core::{ReplySink, text};

/// What an edit is for. A platform short of requests may skip progress (a later edit shows the
/// text anyway) but never the reply's final text or a notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Render {
    /// Text still streaming in, or a new place in the queue.
    Progress,
    /// The whole reply, a failure, or a notice: what the message must end up showing.
    Final,
}

/// One platform's way of posting and editing the messages of a reply.
#[async_trait::async_trait]
pub trait Surface: Send + Sync {
    type Id: Clone + Send + Sync;
    type Error: Display + Send;

    /// Longest part one message may show, in characters.
    fn limit(&self) -> usize;
    /// Posts part `index` (0 = the first message of the reply).
    async fn post(&self, index: usize, part: &str) -> Result<Self::Id, Self::Error>;
    /// Edits message `id` to show `part`: `Ok(false)` when a [`Render::Progress`] edit was
    /// skipped (the platform was busy) and the message still shows what it did.
    async fn edit(
        &self,
        index: usize,
        id: &Self::Id,
        part: &str,
        render: Render,
    ) -> Result<bool, Self::Error>;
    /// Message `id` as a later process can find it again to edit it; `None` where it cannot
    /// (the message is reachable only through something short-lived).
    fn lasting_id(&self, _id: &Self::Id) -> Option<String> {
        None
    }
    /// How often the typing indicator must be renewed; `None` where there is none.
    fn typing_interval(&self) -> Option<Duration>;
    async fn set_typing(&self, on: bool);
    /// Keeps the typing indicator on until the hold is dropped; `None` where there is none.
    /// By default a task of this reply's own renews it every `typing_interval`; a platform
    /// whose indicator belongs to a whole channel shares one between the replies there.
    fn hold_typing(self: Arc<Self>) -> Option<TypingHold>
    where
        Self: Sized + 'static,
    {
        let every = self.typing_interval()?;
        let task = tokio::spawn(async move {
            loop {
                self.set_typing(true).await;
                tokio::time::sleep(every).await;
            }
        });
        Some(TypingHold::new(AbortOnDrop(task)))
    }
}

/// Whatever keeps a typing indicator on; dropping it lets the indicator go.
pub struct TypingHold {
    _keeps: Box<dyn Send + Sync>,
}

impl TypingHold {
    pub fn new(keeps: impl Send + Sync + 'static) -> Self {
        Self {
            _keeps: Box::new(keeps),
        }
    }
}

/// A renewing task, ended with its hold.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Shown<Id> {
    /// Messages of the reply so far and the text each shows.
    messages: Vec<(Id, String)>,
    /// Messages before this index hold notices; the reply's own parts come after them.
    base: usize,
    last_edit: Option<Instant>,
    finished: bool,
    /// What is shown after `base` is only a queue notice, to be replaced.
    placeholder: bool,
    /// A queue position not shown yet because the last edit was too recent.
    pending_position: Option<usize>,
    /// A task is waiting to show `pending_position`.
    flush_scheduled: bool,
}

impl<Id> Shown<Id> {
    /// Whether a queue notice may be shown: nothing of the reply is shown yet.
    fn queue_notice_allowed(&self) -> bool {
        !self.finished && (self.messages.len() == self.base || self.placeholder)
    }
}

/// How a render treats the edit interval.
#[derive(Clone, Copy, PartialEq)]
enum Pace {
    /// Skip this render if the last one was within the interval.
    Skip,
    /// Wait for the interval to pass, then render.
    Wait,
}

pub struct StreamedReply<S: Surface> {
    surface: Arc<S>,
    interval: Duration,
    shown: Arc<tokio::sync::Mutex<Shown<S::Id>>>,
    typing: Typing,
}

impl<S: Surface + 'static> StreamedReply<S> {
    pub fn new(surface: S, interval: Duration) -> Self {
        Self {
            surface: Arc::new(surface),
            interval,
            typing: Typing::default(),
            shown: Arc::new(tokio::sync::Mutex::new(Shown {
                messages: Vec::new(),
                base: 0,
                last_edit: None,
                finished: false,
                placeholder: false,
                pending_position: None,
                flush_scheduled: false,
            })),
        }
    }

    /// A reply continuing in messages an earlier process posted (it died writing them): the
    /// first `notices` hold notes before the answer, the rest its parts; each is edited to show
    /// what this reply shows.
    pub fn showing(surface: S, interval: Duration, notices: usize, ids: Vec<S::Id>) -> Self {
        let reply = Self::new(surface, interval);
        {
            let mut shown = reply
                .shown
                .try_lock()
                .expect("a new reply's state is not shared yet");
            shown.base = notices.min(ids.len());
            shown.messages = ids.into_iter().map(|id| (id, String::new())).collect();
        }
        reply
    }

    /// Stops the typing indicator (the reply is over, or was never started).
    pub async fn end_typing(&self) {
        if self.typing.stop() {
            self.surface.set_typing(false).await;
        }
    }

    /// Waiting behind others: a notice, shown only until the reply itself starts, at most one
    /// edit per interval, never holding up the caller. A position that arrives too soon after
    /// the last edit is shown when the interval has passed, unless a newer one or the reply
    /// came first.
    async fn show_queued(&self, position: usize) {
        if position <= 1 {
            return;
        }
        let mut shown = self.shown.lock().await;
        if !shown.queue_notice_allowed() {
            return;
        }
        let wait = shown
            .last_edit
            .map(|t| self.interval.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        if wait.is_zero() {
            shown.pending_position = None;
            render(
                &*self.surface,
                &mut shown,
                &text::queued(position),
                Render::Progress,
            )
            .await;
            shown.placeholder = true;
            return;
        }
        shown.pending_position = Some(position);
        if shown.flush_scheduled {
            return;
        }
        shown.flush_scheduled = true;
        let (surface, state) = (self.surface.clone(), self.shown.clone());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let mut shown = state.lock().await;
            shown.flush_scheduled = false;
            if let Some(position) = shown.pending_position.take()
                && shown.queue_notice_allowed()
            {
                render(
                    &*surface,
                    &mut shown,
                    &text::queued(position),
                    Render::Progress,
                )
                .await;
                shown.placeholder = true;
            }
        });
    }

    async fn show_update(&self, text_so_far: &str) {
        let mut shown = self.shown.lock().await;
        if self.paced(&mut shown, Pace::Skip).await {
            render(&*self.surface, &mut shown, text_so_far, Render::Progress).await;
            shown.placeholder = false;
            shown.pending_position = None;
        }
    }

    /// Whether to render now under `pace`; waits out the interval for [`Pace::Wait`]. A queue
    /// notice never holds back what replaces it: the answer, a notice or a failure shows at once.
    async fn paced(&self, shown: &mut Shown<S::Id>, pace: Pace) -> bool {
        if shown.finished {
            return false;
        }
        if shown.placeholder {
            return true;
        }
        if let Some(last) = shown.last_edit {
            let since = last.elapsed();
            if since < self.interval {
                match pace {
                    Pace::Skip => return false,
                    Pace::Wait => tokio::time::sleep(self.interval - since).await,
                }
            }
        }
        true
    }

    /// The whole text (an empty reply shows an ellipsis); nothing changes afterwards.
    async fn show_final(&self, text: &str) {
        {
            let mut shown = self.shown.lock().await;
            if self.paced(&mut shown, Pace::Wait).await {
                render(
                    &*self.surface,
                    &mut shown,
                    if text.trim().is_empty() { "…" } else { text },
                    Render::Final,
                )
                .await;
            }
            shown.finished = true;
            shown.pending_position = None;
        }
        self.end_typing().await;
    }

    /// Ends with an error: after what was written so far, or instead of a queue notice.
    async fn show_failure(&self, message: &str) {
        let (current, placeholder) = {
            let shown = self.shown.lock().await;
            let text: Vec<&str> = shown.messages[shown.base..]
                .iter()
                .map(|(_, t)| t.as_str())
                .collect();
            (text.join(""), shown.placeholder)
        };
        let text = text::failed_after(if placeholder { "" } else { &current }, message);
        self.show_final(&text).await;
    }

    /// A notice (a command's result, or a note before the answer) in messages of its own: it
    /// takes the place of a queue notice, and the reply, if one follows, comes after it.
    async fn show_notice(&self, notice: &str) {
        let mut shown = self.shown.lock().await;
        if !self.paced(&mut shown, Pace::Wait).await {
            return;
        }
        render(&*self.surface, &mut shown, notice, Render::Final).await;
        shown.placeholder = false;
        shown.pending_position = None;
        shown.base = shown.messages.len();
    }
}

/// Makes the platform show `text` as the reply's parts after `shown.base`: edits the messages
/// whose part changed, posts new ones for parts beyond them. A skipped progress edit leaves the
/// message's recorded text as it is, so a later render edits it again.
async fn render<S: Surface>(surface: &S, shown: &mut Shown<S::Id>, text: &str, kind: Render) {
    let parts = split_message(text, surface.limit());
    for (i, part) in parts.iter().enumerate() {
        let index = shown.base + i;
        let result = match shown.messages.get(index) {
            Some((_, old)) if old == part => Ok(()),
            Some((id, _)) => {
                let id = id.clone();
                surface.edit(index, &id, part, kind).await.map(|edited| {
                    if edited {
                        shown.messages[index].1 = part.clone();
                    }
                })
            }
            None => surface
                .post(index, part)
                .await
                .map(|id| shown.messages.push((id, part.clone()))),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot show the reply");
            break;
        }
    }
    shown.last_edit = Some(Instant::now());
}

#[async_trait::async_trait]
impl<S: Surface + 'static> ReplySink for StreamedReply<S> {
    async fn typing(&self) {
        if let Some(hold) = self.surface.clone().hold_typing() {
            self.typing.start(hold);
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
        self.show_notice(text).await;
    }

    async fn shown(&self) -> Option<chat::Shown> {
        let shown = self.shown.lock().await;
        let ids = shown
            .messages
            .iter()
            .map(|(id, _)| self.surface.lasting_id(id))
            .collect::<Option<Vec<String>>>()?;
        Some(chat::Shown {
            notices: shown.base,
            ids,
        })
    }
}

/// A reply's typing indicator, kept on until the reply ends.
#[derive(Default)]
pub struct Typing(Mutex<Option<TypingHold>>);

impl Typing {
    /// Keeps `hold` until [`Typing::stop`], replacing any earlier one.
    pub fn start(&self, hold: TypingHold) {
        let old = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(hold);
        drop(old);
    }

    /// Lets the indicator go; true if one was on.
    pub fn stop(&self) -> bool {
        let hold = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        hold.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records posts and edits; while `.1` is set it is "busy" and skips progress edits.
    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<String>>>, Arc<Mutex<bool>>);

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
        async fn edit(
            &self,
            index: usize,
            id: &usize,
            part: &str,
            render: Render,
        ) -> Result<bool, String> {
            if *self.1.lock().unwrap() && render == Render::Progress {
                return Ok(false);
            }
            self.0
                .lock()
                .unwrap()
                .push(format!("edit {index}/{id} {part}"));
            Ok(true)
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
        // The answer takes over the notice at once, even within the interval.
        reply.update("Hello").await;
        // Within the interval of that edit: skipped.
        reply.update("Hello there").await;
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
            "edit 0/0 Hello".to_string(),
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

    /// A note before the answer (a question cut to fit) stays, and the answer follows it in
    /// messages of its own; the reply only ends with `finish` or `fail`.
    #[tokio::test]
    async fn a_notice_never_ends_the_reply() {
        let log = Log::default();
        let reply = StreamedReply::new(log.clone(), Duration::from_millis(10));
        reply.typing().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply.notice("cut to fit").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply.update("The answer").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply.finish("The answer, whole.").await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                "typing true".to_string(),
                "post 0 cut to fit".to_string(),
                "post 1 The answer".to_string(),
                "edit 1/1 The answer, whole.".to_string(),
                "typing false".to_string(),
            ]
        );
    }

    /// A queue notice never makes the caller wait for the edit interval; positions that come
    /// too fast are folded into one edit showing the latest, and the answer replaces the notice
    /// the moment it starts.
    #[tokio::test]
    async fn queue_notices_never_hold_up_the_answer() {
        let log = Log::default();
        let interval = Duration::from_millis(400);
        let reply = StreamedReply::new(log.clone(), interval);
        reply.queued(5).await;
        let started = Instant::now();
        reply.queued(4).await;
        reply.queued(3).await;
        assert!(
            started.elapsed() < interval / 4,
            "queue notices waited {:?}",
            started.elapsed()
        );
        tokio::time::sleep(interval + Duration::from_millis(150)).await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                format!("post 0 {}", text::queued(5)),
                format!("edit 0/0 {}", text::queued(3)),
            ]
        );
        reply.queued(2).await;
        let answer_at = Instant::now();
        reply.update("Hi").await;
        assert!(answer_at.elapsed() < interval / 4);
        tokio::time::sleep(interval + Duration::from_millis(150)).await;
        reply.finish("Hi!").await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(
            &got[2..],
            &["edit 0/0 Hi".to_string(), "edit 0/0 Hi!".to_string()],
            "{got:?}"
        );
    }

    /// A busy platform skips progress edits; the final text still goes out, even when the last
    /// progress (skipped) already held all of it.
    #[tokio::test]
    async fn skipped_progress_never_keeps_the_final_text_from_showing() {
        let log = Log::default();
        let reply = StreamedReply::new(log.clone(), Duration::from_millis(10));
        reply.update("Hello").await;
        *log.1.lock().unwrap() = true;
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply.update("Hello there").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply.finish("Hello there").await;
        let got = log.0.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                "post 0 Hello".to_string(),
                "edit 0/0 Hello there".to_string()
            ]
        );
    }
}
