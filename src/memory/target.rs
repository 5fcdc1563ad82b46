//! Which database `memory.database` names: a SQLite file (a path or `sqlite://` URL) or a
//! PostgreSQL server (`postgres://` or `postgresql://`). Decided before anything is opened, so a
//! server URL is never taken for a file path.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The two kinds of database the store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `memory.database`.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A `sqlite:` URL, options and all.
    SqliteUrl(String),
    /// A plain file path; its folder is created when missing.
    SqlitePath(PathBuf),
    /// A `postgres://` or `postgresql://` URL, already checked to parse.
    Postgres(String),
}

/// Why a `memory.database` value names no database the store can open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("is empty")]
    Empty,
    #[error(
        "uses the scheme `{0}://`, which is neither sqlite:// nor postgres:// (or postgresql://)"
    )]
    UnknownScheme(String),
    #[error("is not a valid PostgreSQL URL: {0}")]
    BadPostgresUrl(String),
}

impl Target {
    pub fn parse(value: &str) -> Result<Target, TargetError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(TargetError::Empty);
        }
        if let Some(scheme) = scheme(value) {
            return match scheme.to_ascii_lowercase().as_str() {
                "postgres" | "postgresql" => sqlx::postgres::PgConnectOptions::from_str(value)
                    .map(|_| Target::Postgres(value.to_string()))
                    .map_err(|e| TargetError::BadPostgresUrl(e.to_string())),
                "sqlite" => Ok(Target::SqliteUrl(value.to_string())),
                _ => Err(TargetError::UnknownScheme(scheme.to_string())),
            };
        }
        if value.starts_with("sqlite:") {
            return Ok(Target::SqliteUrl(value.to_string()));
        }
        Ok(Target::SqlitePath(PathBuf::from(value)))
    }

    pub fn backend(&self) -> Backend {
        match self {
            Target::SqliteUrl(_) | Target::SqlitePath(_) => Backend::Sqlite,
            Target::Postgres(_) => Backend::Postgres,
        }
    }
}

/// Shown without the password a PostgreSQL URL may carry, so logs and errors can name it.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::SqliteUrl(url) => f.write_str(url),
            Target::SqlitePath(path) => write!(f, "{}", path.display()),
            Target::Postgres(url) => f.write_str(&redact_password(url)),
        }
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

/// The URL scheme before `://`, if the value has the shape of a URL at all.
fn scheme(value: &str) -> Option<&str> {
    let (scheme, _) = value.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// `postgres://user:secret@host/db` as `postgres://user:***@host/db`; a `password=` query
/// parameter is masked too.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths_name_their_backend() {
        let cases = [
            ("data/memory.sqlite", Some(Backend::Sqlite)),
            ("/var/lib/synthia/memory.sqlite", Some(Backend::Sqlite)),
            ("sqlite://memory.sqlite?mode=rwc", Some(Backend::Sqlite)),
            ("sqlite::memory:", Some(Backend::Sqlite)),
            ("postgres://u:p@db.example/synthia", Some(Backend::Postgres)),
            (
                "postgresql://u@127.0.0.1:5433/synthia",
                Some(Backend::Postgres),
            ),
            ("POSTGRES://u@host/db", Some(Backend::Postgres)),
            ("mysql://u:p@host/db", None),
            ("", None),
            ("   ", None),
        ];
        for (value, want) in cases {
            let got = Target::parse(value).ok().map(|t| t.backend());
            assert_eq!(got, want, "{value:?}");
        }
        assert_eq!(
            Target::parse("mysql://h/db"),
            Err(TargetError::UnknownScheme("mysql".into()))
        );
        assert!(matches!(
            Target::parse("postgres://u@host:notaport/db"),
            Err(TargetError::BadPostgresUrl(_))
        ));
    }

    #[test]
    fn passwords_never_reach_the_display() {
        let t = Target::parse("postgres://synthia:hunter2@db:5432/memory?sslmode=require").unwrap();
        let shown = t.to_string();
        assert_eq!(
            shown,
            "postgres://synthia:***@db:5432/memory?sslmode=require"
        );
        assert!(!format!("{t:?}").contains("hunter2"));
        assert_eq!(
            redact_password("postgres://u@h/db?password=hunter2&sslmode=disable"),
            "postgres://u@h/db?password=***&sslmode=disable"
        );
        assert_eq!(redact_password("postgres://h/db"), "postgres://h/db");
    }
}
