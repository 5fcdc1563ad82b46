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
    pub(crate) embed: Tensor,
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

/// One conversation's attention cache and the token ids it covers.
#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    tokens: Vec<u32>,
}

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

    /// Keeps only the first `n` positions.
    pub fn truncate(&mut self, n: usize) -> candle_core::Result<()> {
        if n >= self.tokens.len() {
            return Ok(());
        }
        if n == 0 {
            self.kv.iter_mut().for_each(|e| *e = None);
        } else {
            for entry in self.kv.iter_mut() {
                if let Some((k, v)) = entry.take() {
                    *entry = Some((
                        k.narrow(2, 0, n)?.contiguous()?,
                        v.narrow(2, 0, n)?.contiguous()?,
                    ));
                }
            }
        }
        self.tokens.truncate(n);
        Ok(())
    }
}

impl LlamaModel {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shape: LlamaShape,
        embed: Tensor,
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
        let t = tokens.len();
        let pos = cache.len();
        if t == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        if pos + t > self.shape.max_position {
            candle_core::bail!(
                "{} positions exceed the context window of {}",
                pos + t,
                self.shape.max_position
            );
        }
        let s = &self.shape;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        let mask = if t > 1 {
            Some(self.causal_mask(t, pos)?)
        } else {
            None
        };
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        for (layer, entry) in self.layers.iter().zip(cache.kv.iter_mut()) {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, s.rms_norm_eps as f32)?;
            let q = layer.wq.forward(&h)?;
            let k = layer.wk.forward(&h)?;
            let v = layer.wv.forward(&h)?;
            let q = q
                .reshape((1, t, s.num_heads, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = k
                .reshape((1, t, s.num_kv_heads, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((1, t, s.num_kv_heads, s.head_dim))?
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
            let (k, v) = match entry.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *entry = Some((k.clone(), v.clone()));
            let n_rep = s.num_heads / s.num_kv_heads;
            let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
            let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = if self.dtype == DType::F32 {
                candle_nn::ops::softmax_last_dim(&att)?
            } else {
                candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?
                    .to_dtype(self.dtype)?
            };
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((1, t, s.num_heads * s.head_dim))?;
            let x1 = (residual + layer.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, s.rms_norm_eps as f32)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (&x1 + layer.w_down.forward(&(gate * up)?)?)?;
        }
        cache.tokens.extend_from_slice(tokens);
        let last = x.narrow(1, t - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, s.rms_norm_eps as f32)?;
        let logits = self.lm_head.forward(&last)?;
        logits
            .squeeze(0)?
            .squeeze(0)?
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
        let common = cache
            .tokens
            .iter()
            .zip(tokens)
            .take_while(|(a, b)| a == b)
            .count();
        // Always compute at least the last token, to get its logits.
        let reuse = common.min(tokens.len().saturating_sub(1));
        cache.truncate(reuse)?;
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

/// Index of the largest logit.
pub fn argmax(logits: &Tensor) -> candle_core::Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}
