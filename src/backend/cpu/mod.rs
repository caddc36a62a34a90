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
        let mut caches = Vec::with_capacity(seqs.len());
        {
            let mut slots = self.lock();
            for s in seqs {
                let state = slots.get_mut(s.slot).map(|st| std::mem::replace(st, SlotState::InUse));
                match state {
                    Some(SlotState::Idle(c)) => caches.push(c),
                    other => {
                        // Put back what we took before failing.
                        if let Some(st) = other {
                            slots[s.slot] = st;
                        }
                        for (c, prev) in caches.drain(..).zip(seqs) {
                            slots[prev.slot] = SlotState::Idle(c);
                        }
                        return Err(Error::Internal(format!("slot {} is not allocated or already in use", s.slot)));
                    }
                }
            }
        }
        let result = {
            let mut items: Vec<SeqBatchItem> = caches
                .iter_mut()
                .zip(seqs)
                .map(|(cache, s)| SeqBatchItem { cache, tokens: s.tokens, start_pos: s.start_pos })
                .collect();
            self.model.forward(&mut items, all_positions)
        };
        let mut slots = self.lock();
        for (c, s) in caches.into_iter().zip(seqs) {
            if let Some(st) = slots.get_mut(s.slot) {
                if matches!(st, SlotState::InUse) {
                    *st = SlotState::Idle(c);
                }
            }
        }
        result
    }
}
