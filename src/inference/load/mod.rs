//! Loading a model: a Hugging Face directory (safetensors, single or sharded), a GGUF file, or
//! a Hugging Face repo id fetched once into the local cache. Every problem becomes an error that
//! names the file and what is wrong; nothing here panics on a bad checkpoint.

mod gguf;
mod hf;
mod hub;
pub mod names;
mod safetensors;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

pub use hf::{declared_context, tokenizer_path};

use super::model::LlamaModel;
use super::tokenizer::{TextTokenizer, TokenizerError};
use crate::config::{DTypeChoice, DeviceChoice, ModelSettings};

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
    let fetched = hub::fetch_from_hub(settings)?;
    let opts = LoadOptions {
        tokenizer: opts.tokenizer.or(fetched.tokenizer),
        ..opts
    };
    load(&fetched.path, &opts)
}

/// Loads a model directory or GGUF file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let device = select_device(opts.device)?;
    if path.is_dir() {
        safetensors::load_safetensors_dir(path, opts, &device)
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        gguf::load_gguf(path, opts, &device)
    } else {
        Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what: "not a model directory (config.json + safetensors) or a .gguf file".into(),
        })
    }
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

/// The dtype dense weights get on `device`.
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
