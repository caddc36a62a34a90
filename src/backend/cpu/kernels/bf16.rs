//! `compute_dtype="bfloat16"`: the numerics of transformers' bfloat16 forward. Every activation is
//! a bfloat16 value (held in an f32), rounded where torch rounds an op's bf16 output; projections
//! multiply bf16 activations by bf16 weights with f32 accumulation, as oneDNN does, here with
//! AVX512-BF16's `vdpbf16ps` (two products per lane per instruction, no weight conversion).
//!
//! The dot order (batch invariance): 16 f32 lanes; in each 32-element step lane l adds the product
//! of elements 2l+1, then that of 2l (the instruction's documented order, verified bitwise on
//! Zen 5 by `reference_matches_the_instruction`); a zero-padded last step; the lanes summed by the
//! fixed tree of [`hsum16`]. Every tile and the scalar reference compute each dot that way.

use half::bf16;

/// f32 -> nearest bfloat16 (ties to even), as f32; NaN stays NaN (torch's conversion).
#[inline(always)]
pub fn round(x: f32) -> f32 {
    f32::from_bits((bits(x) as u32) << 16)
}

/// The bfloat16 nearest to x, as its bits.
#[inline(always)]
fn bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Rounds every value to bfloat16 (SIMD lanes and the tail give the same bits).
pub fn round_all(xs: &mut [f32]) {
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: AVX2 present; the kernel stays within the slice.
        i = unsafe { avx2::round_rows(xs) };
    }
    xs[i..].iter_mut().for_each(|v| *v = round(*v));
}

/// x (n rows of bf16 values held as f32) as bf16 bits, for the dot kernels.
pub(super) fn pack(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| bits(v)).collect()
}

/// Whether the CPU has AVX512-BF16 (with F/BW for the masked loads); decided once per process.
pub(crate) fn use_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static BF16: OnceLock<bool> = OnceLock::new();
        *BF16.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The lane sum: l + l+8, then + 4, + 2, + 1 (the SIMD kernels' shuffles in the same tree).
#[inline(always)]
fn hsum16(a: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

#[inline(always)]
fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// One dot in the module's order, scalar (the reference and the path without AVX512-BF16).
pub(super) fn dot_reference(x: &[u16], w: &[u16]) -> f32 {
    let cols = x.len().min(w.len());
    let mut acc = [0f32; 16];
    let at = |v: &[u16], i: usize| if i < cols { widen(v[i]) } else { 0.0 };
    for s in (0..cols).step_by(32) {
        for (l, a) in acc.iter_mut().enumerate() {
            let (odd, even) = (s + 2 * l + 1, s + 2 * l);
            *a += at(x, odd) * at(w, odd);
            *a += at(x, even) * at(w, even);
        }
    }
    hsum16(&acc)
}

/// Weight bits of a bf16 matrix.
pub(super) fn weight_bits(w: &[bf16]) -> &[u16] {
    use half::slice::HalfFloatSliceExt;
    w.reinterpret_cast()
}

/// Output columns [o0, o1) for all n rows of x (n x cols bf16 bits): out[r*rows + o] =
/// dot(x row r, w row o) (+ bias[o]), not rounded (the caller rounds the step's outputs).
///
/// SAFETY: x has n*cols, w rows*cols, out n*rows elements; no one else writes columns [o0, o1).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk(
    x: &[u16],
    n: usize,
    w: &[u16],
    rows: usize,
    cols: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx512bf16() {
        return avx512::chunk(x, n, w, rows, cols, o0, o1, bias, out);
    }
    for o in o0..o1 {
        let wr = &w[o * cols..(o + 1) * cols];
        for r in 0..n {
            let s = dot_reference(&x[r * cols..(r + 1) * cols], wr);
            *out.add(r * rows + o) = bias.map_or(s, |b| s + b[o]);
        }
    }
}

/// RMSNorm in transformers' bf16 forward: normalised in f32 from the bf16 input, then either
/// (Llama, Qwen, Mistral) rounded to bf16 and scaled by the bf16 weight with the product rounded,
/// or (Gemma, `weight_in_f32`) scaled by (1 + w) in f32 and rounded once.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, weight_in_f32: bool, out: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = super::norm::inv_rms(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = if weight_in_f32 { round(g * (v * inv)) } else { round(g * round(v * inv)) };
        }
    }
}

/// RoPE in bf16: cos and sin already rounded to bf16 (transformers casts them to the
/// activations' dtype; `round_all` on the step's tables), each product and the sum rounded:
/// x*cos + rotate_half(x)*sin, element by element.
pub fn rope_inplace(x: &mut [f32], n_heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    if half == 0 || cos.len() < head_dim || sin.len() < head_dim {
        return;
    }
    for h in x.chunks_exact_mut(head_dim).take(n_heads) {
        let (a, b) = h.split_at_mut(half);
        for i in 0..half {
            let (x1, x2) = (a[i], b[i]);
            let (c1, c2, s1, s2) = (cos[i], cos[half + i], sin[i], sin[half + i]);
            a[i] = round(round(x1 * c1) + round(-x2 * s1));
            b[i] = round(round(x2 * c2) + round(x1 * s2));
        }
    }
}

/// gate = round(round(act(gate)) * up) for bf16 gate and up rows (torch rounds the activation's
/// output, then the product). SIMD lanes and the scalar tail compute the same operations.
pub(super) fn gate_row(act: super::Gate, gate: &mut [f32], up: &[f32]) {
    let len = gate.len().min(up.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if super::use_avx2() {
        // SAFETY: AVX2+FMA present; the kernel stays within `len`.
        i = unsafe { avx2::gate_rows(act, &mut gate[..len], &up[..len]) };
    }
    for (g, &u) in gate[i..len].iter_mut().zip(&up[i..len]) {
        *g = round(round(super::activation::act_one(act, *g)) * u);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::activation::{GELU_CUBIC, SQRT_2_OVER_PI};
    use super::super::exp::exp8;
    use super::super::Gate;

    /// `super::round` on 8 lanes.
    #[inline(always)]
    unsafe fn round8(v: __m256) -> __m256 {
        let b = _mm256_castps_si256(v);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let hi = _mm256_set1_epi32(0xffff0000u32 as i32);
        let rounded = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), hi);
        let quiet = _mm256_or_si256(_mm256_and_si256(b, hi), _mm256_set1_epi32(0x0040_0000));
        let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan))
    }

    /// Whole groups of 8 of `super::round_all`; returns how many elements it did.
    ///
    /// SAFETY: the CPU must support avx2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn round_rows(xs: &mut [f32]) -> usize {
        let len = xs.len() / 8 * 8;
        let p = xs.as_mut_ptr();
        let mut i = 0;
        while i < len {
            _mm256_storeu_ps(p.add(i), round8(_mm256_loadu_ps(p.add(i))));
            i += 8;
        }
        len
    }

    /// Whole groups of 8 of `super::gate_row`; returns how many elements it did.
    ///
    /// SAFETY: the CPU must support avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gate_rows(act: Gate, gate: &mut [f32], up: &[f32]) -> usize {
        let len = gate.len().min(up.len()) / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i < len {
            let x = _mm256_loadu_ps(g.add(i));
            let a = match act {
                Gate::Silu => _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)))),
                Gate::GeluTanh => {
                    let cubic = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_CUBIC), x), x), x);
                    let z = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), _mm256_add_ps(x, cubic));
                    let y = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0), z))));
                    // The scalar twin multiplies by u = 1.0 here (exact).
                    _mm256_mul_ps(y, one)
                }
            };
            _mm256_storeu_ps(g.add(i), round8(_mm256_mul_ps(round8(a), _mm256_loadu_ps(u.add(i)))));
            i += 8;
        }
        len
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Bytes of x rows kept hot (L2) per tile, and of weight rows per block (L1): each 4-row x
    /// group is loaded once per block, not once per 4 weight rows.
    const X_TILE_BYTES: usize = 256 * 1024;
    const W_BLOCK_BYTES: usize = 24 * 1024;
    /// The first x-row pass prefetches the weight-row group after next (the hardware prefetcher
    /// misses W short interleaved rows), or only the next one where groups are large (the
    /// prefetched bytes must stay in L1 beside the x tile). Measured on Zen 5 with `bf16_bench`.
    const PF_LARGE_GROUP_BYTES: usize = 8192;

    /// SAFETY: as `super::chunk`; the CPU must have AVX512 F/BW/BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk(
        x: &[u16],
        n: usize,
        w: &[u16],
        rows: usize,
        cols: usize,
        o0: usize,
        o1: usize,
        bias: Option<&[f32]>,
        out: *mut f32,
    ) {
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let tile = (X_TILE_BYTES / (cols * 2).max(1)).max(4) / 4 * 4;
        let block = (W_BLOCK_BYTES / (cols * 2).max(1)).clamp(4, 64) / 4 * 4;
        let mut r0 = 0;
        while r0 < n {
            let r1 = n.min(r0 + tile);
            let mut b0 = o0;
            while b0 < o1 {
                let b1 = o1.min(b0 + block);
                let mut r = r0;
                while r + 4 <= r1 {
                    rows_of::<4, 4>(xp, wp, cols, rows, r, b0, b1, r == r0, bias, out);
                    r += 4;
                }
                while r < r1 {
                    rows_of::<1, 4>(xp, wp, cols, rows, r, b0, b1, r == r0, bias, out);
                    r += 1;
                }
                b0 = b1;
            }
            r0 = r1;
        }
    }

    /// R x rows from row r against weight rows [b0, b1), 4 at a time, then one by one; the first
    /// x-row pass over a block prefetches (a model's weights come from DRAM; prefetching cached
    /// ones costs little).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_of<const R: usize, const W: usize>(
        x: *const u16,
        w: *const u16,
        cols: usize,
        rows: usize,
        r: usize,
        b0: usize,
        b1: usize,
        prefetch: bool,
        bias: Option<&[f32]>,
        out: *mut f32,
    ) {
        let xr = x.add(r * cols);
        let mut o = b0;
        while o + W <= b1 {
            let v = tile::<R, W>(xr, w.add(o * cols), cols, prefetch);
            store(&v, rows, r, o, bias, out);
            o += W;
        }
        while o < b1 {
            let v = tile::<R, 1>(xr, w.add(o * cols), cols, prefetch);
            store(&v, rows, r, o, bias, out);
            o += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn store<const R: usize, const W: usize>(v: &[[f32; W]; R], rows: usize, r: usize, o: usize, bias: Option<&[f32]>, out: *mut f32) {
        for (i, vr) in v.iter().enumerate() {
            for (k, &s) in vr.iter().enumerate() {
                *out.add((r + i) * rows + o + k) = match bias {
                    Some(b) => s + *b.get_unchecked(o + k),
                    None => s,
                };
            }
        }
    }

    // Helpers carry the kernel's target features so that they inline into it (closures and
    // plain functions do not inherit them, and the intrinsics would become calls).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn load(p: *const u16, mask: Option<__mmask32>) -> __m512bh {
        let v = match mask {
            None => _mm512_loadu_si512(p as *const _),
            Some(m) => _mm512_maskz_loadu_epi16(m, p as *const i16),
        };
        std::mem::transmute::<__m512i, __m512bh>(v)
    }

    /// R x rows (rows `cols` apart from x) by W weight rows (from w): the R*W dots.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn tile<const R: usize, const W: usize>(x: *const u16, w: *const u16, cols: usize, prefetch: bool) -> [[f32; W]; R] {
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        let mut xs = [std::mem::transmute::<__m512i, __m512bh>(_mm512_setzero_si512()); R];
        let full = cols / 32 * 32;
        let mut i = 0;
        // W lines per step: by the group's last step that whole group is on its way.
        let group = W * cols;
        let next = w.wrapping_add(if group * 2 >= PF_LARGE_GROUP_BYTES { group } else { 2 * group });
        while i < full {
            if prefetch {
                for k in 0..W {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(i * W + k * 32) as *const i8);
                }
            }
            for (r, v) in xs.iter_mut().enumerate() {
                *v = load(x.add(r * cols + i), None);
            }
            for k in 0..W {
                let wv = load(w.add(k * cols + i), None);
                for r in 0..R {
                    acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xs[r], wv);
                }
            }
            i += 32;
        }
        if i < cols {
            let m: __mmask32 = (1u32 << (cols - i)) - 1;
            for (r, v) in xs.iter_mut().enumerate() {
                *v = load(x.add(r * cols + i), Some(m));
            }
            for k in 0..W {
                let wv = load(w.add(k * cols + i), Some(m));
                for r in 0..R {
                    acc[r][k] = _mm512_dpbf16_ps(acc[r][k], xs[r], wv);
                }
            }
        }
        let mut flat = [_mm512_setzero_ps(); 16];
        let mut sums = [[0f32; W]; R];
        if R * W == 16 || R * W == 4 {
            for r in 0..R {
                for k in 0..W {
                    flat[r * W + k] = acc[r][k];
                }
            }
            let done = if R * W == 16 { hsum16x16(&flat) } else { hsum16x4(&flat) };
            for r in 0..R {
                for k in 0..W {
                    sums[r][k] = done[r * W + k];
                }
            }
            return sums;
        }
        for r in 0..R {
            for k in 0..W {
                sums[r][k] = hsum16(acc[r][k]);
            }
        }
        sums
    }

    // The lane sums of several dots at once, in `super::hsum16`'s tree (same pairs, same order of
    // levels, so the same bits): 128-bit blocks and lanes are regrouped so that each add serves
    // up to four dots.

    /// Level 1 of two dots: [a's l + l+8 (8 lanes) | b's].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn level8(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
    }

    /// Level 2 of two level-1 pairs: 128-bit block j = dot j's 4 lanes l + l+4.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn level4(c: __m512, d: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c, d), _mm512_shuffle_f32x4::<0xDD>(c, d))
    }

    /// Level 3 within each block: [g's l0+l2, l1+l3, h's l0+l2, l1+l3].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn level2(g: __m512, h: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_ps::<0x44>(g, h), _mm512_shuffle_ps::<0xEE>(g, h))
    }

    /// Level 4 within each block: [m's pair sum, m's second, n's, n's second].
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn level1(m: __m512, n: __m512) -> __m512 {
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(m, n), _mm512_shuffle_ps::<0xDD>(m, n))
    }

    /// 16 dots: lane 4j + t of the last level holds dot j + 4t.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn hsum16x16(a: &[__m512; 16]) -> [f32; 16] {
        let l8: [__m512; 8] = [
            level8(a[0], a[1]),
            level8(a[2], a[3]),
            level8(a[4], a[5]),
            level8(a[6], a[7]),
            level8(a[8], a[9]),
            level8(a[10], a[11]),
            level8(a[12], a[13]),
            level8(a[14], a[15]),
        ];
        let l4 = [level4(l8[0], l8[1]), level4(l8[2], l8[3]), level4(l8[4], l8[5]), level4(l8[6], l8[7])];
        let l2 = [level2(l4[0], l4[1]), level2(l4[2], l4[3])];
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), level1(l2[0], l2[1]));
        let mut out = [0f32; 16];
        for (d, o) in out.iter_mut().enumerate() {
            *o = lanes[4 * (d % 4) + d / 4];
        }
        out
    }

    /// The first 4 of `a`: the same levels with each dot's block paired with itself; lane 4j
    /// holds dot j.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn hsum16x4(a: &[__m512; 16]) -> [f32; 16] {
        let l4 = level4(level8(a[0], a[1]), level8(a[2], a[3]));
        let l2 = level2(l4, l4);
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), level1(l2, l2));
        let mut out = [0f32; 16];
        for (d, o) in out.iter_mut().take(4).enumerate() {
            *o = lanes[4 * d];
        }
        out
    }

    /// `super::hsum16`'s tree with shuffles.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn hsum16(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let s8 = _mm256_add_ps(lo, hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                round(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect()
    }

    #[test]
    fn round_is_ties_to_even_and_keeps_nan() {
        assert_eq!(round(1.0), 1.0);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert!(round(f32::NAN).is_nan());
        let mut xs: Vec<f32> = vals(1000, 3).iter().map(|v| v * 1.37).chain([f32::NAN, -f32::NAN, 1.0 + 1.0 / 256.0, -0.0]).collect();
        let want: Vec<u32> = xs.iter().map(|&v| round(v).to_bits()).collect();
        round_all(&mut xs);
        assert_eq!(xs.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "SIMD lanes = scalar");
        for v in vals(1000, 3) {
            assert_eq!(round(v), half::bf16::from_f32(v).to_f32());
            let u = v * 1.37;
            assert_eq!(round(u), half::bf16::from_f32(u).to_f32());
        }
    }

    /// The scalar order is the instruction's: the same bits for every dot (normal-range values).
    #[test]
    fn reference_matches_the_instruction() {
        let (n, rows) = (9usize, 13usize);
        for &cols in &[1usize, 31, 32, 33, 64, 100, 576] {
            let x = pack(&vals(n * cols, cols as u64));
            let w = pack(&vals(rows * cols, 7 + cols as u64));
            let bias = vals(rows, 5);
            let mut out = vec![f32::NAN; n * rows];
            // SAFETY: sizes as the kernel needs.
            unsafe { chunk(&x, n, &w, rows, cols, 0, rows, Some(&bias), out.as_mut_ptr()) };
            for r in 0..n {
                for o in 0..rows {
                    let want = dot_reference(&x[r * cols..(r + 1) * cols], &w[o * cols..(o + 1) * cols]) + bias[o];
                    assert_eq!(out[r * rows + o].to_bits(), want.to_bits(), "cols={cols} r={r} o={o} avx512bf16={}", use_avx512bf16());
                }
            }
        }
    }

    #[test]
    fn dot_is_close_to_f64() {
        let cols = 1000;
        let (x, w) = (vals(cols, 1), vals(cols, 2));
        let want: f64 = x.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        let mag: f64 = x.iter().zip(&w).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        let got = dot_reference(&pack(&x), &pack(&w)) as f64;
        assert!((got - want).abs() <= 1e-5 * mag, "{got} vs {want}");
    }

    #[test]
    fn chunks_and_batches_do_not_change_bits() {
        let (rows, cols) = (37usize, 96usize);
        let w = pack(&vals(rows * cols, 4));
        for &n in &[1usize, 3, 4, 5, 8, 13] {
            let x = pack(&vals(n * cols, 9));
            let mut all = vec![0f32; n * rows];
            // Two column chunks, as two threads would cut them.
            unsafe {
                chunk(&x, n, &w, rows, cols, 0, 18, None, all.as_mut_ptr());
                chunk(&x, n, &w, rows, cols, 18, rows, None, all.as_mut_ptr());
            }
            for r in 0..n {
                let mut one = vec![0f32; rows];
                unsafe { chunk(&x[r * cols..(r + 1) * cols], 1, &w, rows, cols, 0, rows, None, one.as_mut_ptr()) };
                assert!(one.iter().zip(&all[r * rows..(r + 1) * rows]).all(|(a, b)| a.to_bits() == b.to_bits()), "n={n} r={r}");
            }
        }
    }

    #[test]
    fn gate_lanes_equal_the_scalar_form() {
        let n = 1003;
        let g: Vec<f32> = (0..n).map(|i| round((i as f32 - 500.0) * 0.031)).chain([f32::NAN, 90.0, -90.0, -0.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| round(((i % 11) as f32 - 5.0) * 0.37)).collect();
        for act in [super::super::Gate::Silu, super::super::Gate::GeluTanh] {
            let mut all = g.clone();
            gate_row(act, &mut all, &u);
            for i in 0..g.len() {
                let mut one = [g[i]];
                gate_row(act, &mut one, &u[i..i + 1]);
                assert_eq!(all[i].to_bits(), one[0].to_bits(), "{act:?} x={}", g[i]);
                if !g[i].is_nan() {
                    assert_eq!(all[i], round(all[i]));
                }
            }
        }
    }

    #[test]
    fn llama_norm_rounds_before_the_weight_and_gemma_after() {
        let x = vals(64, 1);
        let w = vals(64, 2);
        let mut plain = vec![0f32; 64];
        super::super::rms_norm(&x, &vec![1.0; 64], 1e-6, &mut plain);
        let mut llama = vec![0f32; 64];
        rms_norm(&x, &w, 1e-6, false, &mut llama);
        let mut gemma = vec![0f32; 64];
        rms_norm(&x, &w, 1e-6, true, &mut gemma);
        for i in 0..64 {
            assert_eq!(llama[i], round(w[i] * round(plain[i])));
            assert_eq!(gemma[i], round(w[i] * plain[i]));
        }
    }

    /// Kernel timing, not a check: `cargo test --profile fast --lib bf16_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bf16_bench() {
        use super::super::thread_cpu_seconds as cpu_now;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            for &n in &[1usize, 8, 64] {
                for &(rows, cols) in &[(1536usize, 576usize), (576, 1536)] {
                    let copies = (64usize << 20) / (rows * cols * 2) + 1;
                    let ws: Vec<Vec<u16>> = (0..copies).map(|c| pack(&vals(rows * cols, c as u64))).collect();
                    let x = pack(&vals(n * cols, 1));
                    let mut out = vec![0f32; n * rows];
                    let mut times = Vec::new();
                    for it in 0..(copies * 4).max(30) {
                        let t = cpu_now();
                        unsafe { chunk(&x, n, &ws[it % copies], rows, cols, 0, rows, None, out.as_mut_ptr()) };
                        times.push(cpu_now() - t);
                    }
                    times.sort_by(|a, b| a.total_cmp(b));
                    let med = times[times.len() / 2];
                    println!(
                        "bf16 x bf16 n={n:3} {rows:5}x{cols:4}: med {:8.1} us  {:5.1} GB/s  {:6.1} GFLOP/s",
                        med * 1e6,
                        (rows * cols * 2) as f64 / med / 1e9,
                        2.0 * (n * rows * cols) as f64 / med / 1e9
                    );
                }
            }
        });
    }
}
