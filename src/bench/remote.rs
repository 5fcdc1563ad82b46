//! `synthia-bot bench-remote`: what generating on an inference server through the bot's backend
//! costs next to calling the server directly with the same request, side by side in one run,
//! alternating: time to first token and tokens/s of one reply, and aggregate tokens/s of several
//! conversations at once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use serde::Serialize;

use crate::inference::tokenizer::TextTokenizer;
use crate::inference::{
    GenerationEvent, GenerationRequest, RemoteOptions, RemoteWorker, SamplingParams, Worker,
};

#[derive(Debug, Args)]
pub struct BenchRemoteArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080/v1.
    #[arg(long)]
    pub endpoint: String,
    /// The tokenizer the prompt is counted with (the served model's).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The model name to send, if the server needs one.
    #[arg(long, default_value = "")]
    pub model: String,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens each reply generates (greedy, no stops: every reply runs to this length).
    #[arg(long, default_value_t = 128)]
    pub max_new: usize,
    /// Replies timed each way; medians are reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Conversations at once for the aggregate figures.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub conversations: Vec<usize>,
    #[arg(long)]
    pub json: bool,
}

/// One reply, timed.
#[derive(Debug, Clone, Copy, Serialize)]
struct Timing {
    first_token_s: f64,
    tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Side {
    pub first_token_ms: f64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Aggregate {
    pub conversations: usize,
    pub direct_tokens_per_s: f64,
    pub bot_tokens_per_s: f64,
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct RemoteReport {
    pub endpoint: String,
    pub prompt_tokens: usize,
    pub max_new: usize,
    pub repeats: usize,
    pub direct: Side,
    pub bot: Side,
    /// Bot minus direct, in milliseconds: what our layer adds before the first token.
    pub first_token_overhead_ms: f64,
    /// Bot's tokens/s over direct's.
    pub throughput_ratio: f64,
    pub aggregate: Vec<Aggregate>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A prompt in the Synthia format of about `tokens` tokens.
fn prompt(tokenizer: &TextTokenizer, tokens: usize) -> anyhow::Result<String> {
    let words = [
        "the", "river", "winds", "past", "old", "mills", "and", "quiet", "fields", "where",
    ];
    let mut question = String::new();
    let mut i = 0;
    loop {
        let text = format!("SYSTEM: You are Synthia.\nUSER: {question}\nASSISTANT:");
        if tokenizer.encode(&text, true)?.len() >= tokens {
            return Ok(text);
        }
        question.push_str(words[i % words.len()]);
        question.push(' ');
        i += 1;
    }
}

pub async fn run(args: &BenchRemoteArgs) -> anyhow::Result<RemoteReport> {
    if args.repeats == 0 || args.max_new < 2 {
        bail!("--repeats must be at least 1 and --max-new at least 2");
    }
    let tokenizer =
        Arc::new(TextTokenizer::from_file(&args.tokenizer).context("cannot read --tokenizer")?);
    let text = prompt(&tokenizer, args.prompt_tokens)?;
    let ids = tokenizer.encode(&text, true)?;
    let most = args.conversations.iter().copied().max().unwrap_or(1).max(1);
    let worker: Worker = RemoteWorker::spawn(
        RemoteOptions {
            endpoints: vec![args.endpoint.clone()],
            api_key: String::new(),
            model: args.model.clone(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
            max_in_flight: most,
            busy_wait: Duration::from_secs(60),
            queue_capacity: most * 2,
            context_length: ids.len() + args.max_new + 1,
        },
        tokenizer.clone(),
    )?
    .into();
    let client = reqwest::Client::new();
    let request = |conversation: String| GenerationRequest {
        conversation,
        prompt: ids.clone(),
        prompt_text: Some(text.clone()),
        sampling: SamplingParams::greedy(),
        max_new_tokens: args.max_new,
        stop: Vec::new(),
    };
    let body = serde_json::json!({
        "model": args.model,
        "prompt": text,
        "max_tokens": args.max_new,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "repetition_penalty": 1.0,
        "seed": 0,
        "stop": Vec::<String>::new(),
        "stream": true,
    });
    // Warm-up: the server's first request loads and caches more than later ones.
    direct(&client, &args.endpoint, &body, args.max_new).await?;
    bot(&worker, request("warm-up".into()), args.max_new).await?;
    let (mut d, mut b) = (Vec::new(), Vec::new());
    for i in 0..args.repeats {
        d.push(direct(&client, &args.endpoint, &body, args.max_new).await?);
        b.push(bot(&worker, request(format!("one-{i}")), args.max_new).await?);
    }
    let side = |v: &[Timing]| Side {
        first_token_ms: median(v.iter().map(|t| t.first_token_s * 1e3).collect()),
        tokens_per_s: median(v.iter().map(|t| t.tokens_per_s).collect()),
    };
    let (direct_side, bot_side) = (side(&d), side(&b));
    let mut aggregate = Vec::new();
    // Each size a few times, the two sides alternating, medians kept.
    let rounds = args.repeats.clamp(1, 3);
    for &n in &args.conversations {
        let n = n.max(1);
        let (mut direct_runs, mut bot_runs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let started = Instant::now();
            let runs = (0..n).map(|_| direct(&client, &args.endpoint, &body, args.max_new));
            for r in futures_util::future::join_all(runs).await {
                r?;
            }
            direct_runs.push((n * args.max_new) as f64 / started.elapsed().as_secs_f64());
            let started = Instant::now();
            let runs = (0..n).map(|i| {
                bot(
                    &worker,
                    request(format!("agg-{n}-{round}-{i}")),
                    args.max_new,
                )
            });
            for r in futures_util::future::join_all(runs).await {
                r?;
            }
            bot_runs.push((n * args.max_new) as f64 / started.elapsed().as_secs_f64());
        }
        let (direct_tps, bot_tps) = (median(direct_runs), median(bot_runs));
        aggregate.push(Aggregate {
            conversations: n,
            direct_tokens_per_s: direct_tps,
            bot_tokens_per_s: bot_tps,
            ratio: bot_tps / direct_tps,
        });
    }
    worker.shutdown();
    Ok(RemoteReport {
        endpoint: args.endpoint.clone(),
        prompt_tokens: ids.len(),
        max_new: args.max_new,
        repeats: args.repeats,
        first_token_overhead_ms: bot_side.first_token_ms - direct_side.first_token_ms,
        throughput_ratio: bot_side.tokens_per_s / direct_side.tokens_per_s,
        direct: direct_side,
        bot: bot_side,
        aggregate,
    })
}

/// The server called directly: a plain streamed request, its events read as they come.
async fn direct(
    client: &reqwest::Client,
    endpoint: &str,
    body: &serde_json::Value,
    max_new: usize,
) -> anyhow::Result<Timing> {
    let sent = Instant::now();
    let resp = client
        .post(format!("{}/completions", endpoint.trim_end_matches('/')))
        .json(body)
        .send()
        .await?
        .error_for_status()?;
    let mut bytes = resp.bytes_stream();
    let (mut first, mut last) = (None, None);
    let mut pending = String::new();
    'read: while let Some(chunk) = bytes.next().await {
        pending.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                // As the bot's reply: done when the server says so.
                last = Some(Instant::now());
                break 'read;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            let piece = v["choices"][0]["text"].as_str().unwrap_or_default();
            // As the bot's stream: the reply begins at its first non-blank text.
            if first.is_none() && !piece.trim().is_empty() {
                first = Some(Instant::now());
            }
        }
    }
    timing(sent, first, last, max_new)
}

/// The same request through the bot's backend: queue, dispatcher, client, stop scanning.
async fn bot(worker: &Worker, req: GenerationRequest, max_new: usize) -> anyhow::Result<Timing> {
    let sent = Instant::now();
    let mut handle = worker.submit(req)?;
    let (mut first, mut last) = (None, None);
    while let Some(event) = handle.next().await {
        match event {
            GenerationEvent::Delta(_) => {
                first.get_or_insert_with(Instant::now);
            }
            GenerationEvent::Finished(r) => {
                if let Some(e) = r.error {
                    bail!("the bot's request failed: {e}");
                }
                last = Some(Instant::now());
                break;
            }
            _ => {}
        }
    }
    timing(sent, first, last, max_new)
}

fn timing(
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    max_new: usize,
) -> anyhow::Result<Timing> {
    let (Some(first), Some(last)) = (first, last) else {
        bail!("the reply had no text");
    };
    Ok(Timing {
        first_token_s: (first - sent).as_secs_f64(),
        tokens_per_s: (max_new - 1) as f64 / (last - first).as_secs_f64().max(1e-9),
    })
}

pub fn print(r: &RemoteReport) {
    println!(
        "{} · prompt {} tokens · {} tokens a reply · medians of {}",
        r.endpoint, r.prompt_tokens, r.max_new, r.repeats
    );
    println!("| one reply | direct | through the bot | difference |");
    println!("|---|---|---|---|");
    println!(
        "| time to first token | {:.1} ms | {:.1} ms | {:+.1} ms |",
        r.direct.first_token_ms, r.bot.first_token_ms, r.first_token_overhead_ms
    );
    println!(
        "| tokens/s | {:.1} | {:.1} | {:.3}x |",
        r.direct.tokens_per_s, r.bot.tokens_per_s, r.throughput_ratio
    );
    println!("| conversations | direct tok/s | through the bot tok/s | ratio |");
    println!("|---|---|---|---|");
    for a in &r.aggregate {
        println!(
            "| {} | {:.1} | {:.1} | {:.3}x |",
            a.conversations, a.direct_tokens_per_s, a.bot_tokens_per_s, a.ratio
        );
    }
}
