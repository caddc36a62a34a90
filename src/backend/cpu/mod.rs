//! The pure-Rust CPU backend: own kernels (AVX2/FMA, AVX-512 tiles), batch-invariant arithmetic,
//! the family forward of `model` run through `ops::CpuOps`, and tensor-parallel ranks (`tp`).

pub mod cache;
pub mod kernels;
pub mod ops;
pub mod tp;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Backend, MemoryStats, SeqInput, SlotId};
use crate::config::ModelConfig;
use crate::error::{catch_panic, Error, Result};
use crate::mem;
use crate::model::host::{Host, HostWeights};
use crate::model::llama::LlamaModel;
use crate::model::ops::RankShape;
use cache::KvCache;
use ops::{Bf16Numerics, CpuOps, CpuWeights, SeqBatchItem};
use tp::{AbortOnExit, ReduceGroup};

pub struct CpuBackend {
    /// One model per tensor-parallel rank, each holding only its shards.
    ranks: Vec<Arc<LlamaModel<Host>>>,
    /// `compute_dtype="bfloat16"`: transformers' bf16 numerics instead of f32 arithmetic.
    bf16: Option<Bf16Numerics>,
    /// With more than one rank: each rank's share of the worker threads.
    pools: Vec<rayon::ThreadPool>,
    weight_bytes_per_rank: usize,
    /// Caches by slot id (one per rank); taken out while a step uses them, so steps on different
    /// slots can run concurrently.
    slots: Mutex<Vec<SlotState>>,
    all_reduces: AtomicU64,
    recording: AtomicBool,
    all_reduce_log: Mutex<Vec<Vec<u64>>>,
}

enum SlotState {
    Free,
    Idle(Vec<KvCache>),
    InUse,
}

impl CpuBackend {
    /// A backend over the ranks' host weights (`model::tp::TpPlan::shard`), in rank order,
    /// computing in f32 or (`bf16_compute`) as transformers' bfloat16 forward.
    pub fn new(cfg: &ModelConfig, shapes: Vec<RankShape>, weights: Vec<HostWeights>, bf16_compute: bool) -> Result<Self> {
        let bf16 = bf16_compute.then(|| Bf16Numerics { norm_weight_in_f32: cfg.gemma.is_some() });
        let n = weights.len();
        let weight_bytes_per_rank = weights.iter().map(HostWeights::byte_len).max().unwrap_or(0);
        let mut ranks = Vec::with_capacity(n);
        for (shape, w) in shapes.into_iter().zip(weights) {
            ranks.push(Arc::new(LlamaModel::new(cfg.clone(), shape, w.build(&mut CpuWeights)?)));
        }
        let pools = if n > 1 { rank_pools(n)? } else { Vec::new() };
        Ok(CpuBackend {
            ranks,
            bf16,
            pools,
            weight_bytes_per_rank,
            slots: Mutex::new(Vec::new()),
            all_reduces: AtomicU64::new(0),
            recording: AtomicBool::new(false),
            all_reduce_log: Mutex::new(Vec::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SlotState>> {
        // A panic elsewhere cannot leave the slot table inconsistent, so a poisoned lock is usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rank_cache_bytes_per_position(&self) -> usize {
        self.ranks.first().map_or(0, |m| m.cache_bytes_per_position(std::mem::size_of::<f32>()))
    }

    /// The ranks' forwards, concurrently, each on its own pool; logits concatenated per row in
    /// rank order (each rank produced its vocabulary rows).
    fn step_ranks(&self, caches: &mut [(SlotId, Vec<KvCache>)], seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        let n = self.ranks.len();
        let group = ReduceGroup::new(n, self.recording.load(Ordering::Relaxed));
        let mut per_rank: Vec<Vec<SeqBatchItem>> = (0..n).map(|_| Vec::with_capacity(seqs.len())).collect();
        for ((_, rank_caches), s) in caches.iter_mut().zip(seqs) {
            for (items, cache) in per_rank.iter_mut().zip(rank_caches.iter_mut()) {
                items.push(SeqBatchItem { cache, tokens: s.tokens, start_pos: s.start_pos });
            }
        }
        let run = |r: usize, mut items: Vec<SeqBatchItem>| -> Result<Vec<f32>> {
            let mut guard = AbortOnExit { group: &group, rank: r, finished: false };
            let out = self.pools[r].install(|| {
                catch_panic("a tensor-parallel rank", || forward_rank(&self.ranks[r], &mut items, all_positions, Some(&group), r, self.bf16))
            });
            guard.finished = out.is_ok();
            out
        };
        let mut results: Vec<Result<Vec<f32>>> = std::thread::scope(|s| {
            let mut items = per_rank.into_iter();
            let first = items.next().unwrap_or_default();
            let handles: Vec<_> = items.enumerate().map(|(i, it)| s.spawn(move || run(i + 1, it))).collect();
            let mut out = vec![run(0, first)];
            for h in handles {
                out.push(h.join().unwrap_or_else(|p| Err(Error::Internal(crate::error::panic_message(p.as_ref())))));
            }
            out
        });
        self.all_reduces.fetch_add(group.count.load(Ordering::Relaxed) as u64, Ordering::Relaxed);
        if self.recording.load(Ordering::Relaxed) {
            self.all_reduce_log.lock().unwrap_or_else(|p| p.into_inner()).extend(group.take_digests());
        }
        // The error of the rank that failed first, not of one that only saw the group abort.
        if let Some(i) = group.first_failed().or_else(|| results.iter().position(|r| r.is_err())) {
            if let Some(Err(e)) = (i < results.len()).then(|| results.swap_remove(i)) {
                return Err(e);
            }
        }
        let parts: Vec<Vec<f32>> = results.into_iter().collect::<Result<_>>()?;
        let widths: Vec<usize> = self.ranks.iter().map(|m| m.shape.vocab.len()).collect();
        let rows = parts[0].len().checked_div(widths[0]).unwrap_or(0);
        let vocab: usize = widths.iter().sum();
        let mut logits: Vec<f32> = mem::try_with_capacity(rows * vocab)
            .map_err(|e| e.into_error("the step's logits", "lower the batch size"))?;
        for row in 0..rows {
            for (p, &w) in parts.iter().zip(&widths) {
                logits.extend_from_slice(&p[row * w..(row + 1) * w]);
            }
        }
        Ok(logits)
    }
}

/// One rank's forward over its caches; `group` joins it to the other ranks of the step.
fn forward_rank(
    model: &LlamaModel<Host>,
    items: &mut [SeqBatchItem],
    all_positions: bool,
    group: Option<&ReduceGroup>,
    rank: usize,
    bf16: Option<Bf16Numerics>,
) -> Result<Vec<f32>> {
    let mut ops = CpuOps::new(items, all_positions, group.map(|g| g.link(rank)), bf16)?;
    if ops.tokens() == 0 {
        return Ok(Vec::new());
    }
    let logits = model.forward(&mut ops)?;
    ops.finish();
    Ok(logits.into_vec())
}

/// Splits the worker threads evenly between the ranks (at least one each).
fn rank_pools(n: usize) -> Result<Vec<rayon::ThreadPool>> {
    let per_rank = (rayon::current_num_threads() / n).max(1);
    (0..n)
        .map(|r| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(per_rank)
                .thread_name(move |i| format!("kvgen-rank{r}-{i}"))
                .start_handler(|_| kernels::mark_rank_pool_thread())
                .build()
                .map_err(|e| Error::Internal(format!("cannot start the threads of tensor-parallel rank {r}: {e}")))
        })
        .collect()
}

impl Backend for CpuBackend {
    fn vocab_size(&self) -> usize {
        self.ranks.iter().map(|m| m.shape.vocab.len()).sum()
    }

    fn allocate(&self, capacity: usize) -> Result<SlotId> {
        // Reserved before taking the lock; a cache that cannot be reserved is OutOfMemory.
        let caches = self
            .ranks
            .iter()
            .map(|m| KvCache::new(m.cfg.num_hidden_layers, m.shape.kv_heads, m.cfg.head_dim, capacity))
            .collect::<Result<Vec<_>>>()?;
        let mut slots = self.lock();
        if let Some(i) = slots.iter().position(|s| matches!(s, SlotState::Free)) {
            slots[i] = SlotState::Idle(caches);
            Ok(i)
        } else {
            slots.push(SlotState::Idle(caches));
            Ok(slots.len() - 1)
        }
    }

    fn release(&self, slot: SlotId) {
        if let Some(s) = self.lock().get_mut(slot) {
            *s = SlotState::Free;
        }
    }

    fn copy_slot(&self, src: SlotId, dst: SlotId, positions: usize) -> Result<()> {
        let mut slots = self.lock();
        let taken = slots.get_mut(dst).map(|st| std::mem::replace(st, SlotState::InUse));
        let result = match (taken, slots.get(src)) {
            (Some(SlotState::Idle(mut to)), Some(SlotState::Idle(from))) if src != dst => {
                let r = to.iter_mut().zip(from).try_for_each(|(t, f)| t.copy_prefix_from(f, positions));
                slots[dst] = SlotState::Idle(to);
                r
            }
            (taken, _) => {
                if let Some(st) = taken {
                    slots[dst] = st;
                }
                Err(crate::error::Error::Internal(format!("copy_slot {src} -> {dst}: a slot is not idle")))
            }
        };
        result
    }

    fn cache_bytes_per_position(&self) -> usize {
        self.rank_cache_bytes_per_position() * self.ranks.len()
    }

    fn cache_bytes_reserved(&self) -> usize {
        self.lock()
            .iter()
            .map(|s| match s {
                SlotState::Idle(c) => c.iter().map(|c| c.capacity()).sum::<usize>() * self.rank_cache_bytes_per_position(),
                _ => 0,
            })
            .sum()
    }

    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        let mut taken = TakenCaches::take(self, seqs)?;
        crate::faults::check(crate::faults::FaultPoint::Step, seqs.iter().flat_map(|s| s.tokens.iter().copied()));
        if self.ranks.len() > 1 {
            return self.step_ranks(&mut taken.caches, seqs, all_positions);
        }
        let mut items: Vec<SeqBatchItem> = taken
            .caches
            .iter_mut()
            .zip(seqs)
            .filter_map(|((_, caches), s)| caches.first_mut().map(|cache| SeqBatchItem { cache, tokens: s.tokens, start_pos: s.start_pos }))
            .collect();
        let model = self.ranks.first().ok_or_else(|| Error::Internal("a CPU backend without ranks".into()))?;
        forward_rank(model, &mut items, all_positions, None, 0, self.bf16)
    }

    fn memory_stats(&self) -> MemoryStats {
        MemoryStats {
            tp_degree: self.ranks.len(),
            weight_bytes_per_rank: self.weight_bytes_per_rank,
            kv_cache_bytes_per_token: self.rank_cache_bytes_per_position(),
            all_reduces: self.all_reduces.load(Ordering::Relaxed),
        }
    }

    fn record_all_reduces(&self, on: bool) {
        if on {
            self.all_reduce_log.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
        self.recording.store(on, Ordering::Relaxed);
    }

    fn take_all_reduce_log(&self) -> Vec<Vec<u64>> {
        std::mem::take(&mut *self.all_reduce_log.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The caches a step took out of the slot table; they go back when it ends, also when the step
/// fails or panics, so the slots stay usable (a rerun rewrites the positions the step touched).
struct TakenCaches<'a> {
    backend: &'a CpuBackend,
    caches: Vec<(SlotId, Vec<KvCache>)>,
}

impl<'a> TakenCaches<'a> {
    fn take(backend: &'a CpuBackend, seqs: &[SeqInput]) -> Result<Self> {
        let mut taken = TakenCaches { backend, caches: Vec::with_capacity(seqs.len()) };
        let mut slots = backend.lock();
        for s in seqs {
            let state = slots.get_mut(s.slot).map(|st| std::mem::replace(st, SlotState::InUse));
            match state {
                Some(SlotState::Idle(c)) => taken.caches.push((s.slot, c)),
                other => {
                    if let Some(st) = other {
                        slots[s.slot] = st;
                    }
                    drop(slots);
                    return Err(Error::Internal(format!("slot {} is not allocated or already in use", s.slot)));
                }
            }
        }
        Ok(taken)
    }
}

impl Drop for TakenCaches<'_> {
    fn drop(&mut self) {
        let mut slots = self.backend.lock();
        for (slot, cache) in self.caches.drain(..) {
            // A slot released while its step ran stays free (its cache is dropped).
            if let Some(st @ SlotState::InUse) = slots.get_mut(slot) {
                *st = SlotState::Idle(cache);
            }
        }
    }
}
