//! Dense weights from a Hugging Face directory: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Every name and shape is checked before any tensor is read.

use crate::config::KvCacheDType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};

use super::hf::{HfConfig, eos_ids, load_tokenizer, read_hf_config};
use super::names::{GlobalWeight, LayerWeight, Weight};
use super::progress::{Progress, Unit, file_label};
use super::{LoadError, LoadOptions, LoadedModel, WeightFormat, select_dtype};
use crate::inference::model::{Layer, LlamaModel};

/// The index file of a sharded checkpoint.
pub(super) const INDEX_FILE: &str = "model.safetensors.index.json";

/// The shard files an index's `weight_map` names, each once, sorted.
pub(super) fn index_shards(index: &Path) -> Result<Vec<String>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|e| LoadError::Read {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| LoadError::BadConfig {
            path: index.to_path_buf(),
            message: e.to_string(),
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::BadConfig {
            path: index.to_path_buf(),
            message: "no weight_map".into(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The weight files of a directory: an index of shards, or one `model.safetensors`.
fn safetensor_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let files: Vec<PathBuf> = index_shards(&index)?
            .into_iter()
            .map(|f| dir.join(f))
            .collect();
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

/// A checkpoint directory opened and checked: its config, its weight files memory-mapped, and
/// every tensor's name and shape confirmed before any is read.
pub(super) struct Checkpoint {
    pub(super) cfg: HfConfig,
    pub(super) files: Vec<PathBuf>,
    st: candle_core::safetensors::MmapedSafetensors,
    available: HashMap<String, (Vec<usize>, PathBuf)>,
    /// The output projection is the embedding's (no `lm_head.weight` of its own).
    pub(super) tied: bool,
    /// The one weight file, or the directory when sharded, for messages.
    weight_path: PathBuf,
}

/// A model directory's `config.json`, read and checked.
pub(super) fn read_config(dir: &Path) -> Result<HfConfig, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(LoadError::MissingFile {
            path: config_path,
            what: "missing: a model directory needs config.json".into(),
        });
    }
    read_hf_config(&config_path)
}

impl Checkpoint {
    /// Opens the weights `cfg` (the directory's config) describes.
    pub(super) fn open(dir: &Path, cfg: HfConfig) -> Result<Self, LoadError> {
        let files = safetensor_files(dir)?;
        let shape = cfg.shape();
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
        let check_global = |g: GlobalWeight| check(g.hf(), &g.dims(&shape));
        check_global(GlobalWeight::Embed)?;
        check_global(GlobalWeight::Norm)?;
        let tied = cfg.tie_word_embeddings && !available.contains_key(GlobalWeight::LmHead.hf());
        if !tied {
            check_global(GlobalWeight::LmHead)?;
        }
        for l in 0..shape.num_layers {
            for w in LayerWeight::all() {
                check(&w.hf_name(l), &w.dims(&shape))?;
            }
        }
        Ok(Self {
            cfg,
            files,
            st,
            available,
            tied,
            weight_path,
        })
    }

    /// Every weight the checkpoint holds, in checkpoint order (the output projection last,
    /// unless it is the embedding's).
    pub(super) fn weights(&self) -> Vec<Weight> {
        let mut out = vec![Weight::Global(GlobalWeight::Embed)];
        for l in 0..self.cfg.shape().num_layers {
            out.extend(LayerWeight::all().map(|w| Weight::Layer(l, w)));
        }
        out.push(Weight::Global(GlobalWeight::Norm));
        if !self.tied {
            out.push(Weight::Global(GlobalWeight::LmHead));
        }
        out
    }

    /// One tensor, read from the mapped file and converted to `dtype` on `device`.
    pub(super) fn tensor(
        &self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, LoadError> {
        self.st
            .load(name, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| LoadError::Read {
                path: self
                    .available
                    .get(name)
                    .map(|a| a.1.clone())
                    .unwrap_or_else(|| self.weight_path.clone()),
                message: format!("tensor `{name}`: {e}"),
            })
    }

    /// Total size of the weight files.
    pub(super) fn weight_bytes(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

pub(super) fn load_safetensors_dir(
    dir: &Path,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let cfg = read_config(dir)?;
    let tokenizer = load_tokenizer(dir, opts.tokenizer.as_deref(), cfg.vocab_size)?;
    let ckpt = Checkpoint::open(dir, cfg)?;
    let cfg = &ckpt.cfg;
    let dtype = select_dtype(opts.dtype, device);
    let shape = cfg.shape();
    let progress = std::cell::RefCell::new(Progress::new(
        format!("loading {}", file_label(&ckpt.weight_path)),
        ckpt.weights().len() as u64,
        Unit::Tensors,
    ));
    let get = |name: &str| {
        let t = ckpt.tensor(name, device, dtype);
        progress.borrow_mut().advance(1);
        t
    };
    let linear = |name: &str| -> Result<QMatMul, LoadError> { Ok(QMatMul::Tensor(get(name)?)) };
    let embed = QMatMul::Tensor(get(GlobalWeight::Embed.hf())?);
    let lm_head = if ckpt.tied {
        embed.clone()
    } else {
        linear(GlobalWeight::LmHead.hf())?
    };
    let mut layers = Vec::with_capacity(shape.num_layers);
    for l in 0..shape.num_layers {
        let name = |w: LayerWeight| w.hf_name(l);
        let attn_norm = get(&name(LayerWeight::AttnNorm))?;
        let qkv = [
            linear(&name(LayerWeight::Q))?,
            linear(&name(LayerWeight::K))?,
            linear(&name(LayerWeight::V))?,
        ];
        let wo = linear(&name(LayerWeight::O))?;
        let ffn_norm = get(&name(LayerWeight::FfnNorm))?;
        let gate_up = [
            linear(&name(LayerWeight::Gate))?,
            linear(&name(LayerWeight::Up))?,
        ];
        let w_down = linear(&name(LayerWeight::Down))?;
        let layer = Layer::new(attn_norm, qkv, wo, ffn_norm, gate_up, w_down).map_err(|e| {
            LoadError::Read {
                path: ckpt.weight_path.clone(),
                message: format!("layer {l}: {e}"),
            }
        })?;
        layers.push(layer);
    }
    let norm = get(GlobalWeight::Norm.hf())?;
    progress.into_inner().finish();
    let mut model = LlamaModel::new(shape, embed, layers, norm, lm_head, false, device, dtype)
        .map_err(|e| LoadError::Read {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    model.use_f32_cache(opts.kv_cache == KvCacheDType::F32);
    let eos = eos_ids(cfg.eos_token_id.as_ref(), &tokenizer);
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        format: WeightFormat::Safetensors {
            dtype,
            files: ckpt.files.len(),
        },
        eos_ids: eos,
        source: dir.to_path_buf(),
        weight_bytes: ckpt.weight_bytes(),
        quantized: None,
    })
}
