//! One message from start to finish: access, duplicates, rate limits, then a command or an
//! answer.

use tracing::Instrument;

use super::{Assistant, Outcome, ReplySink, text};
use crate::chat::{Command, Incoming, Request};

/// What the message asks the core to do.
enum Action {
    Answer(String),
    Run(Command),
}

impl Assistant {
    /// Handles one message from start to finish.
    pub async fn handle(&self, msg: Incoming, sink: &dyn ReplySink) -> Outcome {
        // Latency metrics count from here: the moment the message reached the core.
        let arrived = std::time::Instant::now();
        let span = tracing::info_span!(
            "message",
            platform = %msg.key.platform,
            conversation = %msg.key,
            message_id = msg.message_id.as_deref().unwrap_or("-"),
        );
        let platform = msg.key.platform;
        let observer = self.observer();
        observer.received(platform);
        let outcome = self.handle_inner(msg, arrived, sink).instrument(span).await;
        match &outcome {
            Outcome::Denied => observer.refused(platform, "denied"),
            Outcome::Duplicate => observer.refused(platform, "duplicate"),
            Outcome::RateLimited { .. } => observer.refused(platform, "rate_limited"),
            Outcome::Rejected => observer.refused(platform, "rejected"),
            Outcome::Command => observer.command(platform),
            Outcome::Answered { .. } | Outcome::Failed => {}
        }
        outcome
    }

    async fn handle_inner(
        &self,
        msg: Incoming,
        arrived: std::time::Instant,
        sink: &dyn ReplySink,
    ) -> Outcome {
        let config = self.config();
        let access = config.access(msg.key.platform);
        if !access.allows(&msg) {
            tracing::info!(author = %msg.author.id, "message refused by access rules");
            return Outcome::Denied;
        }
        if let Some(id) = &msg.message_id {
            match self.store.is_known(msg.key.platform, id).await {
                Ok(true) => {
                    tracing::debug!("already handled");
                    return Outcome::Duplicate;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot check for duplicates");
                    self.observer().error(msg.key.platform, "storage");
                    sink.fail(text::STORAGE_FAILED).await;
                    return Outcome::Failed;
                }
            }
        }
        let action = match &msg.request {
            Request::Question(q) | Request::Command(Command::Ask(q)) => Action::Answer(q.clone()),
            Request::Command(c) => Action::Run(c.clone()),
            Request::Malformed(e) => {
                sink.notice(&text::bad_command(e)).await;
                return Outcome::Command;
            }
        };
        let exempt =
            access.is_open() || matches!(action, Action::Run(Command::Stop | Command::Help));
        if !exempt && let Some(wait) = self.rate_limited(&msg) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            tracing::info!(retry_after = secs, "rate limited");
            sink.fail(&text::rate_limited(secs)).await;
            return Outcome::RateLimited { retry_after: wait };
        }
        match action {
            Action::Answer(question) => self.answer(msg, question, arrived, &config, sink).await,
            Action::Run(cmd) => {
                let admin = access.is_admin(&msg) || msg.is_private;
                if cmd.needs_admin() && !admin {
                    sink.notice(text::NOT_ALLOWED).await;
                    return Outcome::Command;
                }
                if let Err(e) = self.execute(&cmd, &msg, sink).await {
                    tracing::error!(error = %e, "command failed");
                    self.observer().error(msg.key.platform, e.kind());
                    sink.fail(e.user_text()).await;
                    return Outcome::Failed;
                }
                Outcome::Command
            }
        }
    }
}
