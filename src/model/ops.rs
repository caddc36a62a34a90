//! The op interface a family's forward is written against, once, for every backend.
//!
//! A backend implements [`Ops`] for one step of one rank: it knows the step's sequences (their new
//! tokens, positions and KV caches) and executes, or records, each coarse op the forward asks for.
//! The forward never looks at activation values and never branches on them: every shape it uses
//! comes from the config and the rank's [`RankShape`], so the same call sequence can run eagerly
//! (the CPU kernels, libtorch) or be recorded into a static graph (fixed bucket shapes, the KV cache
//! as graph inputs aliased to outputs, masks from position inputs): a recording backend's `Act` is
//! a node of the graph being built, `attend` emits the cache update and the masked attention, and
//! `all_reduce` emits the collective.

use std::ops::Range;

use crate::error::Result;
use crate::model::rope::Rope;

/// The weight types of a backend (what its ops read).
pub trait WeightKinds {
    /// One projection, or several that share their input (q/k/v, gate/up) fused as the backend
    /// likes; each part may carry a bias.
    type Linear;
    /// A norm's weight vector.
    type Norm;
    /// The token embedding table.
    type Embedding;
}

/// Gate activation of a gated MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama, Mistral, Qwen).
    Silu,
    /// GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`, torch's
    /// `gelu(x, approximate="tanh")`).
    GeluTanh,
}

/// One layer's attention as one rank computes it.
#[derive(Clone, Copy, Debug)]
pub struct AttnSpec {
    pub layer: usize,
    /// Query and key/value heads this rank holds.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window (keys j > p - window are visible) or full causal attention.
    pub window: Option<usize>,
    /// Score scale; None: 1/sqrt(head_dim), as each backend computes it by default.
    pub scale: Option<f32>,
    /// Attention logit softcapping (Gemma 2): scores become tanh(s / cap) * cap after the scale,
    /// before the mask.
    pub softcap: Option<f32>,
}

impl AttnSpec {
    /// The scale, 1/sqrt(head_dim) unless the family sets one.
    pub fn scale_or_default(&self) -> f32 {
        self.scale.unwrap_or(1.0 / (self.head_dim as f32).sqrt())
    }
}

/// The step of one rank, as a backend executes (or records) it. Inputs an op consumes are taken
/// by value, so a backend can reuse their buffers.
pub trait Ops {
    type Kinds: WeightKinds;
    /// Activations: one row per new token of the step (or per output row after `output_rows`).
    type Act;
    /// cos/sin of the step's positions for one rope.
    type Rotary;

    fn embed(&mut self, table: &<Self::Kinds as WeightKinds>::Embedding) -> Result<Self::Act>;
    /// The rotary tables of rope `index` of the model (a model may have several, per layer type).
    fn rotary(&mut self, index: usize, rope: &Rope) -> Result<Self::Rotary>;
    /// transformers' RMSNorm: normalise in f32, cast to the compute dtype, scale by the weight.
    fn rms_norm(&mut self, x: &Self::Act, w: &<Self::Kinds as WeightKinds>::Norm, eps: f32) -> Result<Self::Act>;
    /// RMSNorm over each head's `head_dim` values (Qwen3's q/k norms).
    fn head_rms_norm(&mut self, x: Self::Act, w: &<Self::Kinds as WeightKinds>::Norm, eps: f32) -> Result<Self::Act>;
    /// Rotates each of `heads` heads in place (HF rotate_half layout).
    fn rope(&mut self, x: Self::Act, heads: usize, rot: &Self::Rotary) -> Result<Self::Act>;
    /// x * w^T (+ bias) for each part of `w`, in order.
    fn project(&mut self, x: Self::Act, w: &<Self::Kinds as WeightKinds>::Linear) -> Result<Vec<Self::Act>>;
    /// act(x * gate^T) * (x * up^T) for a two-part (gate, up) `w`.
    fn gated(&mut self, x: Self::Act, w: &<Self::Kinds as WeightKinds>::Linear, act: Activation) -> Result<Self::Act>;
    /// Appends the new keys/values to this layer's caches and attends over them (causal, with the
    /// window); returns heads * head_dim per row.
    fn attend(&mut self, spec: &AttnSpec, q: Self::Act, k: Self::Act, v: Self::Act) -> Result<Self::Act>;
    /// The sum of every rank's `x`, in rank order (0 + 1 + ...), in f32; identity for one rank.
    fn all_reduce(&mut self, x: Self::Act) -> Result<Self::Act>;
    /// x += y (the residual stream).
    fn add(&mut self, x: &mut Self::Act, y: Self::Act) -> Result<()>;
    /// x * factor (Gemma's embedding scale).
    fn scale(&mut self, x: Self::Act, factor: f32) -> Result<Self::Act>;
    /// tanh(x / cap) * cap, elementwise (Gemma 2's final logit softcapping).
    fn softcap(&mut self, x: Self::Act, cap: f32) -> Result<Self::Act>;
    /// Keeps the rows whose logits the step returns (each sequence's last, or all).
    fn output_rows(&mut self, x: Self::Act) -> Result<Self::Act>;
}

/// The part of a model one rank holds: head counts and widths after sharding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShape {
    pub rank: usize,
    pub ranks: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    /// The vocabulary rows this rank's lm_head shard produces logits for.
    pub vocab: Range<usize>,
}
