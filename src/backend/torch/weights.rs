//! The Llama-family weights as libtorch tensors on the backend's device, uploaded once from the
//! shared loader's `LlamaWeights` (so names, shapes and dtype rounding are the CPU backend's).

use tch::{Device, Kind, Tensor};

use super::tch_err;
use crate::error::Result;
use crate::model::llama::{LayerWeights, LlamaWeights};
use crate::tensor::{DType, Data, Matrix};

pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::BF16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
    }
}

/// The bytes of a slice of plain numbers.
fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is f32/bf16/f16 (plain data, no padding); the byte view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Copies host data to `device` as `kind`. Built from raw bytes with an explicit kind because tch
/// 0.24 declares half::bf16 as Kind::Half, which would reinterpret bf16 bits as f16.
fn upload(data: &Data, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
    let host = match data {
        Data::F32(b) => Tensor::f_from_data_size(bytes_of(b), shape, Kind::Float),
        Data::BF16(b) => Tensor::f_from_data_size(bytes_of(b), shape, Kind::BFloat16),
        Data::F16(b) => Tensor::f_from_data_size(bytes_of(b), shape, Kind::Half),
        // The loader dequantizes for every dtype but "auto" on GGUF, which the engine never
        // hands to this backend; dequantizing here keeps that an efficiency matter, not a fault.
        Data::Quant { .. } => {
            let values = data.try_to_f32_vec().map_err(|e| {
                e.into_error("dequantizing a weight for the torch backend", "load the model with less memory in use")
            })?;
            Tensor::f_from_slice(&values).and_then(|t| t.f_reshape(shape))
        }
    }
    .map_err(tch_err)?;
    host.f_to_device(device).and_then(|t| t.f_to_kind(kind)).map_err(tch_err)
}

fn matrix(m: &Matrix, kind: Kind, device: Device) -> Result<Tensor> {
    upload(&m.data, &[m.rows as i64, m.cols as i64], kind, device)
}

fn vector(v: &[f32], kind: Kind, device: Device) -> Result<Tensor> {
    upload(&Data::F32(crate::tensor::Buf::Owned(v.to_vec())), &[v.len() as i64], kind, device)
}

fn opt_vector(v: &Option<Vec<f32>>, kind: Kind, device: Device) -> Result<Option<Tensor>> {
    v.as_deref().map(|v| vector(v, kind, device)).transpose()
}

/// Concatenates optional biases of fused projections; all present or all absent (the config
/// decides per projection group).
fn fused_bias(parts: &[&Option<Vec<f32>>], kind: Kind, device: Device) -> Result<Option<Tensor>> {
    if parts.iter().any(|p| p.is_none()) {
        return Ok(None);
    }
    let joined: Vec<f32> = parts.iter().flat_map(|p| p.as_deref().unwrap_or(&[]).iter().copied()).collect();
    vector(&joined, kind, device).map(Some)
}

/// One decoder layer. q/k/v and gate/up are fused into one matrix each: one matmul launch
/// instead of three (two), and each output element is still the same dot product.
pub struct TorchLayer {
    pub input_norm: Tensor,
    pub qkv: Tensor,
    pub qkv_bias: Option<Tensor>,
    pub o: Tensor,
    pub o_bias: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub post_norm: Tensor,
    pub gate_up: Tensor,
    pub gate_up_bias: Option<Tensor>,
    pub down: Tensor,
    pub down_bias: Option<Tensor>,
}

pub struct TorchWeights {
    pub embed: Tensor,
    pub layers: Vec<TorchLayer>,
    pub norm: Tensor,
    /// None when tied to the embedding.
    pub lm_head: Option<Tensor>,
}

impl TorchWeights {
    /// Moves every weight to `device` as `kind`, layer by layer, so the host copy of a layer can
    /// be freed as soon as it is on the device.
    pub fn upload(w: LlamaWeights, kind: Kind, device: Device) -> Result<TorchWeights> {
        let LlamaWeights { embed, layers, norm, lm_head } = w;
        let mut out = Vec::with_capacity(layers.len());
        for l in layers {
            out.push(Self::layer(l, kind, device)?);
        }
        Ok(TorchWeights {
            embed: matrix(&embed, kind, device)?,
            layers: out,
            norm: vector(&norm, kind, device)?,
            lm_head: lm_head.as_ref().map(|m| matrix(m, kind, device)).transpose()?,
        })
    }

    fn layer(l: LayerWeights, kind: Kind, device: Device) -> Result<TorchLayer> {
        let qkv = Tensor::f_cat(&[matrix(&l.q, kind, device)?, matrix(&l.k, kind, device)?, matrix(&l.v, kind, device)?], 0)
            .map_err(tch_err)?;
        let gate_up =
            Tensor::f_cat(&[matrix(&l.gate, kind, device)?, matrix(&l.up, kind, device)?], 0).map_err(tch_err)?;
        Ok(TorchLayer {
            input_norm: vector(&l.input_norm, kind, device)?,
            qkv,
            qkv_bias: fused_bias(&[&l.q_bias, &l.k_bias, &l.v_bias], kind, device)?,
            o: matrix(&l.o, kind, device)?,
            o_bias: opt_vector(&l.o_bias, kind, device)?,
            q_norm: opt_vector(&l.q_norm, kind, device)?,
            k_norm: opt_vector(&l.k_norm, kind, device)?,
            post_norm: vector(&l.post_norm, kind, device)?,
            gate_up,
            gate_up_bias: fused_bias(&[&l.gate_bias, &l.up_bias], kind, device)?,
            down: matrix(&l.down, kind, device)?,
            down_bias: opt_vector(&l.down_bias, kind, device)?,
        })
    }
}
