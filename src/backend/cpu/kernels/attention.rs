//! Causal grouped-query attention over a KV cache, for several sequences at once.
//!
//! Work is split over (sequence, head) pairs; each pair's computation reads only its own
//! sequence's data and uses fixed-order arithmetic, so a sequence's output does not depend on
//! which other sequences share the call (batch invariant).


use super::dot::dot_scalar;
use super::{use_avx2, SendPtr};

/// One sequence's part of an [`attention`] call.
pub struct AttnSeq<'a> {
    /// n_tok x n_heads x head_dim: the new tokens' queries, rope already applied.
    pub q: &'a [f32],
    /// Key cache: n_kv_heads x cap x head_dim, positions 0..start_pos+n_tok already written.
    pub k: &'a [f32],
    /// Value cache, same layout as `k`.
    pub v: &'a [f32],
    /// Cache capacity (positions) per kv head.
    pub cap: usize,
    /// Position of the first new token.
    pub start_pos: usize,
    pub n_tok: usize,
    /// n_tok x n_heads x head_dim.
    pub out: &'a mut [f32],
}

/// One sequence's (q, k, v, cap, start_pos, n_tok, out).
type Job<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    usize,
    usize,
    usize,
    SendPtr,
);

/// Below this many score multiply-adds the call stays on the calling thread.
const PAR_MIN_MACS: usize = 1 << 15;

/// Shared per-call shape.
#[derive(Clone, Copy)]
struct Shape {
    n_heads: usize,
    n_kv: usize,
    group: usize,
    hd: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    /// bf16 numerics: the softmax's exponential is `exp.rs`' polynomial (8 lanes at a time,
    /// ~2 ulp; the bf16 scores carry far more error); else libm's, as the f32 parity needs.
    poly_exp: bool,
}

/// Token t (position p = start_pos + t) of head h attends to positions j with j <= p and, when
/// window = Some(w), j > p - w (transformers' sliding_window mask). Query head h uses kv head
/// h / (n_heads / n_kv_heads). Scores q.k * scale, f32 softmax (max-subtracted), out = sum p_j v_j.
/// A token with no visible position (window = Some(0)) gets zeros.
pub fn attention(
    seqs: &mut [AttnSeq],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    scale: f32,
) {
    attention_with(
        use_avx2(),
        seqs,
        n_heads,
        n_kv_heads,
        head_dim,
        window,
        scale,
        None,
        false,
    )
}

/// [`attention`] with optional logit softcapping (Gemma 2): scores s = q.k * scale become
/// tanh(s / cap) * cap before the softmax. Capped calls take the scalar path (one place to cap).
#[allow(clippy::too_many_arguments)]
pub fn attention_capped(
    seqs: &mut [AttnSeq],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    compute: super::Compute,
) {
    let poly_exp = compute == super::Compute::Bf16;
    attention_with(use_avx2() && softcap.is_none(), seqs, n_heads, n_kv_heads, head_dim, window, scale, softcap, poly_exp)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_with(
    avx: bool,
    seqs: &mut [AttnSeq],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
    scale: f32,
    softcap: Option<f32>,
    poly_exp: bool,
) {
    if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 {
        return;
    }
    let sh = Shape {
        n_heads,
        n_kv: n_kv_heads,
        group: (n_heads / n_kv_heads).max(1),
        hd: head_dim,
        window,
        scale,
        softcap,
        poly_exp,
    };
    let mut macs = 0usize;
    let mut jobs: Vec<Job> = Vec::with_capacity(seqs.len());
    for s in seqs.iter_mut() {
        let q_len = s.n_tok * n_heads * head_dim;
        let kv_need = if s.n_tok == 0 {
            0
        } else {
            ((n_kv_heads - 1) * s.cap + s.start_pos + s.n_tok) * head_dim
        };
        debug_assert!(s.q.len() >= q_len && s.out.len() >= q_len);
        debug_assert!(
            s.k.len() >= kv_need && s.v.len() >= kv_need && s.start_pos + s.n_tok <= s.cap
        );
        // The per-head loop writes through a raw pointer: refuse short buffers outright.
        if s.n_tok == 0
            || s.q.len() < q_len
            || s.out.len() < q_len
            || s.k.len() < kv_need
            || s.v.len() < kv_need
        {
            continue;
        }
        macs += s.n_tok * (s.start_pos + s.n_tok) * head_dim * n_heads;
        jobs.push((
            s.q,
            s.k,
            s.v,
            s.cap,
            s.start_pos,
            s.n_tok,
            SendPtr::new(s.out),
        ));
    }
    let run = |i: usize| {
        let (q, k, v, cap, start, n_tok, out) = jobs[i / n_heads];
        let h = i % n_heads;
        // SAFETY: buffer sizes checked above; each (sequence, head) writes only its own head's slots.
        unsafe { head(avx, sh, q, k, v, cap, start, n_tok, h, out.get()) }
    };
    let n_jobs = jobs.len() * n_heads;
    if macs < PAR_MIN_MACS || rayon::current_num_threads() <= 1 {
        (0..n_jobs).for_each(run);
    } else {
        super::team::run(n_jobs, &run);
    }
}

/// All new tokens of one (sequence, head).
///
/// SAFETY: q/out hold n_tok*n_heads*hd, k/v hold the kv head's positions 0..start+n_tok.
#[allow(clippy::too_many_arguments)]
unsafe fn head(
    avx: bool,
    sh: Shape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cap: usize,
    start: usize,
    n_tok: usize,
    h: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    // The AVX2 path does not cap scores; capped calls stay scalar.
    if avx && sh.softcap.is_none() {
        // Prompts with AVX-512: queries 4 at a time (same dots, same bits), the rest one by one.
        let grouped = if n_tok >= 4 && super::use_avx512vl() { avx512::head_groups(sh, q, k, cap, start, n_tok, h, v, out) } else { 0 };
        let done = grouped * sh.n_heads * sh.hd;
        return avx2::head(sh, &q[done..], k, v, cap, start + grouped, n_tok - grouped, h, out.add(done));
    }
    let _ = avx;
    let hd = sh.hd;
    let kvh = (h / sh.group).min(sh.n_kv - 1);
    let kb = &k[kvh * cap * hd..];
    let vb = &v[kvh * cap * hd..];
    let mut p = Vec::new();
    for t in 0..n_tok {
        let (lo, hi) = span(start + t, sh.window);
        let qr = &q[(t * sh.n_heads + h) * hd..][..hd];
        let o = std::slice::from_raw_parts_mut(out.add((t * sh.n_heads + h) * hd), hd);
        p.clear();
        p.extend((lo..hi).map(|j| dot_scalar(qr, &kb[j * hd..(j + 1) * hd]) * sh.scale));
        if let Some(cap) = sh.softcap {
            p.iter_mut().for_each(|s| *s = (*s / cap).tanh() * cap);
        }
        softmax(&mut p, sh.poly_exp);
        o.fill(0.0);
        for (j, &pj) in (lo..hi).zip(&p) {
            for (oi, &vi) in o.iter_mut().zip(&vb[j * hd..(j + 1) * hd]) {
                *oi += pj * vi;
            }
        }
    }
}

/// Visible positions [lo, hi) for a query at position `p`.
#[inline]
fn span(p: usize, window: Option<usize>) -> (usize, usize) {
    let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
    (lo, p + 1)
}

/// In-place f32 softmax, max-subtracted, probabilities as e_j / sum (as torch.softmax).
/// (The vector exponential of `exp.rs` with an 8-lane sum was tried here: ~2 ulp per score moved
/// beam scores and softcapped Gemma 2 logits just past the parity tests' 1e-4; it serves the bf16
/// numerics only, `poly_exp`, with the sequential sum.)
#[inline]
fn softmax(s: &mut [f32], poly_exp: bool) {
    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    if poly_exp {
        super::exp::exp_shifted(s, m);
        s.iter().for_each(|x| sum += x);
    } else {
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
    }
    for x in s.iter_mut() {
        *x /= sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::dot::{axpy, block};
    use super::{softmax, span, Shape};

    /// AVX2 form of `super::head`: scores 4 keys at a time with the shared dot arithmetic.
    ///
    /// SAFETY: as `super::head`; the CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn head(
        sh: Shape,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        cap: usize,
        start: usize,
        n_tok: usize,
        h: usize,
        out: *mut f32,
    ) {
        let hd = sh.hd;
        let kvh = (h / sh.group).min(sh.n_kv - 1);
        let kb = k.as_ptr().add(kvh * cap * hd);
        let vb = v.as_ptr().add(kvh * cap * hd);
        let mut p: Vec<f32> = Vec::new();
        for t in 0..n_tok {
            let (lo, hi) = span(start + t, sh.window);
            let qr = q.as_ptr().add((t * sh.n_heads + h) * hd);
            let o = out.add((t * sh.n_heads + h) * hd);
            p.clear();
            p.resize(hi - lo, 0.0);
            let mut j = lo;
            while j + 4 <= hi {
                let s = block::<f32, 1, 4, false>(qr, hd, kb.add(j * hd), hd, hd, std::ptr::null());
                for (d, &sv) in p[j - lo..j - lo + 4].iter_mut().zip(&s[0]) {
                    *d = sv * sh.scale;
                }
                j += 4;
            }
            while j < hi {
                p[j - lo] =
                    block::<f32, 1, 1, false>(qr, hd, kb.add(j * hd), hd, hd, std::ptr::null())[0]
                        [0]
                        * sh.scale;
                j += 1;
            }
            softmax(&mut p, sh.poly_exp);
            std::slice::from_raw_parts_mut(o, hd).fill(0.0);
            for (j, &pj) in (lo..hi).zip(&p) {
                axpy(o, pj, vb.add(j * hd), hd);
            }
        }
    }
}

/// Prompt queries in groups of 4 with AVX-512 (`wide::tile`: two keys per register, four queries
/// per key load). Each score is the same dot as `avx2::head`'s, each row's softmax and weighted
/// sum the same sequence of operations, so a token's bits do not depend on its group.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::dot::block;
    use super::super::wide::tile;
    use super::{softmax, span, Shape};

    /// Queries per group.
    const G: usize = 4;

    /// Tokens [0, 4k) of one (sequence, head), the largest k with 4k <= n_tok; returns 4k.
    ///
    /// SAFETY: as `super::head`; the CPU must support avx2, fma, f16c, avx512f and avx512vl.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn head_groups(
        sh: Shape,
        q: &[f32],
        k: &[f32],
        cap: usize,
        start: usize,
        n_tok: usize,
        h: usize,
        v: &[f32],
        out: *mut f32,
    ) -> usize {
        let hd = sh.hd;
        let qs = sh.n_heads * hd;
        let kvh = (h / sh.group).min(sh.n_kv - 1);
        let kb = k.as_ptr().add(kvh * cap * hd);
        let vb = v.as_ptr().add(kvh * cap * hd);
        let groups = n_tok / G;
        let mut scores: Vec<f32> = Vec::new();
        for g in 0..groups {
            let t0 = g * G;
            let spans: [(usize, usize); G] = std::array::from_fn(|r| span(start + t0 + r, sh.window));
            // Positions visible to any query of the group; each query uses its own part.
            let (lo, hi) = (spans[0].0, spans[G - 1].1);
            let len = hi - lo;
            scores.clear();
            scores.resize(G * len, 0.0);
            let q0 = q.as_ptr().add((t0 * sh.n_heads + h) * hd);
            let mut j = lo;
            while j + 4 <= hi {
                let s = tile::<f32, G, 2>(q0, qs, kb.add(j * hd), hd, hd, false, std::ptr::null());
                for (r, sr) in s.iter().enumerate() {
                    for (i, &sv) in sr.iter().flatten().enumerate() {
                        scores[r * len + j - lo + i] = sv * sh.scale;
                    }
                }
                j += 4;
            }
            while j < hi {
                let s = block::<f32, G, 1, false>(q0, qs, kb.add(j * hd), hd, hd, std::ptr::null());
                for (r, sr) in s.iter().enumerate() {
                    scores[r * len + j - lo] = sr[0] * sh.scale;
                }
                j += 1;
            }
            for (r, &(a, b)) in spans.iter().enumerate() {
                softmax(&mut scores[r * len + a - lo..r * len + b - lo], sh.poly_exp);
            }
            let outs: [*mut f32; G] = std::array::from_fn(|r| out.add(((t0 + r) * sh.n_heads + h) * hd));
            weighted_sum(&scores, len, lo, hi, &spans, vb, hd, outs);
        }
        groups * G
    }

    /// out[r] = sum over row r's positions j of p[r][j] * v_j, each element a sequence of fused
    /// multiply-adds in j order from 0 (as `axpy` row by row), with the four rows' sums held in
    /// registers 16 elements at a time: each v_j is loaded once for the group, and a position
    /// outside a row's span leaves that row's register untouched (skipped, not multiplied by 0).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_sum(
        p: &[f32],
        len: usize,
        lo: usize,
        hi: usize,
        spans: &[(usize, usize); G],
        vb: *const f32,
        hd: usize,
        outs: [*mut f32; G],
    ) {
        use std::arch::x86_64::*;
        let pp = p.as_ptr();
        let mut d = 0;
        while d < hd {
            let lanes = (hd - d).min(16);
            let keep: __mmask16 = if lanes == 16 { 0xffff } else { (1u16 << lanes) - 1 };
            let mut acc = [_mm512_setzero_ps(); G];
            for j in lo..hi {
                let v = _mm512_maskz_loadu_ps(keep, vb.add(j * hd + d));
                for (r, a) in acc.iter_mut().enumerate() {
                    let (ra, rb) = spans[r];
                    if j >= ra && j < rb {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*pp.add(r * len + j - lo)), v, *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(outs[r].add(d), keep, *a);
            }
            d += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_add(12345);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        cap: usize,
        start: usize,
        n_tok: usize,
    }

    const NH: usize = 4;
    const NKV: usize = 2;

    fn case(hd: usize, cap: usize, start: usize, n_tok: usize, seed: u64) -> Case {
        Case {
            q: vals(n_tok * NH * hd, seed),
            k: vals(NKV * cap * hd, seed + 1),
            v: vals(NKV * cap * hd, seed + 2),
            cap,
            start,
            n_tok,
        }
    }

    fn naive(c: &Case, hd: usize, window: Option<usize>, scale: f64) -> Vec<f64> {
        let mut out = vec![0f64; c.n_tok * NH * hd];
        for t in 0..c.n_tok {
            let p = c.start + t;
            for h in 0..NH {
                let kvh = h / (NH / NKV);
                let q = &c.q[(t * NH + h) * hd..][..hd];
                let js: Vec<usize> = (0..=p)
                    .filter(|&j| window.map_or(true, |w| j as i64 > p as i64 - w as i64))
                    .collect();
                let sc: Vec<f64> = js
                    .iter()
                    .map(|&j| {
                        let kr = &c.k[(kvh * c.cap + j) * hd..][..hd];
                        q.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (&j, ej) in js.iter().zip(&e) {
                    let vr = &c.v[(kvh * c.cap + j) * hd..][..hd];
                    for d in 0..hd {
                        out[(t * NH + h) * hd + d] += ej / z * vr[d] as f64;
                    }
                }
            }
        }
        out
    }

    fn run(
        avx: bool,
        cases: &[&Case],
        hd: usize,
        window: Option<usize>,
        scale: f32,
        poly_exp: bool,
    ) -> Vec<Vec<f32>> {
        let mut outs: Vec<Vec<f32>> = cases
            .iter()
            .map(|c| vec![f32::NAN; c.n_tok * NH * hd])
            .collect();
        let mut seqs: Vec<AttnSeq> = cases
            .iter()
            .zip(outs.iter_mut())
            .map(|(c, o)| AttnSeq {
                q: &c.q,
                k: &c.k,
                v: &c.v,
                cap: c.cap,
                start_pos: c.start,
                n_tok: c.n_tok,
                out: o,
            })
            .collect();
        attention_with(avx, &mut seqs, NH, NKV, hd, window, scale, None, poly_exp);
        drop(seqs);
        outs
    }


    /// Every SIMD path with libm's exponential (f32 numerics) and the polynomial one (bf16).
    fn paths_and_exps() -> Vec<(bool, bool)> {
        super::super::test_paths().into_iter().flat_map(|a| [(a, false), (a, true)]).collect()
    }

    #[test]
    fn attention_matches_reference() {
        for (avx, poly) in paths_and_exps() {
            for &hd in &[8usize, 33, 64] {
                for &(start, n_tok) in &[(0usize, 1usize), (0, 7), (5, 3), (17, 1), (40, 30)] {
                    for window in [None, Some(1), Some(4), Some(16)] {
                        let c = case(hd, start + n_tok + 3, start, n_tok, (hd + start) as u64);
                        let scale = 1.0 / (hd as f32).sqrt();
                        let got = &run(avx, &[&c], hd, window, scale, poly)[0];
                        let want = naive(&c, hd, window, scale as f64);
                        for i in 0..got.len() {
                            let err = (got[i] as f64 - want[i]).abs();
                            assert!(
                                err <= 1e-5 * want[i].abs().max(1e-2),
                                "avx={avx} hd={hd} start={start} n_tok={n_tok} window={window:?} i={i}: {} vs {}",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// A prompt's tokens in one call (query groups with AVX-512) give the same bits as one call
    /// per token (decode) and as a prompt split anywhere (a prefill resumed mid-prompt).
    #[test]
    fn a_prompt_equals_its_tokens_one_by_one() {
        for (avx, poly) in paths_and_exps() {
            for &hd in &[33usize, 64, 256] {
                for window in [None, Some(5)] {
                    let c = case(hd, 40, 3, 13, hd as u64);
                    let all = &run(avx, &[&c], hd, window, 0.125, poly)[0];
                    for split in [1usize, 6] {
                        let mut pieces = Vec::new();
                        let mut t = 0;
                        while t < c.n_tok {
                            let n = if t == 0 { split } else { 1 };
                            let piece = Case {
                                q: c.q[t * NH * hd..(t + n) * NH * hd].to_vec(),
                                k: c.k.clone(),
                                v: c.v.clone(),
                                cap: c.cap,
                                start: c.start + t,
                                n_tok: n,
                            };
                            pieces.extend(run(avx, &[&piece], hd, window, 0.125, poly).remove(0));
                            t += n;
                        }
                        assert!(
                            all.iter().zip(&pieces).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "avx={avx} poly={poly} hd={hd} window={window:?} split={split}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_is_batch_invariant() {
        for (avx, poly) in paths_and_exps() {
            for window in [None, Some(5)] {
                let hd = 64;
                let a = case(hd, 200, 150, 1, 1);
                let b = case(hd, 64, 0, 40, 2);
                let c = case(hd, 300, 100, 30, 3);
                let alone = run(avx, &[&a], hd, window, 0.125, poly);
                let together = run(avx, &[&b, &a, &c], hd, window, 0.125, poly);
                assert_eq!(
                    alone[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    together[1].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
                let c_alone = run(avx, &[&c], hd, window, 0.125, poly);
                assert_eq!(
                    c_alone[0].iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    together[2].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }
}
