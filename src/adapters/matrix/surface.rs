//! Posting one reply to Matrix: the `Surface` the shared streamer drives. Parts are `m.notice`s
//! replying to the question (in its thread, if any), Markdown rendered to HTML, edited by
//! `m.replace`, with the typing notice kept up meanwhile.

use std::sync::Arc;
use std::time::Duration;

use matrix_sdk::Room;
use matrix_sdk::ruma::events::relation::Thread;
use matrix_sdk::ruma::events::room::message::{
    AddMentions, ForwardThread, ReplacementMetadata, ReplyMetadata,
    RoomMessageEventContentWithoutRelation,
};
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId};

use super::shared::Shared;
use crate::adapters::stream::Surface;

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

#[async_trait::async_trait]
impl Surface for MatrixSurface {
    type Id = OwnedEventId;
    type Error = matrix_sdk::Error;

    fn limit(&self) -> usize {
        MATRIX_PART_CHARS
    }

    async fn post(&self, _index: usize, part: &str) -> matrix_sdk::Result<OwnedEventId> {
        let q = &self.question;
        let content = RoomMessageEventContentWithoutRelation::notice_markdown(part).make_reply_to(
            ReplyMetadata::new(&q.event_id, &q.sender, q.thread.as_ref()),
            ForwardThread::Yes,
            AddMentions::No,
        );
        let id = self.room.send(content).await?.response.event_id;
        self.shared.remember_sender(id.clone(), true);
        Ok(id)
    }

    async fn edit(&self, _index: usize, id: &OwnedEventId, part: &str) -> matrix_sdk::Result<()> {
        let content = RoomMessageEventContentWithoutRelation::notice_markdown(part)
            .make_replacement(ReplacementMetadata::new(id.clone(), None));
        self.room.send(content).await?;
        Ok(())
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
