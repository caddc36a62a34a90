//! The graph set of a model for one tensor-parallel degree: buckets, the recorded graphs, the
//! manifest, and `export` (graphs + manifest.json in a directory, for neuronx-cc).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{ElemType, GraphEntry, Manifest, MemoryEstimate, ModelInfo, Phase, Role, FORMAT};
use super::record::{rank_tensors, record_graph, GraphKey, RankTensors, SetShape};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::host::HostWeights;
use crate::model::llama::LlamaWeights;
use crate::model::tp::TpPlan;

/// The smallest context bucket (TNx and NxDI start at 128) unless the context is shorter.
pub const MIN_BUCKET: usize = 128;
/// Runtime allowance per NeuronCore beyond weights and caches (DMA rings, scratch, step I/O).
pub const MARGIN_BYTES: u64 = 1 << 30;

/// What to export, as the user asked for it (None: the defaults).
#[derive(Clone, Debug)]
pub struct SetOptions {
    pub tp_degree: usize,
    pub batch_sizes: Vec<usize>,
    pub buckets: Option<Vec<usize>>,
    pub max_context: Option<usize>,
    pub dtype: ElemType,
}

/// The validated shape of the set: cache size, context buckets, batch sizes.
#[derive(Clone, Debug)]
pub struct SetPlan {
    pub shape: SetShape,
    pub buckets: Vec<usize>,
    pub batch_sizes: Vec<usize>,
}

/// Buckets: powers of two from 128 (or the context, if shorter) up to max_context, which is
/// always the last; explicit buckets are checked instead.
pub fn plan_set(cfg: &ModelConfig, opts: &SetOptions) -> Result<SetPlan> {
    let limit = cfg.max_position_embeddings;
    let max_context = opts.max_context.unwrap_or(limit);
    if max_context == 0 || max_context > limit {
        return Err(Error::invalid(format!(
            "max_context={max_context} must be 1..={limit} (the model's max_position_embeddings); pass a smaller max_context"
        )));
    }
    let mut batch_sizes = opts.batch_sizes.clone();
    batch_sizes.sort_unstable();
    batch_sizes.dedup();
    if batch_sizes.is_empty() || batch_sizes[0] == 0 || batch_sizes[batch_sizes.len() - 1] > 256 {
        return Err(Error::invalid(format!(
            "batch_sizes={:?} must be one or more sizes from 1 to 256, e.g. (1,) or (1, 4)",
            opts.batch_sizes
        )));
    }
    let buckets = match &opts.buckets {
        Some(b) => {
            let mut b = b.clone();
            b.sort_unstable();
            b.dedup();
            if b.is_empty() || b[0] == 0 || b[b.len() - 1] > max_context {
                return Err(Error::invalid(format!(
                    "buckets={:?} must be lengths from 1 to max_context={max_context}",
                    opts.buckets.as_deref().unwrap_or(&[])
                )));
            }
            if b[b.len() - 1] != max_context {
                b.push(max_context);
            }
            b
        }
        None => {
            let mut b = vec![];
            let mut n = MIN_BUCKET.min(max_context).next_power_of_two().min(max_context);
            while n < max_context {
                b.push(n);
                n *= 2;
            }
            b.push(max_context);
            b
        }
    };
    let shape = SetShape { ranks: opts.tp_degree, max_batch: batch_sizes[batch_sizes.len() - 1], max_context, dtype: opts.dtype };
    Ok(SetPlan { shape, buckets, batch_sizes })
}

/// Every graph of the set: context encoding (batch 1) per bucket, token generation per batch
/// size and bucket.
pub fn graph_keys(plan: &SetPlan) -> Vec<GraphKey> {
    let mut keys: Vec<GraphKey> =
        plan.buckets.iter().map(|&n| GraphKey { phase: Phase::ContextEncoding, batch: 1, bucket: n }).collect();
    for &b in &plan.batch_sizes {
        keys.extend(plan.buckets.iter().map(|&n| GraphKey { phase: Phase::TokenGeneration, batch: b, bucket: n }));
    }
    keys
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest and the graphs' bytes (in manifest order), recorded from one rank's tensors (every
/// rank runs the same graphs).
pub fn build_set(cfg: &ModelConfig, rank: &RankTensors, plan: &SetPlan) -> Result<(Manifest, Vec<Vec<u8>>)> {
    let mut graphs = vec![];
    let mut modules = vec![];
    for key in graph_keys(plan) {
        let (bytes, inputs, outputs) = record_graph(rank, &plan.shape, key)?;
        let name = key.name();
        graphs.push(GraphEntry {
            file: format!("{name}.hlo.pb"),
            sha256: sha256_hex(&bytes),
            name,
            phase: key.phase,
            batch: key.batch,
            bucket: key.bucket,
            inputs,
            outputs,
            neff: None,
        });
        modules.push(bytes);
    }
    let bytes_of = |role: Role| rank.tensors.iter().filter(|t| t.role == role).map(|t| t.spec.byte_len() as u64).sum::<u64>();
    let weights = bytes_of(Role::Weight) + bytes_of(Role::Table);
    let kv_caches = bytes_of(Role::Cache);
    let manifest = Manifest {
        format: FORMAT.into(),
        kvgen_version: env!("CARGO_PKG_VERSION").into(),
        model: ModelInfo {
            architecture: format!("{:?}", cfg.architecture),
            num_hidden_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            intermediate_size: cfg.intermediate_size,
            vocab_size: cfg.vocab_size,
        },
        tp_degree: plan.shape.ranks,
        dtype: match plan.shape.dtype {
            ElemType::Bfloat16 => "bfloat16",
            _ => "float32",
        }
        .into(),
        max_context: plan.shape.max_context,
        max_batch: plan.shape.max_batch,
        batch_sizes: plan.batch_sizes.clone(),
        buckets: plan.buckets.clone(),
        tensors: rank.tensors.clone(),
        graphs,
        memory_per_rank: MemoryEstimate { weights, kv_caches, margin: MARGIN_BYTES, total: weights + kv_caches + MARGIN_BYTES },
    };
    Ok((manifest, modules))
}

/// Every rank's tensors, each rank's checked to describe the same graphs as rank 0's.
pub fn all_rank_tensors(cfg: &ModelConfig, plan: &TpPlan, shards: Vec<HostWeights>, set: &SetShape, keep: bool) -> Result<Vec<RankTensors>> {
    let ranks: Vec<RankTensors> =
        plan.shapes.iter().zip(shards).map(|(s, w)| rank_tensors(cfg, s, w, set, keep)).collect::<Result<_>>()?;
    if let Some(first) = ranks.first() {
        if let Some(r) = ranks.iter().position(|r| r.tensors != first.tensors) {
            return Err(Error::Internal(format!("rank {r}'s tensors differ from rank 0's: the ranks would run different graphs")));
        }
    }
    Ok(ranks)
}

/// Writes the graphs and manifest.json into `out_dir` (created if needed); returns the manifest path.
pub fn write_set(out_dir: &Path, manifest: &Manifest, modules: &[Vec<u8>]) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    for (g, bytes) in manifest.graphs.iter().zip(modules) {
        let path = out_dir.join(&g.file);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    manifest.write(out_dir)?;
    Ok(out_dir.join(super::manifest::FILE_NAME))
}

/// `kvgen.neuron.export`: records the set from the checkpoint's rank-0 shard (the graphs do not
/// depend on weight values, and every rank runs the same graphs).
pub fn export(cfg: &ModelConfig, weights: LlamaWeights, out_dir: &Path, opts: &SetOptions) -> Result<PathBuf> {
    let tp = TpPlan::new(cfg, opts.tp_degree)?;
    let plan = plan_set(cfg, opts)?;
    let mut shards = tp.shard(cfg, weights)?;
    shards.truncate(1);
    let rank0 = shards.pop().ok_or_else(|| Error::Internal("no rank 0".into()))?;
    let tensors = rank_tensors(cfg, &tp.shapes[0], rank0, &plan.shape, false)?;
    let (manifest, modules) = build_set(cfg, &tensors, &plan)?;
    write_set(out_dir, &manifest, &modules)
}
