//! Uploading host weights (the shared loader's, so names, shapes and dtype rounding are the CPU
//! backend's) as libtorch tensors on the backend's device.

use tch::{Device, Kind, Tensor};

use super::tch_err;
use crate::error::Result;
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

pub fn matrix(m: &Matrix, kind: Kind, device: Device) -> Result<Tensor> {
    upload(&m.data, &[m.rows as i64, m.cols as i64], kind, device)
}

pub fn vector(v: &[f32], kind: Kind, device: Device) -> Result<Tensor> {
    upload(&Data::F32(crate::tensor::Buf::Owned(v.to_vec())), &[v.len() as i64], kind, device)
}
