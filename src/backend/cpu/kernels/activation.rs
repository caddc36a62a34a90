//! Gated activations.

use rayon::prelude::*;

use super::exp::exp_poly;

/// Elements per parallel task; below two of these the call stays on the calling thread.
const PAR_CHUNK: usize = 1 << 14;

/// gate[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)). Elementwise, so batch invariant.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    let f = |(g, &u): (&mut f32, &f32)| *g = silu_mul_one(*g, u);
    if gate.len() < 2 * PAR_CHUNK {
        gate.iter_mut().zip(up).for_each(f);
    } else {
        gate.par_chunks_mut(PAR_CHUNK)
            .zip(up.par_chunks(PAR_CHUNK))
            .for_each(|(g, u)| g.iter_mut().zip(u).for_each(f));
    }
}

/// gate[i] = gelu_tanh(gate[i]) * up[i] (Gemma's GeGLU), torch's `gelu(x, approximate="tanh")`:
/// 0.5 * x * (1 + tanh(z)), z = sqrt(2 / pi) * (x + 0.044715 * x^3), computed as the identical
/// x / (1 + exp(-2z)) (no cancellation near z = 0, one exponential). Elementwise.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    if gate.len() < 2 * PAR_CHUNK {
        gate_row(Gate::GeluTanh, gate, up);
    } else {
        gate.par_chunks_mut(PAR_CHUNK)
            .zip(up.par_chunks(PAR_CHUNK))
            .for_each(|(g, u)| gate_row(Gate::GeluTanh, g, u));
    }
}

/// The activation of a gated MLP: gate = act(gate) * up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Silu,
    GeluTanh,
}

/// gate[i] = act(gate[i]) * up[i] over one run of elements; the result of an element never
/// depends on where the run starts or ends (the SIMD lanes and the scalar tail compute the same
/// operations), so any chunking gives the same bits.
pub(super) fn gate_row(act: Gate, gate: &mut [f32], up: &[f32]) {
    match act {
        Gate::Silu => gate.iter_mut().zip(up).for_each(|(g, &u)| *g = silu_mul_one(*g, u)),
        Gate::GeluTanh => {
            let mut i = 0;
            #[cfg(target_arch = "x86_64")]
            if super::use_avx2() {
                // SAFETY: AVX2+FMA present; the kernel stays within the common length.
                i = unsafe { avx2::gelu_rows(gate, up) };
            }
            for (g, &u) in gate[i..].iter_mut().zip(&up[i..]) {
                *g = gelu_tanh_mul_one(*g, u);
            }
        }
    }
}

/// act(g) for one element without the gating product, with the polynomial exp for both
/// activations (the bf16 numerics round the result, so libm's last bit does not matter there, and
/// `bf16::gate_row`'s SIMD lanes compute the same operations).
#[inline(always)]
pub(super) fn act_one(act: Gate, g: f32) -> f32 {
    match act {
        Gate::Silu => g / (1.0 + exp_poly(-g)),
        Gate::GeluTanh => gelu_tanh_mul_one(g, 1.0),
    }
}

/// silu(g) * u for one element; shared with the fused gate/up linear so both give the same bits.
#[inline(always)]
pub(super) fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

pub(super) const SQRT_2_OVER_PI: f32 = 0.797_884_6;
pub(super) const GELU_CUBIC: f32 = 0.044715;

/// gelu_tanh(x) * u, the scalar twin of `avx2::gelu_rows`' lanes (same operations, same order).
#[inline(always)]
fn gelu_tanh_mul_one(x: f32, u: f32) -> f32 {
    let z = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    x / (1.0 + exp_poly(-2.0 * z)) * u
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::exp::exp8;
    use super::{GELU_CUBIC, SQRT_2_OVER_PI};

    /// `super::gelu_tanh_mul_one` on whole groups of 8; returns how many elements it did.
    ///
    /// SAFETY: the CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gelu_rows(gate: &mut [f32], up: &[f32]) -> usize {
        let len = gate.len().min(up.len()) / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let mut i = 0;
        while i < len {
            let x = _mm256_loadu_ps(g.add(i));
            let cubic = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_CUBIC), x), x), x);
            let z = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), _mm256_add_ps(x, cubic));
            let e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0), z));
            let y = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(y, _mm256_loadu_ps(u.add(i))));
            i += 8;
        }
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_reference_and_chunking() {
        let n = 4099;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 2000.0) * 0.011).chain([f32::NAN, 60.0, -60.0, 1e-30, -0.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
        let mut all = g.clone();
        gelu_tanh_mul(&mut all, &u);
        for i in 0..g.len() {
            let x = g[i] as f64;
            // 0.5 x (1 + tanh z) = x / (1 + exp(-2z)): f64's tanh rounds to -1 (hence 0) far sooner.
            let z = 0.7978845608028654 * (x + 0.044715 * x * x * x);
            let want = x / (1.0 + (-2.0 * z).exp()) * u[i] as f64;
            if x.is_nan() {
                assert!(all[i].is_nan());
                continue;
            }
            let err = (all[i] as f64 - want).abs();
            // exp(-2z) amplifies z's own f32 rounding (relative 2^-24) by |2z|.
            let bound = want.abs() * (5e-7 + 2.4e-7 * z.abs()) + 1e-35; // the clamped exp leaves ~1e-37, not 0
            assert!(err <= bound, "x={x}: {} vs {want}", all[i]);
        }
        // Any split of the run gives the same bits (SIMD lanes and the scalar tail agree).
        for start in [0usize, 1, 3, 7, 9] {
            let mut part = g[start..].to_vec();
            gate_row(Gate::GeluTanh, &mut part, &u[start..]);
            assert!(part.iter().zip(&all[start..]).all(|(a, b)| a.to_bits() == b.to_bits()), "start={start}");
        }
    }

    #[test]
    fn silu_mul_matches_reference() {
        for &n in &[1usize, 7, 100, 40_000] {
            let g: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.25).collect();
            let u: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.5).collect();
            let mut y = g.clone();
            silu_mul(&mut y, &u);
            for i in 0..n {
                let gd = g[i] as f64;
                let want = gd / (1.0 + (-gd).exp()) * u[i] as f64;
                let err = (y[i] as f64 - want).abs();
                assert!(
                    err <= 1e-5 * want.abs().max(1e-6),
                    "i={i} {} vs {want}",
                    y[i]
                );
            }
        }
    }
}
