//! Quantising a safetensors checkpoint at load, once: a 7B model in f32 needs 27 GB of memory
//! and reads slowly on a CPU, while its Q4_K_M copy is about 4 GB. The copy is written as a GGUF
//! file (weights, shape, tokenizer, the source's revision and the quantisation in its metadata)
//! into a cache folder, tensor by tensor, so the whole model is never in memory; later starts
//! load that file in seconds. A changed source or quantisation gets a new file, never a stale one.

use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::LoadError;
use super::gguf_vocab::tokenizer_metadata;
use super::gguf_write::{PlannedTensor, fits_blocks, planned_size, write_gguf_streaming};
use super::names::{GlobalWeight, LayerWeight, Weight};
use super::progress::{Progress, Unit, bytes_words};
use super::safetensors::{Checkpoint, read_config};
use super::space::ensure_room;
use crate::inference::model::LlamaShape;

/// Bumped when the same source and quantisation would be written differently, so older cached
/// files are replaced.
pub const QUANTIZER_VERSION: u32 = 1;

const KEY_SOURCE: &str = "synthia_bot.source";
const KEY_REVISION: &str = "synthia_bot.source_revision";
const KEY_QUANTIZATION: &str = "synthia_bot.quantization";
const KEY_VERSION: &str = "synthia_bot.quantizer_version";
/// The ids ending a reply, from the source's `config.json` (GGUF has room for one).
pub const KEY_EOS_IDS: &str = "synthia_bot.eos_token_ids";

/// FNV-1a: the same cache names on every build (std's hasher may change between releases).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A CPU weight format made at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// llama.cpp's Q4_K_M mix: Q4_K, with the output and some value and down projections in
    /// Q6_K. About 4.9 bits a weight.
    Q4KM,
    /// 8.5 bits a weight; closest to the dense model.
    Q8_0,
    /// Dense f16: a copy other tools' quantisers can start from (not a load-time choice).
    F16,
}

impl Quantization {
    /// The name used in settings, file names and metadata.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q4KM => "q4_k_m",
            Self::Q8_0 => "q8_0",
            Self::F16 => "f16",
        }
    }

    /// llama.cpp's `general.file_type` for the mix.
    fn file_type(self) -> u32 {
        match self {
            Self::Q4KM => 15,
            Self::Q8_0 => 7,
            Self::F16 => 1,
        }
    }

    /// The type a weight of `dims` is stored as. Norms stay f32; a matrix whose rows are not
    /// whole blocks of the preferred type falls back to Q8_0, then f16.
    pub fn dtype_for(self, weight: Weight, num_layers: usize, dims: &[usize]) -> GgmlDType {
        if weight.is_norm() {
            return GgmlDType::F32;
        }
        let preferred = match self {
            Self::F16 => return GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4KM => match weight {
                Weight::Global(GlobalWeight::LmHead) => GgmlDType::Q6K,
                Weight::Layer(l, LayerWeight::V | LayerWeight::Down)
                    if more_bits(l, num_layers) =>
                {
                    GgmlDType::Q6K
                }
                _ => GgmlDType::Q4K,
            },
        };
        [preferred, GgmlDType::Q8_0, GgmlDType::F16]
            .into_iter()
            .find(|&t| fits_blocks(dims, t))
            .unwrap_or(GgmlDType::F32)
    }
}

/// The layers llama.cpp's Q4_K_M gives more bits: the first and last eighth, and every third
/// between.
fn more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// Where a checkpoint came from, recorded in the cached copy.
#[derive(Debug, Clone)]
pub struct Source {
    /// The repo id, or the local directory.
    pub id: String,
    /// The repo's commit, or a fingerprint of the local files.
    pub revision: String,
    pub dir: PathBuf,
    /// `tokenizer.json` to embed; default: the one in `dir`.
    pub tokenizer: Option<PathBuf>,
}

impl Source {
    /// A local directory: its revision is a fingerprint of its files' names, sizes and times.
    pub fn local(dir: &Path, tokenizer: Option<&Path>) -> Self {
        let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mut h = Fnv::default();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.extend(tokenizer.map(Path::to_path_buf));
        entries.sort();
        for path in entries {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let Some(name) = name else { continue };
            let relevant =
                name == "config.json" || name.ends_with(".json") || name.ends_with(".safetensors");
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !relevant {
                continue;
            }
            h.write(name.as_bytes());
            h.write_u64(meta.len());
            if let Ok(t) = meta.modified()
                && let Ok(d) = t.duration_since(std::time::UNIX_EPOCH)
            {
                h.write_u128(d.as_nanos());
            }
        }
        Self {
            id: canonical.display().to_string(),
            revision: format!("{:016x}", h.finish()),
            dir: dir.to_path_buf(),
            tokenizer: tokenizer.map(Path::to_path_buf),
        }
    }

    /// The cached file's name: what, which quantisation, which revision.
    pub fn file_name(&self, q: Quantization) -> String {
        let base: String = Path::new(&self.id)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let mut h = Fnv::default();
        h.write(self.id.as_bytes());
        let rev: String = self.revision.chars().take(12).collect();
        format!("{base}-{:08x}-{}-{rev}.gguf", h.finish() as u32, q.name())
    }
}

/// A quantised copy ready to load.
#[derive(Debug, Clone)]
pub struct Quantized {
    pub file: PathBuf,
    /// Whether an earlier start's file was used as it was.
    pub reused: bool,
}

/// The GGUF copy of `source` in `q`, from `cache_dir` when an earlier start wrote it, else
/// written now with `threads` quantising.
pub fn quantized_copy(
    source: &Source,
    q: Quantization,
    cache_dir: &Path,
    threads: usize,
) -> Result<Quantized, LoadError> {
    let file = cache_dir.join(source.file_name(q));
    if file.exists() {
        match matches_source(&file, source, q) {
            Ok(()) => {
                tracing::info!(file = %file.display(), quantization = q.name(), "using the quantised copy an earlier start wrote");
                return Ok(Quantized { file, reused: true });
            }
            Err(why) => {
                tracing::warn!(file = %file.display(), "the quantised copy is stale ({why}); writing it again")
            }
        }
    }
    let ckpt = Checkpoint::open(&source.dir, read_config(&source.dir)?)?;
    let shape = ckpt.cfg.shape();
    let tokenizer_file = source
        .tokenizer
        .clone()
        .unwrap_or_else(|| source.dir.join("tokenizer.json"));
    let tokenizer_json =
        std::fs::read_to_string(&tokenizer_file).map_err(|e| LoadError::MissingFile {
            path: tokenizer_file.clone(),
            what: format!("cannot read the tokenizer to embed: {e}"),
        })?;
    let mut metadata = llama_metadata(&shape, &source.id);
    metadata.push(("general.file_type".into(), Value::U32(q.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.push((KEY_SOURCE.into(), Value::String(source.id.clone())));
    metadata.push((KEY_REVISION.into(), Value::String(source.revision.clone())));
    metadata.push((KEY_QUANTIZATION.into(), Value::String(q.name().into())));
    metadata.push((KEY_VERSION.into(), Value::U32(QUANTIZER_VERSION)));
    let eos: Vec<Value> = match &ckpt.cfg.eos_token_id {
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(|v| Value::U32(v as u32))
            .into_iter()
            .collect(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_u64())
            .map(|v| Value::U32(v as u32))
            .collect(),
        _ => Vec::new(),
    };
    if !eos.is_empty() {
        metadata.push((KEY_EOS_IDS.into(), Value::Array(eos)));
    }
    metadata.extend(
        tokenizer_metadata(&tokenizer_json, shape.vocab_size).map_err(|message| {
            LoadError::BadConfig {
                path: tokenizer_file.clone(),
                message,
            }
        })?,
    );
    let weights = ckpt.weights();
    let plan: Vec<PlannedTensor> = weights
        .iter()
        .map(|&w| {
            let dims = w.dims(&shape);
            PlannedTensor {
                name: w.gguf_name(),
                dtype: q.dtype_for(w, shape.num_layers, &dims),
                dims,
            }
        })
        .collect();
    let size = planned_size(&metadata, &plan);
    std::fs::create_dir_all(cache_dir).map_err(|e| LoadError::Read {
        path: cache_dir.to_path_buf(),
        message: format!("cannot make the folder for quantised models: {e}"),
    })?;
    ensure_room(
        cache_dir,
        size,
        &format!("the {} copy of the model", q.name()),
    )?;
    tracing::info!(
        source = %source.id,
        file = %file.display(),
        size = %bytes_words(size),
        "quantising the model to {} once; later starts load the copy",
        q.name()
    );
    let started = Instant::now();
    let mut progress = Progress::new(
        format!("quantising to {}", q.name()),
        plan.len() as u64,
        Unit::Tensors,
    );
    let result = write_gguf_streaming(&file, &metadata, &plan, |i, planned| {
        let weight = weights[i];
        let fail = |e: candle_core::Error| super::gguf_write::WriteError::Tensor {
            name: planned.name.clone(),
            message: e.to_string(),
        };
        let t = ckpt
            .tensor(&weight.hf_name(), &Device::Cpu, DType::F32)
            .map_err(|e| super::gguf_write::WriteError::Tensor {
                name: planned.name.clone(),
                message: e.to_string(),
            })?;
        let t = to_gguf_layout(weight, t, &shape).map_err(fail)?;
        let bytes = quantize_rows(&t, planned.dtype, threads).map_err(fail)?;
        progress.advance(1);
        Ok(bytes)
    });
    progress.finish();
    result.map_err(|e| LoadError::Read {
        path: file.clone(),
        message: format!("writing the quantised copy: {e}"),
    })?;
    tracing::info!(
        file = %file.display(),
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "quantised copy written"
    );
    Ok(Quantized {
        file,
        reused: false,
    })
}

/// Whether `file` was written from this source, revision and quantisation by this quantiser.
fn matches_source(file: &Path, source: &Source, q: Quantization) -> Result<(), String> {
    let mut f = std::fs::File::open(file).map_err(|e| e.to_string())?;
    let content = gguf_file::Content::read(&mut f).map_err(|e| e.to_string())?;
    let text = |k: &str| {
        content
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_default()
    };
    let version = content
        .metadata
        .get(KEY_VERSION)
        .and_then(|v| v.to_u32().ok());
    if text(KEY_REVISION) != source.revision {
        return Err(format!(
            "revision {} is not {}",
            text(KEY_REVISION),
            source.revision
        ));
    }
    if text(KEY_QUANTIZATION) != q.name() {
        return Err(format!(
            "quantisation {} is not {}",
            text(KEY_QUANTIZATION),
            q.name()
        ));
    }
    if version != Some(QUANTIZER_VERSION) {
        return Err(format!(
            "written by quantiser {version:?}, this is {QUANTIZER_VERSION}"
        ));
    }
    Ok(())
}

/// `general.*` and `llama.*` metadata for a model of `shape`.
pub fn llama_metadata(shape: &LlamaShape, name: &str) -> Vec<(String, Value)> {
    let u32v = |v: usize| Value::U32(v as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("llama.context_length".into(), u32v(shape.max_position)),
        ("llama.embedding_length".into(), u32v(shape.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32v(shape.intermediate_size),
        ),
        ("llama.block_count".into(), u32v(shape.num_layers)),
        ("llama.attention.head_count".into(), u32v(shape.num_heads)),
        (
            "llama.attention.head_count_kv".into(),
            u32v(shape.num_kv_heads),
        ),
        ("llama.rope.dimension_count".into(), u32v(shape.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(shape.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(shape.rope_theta)),
        ("llama.vocab_size".into(), u32v(shape.vocab_size)),
    ]
}

/// A Hugging Face tensor in GGUF's layout: q and k rows reordered as llama.cpp's converter
/// does, so interleaved rotary pairs compute what half-split pairs compute.
pub fn to_gguf_layout(
    weight: Weight,
    t: Tensor,
    shape: &LlamaShape,
) -> candle_core::Result<Tensor> {
    let heads = match weight {
        Weight::Layer(_, LayerWeight::Q) => shape.num_heads,
        Weight::Layer(_, LayerWeight::K) => shape.num_kv_heads,
        _ => return Ok(t),
    };
    let (rows, cols) = t.dims2()?;
    let hd = rows / heads;
    t.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The bytes of `t` in `dtype`, its rows split across `threads` (blocks never cross rows, so
/// the pieces join into what one call would make).
pub fn quantize_rows(t: &Tensor, dtype: GgmlDType, threads: usize) -> candle_core::Result<Vec<u8>> {
    let t = &t.to_dtype(DType::F32)?;
    let rows = if t.rank() == 2 { t.dim(0)? } else { 1 };
    let threads = threads.clamp(1, rows.max(1));
    if threads == 1 || t.rank() != 2 {
        return Ok(QTensor::quantize(t, dtype)?.data()?.into_owned());
    }
    let per = rows.div_ceil(threads);
    let parts: Vec<candle_core::Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|start| {
                let len = per.min(rows - start);
                s.spawn(move || -> candle_core::Result<Vec<u8>> {
                    // A storage of its own: candle quantises a view's whole storage.
                    let cols = t.dim(1)?;
                    let rows = t.narrow(0, start, len)?.flatten_all()?.to_vec1::<f32>()?;
                    let part = Tensor::from_vec(rows, (len, cols), t.device())?;
                    Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(candle_core::Error::Msg(
                        "a quantising thread panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_llama_cpps_layers_more_bits() {
        // 32 layers: 0-3 and 28-31, and every third from 6.
        let more: Vec<usize> = (0..32).filter(|&l| more_bits(l, 32)).collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let q = Quantization::Q4KM;
        let v = |l| q.dtype_for(Weight::Layer(l, LayerWeight::V), 32, &[4096, 4096]);
        assert_eq!((v(0), v(4)), (GgmlDType::Q6K, GgmlDType::Q4K));
        let out = q.dtype_for(Weight::Global(GlobalWeight::LmHead), 32, &[32000, 4096]);
        assert_eq!(out, GgmlDType::Q6K);
        let norm = q.dtype_for(Weight::Layer(0, LayerWeight::AttnNorm), 32, &[4096]);
        assert_eq!(norm, GgmlDType::F32);
        // Rows of 96 are not whole 256-blocks: Q8_0; rows of 20 not whole 32-blocks: f16.
        let odd = |cols| q.dtype_for(Weight::Layer(5, LayerWeight::Up), 32, &[64, cols]);
        assert_eq!((odd(96), odd(20)), (GgmlDType::Q8_0, GgmlDType::F16));
    }

    #[test]
    fn quantising_rows_on_several_threads_makes_the_bytes_one_call_makes() {
        let n = 37 * 512;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 300.0)
            .collect();
        let t = Tensor::from_vec(v, (37, 512), &Device::Cpu).unwrap();
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::F32,
        ] {
            let one = QTensor::quantize(&t, dtype)
                .unwrap()
                .data()
                .unwrap()
                .into_owned();
            assert_eq!(quantize_rows(&t, dtype, 4).unwrap(), one, "{dtype:?}");
        }
    }

    #[test]
    fn a_changed_file_or_quantisation_names_a_new_copy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let a = Source::local(dir.path(), None);
        assert_eq!(a.revision, Source::local(dir.path(), None).revision);
        assert_ne!(
            a.file_name(Quantization::Q4KM),
            a.file_name(Quantization::Q8_0)
        );
        std::fs::write(dir.path().join("config.json"), "{ }").unwrap();
        let b = Source::local(dir.path(), None);
        assert_ne!(a.revision, b.revision);
        assert_ne!(
            a.file_name(Quantization::Q4KM),
            b.file_name(Quantization::Q4KM)
        );
    }
}
