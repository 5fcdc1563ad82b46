//! The portable loops of the quantised products, one dot product per weight row and activation
//! row: the reference every vector loop is tested against, and the loops on CPUs without AVX2.
//! They also state each block layout once; the vector loops refer to them.

use super::quant::{ActBlock, BlockFn, MAX_ROWS, QWeight, QuantKind};
use half::f16;

/// The block loops for `kind`: each weight row against each activation row.
pub(super) fn block_fn(kind: QuantKind) -> BlockFn {
    fn each(
        dot: fn(&[u8], &[ActBlock]) -> f32,
        w: &QWeight<'_>,
        first: usize,
        acts: &[&[ActBlock]],
        out: &mut [[f32; MAX_ROWS]],
    ) {
        for (j, o) in out.iter_mut().enumerate() {
            for (a, v) in acts.iter().zip(o.iter_mut()) {
                *v = dot(w.row(first + j), a);
            }
        }
    }
    match kind {
        QuantKind::Q4K => |w, first, acts, out| each(dot_q4k, w, first, acts, out),
        QuantKind::Q6K => |w, first, acts, out| each(dot_q6k, w, first, acts, out),
        QuantKind::Q8_0 => |w, first, acts, out| each(dot_q8_0, w, first, acts, out),
    }
}

/// The 6-bit scale and minimum of Q4_K sub-block `j`.
fn scale_min_q4k(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Q4_K: per 256 values `d`, `dmin` (f16), twelve bytes of 6-bit scales and minimums for eight
/// sub-blocks of 32, and 128 bytes of 4-bit values (value = d·scale·q − dmin·min).
fn dot_q4k(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (blk, a) in w.chunks_exact(144).zip(a) {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let (scales, qs) = (&blk[4..16], &blk[16..144]);
        let (mut isum, mut msum) = (0i32, 0i32);
        for c in 0..4 {
            let (sc1, m1) = scale_min_q4k(2 * c, scales);
            let (sc2, m2) = scale_min_q4k(2 * c + 1, scales);
            let (mut s1, mut s2) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                s1 += (q & 0x0F) as i32 * a.qs[64 * c + l] as i32;
                s2 += (q >> 4) as i32 * a.qs[64 * c + 32 + l] as i32;
            }
            isum += sc1 as i32 * s1 + sc2 as i32 * s2;
            let sum32 = |s: usize| a.sums[2 * s] as i32 + a.sums[2 * s + 1] as i32;
            msum += m1 as i32 * sum32(2 * c) + m2 as i32 * sum32(2 * c + 1);
        }
        sum += a.d * (d * isum as f32 - dmin * msum as f32);
    }
    sum
}

/// Q6_K: per 256 values 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen signed 8-bit
/// scales (one per 16 values) and `d` (f16); value = d·scale·(q − 32).
fn dot_q6k(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (blk, a) in w.chunks_exact(210).zip(a) {
        let (ql, qh, sc, d) = (
            &blk[..128],
            &blk[128..192],
            &blk[192..208],
            f16_at(blk, 208),
        );
        let mut isum = 0i32;
        for h in 0..2 {
            let (ql, qh, sc, aq) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..], &a.qs[128 * h..]);
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                isum += sc[is] as i8 as i32 * q1 * aq[l] as i32
                    + sc[is + 2] as i8 as i32 * q2 * aq[l + 32] as i32
                    + sc[is + 4] as i8 as i32 * q3 * aq[l + 64] as i32
                    + sc[is + 6] as i8 as i32 * q4 * aq[l + 96] as i32;
            }
        }
        sum += d * a.d * isum as f32;
    }
    sum
}

/// Q8_0: per 32 values `d` (f16) and 32 signed bytes.
fn dot_q8_0(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut sum = 0f32;
    for (j, blk) in w.chunks_exact(34).enumerate() {
        let a = &a[j / 8];
        let aq = &a.qs[(j % 8) * 32..(j % 8) * 32 + 32];
        let isum: i32 = blk[2..]
            .iter()
            .zip(aq)
            .map(|(&q, &x)| q as i8 as i32 * x as i32)
            .sum();
        sum += f16_at(blk, 0) * a.d32[j % 8] * isum as f32;
    }
    sum
}
