//! Weights on the host, grouped as a family's forward reads them (one rank's shard), and the
//! conversion into a backend's own weight types.

use std::ops::Range;

use crate::error::Result;
use crate::model::llama::{Layer, Weights};
use crate::model::ops::WeightKinds;
use crate::tensor::Matrix;

/// One part of a projection: a matrix and its optional bias.
pub struct HostPart {
    pub w: Matrix,
    pub bias: Option<Vec<f32>>,
}

/// A projection of one or more parts sharing their input.
pub struct HostLinear {
    pub parts: Vec<HostPart>,
}

impl HostLinear {
    pub fn one(w: Matrix, bias: Option<Vec<f32>>) -> Self {
        HostLinear { parts: vec![HostPart { w, bias }] }
    }

    pub fn byte_len(&self) -> usize {
        self.parts.iter().map(|p| p.w.byte_len() + p.bias.as_ref().map_or(0, |b| b.len() * 4)).sum()
    }
}

/// Host weights are what the CPU kernels compute on directly.
pub struct Host;

impl WeightKinds for Host {
    type Linear = HostLinear;
    type Norm = Vec<f32>;
    type Embedding = Matrix;
}

/// The lm_head of one rank: its own rows, or rows of the (replicated) embedding when tied.
pub enum HostHead {
    Tied(Range<usize>),
    Own(HostLinear),
}

/// One rank's weights on the host, before a backend takes them.
pub struct HostWeights {
    pub embed: Matrix,
    pub layers: Vec<Layer<Host>>,
    pub norm: Vec<f32>,
    pub head: HostHead,
}

/// How a backend turns host weights into its own (uploads, fuses, or keeps them).
pub trait WeightBuilder {
    type Kinds: WeightKinds;
    /// `name` says which weight it is ("layers.3.qkv", "lm_head"; see `HostWeights::build`), for
    /// a backend that binds weights by name.
    fn linear(&mut self, name: &str, l: HostLinear) -> Result<<Self::Kinds as WeightKinds>::Linear>;
    fn norm(&mut self, name: &str, v: Vec<f32>) -> Result<<Self::Kinds as WeightKinds>::Norm>;
    fn embedding(&mut self, m: Matrix) -> Result<<Self::Kinds as WeightKinds>::Embedding>;
    /// The lm_head as a view of `rows` of the embedding (tied weights are not copied).
    fn tied_head(
        &mut self,
        embed: &<Self::Kinds as WeightKinds>::Embedding,
        rows: Range<usize>,
    ) -> Result<<Self::Kinds as WeightKinds>::Linear>;
}

impl HostWeights {
    /// Bytes of weights this rank holds (a tied head counts nothing beyond the embedding).
    pub fn byte_len(&self) -> usize {
        let vec = |v: &Vec<f32>| v.len() * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                vec(&l.input_norm)
                    + vec(&l.post_norm)
                    + l.qk_norm.as_ref().map_or(0, |(q, k)| vec(q) + vec(k))
                    + l.sandwich.as_ref().map_or(0, |(a, m)| vec(a) + vec(m))
                    + l.qkv.byte_len()
                    + l.o.byte_len()
                    + l.gate_up.byte_len()
                    + l.down.byte_len()
            })
            .sum();
        let head = match &self.head {
            HostHead::Tied(_) => 0,
            HostHead::Own(l) => l.byte_len(),
        };
        self.embed.byte_len() + layers + vec(&self.norm) + head
    }

    /// Hands every weight to `b`, layer by layer (a backend that uploads can free each host layer
    /// as soon as it is on the device).
    pub fn build<B: WeightBuilder>(self, b: &mut B) -> Result<Weights<B::Kinds>> {
        let HostWeights { embed, layers, norm, head } = self;
        let mut out = Vec::with_capacity(layers.len());
        for (i, l) in layers.into_iter().enumerate() {
            let n = |part: &str| format!("layers.{i}.{part}");
            out.push(Layer {
                input_norm: b.norm(&n("input_layernorm"), l.input_norm)?,
                qkv: b.linear(&n("qkv"), l.qkv)?,
                qk_norm: match l.qk_norm {
                    Some((q, k)) => Some((b.norm(&n("q_norm"), q)?, b.norm(&n("k_norm"), k)?)),
                    None => None,
                },
                o: b.linear(&n("o_proj"), l.o)?,
                post_norm: b.norm(&n("post_attention_layernorm"), l.post_norm)?,
                sandwich: match l.sandwich {
                    Some((a, m)) => Some((b.norm(&n("attn_out_norm"), a)?, b.norm(&n("mlp_out_norm"), m)?)),
                    None => None,
                },
                gate_up: b.linear(&n("gate_up"), l.gate_up)?,
                down: b.linear(&n("down_proj"), l.down)?,
            });
        }
        let embed = b.embedding(embed)?;
        let head = match head {
            HostHead::Tied(rows) => b.tied_head(&embed, rows)?,
            HostHead::Own(l) => b.linear("lm_head", l)?,
        };
        Ok(Weights { embed, layers: out, norm: b.norm("norm", norm)?, head })
    }
}
