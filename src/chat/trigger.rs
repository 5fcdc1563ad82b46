//! What a platform message is to the bot. Each adapter decides it with a pure function of what
//! its event says (`adapters::*::trigger`); all of them answer with this one type.

use super::message::Request;

#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// Not for the bot.
    Ignore,
    /// Answer this text (the bot's mention removed).
    Question(String),
    /// A prefix command, parsed (or the reason it did not parse).
    Command(Request),
}

impl Trigger {
    /// A prefix command: the text after the prefix, parsed once here.
    pub fn command(text: &str) -> Self {
        Trigger::Command(Request::from_command_text(text))
    }

    /// What to hand the core, if anything.
    pub fn into_request(self) -> Option<Request> {
        match self {
            Trigger::Ignore => None,
            Trigger::Question(q) => Some(Request::Question(q)),
            Trigger::Command(r) => Some(r),
        }
    }
}

/// The command text when `text` starts with `prefix` followed by a letter (`!reset`, but not
/// `!!!` or `! hi`); one rule for every platform.
pub fn strip_command_prefix<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix.is_empty() {
        return None;
    }
    let rest = text.strip_prefix(prefix)?;
    rest.chars()
        .next()
        .is_some_and(char::is_alphabetic)
        .then(|| rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Command;

    #[test]
    fn prefix_rule() {
        assert_eq!(strip_command_prefix("!reset", "!"), Some("reset"));
        assert_eq!(
            strip_command_prefix("!system be brief ", "!"),
            Some("system be brief")
        );
        assert_eq!(strip_command_prefix("!!!", "!"), None);
        assert_eq!(strip_command_prefix("! reset", "!"), None);
        assert_eq!(strip_command_prefix("reset", ""), None);
        assert_eq!(strip_command_prefix("?reset", "!"), None);
    }

    #[test]
    fn commands_are_parsed_once() {
        assert_eq!(
            Trigger::command("reset").into_request(),
            Some(Request::Command(Command::Reset))
        );
        assert!(matches!(
            Trigger::command("dance").into_request(),
            Some(Request::Malformed(_))
        ));
        assert_eq!(Trigger::Ignore.into_request(), None);
    }
}
