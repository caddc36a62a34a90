//! The Llama family (Llama, Mistral, Qwen2, Qwen3): its weights as a checkpoint stores them, and
//! its forward pass, written once over the backends' op interface (`model::ops`). The
//! architectures differ only in which optional weights exist (biases, q/k norms, tied head) and in
//! the config (head_dim, rope scaling, sliding windows).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::ops::{Activation, AttnSpec, Ops, RankShape, WeightKinds};
use crate::model::rope::Rope;
use crate::tensor::Matrix;

/// One decoder layer as the checkpoint stores it (the loader's output, before any sharding).
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
    /// Gemma's sandwich norms: on the attention output (its `post_attention_layernorm`) and on
    /// the MLP output (`post_feedforward_layernorm`); `post_norm` is then its pre-feedforward norm.
    pub attn_out_norm: Option<Vec<f32>>,
    pub mlp_out_norm: Option<Vec<f32>>,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    pub gate_bias: Option<Vec<f32>>,
    pub up_bias: Option<Vec<f32>>,
    pub down_bias: Option<Vec<f32>>,
}

/// The whole checkpoint, unsharded.
pub struct LlamaWeights {
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// None when tied to the embedding.
    pub lm_head: Option<Matrix>,
}

/// One decoder layer as a backend holds it (one rank's shard). q/k/v and gate/up are one linear
/// each, so a backend can fuse them.
pub struct Layer<W: WeightKinds> {
    pub input_norm: W::Norm,
    pub qkv: W::Linear,
    /// Qwen3's per-head q and k norms.
    pub qk_norm: Option<(W::Norm, W::Norm)>,
    pub o: W::Linear,
    pub post_norm: W::Norm,
    /// Gemma's norms on the attention and MLP outputs (see `LayerWeights`).
    pub sandwich: Option<(W::Norm, W::Norm)>,
    pub gate_up: W::Linear,
    pub down: W::Linear,
}

pub struct Weights<W: WeightKinds> {
    pub embed: W::Embedding,
    pub layers: Vec<Layer<W>>,
    pub norm: W::Norm,
    /// The lm_head (this rank's vocabulary rows); a view of the embedding when tied.
    pub head: W::Linear,
}

/// One rank's model on one backend.
pub struct LlamaModel<W: WeightKinds> {
    pub cfg: ModelConfig,
    pub shape: RankShape,
    pub rope: Rope,
    /// Gemma 3's rope of the sliding layers (rotary index 1); `rope` is the full layers'.
    pub local_rope: Option<Rope>,
    pub weights: Weights<W>,
}

impl<W: WeightKinds> LlamaModel<W> {
    pub fn new(cfg: ModelConfig, shape: RankShape, weights: Weights<W>) -> Self {
        let rope = Rope::new(&cfg);
        let local_rope = cfg.gemma.as_ref().and_then(|g| g.local_rope_theta).map(|theta| Rope::local(&cfg, theta));
        LlamaModel { cfg, shape, rope, local_rope, weights }
    }

    /// Keys and values of every layer for one position on this rank, in `elem_bytes` per value.
    pub fn cache_bytes_per_position(&self, elem_bytes: usize) -> usize {
        2 * self.cfg.num_hidden_layers * self.shape.kv_heads * self.cfg.head_dim * elem_bytes
    }

    /// Runs the step `ops` describes and returns this rank's logits for the output rows
    /// (row-major, `shape.vocab` wide).
    pub fn forward<O: Ops<Kinds = W>>(&self, ops: &mut O) -> Result<O::Act> {
        let (cfg, s) = (&self.cfg, &self.shape);
        let eps = cfg.rms_norm_eps as f32;
        let hd = cfg.head_dim;
        let gemma = cfg.gemma.as_ref();
        let rot = ops.rotary(0, &self.rope)?;
        let local_rot = match &self.local_rope {
            Some(r) => Some(ops.rotary(1, r)?),
            None => None,
        };
        let act = if gemma.is_some() { Activation::GeluTanh } else { Activation::Silu };
        let mut x = ops.embed(&self.weights.embed)?;
        if let Some(g) = gemma {
            x = ops.scale(x, g.embed_scale)?;
        }
        for (li, l) in self.weights.layers.iter().enumerate() {
            let rot = match (&local_rot, gemma.and_then(|g| g.layer_rope.get(li))) {
                (Some(local), Some(1)) => local,
                _ => &rot,
            };
            let xn = ops.rms_norm(&x, &l.input_norm, eps)?;
            let [q, k, v] = parts(ops.project(xn, &l.qkv)?)?;
            let (q, k) = match &l.qk_norm {
                Some((qn, kn)) => (ops.head_rms_norm(q, qn, eps)?, ops.head_rms_norm(k, kn, eps)?),
                None => (q, k),
            };
            let q = ops.rope(q, s.heads, rot)?;
            let k = ops.rope(k, s.kv_heads, rot)?;
            let window = cfg.layer_windows.get(li).copied().flatten();
            let spec = AttnSpec {
                layer: li,
                heads: s.heads,
                kv_heads: s.kv_heads,
                head_dim: hd,
                window,
                scale: gemma.map(|g| g.attn_scale),
                softcap: gemma.and_then(|g| g.attn_softcap),
            };
            let attn = ops.attend(&spec, q, k, v)?;
            let [o] = parts(ops.project(attn, &l.o)?)?;
            let mut o = ops.all_reduce(o)?;
            if let Some((n, _)) = &l.sandwich {
                o = ops.rms_norm(&o, n, eps)?;
            }
            ops.add(&mut x, o)?;

            let xn = ops.rms_norm(&x, &l.post_norm, eps)?;
            let gated = ops.gated(xn, &l.gate_up, act)?;
            let [down] = parts(ops.project(gated, &l.down)?)?;
            let mut down = ops.all_reduce(down)?;
            if let Some((_, n)) = &l.sandwich {
                down = ops.rms_norm(&down, n, eps)?;
            }
            ops.add(&mut x, down)?;
        }
        // Final norm and lm_head only on the rows whose logits are wanted.
        let x = ops.output_rows(x)?;
        let x = ops.rms_norm(&x, &self.weights.norm, eps)?;
        let [logits] = parts(ops.project(x, &self.weights.head)?)?;
        match gemma.and_then(|g| g.final_softcap) {
            Some(cap) => ops.softcap(logits, cap),
            None => Ok(logits),
        }
    }
}

/// A projection's outputs, as many as its parts.
fn parts<A, const N: usize>(v: Vec<A>) -> Result<[A; N]> {
    let got = v.len();
    <[A; N]>::try_from(v).map_err(|_| Error::Internal(format!("a projection gave {got} outputs where {N} were expected")))
}
