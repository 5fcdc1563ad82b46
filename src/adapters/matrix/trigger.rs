//! Whether a Matrix message is for the bot, as a pure function of what the event says, so the
//! rules can be tested without a homeserver.

use crate::chat::Trigger;
use crate::chat::trigger::strip_command_prefix;

/// What the adapter learned about one text message.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// Plain body, reply fallback removed.
    pub body: &'a str,
    /// HTML `formatted_body`, empty when there is none.
    pub formatted: &'a str,
    /// `m.mentions.user_ids` names the bot.
    pub mentioned_ids: bool,
    pub bot_id: &'a str,
    pub bot_name: &'a str,
    pub command_prefix: &'a str,
    /// A DM: the room is marked direct or holds only the sender and the bot.
    pub is_direct: bool,
    /// The message replies to one of the bot's messages.
    pub reply_to_bot: bool,
    /// The message is in a thread the bot started or has answered in.
    pub in_bot_thread: bool,
    /// The room is in `matrix.always_answer`.
    pub always_answer: bool,
}

pub fn classify(f: &Facts<'_>) -> Trigger {
    let text = strip_mention(f.body, f.bot_id, f.bot_name);
    if let Some(command) = strip_command_prefix(&text, f.command_prefix) {
        return Trigger::command(command);
    }
    let addressed = f.is_direct
        || f.mentioned_ids
        || has_pill(f.formatted, f.bot_id)
        || contains_word(f.body, f.bot_id)
        || (!f.bot_name.trim().is_empty() && contains_word(f.body, f.bot_name))
        || f.reply_to_bot
        || f.in_bot_thread
        || f.always_answer;
    if addressed {
        Trigger::Question(text)
    } else {
        Trigger::Ignore
    }
}

/// A link to the bot's user in HTML (`matrix.to` in plain or percent-encoded form, or a
/// `matrix:` URI).
pub fn has_pill(formatted: &str, bot_id: &str) -> bool {
    if formatted.is_empty() || bot_id.is_empty() {
        return false;
    }
    let encoded = bot_id.replace('@', "%40").replace(':', "%3A");
    let uri = bot_id
        .strip_prefix('@')
        .map(|rest| format!("matrix:u/{rest}"));
    let lower = formatted.to_lowercase();
    lower.contains(&format!("matrix.to/#/{}", bot_id.to_lowercase()))
        || lower.contains(&format!("matrix.to/#/{}", encoded.to_lowercase()))
        || uri.is_some_and(|u| lower.contains(&u.to_lowercase()))
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `needle` in `haystack`, case-insensitively, not as part of a longer word.
pub fn contains_word(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.to_lowercase(), needle.to_lowercase());
    if n.is_empty() {
        return false;
    }
    let mut from = 0;
    while let Some(i) = h[from..].find(&n) {
        let start = from + i;
        let end = start + n.len();
        let before = h[..start].chars().next_back();
        let after = h[end..].chars().next();
        let edge_ok = |c: Option<char>, inner: Option<char>| {
            // A boundary is only needed where the name itself starts/ends with a word character.
            !(c.is_some_and(is_word_char) && inner.is_some_and(is_word_char))
        };
        if edge_ok(before, n.chars().next()) && edge_ok(after, n.chars().next_back()) {
            return true;
        }
        from = start + h[start..].chars().next().map_or(1, |c| c.len_utf8());
    }
    false
}

/// Removes a leading address ("Synthia: ", "@synthia:example.org, ") from the text.
pub fn strip_mention(body: &str, bot_id: &str, bot_name: &str) -> String {
    let trimmed = body.trim_start();
    for name in [bot_id, bot_name] {
        if name.is_empty() || trimmed.len() < name.len() {
            continue;
        }
        let Some(head) = trimmed.get(..name.len()) else {
            continue;
        };
        if head.to_lowercase() != name.to_lowercase() {
            continue;
        }
        let rest = &trimmed[name.len()..];
        if rest.chars().next().is_some_and(is_word_char) {
            continue;
        }
        let rest = rest.trim_start_matches([':', ',']);
        return rest.trim().to_string();
    }
    body.trim().to_string()
}

/// Drops the quoted original that older clients put at the start of a reply's body.
pub fn strip_reply_fallback(body: &str) -> String {
    if !body.starts_with("> <") {
        return body.to_string();
    }
    let mut lines = body.lines().peekable();
    while lines.peek().is_some_and(|l| l.starts_with('>')) {
        lines.next();
    }
    if lines.peek().is_some_and(|l| l.trim().is_empty()) {
        lines.next();
    }
    lines.collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOT: &str = "@synthia:example.org";

    fn facts(body: &str) -> Facts<'_> {
        Facts {
            body,
            bot_id: BOT,
            bot_name: "Synthia",
            command_prefix: "!",
            ..Facts::default()
        }
    }

    #[test]
    fn classify_table() {
        let msg = |s: &str| Trigger::Question(s.to_string());
        let cmd = Trigger::command;
        let cases: Vec<(Facts<'_>, Trigger)> = vec![
            (facts("hello everyone"), Trigger::Ignore),
            (facts("Synthia, what is 2+2?"), msg("what is 2+2?")),
            (facts("synthia: hi"), msg("hi")),
            (
                facts("what do you think, synthia?"),
                msg("what do you think, synthia?"),
            ),
            (facts("synthiabot is another bot"), Trigger::Ignore),
            (facts("@synthia:example.org explain"), msg("explain")),
            (
                Facts {
                    mentioned_ids: true,
                    ..facts("hey you")
                },
                msg("hey you"),
            ),
            (
                Facts {
                    formatted: "<a href=\"https://matrix.to/#/%40synthia%3Aexample.org\">S</a> hi",
                    ..facts("S hi")
                },
                msg("S hi"),
            ),
            (
                Facts {
                    is_direct: true,
                    ..facts("just talking")
                },
                msg("just talking"),
            ),
            (
                Facts {
                    reply_to_bot: true,
                    ..facts("and then?")
                },
                msg("and then?"),
            ),
            (
                Facts {
                    in_bot_thread: true,
                    ..facts("more")
                },
                msg("more"),
            ),
            (
                Facts {
                    always_answer: true,
                    ..facts("anyone")
                },
                msg("anyone"),
            ),
            (facts("!reset"), cmd("reset")),
            (facts("!system Be brief"), cmd("system Be brief")),
            (facts("Synthia: !stop"), cmd("stop")),
            (facts("!!!"), Trigger::Ignore),
            (facts("! not a command"), Trigger::Ignore),
            (
                Facts {
                    command_prefix: "?",
                    ..facts("!reset")
                },
                Trigger::Ignore,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(classify(&f), want, "{f:?}");
        }
    }

    #[test]
    fn pills() {
        for (html, want) in [
            (
                "<a href=\"https://matrix.to/#/@synthia:example.org\">Synthia</a>",
                true,
            ),
            (
                "<a href=\"https://matrix.to/#/%40synthia%3Aexample.org\">x</a>",
                true,
            ),
            ("<a href=\"matrix:u/synthia:example.org\">x</a>", true),
            (
                "<a href=\"https://matrix.to/#/@alice:example.org\">Alice</a>",
                false,
            ),
            ("", false),
        ] {
            assert_eq!(has_pill(html, BOT), want, "{html}");
        }
    }

    #[test]
    fn words() {
        for (h, n, want) in [
            ("hi Synthia!", "synthia", true),
            ("SYNTHIA", "synthia", true),
            ("synthias", "synthia", false),
            ("ask @synthia:example.org now", BOT, true),
            ("ask @synthia:example.org.uk", BOT, true),
            ("émile", "mile", false),
            ("", "x", false),
        ] {
            assert_eq!(contains_word(h, n), want, "{h} / {n}");
        }
    }

    #[test]
    fn reply_fallbacks() {
        assert_eq!(
            strip_reply_fallback("> <@a:b> original\n> more\n\nmy answer"),
            "my answer"
        );
        assert_eq!(strip_reply_fallback("> quote of mine"), "> quote of mine");
        assert_eq!(strip_reply_fallback("plain"), "plain");
    }
}
