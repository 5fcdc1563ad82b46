//! Loading a model: a Hugging Face directory (safetensors, single or sharded), a GGUF file, or
//! a Hugging Face repo id fetched once into the local cache. Every problem becomes an error that
//! names the file and what is wrong; nothing here panics on a bad checkpoint.

mod gguf;
pub mod gguf_vocab;
pub mod gguf_write;
mod hf;
mod hub;
pub mod names;
pub mod progress;
pub mod quantize;
mod safetensors;
mod space;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

pub use hf::{declared_context, tokenizer_path};

use super::kernels::quant::Loops;
use super::model::LlamaModel;
use super::tokenizer::{TextTokenizer, TokenizerError};
use crate::config::{
    CpuWeights, DTypeChoice, DeviceChoice, KvCacheDType, ModelSettings, QuantizeChoice,
};
use quantize::Quantization;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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
    #[error(
        "{what} needs {needed} in {dir} but only {free} is free there; free some space, or point the cache elsewhere (HF_HOME for downloads, model.quantized_dir for quantised copies)"
    )]
    NoSpace {
        dir: PathBuf,
        what: String,
        needed: String,
        free: String,
    },
}

/// The model a first start uses when none is configured: the model card's.
pub const DEFAULT_REPO: &str = "migtissera/Synthia-7B";

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
    /// The quantised copy the weights were loaded from, when quantised at load.
    pub quantized: Option<quantize::Quantized>,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub dtype: DTypeChoice,
    pub tokenizer: Option<PathBuf>,
    /// Safetensors weights quantised at load (`Auto`: Q4_K_M on a CPU, none on CUDA).
    pub quantize: QuantizeChoice,
    /// Where quantised copies of local directories are kept.
    pub quantized_dir: PathBuf,
    /// Threads quantising; 0 = one per core.
    pub threads: usize,
    /// What CPU attention caches hold.
    pub kv_cache: KvCacheDType,
    /// How a CPU model multiplies quantised weights.
    pub cpu_weights: CpuWeights,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: DTypeChoice::Auto,
            tokenizer: None,
            quantize: QuantizeChoice::None,
            quantized_dir: PathBuf::from(DEFAULT_QUANTIZED_DIR),
            threads: 0,
            kv_cache: KvCacheDType::Auto,
            cpu_weights: CpuWeights::Auto,
        }
    }
}

/// Whether a quantised model of `file_bytes` multiplies its weights in their stored blocks:
/// asked for, or (`auto`) where our kernels are the faster ones or candle's repacked copies would
/// not fit. On CPUs whose best loops are AVX2 (`loops`) our loops beat candle's 256-bit tiles in
/// decode, in batches and on Q8_0 prompts, in half the memory; with AVX-512 candle's tiles are
/// faster, so `auto` keeps them while the copies, which bring the weights to about 2.3 times the
/// file, fit in `available` bytes with room to spare. Unknown free memory keeps them too. Without
/// our loops there is nothing to choose: candle's kernels run.
// Elsewhere only portable loops exist, and the memory rule's inputs go unread.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn compact_weights(
    choice: CpuWeights,
    file_bytes: u64,
    available: Option<u64>,
    loops: Loops,
) -> bool {
    match choice {
        CpuWeights::Compact => true,
        CpuWeights::Repacked => false,
        CpuWeights::Auto => match loops {
            Loops::Portable => false,
            #[cfg(target_arch = "x86_64")]
            Loops::Avx2 => true,
            #[cfg(target_arch = "x86_64")]
            Loops::Avx512 => available.is_some_and(|a| file_bytes.saturating_mul(5) / 2 > a),
        },
    }
}

/// `MemAvailable` of `/proc/meminfo`, where there is one.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Quantised copies of local model directories, when `model.quantized_dir` is empty.
pub const DEFAULT_QUANTIZED_DIR: &str = "data/quantized";

impl LoadOptions {
    /// The options `settings` give.
    pub fn from_settings(settings: &ModelSettings) -> Self {
        Self {
            device: settings.device,
            dtype: settings.dtype,
            tokenizer: (!settings.tokenizer.is_empty()).then(|| PathBuf::from(&settings.tokenizer)),
            quantize: settings.quantize,
            quantized_dir: PathBuf::from(if settings.quantized_dir.is_empty() {
                DEFAULT_QUANTIZED_DIR
            } else {
                &settings.quantized_dir
            }),
            threads: settings.threads as usize,
            kv_cache: settings.kv_cache_dtype,
            cpu_weights: settings.cpu_weights,
        }
    }

    /// The quantisation a safetensors model gets on `device`.
    fn quantization(&self, device: &Device) -> Option<Quantization> {
        match self.quantize {
            QuantizeChoice::Auto if device.is_cpu() => Some(Quantization::Q4KM),
            QuantizeChoice::Auto | QuantizeChoice::None => None,
            QuantizeChoice::Q4KM => Some(Quantization::Q4KM),
            QuantizeChoice::Q8_0 => Some(Quantization::Q8_0),
        }
    }
}

/// Loads what the settings name: `model.path`, or `model.repo` through the local cache, or
/// with neither the model card's model ([`DEFAULT_REPO`]).
pub fn load_from_settings(settings: &ModelSettings) -> Result<LoadedModel, LoadError> {
    let opts = LoadOptions::from_settings(settings);
    if !settings.path.is_empty() {
        return load(Path::new(&settings.path), &opts);
    }
    let repo = if settings.repo.is_empty() {
        tracing::info!(
            repo = DEFAULT_REPO,
            "no model configured: using the model card's"
        );
        DEFAULT_REPO
    } else {
        &settings.repo
    };
    let device = select_device(opts.device)?;
    let fetched = hub::fetch_from_hub(settings, repo)?;
    let opts = LoadOptions {
        tokenizer: opts.tokenizer.or(fetched.tokenizer),
        ..opts
    };
    if fetched.path.is_dir()
        && let Some(q) = opts.quantization(&device)
    {
        // The copy lives in the repo's own cache folder, beside the download.
        let source = quantize::Source {
            id: repo.to_string(),
            revision: fetched.revision.clone(),
            dir: fetched.path.clone(),
            tokenizer: opts.tokenizer.clone(),
        };
        let cache = if settings.quantized_dir.is_empty() {
            fetched.repo_cache.join("synthia-bot")
        } else {
            PathBuf::from(&settings.quantized_dir)
        };
        return load_quantized(&source, q, &cache, &opts, &device);
    }
    load_on(&fetched.path, &opts, &device)
}

/// The model's tokenizer without its weights, for a backend whose weights are elsewhere (an
/// inference server): `model.tokenizer`, else the one beside (or carried in) `model.path`, else
/// `tokenizer.json` of `model.tokenizer_repo`, `model.repo` or the model card's repo, fetched
/// into the hub cache once.
pub fn tokenizer_from_settings(settings: &ModelSettings) -> Result<TextTokenizer, LoadError> {
    if !settings.tokenizer.is_empty() {
        return Ok(TextTokenizer::from_file(Path::new(&settings.tokenizer))?);
    }
    if !settings.path.is_empty() {
        let model = Path::new(&settings.path);
        if !model.exists() {
            return Err(LoadError::NotFound(model.to_path_buf()));
        }
        let beside = tokenizer_path(model, None);
        if !beside.exists() && model.is_file() {
            let mut file = std::fs::File::open(model).map_err(|e| LoadError::Read {
                path: model.to_path_buf(),
                message: e.to_string(),
            })?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| {
                    LoadError::Read {
                        path: model.to_path_buf(),
                        message: format!("not a readable GGUF file: {e}"),
                    }
                })?;
            if let Some(json) = gguf_vocab::embedded_tokenizer(&content.metadata) {
                return TextTokenizer::from_bytes(json.as_bytes()).map_err(|e| {
                    LoadError::BadConfig {
                        path: model.to_path_buf(),
                        message: format!("the tokenizer it carries: {e}"),
                    }
                });
            }
        }
        return Ok(TextTokenizer::from_file(&beside)?);
    }
    let repo = [&settings.tokenizer_repo, &settings.repo]
        .into_iter()
        .find(|r| !r.is_empty())
        .map_or(DEFAULT_REPO, String::as_str);
    let path = hub::fetch_file(settings, repo, "tokenizer.json")?;
    Ok(TextTokenizer::from_file(&path)?)
}

/// Loads a model directory or GGUF file.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let device = select_device(opts.device)?;
    if path.is_dir()
        && let Some(q) = opts.quantization(&device)
    {
        let source = quantize::Source::local(path, opts.tokenizer.as_deref());
        return load_quantized(&source, q, &opts.quantized_dir, opts, &device);
    }
    load_on(path, opts, &device)
}

/// Loads the quantised copy of `source`, writing it first if no earlier start did.
fn load_quantized(
    source: &quantize::Source,
    q: Quantization,
    cache: &Path,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let copy = quantize::quantized_copy(source, q, cache, threads)?;
    // The copy embeds the tokenizer it was made with.
    let opts = LoadOptions {
        tokenizer: None,
        ..opts.clone()
    };
    let mut loaded = gguf::load_gguf(&copy.file, &opts, device)?;
    loaded.quantized = Some(copy);
    Ok(loaded)
}

fn load_on(path: &Path, opts: &LoadOptions, device: &Device) -> Result<LoadedModel, LoadError> {
    let device = device.clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_weights_when_asked_or_when_the_repacked_copies_would_not_fit() {
        let gb = 1 << 30;
        for loops in Loops::available() {
            assert!(compact_weights(
                CpuWeights::Compact,
                4 * gb,
                Some(64 * gb),
                loops
            ));
            assert!(!compact_weights(
                CpuWeights::Repacked,
                4 * gb,
                Some(gb),
                loops
            ));
        }
        #[cfg(target_arch = "x86_64")]
        {
            // With AVX-512, a 4 GB file: 10 GB with the repacked copies.
            assert!(!compact_weights(
                CpuWeights::Auto,
                4 * gb,
                Some(11 * gb),
                Loops::Avx512
            ));
            assert!(compact_weights(
                CpuWeights::Auto,
                4 * gb,
                Some(9 * gb),
                Loops::Avx512
            ));
            assert!(!compact_weights(
                CpuWeights::Auto,
                4 * gb,
                None,
                Loops::Avx512
            ));
            // With AVX2 our loops are the faster ones, whatever the memory.
            assert!(compact_weights(
                CpuWeights::Auto,
                4 * gb,
                Some(64 * gb),
                Loops::Avx2
            ));
            assert!(compact_weights(CpuWeights::Auto, 4 * gb, None, Loops::Avx2));
        }
        // Without our loops candle's kernels are the only ones.
        assert!(!compact_weights(
            CpuWeights::Auto,
            4 * gb,
            Some(gb),
            Loops::Portable
        ));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn available_memory_reads_this_machine() {
        assert!(available_memory().is_some_and(|b| b > 0));
    }
}
