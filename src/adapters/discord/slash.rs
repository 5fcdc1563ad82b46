//! Slash commands: the definitions registered with Discord ([`commands`]) and the typed
//! requests an invocation's options build ([`slash_requests`]), never turned back into text.

use serenity::all::{
    CommandDataOptionValue, CommandOptionType, CreateCommand, CreateCommandOption,
};

use crate::chat::command::TEMPERATURE_RANGE;
use crate::chat::{Command, CommandError, Request, Setting};

/// The slash commands registered when the bot connects.
pub(super) fn commands() -> Vec<CreateCommand> {
    vec![
        CreateCommand::new("ask")
            .description("Ask Synthia a question")
            .add_option(
                CreateCommandOption::new(CommandOptionType::String, "prompt", "Your question")
                    .required(true),
            )
            .add_option(CreateCommandOption::new(
                CommandOptionType::Boolean,
                "private",
                "Only you see the answer, and it is not remembered",
            )),
        CreateCommand::new("reset").description("Start this conversation afresh"),
        CreateCommand::new("system")
            .description("Show or set Synthia's instructions here (admins)")
            .add_option(CreateCommandOption::new(
                CommandOptionType::String,
                "text",
                "New instructions",
            )),
        CreateCommand::new("settings")
            .description("Change how Synthia answers here (admins)")
            .add_option(CreateCommandOption::new(
                CommandOptionType::Number,
                "temperature",
                format!(
                    "{} to {}",
                    TEMPERATURE_RANGE.start(),
                    TEMPERATURE_RANGE.end()
                ),
            ))
            .add_option(CreateCommandOption::new(
                CommandOptionType::Integer,
                "max_tokens",
                "Longest reply",
            )),
        CreateCommand::new("stop").description("Stop the reply being written here"),
        CreateCommand::new("help").description("What Synthia can do"),
    ]
}

/// What a slash command asks for, built from its options (never turned back into text).
/// `/settings` with both options is two requests, answered one below the other.
pub(super) fn slash_requests<'a>(
    name: &str,
    option: &dyn Fn(&str) -> Option<&'a CommandDataOptionValue>,
) -> Option<Vec<Request>> {
    let requests = match name {
        "ask" => match option("prompt") {
            Some(CommandDataOptionValue::String(q)) => vec![Request::Question(q.clone())],
            _ => return None,
        },
        "system" => vec![Request::Command(Command::System(match option("text") {
            Some(CommandDataOptionValue::String(t)) if !t.trim().is_empty() => {
                Some(t.trim().to_string())
            }
            _ => None,
        }))],
        "settings" => {
            let mut requests = Vec::new();
            if let Some(CommandDataOptionValue::Number(t)) = option("temperature") {
                requests.push(setting(Setting::temperature(*t)));
            }
            if let Some(CommandDataOptionValue::Integer(n)) = option("max_tokens") {
                let n = u32::try_from(*n)
                    .map_err(|_| CommandError::BadValue(format!("`{n}` is not a whole number")));
                requests.push(setting(n.and_then(Setting::max_tokens)));
            }
            if requests.is_empty() {
                requests.push(Request::Command(Command::Help));
            }
            requests
        }
        "reset" => vec![Request::Command(Command::Reset)],
        "stop" => vec![Request::Command(Command::Stop)],
        "help" => vec![Request::Command(Command::Help)],
        _ => return None,
    };
    Some(requests)
}

fn setting(s: Result<Setting, CommandError>) -> Request {
    match s {
        Ok(s) => Request::Command(Command::Set(s)),
        Err(e) => Request::Malformed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandDataOptionValue as V;

    /// Runs `slash_requests` for `/name` invoked with `options`.
    fn requests(name: &str, options: &[(&str, V)]) -> Option<Vec<Request>> {
        slash_requests(name, &|want: &str| {
            options.iter().find(|(n, _)| *n == want).map(|(_, v)| v)
        })
    }

    #[test]
    fn settings_build_one_request_per_option() {
        assert_eq!(
            requests(
                "settings",
                &[
                    ("temperature", V::Number(0.5)),
                    ("max_tokens", V::Integer(100))
                ]
            ),
            Some(vec![
                Request::Command(Command::Set(Setting::Temperature(0.5))),
                Request::Command(Command::Set(Setting::MaxTokens(100))),
            ])
        );
        assert_eq!(
            requests("settings", &[]),
            Some(vec![Request::Command(Command::Help)])
        );
    }

    #[test]
    fn settings_out_of_range_are_malformed() {
        assert!(matches!(
            requests("settings", &[("temperature", V::Number(9.0))]).as_deref(),
            Some([Request::Malformed(_)])
        ));
        assert_eq!(
            requests("settings", &[("max_tokens", V::Integer(-1))]),
            Some(vec![Request::Malformed(CommandError::BadValue(
                "`-1` is not a whole number".into()
            ))])
        );
        assert!(matches!(
            requests("settings", &[("max_tokens", V::Integer(0))]).as_deref(),
            Some([Request::Malformed(_)])
        ));
    }

    #[test]
    fn ask_and_system() {
        assert_eq!(
            requests("ask", &[("prompt", V::String("why?".into()))]),
            Some(vec![Request::Question("why?".into())])
        );
        assert_eq!(requests("ask", &[]), None);
        assert_eq!(
            requests("system", &[("text", V::String("   ".into()))]),
            Some(vec![Request::Command(Command::System(None))])
        );
        assert_eq!(
            requests("system", &[]),
            Some(vec![Request::Command(Command::System(None))])
        );
        assert_eq!(
            requests("system", &[("text", V::String(" Be brief. ".into()))]),
            Some(vec![Request::Command(Command::System(Some(
                "Be brief.".into()
            )))])
        );
    }

    #[test]
    fn plain_commands_and_unknown_ones() {
        for (name, command) in [
            ("reset", Command::Reset),
            ("stop", Command::Stop),
            ("help", Command::Help),
        ] {
            assert_eq!(requests(name, &[]), Some(vec![Request::Command(command)]));
        }
        assert_eq!(requests("dance", &[]), None);
    }
}
