//! The decode loop, written once above the backend step: prefill, then one step per token for
//! the whole batch, logits processing, greedy or sampled selection, stopping and streaming.

pub mod stopping;

use rayon::prelude::*;

use crate::backend::{Backend, SeqInput, SlotGuard};
use crate::error::{Error, Result};
use crate::sampling::config::ProcessorConfig;
use crate::sampling::sample::{self, RowRng};
use crate::sampling::{self, processors::RowContext};
use stopping::StopStrings;

/// Parameters of one generate call, already merged and validated by the caller.
#[derive(Clone, Debug, Default)]
pub struct GenerationParams {
    /// Decode steps at most (transformers: max_length - padded prompt length, at least 1).
    pub max_new_tokens: usize,
    /// Which logits processors run, and whether to sample.
    pub processors: ProcessorConfig,
    pub eos_token_ids: Vec<u32>,
    /// Written into rows after they finish; None keeps finished rows generating (transformers
    /// without eos).
    pub pad_token_id: Option<u32>,
    pub stop_strings: Vec<String>,
    pub output_scores: bool,
    pub output_logits: bool,
    /// (seed, stream) of each row's random stream, when sampling.
    pub seeds: Vec<(u64, u64)>,
}

/// One prompt row.
pub struct Prompt {
    /// transformers' `input_ids` row as given, padding included (masked ids that are no valid
    /// token are `u32::MAX`): what the logits processors see.
    pub input_ids: Vec<u32>,
    /// The attended tokens only: what the model sees.
    pub tokens: Vec<u32>,
    /// Index of the first attended position (left padding), skipped by repetition_penalty.
    pub ignore_prefix: usize,
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
    /// Called before each step; returns Err(Interrupted) to stop.
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

/// Builds one prompt from a padded input row: drops positions whose mask is 0 and checks every
/// attended id against the vocabulary, naming the row and column of a bad one.
pub fn prompt_from_row(ids: &[i64], mask: Option<&[i64]>, row: usize, vocab_size: usize) -> Result<Prompt> {
    let attended = |col: usize| mask.is_none_or(|m| m.get(col).copied().unwrap_or(1) != 0);
    let mut tokens = Vec::with_capacity(ids.len());
    let mut input_ids = Vec::with_capacity(ids.len());
    for (col, &id) in ids.iter().enumerate() {
        let valid = id >= 0 && (id as u64) < vocab_size as u64;
        input_ids.push(if valid { id as u32 } else { u32::MAX });
        if !attended(col) {
            continue;
        }
        if !valid {
            return Err(Error::TokenOutOfRange { id, row, position: col, vocab_size });
        }
        tokens.push(id as u32);
    }
    let ignore_prefix = (0..ids.len()).find(|&c| attended(c)).unwrap_or(0);
    Ok(Prompt { input_ids, tokens, ignore_prefix })
}

/// Generation for a batch, greedy or sampled; every row runs until eos, a stop string or
/// `max_new_tokens`.
pub fn generate(
    backend: &dyn Backend,
    prompts: &[Prompt],
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
    let do_sample = params.processors.do_sample;
    if do_sample && params.seeds.len() != batch {
        return Err(Error::Internal(format!("{} seeds for {batch} rows", params.seeds.len())));
    }
    let stop = match (params.stop_strings.is_empty(), decode) {
        (true, _) => None,
        (false, Some(d)) => Some(StopStrings::new(params.stop_strings.clone(), d)),
        (false, None) => return Err(Error::invalid("stop_strings need a tokenizer; load the model with its tokenizer")),
    };
    let processors = sampling::processors::build(&params.processors, vocab)?;
    let mut rngs: Vec<Option<RowRng>> = if do_sample {
        params.seeds.iter().map(|&(seed, stream)| Some(RowRng::new(seed, stream))).collect()
    } else {
        (0..batch).map(|_| None).collect()
    };
    let steps = params.max_new_tokens;
    let mut slots = Vec::with_capacity(batch);
    for p in prompts {
        slots.push(SlotGuard::new(backend, p.tokens.len() + steps)?);
    }
    // What the model sees (attended tokens) and what the processors see (transformers' rows).
    let mut model_tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let mut hf_rows: Vec<Vec<u32>> = prompts.iter().map(|p| p.input_ids.clone()).collect();
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
            .map(|&r| SeqInput {
                slot: slots[r].slot,
                tokens: &model_tokens[r][inputs[r].0..inputs[r].1],
                start_pos: inputs[r].0,
            })
            .collect();
        let logits = backend.step(&seqs, false)?;
        drop(seqs);
        for (i, &r) in active.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let bad = sampling::count_invalid(row);
            if bad > 0 && !params.processors.remove_invalid_values {
                return Err(Error::Numerical(format!(
                    "step {step}, row {r}: the model produced {bad} NaN/+Inf logits out of {vocab}; the weights or the                      dtype overflow (try dtype=\"float32\"), or pass remove_invalid_values=True to replace them as transformers does"
                )));
            }
            step_logits[r * vocab..(r + 1) * vocab].copy_from_slice(row);
        }
        if params.output_logits {
            out.logits.push(step_logits.clone());
        }
        // Rows are independent (own processors state, own random stream): process them in parallel.
        let mut is_active = vec![false; batch];
        active.iter().for_each(|&r| is_active[r] = true);
        let picks: Vec<Result<Option<u32>>> = step_logits
            .par_chunks_mut(vocab)
            .zip(rngs.par_iter_mut())
            .enumerate()
            .map(|(r, (row, rng))| {
                if !is_active[r] {
                    return Ok(None);
                }
                let ctx = RowContext { input_ids: &hf_rows[r], ignore_prefix: prompts[r].ignore_prefix };
                for p in &processors {
                    p.process(&ctx, row);
                }
                if !unfinished[r] && params.pad_token_id.is_some() {
                    return Ok(None);
                }
                let token = match rng {
                    Some(rng) => sample::sample(row, rng, step, r)?,
                    None => sampling::argmax(row),
                };
                Ok(Some(token as u32))
            })
            .collect();
        let mut next = vec![params.pad_token_id.unwrap_or(0); batch];
        for (r, pick) in picks.into_iter().enumerate() {
            if let Some(t) = pick? {
                next[r] = t;
            }
        }
        if params.output_scores {
            out.scores.push(step_logits.clone());
        }
        for r in 0..batch {
            out.tokens[r].push(next[r]);
            model_tokens[r].push(next[r]);
            hf_rows[r].push(next[r]);
        }
        observer.on_step(&next)?;
        for &r in &active {
            if !unfinished[r] {
                continue;
            }
            let hit_eos = params.eos_token_ids.contains(&next[r]);
            let hit_stop = match &stop {
                Some(s) => s.is_stopped(&model_tokens[r])?,
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
            let len = model_tokens[r].len();
            inputs[r] = (len - 1, len);
        }
        if !keep_finished_rows {
            active.retain(|&r| unfinished[r]);
        }
    }
    Ok(out)
}
