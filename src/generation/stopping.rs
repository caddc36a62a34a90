//! Stop conditions beyond eos and length: stop strings, with transformers' StopStringCriteria
//! semantics (the string must end inside the newest token; it may start in earlier tokens,
//! including the prompt, and the newest token may run past its end).

use std::sync::Arc;

use crate::error::Result;

pub type DecodeFn = dyn Fn(&[u32]) -> Result<String> + Send + Sync;

pub struct StopStrings {
    strings: Vec<String>,
    decode: Arc<DecodeFn>,
    /// Tokens to decode from the end: enough to hold the longest string plus the newest token.
    window: usize,
}

impl StopStrings {
    pub fn new(strings: Vec<String>, decode: Arc<DecodeFn>) -> Self {
        // A token decodes to at least one byte (special tokens to more), so `bytes + 1` tokens
        // always cover a string that ends in the newest token.
        let window = strings.iter().map(|s| s.len()).max().unwrap_or(0) + 1;
        StopStrings { strings, decode, window }
    }

    /// True when a stop string ends within the last token of `tokens`.
    pub fn is_stopped(&self, tokens: &[u32]) -> Result<bool> {
        if self.strings.is_empty() || tokens.is_empty() {
            return Ok(false);
        }
        let tail = &tokens[tokens.len().saturating_sub(self.window)..];
        let with_last = (self.decode)(tail)?;
        let before_last = (self.decode)(&tail[..tail.len() - 1])?;
        // The newest token's text starts where the earlier text ends (when decoding is prefix-stable).
        let boundary = common_prefix_len(&before_last, &with_last);
        Ok(self.strings.iter().any(|s| {
            !s.is_empty()
                && with_last.match_indices(s.as_str()).any(|(start, m)| start + m.len() > boundary)
        }))
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Arc<DecodeFn> {
        // Token i decodes to VOCAB[i].
        const VOCAB: [&str; 7] = ["st", "op", "opera", "stop", "at", "las", "topper"];
        Arc::new(|ids: &[u32]| Ok(ids.iter().map(|&i| VOCAB[i as usize]).collect()))
    }

    #[test]
    fn matches_transformers_documented_cases() {
        let d = decoder();
        let s = StopStrings::new(vec!["stop".into()], d);
        for hit in [&[0u32, 1][..], &[3], &[0, 2], &[5, 6]] {
            assert!(s.is_stopped(hit).unwrap(), "{hit:?}");
        }
        for miss in [&[3u32, 4][..], &[0, 1, 4], &[4]] {
            assert!(!s.is_stopped(miss).unwrap(), "{miss:?}");
        }
    }
}
