//! What `bench` measured, and its plain-text rendering (`--json` prints the same fields).

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct ConcurrencyFigure {
    pub conversations: usize,
    pub batched: bool,
    /// All tokens over the whole run, prompt reading included.
    pub aggregate_tokens_per_s: f64,
    /// All tokens over the time some conversation was decoding (prompt reading excluded).
    pub aggregate_decode_tokens_per_s: f64,
    pub per_conversation_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub format: String,
    pub device: String,
    pub threads: usize,
    pub parameters: usize,
    pub weight_bytes: u64,
    pub load_s: f64,
    /// The first forward (16 tokens and one step), which repacks quantised weights once; the
    /// prefill figure is timed after it.
    pub warmup_s: f64,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// candle-transformers' stock Llama, same weights and steps (with --reference).
    pub reference_decode_tokens_per_s: Option<f64>,
    pub follow_up_ttft_cached_ms: f64,
    pub follow_up_ttft_uncached_ms: f64,
    pub cache_speedup: f64,
    pub concurrency: Vec<ConcurrencyFigure>,
    /// First token of a new 64-token request arriving while 8 conversations decode (batched).
    pub join_ttft_ms: Option<f64>,
    /// Resident memory right after loading.
    pub load_rss_bytes: u64,
    /// Quantised weights multiplied in their stored blocks (`--cpu-weights`).
    pub compact_weights: bool,
    /// Resident memory once the model is loaded and has decoded one reply (weights, repacked
    /// kernels, one conversation's cache).
    pub model_rss_bytes: u64,
    /// Peak over the whole run, including the attention caches of every benchmark conversation.
    pub peak_rss_bytes: u64,
}

pub fn print_human(r: &BenchReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    writeln!(out, "model        {}", r.model)?;
    writeln!(
        out,
        "format       {} on {}, {} thread(s)",
        r.format, r.device, r.threads
    )?;
    writeln!(
        out,
        "size         {:.1}M parameters, {:.1} MiB of weights",
        r.parameters as f64 / 1e6,
        mib(r.weight_bytes)
    )?;
    writeln!(out, "load         {:.2} s", r.load_s)?;
    writeln!(
        out,
        "first use    {:.2} s (16-token prefill and one step; repacks weights once)",
        r.warmup_s
    )?;
    writeln!(
        out,
        "prefill      {:.1} tokens/s ({} tokens)",
        r.prefill_tokens_per_s, r.prefill_tokens
    )?;
    writeln!(
        out,
        "decode       {:.1} tokens/s ({} tokens)",
        r.decode_tokens_per_s, r.decode_tokens
    )?;
    if let Some(reference) = r.reference_decode_tokens_per_s {
        writeln!(
            out,
            "reference    {reference:.1} tokens/s decode with candle-transformers' Llama"
        )?;
    }
    writeln!(
        out,
        "follow-up    first token {:.1} ms with the cache, {:.1} ms without ({:.1}x)",
        r.follow_up_ttft_cached_ms, r.follow_up_ttft_uncached_ms, r.cache_speedup
    )?;
    for c in &r.concurrency {
        writeln!(
            out,
            "concurrent   {:>2} conversations, {}: {:.1} tokens/s in all ({:.1} while decoding), {:.1} tokens/s each",
            c.conversations,
            if c.batched { "batched  " } else { "unbatched" },
            c.aggregate_tokens_per_s,
            c.aggregate_decode_tokens_per_s,
            c.per_conversation_tokens_per_s
        )?;
    }
    if let Some(ms) = r.join_ttft_ms {
        writeln!(
            out,
            "join         first token of a new request while 8 decode: {ms:.1} ms"
        )?;
    }
    writeln!(
        out,
        "memory       {:.1} MiB resident after loading, {:.1} MiB with one reply, {:.1} MiB peak (all benchmark caches)",
        mib(r.load_rss_bytes),
        mib(r.model_rss_bytes),
        mib(r.peak_rss_bytes)
    )?;
    if r.compact_weights {
        writeln!(
            out,
            "weights      quantised weights multiplied in their stored blocks"
        )?;
    }
    Ok(())
}
