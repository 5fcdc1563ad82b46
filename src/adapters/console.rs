//! The terminal chat: `You:` / `Synthia:` with streaming, memory and `/` commands. With stdin
//! not a terminal it reads one question per line and writes one answer per question, so scripts
//! and tests can drive it.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::chat::{Author, ConversationKey, Incoming, Platform, Request};
use crate::core::{Assistant, ReplySink};

/// Prints a streamed reply: only what is new since the last update.
struct ConsoleSink {
    printed: Mutex<String>,
    interactive: bool,
}

impl ConsoleSink {
    fn out(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }

    fn catch_up(&self, full: &str) {
        let mut printed = self.printed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rest) = full.strip_prefix(printed.as_str()) {
            self.out(rest);
        } else {
            // The text changed under us (it never should); show the whole of it anew.
            self.out("\n");
            self.out(full);
        }
        *printed = full.to_string();
    }
}

#[async_trait::async_trait]
impl ReplySink for ConsoleSink {
    async fn typing(&self) {}

    async fn queued(&self, position: usize) {
        if self.interactive && position > 1 {
            eprintln!("({})", crate::core::text::queued(position));
        }
    }

    async fn update(&self, text_so_far: &str) {
        self.catch_up(text_so_far);
    }

    async fn finish(&self, text: &str) {
        self.catch_up(text);
    }

    async fn fail(&self, message: &str) {
        self.out(&format!("[{message}]"));
    }

    async fn notice(&self, text: &str) {
        self.out(text);
    }
}

/// Runs the chat until end of input (Ctrl-D) or a second Ctrl-C.
pub async fn run(
    assistant: Arc<Assistant>,
    conversation: &str,
    user_name: &str,
) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    run_with(assistant, conversation, user_name, stdin, interactive).await
}

pub async fn run_with<R: AsyncBufRead + Unpin>(
    assistant: Arc<Assistant>,
    conversation: &str,
    user_name: &str,
    input: R,
    interactive: bool,
) -> anyhow::Result<()> {
    let key = ConversationKey::console(conversation);
    let author = Author {
        id: Platform::Console.as_str().into(),
        name: user_name.into(),
        roles: Vec::new(),
    };
    if interactive {
        eprintln!(
            "synthia-bot chat: conversation {key}. Type /help for commands; Ctrl-C stops a reply, Ctrl-D quits."
        );
    }
    let mut lines = input.lines();
    loop {
        if interactive {
            print!("You: ");
            let _ = std::io::stdout().flush();
        }
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else {
            if interactive {
                println!();
            }
            return Ok(());
        };
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let request = match line.trim_start().strip_prefix('/') {
            Some(cmd) => Request::from_command_text(cmd),
            None => Request::Question(line.to_string()),
        };
        let mut msg = Incoming::new(key.clone(), author.clone(), request);
        msg.is_private = true;
        let sink = ConsoleSink {
            printed: Mutex::new(String::new()),
            interactive,
        };
        print!("Synthia: ");
        let _ = std::io::stdout().flush();
        let work = assistant.handle(msg, &sink);
        tokio::pin!(work);
        let mut interrupted = false;
        loop {
            tokio::select! {
                _ = &mut work => break,
                _ = tokio::signal::ctrl_c() => {
                    if interrupted {
                        println!();
                        return Ok(());
                    }
                    interrupted = true;
                    assistant.stop(&key);
                }
            }
        }
        println!();
    }
}
