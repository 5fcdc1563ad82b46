//! Every sentence the bot says to users, in one place.

use crate::chat::CommandError;

pub const HELP: &str = concat!(
    "I'm Synthia. Mention me or write to me directly and I'll answer; I remember this conversation.\n",
    "Commands (start them with this chat's prefix, e.g. /reset or !reset):\n",
    "  ask <question>   ask a question\n",
    "  reset            start afresh (earlier messages stay in the log but leave my memory)\n",
    "  forget           delete this conversation's history for good\n",
    "  system [text]    show or set my instructions for this conversation\n",
    "  set temperature <0-5>, set max_tokens <n>   change how I answer here\n",
    "  stop             stop the reply I'm writing",
);

pub const NOT_ALLOWED: &str = "Sorry, only an admin can do that here.";
pub const RESET_DONE: &str =
    "Done: I've started afresh. Earlier messages no longer shape my answers.";
pub const FORGET_DONE: &str = "Done: this conversation's history is deleted.";
pub const NOTHING_TO_STOP: &str = "I'm not writing anything right now.";
pub const STOPPED: &str = "Stopped.";
pub const BUSY: &str = "I'm handling too many questions right now. Please try again in a minute.";
pub const UNAVAILABLE: &str =
    "The language model isn't available right now. An operator has been told.";
pub const SERVERS_DOWN: &str = "I can't reach the language model right now, so I couldn't answer. Your message is kept; please ask again in a little while.";
pub const FAILED: &str = "Something went wrong while I was answering. Please try again.";
pub const STORAGE_FAILED: &str =
    "I couldn't save your message, so I won't answer it yet. Please try again shortly.";
pub const EMPTY: &str = "Your message is empty; ask me something.";
pub const CANCELLED_SUFFIX: &str = " … (stopped)";
pub const RESTARTED: &str = "I restarted before I could answer this, and it's too long ago to take up now. Please ask again.";

/// A reply stopped by `/stop` (or a delete), as it is shown.
pub fn cancelled(reply: &str) -> String {
    format!("{reply}{CANCELLED_SUFFIX}")
}

/// A failure shown after what was written so far, or alone when nothing was.
pub fn failed_after(written: &str, message: &str) -> String {
    if written.is_empty() {
        message.to_string()
    } else {
        format!("{written}\n\n⚠️ {message}")
    }
}

/// The terminal chat's first line.
pub fn chat_welcome(conversation: &str) -> String {
    format!(
        "synthia-bot chat: conversation {conversation}. /help lists commands, Tab completes them; end a line with \\ to go on, Ctrl-C stops a reply, Ctrl-D or /quit leaves."
    )
}

/// The terminal chat, after Ctrl-C at its prompt.
pub const CHAT_QUIT_HINT: &str = "(Ctrl-D or /quit leaves the chat)";

/// The terminal chat's line after each reply: its length, its speed, and how full the context
/// window is.
pub fn chat_status(
    tokens: usize,
    per_second: Option<f64>,
    context_used: usize,
    context: usize,
) -> String {
    let speed = per_second.map_or(String::new(), |s| format!(", {s:.1} tokens/s"));
    format!("[{tokens} tokens{speed}, context {context_used} of {context}]")
}

pub fn rate_limited(seconds: u64) -> String {
    format!("You're sending messages faster than I can answer. Try again in {seconds} s.")
}

pub fn too_long(chars: usize, limit: usize) -> String {
    format!(
        "Your message is too long ({chars} characters; the limit is {limit}). Please shorten it."
    )
}

pub fn cut(chars: usize) -> String {
    format!(
        "Your message was too long for my memory, so I only read its beginning ({chars} characters left out)."
    )
}

pub fn queued(position: usize) -> String {
    format!("You're number {position} in the queue; I'll answer as soon as I can.")
}

pub fn system_is(system: &str, custom: bool) -> String {
    if custom {
        format!("My instructions here: {system}")
    } else {
        format!("My instructions here (the default): {system}")
    }
}

pub fn system_set(system: &str) -> String {
    format!("Instructions for this conversation set to: {system}")
}

pub fn temperature_set(v: f64) -> String {
    format!("Temperature for this conversation set to {v}.")
}

pub fn max_tokens_set(v: u32, effective: u32) -> String {
    if v == effective {
        format!("Replies here may now be up to {v} tokens long.")
    } else {
        format!(
            "Replies here may now be up to {effective} tokens long ({v} is more than the model allows)."
        )
    }
}

pub fn bad_command(e: &CommandError) -> String {
    format!("I didn't understand that: {e}. Try `help`.")
}

/// Said (at most hourly per room) when an encrypted message could not be read.
pub const UNDECRYPTABLE: &str = "I couldn't decrypt a message here, so I can't answer it. If you wrote to me, please verify my session or send it again.";
