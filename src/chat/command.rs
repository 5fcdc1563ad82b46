//! The commands users can give, and parsing them from text, kept apart from executing them
//! (that is the core's). Adapters strip their own prefix (`/`, `!`) and hand the rest here;
//! slash commands build a [`Command`] from their options with the same checks.

use std::ops::RangeInclusive;

/// Temperatures a conversation may be set to (0 = greedy); the configuration allows the same.
/// Every command's name as typed after the prefix, for completion and help.
pub const COMMAND_NAMES: &[&str] = &["ask", "reset", "forget", "system", "stop", "help", "set"];

pub const TEMPERATURE_RANGE: RangeInclusive<f64> = 0.0..=5.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// A question sent as a command (`!ask`, `/ask`).
    Ask(String),
    Reset,
    Forget,
    /// `None` shows the current system prompt.
    System(Option<String>),
    Set(Setting),
    Stop,
    Help,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Temperature(f64),
    MaxTokens(u32),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command `{0}`")]
    Unknown(String),
    #[error("`{0}` needs {1}")]
    MissingArgument(&'static str, &'static str),
    #[error("{0}")]
    BadValue(String),
}

impl Setting {
    /// A temperature within [`TEMPERATURE_RANGE`].
    pub fn temperature(t: f64) -> Result<Setting, CommandError> {
        if !TEMPERATURE_RANGE.contains(&t) {
            return Err(CommandError::BadValue(format!(
                "temperature must be between {} and {}",
                TEMPERATURE_RANGE.start(),
                TEMPERATURE_RANGE.end()
            )));
        }
        Ok(Setting::Temperature(t))
    }

    /// A reply length of at least one token.
    pub fn max_tokens(n: u32) -> Result<Setting, CommandError> {
        if n == 0 {
            return Err(CommandError::BadValue(
                "max_tokens must be at least 1".into(),
            ));
        }
        Ok(Setting::MaxTokens(n))
    }
}

impl Command {
    /// Commands that change or delete what the conversation remembers need an admin, or the
    /// owner of a private conversation.
    pub fn needs_admin(&self) -> bool {
        matches!(
            self,
            Command::Reset | Command::Forget | Command::System(Some(_)) | Command::Set(_)
        )
    }
}

pub fn parse(text: &str) -> Result<Command, CommandError> {
    let text = text.trim();
    let (name, rest) = match text.split_once(char::is_whitespace) {
        Some((n, r)) => (n, r.trim()),
        None => (text, ""),
    };
    match name.to_lowercase().as_str() {
        "ask" => {
            if rest.is_empty() {
                Err(CommandError::MissingArgument("ask", "a question"))
            } else {
                Ok(Command::Ask(rest.to_string()))
            }
        }
        "reset" | "clear" => Ok(Command::Reset),
        "forget" => Ok(Command::Forget),
        "system" => Ok(Command::System(
            (!rest.is_empty()).then(|| rest.to_string()),
        )),
        "stop" | "cancel" => Ok(Command::Stop),
        "help" | "" => Ok(Command::Help),
        "set" => parse_set(rest),
        other => Err(CommandError::Unknown(other.to_string())),
    }
}

fn parse_set(rest: &str) -> Result<Command, CommandError> {
    let mut parts = rest.split_whitespace();
    let key = parts.next().ok_or(CommandError::MissingArgument(
        "set",
        "temperature or max_tokens and a value",
    ))?;
    let value = parts
        .next()
        .ok_or(CommandError::MissingArgument("set", "a value"))?;
    match key.to_lowercase().replace('-', "_").as_str() {
        "temperature" | "temp" => {
            let v: f64 = value
                .parse()
                .map_err(|_| CommandError::BadValue(format!("`{value}` is not a number")))?;
            Setting::temperature(v).map(Command::Set)
        }
        "max_tokens" | "max_new_tokens" => {
            let v: u32 = value
                .parse()
                .map_err(|_| CommandError::BadValue(format!("`{value}` is not a whole number")))?;
            Setting::max_tokens(v).map(Command::Set)
        }
        other => Err(CommandError::BadValue(format!(
            "unknown setting `{other}` (use temperature or max_tokens)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, Result<Command, CommandError>)] = &[
            ("reset", Ok(Command::Reset)),
            ("  RESET  ", Ok(Command::Reset)),
            ("forget", Ok(Command::Forget)),
            ("system", Ok(Command::System(None))),
            (
                "system Be brief.  ",
                Ok(Command::System(Some("Be brief.".into()))),
            ),
            (
                "set temperature 0.2",
                Ok(Command::Set(Setting::Temperature(0.2))),
            ),
            (
                "set max_tokens 128",
                Ok(Command::Set(Setting::MaxTokens(128))),
            ),
            (
                "set max-tokens 64",
                Ok(Command::Set(Setting::MaxTokens(64))),
            ),
            (
                "set temperature hot",
                Err(CommandError::BadValue("`hot` is not a number".into())),
            ),
            (
                "set temperature 9",
                Err(CommandError::BadValue(
                    "temperature must be between 0 and 5".into(),
                )),
            ),
            (
                "set max_tokens 0",
                Err(CommandError::BadValue(
                    "max_tokens must be at least 1".into(),
                )),
            ),
            (
                "set",
                Err(CommandError::MissingArgument(
                    "set",
                    "temperature or max_tokens and a value",
                )),
            ),
            (
                "set colour blue",
                Err(CommandError::BadValue(
                    "unknown setting `colour` (use temperature or max_tokens)".into(),
                )),
            ),
            ("stop", Ok(Command::Stop)),
            ("help", Ok(Command::Help)),
            (
                "ask what is rust?",
                Ok(Command::Ask("what is rust?".into())),
            ),
            (
                "ask",
                Err(CommandError::MissingArgument("ask", "a question")),
            ),
            ("dance", Err(CommandError::Unknown("dance".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(&parse(input), want, "{input:?}");
        }
    }

    #[test]
    fn admin_commands() {
        assert!(parse("reset").unwrap().needs_admin());
        assert!(parse("system x").unwrap().needs_admin());
        assert!(!parse("system").unwrap().needs_admin());
        assert!(!parse("stop").unwrap().needs_admin());
        assert!(!parse("ask hi").unwrap().needs_admin());
    }

    #[test]
    fn every_listed_name_is_a_command() {
        for name in COMMAND_NAMES {
            assert!(
                !matches!(parse(name), Err(CommandError::Unknown(_))),
                "{name} is listed but not parsed"
            );
        }
    }
}
