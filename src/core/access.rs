//! Who may talk to the bot and who may change its memory, per platform.

use crate::chat::Incoming;
use crate::config::AccessSettings;

#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    rules: AccessSettings,
    /// The terminal: its user is the operator.
    open: bool,
    closed: bool,
}

/// `*` matches any run of characters, so `@*:example.org` admits a whole homeserver.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

fn any_match(patterns: &[String], value: &str) -> bool {
    patterns.iter().any(|p| glob_match(p, value))
}

impl Access {
    pub fn new(rules: AccessSettings) -> Self {
        Self {
            rules,
            open: false,
            closed: false,
        }
    }

    pub fn open() -> Self {
        Self {
            rules: AccessSettings::default(),
            open: true,
            closed: false,
        }
    }

    /// For platforms without configured rules: nobody.
    pub fn closed() -> Self {
        Self {
            rules: AccessSettings::default(),
            open: false,
            closed: true,
        }
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    pub fn is_admin(&self, msg: &Incoming) -> bool {
        if self.open {
            return true;
        }
        any_match(&self.rules.admins, &msg.author.id)
            || msg
                .author
                .roles
                .iter()
                .any(|r| self.rules.admin_roles.contains(r))
    }

    /// Whether a user may bring the bot into a room (invites), by user and room rules alone.
    pub fn admits(&self, user: &str, room: &str) -> bool {
        if self.open {
            return true;
        }
        if self.closed {
            return false;
        }
        if any_match(&self.rules.admins, user) {
            return true;
        }
        let r = &self.rules;
        let user_ok = r.allowed_users.is_empty() || any_match(&r.allowed_users, user);
        let room_ok = r.allowed_channels.is_empty() || any_match(&r.allowed_channels, room);
        user_ok && room_ok
    }

    /// Whether a user counts as someone the bot is there for (a room with none left is left).
    pub fn admits_user(&self, user: &str) -> bool {
        self.open
            || (!self.closed
                && (any_match(&self.rules.admins, user)
                    || self.rules.allowed_users.is_empty()
                    || any_match(&self.rules.allowed_users, user)))
    }

    pub fn allows(&self, msg: &Incoming) -> bool {
        if self.open {
            return true;
        }
        if self.closed {
            return false;
        }
        if self.is_admin(msg) {
            return true;
        }
        let r = &self.rules;
        let user_ok = (r.allowed_users.is_empty() && r.allowed_roles.is_empty())
            || any_match(&r.allowed_users, &msg.author.id)
            || msg
                .author
                .roles
                .iter()
                .any(|role| r.allowed_roles.contains(role));
        let key = &msg.key;
        // A thread belongs to its channel: allowing the channel allows its threads.
        // DMs are governed by the user rules alone.
        let channel_ok = r.allowed_channels.is_empty()
            || msg.is_private
            || any_match(&r.allowed_channels, &key.channel)
            || (!key.thread.is_empty() && any_match(&r.allowed_channels, &key.thread));
        let space_ok = r.allowed_spaces.is_empty()
            || msg.is_private
            || any_match(&r.allowed_spaces, &key.space);
        user_ok && channel_ok && space_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Author, ConversationKey, Platform};

    fn msg(user: &str, roles: &[&str], space: &str, channel: &str, private: bool) -> Incoming {
        let mut m = Incoming::question(
            ConversationKey::new(Platform::Discord, space, channel, ""),
            Author {
                id: user.into(),
                name: user.into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
            },
            "hi",
        );
        m.is_private = private;
        m
    }

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("@*:example.org", "@alice:example.org", true),
            ("@*:example.org", "@alice:evil.org", false),
            ("*", "anything", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXc", false),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p} {t}");
        }
    }

    #[test]
    fn table() {
        let rules = AccessSettings {
            allowed_users: vec!["u1".into()],
            allowed_roles: vec!["r1".into()],
            allowed_channels: vec!["c1".into()],
            allowed_spaces: vec!["g1".into()],
            admins: vec!["boss".into()],
            admin_roles: vec!["mods".into()],
        };
        let a = Access::new(rules);
        let cases = [
            (msg("u1", &[], "g1", "c1", false), true, false),
            (msg("u2", &[], "g1", "c1", false), false, false),
            (msg("u2", &["r1"], "g1", "c1", false), true, false),
            (msg("u1", &[], "g1", "c2", false), false, false),
            (msg("u1", &[], "g2", "c1", false), false, false),
            (msg("boss", &[], "g9", "c9", false), true, true),
            (msg("u9", &["mods"], "g9", "c9", false), true, true),
        ];
        for (m, allowed, admin) in cases {
            assert_eq!(a.allows(&m), allowed, "{m:?}");
            assert_eq!(a.is_admin(&m), admin, "{m:?}");
        }
        let empty = Access::new(AccessSettings::default());
        assert!(empty.allows(&msg("anyone", &[], "g", "c", false)));
        assert!(!empty.is_admin(&msg("anyone", &[], "g", "c", false)));
        assert!(!Access::closed().allows(&msg("anyone", &[], "g", "c", false)));
        assert!(Access::open().is_admin(&msg("anyone", &[], "", "c", true)));
    }
}
