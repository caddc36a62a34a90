//! transformers' logits processors, applied in the order `_get_logits_processor` builds them.

/// What a processor may look at for one row: the tokens so far (prompt without padding, then the
/// generated ones) and the lengths transformers measures against.
pub struct RowContext<'a> {
    pub tokens: &'a [u32],
    /// Prompt length including left padding (transformers' `input_ids.shape[-1]` at the start).
    pub padded_prompt_len: usize,
    /// Tokens generated so far in this row.
    pub generated: usize,
}

impl RowContext<'_> {
    /// transformers' `input_ids.shape[-1]`: padded prompt plus generated tokens.
    pub fn cur_len(&self) -> usize {
        self.padded_prompt_len + self.generated
    }
}

pub trait LogitsProcessor: Send + Sync {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]);
}

/// Suppresses eos while `input_ids.shape[-1] < min_length` (MinLengthLogitsProcessor).
pub struct MinLength {
    pub min_length: usize,
    pub eos_token_ids: Vec<u32>,
}

impl LogitsProcessor for MinLength {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        if ctx.cur_len() < self.min_length {
            suppress(&self.eos_token_ids, scores);
        }
    }
}

/// Suppresses eos until `min_new_tokens` were generated (MinNewTokensLengthLogitsProcessor).
pub struct MinNewTokens {
    pub min_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
}

impl LogitsProcessor for MinNewTokens {
    fn process(&self, ctx: &RowContext, scores: &mut [f32]) {
        if ctx.generated < self.min_new_tokens {
            suppress(&self.eos_token_ids, scores);
        }
    }
}

fn suppress(ids: &[u32], scores: &mut [f32]) {
    for &id in ids {
        if let Some(s) = scores.get_mut(id as usize) {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The processors transformers would build for greedy decoding with these settings.
pub fn build(min_length: usize, min_new_tokens: usize, eos_token_ids: &[u32]) -> Vec<Box<dyn LogitsProcessor>> {
    let mut list: Vec<Box<dyn LogitsProcessor>> = Vec::new();
    if eos_token_ids.is_empty() {
        return list;
    }
    if min_length > 0 {
        list.push(Box::new(MinLength { min_length, eos_token_ids: eos_token_ids.to_vec() }));
    }
    if min_new_tokens > 0 {
        list.push(Box::new(MinNewTokens { min_new_tokens, eos_token_ids: eos_token_ids.to_vec() }));
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_new_tokens_suppresses_eos_until_reached() {
        let p = build(0, 2, &[1]);
        let toks = [5u32, 6];
        let mut s = vec![0.0f32; 3];
        p[0].process(&RowContext { tokens: &toks, padded_prompt_len: 2, generated: 1 }, &mut s);
        assert_eq!(s[1], f32::NEG_INFINITY);
        let mut s = vec![0.0f32; 3];
        p[0].process(&RowContext { tokens: &toks, padded_prompt_len: 2, generated: 2 }, &mut s);
        assert_eq!(s[1], 0.0);
    }

    #[test]
    fn min_length_counts_padding_like_transformers() {
        let p = build(5, 0, &[0]);
        let mut s = vec![0.0f32; 2];
        p[0].process(&RowContext { tokens: &[1], padded_prompt_len: 4, generated: 0 }, &mut s);
        assert_eq!(s[0], f32::NEG_INFINITY);
        let mut s = vec![0.0f32; 2];
        p[0].process(&RowContext { tokens: &[1], padded_prompt_len: 4, generated: 1 }, &mut s);
        assert_eq!(s[0], 0.0);
    }
}
