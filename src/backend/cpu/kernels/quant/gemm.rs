//! Quantized linear for prompt-sized batches (AVX-512 VNNI): the row tiles of `mod.rs` decode a
//! weight block again for every 4 activation rows and spend a dozen instructions per 32-element
//! dot; here a panel of 8 weight rows is decoded once (per x tile) into 512-bit vectors that hold
//! one block of two rows, and every activation row runs against it with 4 instructions per block
//! pair (dot-product, convert, scale, fused add).
//!
//! The arithmetic is the module's dot order exactly, so the bits equal the row tiles' (and thus
//! decode's, batch invariance): lane l of a row's 8 lanes gets the exact integer sum of elements
//! 4l..4l+3, then fma(isum, scale * xd, acc). The integer sums are computed as
//! dpbusd(x + 128, w) - 128 * sum(w): x offset to unsigned, the weights as signed bytes (every
//! type's values fit: -128..127 or 0..63), the correction per 4-element group taken once at decode.
//! Exact in i32, so the same isum as `maddubs` or `vpdpbusd` with sign-adjusted operands.

use std::arch::x86_64::*;

use super::super::dot::hsum;
use super::super::wide::halves;
use super::avx2::{Args, Kind};
use super::{QActs, QB};

/// Weight rows per panel; one 512-bit vector holds a block of a pair of them.
const W: usize = 8;
const PAIRS: usize = W / 2;
/// Activation rows per register tile (16 accumulators).
const R: usize = 4;
/// Bytes of activations per x tile (kept in L2 while the panels of a chunk pass over them).
const X_TILE_BYTES: usize = 512 * 1024;

/// One decoded panel: per block b and pair p (index b * PAIRS + p): both rows' 32 values, the
/// correction -128 * (sum of each 4-element group), and the 16 lane scales (lo x4, hi x4 for the
/// first row, then the second's); per block the 8 rows' minimums.
struct Panel {
    w: Vec<__m512i>,
    corr: Vec<__m512i>,
    scale: Vec<__m512>,
    mins: Vec<__m256>,
}

/// Columns [o0, o0 + 8k) for all n rows, the largest k that fits in [o0, o1); returns where the
/// caller's tiles take over.
///
/// SAFETY: as for `super::chunk`; xa.u holds n rows; the CPU must have AVX-512 F/VL/VNNI, AVX2,
/// FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn columns<K: Kind>(a: Args) -> usize {
    let (w, rb, xa, n, rows, o0, o1, bias, out) = a;
    let nb = xa.nb;
    let groups = o1.saturating_sub(o0) / W;
    if groups == 0 || nb == 0 || xa.u.len() < n * nb * QB {
        return o0;
    }
    let mut panel = Panel {
        w: vec![_mm512_setzero_si512(); nb * PAIRS],
        corr: vec![_mm512_setzero_si512(); nb * PAIRS],
        scale: vec![_mm512_setzero_ps(); nb * PAIRS],
        mins: vec![_mm256_setzero_ps(); nb],
    };
    let tile = (X_TILE_BYTES / (nb * QB)).max(R) / R * R;
    let mut r0 = 0;
    while r0 < n {
        let r1 = n.min(r0 + tile);
        for g in 0..groups {
            let o = o0 + g * W;
            decode_panel::<K>(w, rb, o, nb, &mut panel);
            let mut r = r0;
            while r + R <= r1 {
                rows_tile::<K, R>(xa, r, o, &panel, rows, bias, out);
                r += R;
            }
            match r1 - r {
                3 => rows_tile::<K, 3>(xa, r, o, &panel, rows, bias, out),
                2 => rows_tile::<K, 2>(xa, r, o, &panel, rows, bias, out),
                1 => rows_tile::<K, 1>(xa, r, o, &panel, rows, bias, out),
                _ => {}
            }
        }
        r0 = r1;
    }
    o0 + groups * W
}

/// Decodes weight rows [o, o + W), every block, into `p`.
#[inline(always)]
unsafe fn decode_panel<K: Kind>(w: *const u8, rb: usize, o: usize, nb: usize, p: &mut Panel) {
    let offset = _mm512_set1_epi8(0x80u8 as i8);
    for b in 0..nb {
        let mut mins = [0f32; W];
        for pair in 0..PAIRS {
            let (va, lo_a, hi_a, min_a) = K::load(w.add((o + 2 * pair) * rb), b);
            let (vb, lo_b, hi_b, min_b) = K::load(w.add((o + 2 * pair + 1) * rb), b);
            let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(va), vb);
            let i = b * PAIRS + pair;
            *p.w.get_unchecked_mut(i) = v;
            let sum128 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, v);
            *p.corr.get_unchecked_mut(i) = _mm512_sub_epi32(_mm512_setzero_si512(), sum128);
            // One scale per 32-block except Q6_K's two (as the row tiles choose them).
            let (hi_a, hi_b) = if K::SPLIT { (hi_a, hi_b) } else { (lo_a, lo_b) };
            *p.scale.get_unchecked_mut(i) = _mm512_setr_ps(
                lo_a, lo_a, lo_a, lo_a, hi_a, hi_a, hi_a, hi_a, lo_b, lo_b, lo_b, lo_b, hi_b, hi_b, hi_b, hi_b,
            );
            mins[2 * pair] = min_a;
            mins[2 * pair + 1] = min_b;
        }
        *p.mins.get_unchecked_mut(b) = _mm256_loadu_ps(mins.as_ptr());
    }
}

/// Activation rows [r0, r0 + RR) against the panel's 8 weight rows, written to out (+ bias).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_tile<K: Kind, const RR: usize>(
    xa: &QActs,
    r0: usize,
    o: usize,
    p: &Panel,
    rows: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let nb = xa.nb;
    let (xu, xd, xs) = (xa.u.as_ptr(), xa.d.as_ptr(), xa.s.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); PAIRS]; RR];
    for b in 0..nb {
        for r in 0..RR {
            let xi = (r0 + r) * nb + b;
            let x = _mm512_broadcast_i64x4(_mm256_loadu_si256(xu.add(xi * QB) as *const __m256i));
            let d = _mm512_set1_ps(*xd.add(xi));
            for k in 0..PAIRS {
                let i = b * PAIRS + k;
                let isum = _mm512_dpbusd_epi32(*p.corr.get_unchecked(i), x, *p.w.get_unchecked(i));
                let sc = _mm512_mul_ps(*p.scale.get_unchecked(i), d);
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sc, acc[r][k]);
            }
        }
    }
    // The minimum terms, each its own sequential sum over blocks (as the row tiles'), in a second
    // pass: in the loop above their accumulators would crowd out the 16 of the products.
    let mut m = [_mm256_setzero_ps(); RR];
    if K::MIN {
        for b in 0..nb {
            for (r, mr) in m.iter_mut().enumerate() {
                let xi = (r0 + r) * nb + b;
                *mr = _mm256_fmadd_ps(*p.mins.get_unchecked(b), _mm256_set1_ps(*xs.add(xi)), *mr);
            }
        }
    }
    for r in 0..RR {
        let mut mins = [0f32; W];
        _mm256_storeu_ps(mins.as_mut_ptr(), m[r]);
        for k in 0..PAIRS {
            for (h, half) in halves(acc[r][k]).into_iter().enumerate() {
                let c = 2 * k + h;
                let mut s = hsum(half) + mins[c];
                if let Some(b) = bias {
                    s += *b.get_unchecked(o + c);
                }
                *out.add((r0 + r) * rows + o + c) = s;
            }
        }
    }
}
