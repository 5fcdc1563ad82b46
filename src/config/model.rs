//! Which model to load and how the one inference worker runs it.
//!
//! Kept apart from sampling and prompt settings because these decide memory use and throughput
//! once at start, while those shape each reply.

use serde::{Deserialize, Serialize};

use super::{ByteSize, ConfigError};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when built with the `cuda` feature and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// f32 on CPU (bf16 on CPU is about 4x slower), f16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

/// What a CPU model's attention caches hold (on a GPU they take the model's dtype).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDType {
    /// f16: half the memory of f32, and half the bytes each decode step reads.
    #[default]
    Auto,
    F16,
    /// Twice the memory; results match an f32 reference exactly.
    F32,
}

/// How a CPU model multiplies its quantised (GGUF) weights.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CpuWeights {
    /// `compact` on CPUs with AVX2 but not AVX-512, where our kernels are the faster; with
    /// AVX-512, `repacked` when the file fits two and a half times in the memory available at
    /// load, `compact` otherwise.
    #[default]
    Auto,
    /// candle's kernels, the fastest on AVX-512 CPUs, which keep a tiled copy of each weight
    /// beside the stored one (about 2.3 times the file once a prompt has run).
    Repacked,
    /// Our kernels on the stored blocks: one copy of the weights, about half the memory; the
    /// faster kernels where the CPU has AVX2 but not AVX-512.
    Compact,
}

/// Whether safetensors weights are quantised at load (GGUF files are used as they are).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
pub enum QuantizeChoice {
    /// Q4_K_M on a CPU (a 7B model in f32 would need 27 GB), none on CUDA.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "q4_k_m")]
    Q4KM,
    #[serde(rename = "q8_0")]
    Q8_0,
    /// The dense weights at `model.dtype`.
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// A Hugging Face model directory or a `.gguf` file. Empty: use `repo`.
    pub path: String,
    /// A Hugging Face repo id fetched once into the local cache when `path` is empty.
    pub repo: String,
    pub revision: String,
    /// File inside `repo` to fetch for GGUF repos (`synthia-7b-v1.2.Q4_K_M.gguf`).
    pub file: String,
    /// `tokenizer.json` to use; default: beside the model (or from `tokenizer_repo`).
    pub tokenizer: String,
    /// Repo to take `tokenizer.json` from when a GGUF repo has none.
    pub tokenizer_repo: String,
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    /// Quantising safetensors weights at load, into a GGUF copy made once and reused.
    pub quantize: QuantizeChoice,
    /// Where quantised copies are kept; empty: beside a download in the Hugging Face cache,
    /// `data/quantized` for a local directory.
    pub quantized_dir: String,
    pub context_length: u32,
    pub max_new_tokens: u32,
    /// CPU threads for inference; 0 = one per core.
    pub threads: u32,
    /// Memory kept for conversations' attention caches, e.g. "1GiB", "512MiB".
    pub kv_cache_budget: ByteSize,
    /// What CPU attention caches hold: `auto` (f16), `f16` or `f32`.
    pub kv_cache_dtype: KvCacheDType,
    /// How a CPU model multiplies quantised weights: `auto`, `repacked` or `compact`.
    pub cpu_weights: CpuWeights,
    /// Requests waiting for the worker before new ones are refused as busy.
    pub queue_capacity: u32,
    /// Conversations decoded together in one pass over the weights; 1 = no batching.
    pub max_batch: u32,
    /// Prompt tokens read per step while other replies keep decoding.
    pub prefill_chunk: u32,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: String::new(),
            repo: String::new(),
            revision: "main".into(),
            file: String::new(),
            tokenizer: String::new(),
            tokenizer_repo: String::new(),
            device: DeviceChoice::Auto,
            dtype: DTypeChoice::Auto,
            quantize: QuantizeChoice::Auto,
            quantized_dir: String::new(),
            context_length: 4096,
            max_new_tokens: 512,
            threads: 0,
            kv_cache_budget: ByteSize::gib(1),
            kv_cache_dtype: KvCacheDType::Auto,
            cpu_weights: CpuWeights::Auto,
            queue_capacity: 64,
            max_batch: 8,
            prefill_chunk: 512,
        }
    }
}

impl ModelSettings {
    /// Rejects settings the worker could not run with. `kv_cache_budget` needs no check here: a
    /// size that does not parse is refused when the settings are read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.context_length < 64 {
            return Err(ConfigError::new(
                "model.context_length",
                "must be at least 64",
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(ConfigError::new(
                "model.max_new_tokens",
                "must be at least 1",
            ));
        }
        if self.max_new_tokens >= self.context_length {
            return Err(ConfigError::new(
                "model.max_new_tokens",
                format!(
                    "must be less than model.context_length ({}), or no room is left for the prompt",
                    self.context_length
                ),
            ));
        }
        if self.max_batch == 0 || self.max_batch > 256 {
            return Err(ConfigError::new(
                "model.max_batch",
                "must be between 1 and 256",
            ));
        }
        if self.prefill_chunk == 0 {
            return Err(ConfigError::new(
                "model.prefill_chunk",
                "must be at least 1",
            ));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::new(
                "model.queue_capacity",
                "must be at least 1",
            ));
        }
        if !self.path.is_empty() && !self.repo.is_empty() {
            return Err(ConfigError::new(
                "model.repo",
                "set either model.path (local files) or model.repo (download), not both",
            ));
        }
        Ok(())
    }
}
