//! The command line: parsing with clap and running each subcommand.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

pub use crate::app::{init_logging, init_logging_aside, load_settings};
use crate::app::{load_worker, open_store};
use crate::chat::{ConversationKey, Role};
use crate::config::Settings;
use crate::core::{Assistant, Prompter};
use crate::inference::tokenizer::TextTokenizer;
use crate::inference::{self, GenerationEvent, GenerationRequest, SamplingParams};
use crate::memory::{Store, Target};

#[derive(Debug, Parser)]
#[command(
    name = "synthia-bot",
    version,
    about = "A local Synthia-7B for Discord, Matrix and the terminal, with memory"
)]
pub struct Cli {
    /// Configuration file layered over config/default.toml (environment variables
    /// SYNTHIA_BOT__SECTION__KEY override both).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and exit (0 when valid).
    CheckConfig,
    /// Run the bot on the enabled chat platforms until SIGTERM or SIGINT.
    Serve,
    /// Chat in the terminal; the conversation is kept in the database.
    Chat(ChatArgs),
    /// Print the exact prompt the next turn would send (token counts on stderr).
    Prompt(PromptArgs),
    /// Export conversations as JSON Lines.
    Export(ExportArgs),
    /// One raw completion to stdout, for scripts and for checking a model.
    Generate(GenerateArgs),
    /// Measure load time, prefill, decode, cache reuse, concurrency and memory.
    Bench(crate::bench::BenchArgs),
    /// Quantise a safetensors model to GGUF as a first start does, timing it and its memory.
    Quantize(crate::bench::quantize::QuantizeArgs),
    /// Time replies from an inference server through the bot's backend against calling it directly.
    BenchRemote(crate::bench::remote::BenchRemoteArgs),
    /// Time the memory operations on a reply's path on one or more databases, side by side.
    BenchMemory(crate::bench::memory::MemoryBenchArgs),
    /// Copy a whole memory into another database (e.g. SQLite to PostgreSQL); resumable.
    MigrateMemory(MigrateMemoryArgs),
}

#[derive(Debug, Args)]
pub struct MigrateMemoryArgs {
    /// The memory to copy: a SQLite path, `sqlite://…` or `postgres://…` URL. It must exist.
    #[arg(long, value_name = "DATABASE")]
    pub from: String,
    /// Where to copy it: usually a `postgres://…` URL of an empty (or partly copied) database.
    #[arg(long, value_name = "DATABASE")]
    pub to: String,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Conversation name: `console:<NAME>` in the database.
    #[arg(long, default_value = "default")]
    pub conversation: String,
    /// Model directory or .gguf file (overrides model.path).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Log to the screen as `serve` does, instead of to `console.log_file`.
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Conversation key as `export` prints it, e.g. `console:default` or `discord:GUILD:CHANNEL`.
    #[arg(long)]
    pub conversation: String,
    /// Model directory or .gguf file whose tokenizer counts tokens (overrides model.path).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only this conversation; all when omitted.
    #[arg(long)]
    pub conversation: Option<String>,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory or .gguf file (default: model.path from the configuration).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The raw prompt, used as given (BOS is added).
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
}

pub async fn chat(mut settings: Settings, args: ChatArgs) -> anyhow::Result<()> {
    if let Some(model) = args.model {
        settings.model.path = model.display().to_string();
        settings.model.repo.clear();
    }
    let store = open_store(&settings).await?;
    let worker = load_worker(&settings)?;
    let assistant = Arc::new(Assistant::new(store.clone(), worker.clone(), &settings));
    let options = crate::adapters::console::ChatOptions {
        conversation: args.conversation.clone(),
        user_name: settings.console.user_name.clone(),
        history: (!settings.console.history.is_empty())
            .then(|| PathBuf::from(&settings.console.history)),
        context_length: settings.model.context_length as usize,
    };
    let result = crate::adapters::console::run(assistant, options).await;
    worker.shutdown();
    store.close().await;
    result
}

/// The tokenizer the configured model uses, without loading its weights (fetched from the hub
/// cache when only a repo is named), and the window prompts are built for.
fn tokenizer_for(settings: &Settings) -> anyhow::Result<(Arc<TextTokenizer>, usize)> {
    let m = &settings.model;
    let tokenizer = inference::load::tokenizer_from_settings(m)
        .context("cannot load the model's tokenizer to count the prompt")?;
    // The model's own window may be smaller than the configured one, as the worker also finds.
    let context = inference::load::declared_context(Path::new(&m.path))
        .filter(|_| !m.path.is_empty())
        .map_or(m.context_length as usize, |max| {
            max.min(m.context_length as usize)
        });
    Ok((Arc::new(tokenizer), context))
}

pub async fn prompt(mut settings: Settings, args: PromptArgs) -> anyhow::Result<()> {
    if let Some(model) = args.model {
        settings.model.path = model.display().to_string();
    }
    let key: ConversationKey = args.conversation.parse()?;
    let (tokenizer, context_length) = tokenizer_for(&settings)?;
    let store = open_store(&settings).await?;
    let Some(conv) = store.find_conversation(&key).await? else {
        bail!("no conversation {key} in {}", settings.memory.database);
    };
    let prompter = Prompter {
        tokenizer,
        context_length,
        settings: settings.prompt.clone(),
        default_max_new_tokens: settings.model.max_new_tokens,
    };
    // The prompt the newest unanswered question gets, or else the one the next message will get
    // (shown with an empty message after the last `USER:`).
    let history = store.since_reset(&conv).await?;
    let unanswered = history
        .last()
        .filter(|m| m.role == Role::User)
        .map(|m| m.id);
    let extra = match unanswered {
        Some(_) => None,
        None => Some(crate::prompt::Turn {
            id: i64::MAX,
            exchange: i64::MAX,
            role: Role::User,
            speaker: None,
            content: String::new(),
            cached: None,
        }),
    };
    let prepared = prompter
        .prepare(&store, &conv, unanswered, extra, false)
        .await?;
    store.close().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", prepared.built.text)?;
    eprintln!(
        "tokens: {} (with BOS) + up to {} for the reply, of {}; turns trimmed: {}{}",
        prepared.built.token_count(),
        prepared.max_new_tokens,
        context_length,
        prepared.built.trimmed_turns,
        if unanswered.is_none() {
            "; the next message goes after the last `USER:`"
        } else {
            ""
        }
    );
    Ok(())
}

pub async fn export(settings: Settings, args: ExportArgs) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    let conversations = match &args.conversation {
        Some(k) => {
            let key: ConversationKey = k.parse()?;
            match store.find_conversation(&key).await? {
                Some(c) => vec![c],
                None => bail!("no conversation {key} in {}", settings.memory.database),
            }
        }
        None => store.conversations().await?,
    };
    let mut sink: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot write {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut count = 0;
    for conv in conversations {
        for exchange in store.exchanges(&conv).await? {
            serde_json::to_writer(&mut sink, &exchange)?;
            sink.write_all(b"\n")?;
            count += 1;
        }
    }
    sink.flush()?;
    store.close().await;
    tracing::info!(exchanges = count, "exported");
    Ok(())
}

/// Copies every conversation, message, setting and boundary from one memory into another, one
/// transaction per conversation; run again after an interruption, it copies what is missing.
/// Ends by comparing the counts on both sides.
pub async fn migrate_memory(settings: Settings, args: MigrateMemoryArgs) -> anyhow::Result<()> {
    let from_target = Target::parse(&args.from).map_err(|e| anyhow::anyhow!("--from {e}"))?;
    let to_target = Target::parse(&args.to).map_err(|e| anyhow::anyhow!("--to {e}"))?;
    if from_target == to_target {
        bail!("--from and --to name the same database ({from_target})");
    }
    if let Target::SqlitePath(path) = &from_target
        && !path.exists()
    {
        bail!("--from {}: no such file", path.display());
    }
    let lock_timeout = std::time::Duration::from_millis(u64::from(settings.memory.busy_timeout_ms));
    let from = Store::open(&args.from, lock_timeout)
        .await
        .with_context(|| format!("cannot open --from {from_target}"))?;
    let to = Store::open(&args.to, lock_timeout)
        .await
        .with_context(|| format!("cannot open --to {to_target}"))?;
    let report = from
        .copy_into(&to, |conversation, copied| {
            tracing::info!(conversation, copied, "conversation");
        })
        .await;
    from.close().await;
    to.close().await;
    let report = report.with_context(|| format!("copying {from_target} into {to_target}"))?;
    println!(
        "copied {} conversations ({} were already there); both hold {} conversations and {} messages",
        report.copied, report.skipped, report.conversations, report.messages
    );
    Ok(())
}

pub async fn generate(settings: Settings, args: GenerateArgs) -> anyhow::Result<()> {
    let mut model_settings = settings.model.clone();
    if let Some(model) = &args.model {
        model_settings.path = model.display().to_string();
        model_settings.repo.clear();
    }
    let worker = load_worker(&Settings {
        model: model_settings,
        ..settings.clone()
    })?;
    let prompt = worker.tokenizer().encode(&args.prompt, true)?;
    let mut sampling = SamplingParams::from_settings(&settings.sampling);
    if let Some(t) = args.temperature {
        sampling.temperature = t;
    }
    if let Some(s) = args.seed {
        sampling.seed = s;
    }
    let mut handle = worker.submit(GenerationRequest {
        conversation: "generate".into(),
        prompt,
        prompt_text: Some(args.prompt.clone()),
        sampling,
        max_new_tokens: args
            .max_new_tokens
            .unwrap_or(settings.model.max_new_tokens as usize),
        stop: Vec::new(),
    })?;
    let mut out = std::io::stdout();
    while let Some(ev) = handle.next().await {
        match ev {
            GenerationEvent::Delta(d) => {
                out.write_all(d.as_bytes())?;
                out.flush()?;
            }
            GenerationEvent::Finished(r) => {
                writeln!(out)?;
                if let Some(e) = r.error {
                    bail!("generation failed: {e}");
                }
                eprintln!(
                    "finish: {:?}; prompt {} tokens, completion {} tokens, decode {:.1} tokens/s",
                    r.finish,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.completion_tokens as f64 / r.decode_time.as_secs_f64().max(1e-9)
                );
                break;
            }
            _ => {}
        }
    }
    worker.shutdown();
    Ok(())
}
