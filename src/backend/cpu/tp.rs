//! Tensor-parallel ranks on the CPU: each rank runs the family forward on its own shards, on its
//! own thread pool (its share of the worker threads), and the ranks of a step meet at the
//! forward's all-reduces.
//!
//! The all-reduce sums the ranks' partials in rank order (((r0 + r1) + r2) + ...) in f32 on every
//! rank, so all ranks hold the same bits afterwards and the result never depends on which rank
//! arrived first. Each rank publishes its partial in a slot, waits at a barrier, then reads every
//! slot; slots alternate between two sets, so a rank may publish the next partial while a slower
//! one still reads the last (a slot is rewritten only two all-reduces later, after a barrier that
//! the reader must have passed).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// One step's meeting point for `ranks` ranks.
pub struct ReduceGroup {
    ranks: usize,
    /// Two sets of one slot per rank.
    slots: Vec<RwLock<Vec<f32>>>,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    aborted: AtomicBool,
    /// The rank that failed first (usize::MAX: none); its error is the step's.
    first_failed: AtomicUsize,
    /// All-reduces completed (counted by rank 0).
    pub count: AtomicUsize,
    /// Per all-reduce, a digest of each rank's result (the debug hook), when recording.
    digests: Option<Mutex<Vec<Vec<u64>>>>,
}

impl ReduceGroup {
    pub fn new(ranks: usize, record: bool) -> ReduceGroup {
        ReduceGroup {
            ranks,
            slots: (0..2 * ranks).map(|_| RwLock::new(Vec::new())).collect(),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            first_failed: AtomicUsize::new(usize::MAX),
            count: AtomicUsize::new(0),
            digests: record.then(|| Mutex::new(Vec::new())),
        }
    }

    pub fn link(&self, rank: usize) -> RankLink<'_> {
        RankLink { group: self, rank, next: 0 }
    }

    /// Wakes every rank waiting at the barrier with an error: a rank failed and will not arrive.
    pub fn abort(&self, rank: usize) {
        let _ = self.first_failed.compare_exchange(usize::MAX, rank, Ordering::SeqCst, Ordering::SeqCst);
        self.aborted.store(true, Ordering::SeqCst);
    }

    /// The rank whose failure aborted the step, if any.
    pub fn first_failed(&self) -> Option<usize> {
        Some(self.first_failed.load(Ordering::SeqCst)).filter(|&r| r != usize::MAX)
    }

    pub fn take_digests(&self) -> Vec<Vec<u64>> {
        self.digests.as_ref().map(|d| std::mem::take(&mut *d.lock().unwrap_or_else(|p| p.into_inner()))).unwrap_or_default()
    }

    /// All ranks arrive before any leaves. Spins first (ranks of one step arrive within
    /// microseconds of each other), then yields, then sleeps briefly, checking for an abort.
    fn wait(&self) -> Result<()> {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.ranks {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return Ok(());
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if self.aborted.load(Ordering::Relaxed) {
                return Err(Error::Internal("another tensor-parallel rank of this step failed".into()));
            }
            spins = spins.wrapping_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else if start.elapsed() < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn slot(&self, set: usize, rank: usize) -> &RwLock<Vec<f32>> {
        &self.slots[set * self.ranks + rank]
    }
}

/// One rank's end of a [`ReduceGroup`].
pub struct RankLink<'g> {
    group: &'g ReduceGroup,
    rank: usize,
    next: usize,
}

impl RankLink<'_> {
    /// x = sum over ranks of each rank's x, in rank order, on every rank.
    pub fn all_reduce(&mut self, x: &mut [f32]) -> Result<()> {
        let g = self.group;
        let (set, index) = (self.next % 2, self.next);
        self.next += 1;
        {
            let mut mine = g.slot(set, self.rank).write().unwrap_or_else(|p| p.into_inner());
            mine.clear();
            mine.extend_from_slice(x);
        }
        g.wait()?;
        for r in 0..g.ranks {
            let part = g.slot(set, r).read().unwrap_or_else(|p| p.into_inner());
            if part.len() != x.len() {
                return Err(Error::Internal(format!(
                    "tensor-parallel rank {r} sent {} values to an all-reduce of {}",
                    part.len(),
                    x.len()
                )));
            }
            if r == 0 {
                x.copy_from_slice(&part);
            } else {
                x.iter_mut().zip(part.iter()).for_each(|(a, b)| *a += b);
            }
        }
        if self.rank == 0 {
            g.count.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(d) = &g.digests {
            let mut log = d.lock().unwrap_or_else(|p| p.into_inner());
            if log.len() <= index {
                log.resize_with(index + 1, || vec![0; g.ranks]);
            }
            log[index][self.rank] = digest(x);
        }
        Ok(())
    }
}

/// FNV-1a over the values' bits: equal digests mean (all but certainly) equal bits.
fn digest(x: &[f32]) -> u64 {
    x.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        v.to_bits().to_le_bytes().iter().fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    })
}

/// Aborts the group when a rank leaves its forward without finishing (an error or a panic), so
/// the other ranks stop waiting for it.
pub struct AbortOnExit<'g> {
    pub group: &'g ReduceGroup,
    pub rank: usize,
    pub finished: bool,
}

impl Drop for AbortOnExit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.group.abort(self.rank);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_the_same_bits_summed_in_rank_order() {
        for ranks in [2usize, 3, 4] {
            let group = ReduceGroup::new(ranks, true);
            let parts: Vec<Vec<f32>> =
                (0..ranks).map(|r| (0..37).map(|i| ((i * 7 + r * 13) as f32).sin() * 1e3f32.powi(r as i32 % 2)).collect()).collect();
            let mut results: Vec<Vec<f32>> = parts.clone();
            std::thread::scope(|s| {
                for (r, x) in results.iter_mut().enumerate() {
                    let g = &group;
                    s.spawn(move || {
                        let mut link = g.link(r);
                        for _ in 0..5 {
                            link.all_reduce(x).unwrap();
                            x.iter_mut().for_each(|v| *v *= 0.5);
                        }
                    });
                }
            });
            // Reference: the same five rounds, sequentially, in rank order.
            let mut state = parts.clone();
            for _ in 0..5 {
                let mut sum = state[0].clone();
                for p in &state[1..] {
                    sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
                sum.iter_mut().for_each(|v| *v *= 0.5);
                state = vec![sum; ranks];
            }
            let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for r in &results {
                assert_eq!(bits(r), bits(&state[0]));
            }
            assert_eq!(group.count.load(Ordering::Relaxed), 5);
            let d = group.take_digests();
            assert_eq!(d.len(), 5);
            assert!(d.iter().all(|e| e.iter().all(|&x| x == e[0])));
        }
    }

    #[test]
    fn an_aborted_group_releases_waiting_ranks() {
        let group = ReduceGroup::new(2, false);
        std::thread::scope(|s| {
            let g = &group;
            let waiter = s.spawn(move || g.link(0).all_reduce(&mut [1.0]));
            std::thread::sleep(Duration::from_millis(20));
            drop(AbortOnExit { group: g, rank: 1, finished: false });
            assert_eq!(g.first_failed(), Some(1));
            assert!(waiter.join().unwrap().is_err());
        });
    }
}
