//! The exponentials of a step: SiLU of the gate projection times the up projection, and the
//! softmax of a prompt chunk's attention scores. The C library's `expf` is called once per
//! value and cannot be vectorised; here one branch-free exponential is written so the compiler
//! vectorises every loop over it, compiled once portable and once for AVX2 with FMA, chosen at
//! run time. Each call spreads its rows over candle's thread pool.

use super::{Isa, detected_isa};

/// Values per unit of work on the thread pool for element-wise loops.
const CHUNK: usize = 16 * 1024;

/// `e^x` within 2 units in the last place for `x` in [-87.3, 88.3]; smaller `x` gives the
/// smallest normal number's neighbourhood (not 0) and larger saturates at `e^88.3`, which only
/// matters to callers that never pass such values (softmax takes `x <= 0`, SiLU divides by it).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that `n * LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor-like minimax polynomial for e^r on |r| <= ln2 / 2 (Cephes' coefficients).
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let k = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    e * f32::from_bits(((k + 127) as u32) << 23)
}

#[inline(always)]
fn silu_mul_loop(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// Lane-wise maximum and sum, so the loops vectorise without reordering one sum.
const LANES: usize = 16;

/// `e^((v - max) * scale)` for every `v` of `row` in place, `max` the row's largest value;
/// returns their sum. Inlined into each instruction set's loops (the per-row attention's too).
#[inline(always)]
pub(super) fn exp_in_place(row: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            *v = exp((*v - max) * scale);
            *s += *v;
        }
    }
    let mut sum = 0.0;
    for v in chunks.into_remainder() {
        *v = exp((*v - max) * scale);
        sum += *v;
    }
    sum + sums.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_loop(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_avx2(row: &mut [f32], scale: f32) -> f32 {
    exp_in_place(row, scale)
}

/// `silu(gate) * up`, element by element, with the given loops.
pub fn silu_mul_with(isa: Isa, gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    silu_mul_rows(isa, gate, up, 1, gate.len(), gate.len())
}

/// [`silu_mul_with`] with the best loops this CPU has.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    silu_mul_with(detected_isa(), gate, up)
}

/// `silu(gate) * up` for rows that hold the gate's `width` values and then the up projection's
/// (one product with the two weights stacked): rows of `width` values out.
pub fn silu_mul_halves_with(isa: Isa, rows: &[f32], width: usize) -> Vec<f32> {
    assert!(
        width > 0 && rows.len().is_multiple_of(2 * width),
        "rows of gate and up side by side expected"
    );
    silu_mul_rows(
        isa,
        rows,
        &rows[width..],
        rows.len() / (2 * width),
        width,
        2 * width,
    )
}

/// [`silu_mul_halves_with`] with the best loops this CPU has.
pub fn silu_mul_halves(rows: &[f32], width: usize) -> Vec<f32> {
    silu_mul_halves_with(detected_isa(), rows, width)
}

/// `rows` rows of `width` results, row `r`'s inputs read at `r * stride` of `gate` and `up`.
fn silu_mul_rows(
    isa: Isa,
    gate: &[f32],
    up: &[f32],
    rows: usize,
    width: usize,
    stride: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * width];
    let addr = out.as_mut_ptr() as usize;
    let per_row = width.div_ceil(CHUNK);
    let run = |units: std::ops::Range<usize>| {
        for unit in units {
            let (r, from) = (unit / per_row, (unit % per_row) * CHUNK);
            let to = (from + CHUNK).min(width);
            // SAFETY: units cover disjoint ranges of `out`, which outlives the pool's pass.
            let out = unsafe {
                std::slice::from_raw_parts_mut((addr as *mut f32).add(r * width + from), to - from)
            };
            let at = r * stride;
            let (g, u) = (&gate[at + from..at + to], &up[at + from..at + to]);
            match isa {
                // SAFETY: chosen only where AVX2 and FMA were detected.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { silu_mul_avx2(g, u, out) },
                Isa::Portable => silu_mul_loop(g, u, out),
            }
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(rows * per_row, run);
    out
}

/// Causal softmax of attention scores in place: `scores` is rows of `width` values, row `i`
/// sees its first `visible(i)` positions (at least one), which are scaled by `scale` and
/// normalised; the rest become 0.
pub fn causal_softmax_with(
    isa: Isa,
    scores: &mut [f32],
    width: usize,
    scale: f32,
    visible: impl Fn(usize) -> usize + Sync,
) {
    assert!(width > 0 && scores.len().is_multiple_of(width));
    let rows = scores.len() / width;
    let addr = scores.as_mut_ptr() as usize;
    let run = |range: std::ops::Range<usize>| {
        for i in range {
            // SAFETY: each row is one unit; rows are disjoint and `scores` outlives the pass.
            let row =
                unsafe { std::slice::from_raw_parts_mut((addr as *mut f32).add(i * width), width) };
            let (live, dead) = row.split_at_mut(visible(i).clamp(1, width));
            let sum = match isa {
                // SAFETY: chosen only where AVX2 and FMA were detected.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { softmax_avx2(live, scale) },
                Isa::Portable => exp_in_place(live, scale),
            };
            let inv = 1.0 / sum;
            live.iter_mut().for_each(|v| *v *= inv);
            dead.fill(0.0);
        }
    };
    candle_core::utils::barrier_pool().execute_chunked(rows, run);
}

/// [`causal_softmax_with`] with the best loops this CPU has.
pub fn causal_softmax(
    scores: &mut [f32],
    width: usize,
    scale: f32,
    visible: impl Fn(usize) -> usize + Sync,
) {
    causal_softmax_with(detected_isa(), scores, width, scale, visible)
}

#[cfg(test)]
mod tests {
    use super::super::test_data::seeded;
    use super::*;

    fn isas() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        if detected_isa() != Isa::Portable {
            all.push(detected_isa());
        }
        all
    }

    #[test]
    fn exp_is_within_two_ulps_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x <= 88.3 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        // Below the range: tiny, never NaN or negative.
        assert!(exp(-1000.0) >= 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn silu_mul_matches_the_definition_in_every_loop_set() {
        let n = 3 * CHUNK + 77;
        let g: Vec<f32> = seeded(n, 1).iter().map(|v| v * 30.0).collect();
        let u = seeded(n, 2);
        for isa in isas() {
            let got = silu_mul_with(isa, &g, &u);
            for i in 0..n {
                let (g, u) = (g[i] as f64, u[i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let err = (got[i] as f64 - want).abs();
                assert!(
                    err <= 1e-6 * want.abs().max(1e-3),
                    "{isa:?} at {i}: {} vs {want}",
                    got[i]
                );
            }
        }
        // Very negative gates give 0, not NaN.
        let got = silu_mul(&[-200.0, -90.0, 200.0], &[1.0, 1.0, 1.0]);
        assert!(
            got[0].abs() < 1e-30 && got[1].abs() < 1e-30 && got[2] == 200.0,
            "{got:?}"
        );
    }

    #[test]
    fn silu_mul_halves_matches_the_separate_tensors_in_every_loop_set() {
        let (rows, width) = (5, CHUNK + 300);
        let y: Vec<f32> = seeded(rows * 2 * width, 3)
            .iter()
            .map(|v| v * 20.0)
            .collect();
        let (gate, up): (Vec<f32>, Vec<f32>) = (
            y.chunks(width).step_by(2).flatten().copied().collect(),
            y.chunks(width)
                .skip(1)
                .step_by(2)
                .flatten()
                .copied()
                .collect(),
        );
        for isa in isas() {
            let got = silu_mul_halves_with(isa, &y, width);
            assert_eq!(got, silu_mul_with(isa, &gate, &up), "{isa:?}");
        }
    }

    #[test]
    fn causal_softmax_normalises_the_visible_positions_and_zeroes_the_rest() {
        let width = 67;
        let rows = 9;
        let scores: Vec<f32> = seeded(rows * width, 3).iter().map(|v| v * 20.0).collect();
        let scale = 0.125;
        let visible = |i: usize| 50 + i;
        for isa in isas() {
            let mut got = scores.clone();
            causal_softmax_with(isa, &mut got, width, scale, visible);
            for i in 0..rows {
                let row = &scores[i * width..(i + 1) * width];
                let live = visible(i).min(width);
                let max = row[..live]
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = row[..live]
                    .iter()
                    .map(|&v| ((v as f64 - max) * scale as f64).exp())
                    .collect();
                let sum: f64 = e.iter().sum();
                for j in 0..width {
                    let want = if j < live { e[j] / sum } else { 0.0 };
                    let g = got[i * width + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * want.max(1e-6),
                        "{isa:?} ({i}, {j}): {g} vs {want}"
                    );
                }
            }
        }
    }
}
