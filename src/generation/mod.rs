//! The decode loop, written once above the backend step: prefill, then one step per token for
//! the whole batch, logits processing, greedy selection, stopping and streaming.

pub mod stopping;

use crate::backend::{Backend, SeqInput, SlotGuard};
use crate::error::{Error, Result};
use crate::sampling::{self, processors::RowContext};
use stopping::StopStrings;

/// Parameters of one generate call, already merged and validated by the caller.
#[derive(Clone, Debug, Default)]
pub struct GenerationParams {
    /// Decode steps at most (transformers: max_length - padded prompt length, at least 1).
    pub max_new_tokens: usize,
    /// transformers' min_length (counts the padded prompt).
    pub min_length: usize,
    pub min_new_tokens: usize,
    pub eos_token_ids: Vec<u32>,
    /// Written into rows after they finish; None keeps finished rows generating (transformers
    /// without eos).
    pub pad_token_id: Option<u32>,
    pub stop_strings: Vec<String>,
    pub output_scores: bool,
    pub output_logits: bool,
}

/// One prompt row: its tokens without padding, and the padded width of the batch it came in.
pub struct Prompt {
    pub tokens: Vec<u32>,
}

#[derive(Default)]
pub struct GenerationOutput {
    /// New tokens per row, all rows equally long (finished rows padded).
    pub tokens: Vec<Vec<u32>>,
    /// Per step, batch x vocab processed scores (when requested).
    pub scores: Vec<Vec<f32>>,
    /// Per step, batch x vocab raw logits (when requested).
    pub logits: Vec<Vec<f32>>,
}

/// Called after each step; the place to stream tokens and to notice Ctrl-C.
pub trait StepObserver {
    /// `tokens` holds one token per row (pad for finished rows), as transformers streams them.
    fn on_step(&mut self, tokens: &[u32]) -> Result<()>;
    /// Called between phases of long work; returns Err(Interrupted) to stop.
    fn check_interrupt(&mut self) -> Result<()> {
        Ok(())
    }
}

pub struct NoObserver;
impl StepObserver for NoObserver {
    fn on_step(&mut self, _: &[u32]) -> Result<()> {
        Ok(())
    }
}

/// Compacts one padded input row: drops positions whose mask is 0 and checks every id against
/// the vocabulary, naming the row and column of a bad one.
pub fn compact_row(ids: &[i64], mask: Option<&[i64]>, row: usize, vocab_size: usize) -> Result<Vec<u32>> {
    let mut out = Vec::with_capacity(ids.len());
    for (col, &id) in ids.iter().enumerate() {
        if mask.is_some_and(|m| m.get(col).copied().unwrap_or(1) == 0) {
            continue;
        }
        if id < 0 || id as u64 >= vocab_size as u64 {
            return Err(Error::TokenOutOfRange { id, row, position: col, vocab_size });
        }
        out.push(id as u32);
    }
    Ok(out)
}

/// Greedy generation for a batch. `padded_prompt_len` is the width of the caller's padded input,
/// which transformers' length limits count.
pub fn generate(
    backend: &dyn Backend,
    prompts: &[Prompt],
    padded_prompt_len: usize,
    params: &GenerationParams,
    decode: Option<&stopping::DecodeFn>,
    observer: &mut dyn StepObserver,
) -> Result<GenerationOutput> {
    let batch = prompts.len();
    let vocab = backend.vocab_size();
    if let Some((row, _)) = prompts.iter().enumerate().find(|(_, p)| p.tokens.is_empty()) {
        return Err(Error::invalid(format!(
            "row {row} of the input has no tokens (its attention_mask is all zeros); give every row at least one token"
        )));
    }
    for &id in params.eos_token_ids.iter().chain(params.pad_token_id.iter()) {
        if id as usize >= vocab {
            return Err(Error::invalid(format!(
                "eos/pad token id {id} is out of range for a vocabulary of {vocab}; pass ids below {vocab}"
            )));
        }
    }
    let stop = match (params.stop_strings.is_empty(), decode) {
        (true, _) => None,
        (false, Some(d)) => Some(StopStrings::new(params.stop_strings.clone(), d)),
        (false, None) => return Err(Error::invalid("stop_strings need a tokenizer; load the model with its tokenizer")),
    };
    let processors = sampling::processors::build(params.min_length, params.min_new_tokens, &params.eos_token_ids);
    let steps = params.max_new_tokens;
    let mut slots = Vec::with_capacity(batch);
    for p in prompts {
        slots.push(SlotGuard::new(backend, p.tokens.len() + steps)?);
    }
    let mut history: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let mut out = GenerationOutput { tokens: vec![Vec::with_capacity(steps); batch], ..Default::default() };
    let mut unfinished = vec![true; batch];
    // Rows that finished still run when their scores are returned (transformers keeps them in the batch).
    let keep_finished_rows = params.output_scores || params.output_logits || params.pad_token_id.is_none();

    // First step: the whole prompts. Later steps: the previous token of each active row.
    let mut active: Vec<usize> = (0..batch).collect();
    let mut inputs: Vec<(usize, usize)> = prompts.iter().map(|p| (0, p.tokens.len())).collect();
    let mut step_logits = vec![0f32; batch * vocab];
    for step in 0..steps {
        observer.check_interrupt()?;
        let seqs: Vec<SeqInput> = active
            .iter()
            .map(|&r| SeqInput { slot: slots[r].slot, tokens: &history[r][inputs[r].0..inputs[r].1], start_pos: inputs[r].0 })
            .collect();
        let logits = backend.step(&seqs, false)?;
        drop(seqs);
        for (i, &r) in active.iter().enumerate() {
            step_logits[r * vocab..(r + 1) * vocab].copy_from_slice(&logits[i * vocab..(i + 1) * vocab]);
        }
        if params.output_logits {
            out.logits.push(step_logits.clone());
        }
        let mut next = vec![params.pad_token_id.unwrap_or(0); batch];
        for &r in &active {
            let row = &mut step_logits[r * vocab..(r + 1) * vocab];
            let ctx = RowContext { tokens: &history[r], padded_prompt_len: padded_prompt_len, generated: step };
            for p in &processors {
                p.process(&ctx, row);
            }
            if unfinished[r] || params.pad_token_id.is_none() {
                next[r] = sampling::argmax(row) as u32;
            }
        }
        if params.output_scores {
            out.scores.push(step_logits.clone());
        }
        for r in 0..batch {
            out.tokens[r].push(next[r]);
            history[r].push(next[r]);
        }
        observer.on_step(&next)?;
        for &r in &active {
            if !unfinished[r] {
                continue;
            }
            let hit_eos = params.eos_token_ids.contains(&next[r]);
            let hit_stop = match &stop {
                Some(s) => s.is_stopped(&history[r])?,
                None => false,
            };
            if hit_eos || hit_stop {
                unfinished[r] = false;
            }
        }
        if !unfinished.iter().any(|&u| u) {
            break;
        }
        for &r in &active {
            let len = history[r].len();
            inputs[r] = (len - 1, len);
        }
        if !keep_finished_rows {
            active.retain(|&r| unfinished[r]);
        }
    }
    Ok(out)
}
