//! The CPU backend's implementation of the family op interface: each op runs the fused kernels
//! over all new tokens of all sequences of the step (packed row-wise); attention runs per
//! sequence against its own KV cache. Buffers of consumed activations are reused within the step.

use super::cache::KvCache;
use super::kernels::{self, bf16, AttnSeq, Compute, Proj};
use super::tp::RankLink;
use crate::backend::check_token;
use crate::error::{Error, Result};
use crate::model::host::{Host, HostLinear, HostPart, WeightBuilder};
use crate::model::ops::{Activation, AttnSpec, Ops};
use crate::model::rope::Rope;
use crate::tensor::Matrix;

/// One sequence's share of a step on one rank: its cache, its new tokens, the first one's position.
pub struct SeqBatchItem<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub start_pos: usize,
}

/// Rows of f32 activations: the first `len` values of `buf` (a reused buffer may be longer; its
/// tail is never read).
pub struct CpuAct {
    buf: Vec<f32>,
    len: usize,
    rows: usize,
}

impl CpuAct {
    fn width(&self) -> usize {
        self.len.checked_div(self.rows).unwrap_or(0)
    }

    fn s(&self) -> &[f32] {
        &self.buf[..self.len]
    }

    fn m(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }

    pub fn into_vec(mut self) -> Vec<f32> {
        self.buf.truncate(self.len);
        self.buf
    }
}

pub struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
}

/// transformers' bfloat16 forward (`compute_dtype="bfloat16"`): every op's output is rounded to
/// bf16 where torch rounds it, and projections multiply in bf16 (`kernels::bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Numerics {
    /// Gemma's RMSNorm scales by (1 + w) in f32 and rounds once; Llama's rounds, then scales.
    pub norm_weight_in_f32: bool,
}

/// One step of one rank.
pub struct CpuOps<'s, 'c> {
    seqs: &'s mut [SeqBatchItem<'c>],
    bf16: Option<Bf16Numerics>,
    /// Row offset of each sequence's first new token, and the total.
    offsets: Vec<usize>,
    all_positions: bool,
    link: Option<RankLink<'s>>,
    spare: Vec<Vec<f32>>,
}

impl<'s, 'c> CpuOps<'s, 'c> {
    /// Checks that every sequence fits its cache; `link` joins the step's other ranks.
    pub fn new(
        seqs: &'s mut [SeqBatchItem<'c>],
        all_positions: bool,
        link: Option<RankLink<'s>>,
        bf16: Option<Bf16Numerics>,
    ) -> Result<Self> {
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for s in seqs.iter() {
            if s.start_pos + s.tokens.len() > s.cache.capacity() {
                return Err(Error::Internal(format!(
                    "KV cache of capacity {} cannot hold positions up to {}",
                    s.cache.capacity(),
                    s.start_pos + s.tokens.len()
                )));
            }
            offsets.push(offsets[offsets.len() - 1] + s.tokens.len());
        }
        Ok(CpuOps { seqs, bf16, offsets, all_positions, link, spare: Vec::new() })
    }

    pub fn tokens(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// Marks the new positions as written, once the forward has run.
    pub fn finish(self) {
        for seq in self.seqs.iter_mut() {
            seq.cache.advance_to(seq.start_pos + seq.tokens.len());
        }
    }

    /// A buffer for rows x width values: the shortest spare one that is long enough, else the
    /// longest, grown. Every op writes all of its output, so a reused buffer is not cleared (no
    /// memset per op).
    fn alloc(&mut self, rows: usize, width: usize) -> CpuAct {
        let len = rows * width;
        let fits = (0..self.spare.len()).filter(|&i| self.spare[i].len() >= len).min_by_key(|&i| self.spare[i].len());
        let pick = fits.or_else(|| (0..self.spare.len()).max_by_key(|&i| self.spare[i].len()));
        let mut buf = pick.map(|i| self.spare.swap_remove(i)).unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        CpuAct { buf, len, rows }
    }

    fn free(&mut self, a: CpuAct) {
        self.spare.push(a.buf);
    }

    fn compute(&self) -> Compute {
        if self.bf16.is_some() {
            Compute::Bf16
        } else {
            Compute::F32
        }
    }

    /// Rounds an op's output to bf16 under the bf16 numerics.
    fn rounded(&self, mut x: CpuAct) -> CpuAct {
        if self.bf16.is_some() {
            bf16::round_all(x.m());
        }
        x
    }
}

impl Ops for CpuOps<'_, '_> {
    type Kinds = Host;
    type Act = CpuAct;
    type Rotary = Rotary;

    fn embed(&mut self, table: &Matrix) -> Result<CpuAct> {
        let h = table.cols;
        let mut x = self.alloc(self.tokens(), h);
        // Ids were validated by the caller, checked again here as a backstop.
        for (s, seq) in self.seqs.iter().enumerate() {
            for (t, &id) in seq.tokens.iter().enumerate() {
                let row = self.offsets[s] + t;
                check_token(id, s, seq.start_pos + t, table.rows)?;
                table.row_f32(id as usize, &mut x.m()[row * h..(row + 1) * h]);
            }
        }
        Ok(self.rounded(x))
    }

    fn rotary(&mut self, _index: usize, rope: &Rope) -> Result<Rotary> {
        // Dynamic NTK depends on the longest sequence in the call, as in transformers.
        let seq_len = self.seqs.iter().map(|s| s.start_pos + s.tokens.len()).max().unwrap_or(0);
        let positions: Vec<usize> = self.seqs.iter().flat_map(|s| s.start_pos..s.start_pos + s.tokens.len()).collect();
        let (mut cos, mut sin) = rope.tables(positions.into_iter(), seq_len);
        if self.bf16.is_some() {
            // transformers casts cos/sin to the activations' dtype before rotating.
            bf16::round_all(&mut cos);
            bf16::round_all(&mut sin);
        }
        Ok(Rotary { cos, sin, head_dim: rope.head_dim() })
    }

    fn rms_norm(&mut self, x: &CpuAct, w: &Vec<f32>, eps: f32) -> Result<CpuAct> {
        let mut out = self.alloc(x.rows, w.len());
        match self.bf16 {
            Some(b) => bf16::rms_norm(x.s(), w, eps, b.norm_weight_in_f32, out.m()),
            None => kernels::rms_norm(x.s(), w, eps, out.m()),
        }
        Ok(out)
    }

    fn head_rms_norm(&mut self, mut x: CpuAct, w: &Vec<f32>, eps: f32) -> Result<CpuAct> {
        if let Some(b) = self.bf16 {
            // Each head's head_dim values are one norm row.
            let mut out = self.alloc(x.rows, x.width());
            bf16::rms_norm(x.s(), w, eps, b.norm_weight_in_f32, out.m());
            self.free(x);
            return Ok(out);
        }
        kernels::rms_norm_inplace(x.m(), w, eps);
        Ok(x)
    }

    fn rope(&mut self, mut x: CpuAct, heads: usize, rot: &Rotary) -> Result<CpuAct> {
        let (hd, width) = (rot.head_dim, x.width());
        for t in 0..x.rows {
            let (c, s) = (&rot.cos[t * hd..(t + 1) * hd], &rot.sin[t * hd..(t + 1) * hd]);
            let row = &mut x.m()[t * width..(t + 1) * width];
            match self.bf16 {
                Some(_) => bf16::rope_inplace(row, heads, hd, c, s),
                None => kernels::rope_inplace(row, heads, hd, c, s),
            }
        }
        Ok(x)
    }

    fn project(&mut self, x: CpuAct, w: &HostLinear) -> Result<Vec<CpuAct>> {
        let mut outs: Vec<CpuAct> = w.parts.iter().map(|p| self.alloc(x.rows, p.w.rows)).collect();
        let mut projs: Vec<Proj> = w
            .parts
            .iter()
            .zip(outs.iter_mut())
            .map(|(p, o)| Proj { w: &p.w, bias: p.bias.as_deref(), out: o.m() })
            .collect();
        kernels::linear_many_in(self.compute(), x.s(), x.rows, &mut projs);
        self.free(x);
        Ok(outs)
    }

    fn gated(&mut self, x: CpuAct, w: &HostLinear, act: Activation) -> Result<CpuAct> {
        let [gate, up]: &[HostPart; 2] = w
            .parts
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal("a gated MLP needs a (gate, up) projection".into()))?;
        let mut g = self.alloc(x.rows, gate.w.rows);
        let mut u = self.alloc(x.rows, up.w.rows);
        let gate_act = match act {
            Activation::GeluTanh => kernels::Gate::GeluTanh,
            Activation::Silu => kernels::Gate::Silu,
        };
        kernels::linear_gated_in(
            self.compute(),
            x.s(),
            x.rows,
            Proj { w: &gate.w, bias: gate.bias.as_deref(), out: g.m() },
            Proj { w: &up.w, bias: up.bias.as_deref(), out: u.m() },
            gate_act,
        );
        self.free(u);
        self.free(x);
        Ok(g)
    }

    fn attend(&mut self, spec: &AttnSpec, q: CpuAct, k: CpuAct, v: CpuAct) -> Result<CpuAct> {
        let (li, hd) = (spec.layer, spec.head_dim);
        let (q_dim, kv_dim) = (spec.heads * hd, spec.kv_heads * hd);
        let offsets = &self.offsets;
        for (si, seq) in self.seqs.iter_mut().enumerate() {
            for t in 0..seq.tokens.len() {
                let row = offsets[si] + t;
                let (kr, vr) = (&k.s()[row * kv_dim..(row + 1) * kv_dim], &v.s()[row * kv_dim..(row + 1) * kv_dim]);
                seq.cache.write(li, seq.start_pos + t, kr, vr);
            }
        }
        let mut out = self.alloc(q.rows, q_dim);
        {
            let mut jobs = Vec::with_capacity(self.seqs.len());
            let mut rest: &mut [f32] = out.m();
            for (si, seq) in self.seqs.iter().enumerate() {
                let len = seq.tokens.len();
                let (o, tail) = rest.split_at_mut(len * q_dim);
                rest = tail;
                let (kc, vc) = seq.cache.layer(li);
                jobs.push(AttnSeq {
                    q: &q.s()[self.offsets[si] * q_dim..self.offsets[si + 1] * q_dim],
                    k: kc,
                    v: vc,
                    cap: seq.cache.capacity(),
                    start_pos: seq.start_pos,
                    n_tok: len,
                    out: o,
                });
            }
            let compute = self.compute();
            kernels::attention_capped(&mut jobs, spec.heads, spec.kv_heads, hd, spec.window, spec.scale_or_default(), spec.softcap, compute);
        }
        self.free(q);
        self.free(k);
        self.free(v);
        Ok(self.rounded(out))
    }

    fn all_reduce(&mut self, mut x: CpuAct) -> Result<CpuAct> {
        if let Some(link) = self.link.as_mut() {
            link.all_reduce(x.m())?;
            return Ok(self.rounded(x));
        }
        Ok(x)
    }

    fn add(&mut self, x: &mut CpuAct, y: CpuAct) -> Result<()> {
        x.m().iter_mut().zip(y.s()).for_each(|(a, b)| *a += b);
        if self.bf16.is_some() {
            bf16::round_all(x.m());
        }
        self.free(y);
        Ok(())
    }

    fn scale(&mut self, mut x: CpuAct, factor: f32) -> Result<CpuAct> {
        x.m().iter_mut().for_each(|v| *v *= factor);
        Ok(self.rounded(x))
    }

    fn softcap(&mut self, mut x: CpuAct, cap: f32) -> Result<CpuAct> {
        match self.bf16 {
            // transformers: logits / cap, tanh, * cap, each a bf16 op.
            Some(_) => x.m().iter_mut().for_each(|v| *v = bf16::round(bf16::round(bf16::round(*v / cap).tanh()) * cap)),
            None => x.m().iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap),
        }
        Ok(x)
    }

    fn output_rows(&mut self, x: CpuAct) -> Result<CpuAct> {
        if self.all_positions {
            return Ok(x);
        }
        let width = x.width();
        let mut out = self.alloc(self.seqs.len(), width);
        for (dst, end) in out.m().chunks_mut(width.max(1)).zip(&self.offsets[1..]) {
            let r = end.saturating_sub(1);
            dst.copy_from_slice(&x.s()[r * width..(r + 1) * width]);
        }
        self.free(x);
        Ok(out)
    }
}

/// The CPU computes on host weights as they are; a tied head is a window of the embedding.
pub struct CpuWeights;

impl WeightBuilder for CpuWeights {
    type Kinds = Host;

    fn linear(&mut self, _name: &str, l: HostLinear) -> Result<HostLinear> {
        Ok(l)
    }

    fn norm(&mut self, _name: &str, v: Vec<f32>) -> Result<Vec<f32>> {
        Ok(v)
    }

    fn embedding(&mut self, m: Matrix) -> Result<Matrix> {
        Ok(m.into_shared())
    }

    fn tied_head(&mut self, embed: &Matrix, rows: std::ops::Range<usize>) -> Result<HostLinear> {
        let w = embed
            .row_window(rows.clone())
            .ok_or_else(|| Error::Internal(format!("rows {rows:?} of the embedding for a tied lm_head")))?;
        Ok(HostLinear::one(w, None))
    }
}
