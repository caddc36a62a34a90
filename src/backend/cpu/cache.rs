//! A preallocated per-sequence KV cache: per layer, keys and values as [kv_head][position][head_dim].

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
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        let layer_stride = n_kv_heads * capacity * head_dim;
        KvCache {
            n_kv_heads,
            head_dim,
            capacity,
            layer_stride,
            k: vec![0.0; n_layers * layer_stride],
            v: vec![0.0; n_layers * layer_stride],
            len: 0,
        }
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
}
