//! Owning wrappers of libnrt's handles: a model is unloaded, a tensor freed and a set destroyed
//! when its wrapper drops. Each holds the session, so nrt_close waits for all of them.

use std::ffi::{c_void, CString};
use std::ptr::NonNull;
use std::sync::Arc;

use super::ffi::{self, NrtModel, NrtTensor, NrtTensorInfo, NrtTensorSet, NRT_TENSOR_PLACEMENT_DEVICE};
use super::runtime::Session;
use super::status::{self, Site};
use crate::error::{Error, Result};

fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::invalid(format!("tensor name {name:?} contains a NUL byte")))
}

/// A NEFF loaded on one rank.
pub struct Model {
    raw: NonNull<NrtModel>,
    pub rank: usize,
    session: Arc<Session>,
}

// libnrt handles are plain pointers into a thread-safe runtime; kvgen never uses one handle from
// two threads at once (one worker per rank).
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

/// What `nrt_get_model_tensor_info` says about one tensor of a loaded NEFF.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub is_input: bool,
    pub size: usize,
    /// Raw dtype code: never trusted (its numbering changed between SDKs); sizes are checked.
    pub dtype: u32,
    pub shape: Vec<u32>,
}

impl Model {
    /// `nrt_load_collectives` of `neff` as rank `rank` of `world`, on NeuronCore `rank`.
    pub fn load(session: &Arc<Session>, neff: &[u8], rank: usize, world: usize, what: &str) -> Result<Model> {
        let api = session.api;
        let mut raw: *mut NrtModel = std::ptr::null_mut();
        // SAFETY: neff is valid for its length during the call; raw receives the handle.
        let code = unsafe {
            (api.load_collectives)(
                neff.as_ptr() as *const c_void,
                neff.len(),
                rank as i32,
                1,
                rank as u32,
                world as u32,
                &mut raw,
            )
        };
        status::check(code, &Site { call: "nrt_load_collectives", rank, what })?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::Backend(format!("nrt_load_collectives ({what}) succeeded but returned no model")))?;
        Ok(Model { raw, rank, session: session.clone() })
    }

    pub fn raw(&self) -> *mut NrtModel {
        self.raw.as_ptr()
    }

    pub fn tensor_info(&self, what: &str) -> Result<Vec<TensorInfo>> {
        let api = self.session.api;
        let mut arr: *mut ffi::NrtTensorInfoArray = std::ptr::null_mut();
        // SAFETY: a loaded model; arr receives an array the runtime owns until freed below.
        let code = unsafe { (api.get_model_tensor_info)(self.raw(), &mut arr) };
        status::check(code, &Site { call: "nrt_get_model_tensor_info", rank: self.rank, what })?;
        if arr.is_null() {
            return Err(Error::Backend(format!("nrt_get_model_tensor_info ({what}) returned no tensor list")));
        }
        // SAFETY: the runtime's array holds tensor_count infos after the count; each shape points
        // at ndim u32s (or is null).
        let infos = unsafe {
            let count = (*arr).tensor_count as usize;
            let first = std::ptr::addr_of!((*arr).tensor_array) as *const NrtTensorInfo;
            (0..count)
                .map(|i| {
                    let info = &*first.add(i);
                    let shape = if info.shape.is_null() || info.ndim == 0 {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(info.shape, info.ndim as usize).to_vec()
                    };
                    TensorInfo {
                        name: ffi::info_name(info),
                        is_input: info.usage == ffi::NRT_TENSOR_USAGE_INPUT,
                        size: info.size,
                        dtype: info.dtype,
                        shape,
                    }
                })
                .collect()
        };
        // SAFETY: the array from get_model_tensor_info, freed once.
        let code = unsafe { (api.free_model_tensor_info)(arr) };
        status::check(code, &Site { call: "nrt_free_model_tensor_info", rank: self.rank, what })?;
        Ok(infos)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: loaded by us, unloaded once; no set execution is in flight (the executor joins
        // its rank workers first). A failure here has nowhere to go but the runtime's own log.
        unsafe { (self.session.api.unload)(self.raw()) };
    }
}

/// A device tensor on one rank.
pub struct Tensor {
    raw: NonNull<NrtTensor>,
    pub rank: usize,
    pub name: String,
    pub bytes: usize,
    session: Arc<Session>,
}

unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

impl Tensor {
    pub fn allocate(session: &Arc<Session>, rank: usize, bytes: usize, name: &str) -> Result<Tensor> {
        let api = session.api;
        let cname = c_name(name)?;
        let mut raw: *mut NrtTensor = std::ptr::null_mut();
        // SAFETY: cname lives through the call; raw receives the handle.
        let code =
            unsafe { (api.tensor_allocate)(NRT_TENSOR_PLACEMENT_DEVICE, rank as i32, bytes, cname.as_ptr(), &mut raw) };
        let what = format!("tensor '{name}', {bytes} bytes");
        status::check(code, &Site { call: "nrt_tensor_allocate", rank, what: &what })?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::Backend(format!("nrt_tensor_allocate ({what}) succeeded but returned no tensor")))?;
        Ok(Tensor { raw, rank, name: name.to_string(), bytes, session: session.clone() })
    }

    pub fn raw(&self) -> *mut NrtTensor {
        self.raw.as_ptr()
    }

    fn site_what(&self) -> String {
        format!("tensor '{}', {} bytes", self.name, self.bytes)
    }

    pub fn write(&self, data: &[u8]) -> Result<()> {
        if data.len() > self.bytes {
            return Err(Error::Internal(format!("{} bytes written to {}", data.len(), self.site_what())));
        }
        // SAFETY: our live tensor, and data fits in it.
        unsafe { write_raw(self.session.api, self.raw(), self.rank, data, &self.site_what()) }
    }

    /// Zero-fills the tensor (a fresh KV cache): nrt_tensor_memset when the runtime has it.
    pub fn zero(&self) -> Result<()> {
        let api = self.session.api;
        if let Some(memset) = api.tensor_memset {
            // SAFETY: the whole of our own tensor.
            let code = unsafe { memset(self.raw(), 0, 0, self.bytes) };
            return status::check(code, &Site { call: "nrt_tensor_memset", rank: self.rank, what: &self.site_what() });
        }
        // Without memset: write zeros a bounded chunk at a time (caches can be gigabytes).
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(self.bytes)];
        let mut offset = 0;
        while offset < self.bytes {
            let n = CHUNK.min(self.bytes - offset);
            // SAFETY: [offset, offset+n) lies inside the tensor.
            let code = unsafe { (api.tensor_write)(self.raw(), zeros.as_ptr() as *const c_void, offset, n) };
            status::check(code, &Site { call: "nrt_tensor_write", rank: self.rank, what: &self.site_what() })?;
            offset += n;
        }
        Ok(())
    }
}

/// `nrt_tensor_write` of all of `data` at offset 0 (callable from a rank worker with a raw handle).
///
/// # Safety
/// `raw` is a live tensor of at least `data.len()` bytes.
pub unsafe fn write_raw(api: &ffi::Api, raw: *mut NrtTensor, rank: usize, data: &[u8], what: &str) -> Result<()> {
    let code = unsafe { (api.tensor_write)(raw, data.as_ptr() as *const c_void, 0, data.len()) };
    status::check(code, &Site { call: "nrt_tensor_write", rank, what })
}

/// `nrt_tensor_read` of `bytes` bytes from offset 0.
///
/// # Safety
/// `raw` is a live tensor of at least `bytes` bytes.
pub unsafe fn read_raw(api: &ffi::Api, raw: *mut NrtTensor, rank: usize, bytes: usize, what: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: per the contract; buf has room for `bytes`.
    let code = unsafe { (api.tensor_read)(raw, buf.as_mut_ptr() as *mut c_void, 0, bytes) };
    status::check(code, &Site { call: "nrt_tensor_read", rank, what })?;
    Ok(buf)
}

impl Drop for Tensor {
    fn drop(&mut self) {
        let mut raw = self.raw();
        // SAFETY: allocated by us, freed once, after every set binding it was destroyed.
        unsafe { (self.session.api.tensor_free)(&mut raw) };
    }
}

/// A tensor set: names bound to tensors, the input or output side of one (graph, rank).
/// It does not own the tensors: the executor destroys sets before it frees tensors.
pub struct TensorSet {
    raw: NonNull<NrtTensorSet>,
    pub rank: usize,
    session: Arc<Session>,
}

unsafe impl Send for TensorSet {}
unsafe impl Sync for TensorSet {}

impl TensorSet {
    pub fn new(session: &Arc<Session>, rank: usize) -> Result<TensorSet> {
        let mut raw: *mut NrtTensorSet = std::ptr::null_mut();
        // SAFETY: raw receives the set.
        let code = unsafe { (session.api.allocate_tensor_set)(&mut raw) };
        status::check(code, &Site { call: "nrt_allocate_tensor_set", rank, what: "a tensor set" })?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::Backend("nrt_allocate_tensor_set succeeded but returned no set".to_string()))?;
        Ok(TensorSet { raw, rank, session: session.clone() })
    }

    pub fn raw(&self) -> *mut NrtTensorSet {
        self.raw.as_ptr()
    }

    pub fn add(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        let cname = c_name(name)?;
        // SAFETY: a live set and tensor; the runtime copies the name.
        let code = unsafe { (self.session.api.add_tensor_to_tensor_set)(self.raw(), cname.as_ptr(), tensor.raw()) };
        let what = format!("binding '{name}' to tensor '{}'", tensor.name);
        status::check(code, &Site { call: "nrt_add_tensor_to_tensor_set", rank: self.rank, what: &what })
    }
}

impl Drop for TensorSet {
    fn drop(&mut self) {
        let mut raw = self.raw();
        // SAFETY: allocated by us, destroyed once, while its tensors are still alive.
        unsafe { (self.session.api.destroy_tensor_set)(&mut raw) };
    }
}
