//! Weight storage: owned or memory-mapped slices of f32 / bf16 / f16 or of ggml quantized blocks,
//! and 2-D matrices over them.

use std::ops::Deref;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;

use crate::mem::{self, AllocFailed};
pub use crate::weights::gguf::quant::GgmlType;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }
}

/// Element types a buffer can hold; plain-old-data, little-endian on disk as on every host we build for.
pub trait Element: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}
impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
/// Raw bytes (ggml quantized blocks); `to_f32` is never used for them.
impl Element for u8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// A read-only slice that is either owned, borrowed from a memory-mapped file (zero copy), or a
/// window of an owned buffer shared with other windows (a tensor-parallel rank's rows of a weight).
pub enum Buf<T: Element> {
    Owned(Vec<T>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Shared { data: Arc<Vec<T>>, offset: usize, len: usize },
}

impl<T: Element> Buf<T> {
    /// A view into `map` if the bytes are aligned for `T`, else an owned copy (which, being sized
    /// by the file, is reserved fallibly). The caller has checked `offset + n_bytes` against the map.
    pub fn from_mmap(map: &Arc<Mmap>, offset: usize, n_bytes: usize) -> Result<Self, AllocFailed> {
        let size = std::mem::size_of::<T>();
        let len = n_bytes / size;
        let ptr = map[offset..].as_ptr();
        if (ptr as usize) % std::mem::align_of::<T>() == 0 {
            return Ok(Buf::Mapped { map: Arc::clone(map), offset, len });
        }
        let bytes = &map[offset..offset + len * size];
        let mut v: Vec<T> = mem::try_with_capacity(len)?;
        // SAFETY: T is plain old data; we copy exactly len * size bytes into the reserved capacity.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), v.as_mut_ptr() as *mut u8, len * size);
            v.set_len(len);
        }
        Ok(Buf::Owned(v))
    }
}

impl<T: Element> Buf<T> {
    /// The same elements in a form whose windows can be taken without copying.
    pub fn into_shared(self) -> Self {
        match self {
            Buf::Owned(v) => {
                let len = v.len();
                Buf::Shared { data: Arc::new(v), offset: 0, len }
            }
            other => other,
        }
    }

    /// Elements `start..start + len` without copying; None for an owned buffer (share it first)
    /// or a range beyond the end.
    pub fn window(&self, start: usize, len: usize) -> Option<Self> {
        if start.checked_add(len)? > self.deref().len() {
            return None;
        }
        match self {
            Buf::Owned(_) => None,
            Buf::Mapped { map, offset, .. } => {
                Some(Buf::Mapped { map: Arc::clone(map), offset: offset + start * std::mem::size_of::<T>(), len })
            }
            Buf::Shared { data, offset, .. } => Some(Buf::Shared { data: Arc::clone(data), offset: offset + start, len }),
        }
    }
}

impl<T: Element> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            // SAFETY: alignment checked in from_mmap, bounds checked by the loader, map kept alive by Arc.
            Buf::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len)
            },
            Buf::Shared { data, offset, len } => &data[*offset..*offset + *len],
        }
    }
}

/// Tensor data in one of the weight dtypes.
pub enum Data {
    F32(Buf<f32>),
    BF16(Buf<bf16>),
    F16(Buf<f16>),
    /// ggml blocks of a row-major tensor as stored in a GGUF file (`kind` is a block-quantized
    /// type, see `quant_kernel_supports`); the kernels compute on them directly.
    Quant { kind: GgmlType, bytes: Buf<u8> },
}

/// Block types the quantized kernels compute on (every row a whole number of blocks).
pub fn quant_kernel_supports(kind: GgmlType) -> bool {
    matches!(
        kind,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K
    )
}

impl Data {
    /// The storage dtype; quantized data reports F32, the dtype it computes and returns in.
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) | Data::Quant { .. } => DType::F32,
            Data::BF16(_) => DType::BF16,
            Data::F16(_) => DType::F16,
        }
    }
    /// Number of elements (for quantized data: whole blocks times the block size).
    pub fn len(&self) -> usize {
        match self {
            Data::F32(b) => b.len(),
            Data::BF16(b) => b.len(),
            Data::F16(b) => b.len(),
            Data::Quant { kind, bytes } => match kind.type_size() {
                0 => 0,
                ts => bytes.len() / ts * kind.block_size(),
            },
        }
    }
    pub fn is_quantized(&self) -> bool {
        matches!(self, Data::Quant { .. })
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All values as f32. Like `vec!`, aborts if memory runs out: for small tensors, tests and
    /// test hooks; load paths use `try_to_f32_vec`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            Data::F32(b) => b.to_vec(),
            Data::BF16(b) => b.iter().map(|x| x.to_f32()).collect(),
            Data::F16(b) => b.iter().map(|x| x.to_f32()).collect(),
            Data::Quant { kind, bytes } => {
                let mut v = vec![0f32; self.len()];
                crate::weights::gguf::quant::dequantize_into(*kind, bytes, &mut v);
                v
            }
        }
    }

    /// All values as f32, in a buffer reserved fallibly.
    pub fn try_to_f32_vec(&self) -> Result<Vec<f32>, AllocFailed> {
        match self {
            Data::F32(b) => convert(b, |x| x),
            Data::BF16(b) => convert(b, |x| x.to_f32()),
            Data::F16(b) => convert(b, |x| x.to_f32()),
            // Dequantizes everything: for vectors and tests, never for the matrices of a model.
            Data::Quant { kind, bytes } => {
                let mut v = mem::try_zeroed::<f32>(self.len())?;
                crate::weights::gguf::quant::dequantize_into(*kind, bytes, &mut v);
                Ok(v)
            }
        }
    }

    /// Converts to `dtype`; a no-op (no copy) when it already has it. Quantized data counts as
    /// F32 (what it computes in), so it stays quantized for F32 and is dequantized otherwise.
    /// The new buffer is reserved fallibly (a model larger than RAM is an error, not an abort).
    pub fn into_dtype(self, dtype: DType) -> Result<Data, AllocFailed> {
        if self.dtype() == dtype {
            return Ok(self);
        }
        // Direct element conversion: one new buffer, no f32 intermediate (except for blocks).
        fn to<T: Element, D>(src: &[T], f: fn(f32) -> D) -> Result<Vec<D>, AllocFailed> {
            convert(src, |x| f(x.to_f32()))
        }
        Ok(match (dtype, &self) {
            (DType::F32, _) => Data::F32(Buf::Owned(self.try_to_f32_vec()?)),
            (DType::BF16, Data::F16(b)) => Data::BF16(Buf::Owned(to(b, bf16::from_f32)?)),
            (DType::F16, Data::BF16(b)) => Data::F16(Buf::Owned(to(b, f16::from_f32)?)),
            (DType::BF16, Data::F32(b)) => Data::BF16(Buf::Owned(to(b, bf16::from_f32)?)),
            (DType::F16, Data::F32(b)) => Data::F16(Buf::Owned(to(b, f16::from_f32)?)),
            (DType::BF16, _) => Data::BF16(Buf::Owned(to(&self.try_to_f32_vec()?, bf16::from_f32)?)),
            (DType::F16, _) => Data::F16(Buf::Owned(to(&self.try_to_f32_vec()?, f16::from_f32)?)),
        })
    }
}

/// `src` mapped through `f` into a buffer reserved fallibly.
fn convert<S: Copy, D>(src: &[S], f: impl Fn(S) -> D) -> Result<Vec<D>, AllocFailed> {
    let mut v = mem::try_with_capacity(src.len())?;
    v.extend(src.iter().map(|&x| f(x)));
    Ok(v)
}

/// A named tensor as read from a checkpoint.
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

/// A row-major 2-D weight: `rows` output features, each `cols` long (PyTorch's Linear layout).
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Data,
}

impl Matrix {
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// Row `r` as f32 (used for embedding lookups).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match &self.data {
            Data::F32(x) => out.copy_from_slice(&x[a..b]),
            Data::BF16(x) => out.iter_mut().zip(&x[a..b]).for_each(|(o, v)| *o = v.to_f32()),
            Data::F16(x) => out.iter_mut().zip(&x[a..b]).for_each(|(o, v)| *o = v.to_f32()),
            Data::Quant { kind, bytes } => {
                // Rows are whole blocks (checked at load), so row r is its own byte range.
                let bs = kind.block_size().max(1);
                let rb = self.cols / bs * kind.type_size();
                if let Some(src) = bytes.get(r * rb..(r + 1) * rb) {
                    crate::weights::gguf::quant::dequantize_into(*kind, src, out);
                }
            }
        }
    }
}

/// Row and column shards of a matrix, for tensor parallelism (`model::tp`).
impl Matrix {
    /// Bytes the matrix's data takes (what a rank's weight memory counts).
    pub fn byte_len(&self) -> usize {
        match &self.data {
            Data::F32(b) => b.len() * 4,
            Data::BF16(b) => b.len() * 2,
            Data::F16(b) => b.len() * 2,
            Data::Quant { bytes, .. } => bytes.len(),
        }
    }

    /// The same matrix, in storage whose row windows need no copy.
    pub fn into_shared(self) -> Matrix {
        let data = match self.data {
            Data::F32(b) => Data::F32(b.into_shared()),
            Data::BF16(b) => Data::BF16(b.into_shared()),
            Data::F16(b) => Data::F16(b.into_shared()),
            Data::Quant { kind, bytes } => Data::Quant { kind, bytes: bytes.into_shared() },
        };
        Matrix { data, ..self }
    }

    /// Rows `rows` as a view of this matrix's storage (no copy; call `into_shared` first on an
    /// owned matrix). A quantized row is its own run of whole blocks, so any row range is exact.
    pub fn row_window(&self, rows: std::ops::Range<usize>) -> Option<Matrix> {
        if rows.start > rows.end || rows.end > self.rows {
            return None;
        }
        let n = rows.end - rows.start;
        let data = match &self.data {
            Data::F32(b) => Data::F32(b.window(rows.start * self.cols, n * self.cols)?),
            Data::BF16(b) => Data::BF16(b.window(rows.start * self.cols, n * self.cols)?),
            Data::F16(b) => Data::F16(b.window(rows.start * self.cols, n * self.cols)?),
            Data::Quant { kind, bytes } => {
                let rb = self.cols / kind.block_size().max(1) * kind.type_size();
                Data::Quant { kind: *kind, bytes: bytes.window(rows.start * rb, n * rb)? }
            }
        };
        Some(Matrix { rows: n, cols: self.cols, data })
    }

    /// Columns `cols` of every row, copied into a new matrix. Quantized data keeps its blocks when
    /// the range falls on block boundaries; otherwise (a head split inside a 256-wide K-quant
    /// block) the shard is dequantized to f32, which computes the same values.
    pub fn column_copy(&self, cols: std::ops::Range<usize>) -> crate::error::Result<Matrix> {
        if cols.start > cols.end || cols.end > self.cols {
            return Err(crate::error::Error::Internal(format!("columns {cols:?} of a {}-column matrix", self.cols)));
        }
        self.try_column_copy(cols).map_err(|e| {
            e.into_error("a tensor-parallel shard of a weight", "free memory or use a lower tp_degree")
        })
    }

    fn try_column_copy(&self, cols: std::ops::Range<usize>) -> Result<Matrix, AllocFailed> {
        let width = cols.end - cols.start;
        fn take<T: Copy>(src: &[T], stride: usize, rows: usize, from: usize, width: usize) -> Result<Vec<T>, AllocFailed> {
            let mut out = mem::try_with_capacity(rows * width)?;
            for r in 0..rows {
                out.extend_from_slice(&src[r * stride + from..r * stride + from + width]);
            }
            Ok(out)
        }
        let (rows, stride, from) = (self.rows, self.cols, cols.start);
        let data = match &self.data {
            Data::F32(b) => Data::F32(Buf::Owned(take(b, stride, rows, from, width)?)),
            Data::BF16(b) => Data::BF16(Buf::Owned(take(b, stride, rows, from, width)?)),
            Data::F16(b) => Data::F16(Buf::Owned(take(b, stride, rows, from, width)?)),
            Data::Quant { kind, bytes } => {
                let bs = kind.block_size().max(1);
                if from % bs == 0 && width % bs == 0 {
                    let (ts, rb) = (kind.type_size(), self.cols / bs * kind.type_size());
                    let bytes = take(bytes, rb, rows, from / bs * ts, width / bs * ts)?;
                    Data::Quant { kind: *kind, bytes: Buf::Owned(bytes) }
                } else {
                    let mut out = mem::try_with_capacity(rows * width)?;
                    let mut row = mem::try_zeroed::<f32>(self.cols)?;
                    for r in 0..rows {
                        self.row_f32(r, &mut row);
                        out.extend_from_slice(&row[from..from + width]);
                    }
                    Data::F32(Buf::Owned(out))
                }
            }
        };
        Ok(Matrix { rows, cols: width, data })
    }
}
