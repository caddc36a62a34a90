//! transformers' logits processors, built in the order `_get_logits_processor` builds them, with
//! its build conditions, after validating the settings (clear errors instead of torch crashes).
//! The processors themselves live in `penalties.rs` (greedy and sampling) and `warpers.rs`
//! (sampling only).

use super::config::ProcessorConfig;
use super::penalties::{
    ExponentialDecay, ForceAt, InfNanRemove, NoRepeatNGram, RepetitionPenalty, SequenceBias, Suppress, SuppressAt,
    SuppressUntil,
};
use super::warpers::{Epsilon, Eta, LogSoftmax, MinP, Temperature, TopK, TopP, Typical};
use crate::error::{Error, Result};

/// What a processor may look at for one row.
pub struct RowContext<'a> {
    /// transformers' `input_ids` row: the padded prompt as given (ids that are no valid token,
    /// e.g. under a zero mask, are `u32::MAX`), then the generated tokens.
    pub input_ids: &'a [u32],
    /// Leading positions repetition_penalty skips (the left padding: index of the first attended
    /// position, transformers' `(mask != 0).argmax()`).
    pub ignore_prefix: usize,
}

pub trait LogitsProcessor: Send + Sync {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]);
}

/// Runs every processor of `list` over one row, in order.
pub fn apply(list: &[Box<dyn LogitsProcessor>], ctx: &RowContext, scores: &mut [f32]) {
    for p in list {
        p.process(ctx, scores);
    }
}


/// The processors transformers' `generate()` would build for `cfg` (decoder-only, greedy or
/// sampling, no beams), for scores of `vocab_size` entries. Errors are `Error::InvalidInput` naming
/// the setting, the value, the valid range and the fix.
///
/// Where transformers is looser, kvgen refuses instead of silently ignoring: top_p > 1,
/// epsilon/eta_cutoff >= 1 or < 0, temperature = inf, out-of-vocabulary ids. top_p = 0 is accepted
/// as in transformers (keeps only the top token). Sampling settings are only checked with
/// do_sample=True, because transformers ignores them otherwise.
pub fn build(cfg: &ProcessorConfig, vocab_size: usize) -> Result<Vec<Box<dyn LogitsProcessor>>> {
    let Built { pre, warpers } = build_split(cfg, vocab_size)?;
    Ok(pre.into_iter().map(|(_, p)| p).chain(warpers).collect())
}

/// `build`'s list in its two halves, where transformers merges the user's `logits_processor`
/// list in between (`_merge_criteria_processor_list` runs before the warpers are appended).
pub struct Built {
    /// The processors built for greedy and sampling alike, each with the name of its
    /// transformers class (a user processor of the same class replaces it).
    pub pre: Vec<(&'static str, Box<dyn LogitsProcessor>)>,
    /// The sampling warpers and LogitNormalization: never merged with user processors.
    pub warpers: Vec<Box<dyn LogitsProcessor>>,
}

/// `build`, split where user processors go (see `Built`).
pub fn build_split(cfg: &ProcessorConfig, vocab_size: usize) -> Result<Built> {
    if vocab_size == 0 {
        return Err(Error::invalid("the scores have 0 columns: the vocabulary must hold at least one token"));
    }
    if vocab_size > u32::MAX as usize {
        return Err(Error::invalid(format!("vocab_size={vocab_size} exceeds kvgen's limit of {} ids", u32::MAX)));
    }
    let ids = |name: &str, list: &[i64]| -> Result<Vec<u32>> {
        list.iter().map(|&t| check_id(name, t, vocab_size)).collect()
    };
    let eos = ids("eos_token_id", &cfg.eos_token_id)?;
    let min_keep = cfg.min_tokens_to_keep.max(1);
    let mut pre: Vec<(&'static str, Box<dyn LogitsProcessor>)> = Vec::new();
    let mut warpers: Vec<Box<dyn LogitsProcessor>> = Vec::new();

    if let Some(bias) = &cfg.sequence_bias {
        if bias.is_empty() {
            return Err(Error::invalid(
                "sequence_bias=[] is empty: pass a non-empty list of [[token ids], bias] pairs, or None",
            ));
        }
        let mut pairs = Vec::with_capacity(bias.len());
        for (seq, b) in bias {
            if seq.is_empty() {
                return Err(Error::invalid(
                    "sequence_bias holds an empty token sequence: every entry needs at least one token id",
                ));
            }
            pairs.push((ids("sequence_bias", seq)?, *b));
        }
        pre.push(("SequenceBiasLogitsProcessor", Box::new(SequenceBias::new(SequenceBias::dedup(pairs)))));
    }
    if let Some(p) = cfg.repetition_penalty {
        if !(p > 0.0) || !p.is_finite() {
            return Err(Error::invalid(format!(
                "repetition_penalty={p} is invalid: it must be a finite number > 0 (1.0 disables it, values > 1 \
                 discourage repeats); pass e.g. repetition_penalty=1.2"
            )));
        }
        if p != 1.0 {
            pre.push(("RepetitionPenaltyLogitsProcessor", Box::new(RepetitionPenalty(p))));
        }
    }
    if let Some(n) = cfg.no_repeat_ngram_size {
        if n > 0 {
            pre.push(("NoRepeatNGramLogitsProcessor", Box::new(NoRepeatNGram(n))));
        }
    }
    if let Some(words) = &cfg.bad_words_ids {
        if words.is_empty() {
            return Err(Error::invalid("bad_words_ids=[] is empty: pass a non-empty list of token-id lists, or None"));
        }
        let mut pairs = Vec::with_capacity(words.len());
        for w in words {
            if w.is_empty() {
                return Err(Error::invalid(
                    "bad_words_ids holds an empty list: every bad word needs at least one token id",
                ));
            }
            let w = ids("bad_words_ids", w)?;
            // As transformers: a single-token bad word equal to an eos id is dropped (use
            // suppress_tokens to ban eos).
            if w.len() == 1 && eos.contains(&w[0]) {
                continue;
            }
            pairs.push((w, f32::NEG_INFINITY));
        }
        // transformers raises when only eos words were given (empty bias dict); kvgen builds nothing.
        if !pairs.is_empty() {
            pre.push(("NoBadWordsLogitsProcessor", Box::new(SequenceBias::new(SequenceBias::dedup(pairs)))));
        }
    }
    if let Some(min_length) = cfg.min_length {
        if min_length > 0 && !eos.is_empty() {
            pre.push(("MinLengthLogitsProcessor", Box::new(SuppressUntil { ids: eos.clone(), until: min_length })));
        }
    }
    if let Some(min_new) = cfg.min_new_tokens {
        if min_new > 0 && !eos.is_empty() {
            pre.push(("MinNewTokensLengthLogitsProcessor", Box::new(SuppressUntil { ids: eos.clone(), until: cfg.prompt_length + min_new })));
        }
    }
    if let Some(bos) = cfg.forced_bos_token_id {
        let ids = vec![check_id("forced_bos_token_id", bos, vocab_size)?];
        pre.push(("ForcedBOSTokenLogitsProcessor", Box::new(ForceAt { ids, at: 1 })));
    }
    if let Some(forced) = &cfg.forced_eos_token_id {
        let forced = ids("forced_eos_token_id", forced)?;
        let Some(max_length) = cfg.max_length else {
            return Err(Error::invalid(
                "forced_eos_token_id needs max_length (the final length, prompt included) to know the last step",
            ));
        };
        // cur_len == max_length - 1; max_length 0 never fires (transformers compares with -1).
        if let Some(at) = max_length.checked_sub(1) {
            pre.push(("ForcedEOSTokenLogitsProcessor", Box::new(ForceAt { ids: forced, at })));
        }
    }
    if cfg.remove_invalid_values {
        pre.push(("InfNanRemoveLogitsProcessor", Box::new(InfNanRemove)));
    }
    if let Some((start, factor)) = cfg.exponential_decay_length_penalty {
        if eos.is_empty() {
            return Err(Error::invalid(
                "exponential_decay_length_penalty needs an eos_token_id (it raises the eos score); set \
                 eos_token_id or leave the penalty unset",
            ));
        }
        if !factor.is_finite() {
            return Err(Error::invalid(format!(
                "exponential_decay_length_penalty factor={factor} must be a finite number (> 1 to favour eos)"
            )));
        }
        let mut unique = eos.clone();
        unique.sort_unstable();
        unique.dedup();
        pre.push(("ExponentialDecayLengthPenalty", Box::new(ExponentialDecay { start: start + cfg.prompt_length, factor, eos: unique })));
    }
    if let Some(list) = &cfg.suppress_tokens {
        pre.push(("SuppressTokensLogitsProcessor", Box::new(Suppress(ids("suppress_tokens", list)?))));
    }
    if let Some(list) = &cfg.begin_suppress_tokens {
        let list = ids("begin_suppress_tokens", list)?;
        let mut at = cfg.prompt_length;
        if cfg.prompt_length <= 1 && cfg.forced_bos_token_id.is_some() {
            at += 1;
        }
        pre.push(("SuppressTokensAtBeginLogitsProcessor", Box::new(SuppressAt { ids: list, at })));
    }

    if cfg.do_sample {
        if let Some(t) = cfg.temperature {
            if !(t > 0.0) || !t.is_finite() {
                let hint = if t == 0.0 { " For greedy decoding set do_sample=False." } else { "" };
                return Err(Error::invalid(format!(
                    "temperature={t} is invalid with do_sample=True: it must be a finite number > 0 (1.0 leaves the \
                     scores unchanged); pass e.g. temperature=0.7.{hint}"
                )));
            }
            if t != 1.0 {
                warpers.push(Box::new(Temperature(t)));
            }
        }
        if let Some(k) = cfg.top_k {
            if k != 0 {
                warpers.push(Box::new(TopK(k.max(min_keep))));
            }
        }
        if let Some(p) = cfg.top_p {
            check_range(
                "top_p",
                p,
                p >= 0.0 && p <= 1.0,
                "[0, 1]",
                "1.0 disables nucleus sampling; pass e.g. top_p=0.9",
            )?;
            if p < 1.0 {
                warpers.push(Box::new(TopP { top_p: p, min_keep }));
            }
        }
        if let Some(p) = cfg.min_p {
            check_range("min_p", p, p >= 0.0 && p <= 1.0, "[0, 1]", "None or 0 disables it; pass e.g. min_p=0.05")?;
            warpers.push(Box::new(MinP { min_p: p }));
        }
        if let Some(p) = cfg.typical_p {
            check_range("typical_p", p, p > 0.0 && p <= 1.0, "(0, 1]", "1.0 disables it; pass e.g. typical_p=0.9")?;
            if p < 1.0 {
                warpers.push(Box::new(Typical { mass: p, min_keep }));
            }
        }
        if let Some(e) = cfg.epsilon_cutoff {
            check_range(
                "epsilon_cutoff",
                e,
                e >= 0.0 && e < 1.0,
                "[0, 1)",
                "0 disables it; pass e.g. epsilon_cutoff=3e-4",
            )?;
            if e > 0.0 {
                warpers.push(Box::new(Epsilon(e)));
            }
        }
        if let Some(e) = cfg.eta_cutoff {
            check_range("eta_cutoff", e, e >= 0.0 && e < 1.0, "[0, 1)", "0 disables it; pass e.g. eta_cutoff=1e-3")?;
            if e > 0.0 {
                warpers.push(Box::new(Eta(e)));
            }
        }
    }
    if cfg.renormalize_logits {
        warpers.push(Box::new(LogSoftmax));
    }
    Ok(Built { pre, warpers })
}

fn check_id(name: &str, id: i64, vocab_size: usize) -> Result<u32> {
    if id < 0 || id as u64 >= vocab_size as u64 {
        return Err(Error::invalid(format!(
            "{name} contains token id {id}, outside the vocabulary of {vocab_size} ids (valid: 0..={}); use ids \
             from the model's tokenizer",
            vocab_size - 1
        )));
    }
    Ok(id as u32)
}

fn check_range(name: &str, value: f32, ok: bool, range: &str, fix: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("{name}={value} is out of range: it must be in {range} ({fix})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NI: f32 = f32::NEG_INFINITY;

    fn cfg() -> ProcessorConfig {
        ProcessorConfig::default()
    }

    fn sampling() -> ProcessorConfig {
        ProcessorConfig { do_sample: true, ..ProcessorConfig::default() }
    }

    fn run(c: &ProcessorConfig, ids: &[u32], scores: &[f32]) -> Vec<f32> {
        run_ignore(c, ids, 0, scores)
    }

    fn run_ignore(c: &ProcessorConfig, ids: &[u32], ignore_prefix: usize, scores: &[f32]) -> Vec<f32> {
        let list = build(c, scores.len()).expect("valid config");
        let mut row = scores.to_vec();
        apply(&list, &RowContext { input_ids: ids, ignore_prefix }, &mut row);
        row
    }

    fn kept(row: &[f32]) -> Vec<usize> {
        row.iter().enumerate().filter(|(_, v)| **v > NI).map(|(i, _)| i).collect()
    }

    fn err(c: &ProcessorConfig, vocab: usize) -> String {
        match build(c, vocab) {
            Err(Error::InvalidInput(m)) => m,
            Err(e) => panic!("wrong error kind: {e}"),
            Ok(_) => panic!("config accepted"),
        }
    }

    #[test]
    fn neutral_config_builds_nothing() {
        let c = ProcessorConfig {
            repetition_penalty: Some(1.0),
            no_repeat_ngram_size: Some(0),
            min_length: Some(0),
            temperature: Some(1.0),
            top_k: Some(0),
            top_p: Some(1.0),
            typical_p: Some(1.0),
            epsilon_cutoff: Some(0.0),
            eta_cutoff: Some(0.0),
            eos_token_id: vec![1],
            ..sampling()
        };
        assert_eq!(build(&c, 4).unwrap().len(), 0);
        // Sampling settings are not even checked when greedy.
        let greedy = ProcessorConfig { temperature: Some(0.0), top_p: Some(7.0), ..cfg() };
        assert_eq!(build(&greedy, 4).unwrap().len(), 0);
    }

    #[test]
    fn top_k_keeps_ties_with_kth() {
        let c = ProcessorConfig { top_k: Some(2), ..sampling() };
        assert_eq!(kept(&run(&c, &[], &[1.0, 3.0, 2.0, 2.0, 0.0])), vec![1, 2, 3]);
        // all equal: everything ties with the k-th value
        assert_eq!(kept(&run(&c, &[], &[0.5; 6])).len(), 6);
        // k >= vocab: no-op; vocab of 1
        assert_eq!(run(&c, &[], &[4.0]), vec![4.0]);
        let c1 = ProcessorConfig { top_k: Some(1), ..sampling() };
        assert_eq!(kept(&run(&c1, &[], &[NI, 2.0, 2.0])), vec![1, 2]);
        // fewer finite entries than k: the k-th is -inf, nothing changes
        let c3 = ProcessorConfig { top_k: Some(3), ..sampling() };
        assert_eq!(kept(&run(&c3, &[], &[NI, 1.0, NI, NI])), vec![1]);
    }

    #[test]
    fn top_k_large_rows_match_a_sort() {
        // both paths (heap for small k, selection for large k), with heavy ties and -inf
        let mut x = 7u64;
        let row: Vec<f32> = (0..3000)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                if i % 7 == 0 {
                    NI
                } else {
                    ((x >> 40) % 50) as f32
                }
            })
            .collect();
        for k in [1usize, 5, 50, 300, 1000, 2999] {
            let c = ProcessorConfig { top_k: Some(k), ..sampling() };
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let kth = sorted[k - 1];
            let expect: Vec<usize> = (0..row.len()).filter(|&i| row[i] >= kth && row[i] > NI).collect();
            assert_eq!(kept(&run(&c, &[], &row)), expect, "k={k}");
        }
    }

    #[test]
    fn top_p_semantics() {
        let c = ProcessorConfig { top_p: Some(0.5), ..sampling() };
        // probs .5 .25 .125 .125 (exact): cumsum asc .125 .25 .5 1 -> remove <= .5
        let s = [0.0f32, -(2f32.ln()), -(4f32.ln()), -(4f32.ln())];
        let out = run(&c, &[], &s);
        assert_eq!(kept(&out), vec![0]);
        // all equal (4 x .25), top_p .5: cumsum .25 .5 .75 1 -> the two lowest indices go (stable)
        assert_eq!(kept(&run(&c, &[], &[1.0; 4])), vec![2, 3]);
        // top_p = 0: only the last in stable ascending order survives (highest index of the max)
        let c0 = ProcessorConfig { top_p: Some(0.0), ..sampling() };
        assert_eq!(kept(&run(&c0, &[], &[3.0, 5.0, 5.0, 1.0])), vec![2]);
        // vocab 1 and -inf rows never end empty
        assert_eq!(kept(&run(&c0, &[], &[2.0])), vec![0]);
        assert_eq!(kept(&run(&c, &[], &[NI, 1.0, NI])), vec![1]);
        // all -inf / NaN rows: torch's softmax is NaN, nothing removed
        assert_eq!(run(&c, &[], &[NI, NI]), vec![NI, NI]);
        assert!(run(&c, &[], &[f32::NAN, 1.0])[1] == 1.0);
    }

    #[test]
    fn top_p_large_vocab_matches_full_sort() {
        // pseudo-random row, vocab 5000: the widening partial selection equals a plain sort
        let mut x = 12345u64;
        let row: Vec<f32> = (0..5000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 8.0
            })
            .collect();
        for &p in &[0.05f32, 0.5, 0.9, 0.99] {
            let c = ProcessorConfig { top_p: Some(p), ..sampling() };
            let out = run(&c, &[], &row);
            // reference: stable ascending sort, f64 cumsum
            let (max, sum) = crate::sampling::warpers::row_stats(&row).unwrap();
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap());
            let thr = (1.0f64 - p as f64) as f32;
            let mut cum = 0f64;
            let mut expect = vec![true; row.len()];
            for (r, &i) in idx.iter().enumerate() {
                cum += (((row[i] - max).exp() as f64) / sum) as f32 as f64;
                if (cum as f32) <= thr && r + 1 < row.len() {
                    expect[i] = false;
                }
            }
            let got: Vec<bool> = out.iter().map(|v| *v > NI).collect();
            assert_eq!(got, expect, "top_p={p}");
        }
    }

    #[test]
    fn min_p_strict_and_keeps_top() {
        let c = ProcessorConfig { min_p: Some(0.5), ..sampling() };
        // probs ∝ 4, 2, 1: 2/4 = .5 is not < .5 -> kept; 1/4 < .5 -> removed
        let s = [4f32.ln(), 2f32.ln(), 0.0];
        assert_eq!(kept(&run(&c, &[], &s)), vec![0, 1]);
        let c1 = ProcessorConfig { min_p: Some(1.0), ..sampling() };
        assert_eq!(kept(&run(&c1, &[], &[1.0, 1.0, 0.0])), vec![0, 1]);
        assert_eq!(kept(&run(&c1, &[], &[1e30, -1e30, NI])), vec![0]);
    }

    #[test]
    fn typical_epsilon_eta_keep_something() {
        for c in [
            ProcessorConfig { typical_p: Some(1e-6), ..sampling() },
            ProcessorConfig { epsilon_cutoff: Some(0.999), ..sampling() },
            ProcessorConfig { eta_cutoff: Some(0.999), ..sampling() },
        ] {
            for row in [vec![1.0f32, 2.0, 3.0], vec![0.0; 3], vec![NI, 5.0, NI], vec![7.0], vec![1e30, -1e30, 1e-30]] {
                let out = run(&c, &[], &row);
                assert!(!kept(&out).is_empty(), "{row:?} -> {out:?}");
            }
        }
        // epsilon: the max stays even if its prob is below epsilon (uniform over 3)
        let c = ProcessorConfig { epsilon_cutoff: Some(0.5), ..sampling() };
        assert_eq!(kept(&run(&c, &[], &[0.0; 3])).len(), 3);
    }

    #[test]
    fn typical_matches_hand_computation() {
        // probs .7 .2 .1, entropy H; |-log p - H| order: .2 (.53), .7 (.45)...; mass .5
        let c = ProcessorConfig { typical_p: Some(0.5), ..sampling() };
        let s = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let out = run(&c, &[], &s);
        let h: f32 = -[0.7f32, 0.2, 0.1].iter().map(|p| p * p.ln()).sum::<f32>();
        let mut sh: Vec<(f32, usize, f32)> =
            [0.7f32, 0.2, 0.1].iter().enumerate().map(|(i, p)| ((-p.ln() - h).abs(), i, *p)).collect();
        sh.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        let mut cum = 0.0;
        let mut below = 0;
        for e in &sh {
            cum += e.2;
            if cum < 0.5 {
                below += 1;
            }
        }
        let limit = sh[below.min(2)].0;
        let expect: Vec<usize> = {
            let mut v: Vec<usize> =
                sh.iter().enumerate().filter(|(r, e)| *r == 0 || e.0 <= limit).map(|(_, e)| e.1).collect();
            v.sort();
            v
        };
        assert_eq!(kept(&out), expect);
    }

    #[test]
    fn temperature_and_renormalize() {
        let c = ProcessorConfig { temperature: Some(0.5), renormalize_logits: true, ..sampling() };
        let out = run(&c, &[], &[1.0, 2.0, NI]);
        let z = (2f32.exp() + 4f32.exp()).ln();
        assert!((out[0] - (2.0 - z)).abs() < 1e-6 && (out[1] - (4.0 - z)).abs() < 1e-6 && out[2] == NI);
        // all -inf row: log_softmax is NaN everywhere, like torch
        let r = ProcessorConfig { renormalize_logits: true, ..cfg() };
        assert!(run(&r, &[], &[NI, NI]).iter().all(|v| v.is_nan()));
    }

    #[test]
    fn repetition_penalty_prefix_and_oov() {
        let c = ProcessorConfig { repetition_penalty: Some(2.0), ..cfg() };
        // ids 0 (ignored prefix), 1, 1 (once), 9 (outside vocab), u32::MAX (pad)
        let out = run_ignore(&c, &[0, 1, 1, 9, u32::MAX, 2], 1, &[4.0, 4.0, -4.0, 4.0]);
        assert_eq!(out, vec![4.0, 2.0, -8.0, 4.0]);
        let inf = run(&c, &[0, 1], &[NI, f32::INFINITY]);
        assert_eq!(inf, vec![NI, f32::INFINITY]);
    }

    #[test]
    fn no_repeat_ngram() {
        let c = ProcessorConfig { no_repeat_ngram_size: Some(2), ..cfg() };
        // bigrams (1,2) (2,3) (3,1); last token 1 -> 2 banned
        assert_eq!(kept(&run(&c, &[1, 2, 3, 1], &[0.0; 4])), vec![0, 1, 3]);
        let c1 = ProcessorConfig { no_repeat_ngram_size: Some(1), ..cfg() };
        assert_eq!(kept(&run(&c1, &[1, 3, 7], &[0.0; 4])), vec![0, 2]);
        let c5 = ProcessorConfig { no_repeat_ngram_size: Some(5), ..cfg() };
        assert_eq!(kept(&run(&c5, &[1, 1], &[0.0; 2])), vec![0, 1]);
    }

    #[test]
    fn bad_words_and_sequence_bias() {
        let c =
            ProcessorConfig { bad_words_ids: Some(vec![vec![3], vec![1, 2], vec![0]]), eos_token_id: vec![0], ..cfg() };
        // [0] equals eos: dropped; [1,2] bans 2 only after 1
        assert_eq!(kept(&run(&c, &[5, 1], &[0.0; 6])), vec![0, 1, 4, 5]);
        assert_eq!(kept(&run(&c, &[1, 5], &[0.0; 6])), vec![0, 1, 2, 4, 5]);
        let only_eos = ProcessorConfig { bad_words_ids: Some(vec![vec![0]]), eos_token_id: vec![0], ..cfg() };
        assert_eq!(build(&only_eos, 3).unwrap().len(), 0);
        let b = ProcessorConfig {
            sequence_bias: Some(vec![(vec![1], 1.0), (vec![4, 1], 2.0), (vec![1], 3.0), (vec![7, 4, 1], 0.5)]),
            ..cfg()
        };
        // [1] -> 3.0 (last value wins); after [7, 4]: +2 +0.5
        assert_eq!(run(&b, &[7, 4], &[0.0; 8])[1], 5.5);
        assert_eq!(run(&b, &[4], &[0.0; 8])[1], 5.0);
        assert_eq!(run(&b, &[], &[0.0; 8])[1], 3.0);
    }

    #[test]
    fn length_and_forcing() {
        let c = ProcessorConfig {
            min_length: Some(3),
            min_new_tokens: Some(1),
            prompt_length: 2,
            eos_token_id: vec![1],
            ..cfg()
        };
        assert_eq!(kept(&run(&c, &[0, 0], &[0.0; 3])), vec![0, 2]);
        assert_eq!(kept(&run(&c, &[0, 0, 0], &[0.0; 3])), vec![0, 1, 2]);
        // min_length without eos: not built (as transformers)
        assert_eq!(build(&ProcessorConfig { min_length: Some(9), ..cfg() }, 3).unwrap().len(), 0);
        let f = ProcessorConfig {
            forced_bos_token_id: Some(2),
            forced_eos_token_id: Some(vec![0]),
            max_length: Some(4),
            ..cfg()
        };
        assert_eq!(run(&f, &[5], &[1.0; 3]), vec![NI, NI, 0.0]);
        assert_eq!(run(&f, &[5, 5, 5], &[1.0; 3]), vec![0.0, NI, NI]);
        assert_eq!(run(&f, &[5, 5], &[1.0; 3]), vec![1.0; 3]);
    }

    #[test]
    fn suppression_and_begin_index() {
        let c = ProcessorConfig {
            suppress_tokens: Some(vec![0]),
            begin_suppress_tokens: Some(vec![1]),
            prompt_length: 3,
            ..cfg()
        };
        assert_eq!(kept(&run(&c, &[9, 9, 9], &[0.0; 3])), vec![2]);
        assert_eq!(kept(&run(&c, &[9, 9, 9, 9], &[0.0; 3])), vec![1, 2]);
        // prompt_length <= 1 with forced_bos: begin index moves one step later
        let b = ProcessorConfig {
            begin_suppress_tokens: Some(vec![1]),
            prompt_length: 1,
            forced_bos_token_id: Some(0),
            ..cfg()
        };
        assert_eq!(run(&b, &[9, 0], &[0.0; 3])[1], NI);
    }

    #[test]
    fn invalid_values_and_decay() {
        let c = ProcessorConfig { remove_invalid_values: true, ..cfg() };
        assert_eq!(run(&c, &[], &[f32::NAN, f32::INFINITY, NI, 1.0]), vec![0.0, f32::MAX, f32::MIN, 1.0]);
        let d = ProcessorConfig {
            exponential_decay_length_penalty: Some((1, 2.0)),
            eos_token_id: vec![0, 0],
            prompt_length: 2,
            ..cfg()
        };
        // regulation start 3; cur_len 5 -> idx 2: s + |s| * (4 - 1)
        assert_eq!(run(&d, &[1; 5], &[-1.0, 1.0]), vec![2.0, 1.0]);
        assert_eq!(run(&d, &[1; 3], &[-1.0, 1.0]), vec![-1.0, 1.0]);
    }

    #[test]
    fn validation_messages() {
        let m = err(&ProcessorConfig { temperature: Some(0.0), ..sampling() }, 4);
        assert!(m.contains("temperature=0") && m.contains("do_sample=False"), "{m}");
        assert!(err(&ProcessorConfig { temperature: Some(f32::NAN), ..sampling() }, 4).contains("temperature=NaN"));
        assert!(err(&ProcessorConfig { temperature: Some(f32::INFINITY), ..sampling() }, 4).contains("temperature=inf"));
        assert!(err(&ProcessorConfig { top_p: Some(1.5), ..sampling() }, 4).contains("top_p=1.5"));
        assert!(err(&ProcessorConfig { min_p: Some(-0.1), ..sampling() }, 4).contains("[0, 1]"));
        assert!(err(&ProcessorConfig { typical_p: Some(0.0), ..sampling() }, 4).contains("(0, 1]"));
        assert!(err(&ProcessorConfig { epsilon_cutoff: Some(1.0), ..sampling() }, 4).contains("epsilon_cutoff=1"));
        assert!(err(&ProcessorConfig { eta_cutoff: Some(-1.0), ..sampling() }, 4).contains("[0, 1)"));
        assert!(err(&ProcessorConfig { repetition_penalty: Some(0.0), ..cfg() }, 4).contains("repetition_penalty=0"));
        let m = err(&ProcessorConfig { eos_token_id: vec![4], ..cfg() }, 4);
        assert!(m.contains("eos_token_id") && m.contains("token id 4") && m.contains("4 ids"), "{m}");
        assert!(err(&ProcessorConfig { suppress_tokens: Some(vec![-1]), ..cfg() }, 4).contains("suppress_tokens"));
        assert!(err(&ProcessorConfig { bad_words_ids: Some(vec![vec![1, 9]]), ..cfg() }, 4).contains("bad_words_ids"));
        assert!(err(&ProcessorConfig { bad_words_ids: Some(vec![]), ..cfg() }, 4).contains("bad_words_ids"));
        assert!(err(&ProcessorConfig { forced_bos_token_id: Some(7), ..cfg() }, 4).contains("forced_bos_token_id"));
        assert!(
            err(&ProcessorConfig { sequence_bias: Some(vec![(vec![5], 1.0)]), ..cfg() }, 4).contains("sequence_bias")
        );
        assert!(err(&cfg(), 0).contains("0 columns"));
    }

    #[test]
    fn huge_and_tiny_magnitudes_keep_a_token() {
        let c = ProcessorConfig {
            temperature: Some(0.01),
            top_k: Some(2),
            top_p: Some(0.3),
            min_p: Some(0.2),
            typical_p: Some(0.5),
            epsilon_cutoff: Some(0.1),
            eta_cutoff: Some(0.1),
            ..sampling()
        };
        for row in [vec![1e30f32, 1e30, -1e30], vec![1e-30f32, 2e-30, 0.0], vec![f32::MAX, f32::MIN, 0.0], vec![3.0]] {
            let out = run(&c, &[], &row);
            assert!(!kept(&out).is_empty(), "{row:?} -> {out:?}");
        }
    }
}
