//! Which conversation a message belongs to: a channel, a thread (its own conversation) or a DM.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::platform::{Platform, UnknownPlatform};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConversationKey {
    pub platform: Platform,
    /// The guild (Discord); empty where the platform has none (DMs, Matrix rooms).
    pub space: String,
    pub channel: String,
    /// A thread inside `channel`; empty for the channel itself.
    pub thread: String,
}

/// A conversation key that does not read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid conversation key `{0}` (expected platform:channel, platform:space:channel or platform:space:channel:thread)"
    )]
    Malformed(String),
    #[error("invalid conversation key: {0}")]
    Platform(#[from] UnknownPlatform),
}

impl ConversationKey {
    pub fn new(platform: Platform, space: &str, channel: &str, thread: &str) -> Self {
        Self {
            platform,
            space: space.into(),
            channel: channel.into(),
            thread: thread.into(),
        }
    }

    /// The terminal chat's conversation `console:<name>`.
    pub fn console(name: &str) -> Self {
        Self::new(Platform::Console, "", name, "")
    }
}

fn escape(part: &str) -> String {
    part.replace('%', "%25").replace(':', "%3A")
}

fn unescape(part: &str) -> String {
    part.replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%25", "%")
}

/// Written `platform:channel`, `platform:space:channel` or `platform:space:channel:thread`,
/// with `:` inside a part written `%3A` (Matrix room ids contain colons).
impl fmt::Display for ConversationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.platform;
        match (self.space.is_empty(), self.thread.is_empty()) {
            (true, true) => write!(f, "{p}:{}", escape(&self.channel)),
            (false, true) => write!(f, "{p}:{}:{}", escape(&self.space), escape(&self.channel)),
            _ => write!(
                f,
                "{p}:{}:{}:{}",
                escape(&self.space),
                escape(&self.channel),
                escape(&self.thread)
            ),
        }
    }
}

impl FromStr for ConversationKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let parts: Vec<String> = s.split(':').map(unescape).collect();
        let bad = || KeyError::Malformed(s.to_string());
        if parts.iter().take(1).any(String::is_empty) {
            return Err(bad());
        }
        let (platform, rest) = parts.split_first().ok_or_else(bad)?;
        let key = |space: &str, channel: &str, thread: &str| -> Result<Self, KeyError> {
            Ok(Self::new(platform.parse()?, space, channel, thread))
        };
        match rest {
            [c] if !c.is_empty() => key("", c, ""),
            [sp, c] if !c.is_empty() => key(sp, c, ""),
            [sp, c, t] if !c.is_empty() => key(sp, c, t),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let cases = [
            ConversationKey::console("default"),
            ConversationKey::new(Platform::Discord, "123", "456", ""),
            ConversationKey::new(Platform::Discord, "123", "456", "789"),
            ConversationKey::new(Platform::Matrix, "", "!room:example.org", "$ev%1"),
        ];
        for key in cases {
            let text = key.to_string();
            assert_eq!(text.parse::<ConversationKey>().unwrap(), key, "{text}");
        }
        assert_eq!(
            ConversationKey::console("default").to_string(),
            "console:default"
        );
        for bad in ["", "console", ":x", "a:b:c:d:e", "console:"] {
            assert!(
                matches!(bad.parse::<ConversationKey>(), Err(KeyError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "irc:#rust".parse::<ConversationKey>(),
            Err(KeyError::Platform(_))
        ));
    }
}
