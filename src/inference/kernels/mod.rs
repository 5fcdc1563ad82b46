//! Hand-written CPU kernels for the steps candle spends most of a step on: attention over a
//! conversation's cache and rotary embeddings, both read in the layout the projections write
//! (`[position][head][head_dim]`), so no transposes or copies come between them; and the
//! products with quantised weights (`quant`), read in their stored blocks, with portable, AVX2
//! and AVX-512 loops.
//!
//! The attention cache is f16 or f32. Each (query row, head) pair is one unit of work on candle's
//! own thread pool, the one its matrix kernels use, so the two never compete. The inner loops
//! have an AVX2 version (with F16C and FMA; scores for eight positions at a time, the weighted
//! values summed in registers), chosen once at run time, and a portable one; both are tested
//! against plain attention, and the model's results against candle's.

use half::f16;

/// Element types an attention cache holds.
pub trait CacheElem: Copy + Send + Sync + 'static {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
    fn zero() -> Self;
}

impl CacheElem for f32 {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn zero() -> Self {
        0.0
    }
}

impl CacheElem for f16 {
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn zero() -> Self {
        f16::ZERO
    }
}

/// Keys and values of one layer for one sequence: each kv head's positions contiguous
/// (`[position][head_dim]`), heads [`AttendJob::head_stride`] elements apart.
#[derive(Clone, Copy)]
pub enum KvView<'a> {
    F16(&'a [f16], &'a [f16]),
    F32(&'a [f32], &'a [f32]),
}

/// A job's keys and values for its first `keys` positions as f32, `[kv_head][position][head_dim]`
/// without the room between heads: what a matrix kernel takes.
pub fn head_major_f32(
    job: &AttendJob<'_>,
    kv_heads: usize,
    head_dim: usize,
    keys: usize,
) -> (Vec<f32>, Vec<f32>) {
    let n = keys * head_dim;
    let mut k = vec![0f32; kv_heads * n];
    let mut v = vec![0f32; kv_heads * n];
    for h in 0..kv_heads {
        let (from, to) = (h * job.head_stride, h * n);
        match job.kv {
            KvView::F16(ks, vs) => {
                use half::slice::HalfFloatSliceExt;
                ks[from..from + n].convert_to_f32_slice(&mut k[to..to + n]);
                vs[from..from + n].convert_to_f32_slice(&mut v[to..to + n]);
            }
            KvView::F32(ks, vs) => {
                k[to..to + n].copy_from_slice(&ks[from..from + n]);
                v[to..to + n].copy_from_slice(&vs[from..from + n]);
            }
        }
    }
    (k, v)
}

/// Head counts of the attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// One sequence's part of a batched attention step.
pub struct AttendJob<'a> {
    /// Row offset of this sequence's queries (and outputs) in the step.
    pub row: usize,
    /// Its new rows.
    pub rows: usize,
    /// Positions cached before them: row `i` sees keys `0..=start + i`.
    pub start: usize,
    pub kv: KvView<'a>,
    /// Elements from one kv head's first position to the next head's.
    pub head_stride: usize,
}

/// Which inner loops this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The best inner loops this CPU has, detected once.
pub fn detected_isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// The loop over a block's weight rows and the choice on how many activation rows it takes
/// (one to four), around row kernels `q4k`, `q6k` and `q8_0` that a module compiles for
/// `$features`: each instruction set's module states only its row kernels.
#[cfg(target_arch = "x86_64")]
macro_rules! quant_block_fns {
    ($features:literal) => {
        /// The block loops for `kind`.
        pub(super) fn block_fn(kind: QuantKind) -> BlockFn {
            match kind {
                QuantKind::Q4K => |w, first, a, out| quant_block_fns!(@pick q4k_rows, w, first, a, out),
                QuantKind::Q6K => |w, first, a, out| quant_block_fns!(@pick q6k_rows, w, first, a, out),
                QuantKind::Q8_0 => |w, first, a, out| quant_block_fns!(@pick q8_0_rows, w, first, a, out),
            }
        }
        quant_block_fns!(@rows $features, q4k_rows, q4k);
        quant_block_fns!(@rows $features, q6k_rows, q6k);
        quant_block_fns!(@rows $features, q8_0_rows, q8_0);
    };
    (@rows $features:literal, $name:ident, $row:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $name<const R: usize>(
            w: &QWeight<'_>,
            first: usize,
            acts: &[&[ActBlock]; R],
            out: &mut [[f32; MAX_ROWS]],
        ) {
            for (j, o) in out.iter_mut().enumerate() {
                let got = unsafe { $row::<R>(w.row(first + j), acts) };
                o[..R].copy_from_slice(&got);
            }
        }
    };
    (@pick $name:ident, $w:ident, $first:ident, $a:ident, $out:ident) => {
        // SAFETY: a module's loops are chosen only where its instruction set was detected, and
        // `matmul_with` hands them weight rows of whole blocks and activation rows of as many.
        unsafe {
            match $a.len() {
                1 => $name::<1>($w, $first, &[$a[0]], $out),
                2 => $name::<2>($w, $first, &[$a[0], $a[1]], $out),
                3 => $name::<3>($w, $first, &[$a[0], $a[1], $a[2]], $out),
                _ => $name::<4>($w, $first, &[$a[0], $a[1], $a[2], $a[3]], $out),
            }
        }
    };
}

mod activation;
mod attention;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod quant_avx512;
mod quant_portable;
#[cfg(target_arch = "x86_64")]
mod quant_x86;
mod rope;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::{
    causal_softmax, causal_softmax_with, silu_mul, silu_mul_halves, silu_mul_halves_with,
    silu_mul_with,
};
pub use attention::{attend, attend_with};
pub use rope::rope_in_place;

#[cfg(test)]
pub(crate) mod test_data {
    /// Seeded values in [-1, 1).
    pub fn seeded(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }
}
