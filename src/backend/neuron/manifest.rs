//! `manifest.json` of a Neuron export: every graph of the set (phase, batch, bucket, file, sha256,
//! and, once compiled, its NEFF) and every tensor a graph reads or writes, with its shape, dtype,
//! role, shard rule and aliasing — what the runtime checks a NEFF's tensor info against, and what
//! binds each rank's weight shards, caches and step inputs to the graphs by name.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FORMAT: &str = "kvgen-neuron/1";
pub const FILE_NAME: &str = "manifest.json";

/// Element types a graph's tensors use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElemType {
    Float32,
    Bfloat16,
    Int32,
}

impl ElemType {
    pub fn size(self) -> usize {
        match self {
            ElemType::Float32 | ElemType::Int32 => 4,
            ElemType::Bfloat16 => 2,
        }
    }
}

/// What a graph input is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A weight shard: uploaded once per rank, shared by every graph.
    Weight,
    /// A host-computed constant table (rotary cos/sin): uploaded once per rank like a weight.
    Table,
    /// A KV cache: one device tensor per rank, zeroed once, bound as input and aliased output of
    /// every graph (must-alias: updated in place).
    Cache,
    /// Written by the host before every execution (token ids, positions, slots).
    Step,
}

/// How the rank's value of a weight comes from the checkpoint tensor (see `model::tp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardRule {
    /// The same on every rank.
    Replicated,
    /// Output rows split in rank order (q/k/v by heads, gate/up): column-parallel.
    Column,
    /// Input columns split in rank order (o_proj, down_proj): row-parallel, all-reduced after.
    Row,
    /// The bias of a row-parallel projection: on rank 0, zeros on the others.
    RankZero,
    /// lm_head rows split over the vocabulary (ceil(V / tp) per rank, the last rank padded).
    Vocab,
    /// Per-rank state (caches: this rank's kv heads) or per-step inputs.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: ElemType,
}

impl TensorSpec {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<i64>().max(0) as usize * self.dtype.size()
    }
}

/// A persistent per-rank tensor (weight, table or cache), the same for every graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentTensor {
    #[serde(flatten)]
    pub spec: TensorSpec,
    pub role: Role,
    pub shard: ShardRule,
}

/// One input of one graph: its parameter number is its index in `GraphEntry::inputs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphInput {
    #[serde(flatten)]
    pub spec: TensorSpec,
    pub role: Role,
    /// The name neuronx-cc gives the NEFF tensor (`neff_input_names`; aliased parameters get the
    /// compiler's `.must_alias_input` suffix).
    pub neff_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphOutput {
    #[serde(flatten)]
    pub spec: TensorSpec,
    /// The input (by name) this output is must-aliased to, for caches.
    pub aliases: Option<String>,
    pub neff_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// A prompt (or a chunk of it) of one sequence: `bucket` new tokens, right-padded.
    ContextEncoding,
    /// One new token for each of `batch` cache rows, attending over the first `bucket` positions.
    TokenGeneration,
}

impl Phase {
    pub fn prefix(self) -> &'static str {
        match self {
            Phase::ContextEncoding => "cte",
            Phase::TokenGeneration => "tkg",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEntry {
    /// `<phase>_b<batch>_n<bucket>`; the graph file is `<name>.hlo.pb`.
    pub name: String,
    pub phase: Phase,
    pub batch: usize,
    pub bucket: usize,
    pub file: String,
    pub sha256: String,
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<GraphOutput>,
    /// The compiled NEFF (relative to the manifest), once `kvgen.neuron.compile` has run.
    #[serde(default)]
    pub neff: Option<String>,
}

/// The model the graphs were recorded from (a mismatch at load means "export again").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub kvgen_version: String,
    pub model: ModelInfo,
    pub tp_degree: usize,
    /// "float32" or "bfloat16": the dtype of weights and caches in the graphs.
    pub dtype: String,
    /// Cache positions per sequence (the longest prompt + generation).
    pub max_context: usize,
    /// Cache rows (sequences decoded together): the largest batch size.
    pub max_batch: usize,
    pub batch_sizes: Vec<usize>,
    pub buckets: Vec<usize>,
    pub tensors: Vec<PersistentTensor>,
    pub graphs: Vec<GraphEntry>,
    /// Estimated device memory per rank: weights, caches, margin (bytes).
    pub memory_per_rank: MemoryEstimate,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    pub weights: u64,
    pub kv_caches: u64,
    /// Step inputs/outputs and the runtime's DMA rings and scratch (a stated allowance).
    pub margin: u64,
    pub total: u64,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(FILE_NAME);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.clone(),
                message: format!(
                    "{} has no Neuron export ({FILE_NAME}); run `python -m kvgen neuron export MODEL {}` first",
                    dir.display(),
                    dir.display()
                ),
            },
            _ => Error::Io { path: path.clone(), source: e },
        })?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::BadModelFile { path: path.clone(), message: format!("not a kvgen Neuron manifest: {e}") })?;
        if m.format != FORMAT {
            return Err(Error::BadModelFile {
                path,
                message: format!("manifest format {:?}, this kvgen reads {FORMAT:?}; export again", m.format),
            });
        }
        Ok(m)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE_NAME);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Internal(format!("manifest: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::Io { path, source: e })
    }

    pub fn graph(&self, name: &str) -> Result<&GraphEntry> {
        self.graphs.iter().find(|g| g.name == name).ok_or_else(|| Error::Internal(format!("no graph {name} in the manifest")))
    }
}
