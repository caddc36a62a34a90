//! A backend that records instead of computing: the family forward of `model/` run through
//! [`GraphOps`] emits one static HLO graph per (phase, batch, bucket), the same for every
//! tensor-parallel rank (ranks differ only in the weight shards bound to the graph).
//!
//! Every graph has the same persistent parameters, in the same order: the rank's weights, the
//! rotary tables ([max_context, head_dim], gathered at the step's positions) and each layer's K and
//! V caches ([max_batch, max_context, kv_heads, head_dim], aliased input->output). Then the step
//! inputs:
//! - context encoding (`cte_b1_n<N>`): `tokens` [N] (a prompt from position 0, right-padded to the
//!   bucket), `slot` (the cache row), `last` (index of the last real token, whose logits come back).
//!   The prompt attends to itself; its keys/values are written into the slot's row.
//! - token generation (`tkg_b<B>_n<N>`): `tokens` [B] and `positions` [B], one token per cache row
//!   0..B-1, written at its position, attending over the first N positions of its row.
//!
//! Masks come from positions inside the graph (causal, and the sliding window where a layer has
//! one) as selects, so a masked score never meets a padded row's values. Arithmetic is f32; a
//! bfloat16 graph keeps weights and caches in bfloat16 and converts at use.

use std::collections::HashMap;

use super::hlo::builder::{ModuleBuilder, Node, Shape};
use super::hlo::proto::PrimitiveType;
use super::manifest::{ElemType, GraphInput, GraphOutput, PersistentTensor, Phase, Role, ShardRule, TensorSpec};
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::model::host::{HostLinear, HostWeights, WeightBuilder};
use crate::model::llama::LlamaModel;
use crate::model::ops::{Activation, AttnSpec, Ops, RankShape, WeightKinds};
use crate::model::rope::Rope;
use crate::tensor::{DType, Matrix};

/// Weights as indices into the persistent tensor list.
pub struct NamedKinds;

impl WeightKinds for NamedKinds {
    type Linear = Vec<(usize, Option<usize>)>;
    type Norm = usize;
    type Embedding = usize;
}

/// The shape every graph of a set shares.
#[derive(Clone, Debug)]
pub struct SetShape {
    pub ranks: usize,
    pub max_batch: usize,
    pub max_context: usize,
    /// Weights and caches: F32 or BF16.
    pub dtype: ElemType,
}

/// One graph of the set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphKey {
    pub phase: Phase,
    pub batch: usize,
    pub bucket: usize,
}

impl GraphKey {
    pub fn name(&self) -> String {
        format!("{}_b{}_n{}", self.phase.prefix(), self.batch, self.bucket)
    }
}

/// A rank's persistent tensors (specs; with their values when collected) and its model over them.
pub struct RankTensors {
    pub tensors: Vec<PersistentTensor>,
    /// The value of each tensor (None for caches, zero-filled on the device), when collected.
    pub values: Vec<Option<TensorValue>>,
    pub model: LlamaModel<NamedKinds>,
}

/// A tensor's value, turned into bytes only when it is uploaded (one tensor at a time: the
/// host never holds a second full copy of the weights, and mapped bf16 checkpoints stay mapped).
pub enum TensorValue {
    Bytes(Vec<u8>),
    /// A matrix in the graph's dtype, with zero rows appended.
    Matrix { m: Matrix, dtype: ElemType, pad_rows: usize },
}

impl TensorValue {
    pub fn into_bytes(self) -> Result<Vec<u8>> {
        match self {
            TensorValue::Bytes(b) => Ok(b),
            TensorValue::Matrix { m, dtype, pad_rows } => matrix_bytes(m, dtype, pad_rows),
        }
    }
}

fn elem(dtype: ElemType) -> PrimitiveType {
    match dtype {
        ElemType::Float32 => PrimitiveType::F32,
        ElemType::Bfloat16 => PrimitiveType::Bf16,
        ElemType::Int32 => PrimitiveType::S32,
    }
}

/// Bytes of `m` in `dtype`, `pad_rows` zero rows appended, in a buffer reserved fallibly.
fn matrix_bytes(m: Matrix, dtype: ElemType, pad_rows: usize) -> Result<Vec<u8>> {
    let oom = |e: crate::mem::AllocFailed| e.into_error("a weight shard for the Neuron graphs", "free memory");
    let total = (m.rows + pad_rows) * m.cols * dtype.size();
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| Error::OutOfMemory(format!("cannot reserve {total} bytes for a weight shard")))?;
    match dtype {
        ElemType::Bfloat16 => match m.data.into_dtype(DType::BF16).map_err(oom)? {
            crate::tensor::Data::BF16(b) => b.iter().for_each(|x| out.extend_from_slice(&x.to_bits().to_le_bytes())),
            _ => return Err(Error::Internal("bf16 conversion gave another dtype".into())),
        },
        _ => m.data.try_to_f32_vec().map_err(oom)?.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out.resize(total, 0);
    Ok(out)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Records each weight's spec and shard rule, and (when `keep`) its bytes.
struct SpecBuilder<'a> {
    dtype: ElemType,
    keep: bool,
    /// Rows every rank's lm_head shard has (the last rank's padded with zero rows).
    head_rows: usize,
    out: &'a mut RankTensors,
    /// The embedding, for a tied head's rows.
    embed: Option<Matrix>,
}

impl SpecBuilder<'_> {
    fn push(&mut self, name: String, shape: Vec<i64>, dtype: ElemType, shard: ShardRule, value: impl FnOnce() -> TensorValue) -> Result<usize> {
        let v = self.keep.then(value);
        self.out.tensors.push(PersistentTensor { spec: TensorSpec { name, shape, dtype }, role: Role::Weight, shard });
        self.out.values.push(v);
        Ok(self.out.tensors.len() - 1)
    }

    fn vector(&mut self, name: String, v: Vec<f32>, shard: ShardRule) -> Result<usize> {
        let n = v.len() as i64;
        self.push(name, vec![n], ElemType::Float32, shard, || TensorValue::Bytes(f32_bytes(&v)))
    }

    fn matrix(&mut self, name: String, m: Matrix, shard: ShardRule, pad_rows: usize) -> Result<usize> {
        let shape = vec![(m.rows + pad_rows) as i64, m.cols as i64];
        let dtype = self.dtype;
        self.push(name, shape, dtype, shard, || TensorValue::Matrix { m, dtype, pad_rows })
    }
}

impl WeightBuilder for SpecBuilder<'_> {
    type Kinds = NamedKinds;

    fn linear(&mut self, name: &str, l: HostLinear) -> Result<Vec<(usize, Option<usize>)>> {
        // Fused projections keep the checkpoint's names, one tensor each.
        let (prefix, last) = name.rsplit_once('.').unwrap_or(("", name));
        let parts: Vec<&str> = match last {
            "qkv" => vec!["q_proj", "k_proj", "v_proj"],
            "gate_up" => vec!["gate_proj", "up_proj"],
            other => vec![other],
        };
        if parts.len() != l.parts.len() {
            return Err(Error::Internal(format!("{name} has {} parts", l.parts.len())));
        }
        let (rule, bias_rule) = match last {
            "qkv" | "gate_up" => (ShardRule::Column, ShardRule::Column),
            "lm_head" => (ShardRule::Vocab, ShardRule::Vocab),
            _ => (ShardRule::Row, ShardRule::RankZero),
        };
        let mut out = Vec::with_capacity(parts.len());
        for (part, p) in parts.iter().zip(l.parts) {
            let full = if prefix.is_empty() { part.to_string() } else { format!("{prefix}.{part}") };
            let pad = if rule == ShardRule::Vocab { self.head_rows.saturating_sub(p.w.rows) } else { 0 };
            let w = self.matrix(format!("{full}.weight"), p.w, rule, pad)?;
            let b = match p.bias {
                Some(b) => Some(self.vector(format!("{full}.bias"), b, bias_rule)?),
                None => None,
            };
            out.push((w, b));
        }
        Ok(out)
    }

    fn norm(&mut self, name: &str, v: Vec<f32>) -> Result<usize> {
        self.vector(format!("{name}.weight"), v, ShardRule::Replicated)
    }

    fn embedding(&mut self, m: Matrix) -> Result<usize> {
        // A tied head needs rows of it: keep a view (row windows share the buffer).
        let m = m.into_shared();
        self.embed = m.row_window(0..m.rows);
        self.matrix("embed_tokens.weight".into(), m, ShardRule::Replicated, 0)
    }

    /// The rank's rows of the embedding as a tensor of its own: a slice at a rank-dependent offset
    /// would make the ranks' graphs differ, and every rank must run the same graph.
    fn tied_head(&mut self, _embed: &usize, rows: std::ops::Range<usize>) -> Result<Vec<(usize, Option<usize>)>> {
        let embed = self.embed.take().ok_or_else(|| Error::Internal("a tied head before the embedding".into()))?;
        let pad = self.head_rows.saturating_sub(rows.len());
        let m = embed.row_window(rows.clone()).ok_or_else(|| Error::Internal(format!("embedding rows {rows:?}")))?;
        Ok(vec![(self.matrix("lm_head.weight".into(), m, ShardRule::Vocab, pad)?, None)])
    }
}

/// One rank's tensors: weights (named, with shard rules), rotary tables, caches. `keep`: collect
/// the bytes to upload.
pub fn rank_tensors(cfg: &ModelConfig, shape: &RankShape, w: HostWeights, set: &SetShape, keep: bool) -> Result<RankTensors> {
    if matches!(cfg.rope_scaling, RopeScaling::Dynamic { .. }) {
        return Err(Error::invalid(
            "rope_scaling type \"dynamic\" recomputes the rotary tables from the sequence length, which a static \
             Neuron graph cannot; use device=\"cpu\" or \"cuda\" for this model",
        ));
    }
    let mut out = RankTensors { tensors: vec![], values: vec![], model: LlamaModel::new(cfg.clone(), shape.clone(), empty_weights()) };
    let head_rows = cfg.vocab_size.div_ceil(shape.ranks);
    let weights = w.build(&mut SpecBuilder { dtype: set.dtype, keep, head_rows, out: &mut out, embed: None })?;
    out.model = LlamaModel::new(cfg.clone(), shape.clone(), weights);
    let (s, hd) = (set.max_context, out.model.rope.head_dim());
    let (cos, sin) = out.model.rope.tables(0..s, s);
    let mut tables = vec![("rope0.cos", cos), ("rope0.sin", sin)];
    // Gemma 3's sliding layers read a second rope (rotary index 1).
    if let Some(local) = &out.model.local_rope {
        let (cos, sin) = local.tables(0..s, s);
        tables.extend([("rope1.cos", cos), ("rope1.sin", sin)]);
    }
    for (name, v) in tables {
        out.tensors.push(PersistentTensor {
            spec: TensorSpec { name: name.into(), shape: vec![s as i64, hd as i64], dtype: ElemType::Float32 },
            role: Role::Table,
            shard: ShardRule::Replicated,
        });
        out.values.push(keep.then(|| TensorValue::Bytes(f32_bytes(&v))));
    }
    for layer in 0..cfg.num_hidden_layers {
        for kv in ["k", "v"] {
            out.tensors.push(PersistentTensor {
                spec: TensorSpec {
                    name: format!("layers.{layer}.{kv}_cache"),
                    shape: vec![set.max_batch as i64, s as i64, shape.kv_heads as i64, cfg.head_dim as i64],
                    dtype: set.dtype,
                },
                role: Role::Cache,
                shard: ShardRule::Local,
            });
            out.values.push(None);
        }
    }
    Ok(out)
}

fn empty_weights() -> crate::model::llama::Weights<NamedKinds> {
    crate::model::llama::Weights { embed: 0, layers: vec![], norm: 0, head: vec![] }
}

/// Records one graph of the set from a rank's tensors: the serialized module and its inputs and
/// outputs for the manifest (file and sha256 are the exporter's).
pub fn record_graph(rank: &RankTensors, set: &SetShape, key: GraphKey) -> Result<(Vec<u8>, Vec<GraphInput>, Vec<GraphOutput>)> {
    use prost::Message;
    let (batch, bucket) = (key.batch as i64, key.bucket as i64);
    let cte = key.phase == Phase::ContextEncoding;
    if batch < 1 || batch > set.max_batch as i64 || bucket < 1 || bucket > set.max_context as i64 || (cte && batch != 1) {
        return Err(Error::invalid(format!(
            "graph {}: batch must be 1..={} (1 for context encoding) and the bucket 1..={}",
            key.name(),
            set.max_batch,
            set.max_context
        )));
    }
    let mut b = ModuleBuilder::new(&key.name());
    let mut inputs = Vec::new();
    let mut params = Vec::with_capacity(rank.tensors.len());
    for t in &rank.tensors {
        params.push(b.parameter(Shape::new(elem(t.spec.dtype), &t.spec.shape), &t.spec.name));
        let neff_name = if t.role == Role::Cache { format!("{}.must_alias_input", t.spec.name) } else { t.spec.name.clone() };
        inputs.push(GraphInput { spec: t.spec.clone(), role: t.role, neff_name });
    }
    let mut step = |b: &mut ModuleBuilder, name: &str, dims: &[i64]| {
        let spec = TensorSpec { name: name.into(), shape: dims.to_vec(), dtype: ElemType::Int32 };
        inputs.push(GraphInput { spec, role: Role::Step, neff_name: name.into() });
        b.parameter(Shape::new(PrimitiveType::S32, dims), name)
    };
    let (rows, steps) = if cte {
        let tokens = step(&mut b, "tokens", &[bucket]);
        let slot = step(&mut b, "slot", &[]);
        let last = step(&mut b, "last", &[]);
        let positions = b.iota(&[bucket], 0);
        (bucket, StepNodes { tokens, positions, slot: Some(slot), last: Some(last) })
    } else {
        let tokens = step(&mut b, "tokens", &[batch]);
        let positions = step(&mut b, "positions", &[batch]);
        (batch, StepNodes { tokens, positions, slot: None, last: None })
    };
    let by_name = rank.tensors.iter().enumerate().map(|(i, t)| (t.spec.name.clone(), i)).collect();
    let mut ops = GraphOps { b, key, set, params, by_name, step: steps, rows, caches: vec![], masks: vec![] };
    let logits = rank.model.forward(&mut ops)?;
    let GraphOps { b, caches, .. } = ops;
    let mut outputs = vec![GraphOutput {
        spec: TensorSpec { name: "logits".into(), shape: b.shape(logits).dims.clone(), dtype: ElemType::Float32 },
        aliases: None,
        neff_name: "logits".into(),
    }];
    let mut nodes = vec![logits];
    let mut aliases = vec![];
    for (idx, node) in caches {
        let t = &rank.tensors[idx];
        aliases.push((nodes.len(), idx));
        nodes.push(node);
        outputs.push(GraphOutput { spec: t.spec.clone(), aliases: Some(t.spec.name.clone()), neff_name: t.spec.name.clone() });
    }
    let names: Vec<String> = outputs.iter().map(|o| o.neff_name.clone()).collect();
    let module = b.finish_named(&nodes, &names, &aliases)?;
    Ok((module.encode_to_vec(), inputs, outputs))
}

struct StepNodes {
    /// Token ids, one per row of the step (s32).
    tokens: Node,
    /// Each row's position (s32).
    positions: Node,
    slot: Option<Node>,
    last: Option<Node>,
}

/// One graph being recorded.
struct GraphOps<'a> {
    b: ModuleBuilder,
    key: GraphKey,
    set: &'a SetShape,
    /// Parameter node of each persistent tensor.
    params: Vec<Node>,
    by_name: HashMap<String, usize>,
    step: StepNodes,
    /// Rows of the step's activations (bucket tokens, or batch rows).
    rows: i64,
    /// (tensor index, updated cache) for the root tuple.
    caches: Vec<(usize, Node)>,
    /// The visibility mask of each distinct sliding window, [batch, tokens, keys] PRED.
    masks: Vec<(Option<usize>, Node)>,
}

impl GraphOps<'_> {
    /// A weight as f32 (converted in the graph when stored in bf16).
    fn weight(&mut self, idx: usize) -> Node {
        let p = self.params[idx];
        if self.b.shape(p).ty == PrimitiveType::F32 {
            p
        } else {
            self.b.convert(p, PrimitiveType::F32)
        }
    }

    fn tensor(&self, name: &str) -> Result<usize> {
        self.by_name.get(name).copied().ok_or_else(|| Error::Internal(format!("no graph tensor {name}")))
    }

    fn dims(&self, n: Node) -> Vec<i64> {
        self.b.shape(n).dims.clone()
    }

    fn s32(&mut self, v: i64, dims: &[i64]) -> Result<Node> {
        let c = self.b.constant_s32(v as i32);
        self.b.broadcast(c, dims, &[])
    }

    /// (batch, tokens per row, keys) of this graph's attention.
    fn attn_dims(&self) -> (i64, i64, i64) {
        match self.key.phase {
            Phase::ContextEncoding => (1, self.key.bucket as i64, self.key.bucket as i64),
            Phase::TokenGeneration => (self.key.batch as i64, 1, self.key.bucket as i64),
        }
    }

    /// Key j is visible to the query at position p iff j <= p (and j > p - window).
    fn mask(&mut self, window: Option<usize>) -> Result<Node> {
        if let Some(&(_, m)) = self.masks.iter().find(|(w, _)| *w == window) {
            return Ok(m);
        }
        let (bt, t, k) = self.attn_dims();
        let qpos = self.b.reshape(self.step.positions, &[bt, t])?;
        let q = self.b.broadcast(qpos, &[bt, t, k], &[0, 1])?;
        let keys = self.b.iota(&[bt, t, k], 2);
        let mut vis = self.b.compare(keys, q, "LE")?;
        if let Some(w) = window {
            let wn = self.s32(w as i64, &[bt, t, k])?;
            let lo = self.b.binary("subtract", q, wn)?;
            let inside = self.b.compare(keys, lo, "GT")?;
            vis = self.b.binary("and", vis, inside)?;
        }
        self.masks.push((window, vis));
        Ok(vis)
    }

    /// Softmax attention of q [bt*t, nh*hd] over keys/values [bt, k, nkv, hd] (f32).
    fn attention(&mut self, spec: &AttnSpec, q: Node, keys: Node, vals: Node) -> Result<Node> {
        let (bt, t, k) = self.attn_dims();
        let (nh, nkv, hd) = (spec.heads as i64, spec.kv_heads as i64, spec.head_dim as i64);
        let g = nh / nkv;
        let mask = self.mask(spec.window)?;
        let b = &mut self.b;
        // Heads are kv-major (head h uses kv head h / g): fold each kv head's g query heads into rows.
        let q5 = b.reshape(q, &[bt, t, nkv, g, hd])?;
        let qt = b.transpose(q5, &[0, 2, 3, 1, 4])?;
        let qb = b.reshape(qt, &[bt, nkv, g * t, hd])?;
        let kt = b.transpose(keys, &[0, 2, 1, 3])?;
        let vt = b.transpose(vals, &[0, 2, 1, 3])?;
        let dims = [bt, nkv, g * t, k];
        let scores = b.dot_general(qb, kt, &[0, 1], &[0, 1], 3, 3)?;
        let sc = b.full(spec.scale_or_default(), &dims)?;
        let mut scores = b.binary("multiply", scores, sc)?;
        if let Some(cap) = spec.softcap {
            scores = softcap(b, scores, cap)?;
        }
        let m5 = b.broadcast(mask, &[bt, nkv, g, t, k], &[0, 3, 4])?;
        let m4 = b.reshape(m5, &dims)?;
        // A large finite negative (never -inf: an all-masked padded row stays NaN-free).
        let neg = b.full(-1e30, &dims)?;
        let scores = b.select(m4, scores, neg)?;
        let max = b.reduce(scores, &[3], "maximum")?;
        let max = b.broadcast(max, &dims, &[0, 1, 2])?;
        let shifted = b.binary("subtract", scores, max)?;
        let e = b.unary("exponential", shifted);
        let z = b.reduce(e, &[3], "add")?;
        let z = b.broadcast(z, &dims, &[0, 1, 2])?;
        let p = b.binary("divide", e, z)?;
        let out = b.dot_general(p, vt, &[0, 1], &[0, 1], 3, 2)?;
        let out = b.reshape(out, &[bt, nkv, g, t, hd])?;
        let out = b.transpose(out, &[0, 3, 1, 2, 4])?;
        b.reshape(out, &[bt * t, nh * hd])
    }

    fn store_as_cache(&mut self, x: Node) -> Node {
        match self.set.dtype {
            ElemType::Float32 => x,
            d => self.b.convert(x, elem(d)),
        }
    }

    fn as_f32(&mut self, x: Node) -> Node {
        if self.b.shape(x).ty == PrimitiveType::F32 {
            x
        } else {
            self.b.convert(x, PrimitiveType::F32)
        }
    }
}

/// tanh(x / cap) * cap, elementwise.
fn softcap(b: &mut ModuleBuilder, x: Node, cap: f32) -> Result<Node> {
    let d = b.shape(x).dims.clone();
    let c = b.full(cap, &d)?;
    let t = b.binary("divide", x, c)?;
    let t = b.unary("tanh", t);
    b.binary("multiply", t, c)
}

/// x [rows, w] * rsqrt(mean(x^2) + eps) * weight [w], in f32.
fn rms_norm(b: &mut ModuleBuilder, x: Node, w: Node, eps: f32) -> Result<Node> {
    let d = b.shape(x).dims.clone();
    let (rows, width) = (d[0], d[1]);
    let sq = b.binary("multiply", x, x)?;
    let sum = b.reduce(sq, &[1], "add")?;
    let n = b.full(width as f32, &[rows])?;
    let mean = b.binary("divide", sum, n)?;
    let e = b.full(eps, &[rows])?;
    let var = b.binary("add", mean, e)?;
    let inv = b.unary("rsqrt", var);
    let inv = b.broadcast(inv, &[rows, width], &[0])?;
    let normed = b.binary("multiply", x, inv)?;
    let wb = b.broadcast(w, &[rows, width], &[1])?;
    b.binary("multiply", wb, normed)
}

impl Ops for GraphOps<'_> {
    type Kinds = NamedKinds;
    type Act = Node;
    type Rotary = (Node, Node);

    fn embed(&mut self, table: &usize) -> Result<Node> {
        let rows = self.b.gather_rows(self.params[*table], self.step.tokens)?;
        Ok(self.as_f32(rows))
    }

    fn rotary(&mut self, index: usize, _rope: &Rope) -> Result<(Node, Node)> {
        let (cos, sin) = (self.tensor(&format!("rope{index}.cos"))?, self.tensor(&format!("rope{index}.sin"))?);
        let positions = self.step.positions;
        let cos = self.b.gather_rows(self.params[cos], positions)?;
        let sin = self.b.gather_rows(self.params[sin], positions)?;
        Ok((cos, sin))
    }

    fn rms_norm(&mut self, x: &Node, w: &usize, eps: f32) -> Result<Node> {
        let w = self.weight(*w);
        rms_norm(&mut self.b, *x, w, eps)
    }

    fn head_rms_norm(&mut self, x: Node, w: &usize, eps: f32) -> Result<Node> {
        let w = self.weight(*w);
        let d = self.dims(x);
        let hd = self.dims(w)[0];
        let heads = self.b.reshape(x, &[d[0] * d[1] / hd, hd])?;
        let normed = rms_norm(&mut self.b, heads, w, eps)?;
        self.b.reshape(normed, &d)
    }

    fn rope(&mut self, x: Node, heads: usize, rot: &(Node, Node)) -> Result<Node> {
        let d = self.dims(x);
        let b = &mut self.b;
        let (t, h) = (d[0], heads as i64);
        let hd = d[1] / h;
        let x3 = b.reshape(x, &[t, h, hd])?;
        let x1 = b.slice(x3, &[0, 0, 0], &[t, h, hd / 2])?;
        let x2 = b.slice(x3, &[0, 0, hd / 2], &[t, h, hd])?;
        let neg = b.unary("negate", x2);
        let rotated = b.concatenate(&[neg, x1], 2)?;
        let cos = b.broadcast(rot.0, &[t, h, hd], &[0, 2])?;
        let sin = b.broadcast(rot.1, &[t, h, hd], &[0, 2])?;
        let a = b.binary("multiply", x3, cos)?;
        let c = b.binary("multiply", rotated, sin)?;
        let y = b.binary("add", a, c)?;
        b.reshape(y, &d)
    }

    fn project(&mut self, x: Node, w: &Vec<(usize, Option<usize>)>) -> Result<Vec<Node>> {
        let rows = self.dims(x)[0];
        w.iter()
            .map(|&(m, bias)| {
                let m = self.weight(m);
                let y = self.b.dot(x, m, 1, 1)?;
                match bias {
                    Some(bi) => {
                        let out = self.dims(m)[0];
                        let bn = self.weight(bi);
                        let bb = self.b.broadcast(bn, &[rows, out], &[1])?;
                        self.b.binary("add", y, bb)
                    }
                    None => Ok(y),
                }
            })
            .collect()
    }

    fn gated(&mut self, x: Node, w: &Vec<(usize, Option<usize>)>, act: Activation) -> Result<Node> {
        let parts = self.project(x, w)?;
        let [g, u] = parts[..] else {
            return Err(Error::Internal("a gated MLP needs a (gate, up) projection".into()));
        };
        let b = &mut self.b;
        let gated = match act {
            Activation::Silu => {
                let sig = b.unary("logistic", g);
                b.binary("multiply", g, sig)?
            }
            Activation::GeluTanh => {
                // 0.5 * g * (1 + tanh(sqrt(2/pi) * (g + 0.044715 * g^3))), as torch's tanh GELU.
                let d = b.shape(g).dims.clone();
                let g2 = b.binary("multiply", g, g)?;
                let g3 = b.binary("multiply", g2, g)?;
                let c = b.full(0.044715, &d)?;
                let inner = b.binary("multiply", g3, c)?;
                let inner = b.binary("add", g, inner)?;
                let k = b.full(0.797_884_6, &d)?;
                let inner = b.binary("multiply", inner, k)?;
                let t = b.unary("tanh", inner);
                let one = b.full(1.0, &d)?;
                let t = b.binary("add", t, one)?;
                let half = b.full(0.5, &d)?;
                let hg = b.binary("multiply", g, half)?;
                b.binary("multiply", hg, t)?
            }
        };
        b.binary("multiply", gated, u)
    }

    fn attend(&mut self, spec: &AttnSpec, q: Node, k: Node, v: Node) -> Result<Node> {
        let (nkv, hd) = (spec.kv_heads as i64, spec.head_dim as i64);
        let (bt, t, keys) = self.attn_dims();
        let mut attend_kv = Vec::with_capacity(2);
        for (kind, new) in [("k", k), ("v", v)] {
            let idx = self.tensor(&format!("layers.{}.{kind}_cache", spec.layer))?;
            let cache = self.params[idx];
            let zero = self.b.constant_s32(0);
            let updated = match self.key.phase {
                Phase::ContextEncoding => {
                    // The prompt's keys/values into its slot's row; it attends to them directly.
                    let new4 = self.b.reshape(new, &[1, t, nkv, hd])?;
                    let stored = self.store_as_cache(new4);
                    let slot = self.step.slot.ok_or_else(|| Error::Internal("context encoding without a slot".into()))?;
                    attend_kv.push(new4);
                    self.b.dynamic_update_slice(cache, stored, &[slot, zero, zero, zero])?
                }
                Phase::TokenGeneration => {
                    // Row r's token at its position in cache row r, then rows 0..batch attend over
                    // their first `bucket` positions.
                    let mut c = cache;
                    for r in 0..bt {
                        let row = self.b.slice(new, &[r, 0], &[r + 1, nkv * hd])?;
                        let row = self.b.reshape(row, &[1, 1, nkv, hd])?;
                        let row = self.store_as_cache(row);
                        let pos = self.b.slice(self.step.positions, &[r], &[r + 1])?;
                        let pos = self.b.reshape(pos, &[])?;
                        let rn = self.b.constant_s32(r as i32);
                        c = self.b.dynamic_update_slice(c, row, &[rn, pos, zero, zero])?;
                    }
                    let window = self.b.slice(c, &[0, 0, 0, 0], &[bt, keys, nkv, hd])?;
                    let window = self.as_f32(window);
                    attend_kv.push(window);
                    c
                }
            };
            self.caches.push((idx, updated));
        }
        self.attention(spec, q, attend_kv[0], attend_kv[1])
    }

    fn all_reduce(&mut self, x: Node) -> Result<Node> {
        if self.set.ranks == 1 {
            return Ok(x);
        }
        let group: Vec<i64> = (0..self.set.ranks as i64).collect();
        self.b.all_reduce_sum(x, &[group])
    }

    fn add(&mut self, x: &mut Node, y: Node) -> Result<()> {
        *x = self.b.binary("add", *x, y)?;
        Ok(())
    }

    fn scale(&mut self, x: Node, factor: f32) -> Result<Node> {
        let d = self.dims(x);
        let f = self.b.full(factor, &d)?;
        self.b.binary("multiply", x, f)
    }

    fn softcap(&mut self, x: Node, cap: f32) -> Result<Node> {
        softcap(&mut self.b, x, cap)
    }

    fn output_rows(&mut self, x: Node) -> Result<Node> {
        match self.step.last {
            Some(last) => {
                let w = self.dims(x)[1];
                let zero = self.b.constant_s32(0);
                self.b.dynamic_slice(x, &[last, zero], &[1, w])
            }
            None => {
                debug_assert_eq!(self.dims(x)[0], self.rows);
                Ok(x)
            }
        }
    }
}
