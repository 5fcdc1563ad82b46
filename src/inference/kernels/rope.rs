//! Rotary embeddings applied in place on projection rows.

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
    use super::super::test_data::seeded;
    use super::*;

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
