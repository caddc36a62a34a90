//! KV caches on the device, in capacity buckets.
//!
//! A slot's capacity is rounded up to a bucket, `MIN_BUCKET << k` positions. A bucket in use holds,
//! per layer, one key and one value tensor [rows, kv heads, bucket capacity, head dim] (a head's
//! positions contiguous, as attention reads them) with about as many rows as it has live slots:
//! - it grows (a reallocation that keeps every row where it is) when a slot finds no free row,
//!   with a little slack so that admitting requests one by one does not reallocate each time;
//! - when mostly empty, or when its spare rows hold more than `SLACK_BYTES`, its live rows are
//!   moved down in place (order kept, so consecutive rows stay consecutive) and the tail is cut;
//! - when its last slot goes, its tensors are freed.
//!
//! So a long request holds one row of its own capacity, and nothing once it ends, while short
//! ones keep running in their small bucket.
//!
//! Slots (what the scheduler holds) stay stable while rows move: `slots` maps each to its
//! (bucket, row). A step's sequences in one bucket read their caches as one view when their rows
//! are consecutive (see `plan::Grouping`); a step spanning buckets runs attention per bucket.
//!
//! Replacing a bucket's tensors gives it a new stamp, unique over the arena's life: a recorded CUDA
//! graph addresses the tensors it was recorded against and is kept only while the stamps of the
//! buckets it touches are unchanged, so other buckets' graphs survive.
//!
//! libtorch cannot shrink a tensor in place: giving rows back copies the kept rows into a smaller
//! tensor, one layer at a time so that the peak is the bucket plus one layer's new tensor.

use tch::{Device, Kind, Tensor};

use crate::backend::SlotId;
use crate::error::{Error, Result};

/// The smallest bucket, in positions: capacities are rounded up to `MIN_BUCKET << k`.
pub const MIN_BUCKET: usize = 256;

/// Spare rows a bucket may keep beyond its live ones, in bytes (and at most a quarter as many as
/// it has live rows): cheap growth for small buckets, no idle row of a large one.
const SLACK_BYTES: usize = 256 << 20;

/// Where a slot's cache lives, and the capacity it was asked for.
#[derive(Clone, Copy, Debug)]
pub struct Loc {
    pub bucket: usize,
    pub row: usize,
    pub capacity: usize,
}

/// Shape and placement shared by every bucket's tensors.
#[derive(Clone, Copy)]
struct Geometry {
    n_layers: usize,
    kv_heads: i64,
    head_dim: i64,
    kind: Kind,
    device: Device,
}

impl Geometry {
    fn alloc(&self, rows: usize, cap: usize) -> Result<Tensor> {
        let shape = [rows as i64, self.kv_heads, cap as i64, self.head_dim];
        let bytes = self.row_bytes(cap).saturating_mul(rows) / (2 * self.n_layers).max(1);
        Tensor::f_empty(shape, (self.kind, self.device)).map_err(|e| alloc_error(e, bytes))
    }

    /// Keys and values of every layer for one row of `cap` positions.
    fn row_bytes(&self, cap: usize) -> usize {
        let per_pos = 2 * self.n_layers * (self.kv_heads * self.head_dim) as usize * self.kind.elt_size_in_bytes();
        per_pos.saturating_mul(cap)
    }
}

struct Bucket {
    /// Per layer, keys and values; each holds at least `rows.len()` rows (more after a cut that
    /// failed part way).
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The slot owning each row; None = free.
    rows: Vec<Option<SlotId>>,
    live: usize,
    stamp: u64,
}

impl Bucket {
    fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.k.iter_mut().chain(self.v.iter_mut())
    }

    /// Reallocates every layer with `rows` rows, keeping the existing rows in place. On failure
    /// the layers already replaced keep their new size: every layer still holds `self.rows`.
    fn grow(&mut self, geo: &Geometry, cap: usize, rows: usize) -> Result<()> {
        for store in [&mut self.k, &mut self.v] {
            if store.is_empty() {
                for _ in 0..geo.n_layers {
                    store.push(geo.alloc(rows, cap)?);
                }
                continue;
            }
            for t in store.iter_mut() {
                let held = t.size()[0];
                if held >= rows as i64 {
                    continue;
                }
                let new = geo.alloc(rows, cap)?;
                // Rows beyond the copied ones are zeroed when handed out (`clear_row`).
                new.f_narrow(0, 0, held).and_then(|mut head| head.f_copy_(t)).map_err(super::tch_err)?;
                *t = new;
            }
        }
        Ok(())
    }

    /// Zeroes a row before a slot gets it: attention reads a whole span, and a masked position
    /// still reaches the output as 0 x value, so stale NaN/Inf from an earlier owner (or
    /// uninitialised memory) must not stay there.
    fn clear_row(&mut self, row: usize) -> Result<()> {
        for t in self.tensors_mut() {
            let _ = t.f_narrow(0, row as i64, 1).and_then(|mut r| r.f_zero_()).map_err(super::tch_err)?;
        }
        Ok(())
    }

    /// Copies row `src` over row `dst` in every layer (no allocation).
    fn move_row(&mut self, src: usize, dst: usize) -> Result<()> {
        for t in self.tensors_mut() {
            let from = t.f_narrow(0, src as i64, 1).map_err(super::tch_err)?;
            t.f_narrow(0, dst as i64, 1).and_then(|mut to| to.f_copy_(&from)).map_err(super::tch_err)?;
        }
        Ok(())
    }

    /// Replaces each layer holding more than `rows` rows by a copy of its first `rows`; a layer
    /// whose copy cannot be allocated keeps its tensor (still valid, only larger).
    fn cut(&mut self, geo: &Geometry, cap: usize, rows: usize) {
        for t in self.tensors_mut() {
            if t.size()[0] <= rows as i64 {
                continue;
            }
            let copied = geo.alloc(rows, cap).and_then(|mut new| {
                t.f_narrow(0, 0, rows as i64).and_then(|head| new.f_copy_(&head)).map_err(super::tch_err)?;
                Ok(new)
            });
            if let Ok(new) = copied {
                *t = new;
            }
        }
    }
}

pub struct KvArena {
    geo: Geometry,
    /// Indexed by bucket: bucket `i` has `MIN_BUCKET << i` positions per row.
    buckets: Vec<Option<Bucket>>,
    slots: Vec<Option<Loc>>,
    /// The next bucket stamp (never reused, so a graph of a freed bucket never matches a new one).
    next_stamp: u64,
}

impl KvArena {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize, kind: Kind, device: Device) -> Self {
        KvArena {
            geo: Geometry { n_layers, kv_heads: kv_heads as i64, head_dim: head_dim as i64, kind, device },
            buckets: Vec::new(),
            slots: Vec::new(),
            next_stamp: 1,
        }
    }

    /// Positions per row of bucket `bucket`.
    pub fn bucket_capacity(bucket: usize) -> usize {
        MIN_BUCKET << bucket
    }

    /// Keys and values of every layer for one position of one row.
    pub fn bytes_per_position(&self) -> usize {
        self.geo.row_bytes(1)
    }

    /// Device memory the arena's tensors hold now (what libtorch's allocator keeps cached
    /// beyond that is not counted).
    pub fn bytes_reserved(&self) -> usize {
        let elt = self.geo.kind.elt_size_in_bytes();
        self.buckets.iter().flatten().flat_map(|b| b.k.iter().chain(&b.v)).map(|t| t.numel() * elt).sum()
    }

    pub fn locate(&self, slot: SlotId) -> Option<Loc> {
        self.slots.get(slot).copied().flatten()
    }

    /// The bucket's current stamp; None when it holds no tensors.
    pub fn stamp(&self, bucket: usize) -> Option<u64> {
        self.buckets.get(bucket).and_then(Option::as_ref).map(|b| b.stamp)
    }

    /// Keys and values of `layer` in `bucket`, for writing new positions and reading the caches.
    pub fn layer_mut(&mut self, bucket: usize, layer: usize) -> Result<(&mut Tensor, &mut Tensor)> {
        let b = self.buckets.get_mut(bucket).and_then(Option::as_mut);
        match b.and_then(|b| b.k.get_mut(layer).zip(b.v.get_mut(layer))) {
            Some(kv) => Ok(kv),
            None => Err(Error::Internal(format!("KV bucket {bucket} layer {layer} is not allocated"))),
        }
    }

    fn fresh_stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// A slot able to hold `capacity` positions, in the bucket of that capacity: a free row of
    /// it, or a new row (the bucket grows; done at admission, before the slot's steps).
    pub fn allocate(&mut self, capacity: usize) -> Result<SlotId> {
        let b = bucket_index(capacity).ok_or_else(|| {
            Error::out_of_memory(format!("a KV cache of {capacity} positions cannot be allocated; ask for fewer new tokens"))
        })?;
        let cap = Self::bucket_capacity(b);
        let row_bytes = self.geo.row_bytes(cap);
        if self.buckets.len() <= b {
            self.buckets.resize_with(b + 1, || None);
        }
        let stamp = self.fresh_stamp();
        let geo = self.geo;
        let bucket = self.buckets[b].get_or_insert_with(|| Bucket { k: vec![], v: vec![], rows: vec![], live: 0, stamp });
        let row = match bucket.rows.iter().position(Option::is_none) {
            Some(r) => r,
            None => {
                let (held, rows) = (bucket.rows.len(), rows_for(bucket.rows.len() + 1, row_bytes));
                // Any replaced tensor invalidates the graphs recorded on this bucket, even if
                // growing fails part way.
                bucket.stamp = stamp;
                if let Err(e) = bucket.grow(&geo, cap, rows) {
                    if bucket.live == 0 {
                        self.buckets[b] = None;
                    }
                    return Err(e);
                }
                bucket.rows.resize(rows, None);
                held
            }
        };
        if let Err(e) = bucket.clear_row(row) {
            if bucket.live == 0 {
                self.buckets[b] = None;
            }
            return Err(e);
        }
        let slot = self.slots.iter().position(Option::is_none).unwrap_or(self.slots.len());
        bucket.rows[row] = Some(slot);
        bucket.live += 1;
        let loc = Some(Loc { bucket: b, row, capacity });
        match self.slots.get_mut(slot) {
            Some(s) => *s = loc,
            None => self.slots.push(loc),
        }
        Ok(slot)
    }

    /// Frees a slot's row and gives memory back: the whole bucket when it was its last slot,
    /// else spare rows when `should_shrink` says so. Best effort: a copy that cannot be made
    /// leaves the memory held until a later release.
    /// Beam search: the first `positions` positions of `dst`'s row become a copy of `src`'s, in
    /// every layer (the rows may sit in buckets of different capacities). No allocation.
    pub fn copy_prefix(&mut self, src: SlotId, dst: SlotId, positions: usize) -> Result<()> {
        let (Some(from), Some(to)) = (self.locate(src), self.locate(dst)) else {
            return Err(Error::Internal(format!("copy_prefix {src} -> {dst}: a slot is not allocated")));
        };
        if positions > from.capacity.min(to.capacity) {
            return Err(Error::Internal(format!("copy_prefix of {positions} positions between rows of {} and {}", from.capacity, to.capacity)));
        }
        for layer in 0..self.geo.n_layers {
            let (sk, sv) = self.layer_mut(from.bucket, layer).map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))?;
            let (dk, dv) = self.layer_mut(to.bucket, layer).map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))?;
            for (s, d) in [(sk, dk), (sv, dv)] {
                let part = |t: &Tensor, row: usize| t.f_narrow(0, row as i64, 1).and_then(|r| r.f_narrow(2, 0, positions as i64));
                let from_part = part(&s, from.row).map_err(super::tch_err)?;
                part(&d, to.row).and_then(|mut t| t.f_copy_(&from_part)).map_err(super::tch_err)?;
            }
        }
        Ok(())
    }

    pub fn release(&mut self, slot: SlotId) {
        let Some(loc) = self.slots.get_mut(slot).and_then(Option::take) else { return };
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        let Some(bucket) = self.buckets.get_mut(loc.bucket).and_then(Option::as_mut) else { return };
        if let Some(r) = bucket.rows.get_mut(loc.row) {
            *r = None;
        }
        bucket.live = bucket.live.saturating_sub(1);
        if bucket.live == 0 {
            self.buckets[loc.bucket] = None;
            while self.buckets.last().is_some_and(Option::is_none) {
                self.buckets.pop();
            }
            return;
        }
        let row_bytes = self.geo.row_bytes(Self::bucket_capacity(loc.bucket));
        if should_shrink(bucket.rows.len(), bucket.live, row_bytes) {
            self.shrink(loc.bucket);
        }
    }

    /// Moves the bucket's live rows down in place (in order) and cuts off the free tail.
    fn shrink(&mut self, b: usize) {
        let stamp = self.fresh_stamp();
        let (geo, cap) = (self.geo, Self::bucket_capacity(b));
        let Some(bucket) = self.buckets.get_mut(b).and_then(Option::as_mut) else { return };
        let mut dst = 0;
        for src in 0..bucket.rows.len() {
            let Some(slot) = bucket.rows[src] else { continue };
            if src != dst {
                // A failed copy leaves the source row intact: stop moving, cut what is free.
                if bucket.move_row(src, dst).is_err() {
                    break;
                }
                bucket.rows[dst] = Some(slot);
                bucket.rows[src] = None;
                if let Some(Some(loc)) = self.slots.get_mut(slot) {
                    loc.row = dst;
                }
            }
            dst += 1;
        }
        let last_live = bucket.rows.iter().rposition(Option::is_some).map_or(0, |r| r + 1);
        let keep = rows_for(bucket.live, geo.row_bytes(cap)).max(last_live);
        if keep < bucket.rows.len() {
            bucket.stamp = stamp;
            bucket.cut(&geo, cap, keep);
            bucket.rows.truncate(keep);
        }
    }
}

/// The bucket for `capacity` positions (None if the rounded capacity overflows).
fn bucket_index(capacity: usize) -> Option<usize> {
    let rounded = capacity.max(MIN_BUCKET).checked_next_power_of_two()?;
    Some((rounded / MIN_BUCKET).trailing_zeros() as usize)
}

/// Rows a bucket keeps for `live` slots: a quarter more, within `SLACK_BYTES` of spare rows.
fn rows_for(live: usize, row_bytes: usize) -> usize {
    live + (live / 4).min(SLACK_BYTES / row_bytes.max(1))
}

/// Whether a bucket holding `held` rows, `live` of them in use, gives rows back now: when it is
/// at most half full, or its spare rows beyond `rows_for` reach `SLACK_BYTES` (a large bucket
/// gives back every freed row at once). Halving leaves room to grow before the next resize.
fn should_shrink(held: usize, live: usize, row_bytes: usize) -> bool {
    let keep = rows_for(live, row_bytes);
    held > keep && (2 * live <= held || (held - keep).saturating_mul(row_bytes) >= SLACK_BYTES)
}

/// libtorch's allocation failures, as OutOfMemory when they say so.
fn alloc_error(e: tch::TchError, bytes: usize) -> Error {
    let msg = e.to_string();
    let lower = msg.to_lowercase();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") || lower.contains("cannot allocate memory") {
        let first = msg.lines().next().unwrap_or_default().trim();
        return Error::out_of_memory(format!(
            "could not allocate {} of KV cache on the device ({first}); lower the batch size, \
             max_new_tokens or the scheduler's max_cache_tokens",
            crate::mem::format_bytes(bytes)
        ));
    }
    Error::Backend(format!("could not allocate the KV cache on the device ({msg})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_from_the_minimum() {
        assert_eq!(bucket_index(0), Some(0));
        assert_eq!(bucket_index(MIN_BUCKET), Some(0));
        assert_eq!(bucket_index(MIN_BUCKET + 1), Some(1));
        assert_eq!(bucket_index(32 * 1024), Some(7));
        assert_eq!(KvArena::bucket_capacity(7), 32 * 1024);
        assert_eq!(bucket_index(usize::MAX), None);
    }

    #[test]
    fn slack_is_bounded_by_rows_and_bytes() {
        let small = 1 << 10;
        assert_eq!(rows_for(1, small), 1);
        assert_eq!(rows_for(8, small), 10);
        // A row of 4 GiB keeps no spare row.
        assert_eq!(rows_for(8, 4 << 30), 8);
        // Small rows: shrink only when half empty, to a quarter more than live.
        assert!(!should_shrink(10, 6, small));
        assert!(should_shrink(10, 5, small));
        // Large rows: every freed row goes back.
        assert!(should_shrink(8, 7, 4 << 30));
        assert!(!should_shrink(7, 7, 4 << 30));
    }

    /// Fills every layer's row of `slot` with `value`.
    fn mark(arena: &mut KvArena, slot: SlotId, value: f64) {
        let loc = arena.locate(slot).unwrap();
        for l in 0..2 {
            let (k, v) = arena.layer_mut(loc.bucket, l).unwrap();
            let _ = k.narrow(0, loc.row as i64, 1).fill_(value);
            let _ = v.narrow(0, loc.row as i64, 1).fill_(-value);
        }
    }

    fn check(arena: &mut KvArena, slots: &[(SlotId, f64)]) {
        for &(slot, value) in slots {
            let loc = arena.locate(slot).unwrap();
            for l in 0..2 {
                let (k, v) = arena.layer_mut(loc.bucket, l).unwrap();
                let row = |t: &Tensor| t.narrow(0, loc.row as i64, 1);
                assert_eq!(row(k).min().double_value(&[]), value, "slot {slot} at {loc:?}");
                assert_eq!(row(k).max().double_value(&[]), value, "slot {slot} at {loc:?}");
                assert_eq!(row(v).min().double_value(&[]), -value, "slot {slot} at {loc:?}");
            }
        }
    }

    #[test]
    fn long_slot_freed_while_short_ones_run() {
        let mut arena = KvArena::new(2, 2, 4, Kind::Float, Device::Cpu);
        let per_pos = arena.bytes_per_position();
        let long = arena.allocate(4000).unwrap();
        let short: Vec<_> = (0..6).map(|_| arena.allocate(30).unwrap()).collect();
        for (i, &s) in short.iter().enumerate() {
            mark(&mut arena, s, i as f64 + 1.0);
        }
        // Stamps change exactly when a bucket's tensors are replaced (recorded graphs rely on it).
        let stamp = arena.stamp(0).unwrap();
        let spare = arena.allocate(40).unwrap(); // the seventh row exists already (rows_for(6) = 7)
        assert_eq!(arena.stamp(0), Some(stamp));
        arena.release(spare);
        assert_eq!(arena.stamp(0), Some(stamp));
        assert!(arena.bytes_reserved() >= (4096 + 6 * MIN_BUCKET) * per_pos);
        arena.release(long);
        // 6 live rows of 256 positions and one spare (rows_for(6) = 7).
        assert_eq!(arena.bytes_reserved(), 7 * MIN_BUCKET * per_pos);
        // Free the low rows: at half empty the others move down, keeping their slots and data,
        // and the tail goes back.
        for &s in &short[..3] {
            arena.release(s);
        }
        let rest: Vec<_> = short[3..].iter().enumerate().map(|(i, &s)| (s, i as f64 + 4.0)).collect();
        check(&mut arena, &rest);
        for &(s, _) in &rest {
            assert!(arena.locate(s).unwrap().row < 3);
        }
        assert_eq!(arena.bytes_reserved(), 3 * MIN_BUCKET * per_pos);
        assert_ne!(arena.stamp(0), Some(stamp));
        // A new slot reuses a free row and starts zeroed.
        arena.release(rest[0].0);
        let again = arena.allocate(100).unwrap();
        check(&mut arena, &[(again, 0.0)]);
        check(&mut arena, &rest[1..]);
        for s in [again, rest[1].0, rest[2].0] {
            arena.release(s);
        }
        assert_eq!(arena.bytes_reserved(), 0);
        assert!(arena.buckets.is_empty() && arena.slots.is_empty());
    }
}
