//! The pure-Rust CPU backend: own kernels (rayon, AVX2/FMA), batch-invariant arithmetic.

pub mod cache;
pub mod kernels;

use std::sync::{Arc, Mutex};

use super::{Backend, SeqInput, SlotId};
use crate::error::{Error, Result};
use crate::model::llama::{LlamaModel, SeqBatchItem};
use cache::KvCache;

pub struct CpuBackend {
    model: Arc<LlamaModel>,
    /// Caches by slot id; a cache is taken out while a step uses it, so steps on different
    /// slots can run concurrently.
    slots: Mutex<Vec<SlotState>>,
}

enum SlotState {
    Free,
    Idle(KvCache),
    InUse,
}

impl CpuBackend {
    pub fn new(model: Arc<LlamaModel>) -> Self {
        CpuBackend { model, slots: Mutex::new(Vec::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SlotState>> {
        // A panic elsewhere cannot leave the slot table inconsistent, so a poisoned lock is usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for CpuBackend {
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    fn allocate(&self, capacity: usize) -> Result<SlotId> {
        // Reserved before taking the lock; a cache that cannot be reserved is OutOfMemory.
        let cache = self.model.new_cache(capacity)?;
        let mut slots = self.lock();
        if let Some(i) = slots.iter().position(|s| matches!(s, SlotState::Free)) {
            slots[i] = SlotState::Idle(cache);
            Ok(i)
        } else {
            slots.push(SlotState::Idle(cache));
            Ok(slots.len() - 1)
        }
    }

    fn release(&self, slot: SlotId) {
        if let Some(s) = self.lock().get_mut(slot) {
            *s = SlotState::Free;
        }
    }

    fn cache_bytes_per_position(&self) -> usize {
        self.model.cache_bytes_per_position()
    }

    fn cache_bytes_reserved(&self) -> usize {
        self.lock()
            .iter()
            .map(|s| match s {
                SlotState::Idle(c) => c.capacity() * self.model.cache_bytes_per_position(),
                _ => 0,
            })
            .sum()
    }

    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        let mut taken = TakenCaches::take(self, seqs)?;
        crate::faults::check(crate::faults::FaultPoint::Step, seqs.iter().flat_map(|s| s.tokens.iter().copied()));
        let mut items: Vec<SeqBatchItem> = taken
            .caches
            .iter_mut()
            .zip(seqs)
            .map(|((_, cache), s)| SeqBatchItem { cache, tokens: s.tokens, start_pos: s.start_pos })
            .collect();
        self.model.forward(&mut items, all_positions)
    }
}

/// The caches a step took out of the slot table; they go back when it ends, also when the step
/// fails or panics, so the slots stay usable (a rerun rewrites the positions the step touched).
struct TakenCaches<'a> {
    backend: &'a CpuBackend,
    caches: Vec<(SlotId, KvCache)>,
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
