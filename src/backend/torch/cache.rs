//! KV caches on the device: one arena per layer for keys and one for values, shaped
//! [slot rows, kv heads, capacity, head dim] (a head's positions contiguous, as attention reads them). A slot is a row; a step whose slots are consecutive
//! rows (the decode loop allocates them so) views its batch's caches without copying.

use tch::{Device, Kind, Tensor};

use super::tch_err;
use crate::error::{Error, Result};

pub struct KvArena {
    n_layers: usize,
    kv_heads: i64,
    head_dim: i64,
    kind: Kind,
    device: Device,
    /// Per layer, keys and values.
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Positions each row may hold; None = free row.
    rows: Vec<Option<usize>>,
    /// The capacity every row is allocated with (the largest ever asked for).
    cap: usize,
    /// Bumped whenever the arena tensors are replaced or freed: recorded CUDA graphs address
    /// them and are valid for one generation only.
    generation: u64,
}

impl KvArena {
    pub fn new(n_layers: usize, kv_heads: usize, head_dim: usize, kind: Kind, device: Device) -> Self {
        KvArena {
            n_layers,
            kv_heads: kv_heads as i64,
            head_dim: head_dim as i64,
            kind,
            device,
            k: Vec::new(),
            v: Vec::new(),
            rows: Vec::new(),
            cap: 0,
            generation: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Keys and values of every layer for one position of one row.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.n_layers * (self.kv_heads * self.head_dim) as usize * self.kind.elt_size_in_bytes()
    }

    /// Device memory the arena tensors hold now.
    pub fn bytes_reserved(&self) -> usize {
        self.k.iter().chain(&self.v).map(|t| t.numel() * self.kind.elt_size_in_bytes()).sum()
    }

    pub fn capacity_of(&self, row: usize) -> Option<usize> {
        self.rows.get(row).copied().flatten()
    }

    /// Takes a free row able to hold `capacity` positions, growing the arena when needed (a
    /// reallocation: done at allocation time, before a generation's steps).
    pub fn allocate(&mut self, capacity: usize) -> Result<usize> {
        let row = match self.rows.iter().position(Option::is_none) {
            Some(r) => r,
            None => {
                self.rows.push(None);
                self.rows.len() - 1
            }
        };
        if row >= self.k.first().map_or(0, |t| t.size()[0] as usize) || capacity > self.cap {
            self.grow(self.rows.len(), self.cap.max(capacity))?;
        }
        self.rows[row] = Some(capacity);
        Ok(row)
    }

    pub fn release(&mut self, row: usize) {
        if let Some(r) = self.rows.get_mut(row) {
            *r = None;
        }
        // Give device memory back once nothing is in use, so an idle model holds only weights.
        if self.rows.iter().all(Option::is_none) {
            self.rows.clear();
            self.k.clear();
            self.v.clear();
            self.cap = 0;
            self.generation += 1;
        }
    }

    fn grow(&mut self, rows: usize, cap: usize) -> Result<()> {
        let shape = [rows as i64, self.kv_heads, cap as i64, self.head_dim];
        let grow_one = |old: Option<&Tensor>| -> Result<Tensor> {
            let t = Tensor::f_zeros(shape, (self.kind, self.device)).map_err(oom)?;
            if let Some(old) = old {
                let (r, c) = (old.size()[0], old.size()[2]);
                t.f_narrow(0, 0, r)
                    .and_then(|t| t.f_narrow(2, 0, c))
                    .and_then(|mut dst| dst.f_copy_(old))
                    .map_err(tch_err)?;
            }
            Ok(t)
        };
        let mut k = Vec::with_capacity(self.n_layers);
        let mut v = Vec::with_capacity(self.n_layers);
        for l in 0..self.n_layers {
            k.push(grow_one(self.k.get(l))?);
            v.push(grow_one(self.v.get(l))?);
        }
        self.k = k;
        self.v = v;
        self.cap = cap;
        self.generation += 1;
        Ok(())
    }
}

fn oom(e: tch::TchError) -> Error {
    Error::Backend(format!(
        "could not allocate the KV cache on the device ({e}); lower the batch size or max_new_tokens"
    ))
}
