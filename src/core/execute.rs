//! Running a parsed command against memory; parsing is the chat vocabulary's, at the edge.

use super::{Assistant, CoreError, ReplySink, text};
use crate::chat::{Command, Incoming, Setting};
use crate::memory::Conversation;

impl Assistant {
    pub(super) async fn execute(
        &self,
        cmd: &Command,
        msg: &Incoming,
        sink: &dyn ReplySink,
    ) -> Result<(), CoreError> {
        match cmd {
            Command::Help => sink.notice(text::HELP).await,
            Command::Stop => {
                if self.stop(&msg.key) {
                    sink.notice(text::STOPPED).await;
                } else {
                    sink.notice(text::NOTHING_TO_STOP).await;
                }
            }
            Command::Reset => {
                let conv = self.store.conversation(&msg.key).await?;
                self.store.reset(&conv).await?;
                sink.notice(text::RESET_DONE).await;
            }
            Command::Forget => {
                self.stop(&msg.key);
                if let Some(conv) = self.store.find_conversation(&msg.key).await? {
                    self.store.forget(&conv).await?;
                }
                sink.notice(text::FORGET_DONE).await;
            }
            Command::System(None) => {
                let conv = self.store.conversation(&msg.key).await?;
                let custom = conv.settings.system_prompt.clone();
                let shown = custom
                    .clone()
                    .unwrap_or_else(|| self.prompter().settings.system);
                sink.notice(&text::system_is(&shown, custom.is_some()))
                    .await;
            }
            Command::System(Some(system)) => {
                let conv = self.store.conversation(&msg.key).await?;
                let mut settings = conv.settings.clone();
                settings.system_prompt = Some(system.clone());
                self.store.set_settings(&conv, &settings).await?;
                sink.notice(&text::system_set(system)).await;
            }
            Command::Set(setting) => {
                let conv = self.store.conversation(&msg.key).await?;
                let mut settings = conv.settings.clone();
                let reply = match setting {
                    Setting::Temperature(t) => {
                        settings.temperature = Some(*t);
                        text::temperature_set(*t)
                    }
                    Setting::MaxTokens(n) => {
                        settings.max_new_tokens = Some(*n);
                        let effective = self.prompter().max_new_tokens(&Conversation {
                            settings: settings.clone(),
                            ..conv.clone()
                        });
                        text::max_tokens_set(*n, effective as u32)
                    }
                };
                self.store.set_settings(&conv, &settings).await?;
                sink.notice(&reply).await;
            }
            // Questions never reach here: the dispatcher answers them.
            Command::Ask(_) => {}
        }
        Ok(())
    }
}
