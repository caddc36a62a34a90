//! Model configuration read from HF `config.json`, with HF field names and HF defaults.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::DType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static [(&'static str, Architecture)] = &[
        ("LlamaForCausalLM", Architecture::Llama),
        ("MistralForCausalLM", Architecture::Mistral),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("Gemma2ForCausalLM", Architecture::Gemma2),
        ("Gemma3ForCausalLM", Architecture::Gemma3),
        // Its language model only (`VisionLanguage`); listed after the causal class so that
        // `hf_name` names that one.
        (GEMMA3_VISION_LANGUAGE, Architecture::Gemma3),
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

/// The multimodal Gemma 3 class whose text part kvgen runs.
pub const GEMMA3_VISION_LANGUAGE: &str = "Gemma3ForConditionalGeneration";

/// A vision-language checkpoint of which kvgen runs the language model (text in, text out).
#[derive(Clone, Debug, PartialEq)]
pub struct VisionLanguage {
    /// config.json's class name, for messages.
    pub hf_class: &'static str,
    /// The image placeholder id (`image_token_index`): a prompt holding it needs the vision
    /// tower, so kvgen refuses it rather than embedding it as text.
    pub image_token_id: usize,
}

/// Gemma3TextConfig's defaults for the sizes that real Gemma3ForConditionalGeneration configs
/// leave out of `text_config` (gemma-3-4b-it gives only hidden/intermediate/layers, say).
const GEMMA3_TEXT_DEFAULTS: &[(&str, u64)] = &[
    ("vocab_size", 262_208),
    ("hidden_size", 2304),
    ("intermediate_size", 9216),
    ("num_hidden_layers", 26),
    ("num_attention_heads", 8),
    ("num_key_value_heads", 4),
];

/// Gemma3Config's `image_token_index` default (the first id past the 262,144-token tokenizer).
const GEMMA3_IMAGE_TOKEN_DEFAULT: u64 = 262_144;

/// What the Gemma family adds to the Llama forward (transformers' Gemma2/Gemma3 modeling).
#[derive(Clone, Debug, PartialEq)]
pub struct GemmaConfig {
    /// The embedding is multiplied by sqrt(hidden_size), rounded to the weights' dtype as
    /// transformers rounds it (`ModelConfig::round_for_weights`; f32 until then).
    pub embed_scale: f32,
    /// Attention scores are scaled by query_pre_attn_scalar^-0.5, not head_dim^-0.5.
    pub attn_scale: f32,
    /// Gemma 2's attention logit softcapping (Gemma 3 does not apply it).
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Gemma 3: the sliding layers' rope theta (a second rope, rotary index 1).
    pub local_rope_theta: Option<f64>,
    /// Rotary index per layer: 0 = the config's rope (full layers), 1 = the local rope.
    pub layer_rope: Vec<usize>,
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
    /// Gemma 2/3 forward settings; None for the Llama family.
    pub gemma: Option<GemmaConfig>,
    /// The checkpoint's dtype name as written in config.json (torch_dtype / dtype).
    pub dtype_name: Option<String>,
    /// Set when the checkpoint is a vision-language one whose language model this config describes.
    pub vision_language: Option<VisionLanguage>,
    /// The whole config.json, for `gen.config`.
    pub raw: Value,
}

/// Hard bounds on config.json sizes. Each is far above every released model of these families
/// (noted per line), and together with `MAX_PARAMETERS` they keep every implied size (weights,
/// KV bytes per position) well inside usize, so a corrupt file fails here rather than in an
/// allocation.
pub mod limits {
    /// Llama 3.1 405B has 126 layers.
    pub const MAX_LAYERS: u64 = 1024;
    /// Llama 3.1 405B: 16384.
    pub const MAX_HIDDEN: u64 = 1 << 18;
    /// Llama 3.1 405B: 53248.
    pub const MAX_INTERMEDIATE: u64 = 1 << 20;
    /// 128 at most in released models.
    pub const MAX_HEADS: u64 = 4096;
    /// 256 at most in released models.
    pub const MAX_HEAD_DIM: u64 = 4096;
    /// Gemma 3: 262144; 2^24 is 64x that.
    pub const MAX_VOCAB: u64 = 1 << 24;
    /// Llama 4 Scout: 10485760 positions.
    pub const MAX_CONTEXT: u64 = 1 << 24;
    /// 2.2e12 parameters: 5x Llama 3.1 405B, the largest dense model of these families.
    pub const MAX_PARAMETERS: u64 = 1 << 41;
    /// RoPE scaling factors (released: up to 64).
    pub const MAX_ROPE_FACTOR: f64 = 1e6;
}

/// Where config values came from, for error messages: how to name a field and how to fix it.
pub struct Origin<'a> {
    /// Renders a config.json field name (a GGUF file adds the metadata key it was built from).
    pub field: &'a dyn Fn(&str) -> String,
    pub fix: &'a str,
}

impl Origin<'static> {
    pub const CONFIG_JSON: Origin<'static> = Origin {
        field: &|f| format!("`{f}`"),
        fix: "the file is corrupt or not a transformers config; correct the value in config.json",
    };
}

/// Typed, bounded reads of config fields: absent or JSON null gives None (the default applies);
/// a present value of the wrong type or out of range is an error naming field, value and limit.
struct Fields<'a> {
    raw: &'a Value,
    origin: &'a Origin<'a>,
}

impl Fields<'_> {
    fn present(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, v: &Value, rule: &str) -> Error {
        Error::invalid(format!("{} = {v} is invalid: it must be {rule}; {}", (self.origin.field)(key), self.origin.fix))
    }

    /// An integer in `min..=max` (`why` says what real models have).
    fn uint(&self, key: &str, min: u64, max: u64, why: &str) -> Result<Option<usize>> {
        let Some(v) = self.present(key) else { return Ok(None) };
        match v.as_u64() {
            Some(x) if (min..=max).contains(&x) => usize::try_from(x).map(Some).map_err(|_| self.bad(key, v, why)),
            _ => Err(self.bad(key, v, &format!("an integer in {min}..={max} ({why})"))),
        }
    }

    fn need_uint(&self, key: &str, min: u64, max: u64, why: &str) -> Result<usize> {
        self.uint(key, min, max, why)?.ok_or_else(|| {
            Error::invalid(format!("{} is missing: config.json must give it as an integer", (self.origin.field)(key)))
        })
    }

    /// A finite number with `ok(x)`; `rule` describes the accepted range.
    fn float(&self, key: &str, ok: impl Fn(f64) -> bool, rule: &str) -> Result<Option<f64>> {
        let Some(v) = self.present(key) else { return Ok(None) };
        match v.as_f64() {
            Some(x) if x.is_finite() && ok(x) => Ok(Some(x)),
            _ => Err(self.bad(key, v, rule)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        let Some(v) = self.present(key) else { return Ok(None) };
        v.as_bool().map(Some).ok_or_else(|| self.bad(key, v, "true or false"))
    }

    fn sub<'b>(&'b self, raw: &'b Value) -> Fields<'b> {
        Fields { raw, origin: self.origin }
    }
}

impl Architecture {
    /// transformers 5.x's `max_position_embeddings` default of the config class, used when
    /// config.json omits it (LlamaConfig 2048, MistralConfig 131072, Qwen2Config/Qwen3Config 32768).
    pub fn default_max_position_embeddings(self) -> usize {
        match self {
            Architecture::Llama => 2048,
            Architecture::Mistral => 131072,
            Architecture::Qwen2 | Architecture::Qwen3 => 32768,
            Architecture::Gemma2 => 8192,
            Architecture::Gemma3 => 131072,
        }
    }
}

/// The sizes that fix every weight shape, checked together (`check_sizes`).
struct Sizes {
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tied: bool,
}

impl Sizes {
    /// Parameters the shapes imply (projections, MLP, norms, embedding and head), or None on overflow.
    fn parameters(&self) -> Option<u64> {
        let n = |x: usize| x as u64;
        let (h, q, kv) = (n(self.hidden), n(self.heads).checked_mul(n(self.head_dim))?, n(self.kv_heads).checked_mul(n(self.head_dim))?);
        let attn = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = h.checked_mul(n(self.intermediate))?.checked_mul(3)?;
        let layer = attn.checked_add(mlp)?.checked_add(h.checked_mul(2)?)?;
        let embed = n(self.vocab).checked_mul(h)?.checked_mul(if self.tied { 1 } else { 2 })?;
        n(self.layers).checked_mul(layer)?.checked_add(embed)?.checked_add(h)
    }
}

fn check_sizes(s: &Sizes, origin: &Origin) -> Result<()> {
    let params = s.parameters().filter(|&p| p <= limits::MAX_PARAMETERS);
    if params.is_none() {
        return Err(Error::invalid(format!(
            "config implies {} parameters (hidden_size={}, intermediate_size={}, num_hidden_layers={}, num_attention_heads={}, \
             head_dim={}, vocab_size={}), above kvgen's limit of {} (2^41; 5x the largest dense model of these families); {}",
            s.parameters().map_or("more than 2^64".to_string(), |p| p.to_string()),
            s.hidden, s.intermediate, s.layers, s.heads, s.head_dim, s.vocab, limits::MAX_PARAMETERS, origin.fix
        )));
    }
    Ok(())
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

    /// A config.json object; bad values are `InvalidInput` (callers that know the file make
    /// them `BadModelFile`).
    pub fn from_json(raw: Value) -> Result<Self> {
        Self::from_json_with(raw, &Origin::CONFIG_JSON)
    }

    /// `from_json` with messages naming fields as `origin` says (a GGUF file's metadata keys).
    pub fn from_json_with(mut raw: Value, origin: &Origin) -> Result<Self> {
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
                    "gemma2" => Some("Gemma2ForCausalLM".to_string()),
                    "gemma3_text" => Some("Gemma3ForCausalLM".to_string()),
                    "gemma3" => Some(GEMMA3_VISION_LANGUAGE.to_string()),
                    _ => None,
                })
            })
            .ok_or_else(|| Error::invalid("config.json names no `architectures` (or known `model_type`)"))?;
        let architecture = Architecture::from_hf_name(&arch_name)?;
        if arch_name == GEMMA3_VISION_LANGUAGE {
            return Self::gemma3_language_model(raw, origin);
        }
        let mut cfg = Self::parse(&raw, architecture, origin)?;
        // gen.config shows the value in force, as transformers' config object does.
        if let (Some(obj), false) = (raw.as_object_mut(), cfg.raw_has_max_positions) {
            obj.insert("max_position_embeddings".into(), Value::from(cfg.config.max_position_embeddings));
        }
        if let (Some(obj), Architecture::Mistral) = (raw.as_object_mut(), architecture) {
            obj.entry("sliding_window").or_insert(Value::from(MISTRAL_DEFAULT_WINDOW));
        }
        cfg.config.raw = raw;
        Ok(cfg.config)
    }

    /// The language model of a Gemma3ForConditionalGeneration config: `text_config` with
    /// Gemma3TextConfig's defaults for what it omits; the top-level `tie_word_embeddings`
    /// (default true: lm_head is the language model's embedding) and `image_token_index` apply.
    fn gemma3_language_model(mut raw: Value, origin: &Origin) -> Result<Self> {
        let top = Fields { raw: &raw, origin };
        let image_token_id = top
            .uint("image_token_index", 0, limits::MAX_VOCAB, "Gemma 3 uses 262144")?
            .or(top.uint("image_token_id", 0, limits::MAX_VOCAB, "Gemma 3 uses 262144")?)
            .unwrap_or(GEMMA3_IMAGE_TOKEN_DEFAULT as usize);
        let tied = top.bool("tie_word_embeddings")?.unwrap_or(true);
        let mut text = match raw.get("text_config") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(other) => return Err(top.bad("text_config", other, "an object (the language model's config)")),
        };
        for (key, value) in GEMMA3_TEXT_DEFAULTS {
            text.entry(key.to_string()).or_insert(Value::from(*value));
        }
        text.insert("tie_word_embeddings".into(), Value::from(tied));
        let text = Value::Object(text);
        let field = |f: &str| format!("`text_config.{f}`");
        let text_origin = Origin { field: &field, fix: origin.fix };
        let Parsed { mut config, raw_has_max_positions } = Self::parse(&text, Architecture::Gemma3, &text_origin)?;
        if config.dtype_name.is_none() {
            config.dtype_name =
                raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(Value::as_str).map(str::to_string);
        }
        config.vision_language = Some(VisionLanguage { hf_class: GEMMA3_VISION_LANGUAGE, image_token_id });
        // gen.config shows the values in force, where transformers' text config holds them.
        if let Some(obj) = raw.as_object_mut() {
            let t = obj.entry("text_config").or_insert_with(|| Value::Object(Default::default()));
            if let Some(t) = t.as_object_mut() {
                for (key, value) in GEMMA3_TEXT_DEFAULTS {
                    t.entry(key.to_string()).or_insert(Value::from(*value));
                }
                if !raw_has_max_positions {
                    t.insert("max_position_embeddings".into(), Value::from(config.max_position_embeddings));
                }
            }
        }
        config.raw = raw;
        Ok(config)
    }

    /// Rounds what transformers rounds to the weights' dtype: Gemma's embedding scale
    /// (`embed_scale.to(weight.dtype)`: sqrt(640) = 25.298 is 25.25 in bfloat16).
    pub fn round_for_weights(&mut self, dtype: DType) {
        let exact = (self.hidden_size as f64).sqrt();
        if let Some(g) = self.gemma.as_mut() {
            g.embed_scale = match dtype {
                DType::F32 => exact as f32,
                DType::BF16 => half::bf16::from_f64(exact).to_f32(),
                DType::F16 => half::f16::from_f64(exact).to_f32(),
            };
        }
    }

    fn parse(raw: &Value, architecture: Architecture, origin: &Origin) -> Result<Parsed> {
        use limits::*;
        let f = Fields { raw, origin };
        let hidden_size = f.need_uint("hidden_size", 1, MAX_HIDDEN, "Llama 3.1 405B has 16384")?;
        let num_attention_heads = f.need_uint("num_attention_heads", 1, MAX_HEADS, "released models have at most 128")?;
        let num_hidden_layers = f.need_uint("num_hidden_layers", 1, MAX_LAYERS, "Llama 3.1 405B has 126")?;
        let intermediate_size = f.need_uint("intermediate_size", 1, MAX_INTERMEDIATE, "Llama 3.1 405B has 53248")?;
        let vocab_size = f.need_uint("vocab_size", 1, MAX_VOCAB, "Gemma 3 has 262144")?;
        let num_key_value_heads = f
            .uint("num_key_value_heads", 1, num_attention_heads as u64, "at most num_attention_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::invalid(format!(
                "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads}); {}",
                origin.fix
            )));
        }
        let is_gemma = matches!(architecture, Architecture::Gemma2 | Architecture::Gemma3);
        // Gemma2Config/Gemma3TextConfig default head_dim to 256, not hidden / heads.
        let head_dim = f
            .uint("head_dim", 1, MAX_HEAD_DIM, "released models have at most 256")?
            .unwrap_or(if is_gemma { 256 } else { hidden_size / num_attention_heads });
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::invalid(format!(
                "head_dim {head_dim} must be even and positive (RoPE rotates pairs); {}",
                origin.fix
            )));
        }
        let tie_word_embeddings = f.bool("tie_word_embeddings")?.unwrap_or(is_gemma);
        check_sizes(
            &Sizes {
                hidden: hidden_size,
                intermediate: intermediate_size,
                layers: num_hidden_layers,
                heads: num_attention_heads,
                kv_heads: num_key_value_heads,
                head_dim,
                vocab: vocab_size,
                tied: tie_word_embeddings,
            },
            origin,
        )?;
        let max_pos = f.uint("max_position_embeddings", 1, MAX_CONTEXT, "Llama 4 Scout has 10485760")?;
        let (rope_theta, rope_scaling) = match architecture {
            Architecture::Gemma3 => parse_gemma3_global_rope(&f)?,
            _ => parse_rope(&f)?,
        };
        let is_qwen2 = architecture == Architecture::Qwen2;
        let attention_bias = f.bool("attention_bias")?.unwrap_or(false);
        let layer_windows = parse_windows(&f, architecture, num_hidden_layers)?;
        let gemma = if is_gemma { Some(parse_gemma(&f, architecture, hidden_size, &layer_windows)?) } else { None };
        let dtype_name =
            raw.get("dtype").or_else(|| raw.get("torch_dtype")).and_then(Value::as_str).map(str::to_string);
        let rms_norm_eps = f.float("rms_norm_eps", |x| x >= 0.0, "a finite number >= 0 (typically 1e-5 or 1e-6)")?;
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_pos.unwrap_or(architecture.default_max_position_embeddings()),
            tie_word_embeddings,
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            mlp_bias: f.bool("mlp_bias")?.unwrap_or(false),
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            layer_windows,
            gemma,
            dtype_name,
            vision_language: None,
            raw: Value::Null,
        };
        Ok(Parsed { config, raw_has_max_positions: max_pos.is_some() })
    }
}

/// A parsed config before `raw` is attached.
struct Parsed {
    config: ModelConfig,
    raw_has_max_positions: bool,
}

/// Reads rope theta and scaling from either transformers 5.x `rope_parameters` or 4.x
/// `rope_theta` + `rope_scaling`.
fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
    let raw = f.raw;
    let params = raw.get("rope_parameters").filter(|v| v.is_object()).or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
    let positive = |x: f64| x > 0.0;
    let theta_rule = "a finite number > 0 (typically 10000 to 1e6)";
    let theta = match params.map(|p| f.sub(p).float("rope_theta", positive, theta_rule)).transpose()?.flatten() {
        Some(t) => t,
        None => f.float("rope_theta", positive, theta_rule)?.unwrap_or(10000.0),
    };
    let Some(p) = params else { return Ok((theta, RopeScaling::Default)) };
    let p = f.sub(p);
    let kind = p.raw.get("rope_type").or_else(|| p.raw.get("type")).and_then(Value::as_str).unwrap_or("default");
    let factor_rule = format!("a finite number in (0, {:e}] (released models use up to 64)", limits::MAX_ROPE_FACTOR);
    let factor = || {
        p.float("factor", |x| x > 0.0 && x <= limits::MAX_ROPE_FACTOR, &factor_rule)?
            .ok_or_else(|| Error::invalid(format!("rope scaling `{kind}` needs a numeric `factor`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: factor()? },
        "llama3" => {
            let field = |k: &str, max: f64| {
                p.float(k, |x| x > 0.0 && x <= max, &format!("a finite number in (0, {max:e}]"))?
                    .ok_or_else(|| Error::invalid(format!("llama3 rope scaling lacks `{k}`")))
            };
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: field("low_freq_factor", limits::MAX_ROPE_FACTOR)?,
                high_freq_factor: field("high_freq_factor", limits::MAX_ROPE_FACTOR)?,
                original_max_position_embeddings: field("original_max_position_embeddings", limits::MAX_CONTEXT as f64)?,
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

/// Per-layer sliding windows; `n_layers` is already bounded, so the Vec is small.
/// transformers' `MistralConfig(sliding_window=4096)` default.
const MISTRAL_DEFAULT_WINDOW: usize = 4096;

fn parse_windows(f: &Fields, arch: Architecture, n_layers: usize) -> Result<Vec<Option<usize>>> {
    let window = || f.uint("sliding_window", 1, limits::MAX_CONTEXT, "Mistral uses 4096");
    Ok(match arch {
        // MistralConfig's default is 4096 when the key is absent; an explicit null means none.
        Architecture::Mistral if f.raw.get("sliding_window").is_none() => vec![Some(MISTRAL_DEFAULT_WINDOW); n_layers],
        Architecture::Mistral => vec![window()?; n_layers],
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let window = if f.bool("use_sliding_window")?.unwrap_or(false) { window()? } else { None };
            if window.is_none() {
                return Ok(vec![None; n_layers]);
            }
            if let Some(types) = f.raw.get("layer_types").and_then(Value::as_array) {
                return Ok((0..n_layers)
                    .map(|i| match types.get(i).and_then(Value::as_str) {
                        Some("sliding_attention") => window,
                        _ => None,
                    })
                    .collect());
            }
            // A threshold, not a size: any layer count is meaningful.
            let max_window_layers =
                f.uint("max_window_layers", 0, u32::MAX as u64, "a layer index")?.unwrap_or(n_layers);
            (0..n_layers).map(|i| if i >= max_window_layers { window } else { None }).collect()
        }
        Architecture::Llama => vec![None; n_layers],
        Architecture::Gemma2 | Architecture::Gemma3 => {
            // Gemma2Config/Gemma3TextConfig default the window to 4096.
            let window = window()?.unwrap_or(4096);
            gemma_layer_types(f, arch, n_layers)?.into_iter().map(|sliding| sliding.then_some(window)).collect()
        }
    })
}

/// Which layers slide: `layer_types` (5.x) or the 4.x `sliding_window_pattern` (Gemma 3, default 6:
/// layer i slides unless (i + 1) % pattern == 0); Gemma 2 alternates (layer 0 slides).
fn gemma_layer_types(f: &Fields, arch: Architecture, n_layers: usize) -> Result<Vec<bool>> {
    if let Some(types) = f.present("layer_types") {
        let list = types.as_array().filter(|a| a.len() == n_layers).ok_or_else(|| {
            f.bad("layer_types", types, &format!("a list of num_hidden_layers = {n_layers} layer types"))
        })?;
        return list
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(f.bad("layer_types", types, "a list of \"sliding_attention\" / \"full_attention\"")),
            })
            .collect();
    }
    let pattern = match arch {
        Architecture::Gemma3 => f.uint("sliding_window_pattern", 1, limits::MAX_LAYERS, "Gemma 3 uses 6")?.unwrap_or(6),
        _ => 2,
    };
    Ok((0..n_layers).map(|i| (i + 1) % pattern != 0).collect())
}

/// Gemma 3's full-attention rope: 5.x `rope_parameters["full_attention"]`, or the 4.x
/// `rope_theta` + `rope_scaling` (theta default 1e6).
fn parse_gemma3_global_rope(f: &Fields) -> Result<(f64, RopeScaling)> {
    let per_type = f.raw.get("rope_parameters").and_then(|p| p.get("full_attention"));
    let mut params = match per_type {
        Some(full) => serde_json::json!({ "rope_parameters": full }),
        None => f.raw.clone(),
    };
    let has_theta = |v: &Value| v.get("rope_parameters").and_then(|p| p.get("rope_theta")).is_some() || v.get("rope_theta").is_some();
    if !has_theta(&params) {
        if let Some(o) = params.as_object_mut() {
            o.insert("rope_theta".into(), Value::from(1e6));
        }
    }
    parse_rope(&f.sub(&params))
}

fn parse_gemma(f: &Fields, arch: Architecture, hidden: usize, windows: &[Option<usize>]) -> Result<GemmaConfig> {
    let act = f.present("hidden_activation").or_else(|| f.present("hidden_act"));
    if let Some(a) = act.filter(|a| a.as_str() != Some("gelu_pytorch_tanh")) {
        let key = if f.present("hidden_activation").is_some() { "hidden_activation" } else { "hidden_act" };
        return Err(f.bad(key, a, "\"gelu_pytorch_tanh\" (the only activation Gemma checkpoints use)"));
    }
    if f.bool("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(Error::invalid(
            "use_bidirectional_attention = true (an EmbeddingGemma encoder) is not a causal language model; kvgen \
             generates with causal Gemma checkpoints only",
        ));
    }
    let positive = |x: f64| x > 0.0;
    let scalar = f.float("query_pre_attn_scalar", positive, "a finite number > 0 (Gemma uses 256 or hidden/heads)")?.unwrap_or(256.0);
    let cap = |key: &str, default: Option<f64>| -> Result<Option<f32>> {
        // An explicit null turns a softcap off; absent takes the class default.
        if f.raw.get(key).is_some_and(Value::is_null) {
            return Ok(None);
        }
        Ok(f.float(key, positive, "a finite number > 0, or null for none")?.or(default).map(|c| c as f32))
    };
    let (attn_softcap, final_softcap, local_rope_theta) = match arch {
        Architecture::Gemma2 => (cap("attn_logit_softcapping", Some(50.0))?, cap("final_logit_softcapping", Some(30.0))?, None),
        // Gemma 3's attention does not pass its softcap to the kernel: inert whatever the config says.
        _ => {
            let local = f.raw.get("rope_parameters").and_then(|p| p.get("sliding_attention"));
            let rule = "a finite number > 0 (Gemma 3 uses 10000)";
            let theta = match local {
                Some(l) => f.sub(l).float("rope_theta", positive, rule)?,
                None => f.float("rope_local_base_freq", positive, rule)?,
            };
            (None, cap("final_logit_softcapping", None)?, Some(theta.unwrap_or(10000.0)))
        }
    };
    let layer_rope = match arch {
        Architecture::Gemma3 => windows.iter().map(|w| usize::from(w.is_some())).collect(),
        _ => vec![0; windows.len()],
    };
    Ok(GemmaConfig {
        embed_scale: (hidden as f32).sqrt(),
        attn_scale: scalar.powf(-0.5) as f32,
        attn_softcap,
        final_softcap,
        local_rope_theta,
        layer_rope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 100, "max_position_embeddings": 256,
        })
    }

    fn with(key: &str, v: Value) -> Result<ModelConfig> {
        let mut raw = base();
        raw[key] = v;
        ModelConfig::from_json(raw)
    }

    fn err(key: &str, v: Value) -> String {
        match with(key, v.clone()) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("{key} = {v}: expected InvalidInput, got {:?}", other.map(|c| c.num_hidden_layers)),
        }
    }

    #[test]
    fn the_base_config_parses() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!((c.num_hidden_layers, c.head_dim, c.layer_windows.len()), (2, 16, 2));
    }

    #[test]
    fn bad_sizes_are_errors_naming_field_value_and_limit() {
        for (key, v, limit) in [
            ("num_hidden_layers", json!(1_000_000_000_000u64), "1..=1024"),
            ("num_hidden_layers", json!(-1), "1..=1024"),
            ("num_hidden_layers", json!(2.5), "1..=1024"),
            ("num_hidden_layers", json!("abc"), "1..=1024"),
            ("num_hidden_layers", json!(0), "1..=1024"),
            ("hidden_size", json!(0), "1..=262144"),
            ("hidden_size", json!(1u64 << 40), "1..=262144"),
            ("intermediate_size", json!(u64::MAX), "1..=1048576"),
            ("vocab_size", json!(1u64 << 30), "1..=16777216"),
            ("vocab_size", json!(0), "1..=16777216"),
            ("num_attention_heads", json!(0), "1..=4096"),
            ("num_attention_heads", json!(1u64 << 33), "1..=4096"),
            ("num_key_value_heads", json!(8), "1..=4"),
            ("head_dim", json!(1u64 << 20), "1..=4096"),
            ("max_position_embeddings", json!(1u64 << 40), "1..=16777216"),
            ("max_position_embeddings", json!(0), "1..=16777216"),
            ("rms_norm_eps", json!(-1.0), ">= 0"),
            ("tie_word_embeddings", json!("yes"), "true or false"),
        ] {
            let m = err(key, v.clone());
            assert!(m.contains(&format!("`{key}` = {v}")) && m.contains(limit) && m.contains("config.json"), "{m}");
        }
    }

    #[test]
    fn odd_head_dim_and_uneven_heads_are_errors() {
        assert!(err("head_dim", json!(7)).contains("even"));
        assert!(err("num_key_value_heads", json!(3)).contains("multiple"));
    }

    #[test]
    fn implied_parameter_count_is_bounded() {
        // Each value alone is within its limit; together they imply ~9e14 parameters.
        let mut raw = base();
        raw["hidden_size"] = json!(1 << 18);
        raw["intermediate_size"] = json!(1 << 20);
        raw["num_hidden_layers"] = json!(1024);
        let m = match ModelConfig::from_json(raw) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {:?}", other.is_ok()),
        };
        assert!(m.contains("parameters") && m.contains(&limits::MAX_PARAMETERS.to_string()), "{m}");
    }

    #[test]
    fn bad_rope_and_window_values_are_errors() {
        let m = err("rope_parameters", json!({"rope_type": "linear", "factor": -2.0, "rope_theta": 10000.0}));
        assert!(m.contains("`factor` = -2.0"), "{m}");
        let m = err("rope_parameters", json!({"rope_type": "default", "rope_theta": 0}));
        assert!(m.contains("`rope_theta` = 0"), "{m}");
        let m = err("rope_parameters", json!({"rope_type": "dynamic", "factor": 1e300}));
        assert!(m.contains("factor"), "{m}");
        let mut raw = base();
        raw["architectures"] = json!(["MistralForCausalLM"]);
        raw["sliding_window"] = json!(0);
        assert!(matches!(ModelConfig::from_json(raw), Err(Error::InvalidInput(m)) if m.contains("`sliding_window` = 0")));
    }

    #[test]
    fn null_means_absent() {
        let c = with("head_dim", Value::Null).unwrap();
        assert_eq!(c.head_dim, 16);
        let mut raw = base();
        raw["architectures"] = json!(["MistralForCausalLM"]);
        raw["sliding_window"] = Value::Null;
        assert_eq!(ModelConfig::from_json(raw).unwrap().layer_windows, vec![None, None]);
    }

    #[test]
    fn missing_max_position_embeddings_takes_the_class_default() {
        for (arch, want) in [
            ("LlamaForCausalLM", 2048),
            ("MistralForCausalLM", 131072),
            ("Qwen2ForCausalLM", 32768),
            ("Qwen3ForCausalLM", 32768),
        ] {
            let mut raw = base();
            raw["architectures"] = json!([arch]);
            raw.as_object_mut().map(|o| o.remove("max_position_embeddings"));
            let c = ModelConfig::from_json(raw).unwrap();
            assert_eq!(c.max_position_embeddings, want, "{arch}");
            // gen.config shows the value in force.
            assert_eq!(c.raw["max_position_embeddings"], want, "{arch}");
        }
        assert_eq!(ModelConfig::from_json(base()).unwrap().max_position_embeddings, 256);
    }

    #[test]
    fn gemma3_layer_types_ropes_and_scales_in_both_config_shapes() {
        let mut new = base();
        new["architectures"] = json!(["Gemma3ForCausalLM"]);
        new["sliding_window"] = json!(6);
        new["query_pre_attn_scalar"] = json!(16);
        new["layer_types"] = json!(["sliding_attention", "full_attention"]);
        new["rope_parameters"] = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        });
        let mut old = base();
        old["model_type"] = json!("gemma3_text");
        old.as_object_mut().map(|o| o.remove("architectures"));
        old["sliding_window"] = json!(6);
        old["query_pre_attn_scalar"] = json!(16);
        old["sliding_window_pattern"] = json!(2);
        old["rope_theta"] = json!(1e6);
        old["rope_local_base_freq"] = json!(1e4);
        old["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        for raw in [new, old] {
            let c = ModelConfig::from_json(raw).unwrap();
            let g = c.gemma.clone().unwrap();
            assert_eq!(c.layer_windows, vec![Some(6), None]);
            assert_eq!(g.layer_rope, vec![1, 0]);
            assert_eq!((c.rope_theta, c.rope_scaling.clone()), (1e6, RopeScaling::Linear { factor: 8.0 }));
            assert_eq!(g.local_rope_theta, Some(1e4));
            assert_eq!((g.attn_scale, g.embed_scale, g.attn_softcap, g.final_softcap), (0.25, 8.0, None, None));
            assert!(c.tie_word_embeddings && c.qk_norm);
        }
    }

    #[test]
    fn gemma2_defaults_softcaps_and_alternates_layers() {
        let mut raw = base();
        raw["architectures"] = json!(["Gemma2ForCausalLM"]);
        let c = ModelConfig::from_json(raw.clone()).unwrap();
        let g = c.gemma.clone().unwrap();
        assert_eq!((g.attn_softcap, g.final_softcap, g.local_rope_theta), (Some(50.0), Some(30.0), None));
        assert_eq!((c.layer_windows.clone(), c.head_dim, c.qk_norm), (vec![Some(4096), None], 256, false));
        raw["hidden_activation"] = json!("relu");
        assert!(matches!(ModelConfig::from_json(raw), Err(Error::InvalidInput(m)) if m.contains("`hidden_activation`")));
    }

    #[test]
    fn gemma_embed_scale_is_rounded_to_the_weight_dtype() {
        let mut raw = base();
        raw["architectures"] = json!(["Gemma3ForCausalLM"]);
        raw["hidden_size"] = json!(640);
        raw["num_attention_heads"] = json!(4);
        let mut c = ModelConfig::from_json(raw).unwrap();
        let scale = |c: &ModelConfig| c.gemma.as_ref().unwrap().embed_scale;
        assert_eq!(scale(&c), 640f32.sqrt());
        // transformers' `embed_scale.to(weight.dtype)` (notes 2.2 step 1: 640 -> 25.25 in bf16)
        c.round_for_weights(DType::BF16);
        assert_eq!(scale(&c), 25.25);
        c.round_for_weights(DType::F16);
        assert_eq!(scale(&c), half::f16::from_f32(640f32.sqrt()).to_f32());
        c.round_for_weights(DType::F32);
        assert_eq!(scale(&c), 640f32.sqrt());
    }

    #[test]
    fn gemma3_conditional_generation_reads_the_text_config() {
        // The shape of gemma-3-4b-it's config.json: text_config gives few sizes.
        let raw = json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "image_token_index": 262144, "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
            "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                            "num_hidden_layers": 34, "sliding_window": 1024,
                            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
        });
        let c = ModelConfig::from_json(raw).unwrap();
        assert_eq!(c.architecture, Architecture::Gemma3);
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.vocab_size), (2560, 34, 262_208));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (8, 4, 256));
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert!(c.tie_word_embeddings);
        assert_eq!(c.layer_windows[0], Some(1024));
        assert_eq!(c.layer_windows[5], None);
        assert_eq!(c.vision_language.as_ref().map(|v| v.image_token_id), Some(262_144));
        assert_eq!(c.dtype_name.as_deref(), Some("bfloat16"));
        // gen.config shows the values in force inside text_config; the top level is kept.
        assert_eq!(c.raw["text_config"]["vocab_size"], 262_208);
        assert_eq!(c.raw["text_config"]["max_position_embeddings"], 131_072);
        assert_eq!(c.raw["eos_token_id"], json!([1, 106]));
        // model_type alone names the class; a bad text value names its text_config field.
        let m = match ModelConfig::from_json(json!({"model_type": "gemma3", "text_config": {"hidden_size": 0}})) {
            Err(Error::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {:?}", other.map(|c| c.hidden_size)),
        };
        assert!(m.contains("`text_config.hidden_size` = 0"), "{m}");
        let c = ModelConfig::from_json(json!({"model_type": "gemma3", "image_token_index": 7})).unwrap();
        assert_eq!(c.vision_language.map(|v| v.image_token_id), Some(7));
    }

    #[test]
    fn from_file_makes_bad_values_bad_model_file() {
        let p = std::env::temp_dir().join(format!("kvgen-config-{}.json", std::process::id()));
        let mut raw = base();
        raw["num_hidden_layers"] = json!(1_000_000_000_000u64);
        std::fs::write(&p, raw.to_string()).unwrap();
        let e = ModelConfig::from_file(&p);
        let _ = std::fs::remove_file(&p);
        assert!(matches!(e, Err(Error::BadModelFile { ref message, .. }) if message.contains("1000000000000")));
    }
}
