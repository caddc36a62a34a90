//! User hooks: logits processors and stopping criteria supplied by the caller (Python's
//! `logits_processor=`, `stopping_criteria=`, `prefix_allowed_tokens_fn=`). They run once per step
//! for the whole request, in transformers' merged order: after kvgen's built-in processors (a user
//! processor of a built-in's transformers class takes that one's place) and before the sampling
//! warpers; the criteria after the built-in eos and stop-string checks. The implementation that
//! calls into Python lives in src/python/hooks.rs; nothing here knows Python.

use std::fmt;
use std::sync::Arc;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::sampling::processors::{apply, Built, LogitsProcessor, RowContext};

/// Processors that run in order on each row.
type RowProcessors = Vec<Box<dyn LogitsProcessor>>;

/// What a caller plugs into a request. Both calls get transformers' `input_ids` rows (padded
/// prompt as given, then the generated tokens; all rows equally long) of the whole request.
pub trait UserHooks: Send + Sync {
    /// Runs processor group `group` (see `HookSet::groups_at`) over `scores`, rows x vocab.
    fn process(&self, group: usize, rows: &[Vec<u32>], scores: &mut [f32]) -> Result<()>;
    /// Per row, whether a user criterion says stop; `scores` are the step's processed scores.
    /// `prompt_of[i]` is the request row whose prompt `rows[i]` continues (beam search checks
    /// more candidate continuations than it has rows).
    fn stop(&self, rows: &[Vec<u32>], prompt_of: &[usize], scores: &[f32]) -> Result<Vec<bool>>;
}

/// A request's hooks and where they go among the built-in processors (`Built::pre`).
#[derive(Clone)]
pub struct HookSet {
    pub hooks: Arc<dyn UserHooks>,
    /// Built-in pre-warper processors a user processor of the same class replaces (indices into `pre`).
    pub replaced: Vec<usize>,
    /// Processor group g runs just before `pre[groups_at[g]]` (`pre.len()`: after all of them);
    /// increasing. Usually one group at the end: one call per step.
    pub groups_at: Vec<usize>,
    /// Whether `stop` has anything to call.
    pub has_criteria: bool,
}

impl fmt::Debug for HookSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookSet")
            .field("replaced", &self.replaced)
            .field("groups_at", &self.groups_at)
            .field("has_criteria", &self.has_criteria)
            .finish_non_exhaustive()
    }
}

/// The hooked part of a request's step: the built-in processors that run before the last user
/// group (batch-wide, because the groups between them are), and the groups.
pub struct Hooked {
    set: HookSet,
    /// `segments[g]` runs before group g.
    segments: Vec<RowProcessors>,
}

/// Splits a request's processors: without hooks everything runs per row as before; with hooks the
/// returned per-row list holds what follows the last user group (the tail of `pre`, then the
/// warpers) and `Hooked` the rest.
pub fn arrange(built: Built, hooks: Option<HookSet>) -> Result<(RowProcessors, Option<Hooked>)> {
    let Built { pre, warpers } = built;
    let Some(set) = hooks else {
        return Ok((pre.into_iter().map(|(_, p)| p).chain(warpers).collect(), None));
    };
    let n = pre.len();
    let sorted = set.groups_at.windows(2).all(|w| w[0] < w[1]);
    if !sorted || set.groups_at.last().is_some_and(|&a| a > n) || set.replaced.iter().any(|&i| i >= n) {
        return Err(Error::Internal(format!("hook plan {set:?} does not fit {n} built-in processors")));
    }
    let mut segments: Vec<RowProcessors> = (0..=set.groups_at.len()).map(|_| Vec::new()).collect();
    for (i, (_, p)) in pre.into_iter().enumerate() {
        if set.replaced.contains(&i) {
            continue;
        }
        // The number of groups that run before processor i is the segment it belongs to.
        let seg = set.groups_at.iter().take_while(|&&at| at <= i).count();
        segments[seg].push(p);
    }
    let mut per_row = segments.pop().unwrap_or_default();
    per_row.extend(warpers);
    Ok((per_row, Some(Hooked { set, segments })))
}

impl Hooked {
    /// The built-in processors and user groups up to the last group, over every row of `scores`.
    pub fn process(&self, rows: &[Vec<u32>], ignore_prefix: &[usize], scores: &mut [f32], vocab: usize) -> Result<()> {
        for (group, segment) in self.segments.iter().enumerate() {
            if !segment.is_empty() {
                scores.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
                    let ctx = RowContext { input_ids: &rows[r], ignore_prefix: ignore_prefix[r] };
                    apply(segment, &ctx, row);
                });
            }
            self.set.hooks.process(group, rows, scores)?;
        }
        Ok(())
    }

    /// Ends the rows a user criterion stops (after the built-in checks, as transformers ORs them).
    pub fn stop(&self, rows: &[Vec<u32>], prompt_of: Option<&[usize]>, scores: &[f32], unfinished: &mut [bool]) -> Result<()> {
        if !self.set.has_criteria {
            return Ok(());
        }
        let identity: Vec<usize>;
        let prompt_of = match prompt_of {
            Some(p) => p,
            None => {
                identity = (0..rows.len()).collect();
                &identity
            }
        };
        let stops = self.set.hooks.stop(rows, prompt_of, scores)?;
        if stops.len() != unfinished.len() {
            return Err(Error::Internal(format!("stopping criteria gave {} flags for {} rows", stops.len(), unfinished.len())));
        }
        unfinished.iter_mut().zip(stops).for_each(|(u, s)| *u &= !s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Adds `10 * (group + 1)` to column 0 and records each call.
    struct Recorder(Mutex<Vec<String>>);

    impl UserHooks for Recorder {
        fn process(&self, group: usize, _: &[Vec<u32>], scores: &mut [f32]) -> Result<()> {
            self.0.lock().unwrap().push(format!("g{group}:{}", scores[0]));
            scores[0] += 10.0 * (group + 1) as f32;
            Ok(())
        }
        fn stop(&self, rows: &[Vec<u32>], _: &[usize], _: &[f32]) -> Result<Vec<bool>> {
            Ok(rows.iter().map(|r| r.last() == Some(&7)).collect())
        }
    }

    /// Multiplies column 0 by a factor (order-sensitive with the additions above).
    struct Times(f32);
    impl LogitsProcessor for Times {
        fn process(&self, _: &RowContext, scores: &mut [f32]) {
            scores[0] *= self.0;
        }
    }

    fn built() -> Built {
        Built {
            pre: vec![("A", Box::new(Times(2.0)) as Box<dyn LogitsProcessor>), ("B", Box::new(Times(3.0)))],
            warpers: vec![Box::new(Times(5.0))],
        }
    }

    #[test]
    fn groups_run_in_their_places_and_replaced_builtins_do_not() {
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        // Order: [group 0 in place of A], B, group 1, warpers.
        let set = HookSet { hooks: rec.clone(), replaced: vec![0], groups_at: vec![1, 2], has_criteria: true };
        let (per_row, hooked) = arrange(built(), Some(set)).unwrap();
        let hooked = hooked.unwrap();
        let rows = vec![vec![1u32, 7]];
        let mut scores = vec![1.0f32, 0.0];
        hooked.process(&rows, &[0], &mut scores, 2).unwrap();
        apply(&per_row, &RowContext { input_ids: &rows[0], ignore_prefix: 0 }, &mut scores);
        // ((1 + 10) * 3 + 20) * 5
        assert_eq!(scores[0], 265.0);
        assert_eq!(*rec.0.lock().unwrap(), vec!["g0:1", "g1:33"]);
        let mut unfinished = vec![true];
        hooked.stop(&rows, None, &scores, &mut unfinished).unwrap();
        assert_eq!(unfinished, vec![false]);
    }

    #[test]
    fn without_hooks_everything_runs_per_row_and_bad_plans_are_refused() {
        let (per_row, hooked) = arrange(built(), None).unwrap();
        assert!(hooked.is_none());
        assert_eq!(per_row.len(), 3);
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        let bad = HookSet { hooks: rec, replaced: vec![], groups_at: vec![3], has_criteria: false };
        assert!(matches!(arrange(built(), Some(bad)), Err(Error::Internal(_))));
    }
}
