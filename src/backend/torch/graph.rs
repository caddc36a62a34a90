//! CUDA graphs for the decode step, through the C++ shim (graph_shim.cpp; tch has no graph API).
//!
//! A decode step (one new token per sequence) is recorded once per step layout (which KV
//! buckets, how many rows of each, which rows it views) and then replayed: its ~40 kernels per
//! layer launch as one graph instead of one host call each. The recorded step reads its inputs
//! (tokens, cos/sin, rows and write positions, the masks over each bucket's whole capacity) from
//! fixed device buffers, refreshed by a copy before each replay, and writes the logits to a fixed
//! output tensor.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::Tensor;

use super::plan::{StepLayout, StepPlan};
use crate::error::{Error, Result};

extern "C" {
    fn kvgen_graph_new(device: c_int, out: *mut *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_enter_side(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_leave_side(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_capture_begin(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_capture_end(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_replay(g: *mut c_void, err: *mut c_char, len: usize) -> c_int;
    fn kvgen_graph_free(g: *mut c_void);
    fn kvgen_graph_supported() -> c_int;
}

/// Whether the shim was compiled with CUDA (else every graph call reports why not).
pub fn supported() -> bool {
    // SAFETY: a plain C function without arguments.
    unsafe { kvgen_graph_supported() != 0 }
}

fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut buf = [0 as c_char; 512];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim always NUL-terminates what it writes into the buffer.
    let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    Err(Error::Backend(format!("CUDA graph: {msg}")))
}

/// An owned at::cuda::CUDAGraph with its side stream.
pub struct CudaGraph {
    ptr: *mut c_void,
}

// SAFETY: the graph is only used under the backend's state mutex, one thread at a time.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    pub fn new(device: usize) -> Result<CudaGraph> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the shim sets it or reports an error.
        call(|e, n| unsafe { kvgen_graph_new(device as c_int, &mut ptr, e, n) })?;
        Ok(CudaGraph { ptr })
    }

    /// Runs `work` with the graph's side stream current (warm-up, capture), restoring the
    /// previous stream even when `work` fails.
    pub fn on_side_stream<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: self.ptr is a live graph for as long as self exists.
        call(|e, n| unsafe { kvgen_graph_enter_side(self.ptr, e, n) })?;
        let out = work();
        call(|e, n| unsafe { kvgen_graph_leave_side(self.ptr, e, n) })?;
        out
    }

    /// Records what `work` launches (call inside `on_side_stream`).
    pub fn capture<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        // SAFETY: as above.
        call(|e, n| unsafe { kvgen_graph_capture_begin(self.ptr, e, n) })?;
        let out = work();
        let end = call(|e, n| unsafe { kvgen_graph_capture_end(self.ptr, e, n) });
        let out = out?;
        end.map(|_| out)
    }

    pub fn replay(&self) -> Result<()> {
        // SAFETY: as above.
        call(|e, n| unsafe { kvgen_graph_replay(self.ptr, e, n) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: the pointer came from kvgen_graph_new and is freed once.
        unsafe { kvgen_graph_free(self.ptr) }
    }
}

/// A recorded decode step: its fixed input buffers and its output (the graph's memory pool owns
/// the intermediates). `graph` is None in emulation (KVGEN_CUDA_GRAPHS=emulate): the same fixed
/// buffers run eagerly, so the graph's inputs are testable on any device.
pub struct DecodeGraph {
    pub graph: Option<CudaGraph>,
    pub plan: StepPlan,
    pub logits: Tensor,
}

/// Which recorded graph serves a step: its layout (batch shape, buckets, the rows it views), and
/// the stamp of each of those buckets when it was recorded. A graph addresses those buckets'
/// tensors; once one of them is reallocated or freed its stamp changes and the graph is dropped
/// before the next step (`State::prune_graphs`), so a graph never replays against freed or moved
/// tensors, while graphs of the other buckets stay.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct GraphKey {
    pub layout: StepLayout,
    pub stamps: Vec<u64>,
}
