//! The exponential of the elementwise kernels (GeGLU): a Cephes-style
//! polynomial whose 8-lane and scalar forms run the same operations, so an element's bits never
//! depend on whether it fell in a SIMD group or a tail (any chunking, any batch: same result).

// exp as Cephes' expf: n = floor(x log2(e) + 1/2), r = x - n ln 2 (in two parts), a degree-6
// polynomial, times 2^n. About 1 ulp; the input is clamped to [-87, 88] (finite, normal results).
const EXP_LO: f32 = -87.0;
const EXP_HI: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

#[inline(always)]
pub(super) fn exp_poly(x: f32) -> f32 {
    // NaN stays NaN (f32::max would replace it by the bound).
    let x = if x.is_nan() { x } else { x.max(EXP_LO).min(EXP_HI) };
    let n = x.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = EXP_P[0];
    for &c in &EXP_P[1..] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// s[i] = exp(s[i] - m), 8 lanes at a time where the CPU has AVX2 (the same bits as the tail).
pub(super) fn exp_shifted(s: &mut [f32], m: f32) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: AVX2+FMA present; the kernel stays within the slice.
        i = unsafe { avx2::exp_shifted_rows(s, m) };
    }
    s[i..].iter_mut().for_each(|x| *x = exp_poly(*x - m));
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx2::exp8;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{EXP_HI, EXP_LO, EXP_P, LN2_HI, LN2_LO, LOG2E};

    /// Whole groups of 8 of `super::exp_shifted`; returns how many it did.
    ///
    /// SAFETY: the CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_rows(s: &mut [f32], m: f32) -> usize {
        let len = s.len() / 8 * 8;
        let p = s.as_mut_ptr();
        let mut i = 0;
        while i < len {
            _mm256_storeu_ps(p.add(i), exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), _mm256_set1_ps(m))));
            i += 8;
        }
        len
    }

    /// `super::exp_poly` on 8 lanes (the same operations). Must be inlined into an avx2+fma function.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        // max/min return their second operand when one is NaN: NaN stays NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5)));
        let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x));
        let mut p = _mm256_set1_ps(EXP_P[0]);
        for &c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_its_lanes_equal_the_scalar_form() {
        let xs: Vec<f32> = (0..3000).map(|i| (i as f32 - 2500.0) * 0.037).chain([f32::NAN, -1e30, 0.0, -0.0]).collect();
        for &x in &xs {
            let e = exp_poly(x);
            if x.is_nan() {
                assert!(e.is_nan());
                continue;
            }
            let want = (x as f64).exp().max((EXP_LO as f64).exp());
            assert!(((e as f64) - want).abs() <= 2.5e-7 * want, "exp({x}) = {e}, want {want}");
        }
        #[cfg(target_arch = "x86_64")]
        if crate::backend::cpu::kernels::use_avx2() {
            for c in xs.chunks_exact(8) {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2+FMA checked; 8 values in and out.
                unsafe {
                    use std::arch::x86_64::*;
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn run(c: &[f32], out: &mut [f32; 8]) {
                        _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
                    }
                    run(c, &mut lanes);
                }
                for (&x, &e) in c.iter().zip(&lanes) {
                    assert_eq!(e.to_bits(), exp_poly(x).to_bits(), "x={x}");
                }
            }
        }
    }
}
