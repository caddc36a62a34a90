//! Gated activations.

use rayon::prelude::*;

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
/// 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len());
    const K: f32 = 0.797_884_6; // sqrt(2 / pi)
    let f = |(g, &u): (&mut f32, &f32)| {
        let x = *g;
        *g = 0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh()) * u;
    };
    if gate.len() < 2 * PAR_CHUNK {
        gate.iter_mut().zip(up).for_each(f);
    } else {
        gate.par_chunks_mut(PAR_CHUNK)
            .zip(up.par_chunks(PAR_CHUNK))
            .for_each(|(g, u)| g.iter_mut().zip(u).for_each(f));
    }
}

/// silu(g) * u for one element; shared with the fused gate/up linear so both give the same bits.
#[inline(always)]
pub(super) fn silu_mul_one(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

#[cfg(test)]
mod tests {
    use super::*;

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
