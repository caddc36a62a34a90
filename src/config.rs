//! Model configuration read from HF `config.json`, with HF field names and HF defaults.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub const SUPPORTED: &'static [(&'static str, Architecture)] = &[
        ("LlamaForCausalLM", Architecture::Llama),
        ("MistralForCausalLM", Architecture::Mistral),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
    ];

    pub fn from_hf_name(name: &str) -> Result<Self> {
        Self::SUPPORTED.iter().find(|(n, _)| *n == name).map(|(_, a)| *a).ok_or_else(|| {
            Error::UnsupportedArchitecture { found: name.to_string(), supported: Self::supported_list() }
        })
    }

    pub fn supported_list() -> String {
        Self::SUPPORTED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    pub fn hf_name(self) -> &'static str {
        Self::SUPPORTED.iter().find(|(_, a)| *a == self).map(|(n, _)| *n).unwrap_or("?")
    }
}

/// How rotary frequencies are scaled (transformers' `rope_parameters["rope_type"]`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear { factor: f64 },
    /// NTK-aware; frequencies depend on the current sequence length beyond max_position_embeddings.
    Dynamic { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama/Qwen3 when attention_bias).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama/Qwen3 attention_bias).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Sliding window per layer (None = full attention).
    pub layer_windows: Vec<Option<usize>>,
    /// The checkpoint's dtype name as written in config.json (torch_dtype / dtype).
    pub dtype_name: Option<String>,
    /// The whole config.json, for `gen.config`.
    pub raw: Value,
}

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}
fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}
fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))?;
        Self::from_json(raw).map_err(|e| match e {
            Error::InvalidInput(m) => Error::bad_file(path, m),
            other => other,
        })
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let arch_name = raw
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                // Some configs carry only model_type.
                raw.get("model_type").and_then(Value::as_str).and_then(|t| match t {
                    "llama" => Some("LlamaForCausalLM".to_string()),
                    "mistral" => Some("MistralForCausalLM".to_string()),
                    "qwen2" => Some("Qwen2ForCausalLM".to_string()),
                    "qwen3" => Some("Qwen3ForCausalLM".to_string()),
                    _ => None,
                })
            })
            .ok_or_else(|| Error::invalid("config.json names no `architectures` (or known `model_type`)"))?;
        let architecture = Architecture::from_hf_name(&arch_name)?;
        let need = |key: &str| {
            get_usize(&raw, key).ok_or_else(|| Error::invalid(format!("config.json lacks the integer field `{key}`")))
        };
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let num_hidden_layers = need("num_hidden_layers")?;
        let intermediate_size = need("intermediate_size")?;
        let vocab_size = need("vocab_size")?;
        let num_key_value_heads = get_usize(&raw, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::invalid(format!(
                "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = match raw.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size / num_attention_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::invalid(format!("head_dim {head_dim} must be even and positive")));
        }
        let (rope_theta, rope_scaling) = parse_rope(&raw)?;
        let is_qwen2 = architecture == Architecture::Qwen2;
        let attention_bias = get_bool(&raw, "attention_bias").unwrap_or(false);
        let layer_windows = parse_windows(&raw, architecture, num_hidden_layers);
        let dtype_name =
            raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(Value::as_str).map(str::to_string);
        Ok(ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: get_f64(&raw, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(&raw, "max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: get_bool(&raw, "mlp_bias").unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            layer_windows,
            dtype_name,
            raw,
        })
    }
}

/// Reads rope theta and scaling from either transformers 5.x `rope_parameters` or 4.x
/// `rope_theta` + `rope_scaling`.
fn parse_rope(raw: &Value) -> Result<(f64, RopeScaling)> {
    let params = raw.get("rope_parameters").filter(|v| v.is_object()).or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
    let theta = params
        .and_then(|p| get_f64(p, "rope_theta"))
        .or_else(|| get_f64(raw, "rope_theta"))
        .unwrap_or(10000.0);
    let Some(p) = params else { return Ok((theta, RopeScaling::Default)) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor = || {
        get_f64(p, "factor").ok_or_else(|| Error::invalid(format!("rope scaling `{kind}` needs a numeric `factor`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => {
            let field = |k: &str| get_f64(p, k).ok_or_else(|| Error::invalid(format!("llama3 rope scaling lacks `{k}`")));
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            }
        }
        other => {
            return Err(Error::invalid(format!(
                "rope scaling type `{other}` is not supported; kvgen supports default, linear, dynamic and llama3"
            )))
        }
    };
    Ok((theta, scaling))
}

fn parse_windows(raw: &Value, arch: Architecture, n_layers: usize) -> Vec<Option<usize>> {
    let window = get_usize(raw, "sliding_window");
    match arch {
        Architecture::Mistral => vec![window; n_layers],
        Architecture::Qwen2 | Architecture::Qwen3 => {
            if !get_bool(raw, "use_sliding_window").unwrap_or(false) || window.is_none() {
                return vec![None; n_layers];
            }
            if let Some(types) = raw.get("layer_types").and_then(Value::as_array) {
                return (0..n_layers)
                    .map(|i| match types.get(i).and_then(Value::as_str) {
                        Some("sliding_attention") => window,
                        _ => None,
                    })
                    .collect();
            }
            let max_window_layers = get_usize(raw, "max_window_layers").unwrap_or(n_layers);
            (0..n_layers).map(|i| if i >= max_window_layers { window } else { None }).collect()
        }
        Architecture::Llama => vec![None; n_layers],
    }
}
