//! transformers' sampling warpers (temperature, top_k, top_p, min_p, typical_p, epsilon, eta) and
//! LogitNormalization, over one f32 row.
//!
//! Shared torch semantics worth knowing:
//! - A row holding NaN or +inf (or only -inf) has an all-NaN softmax in torch, so every
//!   probability-based warper removes nothing there; `row_stats` returns None and we do the same.
//! - -inf entries have probability exactly 0; they sort first in torch's ascending sorts and are
//!   "removed" again (a no-op), so the probability-based warpers only look at the finite entries.
//!   After top_k that is ~k entries, which keeps sampling free of full-vocabulary sorts.
//! - torch compares an f32 tensor with a Python float in f32; thresholds are cast to f32 first.
//! - torch's CPU cumsum accumulates in f64 and stores f32 partial sums; so do we.

use std::cell::RefCell;
use std::cmp::Ordering;

use super::processors::{LogitsProcessor, RowContext};

thread_local! {
    /// Per-thread scratch so warpers do not allocate per row.
    static PAIRS: RefCell<Vec<(f32, u32)>> = const { RefCell::new(Vec::new()) };
    static VALUES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// (max, sum of exp(x - max) in f64) when the softmax of the row is defined: no NaN, no +inf and at
/// least one finite value. None means torch's softmax would be all NaN (every warper is a no-op).
pub(crate) fn row_stats(row: &[f32]) -> Option<(f32, f64)> {
    // Branch-free scan (vectorizes); f32::max skips NaN, which `bad` catches.
    let (mut max, mut bad) = (f32::NEG_INFINITY, false);
    for &v in row {
        bad |= v.is_nan() | (v == f32::INFINITY);
        max = max.max(v);
    }
    if bad || max == f32::NEG_INFINITY {
        return None;
    }
    // -inf entries add exactly 0; skipping them saves an exp per removed token (most of the row
    // after top_k).
    let sum: f64 = row.iter().filter(|&&v| v > f32::NEG_INFINITY).map(|&v| (v - max).exp() as f64).sum();
    Some((max, sum))
}

#[inline]
fn prob(v: f32, max: f32, sum: f64) -> f32 {
    ((v - max).exp() as f64 / sum) as f32
}

/// Descending order with NaN largest (torch.topk's order); ties equal.
#[inline]
fn desc_nan_first(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => b.partial_cmp(&a).unwrap_or(Ordering::Equal),
    }
}

/// The mirror of a stable ascending sort by value: descending value, then descending index (the
/// higher index of a tie sits later in torch's stable ascending order, so it ranks first here).
#[inline]
fn rank_order(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(b.1.cmp(&a.1))
}

pub struct Temperature(pub f32);

impl LogitsProcessor for Temperature {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        // torch divides by the f32-cast scalar (not a multiply by its reciprocal).
        for v in scores.iter_mut() {
            *v /= self.0;
        }
    }
}

/// TopKLogitsWarper: removes `scores < kth largest` (ties with the k-th value stay).
pub struct TopK(pub usize);

impl LogitsProcessor for TopK {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let k = self.0;
        if k == 0 || k >= scores.len() {
            return; // the k-th value is the row minimum: nothing is strictly below it
        }
        let kth = VALUES.with(|cell| {
            let mut buf = cell.borrow_mut();
            buf.clear();
            if k <= 1024 && k * 8 <= scores.len() {
                // Small k: one pass with a size-k min-heap; almost every value fails the first compare.
                buf.extend_from_slice(&scores[..k]);
                for i in (0..k / 2).rev() {
                    sift_down(&mut buf, i);
                }
                for &v in &scores[k..] {
                    if desc_nan_first(v, buf[0]) == Ordering::Less {
                        buf[0] = v;
                        sift_down(&mut buf, 0);
                    }
                }
                buf[0]
            } else {
                // O(V) partial selection instead of a sort.
                buf.extend_from_slice(scores);
                let (_, kth, _) = buf.select_nth_unstable_by(k - 1, |a, b| desc_nan_first(*a, *b));
                *kth
            }
        });
        for v in scores.iter_mut() {
            if *v < kth {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// Restores the min-heap property (smallest under `desc_nan_first`, i.e. NaN largest, at the root).
fn sift_down(heap: &mut [f32], mut i: usize) {
    let n = heap.len();
    loop {
        let (l, r) = (2 * i + 1, 2 * i + 2);
        let mut smallest = i;
        if l < n && desc_nan_first(heap[l], heap[smallest]) == Ordering::Greater {
            smallest = l;
        }
        if r < n && desc_nan_first(heap[r], heap[smallest]) == Ordering::Greater {
            smallest = r;
        }
        if smallest == i {
            return;
        }
        heap.swap(i, smallest);
        i = smallest;
    }
}

/// TopPLogitsWarper. The kept set is the top of the row, so instead of sorting the vocabulary we
/// select the best `m` candidates, sort only those and widen `m` until the cut is found.
pub struct TopP {
    pub top_p: f32,
    pub min_keep: usize,
}

impl LogitsProcessor for TopP {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        // torch: `cumsum <= (1 - top_p)`, the Python float cast to f32.
        let threshold = (1.0f64 - self.top_p as f64) as f32;
        PAIRS.with(|cell| {
            let mut cands = cell.borrow_mut();
            cands.clear();
            // One pass over the row: finite candidates, their max, and the NaN/+inf check of row_stats.
            let mut max = f32::NEG_INFINITY;
            for (i, &v) in scores.iter().enumerate() {
                if v > f32::NEG_INFINITY {
                    if v == f32::INFINITY {
                        return;
                    }
                    max = max.max(v);
                    cands.push((v, i as u32));
                } else if v.is_nan() {
                    return;
                }
            }
            let n = cands.len();
            if n == 0 {
                return;
            }
            let sum: f64 = cands.iter().map(|&(v, _)| (v - max).exp() as f64).sum();
            // Total mass = the last ascending cumsum value (f64 accumulation, as torch).
            let total: f64 = cands.iter().map(|&(v, _)| prob(v, max, sum) as f64).sum();
            let mut m = n.min(64);
            let keep = loop {
                if m < n {
                    cands.select_nth_unstable_by(m - 1, rank_order);
                }
                cands[..m].sort_unstable_by(rank_order);
                // Rank r keeps while the ascending cumsum at r (total minus the mass above it)
                // is > threshold; the first rank at or below it starts the removed prefix.
                let mut above = 0f64;
                let mut cut = None;
                for (r, &(v, _)) in cands[..m].iter().enumerate() {
                    if ((total - above) as f32) <= threshold {
                        cut = Some(r);
                        break;
                    }
                    above += prob(v, max, sum) as f64;
                }
                match cut {
                    Some(r) => break r.max(self.min_keep),
                    None if m >= n => break n,
                    None => m = (m * 4).min(n),
                }
            };
            if keep >= n {
                return;
            }
            let keep = keep.max(1);
            // Everything ranked after the last kept candidate goes.
            let (lv, li) = cands[keep - 1];
            for &(v, i) in cands[keep..].iter() {
                debug_assert!(v < lv || (v == lv && i < li));
                scores[i as usize] = f32::NEG_INFINITY;
            }
        });
    }
}

/// MinPLogitsWarper: removes `prob < min_p * max_prob` (strict), keeping the top token.
pub struct MinP {
    pub min_p: f32,
}

impl LogitsProcessor for MinP {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let Some((max, sum)) = row_stats(scores) else {
            return;
        };
        let top = prob(max, max, sum);
        let cut = self.min_p * top;
        // The max-prob tokens are never below min_p * top (min_p <= 1), so min_tokens_to_keep = 1
        // needs no extra work.
        for v in scores.iter_mut() {
            if *v > f32::NEG_INFINITY && prob(*v, max, sum) < cut {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// TypicalLogitsWarper (locally typical sampling). Needs a sort by |-log p - H|, which is not
/// monotone in the score, so it sorts the finite candidates.
pub struct Typical {
    pub mass: f32,
    pub min_keep: usize,
}

impl LogitsProcessor for Typical {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let Some((max, sum)) = row_stats(scores) else {
            return;
        };
        let log_sum = sum.ln() as f32;
        // Entropy: -sum(logp * p); torch's nansum skips -inf * 0 (also for finite scores whose
        // difference to the max overflows to -inf).
        let mut ent = 0f64;
        for &v in scores.iter() {
            let lp = (v - max) - log_sum;
            let t = lp * lp.exp();
            if !t.is_nan() {
                ent -= t as f64;
            }
        }
        let ent = ent as f32;
        PAIRS.with(|cell| {
            let mut cands = cell.borrow_mut();
            cands.clear();
            for (i, &v) in scores.iter().enumerate() {
                if v > f32::NEG_INFINITY {
                    let lp = (v - max) - log_sum;
                    cands.push(((-lp - ent).abs(), i as u32));
                }
            }
            // torch's stable ascending sort: by shifted score, then index.
            cands.sort_unstable_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1)));
            let n = cands.len();
            let mut cum = 0f64;
            let mut below = 0usize;
            for &(_, i) in cands.iter() {
                cum += prob(scores[i as usize], max, sum) as f64;
                if (cum as f32) < self.mass {
                    below += 1;
                }
            }
            // -inf entries sort last in torch (shifted = inf) and make the clamp a no-op there.
            let last = below.min(n - 1);
            let limit = cands[last].0;
            for (r, &(s, i)) in cands.iter().enumerate() {
                if r >= self.min_keep && s > limit {
                    scores[i as usize] = f32::NEG_INFINITY;
                }
            }
        });
    }
}

/// EpsilonLogitsWarper: removes `prob < epsilon`, except tokens at the top score.
pub struct Epsilon(pub f32);

impl LogitsProcessor for Epsilon {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let Some((max, sum)) = row_stats(scores) else {
            return;
        };
        cut_below(scores, max, sum, self.0);
    }
}

/// EtaLogitsWarper: eta = min(epsilon, sqrt(epsilon) * exp(-entropy)).
pub struct Eta(pub f32);

impl LogitsProcessor for Eta {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let Some((max, sum)) = row_stats(scores) else {
            return;
        };
        let log_sum = sum.ln() as f32;
        // Categorical's entropy clamps log p to f32::MIN, so p = 0 terms are 0.
        let mut ent = 0f64;
        for &v in scores.iter() {
            let lp = ((v - max) - log_sum).max(f32::MIN);
            ent -= (lp * prob(v, max, sum)) as f64;
        }
        let eta = self.0.min(self.0.sqrt() * (-(ent as f32)).exp());
        cut_below(scores, max, sum, eta);
    }
}

/// Removes `prob < cut` unless the score equals the row maximum (min_tokens_to_keep = 1).
fn cut_below(scores: &mut [f32], max: f32, sum: f64, cut: f32) {
    for v in scores.iter_mut() {
        if *v > f32::NEG_INFINITY && *v < max && prob(*v, max, sum) < cut {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// LogitNormalization: log_softmax over the row (NaN everywhere when torch's would be).
pub struct LogSoftmax;

impl LogitsProcessor for LogSoftmax {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        let mut max = f32::NEG_INFINITY;
        for &v in scores.iter() {
            if v.is_nan() {
                max = f32::NAN;
                break;
            }
            if v > max {
                max = v;
            }
        }
        // max = -inf or +inf makes x - max NaN somewhere, so the sum is NaN, as in torch.
        let sum: f64 = scores.iter().map(|&v| (v - max).exp() as f64).sum();
        let log_sum = sum.ln() as f32;
        for v in scores.iter_mut() {
            *v = (*v - max) - log_sum;
        }
    }
}
