//! Posting one reply to Matrix: the `Surface` the shared streamer drives. Parts are `m.notice`s
//! replying to the question (in its thread, if any), Markdown rendered to HTML, edited by
//! `m.replace`, with the typing notice kept up meanwhile.

use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::Room;
use matrix_sdk::ruma::events::Mentions;
use matrix_sdk::ruma::events::relation::Thread;
use matrix_sdk::ruma::events::room::message::{
    AddMentions, FormattedBody, ForwardThread, MessageType, ReplacementMetadata, ReplyMetadata,
    RoomMessageEventContentWithoutRelation,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId};

use super::shared::Shared;
use crate::adapters::stream::{Render, Surface};

/// Characters per event: a streamed edit carries the text four times (body, HTML, and both again
/// in `m.new_content`) and an event may not exceed 64 KiB.
const MATRIX_PART_CHARS: usize = 8000;

/// The message being answered.
pub(super) struct Question {
    pub(super) event_id: OwnedEventId,
    pub(super) sender: OwnedUserId,
    pub(super) thread: Option<Thread>,
}

/// Posting and editing the events of one reply: `m.notice`s replying to the question (in its
/// thread, if any), Markdown rendered to HTML, edited by `m.replace`.
pub(super) struct MatrixSurface {
    pub(super) room: Room,
    pub(super) question: Question,
    pub(super) shared: Arc<Shared>,
}

/// One part as an `m.notice`: Markdown rendered to HTML, and always a formatted body (the text
/// escaped, when Markdown adds nothing), so an edit's fallback for clients without edits reads
/// `* ` and the text in both forms. An empty `m.mentions` keeps homeservers from falling back
/// to body-matching push rules: a reply quoting `@room` or a display name pings no one.
fn notice(part: &str) -> RoomMessageEventContentWithoutRelation {
    let mut content = RoomMessageEventContentWithoutRelation::notice_markdown(part);
    if let MessageType::Notice(n) = &mut content.msgtype
        && n.formatted.is_none()
    {
        n.formatted = Some(FormattedBody::html(escape_html(part)));
    }
    content.add_mentions(Mentions::new())
}

/// Plain text as HTML that shows the same: markup characters escaped, line breaks kept.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' => out.push_str("<br>"),
            c => out.push(c),
        }
    }
    out
}

#[async_trait::async_trait]
impl Surface for MatrixSurface {
    type Id = OwnedEventId;
    type Error = matrix_sdk::Error;

    fn limit(&self) -> usize {
        MATRIX_PART_CHARS
    }

    async fn post(&self, _index: usize, part: &str) -> matrix_sdk::Result<OwnedEventId> {
        let q = &self.question;
        let content = notice(part).make_reply_to(
            ReplyMetadata::new(&q.event_id, &q.sender, q.thread.as_ref()),
            ForwardThread::Yes,
            AddMentions::No,
        );
        let id = self.room.send(content).await?.response.event_id;
        self.shared.remember_sender(id.clone(), true);
        Ok(id)
    }

    async fn edit(
        &self,
        _index: usize,
        id: &OwnedEventId,
        part: &str,
        _render: Render,
    ) -> matrix_sdk::Result<bool> {
        // The edited event mentioned nobody either: the edit adds no one.
        let content = notice(part)
            .make_replacement(ReplacementMetadata::new(id.clone(), Some(Mentions::new())));
        self.room.send(content).await?;
        Ok(true)
    }

    /// Any later process may replace an event the bot sent.
    fn lasting_id(&self, id: &OwnedEventId) -> Option<String> {
        Some(id.to_string())
    }

    /// A notice lasts 4 s; matrix-sdk resends it at most every 3 s.
    fn typing_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(3))
    }

    async fn set_typing(&self, on: bool) {
        if let Err(e) = self.room.typing_notice(on).await {
            tracing::debug!(error = %e, "typing notice failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matrix_sdk::ruma::events::room::message::Relation;
    use matrix_sdk::ruma::owned_event_id;

    fn json(content: &impl serde::Serialize) -> serde_json::Value {
        serde_json::to_value(content).unwrap()
    }

    /// Edits of plain-text replies carried `formatted_body: "* "`, and no reply or edit carried
    /// `m.mentions`.
    #[test]
    fn replies_and_edits_mention_nobody_and_edits_fall_back_to_their_text() {
        let id = owned_event_id!("$reply:example.org");
        let edit = notice("Ask @room or Alice now")
            .make_replacement(ReplacementMetadata::new(id, Some(Mentions::new())));
        let v = json(&edit);
        assert_eq!(v["body"], "* Ask @room or Alice now", "{v}");
        assert_eq!(v["formatted_body"], "* Ask @room or Alice now", "{v}");
        assert_eq!(v["m.new_content"]["body"], "Ask @room or Alice now", "{v}");
        assert_eq!(v["m.mentions"], serde_json::json!({}), "{v}");
        assert_eq!(
            v["m.new_content"]["m.mentions"],
            serde_json::json!({}),
            "{v}"
        );
        assert!(matches!(edit.relates_to, Some(Relation::Replacement(_))));

        let styled = json(&notice("**bold** and\nmore"));
        assert_eq!(styled["m.mentions"], serde_json::json!({}), "{styled}");
        assert!(
            styled["formatted_body"]
                .as_str()
                .is_some_and(|f| f.contains("<strong>bold</strong>")),
            "{styled}"
        );
        assert_eq!(
            escape_html("a\nb & <c> \"d\""),
            "a<br>b &amp; &lt;c&gt; &quot;d&quot;"
        );
    }
}
