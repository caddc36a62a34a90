//! The one dot-product arithmetic every kernel uses, so results are batch invariant.
//!
//! AVX2 order for dot(x, w) of length c: one 8-lane accumulator a; for each full 16-block b,
//! a = fma(wA, xA, a) then a = fma(wB, xB, a), where (A, B) are the block's first and second 8
//! elements for f32/f16 weights, and its even and odd elements for bf16 (16 bf16 load as 8 u32:
//! `<< 16` yields the even ones as f32, `& 0xffff0000` the odd ones; x is pre-permuted to match,
//! see `permute_x_bf16`); then s = hsum(a) in a fixed tree; then the <16 tail is folded in
//! sequentially with scalar FMA. One accumulator per dot leaves registers for wide R x W tiles.
//! `block` computes an R x W tile of such dots (R x rows, W weight rows) to reuse loads across
//! rows; the tile shape changes only which dots run together, never the order inside one dot.
//!
//! Scalar order: 8 partial sums over lanes i % 8, summed pairwise, then the tail sequentially.

use crate::tensor::Element;

/// Scalar dot with a fixed order (the fallback path).
#[inline]
pub(super) fn dot_scalar<T: Element>(x: &[f32], w: &[T]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    let mut acc = [0f32; 8];
    let mut xc = x.chunks_exact(8);
    let mut wc = w.chunks_exact(8);
    for (xa, wa) in (&mut xc).zip(&mut wc) {
        for l in 0..8 {
            acc[l] += xa[l] * wa[l].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
        s += a * b.to_f32();
    }
    s
}

/// Reorders each full 16-block of every `cols`-long row of `x` to (even elements, odd elements),
/// the layout the AVX2 bf16 kernel pairs with its weights; tails stay in place.
pub(super) fn permute_x_bf16(x: &[f32], cols: usize, out: &mut Vec<f32>) {
    out.clear();
    out.extend_from_slice(x);
    if cols == 0 {
        return;
    }
    for row in out.chunks_exact_mut(cols) {
        for blk in row.chunks_exact_mut(16) {
            let mut t = [0f32; 16];
            for j in 0..8 {
                t[j] = blk[2 * j];
                t[8 + j] = blk[2 * j + 1];
            }
            blk.copy_from_slice(&t);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use avx::*;

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use crate::tensor::Element;

    /// Weight element types with a 16-element load as two 8-lane f32 vectors (A, B) (see the
    /// module docs). Callers must run with avx2+fma+f16c enabled.
    pub(crate) trait Lanes: Element {
        /// Whether (A, B) are the even/odd elements, so x must be permuted by `permute_x_bf16`.
        const PERMUTED: bool;
        /// Loads 16 elements at `p` (unaligned).
        unsafe fn load16(p: *const Self) -> (__m256, __m256);
    }

    impl Lanes for f32 {
        const PERMUTED: bool = false;
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> (__m256, __m256) {
            (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
    }

    impl Lanes for bf16 {
        const PERMUTED: bool = true;
        /// bf16 is the top half of an f32: one 32-byte load, then shift (even) and mask (odd).
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> (__m256, __m256) {
            let v = _mm256_loadu_si256(p as *const __m256i);
            let even = _mm256_slli_epi32::<16>(v);
            let odd = _mm256_and_si256(v, _mm256_set1_epi32(0xffff0000u32 as i32));
            (_mm256_castsi256_ps(even), _mm256_castsi256_ps(odd))
        }
    }

    impl Lanes for f16 {
        const PERMUTED: bool = false;
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> (__m256, __m256) {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8) as *const __m128i)),
            )
        }
    }

    /// Fixed-order horizontal sum of 8 lanes (shared by the float and quantized kernels).
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    /// R x W tile of dots: out[r][k] = dot(x + r*xs, w + k*ws) over `c` elements, in the order
    /// documented at the top of this file (x permuted when `T::PERMUTED`). With `PF`, the W weight rows (contiguous when ws == c)
    /// are treated as one region and prefetched linearly from `pf` on, in step with consumption:
    /// W short interleaved row streams defeat the hardware prefetcher. Must be inlined into an
    /// avx2+fma+f16c function.
    ///
    /// SAFETY: x rows r < R and w rows k < W must each have `c` readable elements.
    #[inline(always)]
    pub(crate) unsafe fn block<T: Lanes, const R: usize, const W: usize, const PF: bool>(
        x: *const f32,
        xs: usize,
        w: *const T,
        ws: usize,
        c: usize,
        pf: *const T,
    ) -> [[f32; W]; R] {
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let mut i = 0;
        while i + 16 <= c {
            if PF {
                // W*16 elements are consumed per step: keep the prefetch walk in step with them.
                // Into L2 (T1) where L2's larger pool of outstanding misses pays: batched rows
                // (f32 batch 8 decode ~+40%) and f32 decode (~+6%); half-width weights at batch 1
                // run ~15% faster prefetched into L1 (T0). Measured on the 2-core EPYC VM.
                let to_l1 = R == 1 && std::mem::size_of::<T>() < 4;
                for k in 0..W {
                    let p = pf.wrapping_add(i * W + k * 16) as *const i8;
                    if to_l1 {
                        _mm_prefetch::<_MM_HINT_T0>(p);
                    } else {
                        _mm_prefetch::<_MM_HINT_T1>(p);
                    }
                }
            }
            let mut wv = [(_mm256_setzero_ps(), _mm256_setzero_ps()); W];
            for (k, v) in wv.iter_mut().enumerate() {
                *v = T::load16(w.add(k * ws + i));
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let xa = _mm256_loadu_ps(x.add(r * xs + i));
                let xb = _mm256_loadu_ps(x.add(r * xs + i + 8));
                for (a, &(wa, wb)) in ar.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(wb, xb, _mm256_fmadd_ps(wa, xa, *a));
                }
            }
            i += 16;
        }
        let mut out = [[0f32; W]; R];
        for r in 0..R {
            for k in 0..W {
                let mut s = hsum(acc[r][k]);
                for j in i..c {
                    s = (*w.add(k * ws + j)).to_f32().mul_add(*x.add(r * xs + j), s);
                }
                out[r][k] = s;
            }
        }
        out
    }

    /// y += a * x over `n` elements (lanes are independent elements, so vector width does not
    /// change any result). Must be inlined into an avx2+fma function.
    ///
    /// SAFETY: y and x must have `n` valid elements.
    #[inline(always)]
    pub(crate) unsafe fn axpy(y: *mut f32, a: f32, x: *const f32, n: usize) {
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(av, _mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i)));
            _mm256_storeu_ps(y.add(i), r);
            i += 8;
        }
        while i < n {
            *y.add(i) = a.mul_add(*x.add(i), *y.add(i));
            i += 1;
        }
    }
}
