//! Beam search with transformers 5.x `_beam_search` semantics, per prompt: log-softmax of the f32
//! logits, then the processors (they see log-probabilities); the top K = max(2, 1 + n_eos) *
//! num_beams continuations of all beams; only the top num_beams of those can finish; a finished
//! hypothesis scores sum_logprobs / generated_len ** length_penalty (generated tokens including
//! the EOS, excluding the padded prompt); early_stopping True / False / "never" with transformers'
//! heuristic; the loop ends when no prompt can improve, when every pool is full under
//! early_stopping=True, or when every candidate hit a stopping criterion (max length).
//!
//! This module is the scoring only; `request.rs` runs the model rows and reorders their caches.

use serde::Deserialize;

use crate::error::{Error, Result};

/// transformers' "very large negative" for impossible beams.
const NEG: f32 = -1.0e9;

#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
pub enum EarlyStopping {
    #[serde(rename = "true")]
    True,
    #[serde(rename = "false")]
    False,
    #[serde(rename = "never")]
    Never,
}

#[derive(Clone, Debug, Deserialize)]
pub struct BeamParams {
    pub num_beams: usize,
    /// A Python float: powers are taken in f64 and rounded to f32, as torch divides an f32
    /// tensor by a Python scalar.
    pub length_penalty: f64,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
    /// transformers' filler for unfinished rows: pad (or eos[0]) when there is an eos id, else -1
    /// (written as the maximal u32 and returned as -1 by the caller).
    pub fill_value: i64,
}

/// One candidate continuation of a prompt: its source beam, token and accumulated log-prob.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub beam: usize,
    pub token: u32,
    pub score: f32,
}

/// A finished hypothesis in a prompt's pool.
#[derive(Clone, Debug)]
pub struct Finished {
    pub score: f32,
    pub tokens: Vec<u32>,
    /// Global beam row (prompt * num_beams + beam) of every generated token.
    pub beam_indices: Vec<i64>,
    pub done: bool,
}

/// Per prompt: running beams and the finished pool.
pub struct PromptBeams {
    pub running_scores: Vec<f32>,
    pub running_tokens: Vec<Vec<u32>>,
    pub running_indices: Vec<Vec<i64>>,
    pub pool: Vec<Finished>,
    improvable: bool,
}

pub struct BeamSearch {
    pub params: BeamParams,
    pub prompts: Vec<PromptBeams>,
    /// Generated tokens so far (cur_len - decoder_prompt_len).
    pub step: usize,
    pub max_new_tokens: usize,
    pub done: bool,
}

/// The indices of the `k` largest values, largest first (ties: lower index first). One pass
/// keeping the best k in a small sorted list: k is a few beams, the values num_beams x vocab.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    // Sorted best first; (value, index) compares by value desc, then index asc.
    let better = |a: (f32, usize), b: (f32, usize)| a.0.total_cmp(&b.0).reverse().then(a.1.cmp(&b.1)).is_lt();
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && !better((v, i), best[k - 1]) {
            continue;
        }
        let at = best.partition_point(|&b| better(b, (v, i)));
        best.insert(at, (v, i));
        best.truncate(k);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

impl BeamSearch {
    pub fn new(params: BeamParams, prompts: usize, max_new_tokens: usize) -> Result<Self> {
        let n = params.num_beams;
        if n < 2 || params.num_return_sequences == 0 || params.num_return_sequences > n {
            return Err(Error::invalid(format!(
                "`num_return_sequences` ({}) has to be smaller or equal to `num_beams` ({n})",
                params.num_return_sequences
            )));
        }
        let one = |_| PromptBeams {
            running_scores: (0..n).map(|b| if b == 0 { 0.0 } else { NEG }).collect(),
            running_tokens: vec![Vec::new(); n],
            running_indices: vec![Vec::new(); n],
            pool: (0..n).map(|_| Finished { score: NEG, tokens: vec![], beam_indices: vec![], done: false }).collect(),
            improvable: true,
        };
        Ok(BeamSearch { params, prompts: (0..prompts).map(one).collect(), step: 0, max_new_tokens, done: max_new_tokens == 0 })
    }

    /// K: candidates gathered per prompt.
    pub fn candidates_per_prompt(&self, n_eos: usize) -> usize {
        (1 + n_eos).max(2) * self.params.num_beams
    }

    /// The top K continuations of prompt `p` from its beams' processed log-probs (`log_probs`:
    /// num_beams rows of `vocab`), sorted by accumulated score, best first (greedy beam search).
    pub fn top_candidates(&self, p: usize, log_probs: &[f32], vocab: usize, k: usize) -> Vec<Candidate> {
        let acc = self.accumulated(p, log_probs, vocab);
        top_k(&acc, k).into_iter().map(|i| Candidate { beam: i / vocab, token: (i % vocab) as u32, score: acc[i] }).collect()
    }

    /// log_probs + each beam's running score, flattened over (beam, token).
    pub fn accumulated(&self, p: usize, log_probs: &[f32], vocab: usize) -> Vec<f32> {
        let scores = &self.prompts[p].running_scores;
        log_probs.iter().enumerate().map(|(i, &x)| x + scores[i / vocab]).collect()
    }

    /// Applies one step to prompt `p`: `cands` (K, best first) and whether each hit a stopping
    /// criterion. Returns the source beam of each new running beam.
    pub fn update(&mut self, p: usize, cands: &[Candidate], stopped: &[bool]) -> Vec<usize> {
        let (n, prm) = (self.params.num_beams, &self.params);
        let generated = ((self.step + 1) as f64).powf(self.params.length_penalty) as f32;
        let prompt = &mut self.prompts[p];
        let cand_tokens = |c: &Candidate, pr: &PromptBeams| {
            let mut t = pr.running_tokens[c.beam].clone();
            t.push(c.token);
            t
        };
        let cand_indices = |c: &Candidate, pr: &PromptBeams| {
            let mut t = pr.running_indices[c.beam].clone();
            t.push((p * n + c.beam) as i64);
            t
        };
        // Next running beams: the best candidates that did not stop.
        let running_scores: Vec<f32> = cands.iter().zip(stopped).map(|(c, &s)| c.score + if s { NEG } else { 0.0 }).collect();
        let next = top_k(&running_scores, n);
        // Finished pool: only the top num_beams candidates that stopped can enter it.
        let pool_full = prompt.pool.iter().all(|f| f.done) && prm.early_stopping == EarlyStopping::True;
        let mut merged: Vec<(f32, Option<usize>)> = prompt.pool.iter().map(|f| (f.score, None)).collect();
        for (k, (c, &s)) in cands.iter().zip(stopped).enumerate() {
            let just_finished = s && k < n;
            let mut score = c.score / generated;
            if pool_full {
                score += NEG;
            }
            if !prompt.improvable {
                score += NEG;
            }
            if !just_finished {
                score += NEG;
            }
            merged.push((score, Some(k)));
        }
        let merged_scores: Vec<f32> = merged.iter().map(|m| m.0).collect();
        let keep = top_k(&merged_scores, n);
        let old_pool = std::mem::take(&mut prompt.pool);
        prompt.pool = keep
            .iter()
            .map(|&i| match merged[i].1 {
                None => old_pool[i].clone(),
                Some(k) => Finished {
                    score: merged[i].0,
                    tokens: cand_tokens(&cands[k], prompt),
                    beam_indices: cand_indices(&cands[k], prompt),
                    done: stopped[k] && k < n,
                },
            })
            .collect();
        let sources: Vec<usize> = next.iter().map(|&k| cands[k].beam).collect();
        let new_tokens: Vec<Vec<u32>> = next.iter().map(|&k| cand_tokens(&cands[k], prompt)).collect();
        let new_indices: Vec<Vec<i64>> = next.iter().map(|&k| cand_indices(&cands[k], prompt)).collect();
        prompt.running_scores = next.iter().map(|&k| running_scores[k]).collect();
        prompt.running_tokens = new_tokens;
        prompt.running_indices = new_indices;
        sources
    }

    /// After every prompt's `update`: advances the length, the heuristic and the exit test
    /// (`all_stopped`: every candidate of every prompt hit a criterion).
    pub fn finish_step(&mut self, all_stopped: bool) {
        self.step += 1;
        let prm = &self.params;
        let len = if prm.early_stopping == EarlyStopping::Never && prm.length_penalty > 0.0 {
            self.max_new_tokens as f64
        } else {
            self.step as f64
        };
        let denom = len.powf(prm.length_penalty) as f32;
        for pr in &mut self.prompts {
            let best = pr.running_scores[0] / denom;
            let worst = pr.pool.iter().map(|f| f.score).fold(f32::INFINITY, f32::min);
            let any_better = pr.pool.iter().any(|f| best > if f.done { worst } else { NEG });
            pr.improvable = pr.improvable && any_better;
        }
        let improvable = self.prompts.iter().any(|p| p.improvable);
        let open = !(self.prompts.iter().all(|p| p.pool.iter().all(|f| f.done)) && prm.early_stopping == EarlyStopping::True);
        self.done = !(improvable && open && !all_stopped) || self.step >= self.max_new_tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[0.5], 4), vec![0]);
    }

    #[test]
    fn a_finished_candidate_ranked_below_num_beams_is_dropped() {
        let params = BeamParams { num_beams: 2, length_penalty: 1.0, early_stopping: EarlyStopping::False, num_return_sequences: 1, fill_value: 0 };
        let mut b = BeamSearch::new(params, 1, 10).unwrap();
        let cands = [
            Candidate { beam: 0, token: 5, score: -1.0 },
            Candidate { beam: 0, token: 6, score: -2.0 },
            Candidate { beam: 0, token: 1, score: -3.0 },
            Candidate { beam: 0, token: 7, score: -4.0 },
        ];
        // Token 1 (eos) stopped but ranks 3rd: not finalised; the running beams are 5 and 6.
        let src = b.update(0, &cands, &[false, false, true, false]);
        assert_eq!(src, vec![0, 0]);
        assert!(b.prompts[0].pool.iter().all(|f| !f.done));
        assert_eq!(b.prompts[0].running_tokens, vec![vec![5], vec![6]]);
    }
}
