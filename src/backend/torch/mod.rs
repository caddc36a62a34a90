//! The libtorch backend (cargo feature `torch`): the Llama family on libtorch's CPU or CUDA
//! devices through tch. Weights are uploaded once in the requested dtype, KV caches live on the
//! device (see `cache`), a step runs the whole batch and returns last-position logits as host f32,
//! where the shared sampler runs.

mod cache;
mod model;
mod weights;

use std::sync::Mutex;

use tch::{Device, Tensor};

use super::{Backend, SeqInput, SlotId};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::LlamaWeights;
use crate::model::rope::Rope;
use crate::tensor::DType;
use cache::KvArena;
use model::{StepPlan, TorchModel};

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

struct State {
    model: TorchModel,
    arena: KvArena,
}

pub struct TorchBackend {
    vocab_size: usize,
    device: Device,
    rope: Rope,
    /// Tensors are Send but not Sync in tch; steps are serialised (one device stream anyway).
    state: Mutex<State>,
}

impl TorchBackend {
    /// Uploads `weights` to `device` as `dtype`; the host copy is dropped layer by layer.
    pub fn new(cfg: ModelConfig, weights: LlamaWeights, device: &str, dtype: DType) -> Result<TorchBackend> {
        let device = parse_device(device)?;
        let kind = weights::kind_of(dtype);
        let _guard = tch::no_grad_guard();
        let weights = weights::TorchWeights::upload(weights, kind, device)?;
        let arena = KvArena::new(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, kind, device);
        Ok(TorchBackend {
            vocab_size: cfg.vocab_size,
            device,
            rope: Rope::new(&cfg),
            state: Mutex::new(State { model: TorchModel { cfg, weights, kind }, arena }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic mid-step leaves at worst stale cache contents, which the next writer overwrites.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step_locked(&self, st: &mut State, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        let _guard = tch::no_grad_guard();
        let State { model, arena } = st;
        let plan = StepPlan::new(&model.cfg, &self.rope, arena, seqs, all_positions, model.kind, self.device)?;
        let logits: Tensor = model.forward(&plan, arena)?;
        let host = logits.f_to_device(Device::Cpu).and_then(|t| t.f_contiguous()).and_then(|t| t.f_view([-1])).map_err(tch_err)?;
        Vec::<f32>::try_from(&host).map_err(tch_err)
    }
}

impl Backend for TorchBackend {
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn allocate(&self, capacity: usize) -> Result<SlotId> {
        let _guard = tch::no_grad_guard();
        self.lock().arena.allocate(capacity)
    }

    fn release(&self, slot: SlotId) {
        self.lock().arena.release(slot)
    }

    fn step(&self, seqs: &[SeqInput], all_positions: bool) -> Result<Vec<f32>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut st = self.lock();
        self.step_locked(&mut st, seqs, all_positions)
    }
}

