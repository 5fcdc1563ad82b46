//! Hand-written CPU kernels for the steps candle spends most of a small step on: attention over
//! a conversation's cache and rotary embeddings, both read in the layout the projections write
//! (`[position][head][head_dim]`), so no transposes or copies come between them.
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

/// Causal attention of every job's query rows over its cache: `q` and `out` are
/// `[rows][heads][head_dim]` for the whole step, `scale` multiplies the scores before softmax.
pub fn attend(h: Heads, jobs: &[AttendJob<'_>], q: &[f32], out: &mut [f32], scale: f32) {
    attend_with(detected_isa(), h, jobs, q, out, scale)
}

/// [`attend`] with the inner loops named, so tests can compare them.
pub fn attend_with(
    isa: Isa,
    h: Heads,
    jobs: &[AttendJob<'_>],
    q: &[f32],
    out: &mut [f32],
    scale: f32,
) {
    let d = h.head_dim;
    let width = h.heads * d;
    assert!(h.kv_heads > 0 && h.heads.is_multiple_of(h.kv_heads));
    let total_rows = jobs.iter().map(|j| j.row + j.rows).max().unwrap_or(0);
    assert!(q.len() >= total_rows * width && out.len() >= total_rows * width);
    for j in jobs {
        let need = (h.kv_heads - 1) * j.head_stride + (j.start + j.rows) * d;
        let (kl, vl) = match j.kv {
            KvView::F16(k, v) => (k.len(), v.len()),
            KvView::F32(k, v) => (k.len(), v.len()),
        };
        assert!(kl >= need && vl >= need, "cache shorter than its positions");
    }
    // Wide loops need whole vectors per head.
    let isa = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if !d.is_multiple_of(8) => Isa::Portable,
        other => other,
    };
    // Unit u: job by prefix of rows * heads, then (row, head) inside it.
    let mut firsts = Vec::with_capacity(jobs.len());
    let mut units = 0;
    for j in jobs {
        firsts.push(units);
        units += j.rows * h.heads;
    }
    let out_addr = out.as_mut_ptr() as usize;
    let run = |range: std::ops::Range<usize>| {
        let mut scores = Vec::new();
        for u in range {
            let ji = firsts.partition_point(|&f| f <= u) - 1;
            let job = &jobs[ji];
            let local = u - firsts[ji];
            let (i, head) = (local / h.heads, local % h.heads);
            let row = job.row + i;
            let keys = job.start + i + 1;
            let qrow = &q[row * width + head * d..][..d];
            // SAFETY: every unit writes its own (row, head) slice of `out`, which outlives the
            // pool call; no two units share one.
            let orow = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_addr as *mut f32).add(row * width + head * d),
                    d,
                )
            };
            let kvh = head / (h.heads / h.kv_heads);
            let (base, stride) = (kvh * job.head_stride, d);
            scores.clear();
            scores.resize(keys, 0.0);
            match job.kv {
                KvView::F16(k, v) => f16::unit(
                    isa,
                    qrow,
                    &k[base..],
                    &v[base..],
                    stride,
                    scale,
                    &mut scores,
                    orow,
                ),
                KvView::F32(k, v) => f32::unit(
                    isa,
                    qrow,
                    &k[base..],
                    &v[base..],
                    stride,
                    scale,
                    &mut scores,
                    orow,
                ),
            }
        }
    };
    if units <= 1 {
        run(0..units);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(units, run);
    }
}

/// Inner loops over one element type, per instruction set.
trait Lanes: CacheElem {
    /// Scores of `scores.len()` positions (`stride` apart from `k`), then softmax, then the
    /// weighted sum of the values into `out`.
    #[allow(clippy::too_many_arguments)]
    fn unit(
        isa: Isa,
        q: &[f32],
        k: &[Self],
        v: &[Self],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    );
}

/// Softmax of `scores` in place; returns the reciprocal of the sum to scale the output by.
#[inline]
fn softmax_unscaled(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    1.0 / sum
}

macro_rules! lanes {
    ($t:ty, $to_f32:expr, $x86:ident) => {
        impl Lanes for $t {
            #[inline]
            fn unit(
                isa: Isa,
                q: &[f32],
                k: &[Self],
                v: &[Self],
                stride: usize,
                scale: f32,
                scores: &mut [f32],
                out: &mut [f32],
            ) {
                match isa {
                    // SAFETY: the ISA was detected on this CPU, the head size is a whole number
                    // of vectors (checked in `attend_with`), and `attend_with` checked that the
                    // cache holds every position read.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::$x86(q, k, v, stride, scale, scores, out) },
                    Isa::Portable => portable::unit(q, k, v, stride, scale, scores, out, $to_f32),
                }
            }
        }
    };
}

lanes!(f32, |x: f32| x, unit_f32);
lanes!(f16, f16::to_f32, unit_f16);

mod portable {
    /// Eight running sums, so the compiler may keep them in vector lanes.
    #[inline]
    fn dot<E: Copy>(q: &[f32], k: &[E], f: &impl Fn(E) -> f32) -> f32 {
        let mut s = [0f32; 8];
        let n = q.len() / 8 * 8;
        for (qc, kc) in q[..n].chunks_exact(8).zip(k[..n].chunks_exact(8)) {
            for l in 0..8 {
                s[l] += qc[l] * f(kc[l]);
            }
        }
        let mut total: f32 = s.iter().sum();
        for i in n..q.len() {
            total += q[i] * f(k[i]);
        }
        total
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn unit<E: Copy>(
        q: &[f32],
        k: &[E],
        v: &[E],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
        f: impl Fn(E) -> f32,
    ) {
        let d = q.len();
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &k[j * stride..][..d], &f) * scale;
        }
        let inv = super::softmax_unscaled(scores);
        out.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&v[j * stride..][..d]) {
                *o += p * f(x);
            }
        }
        for o in out.iter_mut() {
            *o *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Eight lanes of a cache row as f32.
    trait Load8: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Load8 for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
    }

    /// The eight lane sums of eight vectors, as one vector.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sum8(a: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
    }

    /// See [`super::Lanes::unit`]. Scores come eight positions at a time (eight independent
    /// sums, reduced together); the weighted values are summed in registers, 64 lanes at once.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit<E: Load8>(
        q: &[f32],
        k: &[E],
        v: &[E],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let d = q.len();
        let n = scores.len();
        let (qp, kp, vp) = (q.as_ptr(), k.as_ptr(), v.as_ptr());
        let scale8 = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            for i in (0..d).step_by(8) {
                let qv = unsafe { _mm256_loadu_ps(qp.add(i)) };
                for (r, a) in acc.iter_mut().enumerate() {
                    let kv = unsafe { E::load8(kp.add((j + r) * stride + i)) };
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
            let s = _mm256_mul_ps(sum8(&acc), scale8);
            unsafe { _mm256_storeu_ps(scores.as_mut_ptr().add(j), s) };
            j += 8;
        }
        for (jj, s) in scores.iter_mut().enumerate().skip(j) {
            let mut acc = _mm256_setzero_ps();
            for i in (0..d).step_by(8) {
                let (qv, kv) = unsafe {
                    (
                        _mm256_loadu_ps(qp.add(i)),
                        E::load8(kp.add(jj * stride + i)),
                    )
                };
                acc = _mm256_fmadd_ps(qv, kv, acc);
            }
            *s = hsum(acc) * scale;
        }
        let inv = _mm256_set1_ps(super::softmax_unscaled(scores));
        // Blocks of up to 64 lanes: eight accumulators that stay in registers over all positions.
        let mut b = 0;
        while b < d {
            let w = ((d - b) / 8).min(8);
            let mut acc = [_mm256_setzero_ps(); 8];
            if w == 8 {
                for (jj, &p) in scores.iter().enumerate() {
                    let pv = _mm256_set1_ps(p);
                    let row = unsafe { vp.add(jj * stride + b) };
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(pv, unsafe { E::load8(row.add(8 * l)) }, *a);
                    }
                }
            } else {
                for (jj, &p) in scores.iter().enumerate() {
                    let pv = _mm256_set1_ps(p);
                    let row = unsafe { vp.add(jj * stride + b) };
                    for (l, a) in acc.iter_mut().enumerate().take(w) {
                        *a = _mm256_fmadd_ps(pv, unsafe { E::load8(row.add(8 * l)) }, *a);
                    }
                }
            }
            for (l, a) in acc.iter().enumerate().take(w) {
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr().add(b + 8 * l), _mm256_mul_ps(*a, inv))
                };
            }
            b += 8 * w;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unit_f32(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe { unit(q, k, v, stride, scale, scores, out) }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unit_f16(
        q: &[f32],
        k: &[f16],
        v: &[f16],
        stride: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        unsafe { unit(q, k, v, stride, scale, scores, out) }
    }
}

/// Rotates query or key rows in place. `x` is `[rows][heads][head_dim]`; row `r` is at
/// `positions[r]`; `cos` and `sin` are `[position][head_dim / 2]`. Interleaved pairs are
/// `(2i, 2i+1)` (GGUF's row order), otherwise `(i, i + head_dim / 2)` (Hugging Face's).
pub fn rope_in_place(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = head_dim / 2;
    for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let p = positions[r] as usize;
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for head in row.chunks_exact_mut(head_dim) {
            if interleaved {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c[i] - b * s[i];
                    pair[1] = a * s[i] + b * c[i];
                }
            } else {
                let (lo, hi) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * c[i] - b * s[i];
                    hi[i] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(n: usize, seed: u64) -> Vec<f32> {
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

    /// The same attention written plainly in f64, as the one the kernels must match.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        h: Heads,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        start: usize,
        rows: usize,
        scale: f32,
        head_stride: usize,
    ) -> Vec<f32> {
        let d = h.head_dim;
        let mut out = vec![0f32; rows * h.heads * d];
        for i in 0..rows {
            for head in 0..h.heads {
                let kvh = head / (h.heads / h.kv_heads);
                let qr = &q[(i * h.heads + head) * d..][..d];
                let n = start + i + 1;
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let kr = &k[kvh * head_stride + j * d..][..d];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| (*a as f64) * (*b as f64))
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    let val: f64 = (0..n)
                        .map(|j| e[j] * v[kvh * head_stride + j * d + c] as f64)
                        .sum();
                    out[(i * h.heads + head) * d + c] = (val / z) as f32;
                }
            }
        }
        out
    }

    fn isas() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                all.push(Isa::Avx2);
            }
        }
        all
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
            / scale
    }

    #[test]
    fn every_isa_matches_plain_attention_with_grouped_heads_in_f32_and_f16() {
        for (heads, kv_heads, d) in [(4, 4, 64), (2, 2, 128), (8, 2, 32), (3, 1, 20), (2, 1, 72)] {
            let h = Heads {
                heads,
                kv_heads,
                head_dim: d,
            };
            let (start, rows) = (37, 5);
            // Room for three more positions per head, as a cache grown in blocks has.
            let hs = (start + rows + 3) * d;
            let k = seeded(kv_heads * hs, 1);
            let v = seeded(kv_heads * hs, 2);
            let q = seeded(rows * heads * d, 3);
            let scale = 1.0 / (d as f32).sqrt();
            let want = naive(h, &q, &k, &v, start, rows, scale, hs);
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            for isa in isas() {
                for (view, tol) in [(KvView::F32(&k, &v), 1e-5), (KvView::F16(&k16, &v16), 2e-3)] {
                    let mut out = vec![0f32; rows * heads * d];
                    let jobs = [AttendJob {
                        row: 0,
                        rows,
                        start,
                        kv: view,
                        head_stride: hs,
                    }];
                    attend_with(isa, h, &jobs, &q, &mut out, scale);
                    let err = max_rel(&out, &want);
                    assert!(err <= tol, "{isa:?} {heads}/{kv_heads}x{d}: {err}");
                }
            }
        }
    }

    #[test]
    fn jobs_of_a_batch_see_only_their_own_cache() {
        let h = Heads {
            heads: 2,
            kv_heads: 2,
            head_dim: 16,
        };
        let w = h.heads * h.head_dim;
        let kv_a = (seeded(10 * w, 4), seeded(10 * w, 5));
        let kv_b = (seeded(3 * w, 6), seeded(3 * w, 7));
        // Row 0: sequence a decoding at position 9; rows 1..3: sequence b's prompt from 0.
        let q = seeded(4 * w, 8);
        let mut out = vec![0f32; 4 * w];
        let jobs = [
            AttendJob {
                row: 0,
                rows: 1,
                start: 9,
                kv: KvView::F32(&kv_a.0, &kv_a.1),
                head_stride: 10 * 16,
            },
            AttendJob {
                row: 1,
                rows: 3,
                start: 0,
                kv: KvView::F32(&kv_b.0, &kv_b.1),
                head_stride: 3 * 16,
            },
        ];
        attend(h, &jobs, &q, &mut out, 0.25);
        let a = naive(h, &q[..w], &kv_a.0, &kv_a.1, 9, 1, 0.25, 10 * 16);
        let b = naive(h, &q[w..], &kv_b.0, &kv_b.1, 0, 3, 0.25, 3 * 16);
        assert!(max_rel(&out[..w], &a) <= 1e-5);
        assert!(max_rel(&out[w..], &b) <= 1e-5);
        // The first of b's rows sees only its own first key: the output is that value.
        assert!(max_rel(&out[w..w + 16], &kv_b.1[..16]) <= 1e-6);
    }

    #[test]
    fn rope_pairs_rotate_by_their_angle_and_keep_their_length() {
        let (heads, d) = (2, 8);
        let half = d / 2;
        let angles: Vec<f32> = (0..3 * half).map(|i| i as f32 * 0.3).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        for interleaved in [false, true] {
            let x0 = seeded(heads * d, 9);
            let mut x = x0.clone();
            rope_in_place(&mut x, heads, d, &[2], &cos, &sin, interleaved);
            for head in 0..heads {
                for i in 0..half {
                    let (a, b) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (a, b) = (head * d + a, head * d + b);
                    let t = angles[2 * half + i];
                    let want = (
                        x0[a] * t.cos() - x0[b] * t.sin(),
                        x0[a] * t.sin() + x0[b] * t.cos(),
                    );
                    assert!((x[a] - want.0).abs() < 1e-6 && (x[b] - want.1).abs() < 1e-6);
                }
            }
        }
    }
}
