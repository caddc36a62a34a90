//! One generate call as a state machine: the per-request half of the decode loop (logits
//! checks, processors, greedy/sampled selection, stopping, scores). Whoever owns the backend
//! (the scheduler, or `generate` for a lone call) asks it which rows to run, runs them in a step
//! (possibly together with other requests' rows) and hands the logits back with `advance`.

use std::sync::Arc;

use rayon::prelude::*;

use super::beam::{BeamSearch, Candidate};
use super::hooks::{self, Hooked};
use super::stopping::{DecodeFn, StopStrings};
use super::{GenerationOutput, GenerationParams, Prompt};
use crate::error::{Error, Result};
use crate::mem;
use crate::sampling::logprobs::token_logprobs;
use crate::sampling::processors::{LogitsProcessor, RowContext};
use crate::sampling::sample::{self, RowRng};
use crate::sampling;

/// New-token capacity reserved up front per row; more is allocated only as tokens arrive.
const INITIAL_TOKEN_CAPACITY: usize = 256;

/// A copy of a step's scores for the caller (output_scores/output_logits), or OutOfMemory.
fn copy_of(scores: &[f32]) -> Result<Vec<f32>> {
    let mut v = mem::try_with_capacity(scores.len())
        .map_err(|e| e.into_error("keeping one more step of scores", "lower max_new_tokens or drop output_scores/output_logits"))?;
    v.extend_from_slice(scores);
    Ok(v)
}

/// One row's share of the next step.
pub struct RowInput<'a> {
    pub row: usize,
    pub tokens: &'a [u32],
    pub start_pos: usize,
}

pub struct Request {
    params: GenerationParams,
    vocab: usize,
    processors: Vec<Box<dyn LogitsProcessor>>,
    /// User hooks (with the built-in processors that precede them); None for most requests.
    hooked: Option<Hooked>,
    stop: Option<StopStrings>,
    rngs: Vec<Option<RowRng>>,
    ignore_prefix: Vec<usize>,
    prompt_lens: Vec<usize>,
    /// What the model sees (attended tokens) and what the processors see (transformers' rows).
    model_tokens: Vec<Vec<u32>>,
    hf_rows: Vec<Vec<u32>>,
    /// Per row, the range of `model_tokens` the next step appends to the cache.
    inputs: Vec<(usize, usize)>,
    /// Rows that run in the next step, in order.
    active: Vec<usize>,
    unfinished: Vec<bool>,
    /// Rows that finished still run when their scores are returned (transformers keeps them in the batch).
    keep_finished_rows: bool,
    step: usize,
    /// batch x vocab working scores; reserved at admission (`reserve_buffers`), not at submit,
    /// so a queued request holds no per-row buffers.
    step_logits: Vec<f32>,
    out: GenerationOutput,
    done: bool,
    /// Beam search state (rows are prompts x num_beams), and the cache reorder its last step asks for.
    beam: Option<BeamSearch>,
    reorder: Option<(Vec<usize>, Vec<usize>)>,
}

impl Request {
    /// Validates the call and prepares its state; no backend work happens here.
    pub fn new(prompts: Vec<Prompt>, params: GenerationParams, decode: Option<Arc<DecodeFn>>, vocab: usize) -> Result<Self> {
        let beam = match &params.beam {
            Some(b) => Some(BeamSearch::new(b.clone(), prompts.len(), params.max_new_tokens)?),
            None => None,
        };
        // Beam search: num_beams rows per prompt (only the first is prefilled; see `advance_beam`).
        let beams = beam.as_ref().map_or(1, |b| b.params.num_beams);
        let prompts: Vec<Prompt> = prompts
            .into_iter()
            .flat_map(|p| (0..beams).map(move |_| Prompt { input_ids: p.input_ids.clone(), tokens: p.tokens.clone(), ignore_prefix: p.ignore_prefix }))
            .collect();
        let batch = prompts.len();
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
        let built = sampling::processors::build_split(&params.processors, vocab)?;
        let (processors, hooked) = hooks::arrange(built, params.hooks.clone())?;
        let rngs = if do_sample {
            params.seeds.iter().map(|&(seed, stream)| Some(RowRng::new(seed, stream))).collect()
        } else {
            (0..batch).map(|_| None).collect()
        };
        let steps = params.max_new_tokens;
        // Hooks see the whole batch every step, as transformers' processors do.
        let keep_finished_rows =
            params.output_scores || params.output_logits || params.pad_token_id.is_none() || hooked.is_some();
        // Grown as tokens come: max_new_tokens is an upper bound that most rows never reach.
        let token_capacity = steps.min(INITIAL_TOKEN_CAPACITY);
        let logprob_rows = if params.logprobs.is_some() { batch } else { 0 };
        Ok(Request {
            vocab,
            processors,
            hooked,
            stop,
            rngs,
            ignore_prefix: prompts.iter().map(|p| p.ignore_prefix).collect(),
            prompt_lens: prompts.iter().map(|p| p.tokens.len()).collect(),
            inputs: prompts.iter().map(|p| (0, p.tokens.len())).collect(),
            hf_rows: prompts.iter().map(|p| p.input_ids.clone()).collect(),
            model_tokens: prompts.into_iter().map(|p| p.tokens).collect(),
            active: (0..batch).step_by(beams).collect(),
            unfinished: vec![true; batch],
            keep_finished_rows,
            step: 0,
            step_logits: Vec::new(),
            out: GenerationOutput {
                tokens: (0..batch).map(|_| Vec::with_capacity(token_capacity)).collect(),
                logprobs: (0..logprob_rows).map(|_| Vec::new()).collect(),
                ..Default::default()
            },
            done: steps == 0 || batch == 0,
            params,
            beam,
            reorder: None,
        })
    }

    pub fn rows(&self) -> usize {
        self.prompt_lens.len()
    }

    /// Cache positions row `row` needs: its prompt plus every new token.
    pub fn slot_capacity(&self, row: usize) -> usize {
        self.prompt_lens[row].saturating_add(self.params.max_new_tokens)
    }

    /// Cache positions of all rows together (what the scheduler's memory bound counts).
    pub fn cache_positions(&self) -> usize {
        (0..self.rows()).fold(0usize, |sum, r| sum.saturating_add(self.slot_capacity(r)))
    }

    /// The attended prompt tokens of every row (what the model is fed first).
    pub fn prompt_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.model_tokens.iter().zip(&self.prompt_lens).flat_map(|(t, &n)| t[..n.min(t.len())].iter().copied())
    }

    /// Reserves the per-step working buffers (batch x vocab scores). The scheduler calls it at
    /// admission; failing to reserve is an error, never an abort.
    pub fn reserve_buffers(&mut self) -> Result<()> {
        let (rows, vocab) = (self.rows(), self.vocab);
        if self.step_logits.len() == rows.saturating_mul(vocab) {
            return Ok(());
        }
        let what = format!("the score buffer of {rows} rows x {vocab} vocabulary entries");
        self.step_logits = mem::try_zeroed(rows.saturating_mul(vocab))
            .map_err(|e| e.into_error(&what, "send fewer rows at once"))?;
        Ok(())
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// True before the first step: the next step is this request's prefill.
    pub fn is_prefill(&self) -> bool {
        self.step == 0
    }

    /// The rows the next step runs, with the tokens each appends to its cache and where.
    pub fn step_inputs(&self) -> Vec<RowInput<'_>> {
        if self.done {
            return Vec::new();
        }
        self.active
            .iter()
            .map(|&r| {
                let (from, to) = self.inputs[r];
                RowInput { row: r, tokens: &self.model_tokens[r][from..to], start_pos: from }
            })
            .collect()
    }

    /// Takes the logits of the rows `step_inputs` named (vocab wide each, same order), picks
    /// the next token of every row and applies the stop conditions. Returns one token per row
    /// (pad for finished rows), as transformers streams them.
    pub fn advance(&mut self, logits: &[f32]) -> Result<Vec<u32>> {
        if self.beam.is_some() {
            return self.advance_beam(logits);
        }
        let (vocab, batch, step) = (self.vocab, self.rows(), self.step);
        if self.done || logits.len() != self.active.len() * vocab {
            return Err(Error::Internal(format!(
                "advance got {} logits for {} active rows of vocabulary {vocab} (done: {})",
                logits.len(),
                self.active.len(),
                self.done
            )));
        }
        self.reserve_buffers()?;
        for (i, &r) in self.active.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let bad = sampling::count_invalid(row);
            if bad > 0 && !self.params.processors.remove_invalid_values {
                return Err(Error::Numerical(format!(
                    "step {step}, row {r}: the model produced {bad} NaN/+Inf logits out of {vocab}; the weights or the \
                     dtype overflow (try dtype=\"float32\"), or pass remove_invalid_values=True to replace them as transformers does"
                )));
            }
            self.step_logits[r * vocab..(r + 1) * vocab].copy_from_slice(row);
        }
        if self.params.output_logits {
            self.out.logits.push(copy_of(&self.step_logits)?);
        }
        let next = self.pick_tokens()?;
        if self.params.output_scores {
            self.out.scores.push(copy_of(&self.step_logits)?);
        }
        if let Some(top) = self.params.logprobs {
            for (i, &r) in self.active.iter().enumerate() {
                if self.unfinished[r] {
                    let raw = &logits[i * vocab..(i + 1) * vocab];
                    self.out.logprobs[r].push(token_logprobs(raw, next[r] as usize, top));
                }
            }
        }
        for (r, &token) in next.iter().enumerate() {
            self.out.tokens[r].push(token);
            self.model_tokens[r].push(token);
            self.hf_rows[r].push(token);
        }
        for &r in &self.active {
            if !self.unfinished[r] {
                continue;
            }
            let hit_eos = self.params.eos_token_ids.contains(&next[r]);
            let hit_stop = match &self.stop {
                Some(s) => s.is_stopped(&self.model_tokens[r])?,
                None => false,
            };
            if hit_eos || hit_stop {
                self.unfinished[r] = false;
            }
        }
        if let Some(h) = &self.hooked {
            h.stop(&self.hf_rows, None, &self.step_logits, &mut self.unfinished)?;
        }
        self.step += 1;
        if !self.unfinished.iter().any(|&u| u) || self.step >= self.params.max_new_tokens {
            self.done = true;
        }
        for &r in &self.active {
            let len = self.model_tokens[r].len();
            self.inputs[r] = (len - 1, len);
        }
        if !self.keep_finished_rows {
            let unfinished = &self.unfinished;
            self.active.retain(|&r| unfinished[r]);
        }
        debug_assert_eq!(next.len(), batch);
        Ok(next)
    }

    /// Runs the processors and selects a token for every active row. Rows are independent (own
    /// processors state, own random stream), so they run in parallel.
    fn pick_tokens(&mut self) -> Result<Vec<u32>> {
        let (vocab, step) = (self.vocab, self.step);
        if let Some(h) = &self.hooked {
            h.process(&self.hf_rows, &self.ignore_prefix, &mut self.step_logits, vocab)?;
        }
        let mut is_active = vec![false; self.rows()];
        self.active.iter().for_each(|&r| is_active[r] = true);
        let (processors, hf_rows, ignore_prefix, unfinished) =
            (&self.processors, &self.hf_rows, &self.ignore_prefix, &self.unfinished);
        let pads_finished = self.params.pad_token_id.is_some();
        let picks: Vec<Result<Option<u32>>> = self
            .step_logits
            .par_chunks_mut(vocab)
            .zip(self.rngs.par_iter_mut())
            .enumerate()
            .map(|(r, (row, rng))| {
                if !is_active[r] {
                    return Ok(None);
                }
                let ctx = RowContext { input_ids: &hf_rows[r], ignore_prefix: ignore_prefix[r] };
                sampling::processors::apply(processors, &ctx, row);
                if !unfinished[r] && pads_finished {
                    return Ok(None);
                }
                let token = match rng {
                    Some(rng) => sample::sample(row, rng, step, r)?,
                    None => sampling::argmax(row),
                };
                Ok(Some(token as u32))
            })
            .collect();
        let mut next = vec![self.params.pad_token_id.unwrap_or(0); self.rows()];
        for (r, pick) in picks.into_iter().enumerate() {
            if let Some(t) = pick? {
                next[r] = t;
            }
        }
        Ok(next)
    }

    pub fn into_output(self) -> GenerationOutput {
        self.out
    }

    /// Beam search: the (source row of every row, cached positions of that source) reorder the
    /// last step asks for; the driver applies it to the rows' cache slots before the next step.
    pub fn take_reorder(&mut self) -> Option<(Vec<usize>, Vec<usize>)> {
        self.reorder.take()
    }

    /// One beam-search step over all prompts (transformers `_beam_search`; scoring in `beam.rs`).
    fn advance_beam(&mut self, logits: &[f32]) -> Result<Vec<u32>> {
        let (vocab, rows, step) = (self.vocab, self.rows(), self.step);
        let Some(search) = self.beam.as_mut() else { return Err(Error::Internal("not a beam request".into())) };
        let n = search.params.num_beams;
        if self.done || logits.len() != self.active.len() * vocab {
            return Err(Error::Internal(format!("beam step: {} logits for {} rows", logits.len(), self.active.len())));
        }
        self.step_logits.resize(rows * vocab, 0.0);
        // Raw f32 logits of every row (the prefill ran beam 0 of each prompt: its beams share them).
        for (i, &r) in self.active.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let bad = sampling::count_invalid(row);
            if bad > 0 && !self.params.processors.remove_invalid_values {
                return Err(Error::Numerical(format!(
                    "step {step}, row {r}: the model produced {bad} NaN/+Inf logits out of {vocab}; try dtype=\"float32\" \
                     or remove_invalid_values=True"
                )));
            }
            let copies = if self.active.len() == rows { 1 } else { n };
            for b in 0..copies {
                self.step_logits[(r + b) * vocab..(r + b + 1) * vocab].copy_from_slice(row);
            }
        }
        if self.params.output_logits {
            self.out.logits.push(copy_of(&self.step_logits)?);
        }
        // log_softmax first, then the processors: they see log-probabilities. User hooks run
        // batch-wide in their place among the built-ins (then the per-row rest).
        self.step_logits.par_chunks_mut(vocab).for_each(sampling::log_softmax_in_place);
        if let Some(h) = &self.hooked {
            h.process(&self.hf_rows, &self.ignore_prefix, &mut self.step_logits, vocab)?;
        }
        let (processors, hf_rows, ignore_prefix) = (&self.processors, &self.hf_rows, &self.ignore_prefix);
        self.step_logits.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
            let ctx = RowContext { input_ids: &hf_rows[r], ignore_prefix: ignore_prefix[r] };
            sampling::processors::apply(processors, &ctx, row);
        });
        if self.params.output_scores {
            self.out.scores.push(copy_of(&self.step_logits)?);
        }
        let eos = &self.params.eos_token_ids;
        let k = search.candidates_per_prompt(eos.len());
        let last_step = step + 1 >= self.params.max_new_tokens;
        // Every prompt's K candidates and whether each hits a criterion (eos, max length, stop
        // strings, then the user's criteria on all candidates at once).
        let mut all_cands = Vec::with_capacity(rows / n);
        let mut all_stops = Vec::with_capacity(rows / n);
        for p in 0..rows / n {
            let block = &self.step_logits[p * n * vocab..(p + 1) * n * vocab];
            let cands: Vec<Candidate> = match self.rngs[p * n].as_mut() {
                Some(rng) => sample_candidates(search, p, block, vocab, k, rng, step)?,
                None => search.top_candidates(p, block, vocab, k),
            };
            let mut stopped = Vec::with_capacity(cands.len());
            for c in &cands {
                let mut hit = last_step || eos.contains(&c.token);
                if !hit {
                    if let Some(s) = &self.stop {
                        let mut t = self.model_tokens[p * n + c.beam].clone();
                        t.push(c.token);
                        hit = s.is_stopped(&t)?;
                    }
                }
                stopped.push(hit);
            }
            all_cands.push(cands);
            all_stops.push(stopped);
        }
        if let Some(h) = &self.hooked {
            let mut cand_rows = Vec::new();
            let mut prompt_of = Vec::new();
            for (p, cands) in all_cands.iter().enumerate() {
                for c in cands {
                    let mut row = self.hf_rows[p * n + c.beam].clone();
                    row.push(c.token);
                    cand_rows.push(row);
                    prompt_of.push(p * n);
                }
            }
            let mut go_on = vec![true; cand_rows.len()];
            h.stop(&cand_rows, Some(&prompt_of), &self.step_logits, &mut go_on)?;
            let mut it = go_on.into_iter();
            for stopped in &mut all_stops {
                for s in stopped.iter_mut() {
                    *s |= !it.next().unwrap_or(true);
                }
            }
        }
        let mut sources = Vec::with_capacity(rows);
        let mut all_stopped = true;
        for (p, (cands, stopped)) in all_cands.iter().zip(&all_stops).enumerate() {
            all_stopped &= stopped.iter().all(|&x| x);
            sources.extend(search.update(p, cands, stopped).into_iter().map(|b| p * n + b));
        }
        search.finish_step(all_stopped);
        // Every row now continues its source's history with its new token.
        let mut next = Vec::with_capacity(rows);
        let (old_model, old_hf) = (std::mem::take(&mut self.model_tokens), std::mem::take(&mut self.hf_rows));
        // Rows of different prompts hold different prompt lengths (padding is not cached).
        let cached: Vec<usize> = sources.iter().map(|&src| old_model[src].len()).collect();
        for (j, &src) in sources.iter().enumerate() {
            let token = *search.prompts[j / n].running_tokens[j % n].last().ok_or_else(|| Error::Internal("empty beam".into()))?;
            let (mut m, mut h) = (old_model[src].clone(), old_hf[src].clone());
            m.push(token);
            h.push(token);
            self.model_tokens.push(m);
            self.hf_rows.push(h);
            next.push(token);
        }
        self.reorder = Some((sources, cached));
        self.step += 1;
        self.active = (0..rows).collect();
        for r in 0..rows {
            let len = self.model_tokens[r].len();
            self.inputs[r] = (len - 1, len);
        }
        if search.done {
            self.done = true;
            self.reorder = None;
            self.finish_beams();
        }
        Ok(next)
    }

    /// The best `num_return_sequences` hypotheses of every prompt, as the output rows.
    fn finish_beams(&mut self) {
        let Some(search) = self.beam.as_ref() else { return };
        let nrs = search.params.num_return_sequences;
        let fill = u32::try_from(search.params.fill_value).unwrap_or(u32::MAX);
        let picked: Vec<&super::beam::Finished> = search.prompts.iter().flat_map(|p| p.pool.iter().take(nrs)).collect();
        let longest = picked.iter().map(|f| f.beam_indices.len()).max().unwrap_or(0);
        self.out.tokens = picked
            .iter()
            .map(|f| {
                let mut t = f.tokens.clone();
                t.resize(longest, fill);
                t
            })
            .collect();
        self.out.sequences_scores = picked.iter().map(|f| f.score).collect();
        self.out.beam_indices = picked
            .iter()
            .map(|f| {
                let mut b = f.beam_indices.clone();
                b.resize(longest, -1);
                b
            })
            .collect();
    }
}

/// Beam sampling: K continuations drawn without replacement from softmax of the accumulated
/// scores (prompt `p`'s own random stream), then sorted by score, best first.
fn sample_candidates(search: &BeamSearch, p: usize, block: &[f32], vocab: usize, k: usize, rng: &mut RowRng, step: usize) -> Result<Vec<Candidate>> {
    let mut acc = search.accumulated(p, block, vocab);
    let scores = acc.clone();
    let mut picked = Vec::with_capacity(k);
    for _ in 0..k.min(acc.len()) {
        let i = sample::sample(&acc, rng, step, p)?;
        picked.push(i);
        acc[i] = f32::NEG_INFINITY;
    }
    let mut cands: Vec<Candidate> =
        picked.into_iter().map(|i| Candidate { beam: i / vocab, token: (i % vocab) as u32, score: scores[i] }).collect();
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    Ok(cands)
}
