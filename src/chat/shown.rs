//! Where an answer is shown on its platform while it is written: the messages posted for it, so a
//! process that dies before the final text went out can finish showing it in the same messages
//! after a restart, instead of leaving them half written and posting the answer again.

/// The platform messages showing one question's answer, in order. The first `notices` of them
/// hold notes shown before the answer (a question cut to fit); the answer's own parts follow.
/// Ids are the platform's own (Discord snowflake, Matrix event id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    pub notices: usize,
    pub ids: Vec<String>,
}

impl Shown {
    /// The stored form: the notice count on the first line, then one id per line. Nothing
    /// posted yet is the empty text.
    pub fn to_text(&self) -> String {
        if self.ids.is_empty() && self.notices == 0 {
            return String::new();
        }
        let mut out = self.notices.to_string();
        for id in &self.ids {
            out.push('\n');
            out.push_str(id);
        }
        out
    }

    /// Reads [`Shown::to_text`] back; `None` for text it never writes (a damaged row), so a
    /// restart posts anew rather than editing messages it cannot name.
    pub fn parse(text: &str) -> Option<Shown> {
        if text.is_empty() {
            return Some(Shown::default());
        }
        let mut lines = text.split('\n');
        let notices = lines.next()?.parse().ok()?;
        let ids: Vec<String> = lines.map(str::to_string).collect();
        if ids.iter().any(|id| id.is_empty() || id.trim() != id) || notices > ids.len() {
            return None;
        }
        Some(Shown { notices, ids })
    }

    /// The ids of the answer's own messages, after its notices.
    pub fn answer_ids(&self) -> &[String] {
        &self.ids[self.notices.min(self.ids.len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_it_writes_and_refuses_anything_else() {
        for shown in [
            Shown::default(),
            Shown {
                notices: 0,
                ids: vec!["123".into()],
            },
            Shown {
                notices: 1,
                ids: vec!["$a:example.org".into(), "$b:example.org".into()],
            },
        ] {
            assert_eq!(Shown::parse(&shown.to_text()), Some(shown.clone()));
        }
        assert_eq!(Shown::default().to_text(), "");
        for bad in ["x\n1", "2\n1", "0\n\n1", "0\n 1", "-1\n5"] {
            assert_eq!(Shown::parse(bad), None, "{bad:?}");
        }
        let s = Shown {
            notices: 1,
            ids: vec!["n".into(), "a".into(), "b".into()],
        };
        assert_eq!(s.answer_ids(), ["a".to_string(), "b".to_string()]);
    }
}
