//! `linear`: out = x * w^T (+ bias), the matrix-vector / matrix-matrix product of every projection.
//!
//! Work split: output features (w rows) are cut into one contiguous chunk per thread, with a
//! single fork on the worker team (`team.rs`) per call. Inside a chunk, x rows are taken in tiles that fit in L2 and
//! weight rows in groups of W, each group applied to R x rows at a time, so for decode (small n)
//! every weight row is streamed from memory once per call. The tiling only decides which dots run
//! together; each output element is always the same `dot::block` arithmetic (batch invariant).

use super::dot::dot_scalar;
use super::activation::{gate_row, Gate};
use super::quant::{self, QActs};
use super::{use_avx2, use_avx512vl, SendPtr};
use crate::tensor::{quant_kernel_supports, Data, Matrix};

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
    linear_many_with(avx, x, n, &mut [Proj { w, bias, out }], None, Compute::F32)
}

/// One projection of a [`linear_many`] call: out = x * w^T (+ bias), out is n x w.rows.
pub struct Proj<'a> {
    pub w: &'a Matrix,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

/// [`linear`] for several matrices that share the input x (q/k/v, gate/up), in ONE parallel
/// region: their rows are concatenated and cut across threads, saving a fork/join per matrix.
/// Each output element is the same arithmetic as a separate [`linear`] call.
pub fn linear_many(x: &[f32], n: usize, projs: &mut [Proj]) {
    linear_many_in(Compute::F32, x, n, projs)
}

/// The arithmetic of a projection: f32 (bf16/f16 weights widened exactly, f32 activations), or
/// transformers' bfloat16 forward (bf16 activations times bf16 weights, f32 accumulation, outputs
/// rounded to bf16; `bf16.rs`). Weights that are not bf16 are computed in f32 and rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    F32,
    Bf16,
}

/// [`linear_many`] with the given arithmetic.
pub fn linear_many_in(compute: Compute, x: &[f32], n: usize, projs: &mut [Proj]) {
    linear_many_with(use_avx2(), x, n, projs, None, compute)
}

/// [`linear_gated`] with the given arithmetic (bf16: gate and up rounded, then the activation,
/// then the product).
pub fn linear_gated_in(compute: Compute, x: &[f32], n: usize, gate: Proj, up: Proj, act: Gate) {
    linear_gated_with(use_avx2(), x, n, gate, up, act, compute)
}

/// out = act(x * gate^T + gate_bias) * (x * up^T + up_bias), as [`linear`] twice and then
/// [`super::silu_mul`] / [`super::gelu_tanh_mul`], in one parallel region: each thread gates the
/// columns it computed. `up.out` (n x up.w.rows) receives the up projection as scratch. Gate and
/// up must have the same shape; otherwise, as for short buffers, nothing is written.
pub fn linear_gated(x: &[f32], n: usize, gate: Proj, up: Proj, act: Gate) {
    linear_gated_with(use_avx2(), x, n, gate, up, act, Compute::F32)
}

pub(super) fn linear_gated_with(avx: bool, x: &[f32], n: usize, gate: Proj, up: Proj, act: Gate, compute: Compute) {
    // Both halves must pair column for column, or gating cannot be done per chunk.
    if gate.w.rows != up.w.rows || gate.out.len() < n * gate.w.rows || up.out.len() < n * up.w.rows {
        return;
    }
    let inter = gate.w.rows;
    let mut projs = [gate, up];
    linear_many_with(avx, x, n, &mut projs, Some((inter, act)), compute);
}

/// Matrix-type-erased view of one projection for the chunk workers.
#[derive(Clone, Copy)]
struct Job<'a> {
    w: &'a Matrix,
    bias: Option<&'a [f32]>,
    out: SendPtr,
}

fn linear_many_with(avx: bool, x: &[f32], n: usize, projs: &mut [Proj], gated: Option<(usize, Gate)>, compute: Compute) {
    if n == 0 {
        return;
    }
    let cols = match projs.first() {
        Some(p) => p.w.cols,
        None => return,
    };
    // Guard the unsafe kernels against short buffers even in release builds: a projection whose
    // buffers do not fit is skipped (its output is left untouched).
    if x.len() < n * cols {
        return;
    }
    let mut jobs: Vec<Job> = Vec::with_capacity(projs.len());
    for p in projs.iter_mut() {
        let (rows, c) = (p.w.rows, p.w.cols);
        // Quantized rows must be whole blocks of a type the kernels know.
        let quant_ok = match &p.w.data {
            Data::Quant { kind, .. } => quant_kernel_supports(*kind) && c % kind.block_size() == 0,
            _ => true,
        };
        let ok = c == cols
            && quant_ok
            && p.w.data.len() >= rows * c
            && p.out.len() >= n * rows
            && p.bias.map_or(true, |b| b.len() >= rows);
        debug_assert!(ok, "linear: shape mismatch");
        if ok && rows > 0 {
            jobs.push(Job { w: p.w, bias: p.bias, out: SendPtr::new(p.out) });
        } else if gated.is_some() {
            return;
        }
    }
    let total: usize = jobs.iter().map(|j| j.w.rows).sum();
    if total == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Gated: chunks cut gate's columns, each chunk also does the same columns of up.
    let span = gated.map_or(total, |(inter, _)| inter);
    let chunks = if n * total * cols < PAR_MIN_MACS {
        1
    } else {
        threads.min(span.div_ceil(4))
    };
    // Chunk sizes are multiples of 4 so weight-row groups stay whole (speed only, not results).
    let per = span.div_ceil(chunks).div_ceil(4) * 4;
    // The AVX2 bf16 kernel pairs even/odd weight elements with a permuted copy of x.
    #[cfg(target_arch = "x86_64")]
    let mut xperm = Vec::new();
    #[cfg(target_arch = "x86_64")]
    let xp: &[f32] = if avx && compute == Compute::F32 && jobs.iter().any(|j| matches!(j.w.data, Data::BF16(_))) {
        super::dot::permute_x_bf16(&x[..n * cols], cols, &mut xperm);
        &xperm[..]
    } else {
        x
    };
    #[cfg(not(target_arch = "x86_64"))]
    let xp: &[f32] = x;
    // Quantized weights: x quantized once per call, shared by every chunk and projection.
    let qx = if jobs.iter().any(|j| j.w.data.is_quantized()) { Some(quant::quantize_acts(x, n, cols)) } else { None };
    let qx = qx.as_ref();
    // bf16 arithmetic: x as bf16 bits once per call.
    let xb = (compute == Compute::Bf16).then(|| super::bf16::pack(&x[..n * cols]));
    let xb = xb.as_deref();
    let jobs = &jobs[..];
    let run = |c: usize| {
        let g0 = c * per;
        let g1 = span.min(g0 + per);
        if g0 >= g1 {
            return;
        }
        if let Some((inter, act)) = gated {
            for j in jobs {
                // SAFETY: buffers checked above; chunks cover disjoint columns [g0, g1).
                unsafe { chunk_in(xb, avx, x, xp, qx, n, j, g0, g1) }
            }
            let (g, u) = (jobs[0].out.get(), jobs[1].out.get());
            for r in 0..n {
                // SAFETY: as above; row r's columns [g0, g1) lie inside both n x inter outputs and
                // belong to this chunk alone.
                let (gr, ur) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(g.add(r * inter + g0), g1 - g0),
                        std::slice::from_raw_parts(u.add(r * inter + g0), g1 - g0),
                    )
                };
                if xb.is_some() {
                    super::bf16::gate_row(act, gr, ur);
                } else {
                    gate_row(act, gr, ur);
                }
            }
            return;
        }
        // Map the global row range [g0, g1) onto each projection's own rows.
        let mut base = 0;
        for j in jobs {
            let rows = j.w.rows;
            let (o0, o1) = (g0.max(base), g1.min(base + rows));
            if o0 < o1 {
                // SAFETY: buffers checked above; chunks cover disjoint output columns.
                unsafe { chunk_in(xb, avx, x, xp, qx, n, j, o0 - base, o1 - base) }
            }
            base += rows;
        }
    };
    if chunks == 1 {
        run(0)
    } else {
        super::team::run(chunks, &run);
    }
}

/// `chunk_dyn`, or with `xb` (x as bf16 bits) the bf16 arithmetic, outputs rounded to bf16.
///
/// SAFETY: as for `chunk`.
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_in(xb: Option<&[u16]>, avx: bool, x: &[f32], xp: &[f32], qx: Option<&QActs>, n: usize, j: &Job, o0: usize, o1: usize) {
    let Some(xb) = xb else {
        return chunk_dyn(avx, x, xp, qx, n, j, o0, o1);
    };
    let (rows, cols, out) = (j.w.rows, j.w.cols, j.out.get());
    match &j.w.data {
        Data::BF16(b) => super::bf16::chunk(xb, n, super::bf16::weight_bits(b), rows, cols, o0, o1, j.bias, out),
        _ => chunk_dyn(avx, x, xp, qx, n, j, o0, o1),
    }
    for r in 0..n {
        // SAFETY: row r's columns [o0, o1) belong to this chunk.
        super::bf16::round_all(std::slice::from_raw_parts_mut(out.add(r * rows + o0), o1 - o0));
    }
}

/// Columns [o0, o1) of one projection; `xp` is x permuted for bf16 (or x itself), `qx` x
/// quantized (Some whenever a job is quantized).
///
/// SAFETY: as for `chunk`.
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_dyn(avx: bool, x: &[f32], xp: &[f32], qx: Option<&QActs>, n: usize, j: &Job, o0: usize, o1: usize) {
    let (rows, cols, out) = (j.w.rows, j.w.cols, j.out.get());
    match &j.w.data {
        Data::F32(b) => chunk_x(avx, x, xp, n, &b[..], rows, cols, o0, o1, j.bias, out),
        Data::BF16(b) => chunk_x(avx, x, xp, n, &b[..], rows, cols, o0, o1, j.bias, out),
        Data::F16(b) => chunk_x(avx, x, xp, n, &b[..], rows, cols, o0, o1, j.bias, out),
        Data::Quant { kind, bytes } => {
            if let Some(qx) = qx {
                quant::chunk(avx, *kind, bytes, qx, n, rows, cols, o0, o1, j.bias, out)
            }
        }
    }
}

/// `chunk` with the x layout its weight type needs.
///
/// SAFETY: as for `chunk`.
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_x<T: Weight>(
    avx: bool,
    x: &[f32],
    xp: &[f32],
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
    let x = if avx && T::PERMUTED { xp } else { x };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xp;
    chunk(avx, x, n, w, rows, cols, o0, o1, bias, out)
}

#[cfg(target_arch = "x86_64")]
use super::wide::Pairs as Weight;
#[cfg(not(target_arch = "x86_64"))]
use crate::tensor::Element as Weight;

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
            // With AVX-512: 8 x rows by 4 weight rows, two dots per 512-bit register (`wide.rs`),
            // each the same arithmetic as the 256-bit dot, so the same bits.
            if n >= 8 && use_avx512vl() {
                return super::wide::chunk::<T, 8, 2>(x, n, w, rows, cols, o0, o1, bias, out);
            }
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
        chunk_body::<T, R, W, PF>(x, n, w, rows, cols, o0, o1, bias, out)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunk_body<T: Lanes, const R: usize, const W: usize, const PF: bool>(
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
        if R > 4 && r + 4 <= r1 {
            let v = block::<T, 4, W, PF>(x.add(r * cols), cols, wo, cols, cols, pf);
            store::<4, W>(&v, rows, r, o, bias, out);
            r += 4;
        }
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


    #[test]
    fn linear_matches_f64_reference() {
        for &avx in &super::super::test_paths() {
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
        for &avx in &super::super::test_paths() {
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

    #[test]
    fn linear_many_and_gated_match_separate_calls() {
        for &avx in &super::super::test_paths() {
            for dt in 0..3 {
                for &n in &[1usize, 2, 5, 8, 40] {
                    let cols = 72;
                    let (q, k, v) = (matrix(96, cols, dt, 1), matrix(36, cols, dt, 2), matrix(36, cols, dt, 3));
                    let (bq, bk) = (vals(96, 4), vals(36, 5));
                    let x = vals(n * cols, 6);
                    let mut sep = [vec![0f32; n * 96], vec![0f32; n * 36], vec![0f32; n * 36]];
                    linear_with(avx, &x, n, &q, Some(&bq), &mut sep[0]);
                    linear_with(avx, &x, n, &k, Some(&bk), &mut sep[1]);
                    linear_with(avx, &x, n, &v, None, &mut sep[2]);
                    let (mut a, mut b, mut c) = (vec![0f32; n * 96], vec![0f32; n * 36], vec![0f32; n * 36]);
                    linear_many_with(
                        avx,
                        &x,
                        n,
                        &mut [
                            Proj { w: &q, bias: Some(&bq), out: &mut a },
                            Proj { w: &k, bias: Some(&bk), out: &mut b },
                            Proj { w: &v, bias: None, out: &mut c },
                        ],
                        None,
                        Compute::F32,
                    );
                    for (got, want) in [&a, &b, &c].into_iter().zip(&sep) {
                        assert!(got.iter().zip(want).all(|(p, q)| p.to_bits() == q.to_bits()), "avx={avx} dt={dt} n={n}");
                    }

                    let (g, u) = (matrix(200, cols, dt, 7), matrix(200, cols, dt, 8));
                    let bu = vals(200, 9);
                    let mut want = vec![0f32; n * 200];
                    let mut up = vec![0f32; n * 200];
                    linear_with(avx, &x, n, &g, None, &mut want);
                    linear_with(avx, &x, n, &u, Some(&bu), &mut up);
                    super::super::silu_mul(&mut want, &up);
                    let mut got = vec![0f32; n * 200];
                    let mut gelu_want = vec![0f32; n * 200];
                    linear_with(avx, &x, n, &g, None, &mut gelu_want);
                    super::super::gelu_tanh_mul(&mut gelu_want, &up);
                    let mut scratch = vec![0f32; n * 200];
                    for (act, want) in [(Gate::Silu, &want), (Gate::GeluTanh, &gelu_want)] {
                        linear_gated_with(
                            avx,
                            &x,
                            n,
                            Proj { w: &g, bias: None, out: &mut got },
                            Proj { w: &u, bias: Some(&bu), out: &mut scratch },
                            act,
                            Compute::F32,
                        );
                        assert!(got.iter().zip(want).all(|(p, q)| p.to_bits() == q.to_bits()), "gated {act:?} avx={avx} dt={dt} n={n}");
                    }
                }
            }
        }
    }

    /// Kernel timing, not a check (single thread, thread CPU time, so other load on the machine
    /// matters less): `cargo test --lib linear_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn linear_bench() {
        use super::super::thread_cpu_seconds as cpu_now;
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let shapes: &[(usize, usize)] = &[(1536, 576), (576, 1536)];
        pool.install(|| {
            for dt in [0usize, 1] {
                for &n in &[1usize, 8, 64] {
                    for &(rows, cols) in shapes {
                        let esz = if dt == 0 { 4 } else { 2 };
                        let copies = (64usize << 20) / (rows * cols * esz) + 1;
                        let ws: Vec<Matrix> = (0..copies).map(|c| matrix(rows, cols, dt, c as u64)).collect();
                        let x = vals(n * cols, 1);
                        let mut out = vec![0f32; n * rows];
                        let mut times = Vec::new();
                        for it in 0..(copies * 4).max(30) {
                            let t = cpu_now();
                            linear(&x, n, &ws[it % copies], None, &mut out);
                            times.push(cpu_now() - t);
                        }
                        times.sort_by(|a, b| a.total_cmp(b));
                        let med = times[times.len() / 2];
                        println!(
                            "dt={dt} n={n:3} {rows:5}x{cols:4}: med {:8.1} us  {:5.1} GB/s  {:5.1} GFLOP/s",
                            med * 1e6,
                            (rows * cols * esz) as f64 / med / 1e9,
                            2.0 * (n * rows * cols) as f64 / med / 1e9
                        );
                    }
                }
            }
        });
    }
}

