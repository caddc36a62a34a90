//! RMSNorm as HF LlamaRMSNorm computes it in f32: y = w * (x * rsqrt(mean(x^2) + eps)).

/// Row-wise RMSNorm; rows have `w.len()` elements. `out` has the same length as `x`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len());
    let d = w.len();
    if d == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = inv_rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// In-place form of [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    if d == 0 {
        return;
    }
    for xr in x.chunks_exact_mut(d) {
        let inv = inv_rms(xr, eps);
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = g * (*v * inv);
        }
    }
}

/// 1 / sqrt(mean(x^2) + eps). The sum of squares is accumulated in f64 (8 fixed partial sums,
/// vectorizable) so the f32 mean is essentially correctly rounded, like torch's careful reduction.
#[inline]
pub(super) fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            let v = c[l] as f64;
            acc[l] += v * v;
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in it.remainder() {
        s += (v as f64) * (v as f64);
    }
    let mean = (s / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        for (r, xr) in x.chunks(d).enumerate() {
            let ms: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..d {
                out[r * d + i] = (w[i] as f64 * (xr[i] as f64 * inv)) as f32;
            }
        }
        out
    }

    #[test]
    fn rms_norm_matches_reference() {
        for &d in &[1usize, 7, 33, 64, 576] {
            let rows = 3;
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.031)
                .collect();
            let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 13) as f32 * 0.07).collect();
            let eps = 1e-6;
            let want = naive(&x, &w, eps);
            let mut out = vec![0f32; x.len()];
            rms_norm(&x, &w, eps, &mut out);
            let mut inplace = x.clone();
            rms_norm_inplace(&mut inplace, &w, eps);
            for i in 0..x.len() {
                let tol = 1e-5 * want[i].abs().max(1e-3);
                assert!(
                    (out[i] - want[i]).abs() <= tol,
                    "d={d} i={i} {} vs {}",
                    out[i],
                    want[i]
                );
                assert_eq!(out[i].to_bits(), inplace[i].to_bits());
            }
        }
    }
}
