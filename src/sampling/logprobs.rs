//! Log-probabilities of a generated token and of the most likely alternatives, from one row of
//! raw logits: what OpenAI's `logprobs` report. Computed per step in place of keeping the step's
//! logits, and with a partial selection instead of a sort of the whole vocabulary.

/// One generated token's log-probability and the `top` most likely tokens of that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f64,
    /// Most likely first; ties in id order.
    pub top: Vec<(u32, f64)>,
}

/// log_softmax(row)[token] and the `top` largest entries, in f64 (as a float64 log-softmax over
/// f32 logits computes them).
pub fn token_logprobs(row: &[f32], token: usize, top: usize) -> TokenLogprobs {
    let lse = log_sum_exp(row);
    // A row with every token removed has no distribution: every token is impossible.
    let logprob = |v: f32| if lse == f64::NEG_INFINITY { f64::NEG_INFINITY } else { v as f64 - lse };
    TokenLogprobs {
        token: token as u32,
        logprob: row.get(token).map_or(f64::NEG_INFINITY, |&v| logprob(v)),
        top: top_entries(row, top).into_iter().map(|(id, v)| (id, logprob(v))).collect(),
    }
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln()
}

/// The `k` largest values with their ids, largest first and ties in id order (a stable sort's
/// order), in one pass keeping a sorted list of at most k.
fn top_entries(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (id, &v) in row.iter().enumerate() {
        if v.is_nan() || (best.len() == k && v <= best[k - 1].1) {
            continue;
        }
        // After every equal value: earlier ids stay first.
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (id as u32, v));
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(row: &[f32], token: usize, k: usize) -> TokenLogprobs {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
        TokenLogprobs {
            token: token as u32,
            logprob: row[token] as f64 - lse,
            top: order.into_iter().take(k).map(|i| (i as u32, row[i] as f64 - lse)).collect(),
        }
    }

    #[test]
    fn equals_a_full_log_softmax_and_stable_sort() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 613) as f32 * 0.37).sin() * 5.0).collect();
        for k in [0, 1, 3, 5, 20] {
            for token in [0, 17, 999] {
                let got = token_logprobs(&row, token, k);
                let want = reference(&row, token, k);
                assert_eq!(got.top.iter().map(|e| e.0).collect::<Vec<_>>(), want.top.iter().map(|e| e.0).collect::<Vec<_>>());
                assert!((got.logprob - want.logprob).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn ties_keep_id_order_and_removed_tokens_are_minus_infinity() {
        let row = [1.0, 3.0, 3.0, f32::NEG_INFINITY, 3.0];
        let got = token_logprobs(&row, 3, 4);
        assert_eq!(got.top.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 4, 0]);
        assert_eq!(got.logprob, f64::NEG_INFINITY);
        let all_removed = token_logprobs(&[f32::NEG_INFINITY; 3], 0, 2);
        assert_eq!(all_removed.logprob, f64::NEG_INFINITY);
    }
}
