//! A backend that records instead of computing: the family forward of `model/` run through
//! [`HloOps`] emits one rank's HLO module for one step shape. Weights and KV caches are graph
//! parameters (the caches aliased input->output), the all-reduces are XLA all-reduces over the
//! rank group, and every shape is fixed at recording time (the bucket).
//!
//! So far: one sequence (batch 1), f32, `n` new tokens at a position given as an input, the rotary
//! tables and the causal/sliding-window masks as host-computed inputs (in-graph masks from the
//! position input come with the export). The embedding lookup is a one-hot
//! product (exact in f32: one nonzero term per sum); a gather comes with the export.

use std::cell::RefCell;

use super::hlo::builder::{ModuleBuilder, Node, Shape};
use super::hlo::proto::PrimitiveType;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::host::{HostLinear, HostWeights, WeightBuilder};
use crate::model::llama::LlamaModel;
use crate::model::ops::{Activation, AttnSpec, Ops, RankShape, WeightKinds};
use crate::model::rope::Rope;
use crate::tensor::Matrix;

/// Weights as graph parameters.
pub struct HloKinds;

impl WeightKinds for HloKinds {
    type Linear = Vec<(Node, Option<Node>)>;
    type Norm = Node;
    type Embedding = Node;
}

/// One graph input and each rank's value for it (f32 or s32 data, row-major).
pub struct Binding {
    pub name: String,
    pub dims: Vec<i64>,
    pub f32s: Option<Vec<f32>>,
    pub s32s: Option<Vec<i32>>,
}

/// The module being recorded and what its parameters are bound to on this rank.
struct Recorder {
    b: ModuleBuilder,
    bindings: Vec<Binding>,
}

impl Recorder {
    fn param_f32(&mut self, name: &str, dims: &[i64], data: Vec<f32>) -> Node {
        self.bindings.push(Binding { name: name.into(), dims: dims.to_vec(), f32s: Some(data), s32s: None });
        self.b.parameter(Shape::new(PrimitiveType::F32, dims), name)
    }

    fn param_s32(&mut self, name: &str, dims: &[i64], data: Vec<i32>) -> Node {
        self.bindings.push(Binding { name: name.into(), dims: dims.to_vec(), f32s: None, s32s: Some(data) });
        self.b.parameter(Shape::new(PrimitiveType::S32, dims), name)
    }
}

struct HloWeights<'r> {
    rec: &'r RefCell<Recorder>,
    count: usize,
    /// The embedding's binding (its values) and width, for a tied head's rows.
    embed: Option<(usize, usize)>,
}

impl HloWeights<'_> {
    fn values(m: &Matrix) -> Result<Vec<f32>> {
        m.data.try_to_f32_vec().map_err(|e| e.into_error("a weight for an HLO graph", "free memory"))
    }

    fn param(&mut self, dims: &[i64], data: Vec<f32>) -> Node {
        self.count += 1;
        self.rec.borrow_mut().param_f32(&format!("w{}", self.count), dims, data)
    }

    fn matrix(&mut self, m: &Matrix) -> Result<Node> {
        let data = Self::values(m)?;
        Ok(self.param(&[m.rows as i64, m.cols as i64], data))
    }

    fn vector(&mut self, v: Vec<f32>) -> Node {
        let n = v.len() as i64;
        self.param(&[n], v)
    }
}

impl WeightBuilder for HloWeights<'_> {
    type Kinds = HloKinds;

    fn linear(&mut self, l: HostLinear) -> Result<Vec<(Node, Option<Node>)>> {
        l.parts.into_iter().map(|p| Ok((self.matrix(&p.w)?, p.bias.map(|b| self.vector(b))))).collect()
    }

    fn norm(&mut self, v: Vec<f32>) -> Result<Node> {
        Ok(self.vector(v))
    }

    fn embedding(&mut self, m: Matrix) -> Result<Node> {
        let node = self.matrix(&m)?;
        self.embed = Some((self.rec.borrow().bindings.len() - 1, m.cols));
        Ok(node)
    }

    /// The rank's rows of the embedding as a parameter of their own: a slice at a rank-dependent
    /// offset would make the ranks' graphs differ, and every rank must run the same graph.
    fn tied_head(&mut self, _embed: &Node, rows: std::ops::Range<usize>) -> Result<Vec<(Node, Option<Node>)>> {
        let (binding, cols) = self.embed.ok_or_else(|| Error::Internal("a tied head before the embedding".into()))?;
        let data = self.rec.borrow().bindings[binding].f32s.as_ref().map(|v| v[rows.start * cols..rows.end * cols].to_vec());
        let data = data.ok_or_else(|| Error::Internal("the embedding has no f32 values".into()))?;
        Ok(vec![(self.param(&[rows.len() as i64, cols as i64], data), None)])
    }
}

/// One rank's context-encoding step, recorded.
struct HloOps<'r> {
    rec: &'r RefCell<Recorder>,
    tokens: Vec<u32>,
    /// Position of the first new token (bound as an input: graphs do not depend on it).
    start_pos: usize,
    cache_len: i64,
    ranks: usize,
    /// (cache output, its parameter number) per layer and k/v, for the root tuple.
    caches: Vec<Node>,
    position: Option<Node>,
    /// The additive mask of each distinct sliding window seen so far.
    masks: Vec<(Option<usize>, Node)>,
}

impl HloOps<'_> {
    fn b(&self) -> std::cell::RefMut<'_, Recorder> {
        self.rec.borrow_mut()
    }

    fn t(&self) -> i64 {
        self.tokens.len() as i64
    }
}

fn dims_of(rec: &Recorder, n: Node) -> Vec<i64> {
    rec.b.shape(n).dims.clone()
}

/// x [rows, w] * rsqrt(mean(x^2) + eps) * weight [w], in f32.
fn rms_norm(r: &mut Recorder, x: Node, w: Node, eps: f32) -> Result<Node> {
    let d = dims_of(r, x);
    let (rows, width) = (d[0], d[1]);
    let sq = r.b.binary("multiply", x, x)?;
    let sum = r.b.reduce(sq, &[1], "add")?;
    let n = r.b.full(width as f32, &[rows])?;
    let mean = r.b.binary("divide", sum, n)?;
    let e = r.b.full(eps, &[rows])?;
    let var = r.b.binary("add", mean, e)?;
    let inv = r.b.unary("rsqrt", var);
    let inv = r.b.broadcast(inv, &[rows, width], &[0])?;
    let normed = r.b.binary("multiply", x, inv)?;
    let wb = r.b.broadcast(w, &[rows, width], &[1])?;
    r.b.binary("multiply", wb, normed)
}

impl Ops for HloOps<'_> {
    type Kinds = HloKinds;
    type Act = Node;
    type Rotary = (Node, Node);

    fn embed(&mut self, table: &Node) -> Result<Node> {
        let t = self.t();
        let ids: Vec<i32> = self.tokens.iter().map(|&x| x as i32).collect();
        let mut r = self.b();
        let vocab = dims_of(&r, *table)[0];
        let ids = r.param_s32("tokens", &[t], ids);
        let ids = r.b.broadcast(ids, &[t, vocab], &[0])?;
        let cols = r.b.iota(&[t, vocab], 1);
        let hit = r.b.compare(ids, cols, "EQ")?;
        let one_hot = r.b.convert(hit, PrimitiveType::F32);
        r.b.dot(one_hot, *table, 1, 0)
    }

    fn rotary(&mut self, index: usize, rope: &Rope) -> Result<(Node, Node)> {
        if index != 0 {
            return Err(Error::Internal(format!("the HLO recorder has no tables for rope {index}")));
        }
        let (t, hd, p0) = (self.tokens.len(), rope.head_dim(), self.start_pos);
        let (cos, sin) = rope.tables(p0..p0 + t, p0 + t);
        let mut r = self.b();
        Ok((r.param_f32("cos", &[t as i64, hd as i64], cos), r.param_f32("sin", &[t as i64, hd as i64], sin)))
    }

    fn rms_norm(&mut self, x: &Node, w: &Node, eps: f32) -> Result<Node> {
        rms_norm(&mut self.b(), *x, *w, eps)
    }

    fn head_rms_norm(&mut self, x: Node, w: &Node, eps: f32) -> Result<Node> {
        let mut r = self.b();
        let d = dims_of(&r, x);
        let hd = dims_of(&r, *w)[0];
        let heads = r.b.reshape(x, &[d[0] * d[1] / hd, hd])?;
        let normed = rms_norm(&mut r, heads, *w, eps)?;
        r.b.reshape(normed, &d)
    }

    fn rope(&mut self, x: Node, heads: usize, rot: &(Node, Node)) -> Result<Node> {
        let mut r = self.b();
        let d = dims_of(&r, x);
        let (t, h) = (d[0], heads as i64);
        let hd = d[1] / h;
        let x3 = r.b.reshape(x, &[t, h, hd])?;
        let x1 = r.b.slice(x3, &[0, 0, 0], &[t, h, hd / 2])?;
        let x2 = r.b.slice(x3, &[0, 0, hd / 2], &[t, h, hd])?;
        let neg = r.b.unary("negate", x2);
        let rotated = r.b.concatenate(&[neg, x1], 2)?;
        let cos = r.b.broadcast(rot.0, &[t, h, hd], &[0, 2])?;
        let sin = r.b.broadcast(rot.1, &[t, h, hd], &[0, 2])?;
        let a = r.b.binary("multiply", x3, cos)?;
        let c = r.b.binary("multiply", rotated, sin)?;
        let y = r.b.binary("add", a, c)?;
        r.b.reshape(y, &d)
    }

    fn project(&mut self, x: Node, w: &Vec<(Node, Option<Node>)>) -> Result<Vec<Node>> {
        let mut r = self.b();
        let rows = dims_of(&r, x)[0];
        w.iter()
            .map(|&(m, bias)| {
                let y = r.b.dot(x, m, 1, 1)?;
                match bias {
                    Some(b) => {
                        let out = dims_of(&r, m)[0];
                        let bb = r.b.broadcast(b, &[rows, out], &[1])?;
                        r.b.binary("add", y, bb)
                    }
                    None => Ok(y),
                }
            })
            .collect()
    }

    fn gated(&mut self, x: Node, w: &Vec<(Node, Option<Node>)>, act: Activation) -> Result<Node> {
        let Activation::Silu = act;
        let parts = self.project(x, w)?;
        let [g, u] = parts[..] else {
            return Err(Error::Internal("a gated MLP needs a (gate, up) projection".into()));
        };
        let mut r = self.b();
        let sig = r.b.unary("logistic", g);
        let silu = r.b.binary("multiply", g, sig)?;
        r.b.binary("multiply", silu, u)
    }

    fn attend(&mut self, spec: &AttnSpec, q: Node, k: Node, v: Node) -> Result<Node> {
        let (t, s) = (self.t(), self.cache_len);
        let (nh, nkv, hd) = (spec.heads as i64, spec.kv_heads as i64, spec.head_dim as i64);
        let g = nh / nkv;
        let position = self.position;
        let p0 = self.start_pos as i64;
        let mask = self.masks.iter().find(|(w, _)| *w == spec.window).map(|&(_, m)| m);
        let mut r = self.b();
        let position = match position {
            Some(p) => p,
            None => r.param_s32("position", &[], vec![p0 as i32]),
        };
        let mask = match mask {
            Some(m) => m,
            None => {
                // Additive mask over the cache: query i sees keys j <= i (and j > i - window), a
                // large finite negative elsewhere (never -inf: no NaN from an all-masked row).
                let visible = |q: i64, j: i64| j <= q && spec.window.is_none_or(|w| j > q - w as i64);
                let m: Vec<f32> = (0..t * s).map(|i| if visible(p0 + i / s, i % s) { 0.0 } else { -1e30 }).collect();
                let name = match spec.window {
                    Some(w) => format!("mask_window{w}"),
                    None => "mask".to_string(),
                };
                r.param_f32(&name, &[t, s], m)
            }
        };
        let zero = r.b.constant_s32(0);
        let mut cached = Vec::with_capacity(2);
        for (name, new) in [("k", k), ("v", v)] {
            let cache = r.param_f32(&format!("l{}.{name}_cache", spec.layer), &[s, nkv, hd], vec![0.0; (s * nkv * hd) as usize]);
            let new = r.b.reshape(new, &[t, nkv, hd])?;
            cached.push(r.b.dynamic_update_slice(cache, new, &[position, zero, zero])?);
        }
        let (kc, vc) = (cached[0], cached[1]);
        // Heads are kv-major (head h uses kv head h / g): fold each kv head's g query heads into rows.
        let q4 = r.b.reshape(q, &[t, nkv, g, hd])?;
        let qt = r.b.transpose(q4, &[1, 2, 0, 3])?;
        let qb = r.b.reshape(qt, &[nkv, g * t, hd])?;
        let kt = r.b.transpose(kc, &[1, 0, 2])?;
        let vt = r.b.transpose(vc, &[1, 0, 2])?;
        let scores = r.b.dot_general(qb, kt, &[0], &[0], 2, 2)?;
        let sc = r.b.full(spec.scale_or_default(), &[nkv, g * t, s])?;
        let scores = r.b.binary("multiply", scores, sc)?;
        let m4 = r.b.broadcast(mask, &[nkv, g, t, s], &[2, 3])?;
        let m3 = r.b.reshape(m4, &[nkv, g * t, s])?;
        let scores = r.b.binary("add", scores, m3)?;
        let max = r.b.reduce(scores, &[2], "maximum")?;
        let max = r.b.broadcast(max, &[nkv, g * t, s], &[0, 1])?;
        let shifted = r.b.binary("subtract", scores, max)?;
        let e = r.b.unary("exponential", shifted);
        let z = r.b.reduce(e, &[2], "add")?;
        let z = r.b.broadcast(z, &[nkv, g * t, s], &[0, 1])?;
        let p = r.b.binary("divide", e, z)?;
        let out = r.b.dot_general(p, vt, &[0], &[0], 2, 1)?;
        let out = r.b.reshape(out, &[nkv, g, t, hd])?;
        let out = r.b.transpose(out, &[2, 0, 1, 3])?;
        let out = r.b.reshape(out, &[t, nh * hd])?;
        drop(r);
        self.position = Some(position);
        if !self.masks.iter().any(|(w, _)| *w == spec.window) {
            self.masks.push((spec.window, mask));
        }
        self.caches.extend([kc, vc]);
        Ok(out)
    }

    fn all_reduce(&mut self, x: Node) -> Result<Node> {
        if self.ranks == 1 {
            return Ok(x);
        }
        let group: Vec<i64> = (0..self.ranks as i64).collect();
        self.b().b.all_reduce_sum(x, &[group])
    }

    fn add(&mut self, x: &mut Node, y: Node) -> Result<()> {
        *x = self.b().b.binary("add", *x, y)?;
        Ok(())
    }

    fn output_rows(&mut self, x: Node) -> Result<Node> {
        let t = self.t();
        let mut r = self.b();
        let w = dims_of(&r, x)[1];
        r.b.slice(x, &[t - 1, 0], &[t, w])
    }
}

/// One rank's recorded graph: its serialized module and what each parameter is bound to.
pub struct RecordedRank {
    pub module: Vec<u8>,
    pub bindings: Vec<Binding>,
}

/// Records the step that appends `tokens` at `start_pos` to caches of `cache_len` positions, for
/// each rank of `shapes`: the same graph on every rank, bound to that rank's shards. The graph
/// depends only on (tokens.len(), cache_len) — context encoding when the prompt starts at 0, token
/// generation for one token — its inputs (token ids, position, rotary tables, masks, caches) carry
/// the rest. Outputs: the rank's logits for the last token ([1, vocab/ranks]) and every layer's
/// K and V cache (aliased to their inputs; the caller feeds them to the next step).
pub fn record_step(
    cfg: &ModelConfig,
    shapes: &[RankShape],
    ranks: Vec<HostWeights>,
    tokens: &[u32],
    start_pos: usize,
    cache_len: usize,
) -> Result<Vec<RecordedRank>> {
    use prost::Message;
    if tokens.is_empty() || tokens.iter().any(|&t| t as usize >= cfg.vocab_size) {
        return Err(Error::invalid(format!("record a step of 1 or more token ids below the vocabulary size {}", cfg.vocab_size)));
    }
    if start_pos + tokens.len() > cache_len || cache_len > 1 << 20 {
        return Err(Error::invalid(format!(
            "a step of {} tokens at position {start_pos} does not fit a cache of {cache_len} positions (at most 2^20)",
            tokens.len()
        )));
    }
    let mut out = Vec::with_capacity(ranks.len());
    for (shape, w) in shapes.iter().zip(ranks) {
        let rec = RefCell::new(Recorder { b: ModuleBuilder::new("kvgen_prefill"), bindings: vec![] });
        let weights = w.build(&mut HloWeights { rec: &rec, count: 0, embed: None })?;
        let model = LlamaModel::new(cfg.clone(), shape.clone(), weights);
        let mut ops = HloOps {
            rec: &rec,
            tokens: tokens.to_vec(),
            start_pos,
            cache_len: cache_len as i64,
            ranks: shapes.len(),
            caches: vec![],
            position: None,
            masks: vec![],
        };
        let logits = model.forward(&mut ops)?;
        let caches = std::mem::take(&mut ops.caches);
        drop(ops);
        let Recorder { b, bindings } = rec.into_inner();
        // Each cache output aliases its parameter.
        let mut outputs = vec![logits];
        let mut aliases = vec![];
        for (i, c) in caches.iter().enumerate() {
            outputs.push(*c);
            let name = format!("l{}.{}_cache", i / 2, if i % 2 == 0 { "k" } else { "v" });
            let param = bindings.iter().position(|bd| bd.name == name).ok_or_else(|| Error::Internal(format!("no parameter {name}")))?;
            aliases.push((i + 1, param));
        }
        let module = b.finish(&outputs, &aliases)?;
        out.push(RecordedRank { module: module.encode_to_vec(), bindings });
    }
    Ok(out)
}
