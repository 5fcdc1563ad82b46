//! Seeded random-weight Llama models written as a Hugging Face safetensors directory or as GGUF,
//! for tests and `bench --random`. candle's own RNG cannot be seeded, so values come from our
//! generator and the same seed always writes the same weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::inference::LlamaShape;
use crate::inference::load::names::{GlobalWeight, LayerWeight, Weight};

/// Bumped whenever the generator's output changes, so cached test models are rewritten.
pub const GENERATOR_VERSION: u32 = 1;

/// Named shapes: `tiny` for tests, `small` (about 134M parameters) for benchmarks, `7b` for
/// Synthia-7B's real size.
pub fn named_shape(name: &str) -> Option<LlamaShape> {
    let base = |hidden, inter, layers, heads, kv| LlamaShape {
        vocab_size: 32000,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position: 4096,
    };
    match name {
        "tiny" => Some(base(256, 512, 2, 4, 2)),
        "small" => Some(base(768, 2048, 12, 12, 12)),
        "7b" => Some(base(4096, 11008, 32, 32, 32)),
        _ => None,
    }
}

/// SplitMix64: tiny, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Tensor of `dims` with values uniform in [-scale, scale), or `offset + that`.
fn random(rng: &mut Rng, dims: &[usize], scale: f32, offset: f32) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| offset + rng.next_f32() * scale).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// The weights of a random model under Hugging Face names, generated in a fixed order.
pub fn random_weights(shape: &LlamaShape, seed: u64) -> candle_core::Result<Vec<(String, Tensor)>> {
    Ok(generate(shape, seed)?
        .into_iter()
        .map(|(w, t)| (w.hf_name(), t))
        .collect())
}

/// Every weight in checkpoint order, each drawn from one seeded stream.
fn generate(shape: &LlamaShape, seed: u64) -> candle_core::Result<Vec<(Weight, Tensor)>> {
    let mut rng = Rng(seed);
    let s = shape;
    let h = s.hidden_size as f32;
    let lin = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
    let mut weights = vec![Weight::Global(GlobalWeight::Embed)];
    for l in 0..s.num_layers {
        weights.extend(LayerWeight::all().map(|w| Weight::Layer(l, w)));
    }
    weights.push(Weight::Global(GlobalWeight::Norm));
    weights.push(Weight::Global(GlobalWeight::LmHead));
    let mut out = Vec::with_capacity(weights.len());
    for w in weights {
        let dims = w.dims(s);
        // Norms near 1, projections scaled by their fan-in (the columns).
        let (scale, offset) = match w {
            Weight::Global(GlobalWeight::Norm)
            | Weight::Layer(_, LayerWeight::AttnNorm | LayerWeight::FfnNorm) => (0.1, 1.0),
            Weight::Global(GlobalWeight::Embed) => (1.0, 0.0),
            // Spread-out logits, so greedy choices are not near-ties that rounding could flip.
            Weight::Global(GlobalWeight::LmHead) => (4.0 / h.sqrt(), 0.0),
            Weight::Layer(_, LayerWeight::O | LayerWeight::Down) => (lin(dims[1]) * 0.5, 0.0),
            Weight::Layer(
                _,
                LayerWeight::Q
                | LayerWeight::K
                | LayerWeight::V
                | LayerWeight::Gate
                | LayerWeight::Up,
            ) => (lin(dims[1]), 0.0),
        };
        out.push((w, random(&mut rng, &dims, scale, offset)?));
    }
    Ok(out)
}

/// `config.json` of a Llama model of this shape.
pub fn hf_config(shape: &LlamaShape) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": shape.max_position,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    })
}

/// Writes a Hugging Face model directory: config.json, tokenizer.json and the weights in one
/// file or `shards` files with an index.
pub fn write_hf_dir(
    dir: &Path,
    shape: &LlamaShape,
    seed: u64,
    tokenizer_json: &Path,
    shards: usize,
    dtype: DType,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&hf_config(shape))?,
    )?;
    std::fs::copy(tokenizer_json, dir.join("tokenizer.json"))?;
    let weights = random_weights(shape, seed)?;
    let shards = shards.max(1);
    if shards == 1 {
        let map: HashMap<String, Tensor> = weights
            .into_iter()
            .map(|(n, t)| t.to_dtype(dtype).map(|t| (n, t)))
            .collect::<candle_core::Result<_>>()?;
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        return Ok(());
    }
    let per = weights.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in weights.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let mut map = HashMap::new();
        for (name, t) in chunk {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
            map.insert(name.clone(), t.to_dtype(dtype)?);
        }
        candle_core::safetensors::save(&map, dir.join(&file))?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index)?,
    )?;
    Ok(())
}

/// Reorders q/k rows the way llama.cpp's converter does, so interleaved rotary pairs in GGUF
/// compute what half-split pairs compute on the Hugging Face layout.
fn permute_for_gguf(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// GGUF quantisation presets: Q4_K_M keeps the output and value projections in Q6_K, like
/// llama.cpp's preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufPreset {
    F32,
    F16,
    Q8_0,
    Q4KM,
}

impl GgufPreset {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Q8_0),
            "q4_k_m" | "q4_k" => Some(Self::Q4KM),
            _ => None,
        }
    }

    fn dtype_for(self, weight: Weight) -> GgmlDType {
        if weight.is_norm() {
            return GgmlDType::F32;
        }
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4KM
                if matches!(
                    weight,
                    Weight::Global(GlobalWeight::LmHead) | Weight::Layer(_, LayerWeight::V)
                ) =>
            {
                GgmlDType::Q6K
            }
            Self::Q4KM => GgmlDType::Q4K,
        }
    }
}

/// Writes the same random weights as [`write_hf_dir`] as one GGUF file.
pub fn write_gguf(
    path: &Path,
    shape: &LlamaShape,
    seed: u64,
    preset: GgufPreset,
) -> anyhow::Result<()> {
    let weights = generate(shape, seed)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(weights.len());
    for (weight, t) in weights {
        let t = match weight {
            Weight::Layer(_, LayerWeight::Q) => permute_for_gguf(&t, shape.num_heads)?,
            Weight::Layer(_, LayerWeight::K) => permute_for_gguf(&t, shape.num_kv_heads)?,
            _ => t,
        };
        let q = QTensor::quantize(&t, preset.dtype_for(weight))?;
        tensors.push((weight.gguf_name(), q));
    }
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let metadata: Vec<(&str, gguf_file::Value)> = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        (
            "general.name",
            gguf_file::Value::String("synthia-bot random test model".into()),
        ),
        ("llama.context_length", u32v(shape.max_position)),
        ("llama.embedding_length", u32v(shape.hidden_size)),
        ("llama.feed_forward_length", u32v(shape.intermediate_size)),
        ("llama.block_count", u32v(shape.num_layers)),
        ("llama.attention.head_count", u32v(shape.num_heads)),
        ("llama.attention.head_count_kv", u32v(shape.num_kv_heads)),
        ("llama.rope.dimension_count", u32v(shape.head_dim)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(shape.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base",
            gguf_file::Value::F32(shape.rope_theta),
        ),
    ];
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &md, &ts)?;
    Ok(())
}
