//! Quantised weights from one GGUF file (llama.cpp's format): the shape from its metadata, every
//! tensor checked, the matrices kept quantised and the norms expanded.

use crate::config::KvCacheDType;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};
use candle_core::{DType, Device};

use super::gguf_vocab::embedded_tokenizer;
use super::hf::{eos_ids, load_tokenizer, tokenizer_path};
use super::names::{GlobalWeight, LayerWeight};
use super::progress::{Progress, Unit, file_label};
use super::quantize::KEY_EOS_IDS;
use super::{LoadError, LoadOptions, LoadedModel, WeightFormat};
use crate::inference::model::{Layer, LlamaModel, LlamaShape};
use crate::inference::tokenizer::TextTokenizer;

pub(super) fn load_gguf(
    path: &Path,
    opts: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
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
    let embed_name = GlobalWeight::Embed.gguf();
    let embed_dims = info(embed_name)?;
    if embed_dims.len() != 2 || embed_dims[1] != hidden {
        return Err(LoadError::WrongShape {
            path: path.to_path_buf(),
            name: embed_name.into(),
            expected: vec![0, hidden],
            actual: embed_dims,
        });
    }
    let vocab = embed_dims[0];
    let intermediate = info(&LayerWeight::Gate.gguf_name(0))?
        .first()
        .copied()
        .unwrap_or(0);
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
    expect(GlobalWeight::Norm.gguf(), &GlobalWeight::Norm.dims(&shape))?;
    for l in 0..num_layers {
        for w in LayerWeight::all() {
            expect(&w.gguf_name(l), &w.dims(&shape))?;
        }
    }

    // The tokenizer named, else the one beside the file, else the one the file carries.
    let beside = tokenizer_path(path, opts.tokenizer.as_deref());
    let tokenizer = match embedded_tokenizer(&content.metadata) {
        Some(json) if opts.tokenizer.is_none() && !beside.exists() => {
            let t =
                TextTokenizer::from_bytes(json.as_bytes()).map_err(|e| LoadError::BadConfig {
                    path: path.to_path_buf(),
                    message: format!("the tokenizer it carries: {e}"),
                })?;
            if t.vocab_size() > vocab {
                return Err(LoadError::VocabMismatch {
                    model: vocab,
                    tokenizer: t.vocab_size(),
                });
            }
            t
        }
        _ => load_tokenizer(path, opts.tokenizer.as_deref(), vocab)?,
    };
    let config_eos: Option<serde_json::Value> = content
        .metadata
        .get(KEY_EOS_IDS)
        .and_then(|v| v.to_vec().ok())
        .map(|ids| {
            serde_json::Value::Array(
                ids.iter()
                    .filter_map(|v| v.to_u32().ok())
                    .map(serde_json::Value::from)
                    .collect(),
            )
        });
    let lm_head_name = GlobalWeight::LmHead.gguf();
    let has_lm_head = content.tensor_infos.contains_key(lm_head_name);
    let tensors = 2 + LayerWeight::all().count() * num_layers + usize::from(has_lm_head);
    let mut progress = Progress::new(
        format!("loading {}", file_label(path)),
        tensors as u64,
        Unit::Tensors,
    );
    let mut qt = |name: &str| {
        let t = content
            .tensor(&mut file, name, device)
            .map_err(|e| read_err(format!("tensor `{name}`: {e}")));
        progress.advance(1);
        t
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
    let embed_q = qt(embed_name)?;
    note(embed_q.dtype());
    let embed = QMatMul::from_qtensor(embed_q).map_err(|e| read_err(e.to_string()))?;
    let norm = dense(qt(GlobalWeight::Norm.gguf())?)?;
    let lm_head = match has_lm_head {
        true => {
            let q = qt(lm_head_name)?;
            note(q.dtype());
            QMatMul::from_qtensor(q).map_err(|e| read_err(e.to_string()))?
        }
        false => embed.clone(),
    };
    let mut layers = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let mut lin = |w: LayerWeight| -> Result<QMatMul, LoadError> {
            let q = qt(&w.gguf_name(l))?;
            note(q.dtype());
            QMatMul::from_qtensor(q).map_err(|e| read_err(e.to_string()))
        };
        let qkv = [
            lin(LayerWeight::Q)?,
            lin(LayerWeight::K)?,
            lin(LayerWeight::V)?,
        ];
        let wo = lin(LayerWeight::O)?;
        let gate_up = [lin(LayerWeight::Gate)?, lin(LayerWeight::Up)?];
        let w_down = lin(LayerWeight::Down)?;
        let attn_norm = dense(qt(&LayerWeight::AttnNorm.gguf_name(l))?)?;
        let ffn_norm = dense(qt(&LayerWeight::FfnNorm.gguf_name(l))?)?;
        layers.push(
            Layer::new(attn_norm, qkv, wo, ffn_norm, gate_up, w_down)
                .map_err(|e| read_err(format!("layer {l}: {e}")))?,
        );
    }
    progress.finish();
    let mut model = LlamaModel::new(
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
    model.use_f32_cache(opts.kv_cache == KvCacheDType::F32);
    let weight_bytes = path.metadata().map(|m| m.len()).unwrap_or(0);
    let compact = super::compact_weights(
        opts.cpu_weights,
        weight_bytes,
        super::available_memory(),
        super::Loops::detected(),
    );
    model.use_compact_weights(compact);
    tracing::info!(
        compact = model.compact_weights(),
        "quantised weights: {}",
        if model.compact_weights() {
            "multiplied in their stored blocks (one copy)"
        } else {
            "through candle's kernels (repacked copies on first use)"
        }
    );
    let eos = eos_ids(config_eos.as_ref(), &tokenizer);
    Ok(LoadedModel {
        model,
        tokenizer: Arc::new(tokenizer),
        format: WeightFormat::Gguf {
            types: types.join("+"),
        },
        eos_ids: eos,
        source: path.to_path_buf(),
        weight_bytes,
        quantized: None,
    })
}
