//! The libtorch backend (cargo feature `torch`): the Llama family on libtorch's CPU or CUDA
//! devices through tch. Weights are uploaded once in the requested dtype, KV caches live on the
//! device (see `cache`), a step runs the whole batch and returns last-position logits as host f32,
//! where the shared sampler runs.

mod cache;
mod graph;
mod ops;
mod plan;
mod weights;

use std::collections::HashMap;
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use super::{Backend, MemoryStats, SeqInput, SlotId};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::host::HostWeights;
use crate::model::llama::LlamaModel;
use crate::tensor::DType;
use cache::KvArena;
use graph::{CudaGraph, DecodeGraph, GraphKey};
use ops::{TorchKinds, TorchOps, TorchUpload};
use plan::{Grouping, StepPlan};

/// Recorded decode graphs kept at once (step layouts; each holds a memory pool for its
/// intermediates). Steps of other layouts run eagerly until a bucket change frees some.
const MAX_GRAPHS: usize = 8;

/// Whether the CUDA-graph shim was compiled with CUDA (build.rs found the headers).
pub fn cuda_graphs_built() -> bool {
    graph::supported()
}

/// libtorch reports a failed op (device out of memory, a kernel error) as a TchError.
pub(crate) fn tch_err(e: tch::TchError) -> Error {
    Error::Backend(e.to_string())
}

/// "cpu", "cuda" or "cuda:N" as a tch device, checking that CUDA and the GPU exist.
pub fn parse_device(device: &str) -> Result<Device> {
    if device == "cpu" {
        return Ok(Device::Cpu);
    }
    let index = match device.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| Error::invalid(format!("device={device:?} is not a device; use \"cpu\", \"cuda\" or \"cuda:N\"")))?,
        None => return Err(Error::invalid(format!("device={device:?} is not a device; use \"cpu\", \"cuda\" or \"cuda:N\""))),
    };
    if !tch::Cuda::is_available() {
        return Err(Error::BackendUnavailable(format!(
            "device={device:?} was asked for, but libtorch finds no CUDA GPU (torch.cuda.is_available() is False: \
             no NVIDIA GPU/driver here, or a CPU-only torch wheel); use device=\"cpu\""
        )));
    }
    let count = tch::Cuda::device_count().max(0) as usize;
    if index >= count {
        return Err(Error::invalid(format!(
            "device={device:?}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{}); pick one of those",
            count.saturating_sub(1)
        )));
    }
    Ok(Device::Cuda(index))
}

/// The family forward on the device: the logits of the plan's output rows as [rows, vocab] f32.
fn forward(model: &LlamaModel<TorchKinds>, kind: Kind, plan: &StepPlan, arena: &mut KvArena) -> Result<Tensor> {
    let mut ops = TorchOps { plan, arena, kind, hidden: model.cfg.hidden_size as i64 };
    model.forward(&mut ops)?.f_to_kind(Kind::Float).map_err(tch_err)
}

struct State {
    model: LlamaModel<TorchKinds>,
    kind: Kind,
    arena: KvArena,
    graphs: HashMap<GraphKey, DecodeGraph>,
    /// Set after a capture or replay failed: decode steps then run eagerly.
    graphs_failed: bool,
}

impl State {
    /// Drops graphs recorded against replaced or freed bucket tensors (and their memory pools).
    fn prune_graphs(&mut self) {
        let arena = &self.arena;
        self.graphs.retain(|k, _| k.layout.groups.iter().zip(&k.stamps).all(|(g, &s)| arena.stamp(g.bucket) == Some(s)));
    }
}

pub struct TorchBackend {
    vocab_size: usize,
    device: Device,
    weight_bytes: usize,
    /// CUDA graphs for decode steps: on a CUDA device when the shim has them, unless
    /// KVGEN_CUDA_GRAPHS=0. KVGEN_CUDA_GRAPHS=emulate runs the graph path's fixed buffers
    /// without recording (any device): how CI on a CPU tests what a graph would read.
    use_graphs: bool,
    record_graphs: bool,
    /// Tensors are Send but not Sync in tch; steps are serialised (one device stream anyway).
    state: Mutex<State>,
}

impl TorchBackend {
    /// Uploads `weights` (the whole model: one rank) to `device` as `dtype`; the host copy is
    /// dropped layer by layer.
    pub fn new(cfg: ModelConfig, weights: HostWeights, device: &str, dtype: DType) -> Result<TorchBackend> {
        let device = parse_device(device)?;
        let kind = weights::kind_of(dtype);
        let _guard = tch::no_grad_guard();
        let weight_bytes = weights.byte_len();
        let weights = weights.build(&mut TorchUpload { kind, device })?;
        let arena = KvArena::new(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kind, device);
        let setting = std::env::var("KVGEN_CUDA_GRAPHS").unwrap_or_default();
        let record_graphs = device.is_cuda() && graph::supported() && setting != "0" && setting != "emulate";
        let use_graphs = record_graphs || setting == "emulate";
        Ok(TorchBackend {
            vocab_size: cfg.vocab_size,
            device,
            weight_bytes,
            use_graphs,
            record_graphs,
            state: Mutex::new(State {
                model: LlamaModel::new(cfg.clone(), crate::model::tp::whole_shape(&cfg), weights),
                kind,
                arena,
                graphs: HashMap::new(),
                graphs_failed: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic mid-step leaves at worst stale cache contents, which the next writer overwrites.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step_locked(&self, st: &mut State, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        st.prune_graphs();
        if let Some((grouping, key)) = self.graph_candidate(st, seqs, all_positions)? {
            match self.step_graph(st, seqs, &grouping, key) {
                Ok(logits) => return Ok(logits),
                // A libtorch/CUDA fault in recording or replaying: eager decoding gives the same
                // results, and re-running the step rewrites the same cache positions.
                Err(e @ Error::Backend(_)) => {
                    eprintln!("kvgen: CUDA graph capture/replay failed ({e}); decoding without CUDA graphs from now on");
                    st.graphs_failed = true;
                    st.graphs.clear();
                }
                Err(e) => return Err(e),
            }
        }
        let State { model, kind, arena, .. } = st;
        let grouping = Grouping::new(arena, seqs, false)?;
        let plan = StepPlan::new(&model.cfg, *kind, &model.rope, model.local_rope.as_ref(), &grouping, seqs, all_positions, self.device)?;
        let logits = forward(model, *kind, &plan, arena)?;
        to_host(&logits)
    }

    /// The step's grouping over whole bucket spans and its graph key, when it can run as a
    /// recorded graph: a decode step (one new token each), graphs enabled and working, and its
    /// graph recorded already or room for one more.
    fn graph_candidate(&self, st: &State, seqs: &[SeqInput], all_positions: bool) -> Result<Option<(Grouping, GraphKey)>> {
        if !self.use_graphs || st.graphs_failed || all_positions || seqs.iter().any(|s| s.tokens.len() != 1) {
            return Ok(None);
        }
        let grouping = Grouping::new(&st.arena, seqs, true)?;
        let key = GraphKey { layout: grouping.layout.clone(), stamps: grouping.stamps.clone() };
        Ok((st.graphs.contains_key(&key) || st.graphs.len() < MAX_GRAPHS).then_some((grouping, key)))
    }

    fn step_graph(&self, st: &mut State, seqs: &[SeqInput], grouping: &Grouping, key: GraphKey) -> Result<Vec<f32>> {
        let State { model, kind, arena, graphs, .. } = st;
        let kind = *kind;
        if let Some(g) = graphs.get_mut(&key) {
            let mut host = StepPlan::new(&model.cfg, kind, &model.rope, model.local_rope.as_ref(), grouping, seqs, false, Device::Cpu)?;
            g.plan.fill_from(&mut host)?;
            return match &g.graph {
                Some(graph) => {
                    graph.replay()?;
                    to_host(&g.logits)
                }
                None => to_host(&forward(model, kind, &g.plan, arena)?),
            };
        }
        // Fixed input buffers, filled with this step's values.
        let plan = StepPlan::new(&model.cfg, kind, &model.rope, model.local_rope.as_ref(), grouping, seqs, false, self.device)?;
        let (Device::Cuda(index), true) = (self.device, self.record_graphs) else {
            let logits = forward(model, kind, &plan, arena)?;
            let out = to_host(&logits)?;
            graphs.insert(key, DecodeGraph { graph: None, plan, logits });
            return Ok(out);
        };
        // Record: a warm-up run on the side stream (cuBLAS workspaces, kernel choices), the
        // capture, then the first replay.
        let graph = CudaGraph::new(index)?;
        tch::Cuda::synchronize(index as i64);
        let logits = graph.on_side_stream(|| {
            let _warm_up = forward(model, kind, &plan, arena)?;
            tch::Cuda::synchronize(index as i64);
            graph.capture(|| forward(model, kind, &plan, arena))
        })?;
        tch::Cuda::synchronize(index as i64);
        graph.replay()?;
        let out = to_host(&logits)?;
        graphs.insert(key, DecodeGraph { graph: Some(graph), plan, logits });
        Ok(out)
    }
}

/// [rows, vocab] f32 logits on the device -> host vector (the copy waits for the step).
fn to_host(logits: &Tensor) -> Result<Vec<f32>> {
    let host = logits
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view([-1]))
        .map_err(tch_err)?;
    Vec::<f32>::try_from(&host).map_err(tch_err)
}

impl Backend for TorchBackend {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn allocate(&self, capacity: usize) -> Result<SlotId> {
        let _guard = tch::no_grad_guard();
        let mut st = self.lock();
        let slot = st.arena.allocate(capacity);
        st.prune_graphs();
        slot
    }

    fn release(&self, slot: SlotId) {
        let mut st = self.lock();
        st.arena.release(slot);
        st.prune_graphs();
    }

    fn copy_slot(&self, src: SlotId, dst: SlotId, positions: usize) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.lock().arena.copy_prefix(src, dst, positions)
    }

    fn cache_bytes_per_position(&self) -> usize {
        self.lock().arena.bytes_per_position()
    }

    fn cache_bytes_reserved(&self) -> usize {
        self.lock().arena.bytes_reserved()
    }

    fn memory_stats(&self) -> MemoryStats {
        MemoryStats {
            tp_degree: 1,
            weight_bytes_per_rank: self.weight_bytes,
            kv_cache_bytes_per_token: self.cache_bytes_per_position(),
            ..Default::default()
        }
    }

    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut st = self.lock();
        self.step_locked(&mut st, seqs, all_positions)
    }
}

