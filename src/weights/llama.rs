//! HF tensor names of the Llama family (Llama, Mistral, Qwen2, Qwen3) -> `LlamaWeights`.

use super::TensorSource;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::llama::{LayerWeights, LlamaWeights};
use crate::tensor::{DType, Data, Matrix};

struct Loader<'a> {
    src: &'a dyn TensorSource,
    dtype: DType,
}

impl Loader<'_> {
    /// The stored shape must be what the config implies; checked before any data is read.
    fn check_shape(&self, name: &str, want: &[usize]) -> Result<()> {
        let shape = self.src.shape(name)?;
        if shape != want {
            return Err(Error::bad_file(
                self.src.path_of(name),
                format!(
                    "tensor `{name}` has shape {shape:?}, but config.json implies {want:?}; the weights do not match \
                     the config (a corrupt file, or config.json from another model)"
                ),
            ));
        }
        Ok(())
    }

    /// `data` in the load dtype; a copy that cannot be reserved is OutOfMemory naming the tensor.
    fn convert(&self, name: &str, data: Data) -> Result<Data> {
        data.into_dtype(self.dtype).map_err(|e| {
            e.into_error(
                &format!("tensor `{name}` in {}", self.dtype.name()),
                "the model does not fit in memory: free memory, load it with a smaller dtype (dtype=\"bfloat16\") \
                 or use a quantized GGUF file",
            )
        })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.check_shape(name, &[rows, cols])?;
        let t = self.src.get(name)?;
        Ok(Matrix { rows, cols, data: self.convert(name, t.data)? })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.check_shape(name, &[len])?;
        let t = self.src.get(name)?;
        // Rounded through the requested dtype, as transformers' `model.to(dtype)` rounds every parameter.
        self.convert(name, t.data)?
            .try_to_f32_vec()
            .map_err(|e| e.into_error(&format!("tensor `{name}` in float32"), "free memory"))
    }

    /// A Gemma norm weight w as the (1 + w) the forward multiplies by: added in f32 after the
    /// dtype rounding, as transformers' `1.0 + weight.float()` (exact for f32 checkpoints).
    fn gemma_norm(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(self.vector(name, len)?.into_iter().map(|w| 1.0 + w).collect())
    }

    fn optional_gemma_norm(&self, name: &str, len: usize, present: bool) -> Result<Option<Vec<f32>>> {
        if present {
            self.gemma_norm(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    fn optional_vector(&self, name: &str, len: usize, present: bool) -> Result<Option<Vec<f32>>> {
        if present {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Where a Gemma3ForConditionalGeneration checkpoint keeps its language model: the layer prefix
/// and the lm_head name. transformers' `save_pretrained` writes the first (4.x and 5.x alike);
/// checkpoints saved from 5.x's in-memory names carry the second (notes 2.3).
const VISION_LANGUAGE_LAYOUTS: &[(&str, &str)] =
    &[("language_model.model.", "language_model.lm_head.weight"), ("model.language_model.", "lm_head.weight")];

/// The vision tower and projector of a vision-language checkpoint, under either layout.
const VISION_PREFIXES: &[&str] =
    &["vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."];

/// The text model's tensor prefix (ends with '.') and lm_head name in `src`.
fn text_names(src: &dyn TensorSource, cfg: &ModelConfig) -> Result<(&'static str, &'static str)> {
    let Some(vl) = &cfg.vision_language else { return Ok(("model.", "lm_head.weight")) };
    VISION_LANGUAGE_LAYOUTS
        .iter()
        .copied()
        .find(|(base, _)| src.contains(&format!("{base}embed_tokens.weight")))
        .ok_or_else(|| {
            Error::bad_file(
                src.path_of(""),
                format!(
                    "config.json names {} but the checkpoint has neither `language_model.model.embed_tokens.weight` nor \
                     `model.language_model.embed_tokens.weight`; the weights do not belong to this config",
                    vl.hf_class
                ),
            )
        })
}

/// How many tensors of `src` belong to a vision tower or projector (a vision-language
/// checkpoint's parts that kvgen's text model leaves unread).
pub fn vision_tensor_count(src: &dyn TensorSource) -> usize {
    src.names().iter().filter(|n| VISION_PREFIXES.iter().any(|p| n.starts_with(p))).count()
}

/// Loads every weight of a Llama-family checkpoint, converting matrices to `dtype` (no copy when
/// equal). `progress(done, total)` is called after each layer and at the end.
pub fn load(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlamaWeights> {
    let l = Loader { src, dtype };
    let (base, head_name) = text_names(src, cfg)?;
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    // No overflow: ModelConfig bounds heads and head_dim (<= 4096 each) and the layer count.
    let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let total = cfg.num_hidden_layers + 1;
    for i in 0..cfg.num_hidden_layers {
        progress(i, total);
        let p = format!("{base}layers.{i}");
        let attn = format!("{p}.self_attn");
        let mlp = format!("{p}.mlp");
        // Gemma: (1 + w) norms, four per layer (its pre_feedforward_layernorm is the norm before
        // the MLP; its post_attention_layernorm normalises the attention output).
        let gemma = cfg.gemma.is_some();
        let (input_norm, q_norm, k_norm, post_norm, attn_out_norm, mlp_out_norm) = if gemma {
            let n = |part: &str| l.gemma_norm(&format!("{p}.{part}.weight"), h);
            let qk = |part: &str| l.optional_gemma_norm(&format!("{attn}.{part}.weight"), hd, cfg.qk_norm);
            (
                n("input_layernorm")?,
                qk("q_norm")?,
                qk("k_norm")?,
                n("pre_feedforward_layernorm")?,
                Some(n("post_attention_layernorm")?),
                Some(n("post_feedforward_layernorm")?),
            )
        } else {
            (
                l.vector(&format!("{p}.input_layernorm.weight"), h)?,
                l.optional_vector(&format!("{attn}.q_norm.weight"), hd, cfg.qk_norm)?,
                l.optional_vector(&format!("{attn}.k_norm.weight"), hd, cfg.qk_norm)?,
                l.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                None,
                None,
            )
        };
        let mlp_bias = cfg.mlp_bias && !gemma;
        layers.push(LayerWeights {
            input_norm,
            q: l.matrix(&format!("{attn}.q_proj.weight"), q_dim, h)?,
            k: l.matrix(&format!("{attn}.k_proj.weight"), kv_dim, h)?,
            v: l.matrix(&format!("{attn}.v_proj.weight"), kv_dim, h)?,
            o: l.matrix(&format!("{attn}.o_proj.weight"), h, q_dim)?,
            q_bias: l.optional_vector(&format!("{attn}.q_proj.bias"), q_dim, cfg.qkv_bias)?,
            k_bias: l.optional_vector(&format!("{attn}.k_proj.bias"), kv_dim, cfg.qkv_bias)?,
            v_bias: l.optional_vector(&format!("{attn}.v_proj.bias"), kv_dim, cfg.qkv_bias)?,
            o_bias: l.optional_vector(&format!("{attn}.o_proj.bias"), h, cfg.o_bias)?,
            q_norm,
            k_norm,
            post_norm,
            attn_out_norm,
            mlp_out_norm,
            gate: l.matrix(&format!("{mlp}.gate_proj.weight"), inter, h)?,
            up: l.matrix(&format!("{mlp}.up_proj.weight"), inter, h)?,
            down: l.matrix(&format!("{mlp}.down_proj.weight"), h, inter)?,
            gate_bias: l.optional_vector(&format!("{mlp}.gate_proj.bias"), inter, mlp_bias)?,
            up_bias: l.optional_vector(&format!("{mlp}.up_proj.bias"), inter, mlp_bias)?,
            down_bias: l.optional_vector(&format!("{mlp}.down_proj.bias"), h, mlp_bias)?,
        });
    }
    let embed = l.matrix(&format!("{base}embed_tokens.weight"), cfg.vocab_size, h)?;
    // Tied checkpoints usually omit lm_head; an untied one that lacks it is an error.
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else if src.contains(head_name) {
        Some(l.matrix(head_name, cfg.vocab_size, h)?)
    } else {
        return Err(Error::bad_file(
            src.path_of(head_name),
            format!("checkpoint lacks `{head_name}` and config.json has tie_word_embeddings=false"),
        ));
    };
    let norm_name = format!("{base}norm.weight");
    let norm = if cfg.gemma.is_some() { l.gemma_norm(&norm_name, h)? } else { l.vector(&norm_name, h)? };
    progress(total, total);
    Ok(LlamaWeights { embed, layers, norm, lm_head })
}
