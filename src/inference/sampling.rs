//! Picking each next token the way Hugging Face transformers' `generate` does, step for step:
//! repetition penalty, temperature, top-k, then top-p over the top-k renormalised, then one draw
//! from what is left. candle's `TopKThenTopP` compares `top_p` with the top-k probabilities before
//! renormalising them and then samples from all k, so a user who sets only `top_p` (with the
//! default `top_k` of 50) got a different distribution from the model card's.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SamplingParams;

/// One reply's sampler: its settings and its own seeded random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// `seed` 0 in the settings means a fresh seed per reply.
    pub fn new(params: &SamplingParams) -> Self {
        let seed = if params.seed == 0 {
            rand::random()
        } else {
            params.seed
        };
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token after `context` (the tokens so far, prompt included) given the model's
    /// `logits` for it.
    pub fn sample(&mut self, mut logits: Vec<f32>, context: &[u32]) -> u32 {
        let p = &self.params;
        let from = context.len().saturating_sub(p.repeat_last_n);
        penalise_repeats(&mut logits, p.repetition_penalty, &context[from..]);
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let allowed = allowed(&logits, p.temperature, p.top_k, p.top_p);
        let mut r = self.rng.random::<f64>();
        for &(token, prob) in &allowed {
            if r < prob {
                return token;
            }
            r -= prob;
        }
        // Rounding left a sliver past the last token: it is the last one.
        allowed.last().map_or_else(|| argmax(&logits), |&(t, _)| t)
    }
}

/// transformers' repetition penalty: every token seen once in `context` has its logit divided by
/// `penalty` when positive and multiplied when negative, so it becomes less likely either way.
pub fn penalise_repeats(logits: &mut [f32], penalty: f32, context: &[u32]) {
    if (penalty - 1.0).abs() <= f32::EPSILON {
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(context.len());
    for &t in context {
        if !seen.insert(t) {
            continue;
        }
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The first index of the largest logit (NaN never wins).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l > best.1 {
            best = (i, l);
        }
    }
    best.0 as u32
}

/// The tokens a draw may pick and their probabilities (summing to 1), most likely first:
/// logits over `temperature`; with `top_k` > 0 only tokens at least as likely as the k-th
/// (ties kept, as transformers keeps them); then, with `top_p` < 1, over those renormalised, the
/// tokens left once the least likely whose probabilities add up to at most `1 - top_p` are
/// dropped (always at least the most likely one).
pub fn allowed(logits: &[f32], temperature: f64, top_k: usize, top_p: f64) -> Vec<(u32, f64)> {
    let mut scored: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, f64::from(l) / temperature))
        .collect();
    if scored.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    let by_score_desc =
        |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    if top_k > 0 && top_k < scored.len() {
        // The k-th score, then everything at least that high.
        scored.select_nth_unstable_by(top_k - 1, by_score_desc);
        let kth = scored[top_k - 1].1;
        scored.retain(|&(_, s)| s >= kth);
    }
    scored.sort_unstable_by(by_score_desc);
    // Softmax over what top-k left: its renormalised probabilities.
    let max = scored[0].1;
    let mut sum = 0.0;
    for s in scored.iter_mut() {
        s.1 = (s.1 - max).exp();
        sum += s.1;
    }
    for s in scored.iter_mut() {
        s.1 /= sum;
    }
    if top_p < 1.0 {
        // From the least likely up, drop tokens while their running total stays within
        // 1 - top_p.
        let mut dropped = 0.0;
        let mut keep = scored.len();
        while keep > 1 {
            let next = dropped + scored[keep - 1].1;
            if next > 1.0 - top_p {
                break;
            }
            dropped = next;
            keep -= 1;
        }
        scored.truncate(keep);
        let kept: f64 = scored.iter().map(|s| s.1).sum();
        for s in scored.iter_mut() {
            s.1 /= kept;
        }
    }
    scored
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded logits of a 200-token vocabulary, spread like a model's (a few likely tokens, a
    /// long tail).
    fn logits(seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..200)
            .map(|i| {
                let base: f32 = rng.random_range(-4.0..4.0);
                if i % 17 == 0 { base + 4.0 } else { base }
            })
            .collect()
    }

    /// The exact distribution, computed the other way round from `allowed`: probabilities of
    /// every token, the top k by a full sort, renormalised, then the most likely tokens taken
    /// until their total reaches `top_p` (the set transformers keeps, stated from the top).
    fn reference(logits: &[f32], t: f64, k: usize, p: f64) -> Vec<(u32, f64)> {
        let mut all: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, f64::from(l) / t))
            .collect();
        all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        if k > 0 {
            let kth = all[k.min(all.len()) - 1].1;
            all.retain(|&(_, s)| s >= kth);
        }
        let z: f64 = all.iter().map(|(_, s)| s.exp()).sum();
        let probs: Vec<(u32, f64)> = all.iter().map(|&(i, s)| (i, s.exp() / z)).collect();
        let mut kept = Vec::new();
        let mut total = 0.0;
        for &(i, q) in &probs {
            kept.push((i, q));
            total += q;
            // Dropping the rest is allowed once what they hold is at most 1 - p.
            if 1.0 - total <= 1.0 - p + 1e-12 {
                break;
            }
        }
        let z: f64 = kept.iter().map(|(_, q)| q).sum();
        kept.into_iter().map(|(i, q)| (i, q / z)).collect()
    }

    /// The chi-square statistic of `counts` against `probs` over `n` draws (bins expecting
    /// fewer than 5 merged), and its degrees of freedom.
    fn chi_square(counts: &[usize], probs: &[f64], n: usize) -> (f64, usize) {
        let (mut stat, mut bins) = (0.0, 0usize);
        let (mut small_o, mut small_e) = (0.0, 0.0);
        for (&o, &p) in counts.iter().zip(probs) {
            let e = p * n as f64;
            if e < 5.0 {
                small_o += o as f64;
                small_e += e;
                continue;
            }
            stat += (o as f64 - e).powi(2) / e;
            bins += 1;
        }
        if small_e > 0.0 {
            stat += (small_o - small_e).powi(2) / small_e;
            bins += 1;
        }
        (stat, bins.saturating_sub(1))
    }

    /// The chi-square value a correct sampler exceeds with probability 0.001 (Wilson-Hilferty).
    fn critical(df: usize) -> f64 {
        let df = df.max(1) as f64;
        let a = 2.0 / (9.0 * df);
        df * (1.0 - a + 3.09 * a.sqrt()).powi(3)
    }

    #[test]
    fn the_allowed_set_is_transformers_and_renormalised() {
        let l = logits(1);
        for (k, p) in [(0, 0.9), (50, 1.0), (50, 0.9), (5, 0.5), (1, 0.9), (0, 1.0)] {
            let got = allowed(&l, 1.0, k, p);
            let want = reference(&l, 1.0, k, p);
            let ids = |v: &[(u32, f64)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(&got), ids(&want), "k={k} p={p}");
            for ((_, a), (_, b)) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-9, "k={k} p={p}: {a} vs {b}");
            }
            let sum: f64 = got.iter().map(|x| x.1).sum();
            assert!((sum - 1.0).abs() < 1e-9);
        }
        // Top-p applies to the top-k renormalised: with k = 50 and p = 0.9 far fewer than 50
        // tokens are left, where candle's order kept all 50.
        let both = allowed(&l, 1.0, 50, 0.9);
        assert!(both.len() < 50, "{}", both.len());
        assert!(both.len() > 1, "{}", both.len());
    }

    #[test]
    fn ties_at_the_kth_score_are_kept_and_temperature_sharpens() {
        let l = [1.0, 3.0, 2.0, 2.0, 0.5];
        let ids: Vec<u32> = allowed(&l, 1.0, 2, 1.0).iter().map(|x| x.0).collect();
        assert_eq!(ids, [1, 2, 3]);
        let hot = allowed(&l, 2.0, 0, 1.0);
        let cold = allowed(&l, 0.5, 0, 1.0);
        assert!(cold[0].1 > hot[0].1);
        assert_eq!(argmax(&[0.0, f32::NAN, 2.0, 2.0]), 2);
    }

    #[test]
    fn repeats_are_penalised_once_each_whatever_the_sign() {
        let mut l = vec![2.0, -2.0, 1.0];
        penalise_repeats(&mut l, 2.0, &[0, 1, 0, 0]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        let mut same = vec![2.0, -2.0];
        penalise_repeats(&mut same, 1.0, &[0, 1]);
        assert_eq!(same, vec![2.0, -2.0]);
    }

    /// Thousands of seeded draws follow the exact distribution (chi-square at the 0.001 level)
    /// and never pick a token outside it, for top-k alone, top-p alone and both.
    #[test]
    fn draws_follow_the_exact_distribution() {
        let l = logits(7);
        let n = 6000;
        for (k, p, t) in [
            (50, 1.0, 1.0),
            (0, 0.9, 1.0),
            (50, 0.9, 1.0),
            (20, 0.8, 0.7),
        ] {
            let want = reference(&l, t, k, p);
            let mut sampler = Sampler::new(&SamplingParams {
                temperature: t,
                top_k: k,
                top_p: p,
                repetition_penalty: 1.0,
                repeat_last_n: 64,
                seed: 20261201 + k as u64,
            });
            let mut counts = vec![0usize; want.len()];
            for _ in 0..n {
                let token = sampler.sample(l.clone(), &[]);
                let Some(i) = want.iter().position(|&(id, _)| id == token) else {
                    panic!("k={k} p={p}: token {token} is outside the allowed set");
                };
                counts[i] += 1;
            }
            let probs: Vec<f64> = want.iter().map(|x| x.1).collect();
            let (stat, df) = chi_square(&counts, &probs, n);
            assert!(
                stat < critical(df),
                "k={k} p={p} t={t}: chi-square {stat:.1} with {df} degrees of freedom"
            );
        }
    }

    #[test]
    fn greedy_is_the_argmax_after_the_penalty() {
        let mut s = Sampler::new(&SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(vec![1.0, 3.0, 2.0], &[]), 1);
        assert_eq!(s.sample(vec![1.0, 3.0, 2.0], &[1]), 2);
    }
}
