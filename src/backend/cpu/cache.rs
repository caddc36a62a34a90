//! A preallocated per-sequence KV cache: per layer, keys and values as [kv_head][position][head_dim].

use crate::error::Result;
use crate::mem::{self, AllocFailed};

pub struct KvCache {
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    layer_stride: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Positions filled so far.
    len: usize,
}

impl KvCache {
    /// Reserves the cache (zeroed, committed as it is written). A size that overflows or that the
    /// allocator refuses is `Error::OutOfMemory` naming the bytes, never an abort.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        let layer_stride = n_kv_heads.checked_mul(capacity).and_then(|x| x.checked_mul(head_dim));
        let per_tensor = layer_stride.and_then(|s| s.checked_mul(n_layers));
        // Keys and values: two buffers of `per_tensor` f32 each.
        let total_bytes = per_tensor.and_then(|n| n.checked_mul(2 * std::mem::size_of::<f32>()));
        let too_big = || {
            AllocFailed { bytes: total_bytes }.into_error(
                &format!("the KV cache for {capacity} positions"),
                "lower max_new_tokens / the batch size / set_scheduler_limits(max_cache_tokens=...)",
            )
        };
        let (Some(layer_stride), Some(n)) = (layer_stride, per_tensor) else {
            return Err(too_big());
        };
        let k = mem::try_zeroed::<f32>(n).map_err(|_| too_big())?;
        let v = mem::try_zeroed::<f32>(n).map_err(|_| too_big())?;
        Ok(KvCache { n_kv_heads, head_dim, capacity, layer_stride, k, v, len: 0 })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores one token's keys and values (n_kv_heads * head_dim each) at `pos` in `layer`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let base = layer * self.layer_stride;
        for head in 0..self.n_kv_heads {
            let dst = base + (head * self.capacity + pos) * hd;
            self.k[dst..dst + hd].copy_from_slice(&k[head * hd..(head + 1) * hd]);
            self.v[dst..dst + hd].copy_from_slice(&v[head * hd..(head + 1) * hd]);
        }
    }

    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let r = layer * self.layer_stride..(layer + 1) * self.layer_stride;
        (&self.k[r.clone()], &self.v[r])
    }

    pub fn advance_to(&mut self, len: usize) {
        self.len = self.len.max(len);
    }

    /// Makes the first `positions` positions of every layer those of `src` (a beam taking over
    /// another beam's history); positions beyond are left to be overwritten.
    pub fn copy_prefix_from(&mut self, src: &KvCache, positions: usize) -> Result<()> {
        let same = (self.n_kv_heads, self.head_dim, self.layer_stride / self.capacity.max(1))
            == (src.n_kv_heads, src.head_dim, src.layer_stride / src.capacity.max(1));
        if !same || positions > self.capacity.min(src.len) {
            return Err(crate::error::Error::Internal(format!(
                "cannot copy {positions} positions between caches of {} and {} positions (filled {})",
                self.capacity, src.capacity, src.len
            )));
        }
        let hd = self.head_dim;
        let layers = self.k.len() / self.layer_stride.max(1);
        for layer in 0..layers {
            for head in 0..self.n_kv_heads {
                let d = layer * self.layer_stride + head * self.capacity * hd;
                let s = layer * src.layer_stride + head * src.capacity * hd;
                let n = positions * hd;
                self.k[d..d + n].copy_from_slice(&src.k[s..s + n]);
                self.v[d..d + n].copy_from_slice(&src.v[s..s + n]);
            }
        }
        self.len = positions;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn huge_capacity_is_an_error_not_an_abort() {
        for capacity in [1_000_000_000_000usize, usize::MAX / 2, usize::MAX] {
            let err = KvCache::new(30, 3, 64, capacity).err().map(|e| (matches!(e, Error::OutOfMemory(_)), e.to_string()));
            let (oom, msg) = err.unwrap_or_default();
            assert!(oom, "capacity {capacity}: {msg}");
            assert!(msg.contains(&format!("{capacity} positions")) && msg.contains("max_new_tokens"), "{msg}");
        }
        // A size that fits usize (2^51 bytes) but exceeds the 47-bit address space.
        let msg = KvCache::new(1, 1, 2, 1 << 47).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("GiB"), "{msg}");
    }

    #[test]
    fn small_cache_stores_and_reads_back() {
        let mut c = KvCache::new(2, 2, 4, 8).unwrap();
        let (k, v): (Vec<f32>, Vec<f32>) = ((0..8).map(|x| x as f32).collect(), vec![1.0; 8]);
        c.write(1, 3, &k, &v);
        let (kc, vc) = c.layer(1);
        assert_eq!(&kc[3 * 4..4 * 4], &k[..4]);
        assert_eq!(&kc[(8 + 3) * 4..(8 + 4) * 4], &k[4..]);
        assert_eq!(vc.iter().sum::<f32>(), 8.0);
        assert_eq!(c.layer(0).0.iter().sum::<f32>(), 0.0);
    }
}
