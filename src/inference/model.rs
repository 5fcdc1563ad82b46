//! Our own Llama forward pass over candle ops. Unlike candle-transformers' Llama it keeps one
//! attention cache per conversation that can be cut back to a shared prefix, so a follow-up turn
//! only computes its new tokens. Dense (safetensors) and quantized (GGUF) weights share it through
//! `QMatMul`.

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Tensor};

pub use super::cache::SeqCache;
use super::kernels::{self, AttendJob, Heads};
use super::projection::{linear, project};

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
            let [q, k, v]: [Tensor; 3] =
                project(&[&layer.wq, &layer.wk, &layer.wv], &h, self.compact)?
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
            let [gate, up]: [Tensor; 2] = project(&[&layer.w_gate, &layer.w_up], &h, self.compact)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("two projections expected".into()))?;
            x = (&x1 + linear(&layer.w_down, &silu_mul(&gate, &up)?, self.compact)?)?;
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

    /// Rotary tables for the step's positions and a causal mask per prompt chunk.
    fn rotary(
        &self,
        spans: &[(usize, usize, usize)],
        positions: &[u32],
    ) -> candle_core::Result<Rotary> {
        let (cos, sin) = if spans.len() == 1 {
            let (_, t, pos) = spans[0];
            (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?)
        } else {
            let pos = Tensor::new(positions, &self.device)?;
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
        Ok(Rotary { cos, sin, masks })
    }

    /// Attention on the CPU: the projections' rows rotated in place, this step's keys and values
    /// written into each sequence's host cache, and our kernel over all sequences at once.
    /// Returns `[1, n, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn host_attention(
        &self,
        li: usize,
        items: &mut [BatchItem<'_>],
        spans: &[(usize, usize, usize)],
        positions: &[u32],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        half: bool,
    ) -> candle_core::Result<Tensor> {
        let s = &self.shape;
        let (d, n) = (s.head_dim, positions.len());
        let mut qh = q.flatten_all()?.to_vec1::<f32>()?;
        let mut kh = k.flatten_all()?.to_vec1::<f32>()?;
        let vh = v.flatten_all()?.to_vec1::<f32>()?;
        let (cos, sin, il) = (&self.host_cos, &self.host_sin, self.interleaved_rope);
        kernels::rope_in_place(&mut qh, s.num_heads, d, positions, cos, sin, il);
        kernels::rope_in_place(&mut kh, s.num_kv_heads, d, positions, cos, sin, il);
        let width = s.num_kv_heads * d;
        for (item, &(off, t, _)) in items.iter_mut().zip(spans) {
            let rows = off * width..(off + t) * width;
            item.cache.append_host(
                li,
                &kh[rows.clone()],
                &vh[rows],
                s.num_kv_heads,
                d,
                half,
                s.max_position,
            );
        }
        let jobs = items
            .iter()
            .zip(spans)
            .map(|(item, &(off, t, pos))| {
                let (kv, head_stride) = item.cache.host_view(li, pos + t)?;
                Ok(AttendJob {
                    row: off,
                    rows: t,
                    start: pos,
                    kv,
                    head_stride,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let heads = Heads {
            heads: s.num_heads,
            kv_heads: s.num_kv_heads,
            head_dim: d,
        };
        let mut out = vec![0f32; n * s.num_heads * d];
        let scale = 1.0 / (d as f32).sqrt();
        let (chunks, rows): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|j| j.rows >= GEMM_ROWS);
        kernels::attend(heads, &rows, &qh, &mut out, scale);
        for job in &chunks {
            self.chunk_attention(job, &qh, &mut out)?;
        }
        Tensor::from_vec(out, (1, n, s.num_heads * d), &self.device)
    }

    /// A prompt chunk's attention over its host cache through candle's matrix kernels: its
    /// many query rows share every key, which the per-row kernel would convert and read again
    /// for each row. The rows go in blocks, each against only the keys its last row sees, so
    /// the causal half of the scores is mostly never computed; the scores are scaled, masked
    /// and normalised in place by one pass. Writes the chunk's rows of `out`
    /// (`[rows][heads][head_dim]`).
    fn chunk_attention(
        &self,
        job: &AttendJob<'_>,
        q: &[f32],
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let s = &self.shape;
        let (d, heads, kv_heads) = (s.head_dim, s.num_heads, s.num_kv_heads);
        let (t, keys, width) = (job.rows, job.start + job.rows, heads * d);
        let rows = job.row * width..(job.row + t) * width;
        let qt = Tensor::from_slice(&q[rows.clone()], (t, heads, d), &self.device)?
            .transpose(0, 1)?
            .contiguous()?;
        let (k, v) = kernels::head_major_f32(job, kv_heads, d, keys);
        let k = Tensor::from_vec(k, (1, kv_heads, keys, d), &self.device)?;
        let v = Tensor::from_vec(v, (1, kv_heads, keys, d), &self.device)?;
        let n_rep = heads / kv_heads;
        let (k, v) = if n_rep == 1 {
            (k, v)
        } else {
            (
                candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?,
                candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?,
            )
        };
        let (k, v) = (k.squeeze(0)?, v.squeeze(0)?);
        let scale = 1.0 / (d as f32).sqrt();
        let out = &mut out[rows];
        for r0 in (0..t).step_by(QUERY_BLOCK) {
            let rb = QUERY_BLOCK.min(t - r0);
            // Keys the block's last row sees.
            let seen = job.start + r0 + rb;
            let qb = qt.narrow(1, r0, rb)?.contiguous()?;
            let scores = qb.matmul(&k.narrow(1, 0, seen)?.t()?)?;
            let mut scores = scores.flatten_all()?.to_vec1::<f32>()?;
            // Row `h * rb + i` is query row `r0 + i` of head `h`.
            kernels::causal_softmax(&mut scores, seen, scale, |row| {
                job.start + r0 + row % rb + 1
            });
            let probs = Tensor::from_vec(scores, (heads, rb, seen), &self.device)?;
            let y = probs
                .matmul(&v.narrow(1, 0, seen)?)?
                .transpose(0, 1)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?;
            out[r0 * width..(r0 + rb) * width].copy_from_slice(&y);
        }
        Ok(())
    }

    /// Attention through candle ops, cache in device tensors (GPU, or a CPU model not in f32).
    /// Returns `[1, n, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn tensor_attention(
        &self,
        li: usize,
        items: &mut [BatchItem<'_>],
        spans: &[(usize, usize, usize)],
        rotary: &Rotary,
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> candle_core::Result<Tensor> {
        let s = &self.shape;
        let n: usize = spans.iter().map(|&(_, t, _)| t).sum();
        let (cos, sin, masks) = (&rotary.cos, &rotary.sin, &rotary.masks);
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        let n_rep = s.num_heads / s.num_kv_heads;
        let single = items.len() == 1;
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
                candle_nn::rotary_emb::rope_i(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_i(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        // Attention is per sequence: each looks only at its own cache.
        let mut ys = Vec::with_capacity(items.len());
        for ((item, &(off, t, _)), mask) in items.iter_mut().zip(spans).zip(masks) {
            let (qi, ki, vi) = if single {
                (q.clone(), k.clone(), v.clone())
            } else {
                (
                    q.narrow(2, off, t)?.contiguous()?,
                    k.narrow(2, off, t)?.contiguous()?,
                    v.narrow(2, off, t)?.contiguous()?,
                )
            };
            let (kall, vall) = item.cache.append_tensors(li, &ki, &vi, s.max_position)?;
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
        Ok(y)
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

/// The candle path's rotary tables for a step's positions and each sequence's causal mask.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    masks: Vec<Option<Tensor>>,
}

/// Rows of a prompt chunk from which its attention goes through candle's matrix kernels
/// instead of our per-row kernel.
const GEMM_ROWS: usize = 16;

/// Query rows of a prompt chunk whose attention scores are computed together.
const QUERY_BLOCK: usize = 128;

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
