//! The backend boundary: a *step* runs new tokens of a batch of sequences through the model and
//! returns last-position logits on the host as f32. Everything above (sampling, stopping,
//! streaming, batching) is written once in `generation` and `sampling`.

pub mod cpu;
pub mod neuron;
pub mod select;
#[cfg(feature = "torch")]
pub mod torch;

use crate::error::Result;

/// A handle to one sequence's preallocated KV cache inside a backend.
pub type SlotId = usize;

/// One sequence's part of a step: append `tokens` at positions `start_pos..`.
pub struct SeqInput<'a> {
    pub slot: SlotId,
    pub tokens: &'a [u32],
    pub start_pos: usize,
}

/// What a backend holds, for `gen.memory_stats()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStats {
    pub tp_degree: usize,
    /// Weight bytes of the largest rank (replicated tensors count on every rank).
    pub weight_bytes_per_rank: usize,
    /// KV cache bytes one position of one sequence takes on one rank.
    pub kv_cache_bytes_per_token: usize,
    /// All-reduces run so far (0 with one rank).
    pub all_reduces: u64,
}

pub trait Backend: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// Preallocates a KV cache for `capacity` positions.
    fn allocate(&self, capacity: usize) -> Result<SlotId>;
    fn release(&self, slot: SlotId);
    /// Bytes of KV cache one position of one sequence takes (what the scheduler's budget counts).
    fn cache_bytes_per_position(&self) -> usize;
    /// Bytes of KV cache the backend holds right now, for every slot and arena together.
    fn cache_bytes_reserved(&self) -> usize;
    /// Returns logits (f32, vocab wide) for the last new token of each sequence, or for every new
    /// token when `all_positions`, in input order.
    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>>;
    /// Makes the first `positions` cached positions of slot `dst` a copy of slot `src`'s (beam
    /// search: a beam that continues another beam's history).
    fn copy_slot(&self, src: SlotId, dst: SlotId, positions: usize) -> Result<()> {
        let _ = (src, dst, positions);
        Err(crate::error::Error::invalid(
            "beam search is not available on this backend (it cannot copy a sequence's KV cache); use num_beams=1 or \
             device=\"cpu\"",
        ))
    }
    /// Sequences the backend can hold at once, when it has a fixed number of cache rows (Neuron's
    /// graphs are exported for a largest batch); the scheduler admits no more.
    fn max_sequences(&self) -> Option<usize> {
        None
    }
    /// One rank unless the backend says otherwise.
    fn memory_stats(&self) -> MemoryStats {
        MemoryStats { tp_degree: 1, kv_cache_bytes_per_token: self.cache_bytes_per_position(), ..Default::default() }
    }
    /// Debug hook: starts (clearing the log) or stops (keeping it) recording a digest of every rank's
    /// result of every all-reduce.
    fn record_all_reduces(&self, _on: bool) {}
    /// Debug hook: a persistent device tensor's bytes on every rank (Neuron: a weight, table or
    /// cache by its manifest name).
    fn debug_tensor(&self, name: &str) -> Result<Vec<Vec<u8>>> {
        Err(crate::error::Error::invalid(format!("this backend has no named device tensors (asked for {name:?})")))
    }
    /// The recorded digests, one entry per all-reduce in order, one value per rank; cleared.
    fn take_all_reduce_log(&self) -> Vec<Vec<u64>> {
        Vec::new()
    }
}

/// The backends' backstop against ids beyond the embedding (callers validate first): an error
/// naming the sequence and position instead of an out-of-bounds read.
pub(crate) fn check_token(id: u32, seq: usize, position: usize, vocab_size: usize) -> Result<()> {
    if (id as usize) < vocab_size {
        return Ok(());
    }
    Err(crate::error::Error::TokenOutOfRange { id: id as i64, row: seq, position, vocab_size })
}

/// Releases its slot when dropped, so an error or interrupt never leaks a cache.
pub struct SlotGuard<'a> {
    backend: &'a dyn Backend,
    pub slot: SlotId,
}

impl<'a> SlotGuard<'a> {
    pub fn new(backend: &'a dyn Backend, capacity: usize) -> Result<Self> {
        Ok(SlotGuard { backend, slot: backend.allocate(capacity)? })
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.backend.release(self.slot);
    }
}
