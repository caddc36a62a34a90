//! CPU compute kernels: linear (matrix x weight^T), RMSNorm, RoPE, SiLU-gating and causal GQA attention.
//!
//! Batch invariance: every output element is produced by one routine with a fixed accumulation order
//! (see `dot.rs`), whatever the batch size, tiling or thread split, so a row's bits never depend on
//! which other rows are computed alongside it.
//!
//! SIMD: AVX2+FMA+F16C when the CPU has them (checked once per process), else portable scalar code.

mod activation;
mod attention;
pub mod bf16;
mod dot;
mod exp;
mod linear;
mod norm;
mod quant;
mod rope;
mod team;
#[cfg(target_arch = "x86_64")]
mod wide;

pub(crate) use team::mark_rank_pool_thread;

pub use activation::{gelu_tanh_mul, silu_mul, Gate};
pub use attention::{attention, attention_capped, AttnSeq};
pub use linear::{linear, linear_gated, linear_gated_in, linear_many, linear_many_in, Compute, Proj};
pub use norm::{rms_norm, rms_norm_inplace};
pub use rope::rope_inplace;

/// Whether this process uses the AVX2 path; decided once so that one process always takes one path
/// (the two paths may differ in the last bits).
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AVX-512VL is there too; it only buys registers for the same 256-bit kernels (linear
/// picks wider tiles), never a different arithmetic.
pub(crate) fn use_avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<bool> = OnceLock::new();
        *AVX512.get_or_init(|| {
            use_avx2() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether AVX-512 VNNI is there (with VL): the quantized kernels then sum each block's integer
/// products with `vpdpbusd` — the same exact sums, fewer instructions.
pub(crate) fn use_avx512vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static VNNI: OnceLock<bool> = OnceLock::new();
        *VNNI.get_or_init(|| use_avx512vl() && is_x86_feature_detected!("avx512vnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Output pointer shared by parallel tasks that each write a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(*mut f32);

// SAFETY: only used to write disjoint elements from different tasks while the owner's borrow is alive.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn new(s: &mut [f32]) -> Self {
        SendPtr(s.as_mut_ptr())
    }
    /// A method (not field access) so closures capture the whole Send wrapper.
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The calling thread's CPU time in seconds (kernel benchmarks: other load on the machine
/// matters less than with wall time).
#[cfg(test)]
pub(crate) fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Ts {
        s: i64,
        ns: i64,
    }
    extern "C" {
        fn clock_gettime(clk: i32, tp: *mut Ts) -> i32;
    }
    let mut t = Ts { s: 0, ns: 0 };
    // SAFETY: valid out pointer; 3 = CLOCK_THREAD_CPUTIME_ID on Linux.
    unsafe { clock_gettime(3, &mut t) };
    t.s as f64 + t.ns as f64 * 1e-9
}

/// The SIMD choices a test can exercise on this CPU: scalar always, AVX2 when present.
#[cfg(test)]
pub(crate) fn test_paths() -> Vec<bool> {
    if use_avx2() {
        vec![false, true]
    } else {
        vec![false]
    }
}
