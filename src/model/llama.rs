//! The Llama family forward pass (Llama, Mistral, Qwen2, Qwen3) on the CPU kernels.
//!
//! Sequences in a step are packed row-wise: every linear layer runs once over all new tokens of
//! all sequences, attention runs per sequence against its own KV cache.


use crate::backend::cpu::cache::KvCache;
use crate::backend::check_token;
use crate::backend::cpu::kernels::{self, AttnSeq, Proj};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::rope::Rope;
use crate::tensor::Matrix;

pub struct LayerWeights {
    pub input_norm: Vec<f32>,
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub o_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub post_norm: Vec<f32>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

pub struct LlamaWeights {
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// None when tied to the embedding.
    pub lm_head: Option<Matrix>,
}

pub struct LlamaModel {
    pub cfg: ModelConfig,
    pub weights: LlamaWeights,
    rope: Rope,
}

/// One sequence's share of a step: its cache, its new tokens, the position of the first one.
pub struct SeqBatchItem<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub start_pos: usize,
}

impl LlamaModel {
    pub fn new(cfg: ModelConfig, weights: LlamaWeights) -> Self {
        let rope = Rope::new(&cfg);
        LlamaModel { cfg, weights, rope }
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Keys and values of every layer for one position, in f32.
    pub fn cache_bytes_per_position(&self) -> usize {
        2 * self.cfg.num_hidden_layers * self.cfg.num_key_value_heads * self.cfg.head_dim * std::mem::size_of::<f32>()
    }

    /// A cache for `capacity` positions; `Error::OutOfMemory` when it cannot be reserved.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim, capacity)
    }

    /// Runs the new tokens of every sequence through the model, appending to their caches, and
    /// returns logits (row-major, vocab wide) for the last token of each sequence, or for every
    /// token when `all_positions`.
    pub fn forward(&self, seqs: &mut [SeqBatchItem], all_positions: bool) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (q_dim, kv_dim) = (nh * hd, nkv * hd);
        let eps = cfg.rms_norm_eps as f32;

        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for s in seqs.iter() {
            if s.start_pos + s.tokens.len() > s.cache.capacity() {
                return Err(Error::Internal(format!(
                    "KV cache of capacity {} cannot hold positions up to {}",
                    s.cache.capacity(),
                    s.start_pos + s.tokens.len()
                )));
            }
            offsets.push(offsets[offsets.len() - 1] + s.tokens.len());
        }
        let n = offsets[seqs.len()];
        if n == 0 {
            return Ok(Vec::new());
        }

        // Embedding lookup; ids were validated by the caller, checked again here as a backstop.
        let mut x = vec![0f32; n * h];
        let mut positions = Vec::with_capacity(n);
        for (s, seq) in seqs.iter().enumerate() {
            for (t, &id) in seq.tokens.iter().enumerate() {
                let row = offsets[s] + t;
                check_token(id, s, seq.start_pos + t, cfg.vocab_size)?;
                self.weights.embed.row_f32(id as usize, &mut x[row * h..(row + 1) * h]);
                positions.push(seq.start_pos + t);
            }
        }

        // cos/sin per token; dynamic NTK depends on the longest sequence in the call, as in transformers.
        let seq_len = seqs.iter().map(|s| s.start_pos + s.tokens.len()).max().unwrap_or(0);
        let inv_freq = self.rope.inv_freq_for(seq_len);
        let mut cos = vec![0f32; n * hd];
        let mut sin = vec![0f32; n * hd];
        for (t, &pos) in positions.iter().enumerate() {
            Rope::cos_sin(&inv_freq, pos, &mut cos[t * hd..(t + 1) * hd], &mut sin[t * hd..(t + 1) * hd]);
        }

        let mut xn = vec![0f32; n * h];
        let mut q = vec![0f32; n * q_dim];
        let mut k = vec![0f32; n * kv_dim];
        let mut v = vec![0f32; n * kv_dim];
        let mut attn = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * h];
        let inter = cfg.intermediate_size;
        let mut gate = vec![0f32; n * inter];
        let mut up = vec![0f32; n * inter];
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, lw) in self.weights.layers.iter().enumerate() {
            kernels::rms_norm(&x, &lw.input_norm, eps, &mut xn);
            kernels::linear_many(
                &xn,
                n,
                &mut [
                    Proj { w: &lw.q, bias: lw.q_bias.as_deref(), out: &mut q },
                    Proj { w: &lw.k, bias: lw.k_bias.as_deref(), out: &mut k },
                    Proj { w: &lw.v, bias: lw.v_bias.as_deref(), out: &mut v },
                ],
            );
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                kernels::rms_norm_inplace(&mut q, qn, eps);
                kernels::rms_norm_inplace(&mut k, kn, eps);
            }
            for t in 0..n {
                let (c, s) = (&cos[t * hd..(t + 1) * hd], &sin[t * hd..(t + 1) * hd]);
                kernels::rope_inplace(&mut q[t * q_dim..(t + 1) * q_dim], nh, hd, c, s);
                kernels::rope_inplace(&mut k[t * kv_dim..(t + 1) * kv_dim], nkv, hd, c, s);
            }
            for (si, seq) in seqs.iter_mut().enumerate() {
                for t in 0..seq.tokens.len() {
                    let row = offsets[si] + t;
                    seq.cache.write(
                        li,
                        seq.start_pos + t,
                        &k[row * kv_dim..(row + 1) * kv_dim],
                        &v[row * kv_dim..(row + 1) * kv_dim],
                    );
                }
            }
            {
                let mut jobs = Vec::with_capacity(seqs.len());
                let mut rest: &mut [f32] = &mut attn;
                for (si, seq) in seqs.iter().enumerate() {
                    let len = seq.tokens.len();
                    let (out, tail) = rest.split_at_mut(len * q_dim);
                    rest = tail;
                    let (kc, vc) = seq.cache.layer(li);
                    jobs.push(AttnSeq {
                        q: &q[offsets[si] * q_dim..offsets[si + 1] * q_dim],
                        k: kc,
                        v: vc,
                        cap: seq.cache.capacity(),
                        start_pos: seq.start_pos,
                        n_tok: len,
                        out,
                    });
                }
                kernels::attention(&mut jobs, nh, nkv, hd, cfg.layer_windows[li], scale);
            }
            kernels::linear(&attn, n, &lw.o, lw.o_bias.as_deref(), &mut proj);
            add_inplace(&mut x, &proj);

            kernels::rms_norm(&x, &lw.post_norm, eps, &mut xn);
            kernels::linear_gated(
                &xn,
                n,
                Proj { w: &lw.gate, bias: lw.gate_bias.as_deref(), out: &mut gate },
                Proj { w: &lw.up, bias: lw.up_bias.as_deref(), out: &mut up },
            );
            kernels::linear(&gate, n, &lw.down, lw.down_bias.as_deref(), &mut proj);
            add_inplace(&mut x, &proj);
        }
        for seq in seqs.iter_mut() {
            seq.cache.advance_to(seq.start_pos + seq.tokens.len());
        }

        // Final norm and lm_head only on the rows whose logits are wanted.
        let rows: Vec<usize> = if all_positions { (0..n).collect() } else { offsets[1..].iter().map(|o| o - 1).collect() };
        let mut hidden = vec![0f32; rows.len() * h];
        for (dst, &r) in hidden.chunks_mut(h).zip(&rows) {
            kernels::rms_norm(&x[r * h..(r + 1) * h], &self.weights.norm, eps, dst);
        }
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        let mut logits = vec![0f32; rows.len() * cfg.vocab_size];
        kernels::linear(&hidden, rows.len(), head, None, &mut logits);
        Ok(logits)
    }
}

fn add_inplace(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}
