//! Our own Llama forward pass over candle ops. Unlike candle-transformers' Llama it keeps one
//! attention cache per conversation that can be cut back to a shared prefix, so a follow-up turn
//! only computes its new tokens. Dense (safetensors) and quantized (GGUF) weights share it through
//! `QMatMul`.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Tensor};

pub use super::cache::SeqCache;
use super::kernels;
use super::projection::{SharedInput, linear, split};

mod attention;

/// Architecture numbers of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position: usize,
}

impl LlamaShape {
    /// Bytes of attention cache one token takes (keys and values, every layer).
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

pub(crate) struct Layer {
    attn_norm: Tensor,
    /// q, k and v, stacked where they are quantised alike.
    qkv: SharedInput,
    wo: QMatMul,
    ffn_norm: Tensor,
    /// gate and up, stacked where they are quantised alike.
    gate_up: SharedInput,
    w_down: QMatMul,
}

impl Layer {
    /// A layer of the given weights; q/k/v and gate/up are stacked here where they can be.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        attn_norm: Tensor,
        [wq, wk, wv]: [QMatMul; 3],
        wo: QMatMul,
        ffn_norm: Tensor,
        [w_gate, w_up]: [QMatMul; 2],
        w_down: QMatMul,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            attn_norm,
            qkv: SharedInput::new(vec![wq, wk, wv])?,
            wo,
            ffn_norm,
            gate_up: SharedInput::new(vec![w_gate, w_up])?,
            w_down,
        })
    }
}

pub struct LlamaModel {
    pub shape: LlamaShape,
    /// Token embeddings; GGUF keeps them quantised (only looked-up rows are expanded).
    pub(crate) embed: QMatMul,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Tensor,
    pub(crate) lm_head: QMatMul,
    cos: Tensor,
    sin: Tensor,
    /// GGUF checkpoints store q/k rows permuted for interleaved rotary pairs.
    interleaved_rope: bool,
    device: Device,
    dtype: DType,
    cache: CacheKind,
    /// `cos` and `sin` on the host, `[position][head_dim / 2]`, for the CPU path.
    host_cos: Vec<f32>,
    host_sin: Vec<f32>,
    /// Quantised weights multiplied in their stored blocks by our kernels (`model.cpu_weights`).
    compact: bool,
}

/// Where attention runs and what its cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Device tensors in the model's dtype, attention through candle ops (GPU, or a CPU model
    /// in f16/bf16).
    Tensors,
    /// Host buffers of f16 or f32 read by our attention kernel (a CPU model in f32).
    Host { half: bool },
}

/// One sequence's part of a batched step: its new tokens and its cache.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
}

impl LlamaModel {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shape: LlamaShape,
        embed: QMatMul,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: QMatMul,
        interleaved_rope: bool,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let half = shape.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / shape
                    .rope_theta
                    .powf((2 * i) as f32 / shape.head_dim as f32)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, shape.max_position as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((shape.max_position, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        let cos = freqs.cos()?;
        let sin = freqs.sin()?;
        let cache = if device.is_cpu() && dtype == DType::F32 {
            CacheKind::Host { half: true }
        } else {
            CacheKind::Tensors
        };
        let (host_cos, host_sin) = match cache {
            CacheKind::Host { .. } => (
                cos.flatten_all()?.to_vec1::<f32>()?,
                sin.flatten_all()?.to_vec1::<f32>()?,
            ),
            CacheKind::Tensors => (Vec::new(), Vec::new()),
        };
        let cos = cos.to_dtype(dtype)?;
        let sin = sin.to_dtype(dtype)?;
        Ok(Self {
            shape,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            interleaved_rope,
            device: device.clone(),
            dtype,
            cache,
            host_cos,
            host_sin,
            compact: false,
        })
    }

    /// Multiplies quantised weights in their stored blocks with our kernels (one copy of the
    /// weights) instead of candle's, which keep a repacked copy beside them. Taken only where
    /// our kernels run: a CPU model in f32 on a CPU with AVX2 or AVX-512.
    pub fn use_compact_weights(&mut self, on: bool) {
        self.compact = on
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && kernels::quant::Loops::detected() != kernels::quant::Loops::Portable;
    }

    /// Whether quantised weights are multiplied in their stored blocks.
    pub fn compact_weights(&self) -> bool {
        self.compact
    }

    /// Keeps a CPU model's attention cache in f32 instead of f16 (`model.kv_cache_dtype`):
    /// twice the memory, for results that match an f32 reference exactly.
    pub fn use_f32_cache(&mut self, f32_cache: bool) {
        if let CacheKind::Host { half } = &mut self.cache {
            *half = !f32_cache;
        }
    }

    /// The element type attention caches hold.
    pub fn cache_dtype(&self) -> DType {
        match self.cache {
            CacheKind::Host { half: true } => DType::F16,
            CacheKind::Host { half: false } => DType::F32,
            CacheKind::Tensors => self.dtype,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache::new(self.shape.num_layers)
    }

    /// Runs `tokens` after what `cache` holds and returns the last position's logits (f32,
    /// `[vocab]`). Fails, never panics, past the context window.
    pub fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> candle_core::Result<Tensor> {
        self.forward_batch(&mut [BatchItem { tokens, cache }])?
            .squeeze(0)
    }

    /// One step for several sequences at once: every weight is read once for all of them. Each
    /// sequence brings its own tokens (one while decoding, a chunk while reading its prompt), its
    /// own positions and its own cache. Returns each sequence's last logits, `[n, vocab]` f32.
    pub fn forward_batch(&self, items: &mut [BatchItem<'_>]) -> candle_core::Result<Tensor> {
        let s = &self.shape;
        if items.is_empty() {
            candle_core::bail!("forward needs at least one sequence");
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for item in items.iter() {
            let (t, pos) = (item.tokens.len(), item.cache.len());
            if t == 0 {
                candle_core::bail!("forward needs at least one token per sequence");
            }
            if pos + t > s.max_position {
                candle_core::bail!(
                    "{} positions exceed the context window of {}",
                    pos + t,
                    s.max_position
                );
            }
            spans.push((ids.len(), t, pos));
            ids.extend_from_slice(item.tokens);
            positions.extend((pos..pos + t).map(|p| p as u32));
        }
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self
            .embed
            .embedding(&ids)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?;
        // The candle path's rotary tables and masks; the host path reads its own tables.
        let rotary = match self.cache {
            CacheKind::Tensors => Some(self.rotary(&spans, &positions)?),
            CacheKind::Host { .. } => None,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, s.rms_norm_eps as f32)?;
            let [q, k, v]: [Tensor; 3] = layer
                .qkv
                .forward(&h, self.compact)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("three projections expected".into()))?;
            let y = match self.cache {
                CacheKind::Host { half } => {
                    self.host_attention(li, items, &spans, &positions, &q, &k, &v, half)?
                }
                CacheKind::Tensors => {
                    let Some(rotary) = &rotary else {
                        candle_core::bail!("rotary tables missing");
                    };
                    self.tensor_attention(li, items, &spans, rotary, q, k, v)?
                }
            };
            let x1 = (&x + linear(&layer.wo, &y, self.compact)?)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, s.rms_norm_eps as f32)?;
            let act = gated(&layer.gate_up, &h, self.compact)?;
            x = (&x1 + linear(&layer.w_down, &act, self.compact)?)?;
        }
        for item in items.iter_mut() {
            item.cache.commit(item.tokens);
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|&(off, t, _)| (off + t - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.squeeze(0)?.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, s.rms_norm_eps as f32)?;
        linear(&self.lm_head, &x, self.compact)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    /// One short prompt and one decode step on a scratch cache, so the one-time work of the first
    /// forward (candle repacks quantised weights for its kernels on first use, the prompt
    /// kernels only from 32 rows) happens at start-up and not in the first user's answer.
    pub fn warm_up(&self) -> candle_core::Result<()> {
        let n = WARM_UP_TOKENS
            .min(self.shape.max_position.saturating_sub(1))
            .max(1);
        let vocab = self.shape.vocab_size.max(1);
        let tokens: Vec<u32> = (0..n).map(|i| (i % vocab) as u32).collect();
        let mut cache = self.new_cache();
        let logits = self.forward(&tokens, &mut cache)?;
        if n < self.shape.max_position {
            self.forward(&[argmax(&logits)?], &mut cache)?;
        }
        Ok(())
    }

    /// Runs a prompt, reusing `cache` where it already covers a prefix of `tokens`. Returns the
    /// logits after the last token and how many tokens were reused.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut SeqCache,
        chunk: usize,
    ) -> candle_core::Result<(Tensor, usize)> {
        let reuse = cache.reuse_prefix(tokens);
        let mut logits = None;
        for piece in tokens[reuse..].chunks(chunk.max(1)) {
            logits = Some(self.forward(piece, cache)?);
        }
        match logits {
            Some(l) => Ok((l, reuse)),
            None => candle_core::bail!("empty prompt"),
        }
    }
}

/// `silu(h · gateᵀ) * (h · upᵀ)`. With gate and up stacked in one matrix its f32 product on the
/// host is read in place, each row's two halves; otherwise the two products go to [`silu_mul`].
fn gated(gate_up: &SharedInput, h: &Tensor, compact: bool) -> candle_core::Result<Tensor> {
    use candle_core::Storage;
    let ys = gate_up.forward_stacked(h, compact)?;
    if let [(y, [width, up])] = ys.as_slice()
        && width == up
        && y.dtype() == DType::F32
    {
        let (storage, layout) = y.storage_and_layout();
        if let (Storage::Cpu(c), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            let out = kernels::silu_mul_halves(&c.as_slice::<f32>()?[a..b], *width);
            let mut dims = y.dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last = *width;
            }
            return Tensor::from_vec(out, dims, y.device());
        }
    }
    let parts = split(ys)?;
    let [gate, up] = parts.as_slice() else {
        candle_core::bail!("two projections expected");
    };
    silu_mul(gate, up)
}

/// `silu(gate) * up`: one vectorised pass for f32 tensors in host memory, candle's ops otherwise.
fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::Storage;
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.shape() == up.shape() {
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        if let (Storage::Cpu(g), Storage::Cpu(u), Some((g0, g1)), Some((u0, u1))) =
            (&*gs, &*us, gl.contiguous_offsets(), ul.contiguous_offsets())
        {
            let y = kernels::silu_mul(&g.as_slice::<f32>()?[g0..g1], &u.as_slice::<f32>()?[u0..u1]);
            return Tensor::from_vec(y, gate.shape(), gate.device());
        }
    }
    candle_nn::ops::silu(gate)? * up
}

/// Tokens of [`LlamaModel::warm_up`]'s prompt: enough rows for every prompt kernel candle has.
const WARM_UP_TOKENS: usize = 48;

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
