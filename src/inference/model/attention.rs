//! Attention of a step: on the CPU our kernel over host caches for decode rows and, for prompt
//! chunks, candle's matrix kernels in blocks of query rows with our causal softmax; on a GPU
//! candle ops over caches in device tensors, with rotary tables and causal masks.

use candle_core::{DType, Tensor};

use super::{BatchItem, LlamaModel};
use crate::inference::kernels::{self, AttendJob, Heads};

impl LlamaModel {
    /// Rotary tables for the step's positions and a causal mask per prompt chunk.
    pub(super) fn rotary(
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
    pub(super) fn host_attention(
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
    pub(super) fn tensor_attention(
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
}

/// The candle path's rotary tables for a step's positions and each sequence's causal mask.
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    masks: Vec<Option<Tensor>>,
}

/// Rows of a prompt chunk from which its attention goes through candle's matrix kernels
/// instead of our per-row kernel.
const GEMM_ROWS: usize = 16;

/// Query rows of a prompt chunk whose attention scores are computed together.
const QUERY_BLOCK: usize = 128;
