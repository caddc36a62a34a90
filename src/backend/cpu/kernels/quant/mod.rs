//! Linear layers on ggml-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K),
//! computed on the blocks as stored, never dequantizing a matrix.
//!
//! As llama.cpp: each activation row is quantized once per call to 8-bit blocks of 32 (`QActs`:
//! i8 values, an f32 scale, and d * sum(q) for the block minimums of
//! Q4_1/Q5_1/Q4_K/Q5_K; finer than llama.cpp's f16 scales and Q8_K's 256-blocks). Every 32-element
//! weight sub-block decodes to integers v with element = scale[i / 16] * v[i] + min (two scales only
//! for Q6_K's 16-element groups), so every type shares one dot:
//!
//! Order for dot(x row, w row), identical on the AVX2 and scalar paths (so both give the same bits):
//! 8 f32 lanes a[l]; for each 32-block b in order, lane l gets the exact integer sum of elements
//! 4l..4l+3 (what `maddubs` + `madd` produce), then a[l] = fma(isum, scale[l / 4] * xd[b], a[l]);
//! separately m = fma(min, xs[b], m) for types with minimums; the result is
//! ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)) + m. Tiles only decide which dots run together, never the
//! order inside one, so a row's bits never depend on the batch (batch invariance).

use half::f16;

use crate::tensor::GgmlType;

#[cfg(target_arch = "x86_64")]
mod gemm;

/// Activation block length.
pub(crate) const QB: usize = 32;

/// From this many activation rows on, the VNNI path decodes weight panels once for all rows
/// (`gemm.rs`) instead of once per row tile.
pub(crate) const GEMM_MIN_ROWS: usize = 4;

/// Activation rows quantized to blocks of `QB`: `nb` blocks per row, row-major. `u` holds the
/// same values offset to unsigned (q + 128) for the panel kernel, only for `GEMM_MIN_ROWS`+ rows
/// on CPUs with AVX-512 VNNI (empty otherwise).
pub(crate) struct QActs {
    pub q: Vec<i8>,
    pub u: Vec<u8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub nb: usize,
}

/// Quantizes n rows of `cols` (a multiple of `QB`) values: per block d = max|x| / 127,
/// q = round(x / d) (half away from zero, as `f32::round`), s = d * sum(q).
pub(crate) fn quantize_acts(x: &[f32], n: usize, cols: usize) -> QActs {
    let nb = cols / QB;
    let mut q = vec![0i8; n * nb * QB];
    let mut d = vec![0f32; n * nb];
    let mut s = vec![0f32; n * nb];
    let simd = super::use_avx2();
    for (bi, (xb, qb)) in x[..n * nb * QB].chunks_exact(QB).zip(q.chunks_exact_mut(QB)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let finite = xb.iter().all(|v| v.is_finite());
        let dd = amax / 127.0;
        let id = if dd > 0.0 { 1.0 / dd } else { 0.0 };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: both blocks hold QB values; the CPU has AVX2 when `simd`.
        let isum = if simd && finite { unsafe { avx2::quantize_block(xb, id, qb) } } else { quantize_block(xb, id, qb) };
        #[cfg(not(target_arch = "x86_64"))]
        let isum = {
            let _ = simd;
            quantize_block(xb, id, qb)
        };
        // A NaN/Inf input must not vanish in the integer domain: poison the block's scale.
        let dd = if finite { dd } else { f32::NAN };
        d[bi] = dd;
        // The sum of the quantized values (as llama.cpp's Q8_1): the minimum term then sees the
        // same rounded x as the rest, so the error is sum(w * dx) rather than sum((w - min) * dx).
        s[bi] = dd * isum as f32;
    }
    // Only the VNNI panel kernel reads u.
    let u = if n >= GEMM_MIN_ROWS && super::use_avx512vnni() { q.iter().map(|&v| (v as u8) ^ 0x80).collect() } else { Vec::new() };
    QActs { q, u, d, s, nb }
}

/// q = round(x * id) for one block (the reference); returns sum(q).
fn quantize_block(xb: &[f32], id: f32, qb: &mut [i8]) -> i32 {
    let mut isum = 0i32;
    for (o, v) in qb.iter_mut().zip(xb) {
        *o = (v * id).round() as i8;
        isum += *o as i32;
    }
    isum
}

/// Bytes of one `cols`-long row of `kind`.
pub(crate) fn row_bytes(kind: GgmlType, cols: usize) -> usize {
    match kind.block_size() {
        0 => 0,
        bs => cols / bs * kind.type_size(),
    }
}

fn has_min(kind: GgmlType) -> bool {
    matches!(kind, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K)
}

/// One decoded 32-element weight sub-block: element i = (lo if i < 16 else hi) * v[i] + min.
struct Sub {
    v: [i8; 32],
    lo: f32,
    hi: f32,
    min: f32,
}

#[inline(always)]
fn f16le(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4` for sub-block j of a Q4_K/Q5_K super-block.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Decodes 32-block `b` of a weight row (scalar; the reference for every type).
fn decode(kind: GgmlType, row: &[u8], b: usize) -> Sub {
    let mut v = [0i8; 32];
    let nib = |v: &mut [i8; 32], qs: &[u8], off: i8| {
        for j in 0..16 {
            v[j] = (qs[j] & 0xF) as i8 - off;
            v[j + 16] = (qs[j] >> 4) as i8 - off;
        }
    };
    let five = |v: &mut [i8; 32], qs: &[u8], qh: u32, off: i8| {
        for j in 0..16 {
            v[j] = ((qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4)) as i8 - off;
            v[j + 16] = ((qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4)) as i8 - off;
        }
    };
    let (lo, hi, min) = match kind {
        GgmlType::Q4_0 => {
            let k = &row[b * 18..b * 18 + 18];
            nib(&mut v, &k[2..], 8);
            let d = f16le(k, 0);
            (d, d, 0.0)
        }
        GgmlType::Q4_1 => {
            let k = &row[b * 20..b * 20 + 20];
            nib(&mut v, &k[4..], 0);
            let d = f16le(k, 0);
            (d, d, f16le(k, 2))
        }
        GgmlType::Q5_0 => {
            let k = &row[b * 22..b * 22 + 22];
            five(&mut v, &k[6..], u32::from_le_bytes([k[2], k[3], k[4], k[5]]), 16);
            let d = f16le(k, 0);
            (d, d, 0.0)
        }
        GgmlType::Q5_1 => {
            let k = &row[b * 24..b * 24 + 24];
            five(&mut v, &k[8..], u32::from_le_bytes([k[4], k[5], k[6], k[7]]), 0);
            let d = f16le(k, 0);
            (d, d, f16le(k, 2))
        }
        GgmlType::Q8_0 => {
            let k = &row[b * 34..b * 34 + 34];
            for (o, &q) in v.iter_mut().zip(&k[2..]) {
                *o = q as i8;
            }
            let d = f16le(k, 0);
            (d, d, 0.0)
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            let ts = kind.type_size();
            let (sb, s) = (b / 8, b % 8);
            let k = &row[sb * ts..sb * ts + ts];
            let (sc, mn) = scale_min_k4(s, &k[4..16]);
            let qs0 = if kind == GgmlType::Q4K { 16 } else { 48 };
            let qs = &k[qs0 + (s / 2) * 32..qs0 + (s / 2) * 32 + 32];
            let shift = (s % 2) * 4;
            for l in 0..32 {
                let mut q = (qs[l] >> shift) & 0xF;
                if kind == GgmlType::Q5K {
                    q |= ((k[16 + l] >> s) & 1) << 4;
                }
                v[l] = q as i8;
            }
            let d1 = f16le(k, 0) * sc as f32;
            (d1, d1, -(f16le(k, 2) * mn as f32))
        }
        GgmlType::Q6K => {
            let (sb, j) = (b / 8, b % 8);
            let k = &row[sb * 210..sb * 210 + 210];
            let (half, jj) = (j / 4, j % 4);
            for l in 0..32 {
                let lo = (k[half * 64 + (jj % 2) * 32 + l] >> (4 * (jj / 2))) & 0xF;
                let hi = (k[128 + half * 32 + l] >> (2 * jj)) & 3;
                v[l] = (lo | (hi << 4)) as i8 - 32;
            }
            let d = f16le(k, 208);
            (d * (k[192 + 2 * j] as i8) as f32, d * (k[193 + 2 * j] as i8) as f32, 0.0)
        }
        // Never reached: loaders only build `Data::Quant` for supported types.
        _ => (0.0, 0.0, 0.0),
    };
    Sub { v, lo, hi, min }
}

/// Scalar dot of one weight row with activation row `r` (order in the module docs).
fn dot_scalar(kind: GgmlType, row: &[u8], xa: &QActs, r: usize) -> f32 {
    let nb = xa.nb;
    let (mut a, mut m) = ([0f32; 8], 0f32);
    let mins = has_min(kind);
    for b in 0..nb {
        let s = decode(kind, row, b);
        let xi = (r * nb + b) * QB;
        let xq = &xa.q[xi..xi + QB];
        let xd = xa.d[r * nb + b];
        let (slo, shi) = (s.lo * xd, s.hi * xd);
        for (l, al) in a.iter_mut().enumerate() {
            let isum: i32 = (4 * l..4 * l + 4).map(|e| s.v[e] as i32 * xq[e] as i32).sum();
            *al = (isum as f32).mul_add(if l < 4 { slo } else { shi }, *al);
        }
        if mins {
            m = s.min.mul_add(xa.s[r * nb + b], m);
        }
    }
    (((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))) + m
}

/// Output columns [o0, o1) for all n activation rows; `w` holds `rows` rows of `cols` values.
///
/// SAFETY: out has n*rows elements, no one else writes columns [o0, o1); w holds rows whole rows
/// of `kind` (a supported type whose block size divides cols); xa was made from n rows of cols.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn chunk(
    avx: bool,
    kind: GgmlType,
    w: &[u8],
    xa: &QActs,
    n: usize,
    rows: usize,
    cols: usize,
    o0: usize,
    o1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
) {
    let rb = row_bytes(kind, cols);
    #[cfg(target_arch = "x86_64")]
    if avx {
        return avx2::chunk(kind, w, rb, xa, n, rows, o0, o1, bias, out, super::use_avx512vnni());
    }
    let _ = avx;
    for o in o0..o1 {
        let wr = &w[o * rb..(o + 1) * rb];
        for r in 0..n {
            let s = dot_scalar(kind, wr, xa, r);
            *out.add(r * rows + o) = match bias {
                Some(b) => s + b[o],
                None => s,
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::dot::hsum;
    use super::gemm::columns as gemm_columns;
    use super::{has_min, scale_min_k4, QActs, GEMM_MIN_ROWS, QB};
    use crate::tensor::GgmlType;

    /// A block type as the AVX2 kernel sees it: 32-block `b` of a row decoded into 32 i8 values
    /// (`SIGNED`) or u8 values, the two half scales and the minimum (module docs).
    pub(super) trait Kind {
        const SIGNED: bool;
        const MIN: bool;
        /// Two scales per 32-block (Q6_K's 16-element groups); the others have one.
        const SPLIT: bool = false;
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32);
    }

    #[inline(always)]
    pub(super) unsafe fn f16at(p: *const u8) -> f32 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// 16 bytes of nibbles -> 32 bytes: low nibbles (elements 0..15), then high (16..31).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0xF);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), m), _mm_and_si128(q, m))
    }

    pub(super) struct Q4_0;
    impl Kind for Q4_0 {
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let p = row.add(b * 18);
            let d = f16at(p);
            (_mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)), d, d, 0.0)
        }
    }

    pub(super) struct Q4_1;
    impl Kind for Q4_1 {
        const SIGNED: bool = false;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let p = row.add(b * 20);
            let d = f16at(p);
            (nibbles(p.add(4)), d, d, f16at(p.add(2)))
        }
    }

    pub(super) struct Q8_0;
    impl Kind for Q8_0 {
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let p = row.add(b * 34);
            let d = f16at(p);
            (_mm256_loadu_si256(p.add(2) as *const __m256i), d, d, 0.0)
        }
    }

    /// Bit i of `bits` as byte i of the result: 0x10 where set (the fifth bit of element i).
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        // Byte k takes byte k / 8 of `bits` (shuffle_epi8 indexes within each 128-bit lane).
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
        );
        let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    pub(super) struct Q5_0;
    impl Kind for Q5_0 {
        const SIGNED: bool = true;
        const MIN: bool = false;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let p = row.add(b * 22);
            let d = f16at(p);
            let qh = std::ptr::read_unaligned(p.add(2) as *const u32);
            let v = _mm256_or_si256(nibbles(p.add(6)), fifth_bits(u32::from_le(qh)));
            (_mm256_sub_epi8(v, _mm256_set1_epi8(16)), d, d, 0.0)
        }
    }

    pub(super) struct Q5_1;
    impl Kind for Q5_1 {
        const SIGNED: bool = false;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let p = row.add(b * 24);
            let qh = std::ptr::read_unaligned(p.add(4) as *const u32);
            let d = f16at(p);
            (_mm256_or_si256(nibbles(p.add(8)), fifth_bits(u32::from_le(qh))), d, d, f16at(p.add(2)))
        }
    }

    /// Q4_K (FIVE = false) and Q5_K: 32-block s of a 256-super-block holds the low (s even) or
    /// high nibbles of 32 bytes, Q5_K's fifth bit s of 32 more bytes, a 6-bit scale and minimum.
    pub(super) struct KQuant<const FIVE: bool>;
    impl<const FIVE: bool> Kind for KQuant<FIVE> {
        const SIGNED: bool = false;
        const MIN: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let (ts, qs0) = if FIVE { (176, 48) } else { (144, 16) };
            let (sb, s) = (b / 8, b % 8);
            let p = row.add(sb * ts);
            let (sc, mn) = scale_min_k4(s, std::slice::from_raw_parts(p.add(4), 12));
            let q = _mm256_loadu_si256(p.add(qs0 + (s / 2) * 32) as *const __m256i);
            let shift = _mm_cvtsi32_si128(((s % 2) * 4) as i32);
            let mut v = _mm256_and_si256(_mm256_srl_epi16(q, shift), _mm256_set1_epi8(0xF));
            if FIVE {
                let bit = _mm256_set1_epi8((1u8 << s) as i8);
                let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                v = _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
            }
            let d1 = f16at(p) * sc as f32;
            (v, d1, d1, -(f16at(p.add(2)) * mn as f32))
        }
    }

    /// Q6_K: 32-block j of a 256-super-block: 4 low bits from a nibble of `ql`, 2 high bits from
    /// `qh`, minus 32; one scale per 16 elements.
    pub(super) struct Q6K;
    impl Kind for Q6K {
        const SIGNED: bool = true;
        const MIN: bool = false;
        const SPLIT: bool = true;
        #[inline(always)]
        unsafe fn load(row: *const u8, b: usize) -> (__m256i, f32, f32, f32) {
            let (sb, j) = (b / 8, b % 8);
            let p = row.add(sb * 210);
            let (half, jj) = (j / 4, j % 4);
            let ql = _mm256_loadu_si256(p.add(half * 64 + (jj % 2) * 32) as *const __m256i);
            let lo = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128((4 * (jj / 2)) as i32)), _mm256_set1_epi8(0xF));
            let qh = _mm256_loadu_si256(p.add(128 + half * 32) as *const __m256i);
            let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128((2 * jj) as i32)), _mm256_set1_epi8(3));
            let v = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
            let d = f16at(p.add(208));
            let (s0, s1) = (*p.add(192 + 2 * j) as i8, *p.add(193 + 2 * j) as i8);
            (_mm256_sub_epi8(v, _mm256_set1_epi8(32)), d * s0 as f32, d * s1 as f32, 0.0)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk(
        kind: GgmlType,
        w: &[u8],
        rb: usize,
        xa: &QActs,
        n: usize,
        rows: usize,
        o0: usize,
        o1: usize,
        bias: Option<&[f32]>,
        out: *mut f32,
        vnni: bool,
    ) {
        debug_assert_eq!(has_min(kind), matches!(kind, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K));
        let a = (w.as_ptr(), rb, xa, n, rows, o0, o1, bias, out);
        macro_rules! by_kind {
            ($tiles:ident, $a:expr) => {
                match kind {
                    GgmlType::Q4_0 => $tiles::<Q4_0>($a),
                    GgmlType::Q4_1 => $tiles::<Q4_1>($a),
                    GgmlType::Q8_0 => $tiles::<Q8_0>($a),
                    GgmlType::Q5_0 => $tiles::<Q5_0>($a),
                    GgmlType::Q5_1 => $tiles::<Q5_1>($a),
                    GgmlType::Q4K => $tiles::<KQuant<false>>($a),
                    GgmlType::Q5K => $tiles::<KQuant<true>>($a),
                    GgmlType::Q6K => $tiles::<Q6K>($a),
                    _ => Default::default(),
                }
            };
        }
        if vnni {
            // Prompt-sized batches: weight rows decoded once into a panel for all x rows; the
            // columns it leaves (fewer than a panel) go through the tiles below.
            // (The panel kernel checks that xa.u holds the rows and does nothing otherwise.)
            let a = if n >= GEMM_MIN_ROWS {
                let done = by_kind!(gemm_columns, a);
                (w.as_ptr(), rb, xa, n, rows, done.max(o0), o1, bias, out)
            } else {
                a
            };
            by_kind!(tiles_vnni, a)
        } else {
            by_kind!(tiles, a)
        }
    }

    /// `super::quantize_block` for finite x: the same products, rounded half away from zero
    /// exactly (trunc, then +-1 where the exact remainder is at least one half); |q| <= 127.
    ///
    /// SAFETY: xb and qb hold QB values; the CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(xb: &[f32], id: f32, qb: &mut [i8]) -> i32 {
        let idv = _mm256_set1_ps(id);
        let half = _mm256_set1_ps(0.5);
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        let mut q32 = [_mm256_setzero_si256(); 4];
        for (j, qv) in q32.iter_mut().enumerate() {
            let p = _mm256_mul_ps(_mm256_loadu_ps(xb.as_ptr().add(8 * j)), idv);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
            let up = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), _mm256_or_ps(one, _mm256_and_ps(p, sign)));
            *qv = _mm256_cvttps_epi32(_mm256_add_ps(t, up));
        }
        // i32 -> i16 -> i8 packs work per 128-bit lane: restore element order with one permute.
        let w16a = _mm256_packs_epi32(q32[0], q32[1]);
        let w16b = _mm256_packs_epi32(q32[2], q32[3]);
        let b8 = _mm256_packs_epi16(w16a, w16b);
        let b8 = _mm256_permutevar8x32_epi32(b8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, b8);
        let sum16 = _mm256_add_epi32(_mm256_add_epi32(q32[0], q32[1]), _mm256_add_epi32(q32[2], q32[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum16), _mm256_extracti128_si256::<1>(sum16));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b1110>(s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32::<0b01>(s2));
        _mm_cvtsi128_si32(s1)
    }

    pub(super) type Args<'a> = (*const u8, usize, &'a QActs, usize, usize, usize, usize, Option<&'a [f32]>, *mut f32);

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tiles<K: Kind>(a: Args) {
        tiles_with::<K, false>(a)
    }

    /// The same tiles with AVX-512 VNNI's `vpdpbusd` for the integer sums: the same exact lane
    /// sums in one instruction instead of two, so the same bits.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    unsafe fn tiles_vnni<K: Kind>(a: Args) {
        tiles_with::<K, true>(a)
    }

    /// Weight rows in groups of W against x rows in groups of R (decode: 1 x 4; batches: 4 x 2).
    #[inline(always)]
    unsafe fn tiles_with<K: Kind, const VNNI: bool>(a: Args) {
        let (w, rb, xa, n, rows, o0, o1, bias, out) = a;
        let mut o = o0;
        if n == 1 {
            while o + 4 <= o1 {
                tile::<K, VNNI, 1, 4>(w, rb, xa, 0, o, rows, bias, out);
                o += 4;
            }
        } else {
            while o + 2 <= o1 {
                let mut r = 0;
                while r + 4 <= n {
                    tile::<K, VNNI, 4, 2>(w, rb, xa, r, o, rows, bias, out);
                    r += 4;
                }
                while r < n {
                    tile::<K, VNNI, 1, 2>(w, rb, xa, r, o, rows, bias, out);
                    r += 1;
                }
                o += 2;
            }
        }
        while o < o1 {
            for r in 0..n {
                tile::<K, VNNI, 1, 1>(w, rb, xa, r, o, rows, bias, out);
            }
            o += 1;
        }
    }

    /// Dots of x rows [r0, r0+R) with weight rows [o, o+W), written to out (+ bias).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<K: Kind, const VNNI: bool, const R: usize, const W: usize>(
        w: *const u8,
        rb: usize,
        xa: &QActs,
        r0: usize,
        o: usize,
        rows: usize,
        bias: Option<&[f32]>,
        out: *mut f32,
    ) {
        let nb = xa.nb;
        let (xq, xd, xs) = (xa.q.as_ptr(), xa.d.as_ptr(), xa.s.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); W]; R];
        let mut m = [[0f32; W]; R];
        // Rows are short (a 640-wide Q8_0 row is 680 bytes), too short for the hardware
        // prefetcher to ramp up on each: fetch the rows 4 tiles ahead while this one computes
        // (one tile ahead is less than a DRAM latency on the Zen 5 VM: SmolLM2 decode ~190 -> ~260
        // tok/s; 2 and 8 tiles measured no better).
        let ahead = rb * W * 4;
        let block_bytes = rb / nb.max(1);
        for b in 0..nb {
            let mut wv = [(_mm256_setzero_si256(), 0f32, 0f32, 0f32); W];
            for (k, v) in wv.iter_mut().enumerate() {
                let row = w.add((o + k) * rb);
                // A hint only: never faults, so past the matrix's end is harmless (wrapping: no UB).
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(ahead + b * block_bytes) as *const i8);
                *v = K::load(row, b);
            }
            for r in 0..R {
                let xi = (r0 + r) * nb + b;
                let x = _mm256_loadu_si256(xq.add(xi * QB) as *const __m256i);
                let d = *xd.add(xi);
                for k in 0..W {
                    let (q, lo, hi, min) = wv[k];
                    // Signed weights: |w| * sign-adjusted x, as maddubs/dpbusd need an unsigned side.
                    let (u, s) = if K::SIGNED { (_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)) } else { (q, x) };
                    let isum = if VNNI {
                        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
                    } else {
                        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones)
                    };
                    let p = _mm256_cvtepi32_ps(isum);
                    let sc = if K::SPLIT {
                        _mm256_set_m128(_mm_set1_ps(hi * d), _mm_set1_ps(lo * d))
                    } else {
                        _mm256_set1_ps(lo * d)
                    };
                    acc[r][k] = _mm256_fmadd_ps(p, sc, acc[r][k]);
                    if K::MIN {
                        m[r][k] = min.mul_add(*xs.add(xi), m[r][k]);
                    }
                }
            }
        }
        for r in 0..R {
            for k in 0..W {
                let mut s = hsum(acc[r][k]) + m[r][k];
                if let Some(b) = bias {
                    s += *b.get_unchecked(o + k);
                }
                *out.add((r0 + r) * rows + o + k) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::kernels::{linear, linear_gated, linear_many, use_avx2, Gate, Proj};
    use crate::tensor::{Buf, Data, Matrix};
    use crate::weights::gguf::quant::dequantize;

    const KINDS: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s >> 24
        }
    }

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n).map(|_| (r() % 20001) as f32 / 10000.0 - 1.0).collect()
    }

    /// Random valid blocks: random bytes with small finite f16 scales in the scale fields.
    fn qmatrix(kind: GgmlType, rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut r = rng(seed);
        let (bs, ts) = (kind.block_size(), kind.type_size());
        let mut bytes: Vec<u8> = (0..rows * cols / bs * ts).map(|_| r() as u8).collect();
        let h = |scale: f32, r: &mut dyn FnMut() -> u64| f16::from_f32(((r() % 1000) as f32 / 1000.0 + 0.1) * scale).to_le_bytes();
        for blk in bytes.chunks_exact_mut(ts) {
            let (a, b) = match kind {
                GgmlType::Q6K => (208, None),
                GgmlType::Q4K | GgmlType::Q5K => (0, Some(2)),
                GgmlType::Q4_1 | GgmlType::Q5_1 => (0, Some(2)),
                _ => (0, None),
            };
            let sc = if matches!(kind, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) { 0.002 } else { 0.05 };
            blk[a..a + 2].copy_from_slice(&h(sc, &mut r));
            if let Some(b) = b {
                let v = h(if kind == GgmlType::Q4K || kind == GgmlType::Q5K { 0.004 } else { -0.4 }, &mut r);
                blk[b..b + 2].copy_from_slice(&v);
            }
        }
        Matrix { rows, cols, data: Data::Quant { kind, bytes: Buf::Owned(bytes) } }
    }


    fn run(avx: bool, x: &[f32], n: usize, w: &Matrix, bias: Option<&[f32]>) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * w.rows];
        super::super::linear::linear_with(avx, x, n, w, bias, &mut out);
        out
    }

    #[test]
    fn decode_matches_dequantize() {
        for kind in KINDS {
            let cols = 512;
            let w = qmatrix(kind, 3, cols, 1);
            let Data::Quant { bytes, .. } = &w.data else { unreachable!() };
            let want = dequantize(kind, bytes, 3 * cols).unwrap_or_default();
            let rb = row_bytes(kind, cols);
            for r in 0..3 {
                for b in 0..cols / QB {
                    let s = decode(kind, &bytes[r * rb..(r + 1) * rb], b);
                    for i in 0..QB {
                        let sc = if i < 16 { s.lo } else { s.hi };
                        let got = sc * s.v[i] as f32 + s.min;
                        let e = want[r * cols + b * QB + i];
                        assert!((got - e).abs() <= 1e-6 * (1.0 + e.abs()), "{kind:?} r={r} b={b} i={i}: {got} vs {e}");
                    }
                }
            }
        }
    }

    /// Against dequantize-then-f64 dot: the error is that of 8-bit activations, bounded per block by
    /// sum |w| * d_x / 2 (round to nearest), plus f32 rounding.
    #[test]
    fn quant_linear_matches_dequantized_reference() {
        for &avx in &super::super::test_paths() {
            for kind in KINDS {
                let (rows, cols) = (37, 512);
                let w = qmatrix(kind, rows, cols, 7);
                let wf = w.data.to_f32_vec();
                let bias = vals(rows, 3);
                for &n in &[1usize, 3, 9] {
                    let x = vals(n * cols, 11 + n as u64);
                    let got = run(avx, &x, n, &w, Some(&bias));
                    for r in 0..n {
                        for o in 0..rows {
                            let (mut s, mut bound) = (bias[o] as f64, 0f64);
                            for b in 0..cols / QB {
                                let xb = &x[r * cols + b * QB..r * cols + (b + 1) * QB];
                                let dx = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
                                let mut wabs = 0f64;
                                for i in 0..QB {
                                    let wv = wf[o * cols + b * QB + i] as f64;
                                    s += wv * xb[i] as f64;
                                    wabs += wv.abs();
                                }
                                bound += wabs * (dx * 0.5 + 1e-6) + 1e-6;
                            }
                            let g = got[r * rows + o] as f64;
                            assert!((g - s).abs() <= bound, "avx={avx} {kind:?} n={n} r={r} o={o}: {g} vs {s} (bound {bound})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn avx_and_scalar_paths_agree_bitwise() {
        if !use_avx2() {
            return;
        }
        for kind in KINDS {
            let w = qmatrix(kind, 29, 768, 5);
            let x = vals(6 * 768, 9);
            let (a, b) = (run(false, &x, 6, &w, None), run(true, &x, 6, &w, None));
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{kind:?}");
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vnni_and_avx2_tiles_agree_bitwise() {
        if !super::super::use_avx512vnni() {
            return;
        }
        // n >= GEMM_MIN_ROWS takes the panel kernel (gemm.rs) for whole panels of 8 columns and
        // the tiles for the rest; 700 rows span two x tiles.
        for kind in KINDS {
            for n in [1, 4, 5, 6, 11, if kind == GgmlType::Q4K { 700 } else { 33 }] {
                let (rows, cols) = (29, 768);
                let w = qmatrix(kind, rows, cols, 5);
                let bias = vals(rows, 4);
                let Data::Quant { bytes, .. } = &w.data else { unreachable!() };
                let xa = quantize_acts(&vals(n * cols, 9), n, cols);
                let run = |vnni: bool| {
                    let mut out = vec![f32::NAN; n * rows];
                    // SAFETY: out holds n x rows values; w is rows whole rows of `kind`.
                    unsafe { avx2::chunk(kind, bytes, row_bytes(kind, cols), &xa, n, rows, 3, rows, Some(&bias), out.as_mut_ptr(), vnni) };
                    out
                };
                let (a, b) = (run(false), run(true));
                assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "{kind:?} n={n}");
            }
        }
    }

    #[test]
    fn quant_linear_is_batch_invariant() {
        for &avx in &super::super::test_paths() {
            for kind in KINDS {
                let (rows, cols) = (67, 768);
                let w = qmatrix(kind, rows, cols, 13);
                let bias = vals(rows, 2);
                for &n in &[2usize, 5, 8, 13] {
                    let x = vals(n * cols, 21);
                    let all = run(avx, &x, n, &w, Some(&bias));
                    for r in 0..n {
                        let one = run(avx, &x[r * cols..(r + 1) * cols], 1, &w, Some(&bias));
                        for o in 0..rows {
                            assert_eq!(one[o].to_bits(), all[r * rows + o].to_bits(), "avx={avx} {kind:?} n={n} r={r} o={o}");
                        }
                    }
                }
            }
        }
        // Thread split: the same call in a 3-thread pool.
        let w = qmatrix(GgmlType::Q4_1, 1000, 576, 1);
        let x = vals(5 * 576, 2);
        let (mut a, mut b) = (vec![0f32; 5000], vec![0f32; 5000]);
        linear(&x, 5, &w, None, &mut a);
        if let Ok(p) = rayon::ThreadPoolBuilder::new().num_threads(3).build() {
            p.install(|| linear(&x, 5, &w, None, &mut b));
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        }
    }

    #[test]
    fn quant_many_and_gated_match_separate_calls() {
        let cols = 256;
        for &n in &[1usize, 4, 7] {
            let x = vals(n * cols, 3);
            let (q, k) = (qmatrix(GgmlType::Q4_1, 64, cols, 1), qmatrix(GgmlType::Q6K, 32, cols, 2));
            let vf = Matrix { rows: 32, cols, data: Data::F32(Buf::Owned(vals(32 * cols, 4))) };
            let mut sep = [vec![0f32; n * 64], vec![0f32; n * 32], vec![0f32; n * 32]];
            linear(&x, n, &q, None, &mut sep[0]);
            linear(&x, n, &k, None, &mut sep[1]);
            linear(&x, n, &vf, None, &mut sep[2]);
            let (mut a, mut b, mut c) = (vec![0f32; n * 64], vec![0f32; n * 32], vec![0f32; n * 32]);
            linear_many(
                &x,
                n,
                &mut [Proj { w: &q, bias: None, out: &mut a }, Proj { w: &k, bias: None, out: &mut b }, Proj { w: &vf, bias: None, out: &mut c }],
            );
            for (got, want) in [&a, &b, &c].into_iter().zip(&sep) {
                assert!(got.iter().zip(want).all(|(p, q)| p.to_bits() == q.to_bits()), "n={n}");
            }
            let (g, u) = (qmatrix(GgmlType::Q4_0, 96, cols, 5), qmatrix(GgmlType::Q8_0, 96, cols, 6));
            let mut want = vec![0f32; n * 96];
            let mut up = vec![0f32; n * 96];
            linear(&x, n, &g, None, &mut want);
            linear(&x, n, &u, None, &mut up);
            super::super::silu_mul(&mut want, &up);
            let (mut got, mut scratch) = (vec![0f32; n * 96], vec![0f32; n * 96]);
            linear_gated(&x, n, Proj { w: &g, bias: None, out: &mut got }, Proj { w: &u, bias: None, out: &mut scratch }, Gate::Silu);
            assert!(got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()), "gated n={n}");
        }
    }

    #[test]
    fn row_f32_dequantizes_one_row() {
        for kind in KINDS {
            let w = qmatrix(kind, 4, 256, 3);
            let all = w.data.to_f32_vec();
            let mut row = vec![0f32; 256];
            w.row_f32(2, &mut row);
            assert_eq!(row, all[512..768]);
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_quantization_matches_the_reference() {
        if !use_avx2() {
            return;
        }
        // Random blocks plus exact ties (k + 1/2 after scaling) and values just below a tie.
        let mut blocks: Vec<Vec<f32>> = (0..200).map(|i| vals(QB, i)).collect();
        blocks.push((0..QB).map(|i| if i == 0 { 127.0 } else { i as f32 - 15.5 }).collect());
        blocks.push((0..QB).map(|i| if i == 0 { -127.0 } else { f32::from_bits((i as f32 + 0.5).to_bits() - 1) }).collect());
        blocks.push(vec![0.0; QB]);
        for xb in &blocks {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let (mut a, mut b) = ([0i8; QB], [0i8; QB]);
            let sa = quantize_block(xb, id, &mut a);
            // SAFETY: QB values each; AVX2 checked above.
            let sb = unsafe { avx2::quantize_block(xb, id, &mut b) };
            assert_eq!((a, sa), (b, sb), "{xb:?}");
        }
    }

    /// Kernel timing, not a check: the panel kernel against the row tiles (single thread):
    /// `cargo test --lib quant_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn quant_bench() {
        if !super::super::use_avx512vnni() {
            return;
        }
        for kind in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
            for &(rows, cols) in &[(1536usize, 576usize), (576, 1536)] {
                let w = qmatrix(kind, rows, cols, 1);
                let Data::Quant { bytes, .. } = &w.data else { unreachable!() };
                let n = 64;
                let xa = quantize_acts(&vals(n * cols, 2), n, cols);
                let tiles_only = QActs { u: Vec::new(), ..quantize_acts(&vals(n * cols, 2), n, cols) };
                let mut out = vec![0f32; n * rows];
                for (label, xa) in [("panel", &xa), ("tiles", &tiles_only)] {
                    let mut times = Vec::new();
                    for _ in 0..15 {
                        let t = std::time::Instant::now();
                        // SAFETY: out holds n x rows; w is rows whole rows of `kind`.
                        unsafe { avx2::chunk(kind, bytes, row_bytes(kind, cols), xa, n, rows, 0, rows, None, out.as_mut_ptr(), true) };
                        times.push(t.elapsed().as_secs_f64());
                    }
                    times.sort_by(|a, b| a.total_cmp(b));
                    let med = times[times.len() / 2];
                    println!("{kind:?} n={n} {rows}x{cols} {label}: {:8.1} us  {:6.1} GMAC/s", med * 1e6, (n * rows * cols) as f64 / med / 1e9);
                }
            }
        }
    }

    #[test]
    fn nan_input_propagates() {
        let w = qmatrix(GgmlType::Q8_0, 8, 64, 1);
        let mut x = vals(64, 1);
        x[5] = f32::NAN;
        for &avx in &super::super::test_paths() {
            assert!(run(avx, &x, 1, &w, None).iter().all(|v| v.is_nan()));
        }
    }
}
