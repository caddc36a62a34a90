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
    let mut shards = tp.shard_ranks(cfg, weights, 0..1)?;
    let rank0 = shards.pop().ok_or_else(|| Error::Internal("no rank 0".into()))?;
    let tensors = rank_tensors(cfg, &tp.shapes[0], rank0, &plan.shape, false)?;
    let (manifest, modules) = build_set(cfg, &tensors, &plan)?;
    write_set(out_dir, &manifest, &modules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::neuron::manifest::ShardRule;
    use crate::model::tp::tests::{config, weights};

    fn opts(tp: usize) -> SetOptions {
        SetOptions { tp_degree: tp, batch_sizes: vec![2, 1], buckets: Some(vec![4]), max_context: Some(8), dtype: ElemType::Float32 }
    }

    fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
    }

    #[test]
    fn buckets_are_powers_of_two_up_to_max_context() {
        let cfg = config(4, 2, true);
        let mut o = opts(2);
        o.buckets = None;
        o.max_context = Some(1000);
        let cfg_long = ModelConfig { max_position_embeddings: 4096, ..cfg.clone() };
        assert_eq!(plan_set(&cfg_long, &o).unwrap().buckets, vec![128, 256, 512, 1000]);
        o.max_context = Some(48);
        assert_eq!(plan_set(&cfg_long, &o).unwrap().buckets, vec![48]);
        o.max_context = Some(5000);
        assert!(plan_set(&cfg_long, &o).unwrap_err().to_string().contains("max_position_embeddings"));
        let p = plan_set(&cfg_long, &opts(2)).unwrap();
        assert_eq!((p.buckets.clone(), p.batch_sizes.clone(), p.shape.max_batch), (vec![4, 8], vec![1, 2], 2));
        let names: Vec<String> = graph_keys(&p).iter().map(|k| k.name()).collect();
        assert_eq!(names, ["cte_b1_n4", "cte_b1_n8", "tkg_b1_n4", "tkg_b1_n8", "tkg_b2_n4", "tkg_b2_n8"]);
        let mut bad = opts(2);
        bad.batch_sizes = vec![0];
        assert!(plan_set(&cfg_long, &bad).is_err());
        bad = opts(2);
        bad.buckets = Some(vec![16]);
        assert!(plan_set(&cfg_long, &bad).is_err());
    }

    fn set_of(tp: usize, tied: bool) -> (Vec<RankTensors>, SetPlan, ModelConfig) {
        let cfg = config(4, 2, tied);
        let cfg = ModelConfig { max_position_embeddings: 64, ..cfg };
        let tp_plan = TpPlan::new(&cfg, tp).unwrap();
        let plan = plan_set(&cfg, &opts(tp)).unwrap();
        let shards = tp_plan.shard(&cfg, weights(&cfg)).unwrap();
        (all_rank_tensors(&cfg, &tp_plan, shards, &plan.shape, true).unwrap(), plan, cfg)
    }

    #[test]
    fn every_rank_binds_the_same_named_tensors_with_their_shard_rules() {
        // 10 vocabulary rows over 4 ranks: 3 each, the last rank's 1 padded with 2 zero rows.
        let (mut ranks, _, _) = set_of(4, true);
        let t = ranks[3].tensors.clone();
        let find = |n: &str| t.iter().position(|x| x.spec.name == n).unwrap();
        let head = find("lm_head.weight");
        assert_eq!((t[head].spec.shape.clone(), t[head].shard), (vec![3, 16], ShardRule::Vocab));
        let v = ranks[3].values[head].take().unwrap().into_bytes().unwrap();
        assert_eq!(v.len(), 3 * 16 * 4);
        assert!(v[16 * 4..].iter().all(|&b| b == 0), "padding rows are zeros");
        assert_eq!(t[find("layers.0.o_proj.bias")].shard, ShardRule::RankZero);
        let ob = ranks[1].values[find("layers.0.o_proj.bias")].take().unwrap().into_bytes().unwrap();
        assert!(ob.iter().all(|&b| b == 0), "a row-parallel bias counts on rank 0 only");
        assert_eq!(t[find("layers.0.q_proj.weight")].shard, ShardRule::Column);
        assert_eq!(t[find("layers.0.down_proj.weight")].shard, ShardRule::Row);
        assert_eq!(t[find("layers.0.k_cache")].spec.shape, vec![2, 8, 1, 4]);
        assert!(ranks[0].values[find("layers.0.k_cache")].is_none());
    }

    #[test]
    fn manifest_names_aliases_and_graph_bytes_are_pinned() {
        let (ranks, plan, cfg) = set_of(2, false);
        let (m, modules) = build_set(&cfg, &ranks[0], &plan).unwrap();
        let (m1, modules1) = build_set(&cfg, &ranks[1], &plan).unwrap();
        assert_eq!((&m, &modules), (&m1, &modules1), "both ranks run the same graphs");
        let g = m.graph("tkg_b2_n4").unwrap();
        let steps: Vec<&str> = g.inputs.iter().filter(|i| i.role == Role::Step).map(|i| i.spec.name.as_str()).collect();
        assert_eq!(steps, ["tokens", "positions"]);
        let cache = g.inputs.iter().find(|i| i.spec.name == "layers.0.v_cache").unwrap();
        assert_eq!(cache.neff_name, "layers.0.v_cache.must_alias_input");
        assert_eq!(g.outputs[0].spec.shape, vec![2, 5]);
        assert_eq!(g.outputs[2].aliases.as_deref(), Some("layers.0.v_cache"));
        let cte = m.graph("cte_b1_n4").unwrap();
        assert_eq!(cte.outputs[0].spec.shape, vec![1, 5]);
        assert!(m.graphs.iter().zip(&modules).all(|(g, b)| g.sha256 == sha256_hex(b)));
        // Golden bytes: a field number or layout slip changes them.
        let i = m.graphs.iter().position(|g| g.name == "tkg_b1_n4").unwrap();
        assert_eq!((modules[i].len(), fnv(&modules[i])), (12539, 13784389476970020584), "pinned graph bytes changed");
    }
}
