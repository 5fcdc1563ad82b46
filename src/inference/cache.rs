//! One conversation's attention cache and the token ids it covers. On a GPU the keys and values
//! are device tensors in the model's dtype; on the CPU they are plain buffers our attention
//! kernel reads (f16 by default: half the memory, and half the bytes each step reads).
//! Either way they grow in blocks and are written in place, so a decode step copies only its new
//! token instead of the whole history.

use candle_core::Tensor;
use half::f16;

use super::kernels::{CacheElem, KvView};

/// Buffers grow by whole blocks of this many positions.
const KV_BLOCK: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct SeqCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<Option<HostLayer>>,
    tokens: Vec<u32>,
}

/// One layer's keys and values on the host, `[kv_head][position][head_dim]`: each head's
/// positions are contiguous, so attention streams through them page after page.
#[derive(Debug, Clone)]
struct HostLayer {
    k: HostBuf,
    v: HostBuf,
    head_dim: usize,
    /// Positions each head has room for.
    cap: usize,
}

#[derive(Debug, Clone)]
enum HostBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl HostBuf {
    fn bytes(&self) -> usize {
        match self {
            Self::F16(b) => b.capacity() * 2,
            Self::F32(b) => b.capacity() * 4,
        }
    }

    /// Regrows `heads` runs of `old` positions to `new` positions each, keeping the first
    /// `keep` positions of every head.
    fn regrow(&mut self, heads: usize, head_dim: usize, old: usize, new: usize, keep: usize) {
        fn regrow<E: CacheElem>(
            b: &mut Vec<E>,
            h: usize,
            d: usize,
            old: usize,
            new: usize,
            keep: usize,
        ) {
            let mut grown = Vec::with_capacity(h * new * d);
            grown.resize(h * new * d, E::zero());
            for head in 0..h {
                let (from, to) = (head * old * d, head * new * d);
                grown[to..to + keep * d].copy_from_slice(&b[from..from + keep * d]);
            }
            *b = grown;
        }
        match self {
            Self::F16(b) => regrow(b, heads, head_dim, old, new, keep),
            Self::F32(b) => regrow(b, heads, head_dim, old, new, keep),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F16(b) => f16::from_f32_slice(src, &mut b[at..at + src.len()]),
            Self::F32(b) => f32::from_f32_slice(src, &mut b[at..at + src.len()]),
        }
    }
}

impl SeqCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            kv: vec![None; num_layers],
            host: vec![None; num_layers],
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
        let device = self.kv.iter().flatten().map(|(k, _)| k.dim(2).unwrap_or(0));
        let host = self.host.iter().flatten().map(|l| l.cap);
        device.chain(host).min().unwrap_or(0)
    }

    /// Memory the buffers take.
    pub fn bytes(&self) -> usize {
        let device: usize = self
            .kv
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        let host: usize = self
            .host
            .iter()
            .flatten()
            .map(|l| l.k.bytes() + l.v.bytes())
            .sum();
        device + host
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

    /// Records that the step's tokens are now cached (after every layer wrote them).
    pub(crate) fn commit(&mut self, tokens: &[u32]) {
        self.tokens.extend_from_slice(tokens);
    }

    /// The capacity a buffer needing `need` positions grows to, never past `max`.
    fn grown(need: usize, max: usize) -> usize {
        (need.div_ceil(KV_BLOCK) * KV_BLOCK).min(max.max(need))
    }

    /// Writes a layer's new keys/values (device tensors `[1, kv_heads, t, head_dim]`) after the
    /// cached ones; returns views of all of them.
    pub(crate) fn append_tensors(
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
            let new_cap = Self::grown(need, max);
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

    /// Writes a layer's new keys/values (`[t][heads][head_dim]`, as the projections give them)
    /// after the cached ones, into host buffers of f16 (`half`) or f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn append_host(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        heads: usize,
        head_dim: usize,
        half: bool,
        max: usize,
    ) {
        let len = self.tokens.len();
        let width = heads * head_dim;
        let t = k.len() / width;
        let need = len + t;
        let entry = self.host[layer].get_or_insert_with(|| {
            let buf = || {
                if half {
                    HostBuf::F16(Vec::new())
                } else {
                    HostBuf::F32(Vec::new())
                }
            };
            HostLayer {
                k: buf(),
                v: buf(),
                head_dim,
                cap: 0,
            }
        });
        if need > entry.cap {
            let cap = Self::grown(need, max);
            entry.k.regrow(heads, head_dim, entry.cap, cap, len);
            entry.v.regrow(heads, head_dim, entry.cap, cap, len);
            entry.cap = cap;
        }
        for r in 0..t {
            for h in 0..heads {
                let src = r * width + h * head_dim..r * width + (h + 1) * head_dim;
                let at = (h * entry.cap + len + r) * head_dim;
                entry.k.write(at, &k[src.clone()]);
                entry.v.write(at, &v[src]);
            }
        }
    }

    /// A layer's host keys and values, with its first `positions` positions written, and the
    /// elements between one head's positions and the next head's.
    pub(crate) fn host_view(
        &self,
        layer: usize,
        positions: usize,
    ) -> candle_core::Result<(KvView<'_>, usize)> {
        let Some(l) = self.host.get(layer).and_then(Option::as_ref) else {
            candle_core::bail!("attention cache layer {layer} missing");
        };
        if positions > l.cap {
            candle_core::bail!("attention cache holds fewer than {positions} positions");
        }
        let view = match (&l.k, &l.v) {
            (HostBuf::F16(k), HostBuf::F16(v)) => KvView::F16(k, v),
            (HostBuf::F32(k), HostBuf::F32(v)) => KvView::F32(k, v),
            _ => candle_core::bail!("attention cache keys and values differ in type"),
        };
        Ok((view, l.cap * l.head_dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_buffers_grow_in_blocks_keep_what_they_hold_and_count_their_bytes() {
        let mut c = SeqCache::new(1);
        let width = 4;
        let k: Vec<f32> = (0..3 * width).map(|i| i as f32).collect();
        c.append_host(0, &k, &k, 1, width, true, 1000);
        c.commit(&[1, 2, 3]);
        assert_eq!(c.capacity(), KV_BLOCK);
        assert_eq!(
            c.bytes(),
            2 * KV_BLOCK * width * 2,
            "f16: two bytes an element"
        );
        // Past the first block: the buffer grows and the first positions stay.
        let more = vec![7.0; 300 * width];
        c.append_host(0, &more, &more, 1, width, true, 1000);
        c.commit(&vec![9; 300]);
        assert_eq!(c.capacity(), 2 * KV_BLOCK);
        let (KvView::F16(kv, _), _) = c.host_view(0, 303).unwrap() else {
            panic!("f16 buffers expected");
        };
        assert_eq!(kv[5].to_f32(), 5.0);
        assert_eq!(kv[302 * width].to_f32(), 7.0);
        // Two heads: each head's positions are contiguous, heads a capacity apart.
        let mut two = SeqCache::new(1);
        let rows: Vec<f32> = (0..2 * 2 * 2).map(|i| i as f32).collect(); // [t=2][heads=2][d=2]
        two.append_host(0, &rows, &rows, 2, 2, false, 1000);
        let (KvView::F32(kv, _), head_stride) = two.host_view(0, 2).unwrap() else {
            panic!("f32 buffers expected");
        };
        assert_eq!(head_stride, KV_BLOCK * 2);
        assert_eq!(&kv[..4], &[0.0, 1.0, 4.0, 5.0], "head 0, positions 0 and 1");
        assert_eq!(
            &kv[head_stride..head_stride + 4],
            &[2.0, 3.0, 6.0, 7.0],
            "head 1"
        );
        // Never past the window.
        let mut w = SeqCache::new(1);
        w.append_host(0, &k, &k, 1, width, false, 2);
        assert_eq!(w.capacity(), 3, "the window, or what is needed");
        assert!(w.host_view(0, 4).is_err());
    }
}
