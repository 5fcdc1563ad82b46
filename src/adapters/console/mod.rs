//! The terminal chat: `You:` / `Synthia:` with streaming, memory and `/` commands. On a terminal
//! it edits lines as shells do (history across runs, Tab completes commands, `\` continues a
//! line) and shows a status line after each reply. With stdin not a terminal it reads one
//! question per line and writes one answer per question, so scripts and tests can drive it.

mod editor;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::chat::{Author, ConversationKey, Incoming, Platform, Request};
use crate::core::{Assistant, ReplyReport, ReplySink, text};
use editor::{Input, LineEditor};

/// Prints a streamed reply: only what is new since the last update.
struct ConsoleSink {
    printed: Mutex<String>,
    interactive: bool,
    report: Mutex<Option<ReplyReport>>,
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

    async fn answered(&self, report: &ReplyReport) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report.clone());
    }
}

/// How the terminal chat runs.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub conversation: String,
    pub user_name: String,
    /// Where typed lines are kept across runs (interactive only).
    pub history: Option<PathBuf>,
    /// The context window, for the status line.
    pub context_length: usize,
}

/// The status line after a reply.
fn status(report: &ReplyReport, context: usize) -> String {
    let seconds = report.decode_time.as_secs_f64();
    let speed = (report.completion_tokens > 0 && seconds > 0.0)
        .then(|| report.completion_tokens as f64 / seconds);
    text::chat_status(
        report.completion_tokens,
        speed,
        report.prompt_tokens + report.completion_tokens,
        context,
    )
}

/// Runs the chat until end of input (Ctrl-D), `/quit`, or a second Ctrl-C during a reply.
pub async fn run(assistant: Arc<Assistant>, options: ChatOptions) -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        return run_interactive(assistant, options).await;
    }
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    run_with(
        assistant,
        &options.conversation,
        &options.user_name,
        stdin,
        false,
    )
    .await
}

/// What the person asked for, as the core takes it; `None` to leave.
fn request_for(line: &str) -> Option<Request> {
    Some(match line.trim_start().strip_prefix('/') {
        Some(cmd) if editor::QUIT.contains(&cmd.trim().to_lowercase().as_str()) => return None,
        Some(cmd) => Request::from_command_text(cmd),
        None => Request::Question(line.to_string()),
    })
}

/// One message to the core and its reply on screen; Ctrl-C stops the reply, a second leaves.
/// `false` when the person asked to leave.
async fn exchange(
    assistant: &Assistant,
    key: &ConversationKey,
    author: &Author,
    request: Request,
    interactive: bool,
    context: Option<usize>,
) -> bool {
    let mut msg = Incoming::new(key.clone(), author.clone(), request);
    msg.is_private = true;
    let sink = ConsoleSink {
        printed: Mutex::new(String::new()),
        interactive,
        report: Mutex::new(None),
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
                    return false;
                }
                interrupted = true;
                assistant.stop(key);
            }
        }
    }
    println!();
    let report = sink.report.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let (Some(report), Some(context)) = (report, context) {
        println!("{}", status(&report, context));
    }
    true
}

fn console_author(user_name: &str) -> Author {
    Author {
        id: Platform::Console.as_str().into(),
        name: user_name.into(),
        roles: Vec::new(),
    }
}

/// The chat on a terminal: the line editor reads, the reply streams, a status line follows.
async fn run_interactive(assistant: Arc<Assistant>, options: ChatOptions) -> anyhow::Result<()> {
    let key = ConversationKey::console(&options.conversation);
    let author = console_author(&options.user_name);
    let mut editor = LineEditor::start("You: ", options.history.clone())?;
    eprintln!("{}", text::chat_welcome(&key.to_string()));
    loop {
        let line = match editor.next().await {
            Input::Line(line) => editor::joined(&line),
            Input::End => return Ok(()),
        };
        if line.trim().is_empty() {
            continue;
        }
        let Some(request) = request_for(&line) else {
            return Ok(());
        };
        let context = Some(options.context_length);
        if !exchange(&assistant, &key, &author, request, true, context).await {
            return Ok(());
        }
    }
}

/// The chat over any line source: one question or command per line, nothing but the answers
/// written (stdin not a terminal), or with prompts when `interactive`.
pub async fn run_with<R: AsyncBufRead + Unpin>(
    assistant: Arc<Assistant>,
    conversation: &str,
    user_name: &str,
    input: R,
    interactive: bool,
) -> anyhow::Result<()> {
    let key = ConversationKey::console(conversation);
    let author = console_author(user_name);
    if interactive {
        eprintln!("{}", text::chat_welcome(&key.to_string()));
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
        if !exchange(&assistant, &key, &author, request, interactive, None).await {
            return Ok(());
        }
    }
}
