//! Loading a model: a Hugging Face directory (safetensors, single or sharded), a GGUF file, or
//! a Hugging Face repo id fetched once into the local cache. Every problem becomes an error that
//! names the file and what is wrong; nothing here panics on a bad checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::model::{Layer, LlamaModel, LlamaShape};
use crate::config::{DTypeChoice, DeviceChoice, ModelSettings};
use crate::prompt::{TextTokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "no model configured: set model.path to a model directory or .gguf file, or model.repo to a Hugging Face repo id"
    )]
    NotConfigured,
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("{path} is not a valid model config: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error(
        "{path}: unsupported architecture `{arch}` (supported: LlamaForCausalLM, MistralForCausalLM)"
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error(
        "the tokenizer has {tokenizer} tokens but the model only {model}: they do not belong together"
    )]
    VocabMismatch { model: usize, tokenizer: usize },
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("device: {0}")]
    Device(String),
    #[error(
        "cannot fetch {file} from Hugging Face repo {repo}: {message}. If this machine is offline, download the files elsewhere and set model.path"
    )]
    Hub {
        repo: String,
        file: String,
        message: String,
    },
}

/// How the weights are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFormat {
    Safetensors { dtype: DType, files: usize },
    Gguf { types: String },
}

/// A model ready for the worker, with its tokenizer.
pub struct LoadedModel {
    pub model: LlamaModel,
    pub tokenizer: Arc<TextTokenizer>,
    pub format: WeightFormat,
    /// Token ids that end a reply.
    pub eos_ids: Vec<u32>,
    /// Where the weights came from, for logs and bench output.
    pub source: PathBuf,
    /// Total size of the weight files.
    pub weight_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub tokenizer: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DTypeChoice::Auto,
            tokenizer: None,
        }
    }
}

/// Loads what the settings name: `model.path`, or `model.repo` through the local cache.
pub fn load_from_settings(settings: &ModelSettings) -> Result<LoadedModel, LoadError> {
    let opts = LoadOptions {
        device: settings.device,
        dtype: settings.dtype,
        tokenizer: (!settings.tokenizer.is_empty()).then(|| PathBuf::from(&settings.tokenizer)),
    };
    if !settings.path.is_empty() {
        return load(Path::new(&settings.path), &opts);
    }
    if settings.repo.is_empty() {
        return Err(LoadError::NotConfigured);
    }
    let fetched = fetch_from_hub(settings)?;
    let opts = LoadOptions {
        tokenizer: opts.tokenizer.or(fetched.tokenizer),
        ..opts
    };
    load(&fetched.path, &opts)
}

pub fn select_device(choice: DeviceChoice) -> Result<Device, LoadError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => cuda_device(),
        DeviceChoice::Auto => Ok(cuda_device().unwrap_or(Device::Cpu)),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device, LoadError> {
    Device::new_cuda(0).map_err(|e| LoadError::Device(format!("cannot open CUDA device 0: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device, LoadError> {
    Err(LoadError::Device(
        "this build has no CUDA support; rebuild with `--features cuda` or set model.device = \"cpu\"".into(),
    ))
}

fn select_dtype(choice: DTypeChoice, device: &Device) -> DType {
    match (choice, device.is_cpu()) {
        (DTypeChoice::Auto, true) | (DTypeChoice::F32, _) => DType::F32,
        (DTypeChoice::Auto, false) | (DTypeChoice::F16, _) => DType::F16,
        (DTypeChoice::Bf16, cpu) => {
            if cpu {
                tracing::warn!(
                    "bf16 on the CPU is about 4x slower than f32; consider model.dtype = \"f32\""
                );
            }
            DType::BF16
        }
    }
}

/// Loads a model directory or GGUF file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let device = select_device(opts.device)?;
    if path.is_dir() {
        load_safetensors_dir(path, opts, &device)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        load_gguf(path, opts, &device)
    } else {
        Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what: "not a model directory (config.json + safetensors) or a .gguf file".into(),
        })
    }
}

/// The fields of a Hugging Face `config.json` we use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
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
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    rope_scaling: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
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

fn read_hf_config(path: &Path) -> Result<HfConfig, LoadError> {
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

fn eos_ids(value: Option<&serde_json::Value>, tokenizer: &TextTokenizer) -> Vec<u32> {
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

fn load_tokenizer(model: &Path, explicit: Option<&Path>) -> Result<TextTokenizer, LoadError> {
    Ok(TextTokenizer::from_file(&tokenizer_path(model, explicit))?)
}

/// The weight files of a directory: an index of shards, or one `model.safetensors`.
fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| LoadError::Read {
            path: index.clone(),
            message: e.to_string(),
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoadError::BadConfig {
                path: index.clone(),
                message: e.to_string(),
            })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::BadConfig {
                path: index.clone(),
                message: "no weight_map".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.exists() {
                return Err(LoadError::MissingFile {
                    path: f.clone(),
                    what: format!("shard listed in {} is missing", index.display()),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let what = if dir.join("pytorch_model.bin").exists() {
        "only pytorch_model.bin found; convert the weights to safetensors"
    } else {
        "no model.safetensors or model.safetensors.index.json"
    };
    Err(LoadError::MissingFile {
        path: dir.to_path_buf(),
        what: what.into(),
    })
}

fn load_safetensors_dir(
    dir: &Path,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(LoadError::MissingFile {
            path: config_path,
            what: "missing: a model directory needs config.json".into(),
        });
    }
    let cfg = read_hf_config(&config_path)?;
    let tokenizer = load_tokenizer(dir, opts.tokenizer.as_deref())?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(LoadError::VocabMismatch {
            model: cfg.vocab_size,
            tokenizer: tokenizer.vocab_size(),
        });
    }
    let files = safetensor_files(dir)?;
    let dtype = select_dtype(opts.dtype, device);
    let num_kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
    let head_dim = cfg
        .head_dim
        .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
    let shape = LlamaShape {
        vocab_size: cfg.vocab_size,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_layers: cfg.num_hidden_layers,
        num_heads: cfg.num_attention_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: cfg.rope_theta,
        max_position: cfg.max_position_embeddings,
    };

    // SAFETY: the files are memory-mapped read-only; we never write to them while mapped.
    let st =
        unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
            LoadError::Read {
                path: files[0].clone(),
                message: e.to_string(),
            }
        })?;
    // Check every name and shape first, so a broken checkpoint is one clear error.
    let mut available: HashMap<String, (Vec<usize>, PathBuf)> = HashMap::new();
    for file in &files {
        // SAFETY: as above.
        let one =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
                LoadError::Read {
                    path: file.clone(),
                    message: e.to_string(),
                }
            })?;
        for (name, view) in one.tensors() {
            available.insert(name, (view.shape().to_vec(), file.clone()));
        }
    }
    let weight_path = if files.len() == 1 {
        files[0].clone()
    } else {
        dir.to_path_buf()
    };
    let check = |name: &str, expected: &[usize]| -> Result<(), LoadError> {
        match available.get(name) {
            None => Err(LoadError::MissingTensor {
                path: weight_path.clone(),
                name: name.into(),
            }),
            Some((actual, file)) if actual != expected => Err(LoadError::WrongShape {
                path: file.clone(),
                name: name.into(),
                expected: expected.to_vec(),
                actual: actual.clone(),
            }),
            Some(_) => Ok(()),
        }
    };
    let (h, i, q_out, kv_out) = (
        shape.hidden_size,
        shape.intermediate_size,
        shape.num_heads * head_dim,
        num_kv_heads * head_dim,
    );
    check("model.embed_tokens.weight", &[shape.vocab_size, h])?;
    check("model.norm.weight", &[h])?;
    let tied = cfg.tie_word_embeddings && !available.contains_key("lm_head.weight");
    if !tied {
        check("lm_head.weight", &[shape.vocab_size, h])?;
    }
    for l in 0..shape.num_layers {
        let p = format!("model.layers.{l}");
        check(&format!("{p}.input_layernorm.weight"), &[h])?;
        check(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
        check(&format!("{p}.self_attn.q_proj.weight"), &[q_out, h])?;
        check(&format!("{p}.self_attn.k_proj.weight"), &[kv_out, h])?;
        check(&format!("{p}.self_attn.v_proj.weight"), &[kv_out, h])?;
        check(&format!("{p}.self_attn.o_proj.weight"), &[h, q_out])?;
        check(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
        check(&format!("{p}.mlp.up_proj.weight"), &[i, h])?;
        check(&format!("{p}.mlp.down_proj.weight"), &[h, i])?;
    }

    let get = |name: &str| -> Result<Tensor, LoadError> {
        st.load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| LoadError::Read {
                path: available
                    .get(name)
                    .map(|a| a.1.clone())
                    .unwrap_or_else(|| weight_path.clone()),
                message: format!("tensor `{name}`: {e}"),
            })
    };
    let linear = |name: &str| -> Result<QMatMul, LoadError> { Ok(QMatMul::Tensor(get(name)?)) };
    let embed = QMatMul::Tensor(get("model.embed_tokens.weight")?);
    let lm_head = if tied {
        embed.clone()
    } else {
        linear("lm_head.weight")?
    };
    let mut layers = Vec::with_capacity(shape.num_layers);
    for l in 0..shape.num_layers {
        let p = format!("model.layers.{l}");
        layers.push(Layer {
            attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
            wq: linear(&format!("{p}.self_attn.q_proj.weight"))?,
            wk: linear(&format!("{p}.self_attn.k_proj.weight"))?,
            wv: linear(&format!("{p}.self_attn.v_proj.weight"))?,
            wo: linear(&format!("{p}.self_attn.o_proj.weight"))?,
            ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
            w_gate: linear(&format!("{p}.mlp.gate_proj.weight"))?,
            w_up: linear(&format!("{p}.mlp.up_proj.weight"))?,
            w_down: linear(&format!("{p}.mlp.down_proj.weight"))?,
        });
    }
    let norm = get("model.norm.weight")?;
    let model = LlamaModel::new(shape, embed, layers, norm, lm_head, false, device, dtype)
        .map_err(|e| LoadError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    let weight_bytes = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    let eos = eos_ids(cfg.eos_token_id.as_ref(), &tokenizer);
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        format: WeightFormat::Safetensors {
            dtype,
            files: files.len(),
        },
        eos_ids: eos,
        source: dir.to_path_buf(),
        weight_bytes,
    })
}

fn load_gguf(path: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel, LoadError> {
    let read_err = |message: String| LoadError::Read {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| read_err(e.to_string()))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| read_err(format!("not a readable GGUF file: {e}")))?;
    let md = |key: &str| -> Result<&gguf_file::Value, LoadError> {
        content
            .metadata
            .get(key)
            .ok_or_else(|| LoadError::BadConfig {
                path: path.to_path_buf(),
                message: format!("missing metadata `{key}`"),
            })
    };
    let md_u32 = |key: &str| -> Result<usize, LoadError> {
        md(key)?
            .to_u32()
            .map(|v| v as usize)
            .map_err(|e| LoadError::BadConfig {
                path: path.to_path_buf(),
                message: format!("metadata `{key}`: {e}"),
            })
    };
    let arch = md("general.architecture")?
        .to_string()
        .cloned()
        .unwrap_or_default();
    if arch != "llama" {
        return Err(LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            arch,
        });
    }
    let num_heads = md_u32("llama.attention.head_count")?;
    let num_kv_heads = md_u32("llama.attention.head_count_kv")?;
    let num_layers = md_u32("llama.block_count")?;
    let hidden = md_u32("llama.embedding_length")?;
    let head_dim = md_u32("llama.rope.dimension_count")?;
    let eps = md("llama.attention.layer_norm_rms_epsilon")?
        .to_f32()
        .map_err(|e| read_err(e.to_string()))? as f64;
    let theta = content
        .metadata
        .get("llama.rope.freq_base")
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(10_000.0);
    let max_position = content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .unwrap_or(4096);
    let info = |name: &str| -> Result<Vec<usize>, LoadError> {
        content
            .tensor_infos
            .get(name)
            .map(|t| t.shape.dims().to_vec())
            .ok_or_else(|| LoadError::MissingTensor {
                path: path.to_path_buf(),
                name: name.into(),
            })
    };
    let embed_dims = info("token_embd.weight")?;
    if embed_dims.len() != 2 || embed_dims[1] != hidden {
        return Err(LoadError::WrongShape {
            path: path.to_path_buf(),
            name: "token_embd.weight".into(),
            expected: vec![0, hidden],
            actual: embed_dims,
        });
    }
    let vocab = embed_dims[0];
    let intermediate = info("blk.0.ffn_gate.weight")?.first().copied().unwrap_or(0);
    let shape = LlamaShape {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: eps,
        rope_theta: theta,
        max_position,
    };
    let expect = |name: &str, want: &[usize]| -> Result<(), LoadError> {
        let got = info(name)?;
        if got != want {
            return Err(LoadError::WrongShape {
                path: path.to_path_buf(),
                name: name.into(),
                expected: want.to_vec(),
                actual: got,
            });
        }
        Ok(())
    };
    let (q_out, kv_out) = (num_heads * head_dim, num_kv_heads * head_dim);
    expect("output_norm.weight", &[hidden])?;
    for l in 0..num_layers {
        let p = format!("blk.{l}");
        expect(&format!("{p}.attn_norm.weight"), &[hidden])?;
        expect(&format!("{p}.ffn_norm.weight"), &[hidden])?;
        expect(&format!("{p}.attn_q.weight"), &[q_out, hidden])?;
        expect(&format!("{p}.attn_k.weight"), &[kv_out, hidden])?;
        expect(&format!("{p}.attn_v.weight"), &[kv_out, hidden])?;
        expect(&format!("{p}.attn_output.weight"), &[hidden, q_out])?;
        expect(&format!("{p}.ffn_gate.weight"), &[intermediate, hidden])?;
        expect(&format!("{p}.ffn_up.weight"), &[intermediate, hidden])?;
        expect(&format!("{p}.ffn_down.weight"), &[hidden, intermediate])?;
    }

    let tokenizer = load_tokenizer(path, opts.tokenizer.as_deref())?;
    if tokenizer.vocab_size() > vocab {
        return Err(LoadError::VocabMismatch {
            model: vocab,
            tokenizer: tokenizer.vocab_size(),
        });
    }
    let mut qt = |name: &str| {
        content
            .tensor(&mut file, name, device)
            .map_err(|e| read_err(format!("tensor `{name}`: {e}")))
    };
    let dense = |q: candle_core::quantized::QTensor| {
        q.dequantize(device).map_err(|e| read_err(e.to_string()))
    };
    let mut types: Vec<String> = Vec::new();
    let mut note = |t: GgmlDType| {
        let s = format!("{t:?}");
        if !types.contains(&s) {
            types.push(s);
        }
    };
    let embed_q = qt("token_embd.weight")?;
    note(embed_q.dtype());
    let embed = QMatMul::from_qtensor(embed_q).map_err(|e| read_err(e.to_string()))?;
    let norm = dense(qt("output_norm.weight")?)?;
    let lm_head = match content.tensor_infos.contains_key("output.weight") {
        true => {
            let q = qt("output.weight")?;
            note(q.dtype());
            QMatMul::from_qtensor(q).map_err(|e| read_err(e.to_string()))?
        }
        false => embed.clone(),
    };
    let mut layers = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let p = format!("blk.{l}");
        let mut lin = |name: &str| -> Result<QMatMul, LoadError> {
            let q = qt(&format!("{p}.{name}.weight"))?;
            note(q.dtype());
            QMatMul::from_qtensor(q).map_err(|e| read_err(e.to_string()))
        };
        let (wq, wk, wv, wo) = (
            lin("attn_q")?,
            lin("attn_k")?,
            lin("attn_v")?,
            lin("attn_output")?,
        );
        let (w_gate, w_up, w_down) = (lin("ffn_gate")?, lin("ffn_up")?, lin("ffn_down")?);
        layers.push(Layer {
            attn_norm: dense(qt(&format!("{p}.attn_norm.weight"))?)?,
            wq,
            wk,
            wv,
            wo,
            ffn_norm: dense(qt(&format!("{p}.ffn_norm.weight"))?)?,
            w_gate,
            w_up,
            w_down,
        });
    }
    let model = LlamaModel::new(
        shape,
        embed,
        layers,
        norm,
        lm_head,
        true,
        device,
        DType::F32,
    )
    .map_err(|e| read_err(e.to_string()))?;
    let eos = eos_ids(None, &tokenizer);
    let weight_bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        format: WeightFormat::Gguf {
            types: types.join("+"),
        },
        eos_ids: eos,
        source: path.to_path_buf(),
        weight_bytes,
    })
}

struct Fetched {
    path: PathBuf,
    tokenizer: Option<PathBuf>,
}

/// Downloads (once; later starts use the local cache) what `model.repo` names.
fn fetch_from_hub(settings: &ModelSettings) -> Result<Fetched, LoadError> {
    use hf_hub::{Repo, RepoType, api::sync::ApiBuilder};
    // HF_HOME (cache) and HF_ENDPOINT (mirror) are honoured as in the Python client.
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| LoadError::Hub {
            repo: settings.repo.clone(),
            file: String::new(),
            message: e.to_string(),
        })?;
    let revision = if settings.revision.is_empty() {
        "main"
    } else {
        &settings.revision
    };
    let repo = api.repo(Repo::with_revision(
        settings.repo.clone(),
        RepoType::Model,
        revision.to_string(),
    ));
    let get = |repo: &hf_hub::api::sync::ApiRepo, name: &str, repo_id: &str| {
        tracing::info!(
            repo = repo_id,
            file = name,
            "fetching from the Hugging Face hub (cached after the first time)"
        );
        repo.get(name).map_err(|e| LoadError::Hub {
            repo: repo_id.to_string(),
            file: name.to_string(),
            message: e.to_string(),
        })
    };
    if settings.file.to_ascii_lowercase().ends_with(".gguf") {
        let gguf = get(&repo, &settings.file, &settings.repo)?;
        let tokenizer = if settings.tokenizer_repo.is_empty() {
            get(&repo, "tokenizer.json", &settings.repo)?
        } else {
            let trepo = api.model(settings.tokenizer_repo.clone());
            get(&trepo, "tokenizer.json", &settings.tokenizer_repo)?
        };
        return Ok(Fetched {
            path: gguf,
            tokenizer: Some(tokenizer),
        });
    }
    let config = get(&repo, "config.json", &settings.repo)?;
    get(&repo, "tokenizer.json", &settings.repo)?;
    match get(&repo, "model.safetensors.index.json", &settings.repo) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| LoadError::Read {
                path: index.clone(),
                message: e.to_string(),
            })?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::BadConfig {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let mut shards: Vec<String> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                get(&repo, &shard, &settings.repo)?;
            }
        }
        Err(LoadError::Hub { .. }) => {
            get(&repo, "model.safetensors", &settings.repo)?;
        }
        Err(e) => return Err(e),
    }
    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Fetched {
        path: dir,
        tokenizer: None,
    })
}
