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

/// Loads every weight of a Llama-family checkpoint, converting matrices to `dtype` (no copy when
/// equal). `progress(done, total)` is called after each layer and at the end.
pub fn load(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    dtype: DType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LlamaWeights> {
    let l = Loader { src, dtype };
    let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    // No overflow: ModelConfig bounds heads and head_dim (<= 4096 each) and the layer count.
    let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let total = cfg.num_hidden_layers + 1;
    for i in 0..cfg.num_hidden_layers {
        progress(i, total);
        let p = format!("model.layers.{i}");
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
    let embed = l.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?;
    // Tied checkpoints usually omit lm_head; an untied one that lacks it is an error.
    let lm_head = if cfg.tie_word_embeddings {
        None
    } else if src.contains("lm_head.weight") {
        Some(l.matrix("lm_head.weight", cfg.vocab_size, h)?)
    } else {
        return Err(Error::bad_file(
            src.path_of("lm_head.weight"),
            "checkpoint lacks `lm_head.weight` and config.json has tie_word_embeddings=false",
        ));
    };
    let norm = if cfg.gemma.is_some() { l.gemma_norm("model.norm.weight", h)? } else { l.vector("model.norm.weight", h)? };
    progress(total, total);
    Ok(LlamaWeights { embed, layers, norm, lm_head })
}
