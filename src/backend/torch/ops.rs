//! The torch backend's implementation of the family op interface, in libtorch ops. Numerics
//! follow transformers: RMSNorm in f32 then cast, rope with cos/sin cast to the compute dtype,
//! attention (SDPA) in the compute dtype. Activations are [batch, longest new run, width] grids
//! (see `plan`); the KV caches are the device arena's bucket tensors.

use tch::{Kind, Tensor};

use super::cache::KvArena;
use super::plan::{GroupPlan, StepPlan};
use super::tch_err;
use super::weights::{matrix, vector};
use crate::error::{Error, Result};
use crate::model::host::{HostLinear, WeightBuilder};
use crate::model::ops::{Activation, AttnSpec, Ops, WeightKinds};
use crate::model::rope::Rope;
use crate::tensor::Matrix;

/// A projection's parts fused into one matrix (one matmul launch instead of three or two; each
/// output element is still the same dot product), split again after the matmul.
pub struct TorchLinear {
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub splits: Vec<i64>,
}

pub struct TorchKinds;

impl WeightKinds for TorchKinds {
    type Linear = TorchLinear;
    type Norm = Tensor;
    type Embedding = Tensor;
}

/// Uploads host weights to `device` as `kind`.
pub struct TorchUpload {
    pub kind: Kind,
    pub device: tch::Device,
}

impl WeightBuilder for TorchUpload {
    type Kinds = TorchKinds;

    fn linear(&mut self, _name: &str, l: HostLinear) -> Result<TorchLinear> {
        let splits = l.parts.iter().map(|p| p.w.rows as i64).collect();
        let mats = l.parts.iter().map(|p| matrix(&p.w, self.kind, self.device)).collect::<Result<Vec<_>>>()?;
        let w = if mats.len() == 1 { mats.into_iter().next() } else { Some(Tensor::f_cat(&mats, 0).map_err(tch_err)?) };
        let w = w.ok_or_else(|| Error::Internal("a projection without parts".into()))?;
        // The config decides biases per projection group: all parts have one or none has.
        let bias = if l.parts.iter().all(|p| p.bias.is_some()) {
            let joined: Vec<f32> = l.parts.iter().flat_map(|p| p.bias.iter().flatten().copied()).collect();
            Some(vector(&joined, self.kind, self.device)?)
        } else {
            None
        };
        Ok(TorchLinear { w, bias, splits })
    }

    fn norm(&mut self, _name: &str, v: Vec<f32>) -> Result<Tensor> {
        vector(&v, self.kind, self.device)
    }

    fn embedding(&mut self, m: Matrix) -> Result<Tensor> {
        matrix(&m, self.kind, self.device)
    }

    fn tied_head(&mut self, embed: &Tensor, rows: std::ops::Range<usize>) -> Result<TorchLinear> {
        let w = embed.f_narrow(0, rows.start as i64, rows.len() as i64).map_err(tch_err)?;
        Ok(TorchLinear { w, bias: None, splits: vec![rows.len() as i64] })
    }
}

/// One step on the device.
pub struct TorchOps<'a> {
    pub plan: &'a StepPlan,
    pub arena: &'a mut KvArena,
    pub kind: Kind,
    pub hidden: i64,
}

/// transformers' RMSNorm: normalise in f32, cast back, then scale by the weight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, kind: Kind) -> Result<Tensor> {
    let x32 = x.f_to_kind(Kind::Float).map_err(tch_err)?;
    let var = x32.f_square().and_then(|s| s.f_mean_dim(-1, true, Kind::Float)).map_err(tch_err)?;
    var.f_add_scalar(eps as f64)
        .and_then(|v| v.f_rsqrt())
        .and_then(|r| x32.f_mul(&r))
        .and_then(|n| n.f_to_kind(kind))
        .and_then(|n| w.f_mul(&n))
        .map_err(tch_err)
}

/// x * cos + rotate_half(x) * sin, x laid out [.., head_dim].
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, hd: i64) -> Result<Tensor> {
    let half = hd / 2;
    let x1 = x.f_narrow(-1, 0, half).map_err(tch_err)?;
    let x2 = x.f_narrow(-1, half, half).map_err(tch_err)?;
    let rot = x2.f_neg().and_then(|n| Tensor::f_cat(&[n, x1], -1)).map_err(tch_err)?;
    x.f_mul(cos).and_then(|a| rot.f_mul(sin).and_then(|b| a.f_add(&b))).map_err(tch_err)
}

/// Attention with logit softcapping (Gemma 2), which scaled_dot_product_attention has no
/// argument for: transformers' eager path, step by step. Scores QK^T * scale and the cap
/// tanh(s / cap) * cap in the compute dtype, the cap before the mask, softmax in f32, cast back.
/// `mask` (true: visible) broadcasts over the scores [.., queries, keys].
fn softcapped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f32, cap: f32, kind: Kind) -> Result<Tensor> {
    let cap = f64::from(cap);
    let scores = k
        .f_transpose(-2, -1)
        .and_then(|kt| q.f_matmul(&kt))
        .and_then(|s| s.f_mul_scalar(f64::from(scale)))
        .and_then(|s| s.f_div_scalar(cap))
        .and_then(|s| s.f_tanh())
        .and_then(|s| s.f_mul_scalar(cap))
        .map_err(tch_err)?;
    // Masked scores get f32's lowest value (transformers adds finfo.min) after the upcast, so they
    // weigh exactly zero and a row is never all -inf.
    let hidden = mask.f_logical_not().map_err(tch_err)?;
    scores
        .f_to_kind(Kind::Float)
        .and_then(|s| s.f_masked_fill(&hidden, f64::from(f32::MIN)))
        .and_then(|s| s.f_softmax(-1, Kind::Float))
        .and_then(|p| p.f_to_kind(kind))
        .and_then(|p| p.f_matmul(v))
        .map_err(tch_err)
}

impl TorchOps<'_> {
    fn grid(&self) -> (i64, i64) {
        (self.plan.batch, self.plan.t_max)
    }

    /// One bucket group's attention: stores its real tokens' keys/values at (row, position) and
    /// attends over its caches.
    fn attend_group(&mut self, spec: &AttnSpec, g: &GroupPlan, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = self.plan.t_max;
        let (nh, nkv, hd) = (spec.heads as i64, spec.kv_heads as i64, spec.head_dim as i64);
        let n_rep = nh / nkv;
        let (ka, va) = self.arena.layer_mut(g.bucket, spec.layer)?;
        let real = |m: &Tensor| -> Result<Tensor> {
            match &g.write_src {
                Some(idx) => m.f_index_select(0, idx).map_err(tch_err),
                None => Ok(m.shallow_clone()),
            }
        };
        let idx = [Some(&g.write_rows), None, Some(&g.write_pos)];
        // index_put_ writes in place; the tensor it returns is the arena itself.
        let _ = ka.f_index_put_(&idx, &real(k)?, false).map_err(tch_err)?;
        let _ = va.f_index_put_(&idx, &real(v)?, false).map_err(tch_err)?;

        // The group's caches [len, nkv, span, hd]: a view when its rows are consecutive.
        let view = |a: &Tensor| -> Result<Tensor> {
            let rows = match (&g.first_row, &g.rows) {
                (Some(r0), _) => a.f_narrow(0, *r0, g.len),
                (None, Some(rows)) => a.f_index_select(0, rows),
                (None, None) => return Err(Error::Internal("a KV group without rows".into())),
            };
            rows.and_then(|r| r.f_narrow(2, 0, g.span)).map_err(tch_err)
        };
        let (kc, vc) = (view(&*ka)?, view(&*va)?);

        // Grouped-query attention without repeating keys: the n_rep query heads that share a kv
        // head are folded into that head's query rows (transformers' repeat_kv maps head h to kv
        // head h / n_rep, i.e. heads are kv-major), and the mask is tiled to match.
        let qg = match &g.members {
            Some(m) => q.f_index_select(0, m).map_err(tch_err)?,
            None => q.shallow_clone(),
        };
        let qg = qg.f_transpose(1, 2).and_then(|q| q.f_reshape([g.len, nkv, n_rep * t, hd])).map_err(tch_err)?;
        let mask = g
            .masks
            .iter()
            .find(|(w, _)| *w == spec.window)
            .map(|(_, m)| m)
            .ok_or_else(|| Error::Internal("no attention mask for a layer window".into()))?;
        let mask = if n_rep > 1 { mask.f_repeat([1, 1, n_rep, 1]).map_err(tch_err)? } else { mask.shallow_clone() };
        let out = match spec.softcap {
            Some(cap) => softcapped_attention(&qg, &kc, &vc, &mask, spec.scale_or_default(), cap, self.kind)?,
            None => {
                let scale = spec.scale.map(f64::from);
                Tensor::f_scaled_dot_product_attention(&qg, &kc, &vc, Some(&mask), 0.0, false, scale, false)
                    .map_err(tch_err)?
            }
        };
        out.f_reshape([g.len, nh, t, hd])
            .and_then(|o| o.f_transpose(1, 2))
            .and_then(|o| o.f_reshape([g.len, t, nh * hd]))
            .map_err(tch_err)
    }
}

impl Ops for TorchOps<'_> {
    type Kinds = TorchKinds;
    type Act = Tensor;
    type Rotary = (Tensor, Tensor);

    fn embed(&mut self, table: &Tensor) -> Result<Tensor> {
        let (b, t) = self.grid();
        let flat = self.plan.tokens.f_view([-1]).map_err(tch_err)?;
        table.f_index_select(0, &flat).and_then(|e| e.f_view([b, t, self.hidden])).map_err(tch_err)
    }

    fn rotary(&mut self, index: usize, _rope: &Rope) -> Result<(Tensor, Tensor)> {
        // The plan computed the step's cos/sin on the host with the model's ropes (fixed buffers
        // that a recorded graph reads).
        let (cos, sin) = match (index, &self.plan.local) {
            (0, _) => (&self.plan.cos, &self.plan.sin),
            (1, Some((cos, sin))) => (cos, sin),
            _ => return Err(Error::Internal(format!("the torch step plan has no rotary tables for rope {index}"))),
        };
        Ok((cos.shallow_clone(), sin.shallow_clone()))
    }

    fn rms_norm(&mut self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        rms_norm(x, w, eps, self.kind)
    }

    fn head_rms_norm(&mut self, x: Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let (b, t) = self.grid();
        let hd = w.size().first().copied().unwrap_or(1);
        let heads = x.f_view([b, t, -1, hd]).map_err(tch_err)?;
        rms_norm(&heads, w, eps, self.kind)?.f_reshape([b, t, -1]).map_err(tch_err)
    }

    fn rope(&mut self, x: Tensor, heads: usize, rot: &(Tensor, Tensor)) -> Result<Tensor> {
        let (b, t) = self.grid();
        let heads = heads as i64;
        let hd = x.size().last().copied().unwrap_or(0) / heads.max(1);
        let xh = x.f_view([b, t, heads, hd]).map_err(tch_err)?;
        rope(&xh, &rot.0, &rot.1, hd)?.f_reshape([b, t, heads * hd]).map_err(tch_err)
    }

    fn project(&mut self, x: Tensor, w: &TorchLinear) -> Result<Vec<Tensor>> {
        let y = x.f_linear(&w.w, w.bias.as_ref()).map_err(tch_err)?;
        if w.splits.len() == 1 {
            return Ok(vec![y]);
        }
        y.f_split_with_sizes(w.splits.as_slice(), -1).map_err(tch_err)
    }

    fn gated(&mut self, x: Tensor, w: &TorchLinear, act: Activation) -> Result<Tensor> {
        let [gate, up] = w.splits[..] else {
            return Err(Error::Internal("a gated MLP needs a (gate, up) projection".into()));
        };
        let gu = x.f_linear(&w.w, w.bias.as_ref()).map_err(tch_err)?;
        let g = gu
            .f_narrow(-1, 0, gate)
            .and_then(|g| match act {
                Activation::Silu => g.f_silu(),
                Activation::GeluTanh => g.f_gelu("tanh"),
            })
            .map_err(tch_err)?;
        let u = gu.f_narrow(-1, gate, up).map_err(tch_err)?;
        g.f_mul(&u).map_err(tch_err)
    }

    fn attend(&mut self, spec: &AttnSpec, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let (b, t) = self.grid();
        let (nh, nkv, hd) = (spec.heads as i64, spec.kv_heads as i64, spec.head_dim as i64);
        let q = q.f_view([b, t, nh, hd]).map_err(tch_err)?;
        // New keys/values in grid order [b * t, nkv, hd].
        let k = k.f_reshape([b * t, nkv, hd]).map_err(tch_err)?;
        let v = v.f_reshape([b * t, nkv, hd]).map_err(tch_err)?;
        let plan = self.plan;
        let mut outs = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            outs.push(self.attend_group(spec, g, &q, &k, &v)?);
        }
        let out = match outs.len() {
            1 => outs.pop().ok_or_else(|| Error::Internal("no attention output".into()))?,
            _ => Tensor::f_cat(&outs, 0).map_err(tch_err)?,
        };
        match &plan.unperm {
            Some(at) => out.f_index_select(0, at).map_err(tch_err),
            None => Ok(out),
        }
    }

    fn all_reduce(&mut self, x: Tensor) -> Result<Tensor> {
        // One rank: nothing to sum.
        Ok(x)
    }

    fn add(&mut self, x: &mut Tensor, y: Tensor) -> Result<()> {
        *x = x.f_add(&y).map_err(tch_err)?;
        Ok(())
    }

    fn scale(&mut self, x: Tensor, factor: f32) -> Result<Tensor> {
        x.f_mul_scalar(factor as f64).map_err(tch_err)
    }

    fn softcap(&mut self, x: Tensor, cap: f32) -> Result<Tensor> {
        let cap = cap as f64;
        x.f_div_scalar(cap).and_then(|t| t.f_tanh()).and_then(|t| t.f_mul_scalar(cap)).map_err(tch_err)
    }

    fn output_rows(&mut self, x: Tensor) -> Result<Tensor> {
        let (b, t) = self.grid();
        x.f_view([b * t, self.hidden]).and_then(|x| x.f_index_select(0, &self.plan.out_idx)).map_err(tch_err)
    }
}
