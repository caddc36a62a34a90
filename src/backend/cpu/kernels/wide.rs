//! Dense linear for batches (prompts, batched decode) with AVX-512: one 512-bit vector carries two
//! dots at once — weight rows k and k+1 against the same x row, each in its own 8-lane half — so
//! every fused multiply-add does twice the work of the 256-bit tiles while each half follows the
//! module order of `dot.rs` exactly (a = fma(wB, xB, fma(wA, xA, a)) per 16-block, the fixed
//! 8-lane sum, the sequential tail): the bits equal the 256-bit kernels' (batch invariance).
//!
//! x's 8 elements are broadcast to both halves by one load; the weights of the two rows are joined
//! by one insert per 8 elements (per 16 for bf16), shared by all the x rows of the tile.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::dot::{block, hsum, Lanes};

/// Weight element types with a paired 16-element load: (A, B) of row `a` in the low halves, of
/// row `b` in the high halves (A, B as `Lanes::load16`).
pub(crate) trait Pairs: Lanes {
    unsafe fn load16x2(a: *const Self, b: *const Self) -> (__m512, __m512);
}

#[inline(always)]
unsafe fn join(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
}

impl Pairs for f32 {
    #[inline(always)]
    unsafe fn load16x2(a: *const f32, b: *const f32) -> (__m512, __m512) {
        (
            join(_mm256_loadu_ps(a), _mm256_loadu_ps(b)),
            join(_mm256_loadu_ps(a.add(8)), _mm256_loadu_ps(b.add(8))),
        )
    }
}

impl Pairs for bf16 {
    /// Each row's 16 bf16 as 8 u32 (as `Lanes`): shift gives the even elements, mask the odd.
    #[inline(always)]
    unsafe fn load16x2(a: *const bf16, b: *const bf16) -> (__m512, __m512) {
        let v = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)),
            _mm256_loadu_si256(b as *const __m256i),
        );
        let even = _mm512_slli_epi32::<16>(v);
        let odd = _mm512_and_si512(v, _mm512_set1_epi32(0xffff0000u32 as i32));
        (_mm512_castsi512_ps(even), _mm512_castsi512_ps(odd))
    }
}

impl Pairs for f16 {
    #[inline(always)]
    unsafe fn load16x2(a: *const f16, b: *const f16) -> (__m512, __m512) {
        let half = |o: usize| {
            _mm512_cvtph_ps(_mm256_set_m128i(
                _mm_loadu_si128(b.add(o) as *const __m128i),
                _mm_loadu_si128(a.add(o) as *const __m128i),
            ))
        };
        (half(0), half(8))
    }
}

/// The two 8-lane halves of a register (two dots' accumulators).
#[inline(always)]
pub(super) unsafe fn halves(v: __m512) -> [__m256; 2] {
    [_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))]
}

/// Broadcasts 8 floats at `p` to both halves.
#[inline(always)]
unsafe fn bcast8(p: *const f32) -> __m512 {
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))))
}

/// Bytes of x rows kept hot per tile (as the 256-bit kernels).
const X_TILE_BYTES: usize = 256 * 1024;
/// Prefetch distance into the weight rows of a group during the first x-row pass.
const PF_BYTES: usize = 8192;

/// Output columns [o0, o1) for all n rows: weight rows in groups of 2P, x rows in groups of R.
///
/// SAFETY: as for `linear::chunk`; the CPU must support avx2, fma, f16c, avx512f and avx512vl
/// (x permuted by `permute_x_bf16` for bf16, as for the 256-bit kernels).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk<T: Pairs, const R: usize, const P: usize>(
    x: &[f32],
    n: usize,
    w: &[T],
    rows: usize,
    cols: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let tile = (X_TILE_BYTES / (cols * 4).max(1)).max(R) / R * R;
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    let mut r0 = 0;
    while r0 < n {
        let r1 = n.min(r0 + tile);
        let mut o = o0;
        while o + 2 * P <= o1 {
            group::<T, R, P>(xp, wp, rows, cols, r0, r1, o, bias, out);
            o += 2 * P;
        }
        while o + 2 <= o1 {
            group::<T, R, 1>(xp, wp, rows, cols, r0, r1, o, bias, out);
            o += 2;
        }
        if o < o1 {
            // An odd last weight row: the 256-bit dot (same arithmetic, one row).
            for r in r0..r1 {
                let v = block::<T, 1, 1, false>(xp.add(r * cols), cols, wp.add(o * cols), cols, cols, std::ptr::null());
                store(v[0][0], rows, r, o, bias, out);
            }
        }
        r0 = r1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn group<T: Pairs, const R: usize, const P: usize>(
    x: *const f32,
    w: *const T,
    rows: usize,
    cols: usize,
    r0: usize,
    r1: usize,
    o: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let wo = w.add(o * cols);
    let pf = wo.wrapping_add(PF_BYTES / std::mem::size_of::<T>());
    let mut r = r0;
    while r + R <= r1 {
        let v = tile::<T, R, P>(x.add(r * cols), cols, wo, cols, cols, r == r0, pf);
        stores::<R, P>(&v, rows, r, o, bias, out);
        r += R;
    }
    if R > 4 && r + 4 <= r1 {
        let v = tile::<T, 4, P>(x.add(r * cols), cols, wo, cols, cols, r == r0, pf);
        stores::<4, P>(&v, rows, r, o, bias, out);
        r += 4;
    }
    while r + 2 <= r1 {
        let v = tile::<T, 2, P>(x.add(r * cols), cols, wo, cols, cols, r == r0, pf);
        stores::<2, P>(&v, rows, r, o, bias, out);
        r += 2;
    }
    if r < r1 {
        let v = tile::<T, 1, P>(x.add(r * cols), cols, wo, cols, cols, r == r0, pf);
        stores::<1, P>(&v, rows, r, o, bias, out);
    }
}

/// R x rows (`xs` apart) against weight rows [0, 2P) of `w` (`ws` apart), dots of `c` elements:
/// out[r][p][h] for weight row 2p + h. With `prefetch`, the rows are one contiguous region (ws == c)
/// read ahead from `pf`. Must be inlined into an avx512f+avx512vl+fma function.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile<T: Pairs, const R: usize, const P: usize>(
    x: *const f32,
    xs: usize,
    w: *const T,
    ws: usize,
    c: usize,
    prefetch: bool,
    pf: *const T,
) -> [[[f32; 2]; P]; R] {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut i = 0;
    while i + 16 <= c {
        if prefetch {
            // The 2P short row streams defeat the hardware prefetcher (as in `dot::block`).
            for k in 0..2 * P {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(i * 2 * P + k * 16) as *const i8);
            }
        }
        let mut wv = [(_mm512_setzero_ps(), _mm512_setzero_ps()); P];
        for (p, v) in wv.iter_mut().enumerate() {
            *v = T::load16x2(w.add(2 * p * ws + i), w.add((2 * p + 1) * ws + i));
        }
        for (r, ar) in acc.iter_mut().enumerate() {
            let xa = bcast8(x.add(r * xs + i));
            let xb = bcast8(x.add(r * xs + i + 8));
            for (a, &(wa, wb)) in ar.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(wb, xb, _mm512_fmadd_ps(wa, xa, *a));
            }
        }
        i += 16;
    }
    let mut out = [[[0f32; 2]; P]; R];
    for r in 0..R {
        for p in 0..P {
            for (h, half) in halves(acc[r][p]).into_iter().enumerate() {
                let k = 2 * p + h;
                let mut s = hsum(half);
                for j in i..c {
                    s = (*w.add(k * ws + j)).to_f32().mul_add(*x.add(r * xs + j), s);
                }
                out[r][p][h] = s;
            }
        }
    }
    out
}

#[inline(always)]
unsafe fn store(s: f32, rows: usize, r: usize, o: usize, bias: Option<&[f32]>, out: *mut f32) {
    let s = match bias {
        Some(b) => s + *b.get_unchecked(o),
        None => s,
    };
    *out.add(r * rows + o) = s;
}

#[inline(always)]
unsafe fn stores<const R: usize, const P: usize>(
    v: &[[[f32; 2]; P]; R],
    rows: usize,
    r: usize,
    o: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    for (i, vr) in v.iter().enumerate() {
        for (p, pair) in vr.iter().enumerate() {
            for (h, &s) in pair.iter().enumerate() {
                store(s, rows, r + i, o + 2 * p + h, bias, out);
            }
        }
    }
}
