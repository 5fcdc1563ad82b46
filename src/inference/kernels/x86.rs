//! AVX2 (with F16C and FMA) inner loops of the attention kernel.

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

/// One (row, head) unit, as `attention::Lanes::unit` describes it. Scores come eight positions at a time (eight independent
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
    let inv = _mm256_set1_ps(super::attention::softmax_unscaled(scores));
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
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(b + 8 * l), _mm256_mul_ps(*a, inv)) };
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
