//! transformers' non-warper logits processors (the ones built for greedy decoding too).

use std::cell::RefCell;

use super::processors::{LogitsProcessor, RowContext};

thread_local! {
    static IDS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static BIAS: RefCell<Vec<(u32, f32)>> = const { RefCell::new(Vec::new()) };
}

/// SequenceBiasLogitsProcessor (and NoBadWordsLogitsProcessor, which is one with -inf biases).
pub struct SequenceBias {
    /// Length-1 sequences: (token, bias), applied every step.
    singles: Vec<(u32, f32)>,
    /// Longer sequences grouped by prefix length, in transformers' order (first appearance of each
    /// length, then insertion order): (prefix, last token, bias).
    multi: Vec<(Vec<u32>, u32, f32)>,
}

impl SequenceBias {
    /// `entries` in transformers' dict order, already deduplicated (last bias wins, first position
    /// kept) and validated against the vocabulary.
    pub fn new(entries: Vec<(Vec<u32>, f32)>) -> Self {
        let mut singles = Vec::new();
        let mut lengths: Vec<usize> = Vec::new();
        for (seq, bias) in &entries {
            if seq.len() == 1 {
                singles.push((seq[0], *bias));
            } else if !lengths.contains(&seq.len()) {
                lengths.push(seq.len());
            }
        }
        let mut multi = Vec::new();
        for len in lengths {
            for (seq, bias) in entries.iter().filter(|(s, _)| s.len() == len) {
                multi.push((seq[..len - 1].to_vec(), seq[len - 1], *bias));
            }
        }
        SequenceBias { singles, multi }
    }

    /// transformers' dict conversion: duplicate sequences keep their first position, last value.
    pub fn dedup(pairs: Vec<(Vec<u32>, f32)>) -> Vec<(Vec<u32>, f32)> {
        let mut out: Vec<(Vec<u32>, f32)> = Vec::with_capacity(pairs.len());
        for (seq, bias) in pairs {
            match out.iter_mut().find(|(s, _)| *s == seq) {
                Some(slot) => slot.1 = bias,
                None => out.push((seq, bias)),
            }
        }
        out
    }
}

impl LogitsProcessor for SequenceBias {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        let ids = ctx.input_ids;
        BIAS.with(|cell| {
            let mut adds = cell.borrow_mut();
            adds.clear();
            adds.extend_from_slice(&self.singles);
            for (prefix, last, bias) in &self.multi {
                if prefix.len() <= ids.len() && ids[ids.len() - prefix.len()..] == prefix[..] {
                    adds.push((*last, *bias));
                }
            }
            // transformers sums the biases per token first (0 + single, then each match in order)
            // and adds the total to the score once; a stable sort keeps that order.
            adds.sort_by_key(|&(t, _)| t);
            let mut i = 0;
            while i < adds.len() {
                let token = adds[i].0;
                let mut total = 0f32;
                while i < adds.len() && adds[i].0 == token {
                    total += adds[i].1;
                    i += 1;
                }
                if let Some(s) = scores.get_mut(token as usize) {
                    *s += total;
                }
            }
        });
    }
}

/// RepetitionPenaltyLogitsProcessor: every id present after the ignored prefix is penalised once
/// (divide positive scores, multiply negative ones); ids outside the vocabulary never match.
pub struct RepetitionPenalty(pub f32);

impl LogitsProcessor for RepetitionPenalty {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        let start = ctx.ignore_prefix.min(ctx.input_ids.len());
        IDS.with(|cell| {
            let mut seen = cell.borrow_mut();
            seen.clear();
            seen.extend(ctx.input_ids[start..].iter().copied().filter(|&t| (t as usize) < scores.len()));
            seen.sort_unstable();
            seen.dedup();
            for &t in seen.iter() {
                let s = &mut scores[t as usize];
                *s = if *s < 0.0 { *s * self.0 } else { *s / self.0 };
            }
        });
    }
}

/// NoRepeatNGramLogitsProcessor: bans the token that would complete an n-gram already present.
pub struct NoRepeatNGram(pub usize);

impl LogitsProcessor for NoRepeatNGram {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        let (ids, n) = (ctx.input_ids, self.0);
        let len = ids.len();
        if n == 0 || len < n {
            return;
        }
        let prefix = &ids[len + 1 - n..];
        for start in 0..=len - n {
            if ids[start..start + n - 1] == *prefix {
                if let Some(s) = scores.get_mut(ids[start + n - 1] as usize) {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Sets the listed ids to -inf while `cur_len < until` (MinLengthLogitsProcessor with
/// `until = min_length`; MinNewTokensLengthLogitsProcessor with `until = prompt + min_new`).
pub struct SuppressUntil {
    pub ids: Vec<u32>,
    pub until: usize,
}

impl LogitsProcessor for SuppressUntil {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        if ctx.input_ids.len() < self.until {
            suppress(&self.ids, scores);
        }
    }
}

/// SuppressTokensAtBeginLogitsProcessor: suppresses the ids when `cur_len == begin_index`.
pub struct SuppressAt {
    pub ids: Vec<u32>,
    pub at: usize,
}

impl LogitsProcessor for SuppressAt {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        if ctx.input_ids.len() == self.at {
            suppress(&self.ids, scores);
        }
    }
}

/// SuppressTokensLogitsProcessor.
pub struct Suppress(pub Vec<u32>);

impl LogitsProcessor for Suppress {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        suppress(&self.0, scores);
    }
}

fn suppress(ids: &[u32], scores: &mut [f32]) {
    for &t in ids {
        if let Some(s) = scores.get_mut(t as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// ForcedBOS (`at == 1`) and ForcedEOS (`at == max_length - 1`): at that length every score is -inf
/// except the forced ids, which become 0.
pub struct ForceAt {
    pub ids: Vec<u32>,
    pub at: usize,
}

impl LogitsProcessor for ForceAt {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        if ctx.input_ids.len() == self.at {
            scores.fill(f32::NEG_INFINITY);
            for &t in &self.ids {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = 0.0;
                }
            }
        }
    }
}

/// InfNanRemoveLogitsProcessor: NaN -> 0, +inf -> f32::MAX, -inf -> f32::MIN.
pub struct InfNanRemove;

impl LogitsProcessor for InfNanRemove {
    fn process(&self, _ctx: &RowContext, scores: &mut [f32]) {
        for v in scores.iter_mut() {
            if v.is_nan() {
                *v = 0.0;
            } else if *v == f32::INFINITY {
                *v = f32::MAX;
            } else if *v == f32::NEG_INFINITY {
                *v = f32::MIN;
            }
        }
    }
}

/// ExponentialDecayLengthPenalty: after `start` (new tokens, plus the prompt length) the eos
/// scores grow by |score| * (factor^(cur_len - start) - 1).
pub struct ExponentialDecay {
    /// transformers' regulation_start: start + prompt length.
    pub start: usize,
    pub factor: f32,
    /// Deduplicated eos ids.
    pub eos: Vec<u32>,
}

impl LogitsProcessor for ExponentialDecay {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        let cur = ctx.input_ids.len();
        if cur <= self.start {
            return;
        }
        // Python's float pow (f64), then multiplied into the f32 scores as an f32 scalar.
        let grow = ((self.factor as f64).powf((cur - self.start) as f64) - 1.0) as f32;
        for &t in &self.eos {
            if let Some(s) = scores.get_mut(t as usize) {
                if s.is_finite() {
                    *s += s.abs() * grow;
                }
            }
        }
    }
}
