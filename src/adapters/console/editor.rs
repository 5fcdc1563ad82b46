//! The interactive chat's line editor: history kept across runs, `/` commands completed with
//! Tab, a line ending in `\` continued on the next, pastes taken whole. rustyline blocks, so it
//! runs on a thread of its own and hands each finished input to the chat.

use std::path::PathBuf;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper};

use crate::chat::command::COMMAND_NAMES;

/// Names only the terminal chat knows: leaving it.
pub const QUIT: &[&str] = &["quit", "exit"];

/// What the person typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// One question or command, continuation lines joined with their line breaks.
    Line(String),
    /// Ctrl-D at an empty prompt, or the terminal went away.
    End,
}

/// Completion and continuation rules; nothing is highlighted or hinted.
struct ChatHelper;

impl Completer for ChatHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(complete_command(&line[..pos]))
    }
}

/// Command names completing `before` (the line up to the cursor) when it is a `/` and the start
/// of a name: where the replacement starts, and the candidates.
fn complete_command(before: &str) -> (usize, Vec<Pair>) {
    let Some(word) = before.strip_prefix('/') else {
        return (before.len(), Vec::new());
    };
    if word.contains(char::is_whitespace) {
        return (before.len(), Vec::new());
    }
    let word = word.to_lowercase();
    let found = COMMAND_NAMES
        .iter()
        .chain(QUIT)
        .filter(|name| name.starts_with(&word))
        .map(|name| Pair {
            display: format!("/{name}"),
            replacement: format!("{name} "),
        })
        .collect();
    (1, found)
}

impl Validator for ChatHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if ctx.input().ends_with('\\') {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Valid(None)
        })
    }
}

impl Hinter for ChatHelper {
    type Hint = String;
}

impl Highlighter for ChatHelper {}

impl Helper for ChatHelper {}

/// An input as the chat takes it: each `\` that ended a line removed, its line break kept.
pub fn joined(input: &str) -> String {
    input.replace("\\\n", "\n")
}

/// The editor's thread. [`LineEditor::next`] shows the prompt and waits for the next input; the
/// prompt is never shown while a reply is being written.
pub struct LineEditor {
    ask: std::sync::mpsc::Sender<()>,
    answers: tokio::sync::mpsc::Receiver<Input>,
}

impl LineEditor {
    /// Starts the editor with the history in `history` (created on the first entry; `None`:
    /// none kept). Fails when the terminal cannot be set up.
    pub fn start(prompt: &'static str, history: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut editor: Editor<ChatHelper, DefaultHistory> = Editor::new()?;
        editor.set_helper(Some(ChatHelper));
        if let Some(path) = &history {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::create_dir_all(dir);
            }
            match editor.load_history(path) {
                Ok(()) => {}
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the chat history")
                }
            }
        }
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let (tx, answers) = tokio::sync::mpsc::channel(1);
        std::thread::Builder::new()
            .name("chat-editor".into())
            .spawn(move || {
                while asked.recv().is_ok() {
                    let input = loop {
                        match editor.readline(prompt) {
                            Ok(line) => break Input::Line(line),
                            // Ctrl-C at the prompt drops what was typed, as shells do.
                            Err(ReadlineError::Interrupted) => {
                                eprintln!("{}", crate::core::text::CHAT_QUIT_HINT);
                            }
                            Err(ReadlineError::Eof) => break Input::End,
                            Err(e) => {
                                tracing::warn!(error = %e, "the terminal cannot be read");
                                break Input::End;
                            }
                        }
                    };
                    if let (Input::Line(line), Some(path)) = (&input, &history)
                        && !line.trim().is_empty()
                    {
                        let _ = editor.add_history_entry(line.as_str());
                        if let Err(e) = editor.append_history(path) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot save the chat history");
                        }
                    }
                    let end = input == Input::End;
                    if tx.blocking_send(input).is_err() || end {
                        break;
                    }
                }
            })?;
        Ok(Self { ask, answers })
    }

    /// Shows the prompt and waits for what is typed.
    pub async fn next(&mut self) -> Input {
        if self.ask.send(()).is_err() {
            return Input::End;
        }
        self.answers.recv().await.unwrap_or(Input::End)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slash_and_a_prefix_complete_to_command_names() {
        let names = |before: &str| -> (usize, Vec<String>) {
            let (at, found) = complete_command(before);
            (at, found.into_iter().map(|p| p.replacement).collect())
        };
        assert_eq!(names("/res"), (1, vec!["reset ".to_string()]));
        assert_eq!(names("/RE"), (1, vec!["reset ".to_string()]));
        assert_eq!(
            names("/s"),
            (1, vec!["system ".into(), "stop ".into(), "set ".into()])
        );
        assert_eq!(names("/").1.len(), COMMAND_NAMES.len() + QUIT.len());
        assert_eq!(names("/q"), (1, vec!["quit ".to_string()]));
        assert_eq!(names("/reset now").1, Vec::<String>::new());
        assert_eq!(names("hello /re").1, Vec::<String>::new());
    }

    #[test]
    fn a_trailing_backslash_continues_the_line() {
        assert_eq!(joined("first \\\nsecond\\\nthird"), "first \nsecond\nthird");
        assert_eq!(joined("a \\ b"), "a \\ b");
    }
}
