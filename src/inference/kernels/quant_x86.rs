//! AVX2 (with FMA and F16C) loops of the quantised products: each weight row of a block is
//! unpacked once and multiplied with `R` activation rows. Unsigned weight values times signed
//! activations go through `maddubs`, and the pairs' sums are multiplied by each sub-block's scale
//! in the same `madd`, so a K-quant super-block needs one float step per row. The multiplies
//! bound these loops (on a Zen 1 core, without them the same loop runs 1.6 times as fast), so
//! with four activation rows the K-quants fold the rows' products together before the scale's
//! `madd`, which then serves all four rows at once.

use super::quant::{ActBlock, BlockFn, MAX_ROWS, QWeight, QuantKind};
use std::arch::x86_64::*;

quant_block_fns!("avx2,fma,f16c");

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_epi32_128(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// The f16 at `p`, converted in a register (no call into a library's dispatch).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = unsafe { std::ptr::read_unaligned(p as *const u16) };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// A 128-bit shuffle that spreads byte `a` over the low eight bytes and byte `b` over the high.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn spread(a: u8, b: u8) -> __m128i {
    let rep = |x: u8| (x as u64 * 0x0101_0101_0101_0101) as i64;
    _mm_set_epi64x(rep(b), rep(a))
}

/// A Q4_K block's eight 6-bit scales (bytes 0..8) and minimums (bytes 8..16), unpacked a
/// 32-bit word at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q4k_scales_mins(blk: &[u8]) -> __m128i {
    let word = |i: usize| {
        u32::from_le_bytes([
            blk[4 + 4 * i],
            blk[5 + 4 * i],
            blk[6 + 4 * i],
            blk[7 + 4 * i],
        ])
    };
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let sc_lo = u0 & 0x3f3f_3f3f;
    let sc_hi = (u2 & 0x0f0f_0f0f) | (((u0 >> 6) & 0x0303_0303) << 4);
    let mn_lo = u1 & 0x3f3f_3f3f;
    let mn_hi = ((u2 >> 4) & 0x0f0f_0f0f) | (((u1 >> 6) & 0x0303_0303) << 4);
    _mm_set_epi32(mn_hi as i32, mn_lo as i32, sc_hi as i32, sc_lo as i32)
}

/// A Q4_K block's scales: `d` and `dmin`, the unpacked 6-bit scales and minimums
/// ([`q4k_scales_mins`]), and the eight minimums as i16.
struct Q4kHead {
    d: f32,
    dmin: f32,
    sm: __m128i,
    mins: __m128i,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_head(blk: &[u8]) -> Q4kHead {
    let p = blk.as_ptr();
    // SAFETY: a Q4_K block is 144 bytes, its two f16 scales first.
    let (d, dmin) = unsafe { (f16_at(p), f16_at(p.add(2))) };
    let sm = q4k_scales_mins(blk);
    Q4kHead {
        d,
        dmin,
        sm,
        mins: _mm_cvtepu8_epi16(_mm_srli_si128::<8>(sm)),
    }
}

/// Chunk `c` (values `64c..64c + 64`) of a Q4_K block: its low and high 4-bit values and their
/// two sub-blocks' scales, each broadcast as i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_chunk(qs: *const u8, sm: __m128i, c: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let q = unsafe { load(qs.add(32 * c)) };
    let s = _mm_shuffle_epi8(sm, spread(2 * c as u8, 2 * c as u8 + 1));
    [
        _mm256_and_si256(q, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
        _mm256_broadcastw_epi16(_mm_cvtepu8_epi16(s)),
        _mm256_broadcastw_epi16(_mm_cvtepu8_epi16(_mm_srli_si128::<8>(s))),
    ]
}

/// Q4_K (layout in `quant_portable::dot_q4k`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    if let Ok(four) = <&[&[ActBlock]; 4]>::try_from(&acts[..]) {
        let got = unsafe { q4k_four(w, four) };
        return std::array::from_fn(|r| got[r]);
    }
    let mut facc = [_mm256_setzero_ps(); R];
    let mut mins_total = [0f32; R];
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let Q4kHead { d, dmin, sm, mins } = q4k_head(blk);
        let qs = unsafe { blk.as_ptr().add(16) };
        let mut isum = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            // SAFETY: a Q4_K block holds 128 bytes of values at `qs`.
            let [lo, hi, slo, shi] = unsafe { q4k_chunk(qs, sm, c) };
            for (r, acc) in isum.iter_mut().enumerate() {
                let ap = acts[r][b].qs.as_ptr() as *const u8;
                let (alo, ahi) = unsafe { (load(ap.add(64 * c)), load(ap.add(64 * c + 32))) };
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, alo), slo);
                let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ahi), shi);
                *acc = _mm256_add_epi32(*acc, _mm256_add_epi32(p, p2));
            }
        }
        for r in 0..R {
            let a = &acts[r][b];
            facc[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum[r]),
                _mm256_set1_ps(d * a.d),
                facc[r],
            );
            let s16 = a.sums.as_ptr() as *const __m128i;
            let (s_lo, s_hi) = unsafe { (_mm_loadu_si128(s16), _mm_loadu_si128(s16.add(1))) };
            // Sums of 32 values: adjacent pairs of the sixteen 16-value sums.
            let sums32 = _mm_hadd_epi16(s_lo, s_hi);
            let m = hsum_epi32_128(_mm_madd_epi16(mins, sums32));
            mins_total[r] += dmin * a.d * m as f32;
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(facc[r]) - mins_total[r];
    }
    out
}

/// Sums of four rows' byte products, each row's kept apart: per 128-bit half, row `r` in
/// 32-bit unit `r` (two i16), each i16 the sum of four of its row's i16 products (at most
/// 4 × 2 × 15 × 127, clear of i16's limit for 4-bit weights).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fold_rows(p: &[__m256i; 4]) -> __m256i {
    let a = _mm256_add_epi16(
        _mm256_unpacklo_epi32(p[0], p[1]),
        _mm256_unpackhi_epi32(p[0], p[1]),
    );
    let c = _mm256_add_epi16(
        _mm256_unpacklo_epi32(p[2], p[3]),
        _mm256_unpackhi_epi32(p[2], p[3]),
    );
    _mm256_add_epi16(_mm256_unpacklo_epi64(a, c), _mm256_unpackhi_epi64(a, c))
}

/// Q4_K against four activation rows (prompts, batched steps). The multiplies are what bound
/// these loops, so the rows' byte products are folded together first ([`fold_rows`]) and each
/// sub-block's scale is applied once for all four rows instead of once per row: 10 multiplies
/// for every 64 values of four rows where there were 16, the same integer sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_four(w: &[u8], acts: &[&[ActBlock]; 4]) -> [f32; 4] {
    // Per 128-bit half, row r in lane r.
    let mut facc = _mm256_setzero_ps();
    let mut mins_acc = [_mm_setzero_ps(); 4];
    for (b, blk) in w.chunks_exact(144).enumerate() {
        let Q4kHead { d, dmin, sm, mins } = q4k_head(blk);
        let qs = unsafe { blk.as_ptr().add(16) };
        let mut isum = _mm256_setzero_si256();
        for c in 0..4 {
            // SAFETY: a Q4_K block holds 128 bytes of values at `qs`.
            let [lo, hi, slo, shi] = unsafe { q4k_chunk(qs, sm, c) };
            let mut pl = [_mm256_setzero_si256(); 4];
            let mut ph = [_mm256_setzero_si256(); 4];
            for r in 0..4 {
                let ap = acts[r][b].qs.as_ptr() as *const u8;
                let (alo, ahi) = unsafe { (load(ap.add(64 * c)), load(ap.add(64 * c + 32))) };
                pl[r] = _mm256_maddubs_epi16(lo, alo);
                ph[r] = _mm256_maddubs_epi16(hi, ahi);
            }
            let l = _mm256_madd_epi16(fold_rows(&pl), slo);
            let h = _mm256_madd_epi16(fold_rows(&ph), shi);
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(l, h));
        }
        let ad = _mm_set_ps(acts[3][b].d, acts[2][b].d, acts[1][b].d, acts[0][b].d);
        let scale = _mm_mul_ps(_mm_set1_ps(d), ad);
        facc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(isum),
            _mm256_set_m128(scale, scale),
            facc,
        );
        for (r, acc) in mins_acc.iter_mut().enumerate() {
            let a = &acts[r][b];
            let s32 = unsafe { _mm_loadu_si128(a.sums32.as_ptr() as *const __m128i) };
            let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, s32));
            *acc = _mm_fmadd_ps(m, _mm_set1_ps(dmin * a.d), *acc);
        }
    }
    let halves = _mm_add_ps(
        _mm256_castps256_ps128(facc),
        _mm256_extractf128_ps::<1>(facc),
    );
    std::array::from_fn(|r| lane(halves, r) - hsum_ps128(mins_acc[r]))
}

/// Lane `r` (0..4) of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane(v: __m128, r: usize) -> f32 {
    let mut all = [0f32; 4];
    // SAFETY: `all` holds four f32.
    unsafe { _mm_storeu_ps(all.as_mut_ptr(), v) };
    all[r]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_ps128(s: __m128) -> f32 {
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s)))
}

/// A Q6_K block's `d` and its sixteen 8-bit scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_head(blk: &[u8]) -> (f32, __m128i) {
    assert!(blk.len() >= 210, "a Q6_K block is 210 bytes");
    let p = blk.as_ptr();
    // SAFETY: checked above: scales at 192..208, `d` at 208..210.
    unsafe {
        (
            f16_at(p.add(208)),
            _mm_loadu_si128(p.add(192) as *const __m128i),
        )
    }
}

/// The 128 six-bit values (0..63) of half `h` (0 or 1) of a Q6_K block, 32 a register: four
/// bits from its first 128 bytes, two from the next 64.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6k_values(blk: &[u8], h: usize) -> [__m256i; 4] {
    assert!(
        blk.len() >= 192 && h < 2,
        "a Q6_K block is 210 bytes, in two halves"
    );
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let (ql, qh) = (blk.as_ptr(), blk[128..].as_ptr());
    // SAFETY: checked above: bytes 64h..64h + 64 and 128 + 32h..128 + 32h + 32 lie in `blk`.
    let (ql0, ql1, qhv) = unsafe {
        (
            load(ql.add(64 * h)),
            load(ql.add(64 * h + 32)),
            load(qh.add(32 * h)),
        )
    };
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qhv), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qhv), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            _mm256_and_si256(qhv, m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qhv), m30),
        ),
    ]
}

/// Q6_K (layout in `quant_portable::dot_q6k`): the raw 6-bit values (0..63) go through `maddubs`, and
/// the offset of 32 is taken off with the activations' 16-value sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    if let Ok(four) = <&[&[ActBlock]; 4]>::try_from(&acts[..]) {
        let got = unsafe { q6k_four(w, four) };
        return std::array::from_fn(|r| got[r]);
    }
    let mut facc = [_mm256_setzero_ps(); R];
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let (d, sc) = q6k_head(blk);
        let sc16 = _mm256_cvtepi8_epi16(sc);
        let mut isum = [_mm256_setzero_si256(); R];
        for h in 0..2 {
            let v = q6k_values(blk, h);
            // Each 32 values span two 16-value sub-blocks: one scale per 128-bit half.
            let mut s = [_mm256_setzero_si256(); 4];
            for (i, s) in s.iter_mut().enumerate() {
                let at = (8 * h + 2 * i) as u8;
                *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread(at, at + 1)));
            }
            for (r, acc) in isum.iter_mut().enumerate() {
                let ap = unsafe { (acts[r][b].qs.as_ptr() as *const u8).add(128 * h) };
                for i in 0..4 {
                    let a = unsafe { load(ap.add(32 * i)) };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(v[i], a), s[i]);
                    *acc = _mm256_add_epi32(*acc, p);
                }
            }
        }
        for r in 0..R {
            let a = &acts[r][b];
            let sums = unsafe { _mm256_loadu_si256(a.sums.as_ptr() as *const __m256i) };
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, sums));
            let total = _mm256_sub_epi32(isum[r], offset);
            facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(d * a.d), facc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(facc[r]);
    }
    out
}

/// Two rows' byte products side by side: per 128-bit half, row `r` in 32-bit units `r` and
/// `r + 2`, each i16 the sum of two of its row's products (at most 2 × 2 × 63 × 127, clear of
/// i16's limit for 6-bit weights, where four would not be).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fold_pair(p0: __m256i, p1: __m256i) -> __m256i {
    _mm256_add_epi16(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1))
}

/// Q6_K against four activation rows: as [`q4k_four`], the rows' products folded (in pairs,
/// for 6-bit values) before each sub-block's scale multiplies them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_four(w: &[u8], acts: &[&[ActBlock]; 4]) -> [f32; 4] {
    // Rows 0 and 1, then 2 and 3: per 128-bit half, lanes [a, b, a, b].
    let mut facc = [_mm256_setzero_ps(); 2];
    for (b, blk) in w.chunks_exact(210).enumerate() {
        let (d, sc) = q6k_head(blk);
        let sc16 = _mm256_cvtepi8_epi16(sc);
        let mut isum = [_mm256_setzero_si256(); 2];
        for h in 0..2 {
            let v = q6k_values(blk, h);
            for (i, v) in v.iter().enumerate() {
                let at = (8 * h + 2 * i) as u8;
                let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread(at, at + 1)));
                let mut prod = [_mm256_setzero_si256(); 4];
                for (r, pr) in prod.iter_mut().enumerate() {
                    let ap = unsafe { (acts[r][b].qs.as_ptr() as *const u8).add(128 * h + 32 * i) };
                    *pr = _mm256_maddubs_epi16(*v, unsafe { load(ap) });
                }
                let lo = _mm256_madd_epi16(fold_pair(prod[0], prod[1]), s);
                let hi = _mm256_madd_epi16(fold_pair(prod[2], prod[3]), s);
                isum[0] = _mm256_add_epi32(isum[0], lo);
                isum[1] = _mm256_add_epi32(isum[1], hi);
            }
        }
        for (pair, (acc, sum)) in facc.iter_mut().zip(isum).enumerate() {
            let (ra, rb) = (&acts[2 * pair][b], &acts[2 * pair + 1][b]);
            // The offset of 32, taken off in integers in the rows' own lanes.
            let offset = |a: &ActBlock| {
                let sums = unsafe { _mm256_loadu_si256(a.sums.as_ptr() as *const __m256i) };
                _mm256_madd_epi16(sc16, sums)
            };
            let (oa, ob) = (offset(ra), offset(rb));
            let both =
                _mm256_add_epi32(_mm256_unpacklo_epi32(oa, ob), _mm256_unpackhi_epi32(oa, ob));
            let total = _mm256_sub_epi32(sum, _mm256_slli_epi32::<5>(both));
            let (da, db) = (ra.d * d, rb.d * d);
            let scale = _mm256_setr_ps(da, db, da, db, da, db, da, db);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), scale, *acc);
        }
    }
    std::array::from_fn(|r| {
        let pair = facc[r / 2];
        let halves = _mm_add_ps(
            _mm256_castps256_ps128(pair),
            _mm256_extractf128_ps::<1>(pair),
        );
        lane(halves, r % 2) + lane(halves, r % 2 + 2)
    })
}

/// Q8_0 (layout in `quant_portable::dot_q8_0`): |w| times the activations with w's sign, so `maddubs`
/// takes signed weights (Q8_0 values lie in -127..=127, as do the activations).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0<const R: usize>(w: &[u8], acts: &[&[ActBlock]; R]) -> [f32; R] {
    let ones = _mm256_set1_epi16(1);
    let mut facc = [_mm256_setzero_ps(); R];
    for (j, blk) in w.chunks_exact(34).enumerate() {
        let dw = unsafe { f16_at(blk.as_ptr()) };
        let q = unsafe { load(blk.as_ptr().add(2)) };
        let aq = _mm256_abs_epi8(q);
        let (b, off) = (j / 8, (j % 8) * 32);
        for r in 0..R {
            let a = &acts[r][b];
            let x = unsafe { load((a.qs.as_ptr() as *const u8).add(off)) };
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(x, q)), ones);
            let scale = _mm256_set1_ps(dw * a.d32[j % 8]);
            facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, facc[r]);
        }
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(facc[r]);
    }
    out
}
