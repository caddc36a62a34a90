//! Drawing a token from processed scores with a per-row ChaCha stream.
//!
//! A row's stream is keyed by (seed, stream id) only, so its draws never depend on the batch it
//! runs in, on thread timing or on the backend.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};

/// One output row's random stream.
pub struct RowRng(ChaCha20Rng);

impl RowRng {
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        RowRng(rng)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Samples from softmax(scores). Removed tokens (-inf) have probability exactly 0.
/// Weights are accumulated in f64 so that a vocabulary of 150k tokens sums without drift.
pub fn sample(scores: &[f32], rng: &mut RowRng, step: usize, row: usize) -> Result<usize> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return Err(Error::Numerical(format!(
            "step {step}, row {row}: no token can be sampled (every score is -inf or NaN after the logits processors); \
             relax bad_words_ids/suppress_tokens or the sampling thresholds"
        )));
    }
    let max = max as f64;
    let total: f64 = scores.iter().filter(|s| **s > f32::NEG_INFINITY).map(|&s| (s as f64 - max).exp()).sum();
    let target = rng.uniform() * total;
    let mut acc = 0.0f64;
    let mut last_kept = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > f32::NEG_INFINITY {
            acc += (s as f64 - max).exp();
            last_kept = i;
            if acc > target {
                return Ok(i);
            }
        }
    }
    // Rounding can leave `target` a hair above the final sum: the last kept token owns that mass.
    Ok(last_kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |seed, stream| {
            let mut r = RowRng::new(seed, stream);
            (0..4).map(|_| r.uniform()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 0), draw(7, 0));
        assert_ne!(draw(7, 0), draw(7, 1));
        assert_ne!(draw(7, 0), draw(8, 0));
        assert!(draw(1, 0).iter().all(|u| (0.0..1.0).contains(u)));
    }

    #[test]
    fn never_samples_removed_tokens() {
        let scores = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        let mut rng = RowRng::new(3, 0);
        for _ in 0..2000 {
            let t = sample(&scores, &mut rng, 0, 0).unwrap();
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn frequencies_follow_softmax() {
        let scores = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = RowRng::new(11, 0);
        let mut counts = [0usize; 4];
        let n = 60_000;
        for _ in 0..n {
            counts[sample(&scores, &mut rng, 0, 0).unwrap()] += 1;
        }
        for (i, expected) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0, 0.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - expected).abs() < 0.01, "token {i}: {got} vs {expected}");
        }
    }

    #[test]
    fn all_removed_is_a_numerical_error() {
        let mut rng = RowRng::new(0, 0);
        assert!(matches!(sample(&[f32::NEG_INFINITY; 3], &mut rng, 2, 1), Err(Error::Numerical(_))));
    }
}
