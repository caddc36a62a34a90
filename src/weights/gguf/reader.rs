//! GGUF v2/v3 container: header, typed metadata, tensor infos, data section (memory-mapped).
//! Hand-written: the format is a few dozen lines of little-endian fields, and no well-kept crate
//! gives bounds-checked, non-panicking parsing with our error type.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::quant::GgmlType;
use crate::error::{Error, Result};

/// A metadata value, typed as in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type as u64 (negative -> None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    /// Floats, and integers as floats.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// JSON form (f32 widened to f64 exactly, as Python's float() does).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::F32(v) => serde_json::Number::from_f64(*v as f64)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::F64(v) => serde_json::Number::from_f64(*v)
                .map(J::Number)
                .unwrap_or(J::Null),
            Value::Bool(b) => J::Bool(*b),
            Value::String(s) => J::String(s.clone()),
            Value::Array(a) => J::Array(a.iter().map(Value::to_json).collect()),
            other => match (other.as_u64(), other.as_i64()) {
                (Some(u), _) => J::from(u),
                (None, Some(i)) => J::from(i),
                _ => J::Null,
            },
        }
    }
}

/// One tensor's header entry. `dims` is GGUF order: `dims[0]` is the contiguous (row) length.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Shape in PyTorch order (GGUF dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file: metadata in memory, tensor data left in the map.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// Metadata keys in file order.
    pub keys: Vec<String>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    pub alignment: usize,
    map: Arc<Mmap>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Bytes of memory the parsed header may still take (see `MAX_HEADER_MEMORY`).
    budget: usize,
}

const MAX_DIMS: u32 = 4;
/// Real files hold one or two thousand tensors (Llama 3.1 405B: ~1.1k).
const MAX_TENSORS: usize = 1 << 20;
/// Real files hold about 20 to 60 metadata keys.
const MAX_KV: usize = 1 << 20;
/// Arrays of arrays of arrays at most (tokenizer data is flat).
const MAX_NESTING: usize = 3;
/// Memory the parsed metadata and tensor infos may expand to. A `Value` takes 32 bytes however
/// small its item is on disk (a u8 array grows 32x), so the file size alone does not bound it.
/// Real files need tens of MB (Gemma 3: 262k tokens with scores and types, ~30 MB).
const MAX_HEADER_MEMORY: usize = 1 << 30;

/// The fewest bytes one array item of GGUF type `ty` takes in the file, or None for an unknown type.
fn min_item_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        // A string is a u64 length, then the bytes.
        8 => 8,
        // A nested array is a u32 item type and a u64 count, then the items.
        9 => 12,
        _ => return None,
    })
}

impl<'a> Cursor<'a> {
    fn err(&self, what: &str) -> Error {
        Error::bad_file(
            self.path,
            format!("truncated or corrupt GGUF: {what} at byte {}", self.pos),
        )
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::bad_file(
                    self.path,
                    format!(
                    "truncated GGUF: {what} needs {n} bytes at byte {} but the file has {} bytes",
                    self.pos,
                    self.buf.len()
                ),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    /// A count whose items take at least `min_each` bytes each in what is left of the file: a
    /// count the file cannot hold is corrupt, whatever memory it would need.
    fn count(&mut self, what: &str, min_each: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_each.max(1) as u64) > left {
            return Err(self.err(&format!(
                "{what} = {n} items of at least {min_each} bytes each exceeds the remaining {left} bytes of the file"
            )));
        }
        usize::try_from(n).map_err(|_| self.err(&format!("{what} = {n} is too large")))
    }
    /// Accounts `bytes` of parsed-header memory against `MAX_HEADER_MEMORY`.
    fn charge(&mut self, bytes: usize, what: &str) -> Result<()> {
        match self.budget.checked_sub(bytes) {
            Some(rest) => {
                self.budget = rest;
                Ok(())
            }
            None => Err(Error::bad_file(
                self.path,
                format!(
                    "GGUF header expands past kvgen's limit of {} in memory at {what} (real files need tens of MB); \
                     the file is corrupt or its metadata is not something kvgen reads",
                    crate::mem::format_bytes(MAX_HEADER_MEMORY)
                ),
            )),
        }
    }
    /// A Vec for `n` parsed items, charged and reserved fallibly.
    fn items<T>(&mut self, n: usize, what: &str) -> Result<Vec<T>> {
        self.charge(n.saturating_mul(std::mem::size_of::<T>()), what)?;
        crate::mem::try_with_capacity(n).map_err(|e| e.into_error(&format!("GGUF {what}"), "free memory"))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        self.charge(n, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.err(&format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(&format!("{what}: bool byte {b}"))),
            },
            8 => Value::String(self.string(what)?),
            9 => self.array(what, depth)?,
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(self.err(&format!("{what}: unknown value type {t}"))),
        })
    }
    fn array(&mut self, what: &str, depth: usize) -> Result<Value> {
        if depth >= MAX_NESTING {
            return Err(self.err(&format!("{what}: arrays nested more than {MAX_NESTING} deep")));
        }
        let inner = self.u32(what)?;
        let min_each = min_item_bytes(inner)
            .ok_or_else(|| self.err(&format!("{what}: unknown array element type {inner}")))?;
        let n = self.count(what, min_each)?;
        let mut v = self.items(n, what)?;
        for _ in 0..n {
            v.push(self.value(inner, what, depth + 1)?);
        }
        Ok(Value::Array(v))
    }
    /// tensor_count / metadata_kv_count: backed by the file and under `limit`.
    fn top_count(&mut self, what: &str, min_each: usize, limit: usize, real: &str) -> Result<usize> {
        let at = self.pos;
        let n = self.count(what, min_each)?;
        if n > limit {
            self.pos = at;
            return Err(self.err(&format!("{what} = {n} is above kvgen's limit of {limit} ({real}); the file is corrupt")));
        }
        Ok(n)
    }
}

/// A tensor's header entry as read, before its bytes are located.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    kind: u32,
    rel: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        Self::open_with_budget(path, MAX_HEADER_MEMORY)
    }

    /// `open` with `budget` bytes for the parsed header (tests use a small one).
    pub(crate) fn open_with_budget(path: &Path, budget: usize) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; kvgen never writes model files while they are mapped.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        Self::parse(path, map, budget)
    }

    fn parse(path: &Path, map: Arc<Mmap>, budget: usize) -> Result<GgufFile> {
        let mut c = Cursor {
            buf: &map[..],
            pos: 0,
            path,
            budget,
        };
        let magic = c.arr::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(Error::bad_file(
                path,
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(Error::bad_file(
                path,
                format!("GGUF version {version} is not supported; kvgen reads v2 and v3"),
            ));
        }
        // Each tensor info is at least 8+4+8+4+8 bytes; each key/value at least 8+4+1.
        let n_tensors = c.top_count("tensor_count", 32, MAX_TENSORS, "real files have a few thousand at most")?;
        let n_kv = c.top_count("metadata_kv_count", 13, MAX_KV, "real files have under a hundred")?;
        let (metadata, keys) = Self::read_metadata(&mut c, n_kv)?;
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => {
                    return Err(Error::bad_file(
                        path,
                        format!("general.alignment {v:?} is not a power of two in 1..=1048576"),
                    ))
                }
            },
        };
        let raws = Self::read_tensor_infos(&mut c, n_tensors)?;
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = c.items(n_tensors, "tensor infos")?;
        let mut index = HashMap::new();
        index
            .try_reserve(n_tensors)
            .map_err(|_| Error::out_of_memory(format!("GGUF tensor index of {n_tensors} entries cannot be reserved; free memory")))?;
        for r in raws {
            let t = locate(path, r, data_start, alignment, map.len())?;
            if index.insert(t.name.clone(), tensors.len()).is_some() {
                return Err(Error::bad_file(path, format!("duplicate tensor `{}`", t.name)));
            }
            tensors.push(t);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            keys,
            tensors,
            index,
            alignment,
            map,
        })
    }

    fn read_metadata(c: &mut Cursor, n_kv: usize) -> Result<(HashMap<String, Value>, Vec<String>)> {
        let mut keys = c.items(n_kv, "metadata keys")?;
        // A map entry: key, value and hashing overhead.
        c.charge(n_kv.saturating_mul(2 * std::mem::size_of::<(String, Value)>()), "metadata entries")?;
        let mut metadata = HashMap::new();
        metadata
            .try_reserve(n_kv)
            .map_err(|_| Error::out_of_memory(format!("GGUF metadata map of {n_kv} entries cannot be reserved; free memory")))?;
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            c.charge(key.len(), "metadata keys")?;
            let ty = c.u32(&format!("type of `{key}`"))?;
            let v = c.value(ty, &format!("value of `{key}`"), 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(Error::bad_file(c.path, format!("duplicate metadata key `{key}`")));
            }
            keys.push(key);
        }
        Ok((metadata, keys))
    }

    fn read_tensor_infos(c: &mut Cursor, n_tensors: usize) -> Result<Vec<RawTensor>> {
        let mut raws = c.items(n_tensors, "tensor infos")?;
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            // Kept twice after parsing: in the TensorInfo and as the index key.
            c.charge(2 * name.len(), "tensor names")?;
            let nd = c.u32(&format!("n_dims of `{name}`"))?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(Error::bad_file(
                    c.path,
                    format!("tensor `{name}` has {nd} dimensions (1..={MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(MAX_DIMS as usize);
            for _ in 0..nd {
                dims.push(c.u64(&format!("dims of `{name}`"))?);
            }
            let kind = c.u32(&format!("type of `{name}`"))?;
            let rel = c.u64(&format!("offset of `{name}`"))?;
            raws.push(RawTensor { name, dims, kind, rel });
        }
        Ok(raws)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }
    /// The tensor's stored bytes (quantized blocks as in the file).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        // In range: checked against the file length in `parse`.
        &self.map[t.offset..t.offset + t.n_bytes]
    }
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.map
    }
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::bad_file(&self.path, "GGUF metadata lacks `general.architecture`")
            })
    }
}

/// Checks one tensor's element count, byte size and offset against the file, giving its location.
fn locate(path: &Path, r: RawTensor, data_start: usize, alignment: usize, file_len: usize) -> Result<TensorInfo> {
    let kind = GgmlType::from_u32(r.kind);
    let Some(n_elem) = r.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)) else {
        return Err(Error::bad_file(
            path,
            format!("tensor `{}` has dims {:?}, whose element count overflows 64 bits; the file is corrupt", r.name, r.dims),
        ));
    };
    let Some(n_bytes) = kind.bytes_for(&r.dims, n_elem) else {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor `{}` of type {} has dims {:?}: the row length must be a multiple of the block size {}",
                r.name,
                kind.name(),
                r.dims,
                kind.block_size()
            ),
        ));
    };
    if r.rel % alignment as u64 != 0 {
        return Err(Error::bad_file(path, format!("tensor `{}` offset {} is not {alignment}-aligned", r.name, r.rel)));
    }
    let offset = (data_start as u64).checked_add(r.rel);
    let end = offset.and_then(|o| o.checked_add(n_bytes));
    match (offset, end) {
        // Both fit usize: end <= file_len.
        (Some(o), Some(e)) if e <= file_len as u64 => {
            Ok(TensorInfo { name: r.name, dims: r.dims, kind, offset: o as usize, n_bytes: n_bytes as usize })
        }
        _ => Err(Error::bad_file(
            path,
            format!(
                "truncated GGUF: tensor `{}` ({} bytes at data offset {}, dims {:?}) runs past the end of the file ({file_len} bytes)",
                r.name, n_bytes, r.rel, r.dims
            ),
        )),
    }
}
