//! A loaded model: config, backend, tokenizer and generation defaults. Frontends (Python) wrap it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{cpu::CpuBackend, select, select::Target, Backend};
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::model::llama::LlamaWeights;
use crate::model::tp::TpPlan;
use crate::tensor::DType;
use crate::tokenizer::Tokenizer;
use crate::weights::{gguf::GgufSource, safetensors::SafetensorsSource, TensorSource};

pub struct Engine {
    pub config: ModelConfig,
    pub backend: Arc<dyn Backend>,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// generation_config.json as written (empty object when absent).
    pub generation_config: serde_json::Value,
    pub model_path: PathBuf,
    pub dtype: DType,
    /// The arithmetic of the forward: float32 (the native backend's default, whatever `dtype`),
    /// or the weights' dtype (torch; native with `compute_dtype="bfloat16"`).
    pub compute_dtype: DType,
    /// What the load decided that the user should hear about, once (the frontend shows them).
    pub notices: Vec<Notice>,
}

/// A message from loading a model: a warning (something the user may want to change) or a log
/// line (what was done, for the record).
#[derive(Clone, Debug, PartialEq)]
pub struct Notice {
    pub warning: bool,
    pub message: String,
}

impl Notice {
    fn warning(message: String) -> Self {
        Notice { warning: true, message }
    }
    fn log(message: String) -> Self {
        Notice { warning: false, message }
    }
}

/// The dtype a model computes in: `resolved` (the request, or the checkpoint's dtype for
/// "auto"), except float16 on Gemma 3, whose activations outgrow float16 (transformers computes
/// NaN logits in it): that becomes float32 (float16 weights upcast exactly), with one warning
/// saying how to choose.
fn effective_dtype(config: &ModelConfig, requested: Option<DType>, resolved: DType, notices: &mut Vec<Notice>) -> DType {
    if config.architecture != Architecture::Gemma3 || resolved != DType::F16 {
        return resolved;
    }
    let why = "Gemma 3's activations exceed the float16 range (transformers computes NaN logits in float16)";
    let choose = "pass dtype=\"float32\" to choose this and silence the warning, or dtype=\"bfloat16\" for half the \
                  memory (weights rounded to bfloat16)";
    notices.push(Notice::warning(match requested {
        None => format!(
            "this Gemma 3 checkpoint is stored in float16; {why}, so kvgen computes it in float32 (the float16 \
             weights are upcast exactly); {choose}"
        ),
        Some(_) => format!("dtype=\"float16\" is not used for Gemma 3: {why}, so kvgen computes it in float32; {choose}"),
    }));
    DType::F32
}

/// One log line for a vision-language checkpoint: kvgen runs its language model only.
fn vision_notice(config: &ModelConfig, source: &dyn TensorSource, notices: &mut Vec<Notice>) {
    if let Some(vl) = &config.vision_language {
        let skipped = crate::weights::llama::vision_tensor_count(source);
        notices.push(Notice::log(format!(
            "{}: kvgen generates text with its language model only; the {skipped} vision tensors (vision_tower, \
             multi_modal_projector) are not loaded, and prompts holding the image token {} are refused",
            vl.hf_class, vl.image_token_id
        )));
    }
}

/// Parses the user's `compute_dtype=` argument: None ("auto"), float32 or bfloat16.
pub fn parse_compute_dtype(name: &str) -> Result<Option<DType>> {
    match parse_dtype(name) {
        Ok(Some(DType::F16)) | Err(_) => Err(Error::invalid(format!(
            "compute_dtype={name:?} is not supported; use \"auto\" (float32 arithmetic on the native backend, the \
             weights' dtype on torch), \"float32\" or \"bfloat16\" (transformers' bfloat16 forward)"
        ))),
        other => other,
    }
}

/// `compute_dtype="bfloat16"` needs bfloat16 weights: "auto" becomes bfloat16, another dtype is
/// refused. Returns the dtype to load.
fn dtype_for_compute(dtype: Option<DType>, compute: Option<DType>, target: &Target) -> Result<Option<DType>> {
    match (compute, dtype) {
        (Some(DType::BF16), None | Some(DType::BF16)) => Ok(Some(DType::BF16)),
        (Some(DType::BF16), Some(d)) => Err(Error::invalid(format!(
            "compute_dtype=\"bfloat16\" multiplies bfloat16 weights, but dtype=\"{}\" loads them as {0}; pass \
             dtype=\"bfloat16\" (or \"auto\"), or leave compute_dtype=\"auto\"",
            d.name()
        ))),
        (Some(DType::F32), Some(d)) if d != DType::F32 && *target != Target::Native => Err(Error::invalid(format!(
            "compute_dtype=\"float32\" with dtype=\"{}\": the torch backend computes in the weights' dtype; pass \
             dtype=\"float32\", or use the native backend (backend=\"native\"), which computes {0} weights in float32",
            d.name()
        ))),
        _ => Ok(dtype),
    }
}

/// Parses the user's `dtype=` argument; None means "auto".
pub fn parse_dtype(name: &str) -> Result<Option<DType>> {
    match name {
        "auto" => Ok(None),
        "float32" | "fp32" | "f32" => Ok(Some(DType::F32)),
        "bfloat16" | "bf16" => Ok(Some(DType::BF16)),
        "float16" | "fp16" | "f16" | "half" => Ok(Some(DType::F16)),
        other => Err(Error::invalid(format!(
            "dtype={other:?} is not supported; use \"auto\", \"float32\", \"bfloat16\" or \"float16\""
        ))),
    }
}

impl Engine {
    /// Loads a model directory, a .gguf file or a cached hub id; `progress(done, total)` reports
    /// the weights loaded so far.
    pub fn load(name: &str, device: &str, dtype: &str, progress: &mut dyn FnMut(usize, usize)) -> Result<Engine> {
        Self::load_on(name, device, "auto", dtype, "auto", 1, progress)
    }

    /// `load` with an explicit backend ("auto": native on CPU, torch on CUDA; "native"; "torch")
    /// and `tp_degree` tensor-parallel ranks (the native backend; the torch backend has one);
    /// `compute_dtype` "bfloat16" runs transformers' bfloat16 numerics on bfloat16 weights.
    pub fn load_on(
        name: &str,
        device: &str,
        backend: &str,
        dtype: &str,
        compute_dtype: &str,
        tp_degree: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let compute = parse_compute_dtype(compute_dtype)?;
        let target = select::choose(device, backend)?;
        let dtype = dtype_for_compute(parse_dtype(dtype)?, compute, &target)?;
        let bf16_compute = compute == Some(DType::BF16) && target == Target::Native;
        let target = LoadTarget { target, tp_degree, bf16_compute };
        if tp_degree != 1 && target.target != Target::Native {
            return Err(Error::invalid(format!(
                "tp_degree={tp_degree} is not supported by the torch backend yet (one device per model; multi-GPU \
                 tensor parallelism comes later); use tp_degree=1, or the native CPU backend (backend=\"native\")"
            )));
        }
        let path = crate::resolve::resolve_model(name)?;
        if path.is_file() {
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Self::load_gguf(&path, dtype, &target, progress);
            }
            return Err(Error::invalid(format!(
                "{} is a file; pass the model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file",
                path.display()
            )));
        }
        Self::load_dir(&path, dtype, &target, progress)
    }

    /// Refuses prompt + new tokens beyond the trained context, except with dynamic NTK RoPE,
    /// which exists to stretch it.
    pub fn check_context(&self, longest_prompt: usize, new_tokens: usize) -> Result<()> {
        let limit = self.config.max_position_embeddings;
        let total = longest_prompt.saturating_add(new_tokens);
        if total > limit && !matches!(self.config.rope_scaling, crate::config::RopeScaling::Dynamic { .. }) {
            return Err(Error::ContextOverflow(format!(
                "prompt length {longest_prompt} + max_new_tokens {new_tokens} = {total} exceeds the model's \
                 max_position_embeddings ({limit}); shorten the prompt or lower max_new_tokens/max_length"
            )));
        }
        Ok(())
    }

    /// A vision-language checkpoint's image placeholder needs the vision tower that kvgen does not
    /// run: an attended `image_token_id` in row `row` is refused (transformers would embed it as
    /// text, or as id 0 when it lies past the embedding, and generate from a broken prompt).
    pub fn check_text_only(&self, row: usize, ids: &[i64], mask: Option<&[i64]>) -> Result<()> {
        let Some(vl) = &self.config.vision_language else { return Ok(()) };
        let attended = |c: usize| mask.is_none_or(|m| m.get(c).copied().unwrap_or(1) != 0);
        match ids.iter().enumerate().find(|&(c, &id)| attended(c) && id == vl.image_token_id as i64) {
            Some((position, id)) => Err(Error::invalid(format!(
                "token id {id} at row {row}, position {position} is the image token of this {} checkpoint \
                 (image_token_index = {}); kvgen generates text only (the vision tower is not loaded), so prompts \
                 cannot hold image placeholders; remove them (use text-only messages) or run the model in \
                 transformers for image input",
                vl.hf_class, vl.image_token_id
            ))),
            None => Ok(()),
        }
    }

    /// A llama.cpp GGUF file: config from its metadata, tokenizer from `tokenizer.ggml.*`, weights
    /// dequantized to `dtype`, or with dtype="auto" block-quantized matrices kept as stored
    /// (the quantized kernels compute on them; other tensors become f32).
    fn load_gguf(
        path: &Path,
        dtype: Option<DType>,
        target: &LoadTarget,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let source = GgufSource::open(path)?;
        let raw = source.config_json()?;
        let generation_config = crate::weights::gguf::generation_config_json(&raw);
        // Bounded before any weight or tokenizer buffer is sized from it.
        let mut config = crate::weights::gguf::model_config(&source.file, raw)?;
        let plan = TpPlan::new(&config, target.tp_degree)?;
        // "auto" keeps the quantized blocks and computes on them; an explicit dtype dequantizes.
        // Only the native kernels compute on blocks: the torch backend gets them dequantized.
        let quantized = dtype.is_none() && target.target == Target::Native;
        let mut notices = Vec::new();
        let dtype = effective_dtype(&config, dtype, dtype.unwrap_or(DType::F32), &mut notices);
        config.round_for_weights(dtype);
        let source = if quantized { source.keeping_quantized() } else { source };
        // The one place GGUF weights become matrices: quantized ones kept when `source` keeps
        // them (`Data::Quant` counts as F32, so it passes through), the rest dequantized to `dtype`.
        let weights = crate::weights::llama::load(&source, &config, dtype, progress)?;
        let backend = make_backend(target, &config, &plan, weights, dtype)?;
        let tokenizer = Some(Arc::new(Tokenizer::from_gguf(&source.file)?));
        let compute_dtype = target.compute_dtype(dtype, &mut notices);
        Ok(Engine { config, backend, tokenizer, generation_config, model_path: path.to_path_buf(), dtype, compute_dtype, notices })
    }

    fn load_dir(
        dir: &Path,
        dtype: Option<DType>,
        target: &LoadTarget,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::NotFound {
                path: config_path.clone(),
                message: format!("{} has no config.json; is it a transformers model directory?", dir.display()),
            });
        }
        let mut config = ModelConfig::from_file(&config_path)?;
        let plan = TpPlan::new(&config, target.tp_degree)?;
        let source = SafetensorsSource::open_dir(dir)?;
        let mut notices = Vec::new();
        let resolved = dtype.or_else(|| source.dominant_dtype()).unwrap_or(DType::F32);
        let dtype = effective_dtype(&config, dtype, resolved, &mut notices);
        config.round_for_weights(dtype);
        vision_notice(&config, &source, &mut notices);
        let weights = crate::weights::llama::load(&source, &config, dtype, progress)?;
        let backend = make_backend(target, &config, &plan, weights, dtype)?;
        let (tokenizer, generation_config) = read_extras(dir)?;
        let compute_dtype = target.compute_dtype(dtype, &mut notices);
        Ok(Engine { config, backend, tokenizer, generation_config, model_path: dir.to_path_buf(), dtype, compute_dtype, notices })
    }
}

impl Engine {
    /// `device="neuron"`: the checkpoint sharded by `tp_degree` and run as exported graphs
    /// (`backend::neuron`). dtype "auto" means bfloat16 graphs, the device's native type.
    pub fn load_neuron(
        name: &str,
        dtype: &str,
        opts: &crate::backend::neuron::backend::NeuronOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Engine> {
        let (path, config, weights, dtype) = read_checkpoint(name, dtype, progress)?;
        let plan = TpPlan::new(&config, opts.set.tp_degree)?;
        let mut opts = opts.clone();
        opts.set.dtype = neuron_elem(dtype);
        let shards = plan.shard(&config, weights)?;
        let backend = Arc::new(crate::backend::neuron::backend::NeuronBackend::new(&config, &plan, shards, &opts)?);
        let (tokenizer, generation_config) = read_extras(&path)?;
        Ok(Engine { config, backend, tokenizer, generation_config, model_path: path, dtype, compute_dtype: dtype, notices: Vec::new() })
    }
}

/// The graphs' element type for a load dtype (f16 was refused by `read_checkpoint`).
fn neuron_elem(dtype: DType) -> crate::backend::neuron::manifest::ElemType {
    use crate::backend::neuron::manifest::ElemType;
    match dtype {
        DType::F32 => ElemType::Float32,
        _ => ElemType::Bfloat16,
    }
}

/// `kvgen.neuron.export`: the graph set of a checkpoint, written to `out_dir`.
pub fn neuron_export(
    name: &str,
    out_dir: &Path,
    dtype: &str,
    set: &crate::backend::neuron::export::SetOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PathBuf> {
    let (_, config, weights, dtype) = read_checkpoint(name, dtype, progress)?;
    let mut set = set.clone();
    set.dtype = neuron_elem(dtype);
    crate::backend::neuron::export::export(&config, weights, out_dir, &set)
}

/// A checkpoint (model directory or .gguf file, dequantized) for the Neuron graphs: float32 or
/// bfloat16 ("auto").
fn read_checkpoint(
    name: &str,
    dtype: &str,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(PathBuf, ModelConfig, LlamaWeights, DType)> {
    let dtype = match parse_dtype(dtype)? {
        None | Some(DType::BF16) => DType::BF16,
        Some(DType::F32) => DType::F32,
        Some(_) => {
            return Err(Error::invalid(
                "dtype=\"float16\" is not a Neuron graph type; use \"bfloat16\" (the default) or \"float32\"",
            ))
        }
    };
    let path = crate::resolve::resolve_model(name)?;
    if path.is_file() {
        let source = GgufSource::open(&path)?;
        let mut config = crate::weights::gguf::model_config(&source.file, source.config_json()?)?;
        config.round_for_weights(dtype);
        let weights = crate::weights::llama::load(&source, &config, dtype, progress)?;
        return Ok((path, config, weights, dtype));
    }
    let config_path = path.join("config.json");
    if !config_path.is_file() {
        return Err(Error::NotFound {
            path: config_path.clone(),
            message: format!("{} has no config.json; is it a transformers model directory?", path.display()),
        });
    }
    let mut config = ModelConfig::from_file(&config_path)?;
    config.round_for_weights(dtype);
    let source = SafetensorsSource::open_dir(&path)?;
    let weights = crate::weights::llama::load(&source, &config, dtype, progress)?;
    Ok((path, config, weights, dtype))
}

/// The tokenizer and generation_config.json next to a checkpoint (a GGUF file carries its own).
fn read_extras(path: &Path) -> Result<(Option<Arc<Tokenizer>>, serde_json::Value)> {
    if path.is_file() {
        let source = GgufSource::open(path)?;
        let raw = source.config_json()?;
        return Ok((Some(Arc::new(Tokenizer::from_gguf(&source.file)?)), crate::weights::gguf::generation_config_json(&raw)));
    }
    let tokenizer = if path.join("tokenizer.json").is_file() { Some(Arc::new(Tokenizer::from_dir(path)?)) } else { None };
    let gen_path = path.join("generation_config.json");
    let generation_config = if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path).map_err(|e| Error::io(&gen_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&gen_path, format!("invalid JSON: {e}")))?
    } else {
        serde_json::Value::Object(Default::default())
    };
    Ok((tokenizer, generation_config))
}

/// Where a model loads: the backend and its tensor-parallel degree (checked against the config
/// before any weight is read).
struct LoadTarget {
    target: Target,
    tp_degree: usize,
    /// The native backend with transformers' bfloat16 numerics (`compute_dtype="bfloat16"`).
    bf16_compute: bool,
}

impl LoadTarget {
    /// The arithmetic the backend runs on `dtype` weights; a log line where bf16 has no fast path.
    fn compute_dtype(&self, dtype: DType, notices: &mut Vec<Notice>) -> DType {
        if self.target != Target::Native {
            return dtype;
        }
        if !self.bf16_compute {
            return DType::F32;
        }
        if !crate::backend::cpu::kernels::bf16::use_avx512bf16() {
            notices.push(Notice::log(
                "compute_dtype=\"bfloat16\": this CPU has no AVX512-BF16, so its bfloat16 dot products run in scalar \
                 code (the same numerics, slower than compute_dtype=\"float32\")"
                    .into(),
            ));
        }
        DType::BF16
    }
}

/// The backend for `target`, owning `weights` sharded by `plan` (the torch backend moves them to
/// its device).
fn make_backend(
    load: &LoadTarget,
    config: &ModelConfig,
    plan: &TpPlan,
    weights: LlamaWeights,
    dtype: DType,
) -> Result<Arc<dyn Backend>> {
    let shards = plan.shard(config, weights)?;
    match &load.target {
        Target::Native => Ok(Arc::new(CpuBackend::new(config, plan.shapes.clone(), shards, load.bf16_compute)?)),
        #[cfg(feature = "torch")]
        Target::Torch { device } => {
            let [whole]: [_; 1] = shards
                .try_into()
                .map_err(|_| Error::invalid("the torch backend runs one rank; use tp_degree=1"))?;
            Ok(Arc::new(crate::backend::torch::TorchBackend::new(config.clone(), whole, device, dtype)?))
        }
        #[cfg(not(feature = "torch"))]
        Target::Torch { .. } => {
            let _ = (dtype, shards);
            Err(Error::BackendUnavailable(format!("this kvgen build has no torch backend; {}", select::TORCH_BUILD_HINT)))
        }
    }
}
