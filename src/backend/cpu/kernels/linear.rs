//! `linear`: out = x * w^T (+ bias), the matrix-vector / matrix-matrix product of every projection.
//!
//! Work split: output features (w rows) are cut into one contiguous chunk per rayon thread, with a
//! single parallel fork per call. Inside a chunk, x rows are taken in tiles that fit in L2 and
//! weight rows in groups of W, each group applied to R x rows at a time, so for decode (small n)
//! every weight row is streamed from memory once per call. The tiling only decides which dots run
//! together; each output element is always the same `dot::block` arithmetic (batch invariant).

use rayon::prelude::*;

use super::dot::dot_scalar;
use super::{use_avx2, SendPtr};
use crate::tensor::{Data, Matrix};

/// Below this many multiply-adds the call runs on the calling thread (fork cost dominates).
const PAR_MIN_MACS: usize = 1 << 15;
/// Bytes of x rows kept hot per tile (about half of a 1 MiB L2).
const X_TILE_BYTES: usize = 256 * 1024;
/// Weights up to this size are assumed to stay in cache between calls.
const CACHED_BYTES: usize = 4 << 20;
/// Software prefetch distances (bytes ahead in the weight stream): for n = 1 about one weight-row
/// group, within bounds; for n > 1 (slower consumption per byte, prefetch in the first pass only)
/// a fixed 8 KiB, well inside L1.
const PF_MIN_BYTES: usize = 2048;
const PF_DECODE_MAX_BYTES: usize = 4096;
const PF_BATCH_BYTES: usize = 8192;

/// out[r*w.rows + o] = dot(x[r*w.cols..], w row o) (+ bias[o]); x is n x w.cols, out is n x w.rows.
pub fn linear(x: &[f32], n: usize, w: &Matrix, bias: Option<&[f32]>, out: &mut [f32]) {
    linear_with(use_avx2(), x, n, w, bias, out)
}

pub(super) fn linear_with(
    avx: bool,
    x: &[f32],
    n: usize,
    w: &Matrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    match &w.data {
        Data::F32(b) => linear_t(avx, x, n, &b[..], w.rows, w.cols, bias, out),
        Data::BF16(b) => linear_t(avx, x, n, &b[..], w.rows, w.cols, bias, out),
        Data::F16(b) => linear_t(avx, x, n, &b[..], w.rows, w.cols, bias, out),
    }
}

#[cfg(target_arch = "x86_64")]
use super::dot::Lanes as Weight;
#[cfg(not(target_arch = "x86_64"))]
use crate::tensor::Element as Weight;

#[allow(clippy::too_many_arguments)]
fn linear_t<T: Weight>(
    avx: bool,
    x: &[f32],
    n: usize,
    w: &[T],
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    debug_assert!(x.len() >= n * cols);
    debug_assert!(w.len() >= rows * cols);
    debug_assert!(out.len() >= n * rows);
    debug_assert!(bias.map_or(true, |b| b.len() >= rows));
    if n == 0 || rows == 0 {
        return;
    }
    // Guard the unsafe kernels against short buffers even in release builds.
    if x.len() < n * cols
        || w.len() < rows * cols
        || out.len() < n * rows
        || bias.is_some_and(|b| b.len() < rows)
    {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let chunks = if n * rows * cols < PAR_MIN_MACS {
        1
    } else {
        threads.min(rows.div_ceil(4))
    };
    // Chunk sizes are multiples of 4 so weight-row groups stay whole (speed only, not results).
    let per = rows.div_ceil(chunks).div_ceil(4) * 4;
    // The AVX2 bf16 kernel pairs even/odd weight elements with a permuted copy of x.
    #[cfg(target_arch = "x86_64")]
    let mut xperm = Vec::new();
    #[cfg(target_arch = "x86_64")]
    let x = if avx && T::PERMUTED {
        super::dot::permute_x_bf16(&x[..n * cols], cols, &mut xperm);
        &xperm[..]
    } else {
        x
    };
    let outp = SendPtr::new(out);
    let run = |c: usize| {
        let o0 = c * per;
        let o1 = rows.min(o0 + per);
        if o0 < o1 {
            // SAFETY: lengths checked above; chunks cover disjoint output columns [o0, o1).
            unsafe { chunk(avx, x, n, w, rows, cols, o0, o1, bias, outp.get()) }
        }
    };
    if chunks == 1 {
        run(0)
    } else {
        (0..chunks).into_par_iter().with_max_len(1).for_each(run);
    }
}

/// Computes output columns [o0, o1) for all n rows.
///
/// SAFETY: x has n*cols, w rows*cols, out n*rows elements; no one else writes columns [o0, o1).
#[allow(clippy::too_many_arguments)]
unsafe fn chunk<T: Weight>(
    avx: bool,
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
    #[cfg(target_arch = "x86_64")]
    if avx {
        if n > 1 {
            // 4 x rows by 2 weight rows: 8 accumulators, 6 loads per 8 FMAs.
            return avx2::chunk::<T, 4, 2, true>(x, n, w, rows, cols, o0, o1, bias, out);
        }
        // Decode: 2 weight rows at a time streams best from DRAM; 4 is faster from cache.
        if rows * cols * std::mem::size_of::<T>() > CACHED_BYTES {
            return avx2::chunk::<T, 1, 2, true>(x, n, w, rows, cols, o0, o1, bias, out);
        }
        return avx2::chunk::<T, 1, 4, true>(x, n, w, rows, cols, o0, o1, bias, out);
    }
    let _ = avx;
    for o in o0..o1 {
        let wr = &w[o * cols..(o + 1) * cols];
        let b = bias.map_or(0.0, |b| b[o]);
        for r in 0..n {
            let s = dot_scalar(&x[r * cols..(r + 1) * cols], wr);
            *out.add(r * rows + o) = if bias.is_some() { s + b } else { s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::dot::{block, Lanes};
    use super::{PF_BATCH_BYTES, PF_DECODE_MAX_BYTES, PF_MIN_BYTES, X_TILE_BYTES};

    /// Tiled loop over x-row tiles, W-row weight groups and R-row x groups (see module docs).
    ///
    /// SAFETY: as for `super::chunk`; the CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn chunk<T: Lanes, const R: usize, const W: usize, const PF: bool>(
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
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut r0 = 0;
        while r0 < n {
            let r1 = n.min(r0 + tile);
            let mut o = o0;
            while o + W <= o1 {
                group::<T, R, W, PF>(xp, wp, rows, cols, r0, r1, o, bias, out);
                o += W;
            }
            while o < o1 {
                group::<T, R, 1, PF>(xp, wp, rows, cols, r0, r1, o, bias, out);
                o += 1;
            }
            r0 = r1;
        }
    }

    /// Weight rows [o, o+W) against x rows [r0, r1), R x rows at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group<T: Lanes, const R: usize, const W: usize, const PF: bool>(
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
        // During the first x-row pass, prefetch ahead of use: the hardware prefetcher misses these
        // short interleaved row streams. Distances measured best on a 2-core EPYC VM.
        let esz = std::mem::size_of::<T>();
        let d = if R == 1 {
            (W * cols * esz).clamp(PF_MIN_BYTES, PF_DECODE_MAX_BYTES)
        } else {
            PF_BATCH_BYTES
        } / esz;
        let pf = wo.wrapping_add(d);
        let mut r = r0;
        while r + R <= r1 {
            let v = if r == r0 {
                block::<T, R, W, PF>(x.add(r * cols), cols, wo, cols, cols, pf)
            } else {
                block::<T, R, W, false>(x.add(r * cols), cols, wo, cols, cols, std::ptr::null())
            };
            store::<R, W>(&v, rows, r, o, bias, out);
            r += R;
        }
        // Leftover x rows (prefetching again is harmless when an earlier pass already did).
        while r + 2 <= r1 {
            let v = block::<T, 2, W, PF>(x.add(r * cols), cols, wo, cols, cols, pf);
            store::<2, W>(&v, rows, r, o, bias, out);
            r += 2;
        }
        if r < r1 {
            let v = block::<T, 1, W, PF>(x.add(r * cols), cols, wo, cols, cols, pf);
            store::<1, W>(&v, rows, r, o, bias, out);
        }
    }

    #[inline(always)]
    unsafe fn store<const R: usize, const W: usize>(
        v: &[[f32; W]; R],
        rows: usize,
        r: usize,
        o: usize,
        bias: Option<&[f32]>,
        out: *mut f32,
    ) {
        for (i, vr) in v.iter().enumerate() {
            for (k, &s) in vr.iter().enumerate() {
                let s = match bias {
                    Some(b) => s + *b.get_unchecked(o + k),
                    None => s,
                };
                *out.add((r + i) * rows + o + k) = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Buf;
    use half::{bf16, f16};

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn matrix(rows: usize, cols: usize, dt: usize, seed: u64) -> Matrix {
        let v = vals(rows * cols, seed);
        let data = match dt {
            0 => Data::F32(Buf::Owned(v)),
            1 => Data::BF16(Buf::Owned(v.into_iter().map(bf16::from_f32).collect())),
            _ => Data::F16(Buf::Owned(v.into_iter().map(f16::from_f32).collect())),
        };
        Matrix { rows, cols, data }
    }

    fn paths() -> Vec<bool> {
        if use_avx2() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn linear_matches_f64_reference() {
        for &avx in &paths() {
            for dt in 0..3 {
                for &cols in &[1usize, 7, 33, 64, 576] {
                    for &rows in &[1usize, 5, 13, 64] {
                        let w = matrix(rows, cols, dt, (rows * 1000 + cols) as u64);
                        let wf = w.data.to_f32_vec();
                        let bias = vals(rows, 7);
                        for &n in &[1usize, 3, 8, 37] {
                            let x = vals(n * cols, (n + cols) as u64);
                            for b in [None, Some(&bias[..])] {
                                let mut out = vec![f32::NAN; n * rows];
                                linear_with(avx, &x, n, &w, b, &mut out);
                                for r in 0..n {
                                    for o in 0..rows {
                                        let mut s = 0f64;
                                        let mut mag = 0f64;
                                        for i in 0..cols {
                                            let p =
                                                x[r * cols + i] as f64 * wf[o * cols + i] as f64;
                                            s += p;
                                            mag += p.abs();
                                        }
                                        if let Some(b) = b {
                                            s += b[o] as f64;
                                            mag += (b[o] as f64).abs();
                                        }
                                        let got = out[r * rows + o] as f64;
                                        // Relative to the sum of magnitudes: cancellation makes |s| meaningless.
                                        assert!(
                                            (got - s).abs() <= 1e-5 * mag.max(1e-30),
                                            "avx={avx} dt={dt} rows={rows} cols={cols} n={n} r={r} o={o}: {got} vs {s}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_is_batch_invariant() {
        for &avx in &paths() {
            for dt in 0..3 {
                for &(rows, cols) in &[(67usize, 576usize), (300, 33), (9, 7), (1536, 64)] {
                    let w = matrix(rows, cols, dt, 3);
                    let bias = vals(rows, 11);
                    for &n in &[2usize, 3, 8, 16, 37, 300] {
                        let x = vals(n * cols, 5);
                        let mut all = vec![0f32; n * rows];
                        linear_with(avx, &x, n, &w, Some(&bias), &mut all);
                        for r in 0..n {
                            let mut one = vec![0f32; rows];
                            linear_with(
                                avx,
                                &x[r * cols..(r + 1) * cols],
                                1,
                                &w,
                                Some(&bias),
                                &mut one,
                            );
                            for o in 0..rows {
                                assert_eq!(
                                    one[o].to_bits(),
                                    all[r * rows + o].to_bits(),
                                    "avx={avx} dt={dt} rows={rows} cols={cols} n={n} r={r} o={o}"
                                );
                            }
                        }
                        // Same rows in another batch composition: row r among different neighbours.
                        if n >= 3 {
                            let mut x2 = vals(n * cols, 99);
                            x2[cols..2 * cols].copy_from_slice(&x[cols..2 * cols]);
                            let mut out2 = vec![0f32; n * rows];
                            linear_with(avx, &x2, n, &w, Some(&bias), &mut out2);
                            assert_eq!(
                                out2[rows..2 * rows]
                                    .iter()
                                    .map(|v| v.to_bits())
                                    .collect::<Vec<_>>(),
                                all[rows..2 * rows]
                                    .iter()
                                    .map(|v| v.to_bits())
                                    .collect::<Vec<_>>()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn linear_thread_count_does_not_change_bits() {
        let w = matrix(1000, 576, 1, 1);
        let x = vals(5 * 576, 2);
        let mut a = vec![0f32; 5000];
        let mut b = vec![0f32; 5000];
        linear(&x, 5, &w, None, &mut a);
        rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .map(|p| p.install(|| linear(&x, 5, &w, None, &mut b)))
            .ok();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
