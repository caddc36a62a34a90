//! Generation above the backend step, written once: `request` is the per-call state machine
//! (prefill, then one token per row per step: logits processing, greedy or sampled selection,
//! stopping); `generate` drives one alone, `crate::scheduler` drives many in shared steps.

pub mod beam;
pub mod hooks;
pub mod request;
pub mod stopping;

use std::sync::Arc;

use crate::backend::{Backend, SeqInput, SlotGuard};
use crate::error::{Error, Result};
use crate::sampling::config::ProcessorConfig;
use crate::sampling::logprobs::TokenLogprobs;
pub use request::Request;

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
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (from the raw logits), computed per step; None reports none.
    pub logprobs: Option<usize>,
    /// Beam search (num_beams > 1): the prompts are expanded into num_beams rows each here.
    pub beam: Option<beam::BeamParams>,
    /// The caller's own processors and stopping criteria (Python callables), if any.
    pub hooks: Option<hooks::HookSet>,
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
    /// Per row, one entry per token it generated up to and including the one that finished it
    /// (when `logprobs` is set).
    pub logprobs: Vec<Vec<TokenLogprobs>>,
    /// Beam search: each returned sequence's length-normalised score, and the beam row of each
    /// of its tokens (-1 past its end).
    pub sequences_scores: Vec<f32>,
    pub beam_indices: Vec<Vec<i64>>,
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

/// Generation for one batch with nobody else on the backend: drives a `Request` step by step.
/// (Concurrent calls go through `crate::scheduler`, which drives the same state machine.)
pub fn generate(
    backend: &dyn Backend,
    prompts: Vec<Prompt>,
    params: GenerationParams,
    decode: Option<Arc<stopping::DecodeFn>>,
    observer: &mut dyn StepObserver,
) -> Result<GenerationOutput> {
    let mut request = Request::new(prompts, params, decode, backend.vocab_size())?;
    request.reserve_buffers()?;
    let mut slots =
        (0..request.rows()).map(|r| SlotGuard::new(backend, request.slot_capacity(r))).collect::<Result<Vec<_>>>()?;
    while !request.is_done() {
        observer.check_interrupt()?;
        let logits = {
            let seqs: Vec<SeqInput> = request
                .step_inputs()
                .into_iter()
                .map(|i| SeqInput { slot: slots[i.row].slot, tokens: i.tokens, start_pos: i.start_pos })
                .collect();
            backend.step(&seqs, false)?
        };
        let tokens = request.advance(&logits)?;
        if let Some((sources, positions)) = request.take_reorder() {
            reorder_slots(backend, &mut slots, |s| s.slot, &sources, &positions)?;
        }
        observer.on_step(&tokens)?;
    }
    Ok(request.into_output())
}

/// Beam search's cache reorder: row j continues row `sources[j]`'s history. A source's first
/// claimant takes its slot as it is (a move: no copy); every further claimant gets a slot of a
/// row nobody continues, into which the backend copies the source's `positions[j]` cached
/// positions. So a step copies only the histories that branched, and after the prefill (every
/// beam continues beam 0) the prompt is copied, never recomputed.
pub fn reorder_slots<S>(
    backend: &dyn Backend,
    slots: &mut Vec<S>,
    slot_id: impl Fn(&S) -> crate::backend::SlotId,
    sources: &[usize],
    positions: &[usize],
) -> Result<()> {
    if sources.len() != slots.len() || positions.len() != sources.len() || sources.iter().any(|&s| s >= slots.len()) {
        return Err(Error::Internal(format!("a reorder of {} rows over {} slots", sources.len(), slots.len())));
    }
    let mut old: Vec<Option<S>> = std::mem::take(slots).into_iter().map(Some).collect();
    let mut claimed = vec![false; old.len()];
    let mut new: Vec<Option<S>> = (0..sources.len()).map(|_| None).collect();
    let mut copies = vec![];
    for (j, &src) in sources.iter().enumerate() {
        if claimed[src] {
            copies.push(j);
        } else {
            claimed[src] = true;
            new[j] = old[src].take();
        }
    }
    let ids: Vec<Option<crate::backend::SlotId>> = new.iter().map(|s| s.as_ref().map(&slot_id)).collect();
    let mut spare = old.iter_mut().filter_map(Option::take);
    for j in copies {
        let dst = spare.next().ok_or_else(|| Error::Internal("no spare slot for a beam".into()))?;
        // The source's slot now belongs to its first claimant; its cache is unchanged.
        let src_row = sources[j];
        let owner = sources.iter().position(|&s| s == src_row).and_then(|k| ids[k]);
        let src_slot = owner.ok_or_else(|| Error::Internal("a beam source without a slot".into()))?;
        backend.copy_slot(src_slot, slot_id(&dst), positions[j])?;
        new[j] = Some(dst);
    }
    *slots = new.into_iter().collect::<Option<Vec<S>>>().ok_or_else(|| Error::Internal("a beam row without a slot".into()))?;
    Ok(())
}
