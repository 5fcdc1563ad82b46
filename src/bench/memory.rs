//! `synthia-bot bench-memory`: the store operations on a reply's path, timed side by side on
//! each database given (SQLite and PostgreSQL, say), with one and with many conversations at
//! once. Each conversation starts with a history of about 4,000 tokens; each round is what a
//! reply does to memory: find the conversation, store the question, take the conversation's
//! turn, load the history for the prompt, and (after generation, which is not timed) store the
//! reply.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::chat::ConversationKey;
use crate::memory::{Appended, NewUserTurn, Status, Store};

#[derive(Debug, Args)]
pub struct MemoryBenchArgs {
    /// A database to measure (SQLite path, `sqlite://` or `postgres://` URL); give it again for
    /// each database to compare. Use throw-away databases: the benchmark writes conversations.
    #[arg(long = "database", value_name = "DATABASE", required = true)]
    pub databases: Vec<String>,
    /// Concurrent conversations to measure, comma-separated.
    #[arg(long, default_value = "1,50", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Replies per conversation.
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Characters of history each conversation starts with (about 4 per token).
    #[arg(long, default_value_t = 16_000)]
    pub history_chars: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles of one operation, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

/// One database at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigure {
    pub database: String,
    pub backend: String,
    pub concurrency: usize,
    /// Finding the conversation and storing the question.
    pub append_user: Latency,
    /// The conversation's turn (across daemons on PostgreSQL).
    pub take_turn: Latency,
    /// Loading the history since the last reset (about 4,000 tokens and growing).
    pub load_context: Latency,
    /// Storing the reply.
    pub store_reply: Latency,
    /// All a message spends in memory before generation starts: the first three together.
    pub before_generation: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub history_chars: usize,
    pub rounds: usize,
    pub figures: Vec<MemoryFigure>,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    Latency {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        samples: samples.len(),
    }
}

#[derive(Default)]
struct Samples {
    append_user: Vec<Duration>,
    take_turn: Vec<Duration>,
    load_context: Vec<Duration>,
    store_reply: Vec<Duration>,
    before_generation: Vec<Duration>,
}

impl Samples {
    fn extend(&mut self, other: Samples) {
        self.append_user.extend(other.append_user);
        self.take_turn.extend(other.take_turn);
        self.load_context.extend(other.load_context);
        self.store_reply.extend(other.store_reply);
        self.before_generation.extend(other.before_generation);
    }
}

/// A history of about `chars` characters in exchanges of about 400.
async fn fill(store: &Store, key: &ConversationKey, chars: usize) -> anyhow::Result<()> {
    let conv = store.conversation(key).await?;
    let sentence = "The quick brown fox jumps over the lazy dog while the bot remembers. ";
    let text: String = sentence.repeat(200 / sentence.len() + 1);
    for _ in 0..chars.div_ceil(400) {
        let turn = NewUserTurn {
            author_id: "bench",
            author_name: "bench",
            content: &text,
            platform_message_id: None,
        };
        let Appended::New(q) = store.append_user(&conv, &turn).await? else {
            anyhow::bail!("a turn without a platform id was taken for a duplicate");
        };
        store
            .append_assistant(&conv, Some(q), &text, Status::Complete, None)
            .await?;
    }
    Ok(())
}

async fn conversation_rounds(
    store: Store,
    key: ConversationKey,
    rounds: usize,
) -> anyhow::Result<Samples> {
    let mut s = Samples::default();
    let question = "What did we talk about a moment ago, and what should we do next?";
    let reply = "We talked about foxes and dogs; next we should measure the memory again.";
    for _ in 0..rounds {
        let t0 = Instant::now();
        let conv = store.conversation(&key).await?;
        let turn = NewUserTurn {
            author_id: "bench",
            author_name: "bench",
            content: question,
            platform_message_id: None,
        };
        let Appended::New(q) = store.append_user(&conv, &turn).await? else {
            anyhow::bail!("a turn without a platform id was taken for a duplicate");
        };
        let t1 = Instant::now();
        let shared_turn = store.take_turn(conv.id).await?;
        let t2 = Instant::now();
        let history = store.since_reset(&conv).await?;
        let t3 = Instant::now();
        anyhow::ensure!(!history.is_empty(), "the history did not load");
        let t4 = Instant::now();
        store
            .append_assistant(&conv, Some(q), reply, Status::Complete, None)
            .await?;
        let t5 = Instant::now();
        drop(shared_turn);
        s.append_user.push(t1 - t0);
        s.take_turn.push(t2 - t1);
        s.load_context.push(t3 - t2);
        s.store_reply.push(t5 - t4);
        s.before_generation.push(t3 - t0);
    }
    Ok(s)
}

pub async fn run(args: &MemoryBenchArgs) -> anyhow::Result<MemoryReport> {
    let mut figures = Vec::new();
    let stamp = crate::memory::now_ms();
    for database in &args.databases {
        let shown = crate::memory::redact_password(database);
        let store = Store::open(database, Duration::from_secs(5))
            .await
            .with_context(|| format!("opening {shown}"))?;
        for &concurrency in &args.concurrency {
            let keys: Vec<ConversationKey> = (0..concurrency)
                .map(|i| ConversationKey::console(&format!("bench-{stamp}-{concurrency}-{i}")))
                .collect();
            for key in &keys {
                fill(&store, key, args.history_chars).await?;
            }
            let mut tasks = tokio::task::JoinSet::new();
            for key in keys {
                tasks.spawn(conversation_rounds(store.clone(), key, args.rounds));
            }
            let mut all = Samples::default();
            while let Some(done) = tasks.join_next().await {
                all.extend(done??);
            }
            figures.push(MemoryFigure {
                database: shown.clone(),
                backend: store.backend().to_string(),
                concurrency,
                append_user: latency(all.append_user),
                take_turn: latency(all.take_turn),
                load_context: latency(all.load_context),
                store_reply: latency(all.store_reply),
                before_generation: latency(all.before_generation),
            });
        }
        store.close().await;
    }
    Ok(MemoryReport {
        history_chars: args.history_chars,
        rounds: args.rounds,
        figures,
    })
}

/// Which latency of a figure a row of the table shows.
type Pick = fn(&MemoryFigure) -> &Latency;

/// A table per concurrency: each operation's p50 / p99 on each database, and each database's
/// p50 as a ratio to the first's.
pub fn print_human(report: &MemoryReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "memory on a reply's path: {} replies per conversation, each starting with {} characters of history (p50 / p99 ms)",
        report.rounds, report.history_chars
    )?;
    let mut levels: Vec<usize> = report.figures.iter().map(|f| f.concurrency).collect();
    levels.dedup();
    levels.sort_unstable();
    levels.dedup();
    for level in levels {
        let figures: Vec<&MemoryFigure> = report
            .figures
            .iter()
            .filter(|f| f.concurrency == level)
            .collect();
        writeln!(out, "\n{level} conversation(s) at once")?;
        write!(out, "{:<20}", "operation")?;
        for f in &figures {
            write!(out, " {:>22}", f.backend)?;
        }
        if figures.len() > 1 {
            write!(out, "  p50 ratio to {}", figures[0].backend)?;
        }
        writeln!(out)?;
        let rows: [(&str, Pick); 5] = [
            ("append user turn", |f| &f.append_user),
            ("take turn", |f| &f.take_turn),
            ("load context", |f| &f.load_context),
            ("store reply", |f| &f.store_reply),
            ("before generation", |f| &f.before_generation),
        ];
        for (name, pick) in rows {
            write!(out, "{name:<20}")?;
            for f in &figures {
                let l = pick(f);
                write!(out, " {:>22}", format!("{:.2} / {:.2}", l.p50_ms, l.p99_ms))?;
            }
            if figures.len() > 1 {
                let base = pick(figures[0]).p50_ms;
                let ratios: Vec<String> = figures[1..]
                    .iter()
                    .map(|f| {
                        // Below 10 µs (SQLite's turn, which is granted at once) a ratio means
                        // nothing.
                        if base >= 0.01 {
                            format!("{:.2}x", pick(f).p50_ms / base)
                        } else {
                            "-".into()
                        }
                    })
                    .collect();
                write!(out, "  {}", ratios.join(" "))?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_sample() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = latency(samples);
        assert_eq!((l.p50_ms, l.p99_ms, l.samples), (50.0, 99.0, 100));
        assert_eq!(latency(vec![Duration::from_millis(7)]).p99_ms, 7.0);
    }

    #[tokio::test]
    async fn measures_a_sqlite_memory() {
        let dir = tempfile::tempdir().unwrap();
        let args = MemoryBenchArgs {
            databases: vec![dir.path().join("bench.sqlite").display().to_string()],
            concurrency: vec![1, 3],
            rounds: 4,
            history_chars: 2_000,
            json: false,
        };
        let report = run(&args).await.unwrap();
        assert_eq!(report.figures.len(), 2);
        assert_eq!(report.figures[1].load_context.samples, 12);
        assert!(report.figures[0].before_generation.p50_ms > 0.0);
        let mut text = Vec::new();
        print_human(&report, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("3 conversation(s) at once"), "{text}");
        assert!(text.contains("load context"), "{text}");
    }
}
