//! AVX-512 loops of the quantised products (F, BW and VNNI, with the AVX2 set beside them):
//! 64 values per instruction. Unsigned K-quant values times signed activations go through
//! `maddubs`, and `dpwssd` multiplies the pairs' sums by their sub-block's scale and adds them
//! in one step; Q8_0 weights keep their sign on the activations, and `dpbusd` sums four products
//! a lane.

use super::quant::{ActBlock, BlockFn, MAX_ROWS, QWeight, QuantKind};
use super::quant_x86::{f16_at, q4k_scales_mins};
use std::arch::x86_64::*;

quant_block_fns!("avx512f,avx512bw,avx512vnni,avx2,fma,f16c");

/// Sixteen-bit lane indices: lane `k` of 32 takes `first + k / group`.
const fn by_group(group: usize, first: u16) -> [u16; 32] {
    let mut v = [0u16; 32];
    let mut k = 0;
    while k < 32 {
        v[k] = first + (k / group) as u16;
        k += 1;
    }
    v
}

/// Per chunk of 64 Q4_K values: lanes 0..16 take sub-block `2c`'s scale, 16..32 `2c + 1`'s.
const Q4K_SCALE: [[u16; 32]; 4] = [
    by_group(16, 0),
    by_group(16, 2),
    by_group(16, 4),
    by_group(16, 6),
];
/// Per 64 Q6_K values: one scale per 16 values, eight lanes each.
const Q6K_SCALE: [[u16; 32]; 4] = [
    by_group(8, 0),
    by_group(8, 4),
    by_group(8, 8),
    by_group(8, 12),
];

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn idx(v: &[u16; 32]) -> __m512i {
    // SAFETY: 64 bytes are read from a 64-byte array.
    unsafe { _mm512_loadu_si512(v.as_ptr() as *const _) }
}

/// Shift counts: 0 for the low 256 bits, `hi` for the high.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn halves(lo: u16, hi: u16) -> __m512i {
    let mut v = [lo; 32];
    v[16..].fill(hi);
    idx(&v)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn load512(p: *const u8) -> __m512i {
    unsafe { _mm512_loadu_si512(p as *const _) }
}

/// The 32 bytes at `p` in both halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn twice(p: *const u8) -> __m512i {
    unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn hsum_128(v: __m128) -> f32 {
    let s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// Q4_K (layout in `quant_portable::dot_q4k`): each 32 bytes of nibbles become 64 values in order, the
/// low nibbles in the low half and the high ones in the high half, as the activations lie.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    let m4 = _mm512_set1_epi8(0x0F);
    let nibbles = halves(0, 4);
    let mut facc = [_mm512_setzero_ps(); R];
    let mut macc = [_mm_setzero_ps(); R];
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let p = blk.as_ptr();
        let (d, dmin) = unsafe { (f16_at(p), f16_at(p.add(2))) };
        let sm = q4k_scales_mins(blk);
        let scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sm));
        let mins = _mm_cvtepu8_epi16(_mm_srli_si128::<8>(sm));
        let mut wv = [_mm512_setzero_si512(); 4];
        let mut sv = [_mm512_setzero_si512(); 4];
        for c in 0..4 {
            let q = unsafe { twice(p.add(16 + 32 * c)) };
            wv[c] = _mm512_and_si512(_mm512_srlv_epi16(q, nibbles), m4);
            sv[c] = _mm512_permutexvar_epi16(idx(&Q4K_SCALE[c]), scales);
        }
        for r in 0..R {
            let a = &acts[r][b];
            let ap = a.qs.as_ptr() as *const u8;
            let mut acc = _mm512_setzero_si512();
            for c in 0..4 {
                let x = unsafe { load512(ap.add(64 * c)) };
                acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(wv[c], x), sv[c]);
            }
            facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(d * a.d), facc[r]);
            let s16 = a.sums.as_ptr() as *const __m128i;
            let (s_lo, s_hi) = unsafe { (_mm_loadu_si128(s16), _mm_loadu_si128(s16.add(1))) };
            // Sums of 32 values: adjacent pairs of the sixteen 16-value sums.
            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, _mm_hadd_epi16(s_lo, s_hi)));
            macc[r] = _mm_fmadd_ps(m, _mm_set1_ps(dmin * a.d), macc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(facc[r]) - hsum_128(macc[r]);
    }
    out
}

/// Q6_K (layout in `quant_portable::dot_q6k`): the raw 6-bit values (0..63), 64 in order per register,
/// and the offset of 32 taken off with the activations' 16-value sums.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    let m4 = _mm512_set1_epi8(0x0F);
    let m30 = _mm512_set1_epi8(0x30);
    // Values 0..32 of a half take bits 0-1 of the high bits, 32..64 bits 2-3 (low register);
    // 64..96 bits 4-5 and 96..128 bits 6-7 (high register).
    let (up, down) = (halves(4, 2), halves(0, 2));
    let mut facc = [_mm256_setzero_ps(); R];
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let p = blk.as_ptr();
        let d = unsafe { f16_at(p.add(208)) };
        let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p.add(192) as *const __m128i) });
        let scales = _mm512_castsi256_si512(sc16);
        let mut v = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let (ql, qh) = unsafe { (load512(p.add(64 * h)), twice(p.add(128 + 32 * h))) };
            v[2 * h] = _mm512_or_si512(
                _mm512_and_si512(ql, m4),
                _mm512_and_si512(_mm512_sllv_epi16(qh, up), m30),
            );
            v[2 * h + 1] = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                _mm512_and_si512(_mm512_srlv_epi16(qh, down), m30),
            );
        }
        let sv = [0, 1, 2, 3].map(|g| _mm512_permutexvar_epi16(idx(&Q6K_SCALE[g]), scales));
        for r in 0..R {
            let a = &acts[r][b];
            let ap = a.qs.as_ptr() as *const u8;
            let mut acc = _mm512_setzero_si512();
            for g in 0..4 {
                let x = unsafe { load512(ap.add(64 * g)) };
                acc = _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(v[g], x), sv[g]);
            }
            let acc = _mm256_add_epi32(
                _mm512_castsi512_si256(acc),
                _mm512_extracti64x4_epi64::<1>(acc),
            );
            let sums = unsafe { _mm256_loadu_si256(a.sums.as_ptr() as *const __m256i) };
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, sums));
            let total = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc, offset));
            facc[r] = _mm256_fmadd_ps(total, _mm256_set1_ps(d * a.d), facc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        let s = facc[r];
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        out[r] = hsum_128(s);
    }
    out
}

/// Q8_0 (layout in `quant_portable::dot_q8_0`): two 32-value blocks per register; the activations take
/// the weights' signs so `dpbusd` multiplies |w| (unsigned) with them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q8_0<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    let zero = _mm512_setzero_si512();
    let mut facc = [_mm512_setzero_ps(); R];
    // 256 values (one activation block) are eight Q8_0 blocks of 34 bytes.
    for (b, blks) in w.chunks_exact(8 * 34).enumerate() {
        let ad: [__m512; R] = std::array::from_fn(|r| unsafe {
            _mm512_castps256_ps512(_mm256_loadu_ps(acts[r][b].d32.as_ptr()))
        });
        for pair in 0..4 {
            let p = unsafe { blks.as_ptr().add(68 * pair) };
            let q = unsafe {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(p.add(2) as *const __m256i)),
                    _mm256_loadu_si256(p.add(36) as *const __m256i),
                )
            };
            let negative = _mm512_movepi8_mask(q);
            let magnitude = _mm512_abs_epi8(q);
            let (d0, d1) = unsafe { (f16_at(p), f16_at(p.add(34))) };
            let dv = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
            // The activations' scales of these two blocks, each over eight lanes.
            let pick = _mm512_set1_epi32(2 * pair as i32);
            let pick = _mm512_mask_add_epi32(pick, 0xFF00, pick, _mm512_set1_epi32(1));
            for r in 0..R {
                let ap = acts[r][b].qs.as_ptr() as *const u8;
                let x = unsafe { load512(ap.add(64 * pair)) };
                let x = _mm512_mask_sub_epi8(x, negative, zero, x);
                let dot = _mm512_dpbusd_epi32(zero, magnitude, x);
                let scale = _mm512_mul_ps(dv, _mm512_permutexvar_ps(pick, ad[r]));
                facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, facc[r]);
            }
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(facc[r]);
    }
    out
}
