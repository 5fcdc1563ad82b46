//! `synthia-bot bench`: load time, prefill and decode speed, what the conversation cache saves
//! on a follow-up turn, throughput with concurrent conversations, and peak memory. It drives the
//! engine from outside, like any other caller.

pub mod memory;
pub mod quantize;
pub mod random_model;
pub mod remote;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::DType;
use clap::Args;

pub use report::{BenchReport, ConcurrencyFigure, print_human};

use self::random_model::GgufPreset;
use crate::config::{CpuWeights, DTypeChoice, DeviceChoice};
use crate::inference::model::argmax;
use crate::inference::tokenizer::TextTokenizer;
use crate::inference::{
    GenerationEvent, GenerationRequest, LlamaShape, LoadOptions, SamplingParams, WeightFormat,
    Worker, WorkerOptions, load,
};

/// Where random-weight models come from and go.
#[derive(Debug, Args)]
pub struct RandomFiles {
    /// Tokenizer for random models.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "tests/fixtures/llama2-tokenizer/tokenizer.json"
    )]
    pub tokenizer: PathBuf,
    /// Where random models are written and reused.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model directory or .gguf file to measure.
    #[arg(long, value_name = "PATH", conflicts_with = "random")]
    pub model: Option<PathBuf>,
    /// Write (once, seeded) and measure a random-weight model of this shape.
    #[arg(long, value_parser = ["tiny", "small", "7b"])]
    pub random: Option<String>,
    /// With --random: write it as GGUF of this type instead of safetensors.
    #[arg(long, value_parser = ["q4_k_m", "q8_0", "f16", "f32"], requires = "random")]
    pub gguf: Option<String>,
    #[command(flatten)]
    pub random_files: RandomFiles,
    /// CPU threads (default: model.threads from the configuration).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_parser = ["auto", "cpu", "cuda"], default_value = "auto")]
    pub device: String,
    /// Safetensors dtype on the device.
    #[arg(long, value_parser = ["auto", "f32", "f16", "bf16"], default_value = "auto")]
    pub dtype: String,
    /// How a CPU model multiplies quantised weights (`model.cpu_weights`).
    #[arg(long, value_parser = ["auto", "repacked", "compact"], default_value = "auto")]
    pub cpu_weights: String,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Concurrent conversations to measure, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Measure concurrency only without batching (one conversation per pass over the weights).
    #[arg(long)]
    pub no_batching: bool,
    /// Also time candle-transformers' stock Llama on the same safetensors weights, as a
    /// reference for our forward pass.
    #[arg(long)]
    pub reference: bool,
    /// Only prefill, decode and the concurrency figures (batched): what a side-by-side run
    /// with another engine compares (`scripts/bench-vs-llama-cpp`).
    #[arg(long)]
    pub speed_only: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Total length of the union of time intervals.
fn covered(mut spans: Vec<(f64, f64)>) -> f64 {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut current: Option<(f64, f64)> = None;
    for (from, to) in spans {
        match current {
            Some((cf, ct)) if from <= ct => current = Some((cf, ct.max(to))),
            Some((cf, ct)) => {
                total += ct - cf;
                current = Some((from, to));
            }
            None => current = Some((from, to)),
        }
    }
    if let Some((cf, ct)) = current {
        total += ct - cf;
    }
    total
}

fn parameters(shape: &LlamaShape) -> usize {
    let h = shape.hidden_size;
    let kv = shape.num_kv_heads * shape.head_dim;
    let q = shape.num_heads * shape.head_dim;
    let layer = h * q * 2 + h * kv * 2 + 3 * h * shape.intermediate_size + 2 * h;
    2 * shape.vocab_size * h + shape.num_layers * layer + h
}

/// Peak resident memory of this process, from the kernel.
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now.
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

pub(crate) fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The seed of the benchmarks' random models.
const RANDOM_SEED: u64 = 20_240_601;

fn write_random_once(args: &BenchArgs, shape_name: &str) -> anyhow::Result<PathBuf> {
    let shape = random_model::named_shape(shape_name).context("unknown shape")?;
    if !args.random_files.tokenizer.exists() {
        bail!(
            "tokenizer {} not found; pass --tokenizer with the Llama-2 tokenizer.json",
            args.random_files.tokenizer.display()
        );
    }
    let dir = args.random_files.dir.clone().unwrap_or_else(default_dir);
    std::fs::create_dir_all(&dir)?;
    match &args.gguf {
        Some(preset) => {
            let folder = dir.join(format!(
                "{shape_name}-{preset}-v{}",
                random_model::GENERATOR_VERSION
            ));
            let file = folder.join("model.gguf");
            if !file.exists() {
                std::fs::create_dir_all(&folder)?;
                eprintln!(
                    "writing random {shape_name} model as GGUF {preset} to {}",
                    file.display()
                );
                let p = GgufPreset::parse(preset).context("unknown GGUF type")?;
                random_model::write_gguf(
                    &file,
                    &shape,
                    RANDOM_SEED,
                    p,
                    &args.random_files.tokenizer,
                )?;
                std::fs::copy(&args.random_files.tokenizer, folder.join("tokenizer.json"))?;
            }
            Ok(file)
        }
        None => {
            let folder = dir.join(format!(
                "{shape_name}-safetensors-v{}",
                random_model::GENERATOR_VERSION
            ));
            if !folder.join("model.safetensors").exists() {
                eprintln!("writing random {shape_name} model to {}", folder.display());
                let dtype = if shape_name == "7b" {
                    DType::F16
                } else {
                    DType::F32
                };
                random_model::write_hf_dir(
                    &folder,
                    &shape,
                    RANDOM_SEED,
                    &args.random_files.tokenizer,
                    1,
                    dtype,
                )?;
            }
            Ok(folder)
        }
    }
}

/// Prompt ids of exactly `n` tokens (BOS first) from ordinary English text.
fn synthetic_prompt(tok: &TextTokenizer, n: usize) -> anyhow::Result<Vec<u32>> {
    let para = "The river ran through the valley, past farms and mills, and the people who lived along it \
                told stories of floods and droughts, of harvests and of the long winters when the water froze. ";
    let mut ids = vec![tok.bos()];
    while ids.len() < n {
        ids.extend(tok.encode(para, false)?);
    }
    ids.truncate(n);
    Ok(ids)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let path = match (&args.model, &args.random) {
        (Some(p), _) => p.clone(),
        (None, Some(shape)) => write_random_once(args, shape)?,
        (None, None) => bail!("pass --model PATH or --random tiny|small|7b"),
    };
    let opts = LoadOptions {
        device: match args.device.as_str() {
            "cpu" => DeviceChoice::Cpu,
            "cuda" => DeviceChoice::Cuda,
            _ => DeviceChoice::Auto,
        },
        dtype: match args.dtype.as_str() {
            "f32" => DTypeChoice::F32,
            "f16" => DTypeChoice::F16,
            "bf16" => DTypeChoice::Bf16,
            _ => DTypeChoice::Auto,
        },
        tokenizer: None,
        cpu_weights: match args.cpu_weights.as_str() {
            "repacked" => CpuWeights::Repacked,
            "compact" => CpuWeights::Compact,
            _ => CpuWeights::Auto,
        },
        ..LoadOptions::default()
    };
    let t0 = Instant::now();
    let loaded = load(&path, &opts)?;
    let load_s = t0.elapsed().as_secs_f64();
    let load_rss_bytes = rss_bytes();
    let model = &loaded.model;
    let compact_weights = model.compact_weights();
    let tok = loaded.tokenizer.clone();
    let ctx = model.shape.max_position;

    // The first forward repacks quantised weights for the CPU kernels, once (the worker does
    // it at start-up): timed apart, so the prefill figure below is what every prompt gets.
    let t = Instant::now();
    model.warm_up()?;
    let warmup = t.elapsed();
    // Prefill, then decode greedily from it (ignoring end-of-sequence: this measures speed).
    let room = ctx.saturating_sub(args.decode_tokens + 1).max(1);
    let prompt = synthetic_prompt(&tok, args.prompt_tokens.min(room))?;
    let mut cache = model.new_cache();
    let t = Instant::now();
    let (mut logits, _) = model.prefill(&prompt, &mut cache, 512)?;
    let prefill = t.elapsed();
    let t = Instant::now();
    for _ in 0..args.decode_tokens {
        let next = argmax(&logits)?;
        logits = model.forward(&[next], &mut cache)?;
    }
    let decode = t.elapsed();
    let model_rss_bytes = rss_bytes();

    // A 30-token follow-up on a 1,000-token history, with and without the cached history.
    let (ttft_cached, ttft_uncached) = if args.speed_only {
        (Duration::ZERO, Duration::ZERO)
    } else {
        let history = synthetic_prompt(&tok, 1000.min(ctx - 64))?;
        let follow: Vec<u32> = history
            .iter()
            .copied()
            .chain(synthetic_prompt(&tok, 31)?.into_iter().skip(1))
            .collect();
        let mut cached = model.new_cache();
        model.prefill(&history, &mut cached, 512)?;
        let t = Instant::now();
        let (l, _) = model.prefill(&follow, &mut cached, 512)?;
        argmax(&l)?;
        let ttft_cached = t.elapsed();
        let mut fresh = model.new_cache();
        let t = Instant::now();
        let (l, _) = model.prefill(&follow, &mut fresh, 512)?;
        argmax(&l)?;
        (ttft_cached, t.elapsed())
    };
    drop(cache);

    let reference = match (&loaded.format, args.reference) {
        (WeightFormat::Safetensors { dtype, files: 1 }, true) => Some(reference_decode(
            &path,
            *dtype,
            model.device(),
            &prompt,
            args.decode_tokens,
        )?),
        _ => None,
    };

    let shape = model.shape.clone();
    let device = format!("{:?}", model.device());
    let format = format!("{:?}", loaded.format);
    let weight_bytes = loaded.weight_bytes;
    let max_batch = args.concurrency.iter().copied().max().unwrap_or(1).max(9);
    let worker = Worker::spawn(
        loaded,
        WorkerOptions {
            queue_capacity: 256,
            context_length: ctx,
            max_batch,
            ..WorkerOptions::default()
        },
    );
    let short = synthetic_prompt(&tok, 64)?;
    let request = |name: String, max_new: usize| GenerationRequest {
        conversation: name,
        prompt: short.clone(),
        prompt_text: None,
        sampling: SamplingParams::greedy(),
        max_new_tokens: max_new,
        stop: Vec::new(),
    };
    let modes: &[bool] = if args.no_batching {
        &[false]
    } else if args.speed_only {
        &[true]
    } else {
        &[true, false]
    };
    let mut concurrency = Vec::new();
    for &batched in modes {
        worker.set_max_batch(if batched { max_batch } else { 1 });
        for &n in &args.concurrency {
            let t = Instant::now();
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    worker.submit(request(
                        format!("bench-{batched}-{n}-{i}"),
                        args.decode_tokens,
                    ))
                })
                .collect::<Result<_, _>>()?;
            let mut tokens = 0;
            let mut per = Vec::new();
            let mut decoding = Vec::new();
            for h in handles {
                let r = h.blocking_finish();
                tokens += r.completion_tokens;
                let spent = r.queue_time + r.prefill_time + r.decode_time;
                per.push(r.completion_tokens as f64 / spent.as_secs_f64().max(1e-9));
                let from = (r.queue_time + r.prefill_time).as_secs_f64();
                decoding.push((from, from + r.decode_time.as_secs_f64()));
            }
            let wall = t.elapsed();
            concurrency.push(ConcurrencyFigure {
                conversations: n,
                batched,
                aggregate_tokens_per_s: tokens as f64 / wall.as_secs_f64(),
                aggregate_decode_tokens_per_s: tokens as f64 / covered(decoding).max(1e-9),
                per_conversation_tokens_per_s: per.iter().sum::<f64>() / per.len().max(1) as f64,
            });
        }
    }
    let join_ttft_ms = if args.no_batching || args.speed_only {
        None
    } else {
        worker.set_max_batch(max_batch);
        let mut running: Vec<_> = (0..8)
            .map(|i| worker.submit(request(format!("bench-join-{i}"), ctx)))
            .collect::<Result<_, _>>()?;
        // Wait until all eight are decoding.
        for h in running.iter_mut() {
            while let Some(ev) = h.blocking_next() {
                if matches!(ev, GenerationEvent::Delta(_) | GenerationEvent::Finished(_)) {
                    break;
                }
            }
        }
        let joined = worker
            .submit(request("bench-join-new".into(), 4))?
            .blocking_finish();
        drop(running);
        joined
            .time_to_first_token
            .map(|t| (t + joined.queue_time).as_secs_f64() * 1e3)
    };
    worker.shutdown();
    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    Ok(BenchReport {
        model: path.display().to_string(),
        format,
        device,
        threads: std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            }),
        parameters: parameters(&shape),
        weight_bytes,
        load_s,
        warmup_s: warmup.as_secs_f64(),
        prefill_tokens: prompt.len(),
        prefill_tokens_per_s: per_s(prompt.len(), prefill),
        decode_tokens: args.decode_tokens,
        decode_tokens_per_s: per_s(args.decode_tokens, decode),
        reference_decode_tokens_per_s: reference,
        follow_up_ttft_cached_ms: ttft_cached.as_secs_f64() * 1e3,
        follow_up_ttft_uncached_ms: ttft_uncached.as_secs_f64() * 1e3,
        cache_speedup: ttft_uncached.as_secs_f64() / ttft_cached.as_secs_f64().max(1e-9),
        concurrency,
        join_ttft_ms,
        load_rss_bytes,
        compact_weights,
        model_rss_bytes,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Decode speed of candle-transformers' own Llama with its own cache, for comparison.
fn reference_decode(
    dir: &std::path::Path,
    dtype: DType,
    device: &candle_core::Device,
    prompt: &[u32],
    steps: usize,
) -> anyhow::Result<f64> {
    use candle_transformers::models::llama as stock;
    let cfg: stock::LlamaConfig = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let cfg = cfg.into_config(false);
    // SAFETY: read-only memory map of a file we do not modify.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            dtype,
            device,
        )?
    };
    let llama = stock::Llama::load(vb, &cfg)?;
    let mut cache = stock::Cache::new(true, dtype, &cfg, device)?;
    let input = candle_core::Tensor::new(prompt, device)?.unsqueeze(0)?;
    let mut logits = llama.forward(&input, 0, &mut cache)?.squeeze(0)?;
    let t = Instant::now();
    for i in 0..steps {
        let next = logits.argmax(0)?.to_scalar::<u32>()?;
        let input = candle_core::Tensor::new(&[next], device)?.unsqueeze(0)?;
        logits = llama
            .forward(&input, prompt.len() + i, &mut cache)?
            .squeeze(0)?;
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

/// Where `bench --random` keeps its models unless told otherwise.
pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("synthia-bot-bench")
}
