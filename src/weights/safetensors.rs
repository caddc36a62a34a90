//! Memory-mapped safetensors checkpoints, single file or sharded with `model.safetensors.index.json`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use super::TensorSource;
use crate::error::{Error, Result};
use crate::tensor::{Buf, DType, Data, Tensor};

struct Entry {
    shard: usize,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
    n_bytes: usize,
}

pub struct SafetensorsSource {
    maps: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors` or the shards listed by `model.safetensors.index.json` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            shard_files(&index)?
        } else {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: format!(
                    "no weights in {}: expected model.safetensors or model.safetensors.index.json",
                    dir.display()
                ),
            });
        };
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (shard, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the file is opened read-only; kvgen never writes model files while they are mapped.
            let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?);
            check_header_length(&path, &map)?;
            // The crate checks the rest: offsets contiguous and inside the file, shape x dtype
            // products without overflow and equal to each tensor's byte length.
            let st = SafeTensors::deserialize(&map).map_err(|e| {
                Error::bad_file(&path, format!("not a valid safetensors file: {e}; the file is corrupt or truncated, re-save or re-download it"))
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    StDtype::F32 => DType::F32,
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    other => {
                        return Err(Error::bad_file(
                            &path,
                            format!("tensor {name} has dtype {other:?}; kvgen reads float32, bfloat16 and float16"),
                        ))
                    }
                };
                let data = view.data();
                entries.insert(
                    name,
                    Entry {
                        shard,
                        dtype,
                        shape: view.shape().to_vec(),
                        offset: data.as_ptr() as usize - base,
                        n_bytes: data.len(),
                    },
                );
            }
            maps.push((path, map));
        }
        Ok(SafetensorsSource { maps, entries })
    }
}

/// The crate's own limit on the JSON header (it reports only "header too large").
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The header length (the file's first 8 bytes) must fit the file and the crate's limit; checked
/// here to name the numbers in the message.
fn check_header_length(path: &Path, map: &[u8]) -> Result<()> {
    let len = map.len() as u64;
    let Some(first) = map.get(..8) else {
        return Err(Error::bad_file(path, format!("not a safetensors file: {len} bytes, shorter than the 8-byte header length")));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(first);
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_BYTES {
        return Err(Error::bad_file(
            path,
            format!("safetensors header length {n} is above the format's limit of {MAX_HEADER_BYTES} bytes; the file is corrupt or not safetensors"),
        ));
    }
    if n > len - 8 {
        return Err(Error::bad_file(
            path,
            format!("safetensors header length {n} runs past the end of the file ({len} bytes); the file is truncated or corrupt"),
        ));
    }
    Ok(())
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(index, format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::bad_file(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::NotFound {
            path: missing.clone(),
            message: format!("shard {} listed in {} does not exist", missing.display(), index.display()),
        });
    }
    Ok(files)
}

impl SafetensorsSource {
    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::bad_file(self.path_of(name), format!("checkpoint lacks tensor `{name}`")))
    }
}

impl TensorSource for SafetensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.entry(name).map(|e| e.shape.clone())
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let (path, map) = &self.maps[e.shard];
        // Unaligned data is copied; that copy is reserved fallibly.
        let oom = |f: crate::mem::AllocFailed| f.into_error(&format!("copying tensor `{name}` out of {}", path.display()), "free memory");
        let data = match e.dtype {
            DType::F32 => Data::F32(Buf::from_mmap(map, e.offset, e.n_bytes).map_err(oom)?),
            DType::BF16 => Data::BF16(Buf::from_mmap(map, e.offset, e.n_bytes).map_err(oom)?),
            DType::F16 => Data::F16(Buf::from_mmap(map, e.offset, e.n_bytes).map_err(oom)?),
        };
        Ok(Tensor { shape: e.shape.clone(), data })
    }

    fn path_of(&self, name: &str) -> PathBuf {
        let shard = self.entries.get(name).map_or(0, |e| e.shard);
        self.maps.get(shard).map(|(p, _)| p.clone()).unwrap_or_default()
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn dominant_dtype(&self) -> Option<DType> {
        let mut counts: HashMap<DType, usize> = HashMap::new();
        for e in self.entries.values() {
            *counts.entry(e.dtype).or_default() += e.n_bytes;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}
