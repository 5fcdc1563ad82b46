//! Whether a Discord message is for the bot, as a pure function of what the event says, so the
//! rules can be tested as a table without a gateway.

use crate::chat::Trigger;
use crate::chat::trigger::strip_command_prefix;

/// The facts trigger detection needs, apart from serenity's types so it can be tested as a table.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    pub bot_id: u64,
    pub content: &'a str,
    pub author_is_bot: bool,
    /// A regular message or a reply; joins, pins and other system messages are not.
    pub is_regular: bool,
    pub is_dm: bool,
    pub mentions_bot: bool,
    pub replies_to_bot: bool,
    pub in_bot_thread: bool,
    pub always_answer: bool,
    pub prefix: &'a str,
}

/// Removes `<@id>` and `<@!id>` mentions of the bot.
pub fn strip_mention(content: &str, bot_id: u64) -> String {
    content
        .replace(&format!("<@{bot_id}>"), "")
        .replace(&format!("<@!{bot_id}>"), "")
        .trim()
        .to_string()
}

pub fn classify(f: &Facts<'_>) -> Trigger {
    if f.author_is_bot || !f.is_regular {
        return Trigger::Ignore;
    }
    let text = strip_mention(f.content, f.bot_id);
    if let Some(command) = strip_command_prefix(&text, f.prefix) {
        return Trigger::command(command);
    }
    if f.is_dm || f.mentions_bot || f.replies_to_bot || f.in_bot_thread || f.always_answer {
        if text.is_empty() {
            return Trigger::Ignore;
        }
        return Trigger::Question(text);
    }
    Trigger::Ignore
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_table() {
        let base = Facts {
            bot_id: 42,
            content: "hello",
            is_regular: true,
            prefix: "!",
            ..Facts::default()
        };
        let cases: Vec<(Facts, Trigger)> = vec![
            (base.clone(), Trigger::Ignore),
            (
                Facts {
                    mentions_bot: true,
                    content: "<@42> hello",
                    ..base.clone()
                },
                Trigger::Question("hello".into()),
            ),
            (
                Facts {
                    mentions_bot: true,
                    content: "hi <@!42>",
                    ..base.clone()
                },
                Trigger::Question("hi".into()),
            ),
            (
                Facts {
                    is_dm: true,
                    ..base.clone()
                },
                Trigger::Question("hello".into()),
            ),
            (
                Facts {
                    replies_to_bot: true,
                    ..base.clone()
                },
                Trigger::Question("hello".into()),
            ),
            (
                Facts {
                    in_bot_thread: true,
                    ..base.clone()
                },
                Trigger::Question("hello".into()),
            ),
            (
                Facts {
                    always_answer: true,
                    ..base.clone()
                },
                Trigger::Question("hello".into()),
            ),
            (
                Facts {
                    author_is_bot: true,
                    is_dm: true,
                    ..base.clone()
                },
                Trigger::Ignore,
            ),
            (
                Facts {
                    is_regular: false,
                    mentions_bot: true,
                    ..base.clone()
                },
                Trigger::Ignore,
            ),
            (
                Facts {
                    content: "!reset",
                    ..base.clone()
                },
                Trigger::command("reset"),
            ),
            (
                Facts {
                    content: "<@42> !system be brief",
                    ..base.clone()
                },
                Trigger::command("system be brief"),
            ),
            (
                Facts {
                    content: "!!!",
                    always_answer: true,
                    ..base.clone()
                },
                Trigger::Question("!!!".into()),
            ),
            (
                Facts {
                    mentions_bot: true,
                    content: "<@42>",
                    ..base.clone()
                },
                Trigger::Ignore,
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(classify(&facts), want, "{facts:?}");
        }
    }
}
