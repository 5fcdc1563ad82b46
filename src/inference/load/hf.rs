//! Hugging Face conventions a model follows: its `config.json` (architecture, shape, end ids)
//! and where its `tokenizer.json` lies.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::LoadError;
use crate::inference::model::LlamaShape;
use crate::inference::tokenizer::TextTokenizer;

/// The fields of a Hugging Face `config.json` we use.
#[derive(Debug, Deserialize)]
pub(super) struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    pub(super) vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    pub(super) tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
    pub(super) eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f32 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl HfConfig {
    pub(super) fn shape(&self) -> LlamaShape {
        LlamaShape {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            max_position: self.max_position_embeddings,
        }
    }
}

/// Reads a `config.json` and refuses what the forward pass cannot run.
pub(super) fn read_hf_config(path: &Path) -> Result<HfConfig, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::MissingFile {
        path: path.to_path_buf(),
        what: format!("cannot read model config: {e}"),
    })?;
    let cfg: HfConfig = serde_json::from_str(&text).map_err(|e| LoadError::BadConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let arch = cfg
        .architectures
        .first()
        .cloned()
        .or_else(|| cfg.model_type.clone())
        .unwrap_or_default();
    let mistral = matches!(arch.as_str(), "MistralForCausalLM" | "mistral");
    if !matches!(arch.as_str(), "LlamaForCausalLM" | "llama") && !mistral {
        return Err(LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch,
        });
    }
    if let Some(window) = cfg.sliding_window
        && mistral
        && window < cfg.max_position_embeddings.min(4096)
    {
        return Err(LoadError::BadConfig {
            path: path.to_path_buf(),
            message: format!(
                "sliding_window {window} is smaller than the context; sliding-window attention is not supported"
            ),
        });
    }
    if let Some(scaling) = &cfg.rope_scaling
        && !scaling.is_null()
    {
        return Err(LoadError::BadConfig {
            path: path.to_path_buf(),
            message: format!("rope_scaling {scaling} is not supported"),
        });
    }
    if cfg.num_attention_heads == 0
        || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        || !cfg.num_attention_heads.is_multiple_of(
            cfg.num_key_value_heads
                .unwrap_or(cfg.num_attention_heads)
                .max(1),
        )
    {
        return Err(LoadError::BadConfig {
            path: path.to_path_buf(),
            message: "attention heads do not divide the hidden size / key-value heads".into(),
        });
    }
    Ok(cfg)
}

/// The ids that end a reply: those `eos_token_id` lists, and always the tokenizer's own.
pub(super) fn eos_ids(value: Option<&serde_json::Value>, tokenizer: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = match value {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| v as u32)
            .collect(),
        _ => Vec::new(),
    };
    if !ids.contains(&tokenizer.eos()) {
        ids.push(tokenizer.eos());
    }
    ids
}

/// Where a model's tokenizer is: the one named, else `tokenizer.json` in the model directory or
/// beside the GGUF file.
pub fn tokenizer_path(model: &Path, explicit: Option<&Path>) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None if model.is_dir() => model.join("tokenizer.json"),
        None => model
            .parent()
            .unwrap_or(Path::new("."))
            .join("tokenizer.json"),
    }
}

/// The context window a model directory's `config.json` declares, if it can be read.
pub fn declared_context(model: &Path) -> Option<usize> {
    let path = model.join("config.json");
    path.exists()
        .then(|| read_hf_config(&path).ok())
        .flatten()
        .map(|c| c.max_position_embeddings)
}

/// The model's tokenizer, refused when it has more tokens than the model's vocabulary.
pub(super) fn load_tokenizer(
    model: &Path,
    explicit: Option<&Path>,
    model_vocab: usize,
) -> Result<TextTokenizer, LoadError> {
    let tokenizer = TextTokenizer::from_file(&tokenizer_path(model, explicit))?;
    if tokenizer.vocab_size() > model_vocab {
        return Err(LoadError::VocabMismatch {
            model: model_vocab,
            tokenizer: tokenizer.vocab_size(),
        });
    }
    Ok(tokenizer)
}
