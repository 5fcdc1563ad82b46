//! Causal attention over host caches: every (query row, head) of a step one unit on candle's
//! thread pool, inner loops per instruction set.

use half::f16;

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{AttendJob, CacheElem, Heads, Isa, KvView, detected_isa};

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
#[inline(always)]
pub(super) fn softmax_unscaled(scores: &mut [f32]) -> f32 {
    1.0 / super::activation::exp_in_place(scores, 1.0)
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

#[cfg(test)]
mod tests {
    use super::super::test_data::seeded;
    use super::super::{AttendJob, Heads, KvView};
    use super::*;

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
}
