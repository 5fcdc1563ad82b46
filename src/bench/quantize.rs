//! `synthia-bot quantize`: the quantised copy a first start makes, made on purpose and measured:
//! the time, the peak memory (a 7B model must quantise within 24 GiB: one tensor at a time), the
//! file's size and tensor types, and the time to load it afterwards.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::random_model;
use super::{peak_rss_bytes, proc_status_bytes};
use crate::inference::load::quantize::{Quantization, Source, quantized_copy};
use crate::inference::{LoadOptions, WeightFormat, load};

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (config.json, tokenizer.json, safetensors).
    #[arg(long, value_name = "DIR", conflicts_with = "random")]
    pub model: Option<PathBuf>,
    /// Write (once, seeded) a random-weight safetensors model of this shape and quantise it.
    #[arg(long, value_parser = ["tiny", "small", "7b"])]
    pub random: Option<String>,
    /// The type to write; f16 is a dense copy (for other tools' quantisers).
    #[arg(long, value_parser = ["q4_k_m", "q8_0", "f16"], default_value = "q4_k_m")]
    pub to: String,
    /// Folder for the copy.
    #[arg(long, value_name = "DIR", default_value = "data/quantized")]
    pub out: PathBuf,
    #[command(flatten)]
    pub random_files: super::RandomFiles,
    /// Threads quantising (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct QuantizeReport {
    pub source: String,
    pub file: String,
    pub quantization: String,
    pub reused: bool,
    pub file_bytes: u64,
    pub quantize_s: f64,
    /// Peak resident memory while quantising, including pages of the mapped source files.
    pub quantize_peak_rss_bytes: u64,
    /// Peak anonymous memory while quantising (sampled every 50 ms): what the process holds.
    pub quantize_peak_anon_bytes: u64,
    /// Time to load the copy (not measured for the dense f16 copy: 27 GB once expanded).
    pub load_s: Option<f64>,
    pub types: String,
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<QuantizeReport> {
    let dir = match (&args.model, &args.random) {
        (Some(p), _) => p.clone(),
        (None, Some(shape_name)) => {
            let shape = random_model::named_shape(shape_name).context("unknown shape")?;
            let base = args
                .random_files
                .dir
                .clone()
                .unwrap_or_else(super::default_dir);
            let folder = base.join(format!(
                "{shape_name}-safetensors-f16-v{}",
                random_model::GENERATOR_VERSION
            ));
            if !folder.join("model.safetensors").exists() {
                eprintln!(
                    "writing random {shape_name} model (f16) to {}",
                    folder.display()
                );
                random_model::write_hf_dir(
                    &folder,
                    &shape,
                    super::RANDOM_SEED,
                    &args.random_files.tokenizer,
                    1,
                    candle_core::DType::F16,
                )?;
            }
            folder
        }
        (None, None) => anyhow::bail!("pass --model DIR or --random tiny|small|7b"),
    };
    let q = match args.to.as_str() {
        "q8_0" => Quantization::Q8_0,
        "f16" => Quantization::F16,
        _ => Quantization::Q4KM,
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let source = Source::local(&dir, None);
    // Anonymous memory has no kernel peak counter: sample it.
    let peak_anon = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak_anon.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(proc_status_bytes("RssAnon:"), Ordering::Relaxed);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let t0 = Instant::now();
    let copy = quantized_copy(&source, q, &args.out, threads);
    let quantize_s = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let copy = copy?;
    let quantize_peak_rss_bytes = peak_rss_bytes();
    let (load_s, types) = if q == Quantization::F16 {
        (None, "F16+F32".to_string())
    } else {
        let t1 = Instant::now();
        let loaded = load(&copy.file, &LoadOptions::default())?;
        let load_s = t1.elapsed().as_secs_f64();
        let types = match &loaded.format {
            WeightFormat::Gguf { types } => types.clone(),
            other => format!("{other:?}"),
        };
        (Some(load_s), types)
    };
    Ok(QuantizeReport {
        source: source.id,
        file: copy.file.display().to_string(),
        quantization: q.name().into(),
        reused: copy.reused,
        file_bytes: std::fs::metadata(&copy.file)?.len(),
        quantize_s,
        quantize_peak_rss_bytes,
        quantize_peak_anon_bytes: peak_anon.load(Ordering::Relaxed),
        load_s,
        types,
    })
}

/// The report as a person reads it.
pub fn print(r: &QuantizeReport) {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("source            {}", r.source);
    println!("copy              {} ({})", r.file, r.quantization);
    println!("tensor types      {}", r.types);
    println!("size              {:.2} GiB", gib(r.file_bytes));
    if r.reused {
        println!("quantised         earlier (the copy was reused)");
    } else {
        println!("quantising        {:.1} s", r.quantize_s);
    }
    println!(
        "peak memory       {:.2} GiB anonymous, {:.2} GiB resident with mapped source pages",
        gib(r.quantize_peak_anon_bytes),
        gib(r.quantize_peak_rss_bytes)
    );
    if let Some(s) = r.load_s {
        println!("loading the copy  {:.2} s", s);
    }
}
