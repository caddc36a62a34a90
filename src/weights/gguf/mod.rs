//! llama.cpp GGUF files: the container (`reader`), ggml block types (`quant`), tensor names
//! (`names`), and the adapter that presents a GGUF as an HF-named `TensorSource` plus an HF-style
//! config.json, mirroring transformers' GGUF loader (`modeling_gguf_pytorch_utils`).

pub mod names;
pub mod quant;
pub mod reader;

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};

use super::TensorSource;
use crate::error::{Error, Result};
use crate::tensor::{Buf, DType, Data, Tensor};
pub use names::{Layout, Permuted};
pub use quant::GgmlType;
pub use reader::{GgufFile, TensorInfo, Value};

/// GGUF architectures kvgen maps, with the HF class each becomes.
const ARCHS: &[(&str, &str, &str)] = &[
    ("llama", "LlamaForCausalLM", "llama"),
    ("mistral", "MistralForCausalLM", "mistral"),
    ("qwen2", "Qwen2ForCausalLM", "qwen2"),
    ("qwen3", "Qwen3ForCausalLM", "qwen3"),
    ("gemma2", "Gemma2ForCausalLM", "gemma2"),
    ("gemma3", "Gemma3ForCausalLM", "gemma3_text"),
];

/// A GGUF file seen as an HF checkpoint: `get("model.layers.0.self_attn.q_proj.weight")`
/// returns the dequantized f32 tensor in HF shape and row order.
pub struct GgufSource {
    pub file: Arc<GgufFile>,
    /// Heads for undoing llama.cpp's Q/K permutation: Some((n_head, n_kv_head)) for llama-arch files.
    permute_heads: Option<(usize, usize)>,
    /// `get` returns block-quantized matrices as `Data::Quant` (zero copy) instead of f32.
    keep_quantized: bool,
    layout: names::Layout,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<GgufSource> {
        Self::new(Arc::new(GgufFile::open(path)?))
    }

    pub fn new(file: Arc<GgufFile>) -> Result<GgufSource> {
        let arch = file.architecture()?.to_string();
        // llama.cpp permutes Q/K rows only in its llama converter (transformers' TENSOR_PROCESSORS).
        let permute_heads = if arch == "llama" {
            let heads = file
                .get(&format!("{arch}.attention.head_count"))
                .and_then(Value::as_u64);
            let kv = file
                .get(&format!("{arch}.attention.head_count_kv"))
                .and_then(Value::as_u64)
                .or(heads);
            match (heads, kv) {
                (Some(h), Some(k)) => Some((h as usize, k as usize)),
                _ => None,
            }
        } else {
            None
        };
        Ok(GgufSource {
            file,
            permute_heads,
            keep_quantized: false,
            layout: names::Layout::of_arch(&arch),
        })
    }

    /// This source with quantized matrices kept as stored (dtype="auto"): `get` then returns
    /// `Data::Quant` for 2-D tensors of a type the quantized kernels compute on.
    pub fn keeping_quantized(mut self) -> GgufSource {
        self.keep_quantized = true;
        self
    }

    /// The stored (possibly quantized) bytes of the tensor behind an HF name, with its ggml type
    /// and HF shape. Rows of Q/K in llama files are still in llama.cpp's permuted order.
    pub fn raw(&self, hf_name: &str) -> Option<(GgmlType, Vec<usize>, &[u8])> {
        let (g, _) = names::gguf_name(hf_name, self.layout)?;
        let t = self.file.tensor(&g)?;
        Some((t.kind, t.shape(), self.file.tensor_bytes(t)))
    }

    /// Dequantizes one GGUF tensor (by its GGUF name) to f32, in file order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        if !t.kind.can_dequantize() {
            return Err(Error::bad_file(
                &self.file.path,
                format!(
                    "tensor `{}` is stored as {}, which kvgen does not read; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K",
                    t.name,
                    t.kind.name()
                ),
            ));
        }
        let n = usize::try_from(t.n_elements()).map_err(|_| {
            Error::bad_file(&self.file.path, format!("tensor `{}` is too large", t.name))
        })?;
        if !quant::dequantize_len_ok(t.kind, self.file.tensor_bytes(t).len(), n) {
            return Err(Error::bad_file(
                &self.file.path,
                format!("tensor `{}`: size does not match its type {}", t.name, t.kind.name()),
            ));
        }
        let mut out = crate::mem::try_zeroed::<f32>(n).map_err(|e| {
            e.into_error(
                &format!("tensor `{}` dequantized to float32", t.name),
                "the model does not fit in memory dequantized: load it with dtype=\"auto\" (keeps the quantized blocks) or free memory",
            )
        })?;
        quant::dequantize_into(t.kind, self.file.tensor_bytes(t), &mut out);
        Ok(out)
    }

    /// An HF-style config.json for this file (see `config_json`).
    pub fn config_json(&self) -> Result<Json> {
        config_json(&self.file)
    }
}

impl GgufSource {
    /// The GGUF tensor behind an HF name, and how llama.cpp permuted its rows.
    fn info(&self, name: &str) -> Result<(&TensorInfo, Permuted)> {
        let (g, perm) = names::gguf_name(name, self.layout).ok_or_else(|| {
            Error::bad_file(&self.file.path, format!("no GGUF tensor corresponds to `{name}`"))
        })?;
        let t = self.file.tensor(&g).ok_or_else(|| {
            Error::bad_file(&self.file.path, format!("GGUF file lacks tensor `{g}` (for `{name}`)"))
        })?;
        Ok((t, perm))
    }
}

impl TensorSource for GgufSource {
    fn contains(&self, name: &str) -> bool {
        names::gguf_name(name, self.layout).is_some_and(|(g, _)| self.file.tensor(&g).is_some())
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.info(name).map(|(t, _)| t.shape())
    }

    fn path_of(&self, _name: &str) -> std::path::PathBuf {
        self.file.path.clone()
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let (t, perm) = self.info(name)?;
        let g = &t.name;
        let shape = t.shape();
        if self.keep_quantized && shape.len() == 2 && crate::tensor::quant_kernel_supports(t.kind) {
            return self.get_quantized(t, shape, perm);
        }
        let mut v = self.dequantize(t)?;
        if let (Some((heads, kv)), true) = (self.permute_heads, perm != Permuted::No) {
            let n_head = if perm == Permuted::Query { heads } else { kv };
            let rows = shape.first().copied().unwrap_or(0);
            let cols = v.len().checked_div(rows).unwrap_or(0);
            let mut out = crate::mem::try_zeroed::<f32>(v.len()).map_err(|e| {
                e.into_error(&format!("un-permuting tensor `{g}`"), "free memory")
            })?;
            names::reverse_permute_into(&v, rows, cols, n_head, &mut out).ok_or_else(|| {
                Error::bad_file(
                    &self.file.path,
                    format!("tensor `{g}` has {rows} rows, not a multiple of 2 x {n_head} heads"),
                )
            })?;
            v = out;
        }
        if self.layout == names::Layout::Gemma && name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's norm weights as 1 + w; HF names mean w, and the loader adds
            // the 1 back (transformers' GGUF loader subtracts it the same way, so the f32 values agree).
            v.iter_mut().for_each(|w| *w -= 1.0);
        }
        Ok(Tensor {
            shape,
            data: Data::F32(Buf::Owned(v)),
        })
    }

    /// Always F32: the dequantized form (dtype="auto" dequantizes to f32 for now).
    fn dominant_dtype(&self) -> Option<DType> {
        Some(DType::F32)
    }
}

impl GgufSource {
    /// The stored blocks of a 2-D tensor: a view into the map, or for llama.cpp-permuted Q/K an
    /// owned copy with whole rows put back in HF order (a row is whole blocks, so rows move as bytes).
    fn get_quantized(&self, t: &TensorInfo, shape: Vec<usize>, perm: Permuted) -> Result<Tensor> {
        let (rows, cols) = (shape[0], shape[1]);
        let bs = t.kind.block_size();
        let rb = (bs != 0 && cols % bs == 0)
            .then(|| cols / bs * t.kind.type_size())
            .filter(|&rb| rb.checked_mul(rows) == Some(t.n_bytes))
            .ok_or_else(|| Error::bad_file(&self.file.path, format!("tensor `{}`: size does not match its type {}", t.name, t.kind.name())))?;
        let bytes = match (self.permute_heads, perm) {
            (Some((heads, kv)), Permuted::Query | Permuted::Key) => {
                let n_head = if perm == Permuted::Query { heads } else { kv };
                if !n_head.checked_mul(2).is_some_and(|h2| h2 != 0 && rows % h2 == 0) {
                    return Err(Error::bad_file(&self.file.path, format!("tensor `{}` has {rows} rows, not a multiple of 2 x {n_head} heads", t.name)));
                }
                let src = self.file.tensor_bytes(t);
                let dim = rows / n_head / 2;
                let mut out = crate::mem::try_zeroed::<u8>(src.len())
                    .map_err(|e| e.into_error(&format!("un-permuting tensor `{}`", t.name), "free memory"))?;
                for h in 0..n_head {
                    for a in 0..2 {
                        for b in 0..dim {
                            // As `names::reverse_permute`: HF row (h, a, b) is stored row (h, b, a).
                            let (dst, s) = (h * 2 * dim + a * dim + b, h * 2 * dim + b * 2 + a);
                            out[dst * rb..(dst + 1) * rb].copy_from_slice(&src[s * rb..(s + 1) * rb]);
                        }
                    }
                }
                Buf::Owned(out)
            }
            _ => Buf::from_mmap(self.file.mmap(), t.offset, t.n_bytes)
                .map_err(|e| e.into_error(&format!("copying tensor `{}`", t.name), "free memory"))?,
        };
        Ok(Tensor { shape, data: Data::Quant { kind: t.kind, bytes } })
    }
}

/// Maps GGUF hyperparameters to an HF config.json (what transformers' `load_gguf_checkpoint`
/// builds for the same file), ready for `ModelConfig::from_json`.
pub fn config_json(file: &GgufFile) -> Result<Json> {
    let arch = file.architecture()?;
    let Some(&(_, hf_class, model_type)) = ARCHS.iter().find(|(a, _, _)| *a == arch) else {
        return Err(Error::UnsupportedArchitecture {
            found: format!("GGUF general.architecture={arch:?}"),
            supported: ARCHS
                .iter()
                .map(|(a, _, _)| *a)
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let key = |k: &str| file.get(&format!("{arch}.{k}"));
    // Present but not a non-negative integer is an error, not "absent"; sizes are bounded
    // afterwards by ModelConfig (whose messages name these keys, see `config_origin`).
    let uint = |k: &str| -> Result<Option<u64>> {
        match key(k) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                Error::bad_file(
                    &file.path,
                    format!("GGUF metadata `{arch}.{k}` = {v:?} is not a non-negative integer; the file is corrupt, re-convert the model"),
                )
            }),
        }
    };
    let need = |k: &str| {
        uint(k)?.ok_or_else(|| {
            Error::bad_file(
                &file.path,
                format!("GGUF metadata lacks the integer `{arch}.{k}`"),
            )
        })
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let mut c = Map::new();
    c.insert("architectures".into(), json!([hf_class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(need("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(need("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert(
        "num_key_value_heads".into(),
        json!(uint("attention.head_count_kv")?.unwrap_or(heads)),
    );
    // key_length is the head width when stated; llama files state it as the rope width.
    let head_dim = match uint("attention.key_length")? {
        Some(hd) => Some(hd),
        None if arch == "llama" || arch == "mistral" => uint("rope.dimension_count")?,
        None => None,
    };
    if let Some(hd) = head_dim {
        c.insert("head_dim".into(), json!(hd));
    }
    if let Some(ctx) = uint("context_length")? {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    if let Some(eps) = key("attention.layer_norm_rms_epsilon") {
        c.insert("rms_norm_eps".into(), eps.to_json());
    }
    let theta = key("rope.freq_base")
        .map(Value::to_json)
        .unwrap_or(json!(10000.0));
    let mut rope = Map::new();
    rope.insert("rope_theta".into(), theta);
    match key("rope.scaling.type").and_then(Value::as_str) {
        None | Some("none") => {
            rope.insert("rope_type".into(), json!("default"));
        }
        Some(kind) => {
            // "linear" maps 1:1; other kinds reach ModelConfig, which names what it supports.
            rope.insert("rope_type".into(), json!(kind));
            if let Some(f) = key("rope.scaling.factor") {
                rope.insert("factor".into(), f.to_json());
            }
            if let Some(o) = key("rope.scaling.original_context_length") {
                rope.insert("original_max_position_embeddings".into(), o.to_json());
            }
        }
    }
    c.insert("rope_parameters".into(), Json::Object(rope));
    // The embedding's row count is the vocabulary (logits span every row); the tokenizer may
    // have fewer ids (Gemma 3: 262,208 rows) or more (an added token past the last row).
    let embedding_rows = file.tensor("token_embd.weight").and_then(|t| t.dims.get(1).copied());
    let vocab = match embedding_rows {
        Some(rows) => Some(rows),
        None => uint("vocab_size")?,
    }
    .or_else(|| file.get("tokenizer.ggml.tokens").and_then(Value::as_array).map(|a| a.len() as u64))
    .ok_or_else(|| {
        Error::bad_file(&file.path, "cannot tell the vocabulary size: no vocab_size, tokens or token_embd.weight")
    })?;
    c.insert("vocab_size".into(), json!(vocab));
    c.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    if arch == "llama" || arch == "mistral" || arch == "qwen3" {
        // llama.cpp stores the biases when the HF model had them.
        c.insert(
            "attention_bias".into(),
            json!(file.tensor("blk.0.attn_q.bias").is_some()),
        );
        c.insert(
            "mlp_bias".into(),
            json!(file.tensor("blk.0.ffn_up.bias").is_some()),
        );
    }
    if let Some(w) = uint("attention.sliding_window")? {
        c.insert("sliding_window".into(), json!(w));
    }
    if arch == "gemma2" || arch == "gemma3" {
        gemma_config(file, arch, &mut c, hidden, heads, head_dim);
    }
    for (gguf, hf) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("unknown_token_id", "unk_token_id"),
        ("padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = file
            .get(&format!("tokenizer.ggml.{gguf}"))
            .and_then(Value::as_u64)
        {
            c.insert(hf.into(), json!(id));
        }
    }
    c.insert("dtype".into(), json!("float32"));
    if let Some(name) = file.get("general.name").and_then(Value::as_str) {
        c.insert("_model_name_or_path".into(), json!(name));
    }
    Ok(Json::Object(c))
}

/// What llama.cpp's gemma2/gemma3 converters store (or leave to the loader's defaults), as the
/// config.json fields ModelConfig reads for Gemma.
fn gemma_config(
    file: &GgufFile,
    arch: &str,
    c: &mut Map<String, Json>,
    hidden: u64,
    heads: u64,
    head_dim: Option<u64>,
) {
    let key = |k: &str| file.get(&format!("{arch}.{k}"));
    let layers = c.get("num_hidden_layers").and_then(Json::as_u64).unwrap_or(0);
    // query_pre_attn_scalar is not stored; llama.cpp scales by 1/sqrt(hidden/heads) for the 27B
    // models (Gemma 2 27B: 46 layers, Gemma 3 27B: 62) and by 1/sqrt(head_dim) otherwise.
    let is_27b = (arch == "gemma2" && layers == 46) || (arch == "gemma3" && layers == 62);
    let scalar = match head_dim {
        Some(hd) if !is_27b => hd,
        _ => hidden / heads.max(1),
    };
    c.insert("query_pre_attn_scalar".into(), json!(scalar));
    for cap in ["attn_logit_softcapping", "final_logit_softcapping"] {
        // Absent takes the class default, as in both transformers and llama.cpp (Gemma 2: 50 / 30).
        if let Some(v) = key(cap) {
            c.insert(cap.into(), v.to_json());
        }
    }
    if !c.get("sliding_window").and_then(Json::as_u64).is_some_and(|w| w > 0) {
        // llama.cpp slides only when the file states a window.
        c.insert("layer_types".into(), json!(vec!["full_attention"; layers as usize]));
        return;
    }
    // Written out as transformers' config shows them: a per-layer flag array, else a period (layer
    // i slides unless (i + 1) % period == 0; llama.cpp's default 6 for Gemma 3, Gemma 2 alternates).
    let sliding: Vec<bool> = match key("attention.sliding_window_pattern") {
        Some(Value::Array(flags)) => flags.iter().map(|f| f.as_bool().unwrap_or(false)).collect(),
        other => {
            let default = if arch == "gemma3" { 6 } else { 2 };
            let period = other.and_then(Value::as_u64).filter(|&p| p > 0).unwrap_or(default);
            (0..layers).map(|i| (i + 1) % period != 0).collect()
        }
    };
    let types: Vec<&str> = sliding.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    if arch == "gemma3" {
        // One rope per layer type: the file's freq_base and scaling are the global layers';
        // freq_base_swa (llama.cpp default 10000) is the sliding layers'.
        let full = c.remove("rope_parameters").unwrap_or_else(|| json!({"rope_theta": 1e6, "rope_type": "default"}));
        let local = key("rope.freq_base_swa").map(Value::to_json).unwrap_or(json!(10000.0));
        c.insert(
            "rope_parameters".into(),
            json!({"full_attention": full, "sliding_attention": {"rope_theta": local, "rope_type": "default"}}),
        );
    }
}

/// The GGUF key each config.json field is built from in `config_json` (for error messages).
fn gguf_key_of(arch: &str, field: &str) -> Option<String> {
    let k = match field {
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "max_position_embeddings" => "context_length",
        "vocab_size" => return Some(format!("{arch}.vocab_size or the length of tokenizer.ggml.tokens")),
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "factor" => "rope.scaling.factor",
        "original_max_position_embeddings" => "rope.scaling.original_context_length",
        "sliding_window" => "attention.sliding_window",
        _ => return None,
    };
    Some(format!("{arch}.{k}"))
}

/// `ModelConfig::from_json_with` for the config built from `file`: messages name the GGUF keys.
pub fn model_config(file: &GgufFile, raw: Json) -> Result<crate::config::ModelConfig> {
    let arch = file.architecture()?.to_string();
    let field = |f: &str| match gguf_key_of(&arch, f) {
        Some(k) => format!("`{f}` (GGUF metadata `{k}`)"),
        None => format!("`{f}`"),
    };
    let origin = crate::config::Origin {
        field: &field,
        fix: "the GGUF file is corrupt or was written by a broken converter; re-convert the model",
    };
    crate::config::ModelConfig::from_json_with(raw, &origin).map_err(|e| match e {
        Error::InvalidInput(m) => Error::bad_file(&file.path, m),
        other => other,
    })
}

/// generation_config.json equivalent: transformers' `GenerationConfig.from_model_config` keeps
/// the special token ids of the config.
pub fn generation_config_json(config: &Json) -> Json {
    let mut g = Map::new();
    for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(k) {
            g.insert(k.into(), v.clone());
        }
    }
    Json::Object(g)
}

#[cfg(test)]
mod tests;
