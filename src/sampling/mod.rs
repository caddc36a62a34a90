//! Logits processing and token selection: pure functions over f32 rows.

pub mod config;
pub mod logprobs;
pub mod penalties;
pub mod processors;
pub mod sample;
pub mod warpers;

/// Index of the largest value; the first one on ties (as torch.argmax). NaN never wins.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    let mut best_val = f32::NEG_INFINITY;
    for (i, &v) in row.iter().enumerate() {
        if v > best_val {
            best = i;
            best_val = v;
        }
    }
    best
}

/// Counts NaN and +Inf entries (-inf is a legitimate "removed" score).
pub fn count_invalid(row: &[f32]) -> usize {
    row.iter().filter(|v| v.is_nan() || **v == f32::INFINITY).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[0.5]), 0);
    }

    #[test]
    fn invalid_values_are_nan_and_positive_inf() {
        assert_eq!(count_invalid(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0]), 2);
    }
}

/// log_softmax over one row in place, in f32 with an f64 sum of exponentials (the most
/// accurate value f32 can hold; torch's f32 kernel agrees to ~1 ulp). -inf entries stay -inf.
pub fn log_softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = sum.ln() as f32;
    for v in row.iter_mut() {
        *v = (*v - max) - lse;
    }
}
