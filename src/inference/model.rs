//! Our own Llama forward pass over candle ops. Unlike candle-transformers' Llama it keeps one
//! attention cache per conversation that can be cut back to a shared prefix, so a follow-up turn
//! only computes its new tokens. Dense (safetensors) and quantized (GGUF) weights share it through
//! `QMatMul`.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};

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
    pub attn_norm: Tensor,
    pub wq: QMatMul,
    pub wk: QMatMul,
    pub wv: QMatMul,
    pub wo: QMatMul,
    pub ffn_norm: Tensor,
    pub w_gate: QMatMul,
    pub w_up: QMatMul,
    pub w_down: QMatMul,
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
}

/// One conversation's attention cache and the token ids it covers. Keys and values live in
/// per-layer buffers that grow in blocks and are written in place, so a decode step copies only
/// its new token instead of the whole history.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    tokens: Vec<u32>,
}

/// Buffers grow by whole blocks of this many positions.
const KV_BLOCK: usize = 256;

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            kv: vec![None; num_layers],
            tokens: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Positions the buffers can hold before growing.
    pub fn capacity(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Memory the buffers take.
    pub fn bytes(&self) -> usize {
        self.kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }

    /// Keeps the longest cached prefix of `prompt` (but never all of it: the last prompt token
    /// is always computed, for its logits) and forgets the rest. Returns the positions kept.
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> usize {
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let keep = common.min(prompt.len().saturating_sub(1));
        // The buffers keep their size; positions past `keep` are overwritten later.
        self.tokens.truncate(keep);
        keep
    }

    /// Writes a layer's new keys/values after the cached ones; returns views of all of them.
    fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        max: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let len = self.tokens.len();
        let t = k.dim(2)?;
        let need = len + t;
        let entry = &mut self.kv[layer];
        let cap = entry.as_ref().map_or(0, |(kb, _)| kb.dim(2).unwrap_or(0));
        if need > cap {
            let new_cap = (need.div_ceil(KV_BLOCK) * KV_BLOCK).min(max.max(need));
            let (b, h, _, d) = k.dims4()?;
            let kb = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = entry.take()
                && len > 0
            {
                kb.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                vb.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *entry = Some((kb, vb));
        }
        let Some((kb, vb)) = entry.as_ref() else {
            candle_core::bail!("attention cache buffer missing");
        };
        kb.slice_set(k, 2, len)?;
        vb.slice_set(v, 2, len)?;
        Ok((kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?))
    }
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
        let cos = freqs.cos()?.to_dtype(dtype)?;
        let sin = freqs.sin()?.to_dtype(dtype)?;
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
        })
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
        let n = ids.len();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = self
            .embed
            .embedding(&ids)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?;
        let (cos, sin) = if items.len() == 1 {
            let (_, t, pos) = spans[0];
            (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?)
        } else {
            let pos = Tensor::new(positions.as_slice(), &self.device)?;
            (
                self.cos.index_select(&pos, 0)?,
                self.sin.index_select(&pos, 0)?,
            )
        };
        let masks = spans
            .iter()
            .map(|&(_, t, pos)| {
                if t > 1 {
                    self.causal_mask(t, pos).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let n_rep = s.num_heads / s.num_kv_heads;
        let single = items.len() == 1;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, s.rms_norm_eps as f32)?;
            let q = linear(&layer.wq, &h)?;
            let k = linear(&layer.wk, &h)?;
            let v = linear(&layer.wv, &h)?;
            let q = q
                .reshape((1, n, s.num_heads, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = k
                .reshape((1, n, s.num_kv_heads, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((1, n, s.num_kv_heads, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let (q, k) = if self.interleaved_rope {
                (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                )
            };
            // Attention is per sequence: each looks only at its own cache.
            let mut ys = Vec::with_capacity(items.len());
            for ((item, &(off, t, _)), mask) in items.iter_mut().zip(&spans).zip(&masks) {
                let (qi, ki, vi) = if single {
                    (q.clone(), k.clone(), v.clone())
                } else {
                    (
                        q.narrow(2, off, t)?.contiguous()?,
                        k.narrow(2, off, t)?.contiguous()?,
                        v.narrow(2, off, t)?.contiguous()?,
                    )
                };
                let (kall, vall) = item.cache.append(li, &ki, &vi, s.max_position)?;
                // Views into the cache buffers work as they are; only grouped-query heads need
                // expanding (a copy).
                let (kall, vall) = if n_rep == 1 {
                    (kall, vall)
                } else {
                    (
                        candle_transformers::utils::repeat_kv(kall.contiguous()?, n_rep)?
                            .contiguous()?,
                        candle_transformers::utils::repeat_kv(vall.contiguous()?, n_rep)?
                            .contiguous()?,
                    )
                };
                let att = (qi.matmul(&kall.t()?)? * scale)?;
                let att = match mask {
                    Some(m) => att.broadcast_add(m)?,
                    None => att,
                };
                let att = if self.dtype == DType::F32 {
                    candle_nn::ops::softmax_last_dim(&att)?
                } else {
                    candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?
                        .to_dtype(self.dtype)?
                };
                ys.push(att.matmul(&vall)?);
            }
            let y = if single {
                ys.remove(0)
            } else {
                Tensor::cat(&ys, 2)?
            };
            let y = y
                .transpose(1, 2)?
                .reshape((1, n, s.num_heads * s.head_dim))?;
            let x1 = (&x + linear(&layer.wo, &y)?)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, s.rms_norm_eps as f32)?;
            let gate = candle_nn::ops::silu(&linear(&layer.w_gate, &h)?)?;
            let up = linear(&layer.w_up, &h)?;
            x = (&x1 + linear(&layer.w_down, &(gate * up)?)?)?;
        }
        for item in items.iter_mut() {
            item.cache.tokens.extend_from_slice(item.tokens);
        }
        let last: Vec<u32> = spans
            .iter()
            .map(|&(off, t, _)| (off + t - 1) as u32)
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let x = x.squeeze(0)?.index_select(&last, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, s.rms_norm_eps as f32)?;
        linear(&self.lm_head, &x)?
            .to_dtype(DType::F32)?
            .contiguous()
    }

    /// Position i (absolute `offset + i`) may look at keys 0..=offset+i.
    fn causal_mask(&self, t: usize, offset: usize) -> candle_core::Result<Tensor> {
        let total = offset + t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        Tensor::from_vec(mask, (t, total), &self.device)?.to_dtype(self.dtype)
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

/// `x · wᵀ` for rows of `x`. With a handful of rows (batched decode) dense weights are
/// multiplied the other way round, `(w · xᵀ)ᵀ`, so the matrix kernel's tile runs along the
/// weight's many rows instead of being mostly padding around a few input rows.
fn linear(w: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    match w {
        QMatMul::Tensor(wt) if (2..=32).contains(&rows) => {
            let dims = x.dims().to_vec();
            let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
            let y = wt.matmul(&x2.t()?.contiguous()?)?.t()?.contiguous()?;
            let mut out_dims = dims;
            let last = out_dims.len() - 1;
            out_dims[last] = wt.dim(0)?;
            y.reshape(out_dims)
        }
        _ => w.forward(x),
    }
}

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
