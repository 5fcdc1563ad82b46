//! Seeded random-weight Llama models written as a Hugging Face safetensors directory or as GGUF,
//! for tests and `bench --random`. candle's own RNG cannot be seeded, so values come from our
//! generator and the same seed always writes the same weights.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::inference::LlamaShape;
use crate::inference::load::gguf_vocab::tokenizer_metadata;
use crate::inference::load::gguf_write::{PlannedTensor, WriteError, write_gguf_streaming};
use crate::inference::load::names::{GlobalWeight, LayerWeight, Weight};
use crate::inference::load::quantize::{
    Quantization, llama_metadata, quantize_rows, to_gguf_layout,
};

/// Bumped whenever the generator's output changes, so cached test models are rewritten.
/// 2: GGUF files carry the tokenizer, and Q4_K_M follows llama.cpp's mix.
pub const GENERATOR_VERSION: u32 = 2;

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
    let mut weights_gen = Generator::new(shape, seed);
    weights_gen
        .order()
        .into_iter()
        .map(|w| Ok((w.hf_name(), weights_gen.next(w)?)))
        .collect()
}

/// Every weight in checkpoint order, each drawn from one seeded stream, made one at a time so
/// a 7B model is written without holding it.
struct Generator {
    rng: Rng,
    shape: LlamaShape,
}

impl Generator {
    fn new(shape: &LlamaShape, seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            shape: shape.clone(),
        }
    }

    /// The order weights are drawn in (and written in).
    fn order(&self) -> Vec<Weight> {
        let mut weights = vec![Weight::Global(GlobalWeight::Embed)];
        for l in 0..self.shape.num_layers {
            weights.extend(LayerWeight::all().map(|w| Weight::Layer(l, w)));
        }
        weights.push(Weight::Global(GlobalWeight::Norm));
        weights.push(Weight::Global(GlobalWeight::LmHead));
        weights
    }

    /// The next weight of the stream; call in [`Self::order`].
    fn next(&mut self, w: Weight) -> candle_core::Result<Tensor> {
        let h = self.shape.hidden_size as f32;
        let lin = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
        let dims = w.dims(&self.shape);
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
        random(&mut self.rng, &dims, scale, offset)
    }
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
/// file or `shards` files with an index, one tensor in memory at a time.
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
    let ggml = match dtype {
        DType::F32 => GgmlDType::F32,
        DType::F16 => GgmlDType::F16,
        DType::BF16 => GgmlDType::BF16,
        other => anyhow::bail!("random safetensors in {other:?} are not supported"),
    };
    let mut weights_gen = Generator::new(shape, seed);
    let order = weights_gen.order();
    let shards = shards.max(1);
    let per = order.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in order.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let entries: Vec<(String, Vec<usize>)> =
            chunk.iter().map(|w| (w.hf_name(), w.dims(shape))).collect();
        for (name, _) in &entries {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
        write_safetensors_streaming(&dir.join(&file), &entries, ggml, |j| {
            let t = weights_gen.next(chunk[j])?;
            Ok(QTensor::quantize(&t, ggml)?.data()?.into_owned())
        })?;
    }
    if shards > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index)?,
        )?;
    }
    Ok(())
}

/// Writes a safetensors file whose header (names, shapes, offsets) is known up front, asking
/// `data(i)` for each tensor's bytes in order.
fn write_safetensors_streaming(
    path: &Path,
    entries: &[(String, Vec<usize>)],
    dtype: GgmlDType,
    mut data: impl FnMut(usize) -> candle_core::Result<Vec<u8>>,
) -> anyhow::Result<()> {
    let (name, width) = match dtype {
        GgmlDType::F32 => ("F32", 4),
        GgmlDType::F16 => ("F16", 2),
        GgmlDType::BF16 => ("BF16", 2),
        other => anyhow::bail!("safetensors cannot hold {other:?}"),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (tensor, dims) in entries {
        let bytes = dims.iter().product::<usize>() * width;
        header.insert(
            tensor.clone(),
            serde_json::json!({ "dtype": name, "shape": dims, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_vec(&header)?;
    // The data starts 8-byte aligned.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(b' ');
    }
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(&text)?;
    for (i, (tensor, dims)) in entries.iter().enumerate() {
        let bytes = data(i)?;
        anyhow::ensure!(
            bytes.len() == dims.iter().product::<usize>() * width,
            "tensor {tensor}: {} bytes for {dims:?}",
            bytes.len()
        );
        w.write_all(&bytes)?;
    }
    w.flush()?;
    Ok(())
}

/// GGUF presets of the random models: dense, or quantised as models are at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufPreset {
    F32,
    F16,
    Quantized(Quantization),
}

impl GgufPreset {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "q8_0" => Some(Self::Quantized(Quantization::Q8_0)),
            "q4_k_m" | "q4_k" => Some(Self::Quantized(Quantization::Q4KM)),
            _ => None,
        }
    }

    fn dtype_for(self, weight: Weight, shape: &LlamaShape) -> GgmlDType {
        match self {
            _ if weight.is_norm() => GgmlDType::F32,
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Quantized(q) => q.dtype_for(weight, shape.num_layers, &weight.dims(shape)),
        }
    }
}

/// Writes the same random weights as [`write_hf_dir`] as one GGUF file carrying the tokenizer
/// (for our loader and llama.cpp's), one tensor in memory at a time.
pub fn write_gguf(
    path: &Path,
    shape: &LlamaShape,
    seed: u64,
    preset: GgufPreset,
    tokenizer_json: &Path,
) -> anyhow::Result<()> {
    let mut metadata = llama_metadata(shape, "synthia-bot random test model");
    let json = std::fs::read_to_string(tokenizer_json)?;
    metadata.extend(tokenizer_metadata(&json, shape.vocab_size).map_err(anyhow::Error::msg)?);
    let mut weights_gen = Generator::new(shape, seed);
    let order = weights_gen.order();
    let plan: Vec<PlannedTensor> = order
        .iter()
        .map(|&w| PlannedTensor {
            name: w.gguf_name(),
            dims: w.dims(shape),
            dtype: preset.dtype_for(w, shape),
        })
        .collect();
    write_gguf_streaming(path, &metadata, &plan, |i, planned| {
        let fail = |e: candle_core::Error| WriteError::Tensor {
            name: planned.name.clone(),
            message: e.to_string(),
        };
        let t = weights_gen.next(order[i]).map_err(fail)?;
        let t = to_gguf_layout(order[i], t, shape).map_err(fail)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        quantize_rows(&t, planned.dtype, threads).map_err(fail)
    })?;
    Ok(())
}
