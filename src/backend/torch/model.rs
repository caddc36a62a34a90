//! The Llama-family forward (Llama, Mistral, Qwen2, Qwen3) in libtorch ops, written once: the
//! architectures differ only in which optional weights exist (biases, q/k norms, tied head) and in
//! the config (head_dim, rope scaling, sliding windows). Numerics follow transformers: RMSNorm in
//! f32 then cast, rope with cos/sin cast to the compute dtype, attention in the compute dtype.
//!
//! A step's sequences are laid out as a [batch, longest new run] grid; shorter runs are padded at
//! the end, their keys are never written and their outputs never read.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::cache::KvArena;
use super::tch_err;
use super::weights::{TorchLayer, TorchWeights};
use crate::backend::{check_token, SeqInput};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::rope::Rope;

/// What a recorded graph bakes in: shapes, and which rows it views. Two steps with equal layouts
/// (and equal bucket stamps) run the same recorded graph with different buffer contents.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct StepLayout {
    t_max: usize,
    /// Some sequence has fewer new tokens than `t_max`.
    padded: bool,
    /// The groups' members, concatenated, are the step's sequences in order.
    in_order: bool,
    pub groups: Vec<GroupShape>,
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct GroupShape {
    pub bucket: usize,
    len: usize,
    /// The first row when the group's rows (in row order) are consecutive: its caches are then a
    /// view of the bucket; else they are gathered with an index.
    first_row: Option<usize>,
    /// Cache positions attended to.
    span: usize,
}

/// How a step's sequences map onto the arena's buckets: one group per bucket (ascending), each
/// group's sequences in row order, so that consecutive rows give a view whatever order the
/// scheduler lists them in. A step spanning several buckets runs attention once per group (the
/// linear layers still run over the whole batch): the cost of sizing rows by bucket.
pub struct Grouping {
    pub layout: StepLayout,
    /// Each group's bucket stamp when the grouping was made.
    pub stamps: Vec<u64>,
    /// Per group, the step indices of its sequences and their rows, in row order.
    members: Vec<Vec<usize>>,
    rows: Vec<Vec<usize>>,
}

impl Grouping {
    /// `fixed_spans`: attend over each bucket's whole capacity (masked beyond each sequence's
    /// end), as a recorded graph does; else over the group's longest sequence.
    pub fn new(arena: &KvArena, seqs: &[SeqInput], fixed_spans: bool) -> Result<Grouping> {
        let mut by_bucket: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (si, s) in seqs.iter().enumerate() {
            let loc = arena.locate(s.slot).ok_or_else(|| {
                Error::Internal(format!("slot {} is not allocated in the torch backend", s.slot))
            })?;
            if s.tokens.is_empty() || s.start_pos + s.tokens.len() > loc.capacity {
                return Err(Error::Internal(format!(
                    "slot {}: {} new tokens at position {} do not fit its KV cache of {}",
                    s.slot,
                    s.tokens.len(),
                    s.start_pos,
                    loc.capacity
                )));
            }
            by_bucket.entry(loc.bucket).or_default().push((loc.row, si));
        }
        let t_max = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let mut layout = StepLayout {
            t_max,
            padded: seqs.iter().any(|s| s.tokens.len() != t_max),
            in_order: true,
            groups: Vec::with_capacity(by_bucket.len()),
        };
        let (mut stamps, mut members, mut rows) = (vec![], vec![], vec![]);
        let mut next = 0;
        for (bucket, mut list) in by_bucket {
            list.sort_unstable();
            let r: Vec<usize> = list.iter().map(|&(row, _)| row).collect();
            let m: Vec<usize> = list.iter().map(|&(_, si)| si).collect();
            for &si in &m {
                layout.in_order &= si == next;
                next += 1;
            }
            let consecutive = r.windows(2).all(|p| p[1] == p[0] + 1);
            let span = if fixed_spans {
                KvArena::bucket_capacity(bucket)
            } else {
                m.iter().map(|&si| seqs[si].start_pos + seqs[si].tokens.len()).max().unwrap_or(0)
            };
            let stamp = arena
                .stamp(bucket)
                .ok_or_else(|| Error::Internal(format!("KV bucket {bucket} has live slots but no tensors")))?;
            layout.groups.push(GroupShape { bucket, len: r.len(), first_row: r.first().copied().filter(|_| consecutive), span });
            stamps.push(stamp);
            members.push(m);
            rows.push(r);
        }
        Ok(Grouping { layout, stamps, members, rows })
    }
}

/// One bucket's part of a step.
struct GroupPlan {
    bucket: usize,
    len: i64,
    span: i64,
    first_row: Option<i64>,
    /// The group's rows, when not consecutive.
    rows: Option<Tensor>,
    /// Step indices of the group's sequences (None: the group is the whole step, in order).
    members: Option<Tensor>,
    /// (row, position) of each of the group's real new tokens, and its index in the flattened
    /// grid (None: the group is the whole grid, in order, without padding).
    write_rows: Tensor,
    write_pos: Tensor,
    write_src: Option<Tensor>,
    /// Attention masks [len, 1, t_max, span], one per distinct window.
    masks: Vec<(Option<usize>, Tensor)>,
}

/// Host-built index and mask tensors for one step, uploaded once and shared by every layer.
pub struct StepPlan {
    layout: StepLayout,
    batch: i64,
    t_max: i64,
    tokens: Tensor,
    cos: Tensor,
    sin: Tensor,
    groups: Vec<GroupPlan>,
    /// Where each sequence's attention output sits in the groups' concatenated outputs (None
    /// when in order).
    unperm: Option<Tensor>,
    /// Grid indices whose logits are returned.
    out_idx: Tensor,
}

fn up_i64(v: &[i64], device: Device) -> Result<Tensor> {
    Tensor::f_from_slice(v).and_then(|t| t.f_to_device(device)).map_err(tch_err)
}

fn up_usize(v: &[usize], device: Device) -> Result<Tensor> {
    up_i64(&v.iter().map(|&x| x as i64).collect::<Vec<_>>(), device)
}

impl StepPlan {
    pub fn new(
        model: &TorchModel,
        rope: &Rope,
        grouping: &Grouping,
        seqs: &[SeqInput],
        all_positions: bool,
        device: Device,
    ) -> Result<StepPlan> {
        let (cfg, kind) = (&model.cfg, model.kind);
        let hd = cfg.head_dim;
        let b = seqs.len();
        let t_max = grouping.layout.t_max;
        let needed = seqs.iter().map(|s| s.start_pos + s.tokens.len()).max().unwrap_or(0);
        let mut tokens = vec![0i64; b * t_max];
        let mut positions = vec![0usize; b * t_max];
        let mut out_idx = vec![];
        for (si, s) in seqs.iter().enumerate() {
            for t in 0..t_max {
                let g = si * t_max + t;
                // Padding queries sit on the sequence's last real position, so they see only real keys.
                let t_real = t.min(s.tokens.len().saturating_sub(1));
                positions[g] = s.start_pos + t_real;
                if t < s.tokens.len() {
                    let id = s.tokens[t];
                    check_token(id, si, s.start_pos + t, cfg.vocab_size)?;
                    tokens[g] = id as i64;
                    if all_positions {
                        out_idx.push(g as i64);
                    }
                }
            }
            if !all_positions {
                out_idx.push((si * t_max + s.tokens.len().saturating_sub(1)) as i64);
            }
        }

        // cos/sin on the host with the shared rope code (f32, as transformers computes them), cast
        // to the compute dtype on the device as transformers casts them. Rope frequencies follow
        // the real length, also when a recorded graph attends over whole buckets.
        let inv_freq = rope.inv_freq_for(needed);
        let mut cos = vec![0f32; b * t_max * hd];
        let mut sin = vec![0f32; b * t_max * hd];
        for (g, &p) in positions.iter().enumerate() {
            Rope::cos_sin(&inv_freq, p, &mut cos[g * hd..(g + 1) * hd], &mut sin[g * hd..(g + 1) * hd]);
        }
        let shape = [b as i64, t_max as i64, 1, hd as i64];
        let trig = |v: &[f32]| -> Result<Tensor> {
            Tensor::f_from_slice(v)
                .and_then(|t| t.f_reshape(shape))
                .and_then(|t| t.f_to_device(device))
                .and_then(|t| t.f_to_kind(kind))
                .map_err(tch_err)
        };

        let layout = &grouping.layout;
        let whole = layout.groups.len() == 1 && layout.in_order;
        let mut groups = Vec::with_capacity(layout.groups.len());
        for ((shape, members), rows) in layout.groups.iter().zip(&grouping.members).zip(&grouping.rows) {
            let span = shape.span;
            let (mut write_rows, mut write_pos, mut write_src) = (vec![], vec![], vec![]);
            for (&si, &row) in members.iter().zip(rows) {
                let s = &seqs[si];
                for t in 0..s.tokens.len() {
                    write_rows.push(row as i64);
                    write_pos.push((s.start_pos + t) as i64);
                    write_src.push((si * t_max + t) as i64);
                }
            }
            let mut masks = Vec::new();
            for &w in &cfg.layer_windows {
                if masks.iter().any(|(mw, _)| *mw == w) {
                    continue;
                }
                // transformers' causal (and sliding_window: j > p - w) mask, per query position.
                let mut m = vec![0u8; members.len() * t_max * span];
                for (j, &si) in members.iter().enumerate() {
                    for t in 0..t_max {
                        let p = positions[si * t_max + t];
                        let lo = w.map_or(0, |w| (p + 1).saturating_sub(w));
                        let at = (j * t_max + t) * span;
                        m[at + lo..at + p + 1].iter_mut().for_each(|x| *x = 1);
                    }
                }
                let dims = [members.len() as i64, 1, t_max as i64, span as i64];
                let t = Tensor::f_from_data_size(&m, &dims, Kind::Bool)
                    .and_then(|t| t.f_to_device(device))
                    .map_err(tch_err)?;
                masks.push((w, t));
            }
            groups.push(GroupPlan {
                bucket: shape.bucket,
                len: members.len() as i64,
                span: span as i64,
                first_row: shape.first_row.map(|r| r as i64),
                rows: if shape.first_row.is_none() { Some(up_usize(rows, device)?) } else { None },
                members: if whole { None } else { Some(up_usize(members, device)?) },
                write_rows: up_i64(&write_rows, device)?,
                write_pos: up_i64(&write_pos, device)?,
                write_src: if whole && !layout.padded { None } else { Some(up_i64(&write_src, device)?) },
                masks,
            });
        }
        let unperm = if layout.in_order {
            None
        } else {
            let mut at = vec![0usize; b];
            for (k, &si) in grouping.members.iter().flatten().enumerate() {
                at[si] = k;
            }
            Some(up_usize(&at, device)?)
        };
        Ok(StepPlan {
            layout: layout.clone(),
            batch: b as i64,
            t_max: t_max as i64,
            tokens: up_i64(&tokens, device)?,
            cos: trig(&cos)?,
            sin: trig(&sin)?,
            groups,
            unperm,
            out_idx: up_i64(&out_idx, device)?,
        })
    }

    /// Every tensor of the plan, in a fixed order (equal layouts give equal lists of shapes).
    fn buffers(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.tokens, &mut self.cos, &mut self.sin, &mut self.out_idx];
        out.extend(self.unperm.as_mut());
        for g in &mut self.groups {
            out.extend(g.rows.as_mut());
            out.extend(g.members.as_mut());
            out.push(&mut g.write_rows);
            out.push(&mut g.write_pos);
            out.extend(g.write_src.as_mut());
            out.extend(g.masks.iter_mut().map(|(_, m)| m));
        }
        out
    }

    /// Copies another plan's values (same layout; built on the host) into this plan's device
    /// buffers: how a recorded graph gets each step's inputs.
    pub fn fill_from(&mut self, host: &mut StepPlan) -> Result<()> {
        if self.layout != host.layout || self.batch != host.batch {
            return Err(Error::Internal("a recorded decode step was replayed with another layout".into()));
        }
        let (dst, src) = (self.buffers(), host.buffers());
        if dst.len() != src.len() {
            return Err(Error::Internal("a recorded decode step was replayed with other buffers".into()));
        }
        for (d, s) in dst.into_iter().zip(src) {
            d.f_copy_(s).map_err(tch_err)?;
        }
        Ok(())
    }
}

pub struct TorchModel {
    pub cfg: ModelConfig,
    pub weights: TorchWeights,
    pub kind: Kind,
}

/// transformers' RMSNorm: normalise in f32, cast back, then scale by the weight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, kind: Kind) -> Result<Tensor> {
    let x32 = x.f_to_kind(Kind::Float).map_err(tch_err)?;
    let var = x32.f_square().and_then(|s| s.f_mean_dim(-1, true, Kind::Float)).map_err(tch_err)?;
    var.f_add_scalar(eps)
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

impl TorchModel {
    /// Runs one step, writing new keys/values into `arena`, and returns the logits of the
    /// rows in `plan.out_idx` as a [rows, vocab] f32 tensor on the device.
    pub fn forward(&self, plan: &StepPlan, arena: &mut KvArena) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = (plan.batch, plan.t_max);
        let h = cfg.hidden_size as i64;
        let flat = plan.tokens.f_view([-1]).map_err(tch_err)?;
        let mut x = self.weights.embed.f_index_select(0, &flat).and_then(|e| e.f_view([b, t, h])).map_err(tch_err)?;
        for (li, lw) in self.weights.layers.iter().enumerate() {
            let attn = self.attention(li, lw, &x, plan, arena)?;
            x = x.f_add(&attn).map_err(tch_err)?;
            let mlp = self.mlp(lw, &x)?;
            x = x.f_add(&mlp).map_err(tch_err)?;
        }
        let rows = x.f_view([b * t, h]).and_then(|x| x.f_index_select(0, &plan.out_idx)).map_err(tch_err)?;
        let hidden = rms_norm(&rows, &self.weights.norm, cfg.rms_norm_eps, self.kind)?;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        hidden.f_linear::<&Tensor>(head, None).and_then(|l| l.f_to_kind(Kind::Float)).map_err(tch_err)
    }

    fn attention(&self, li: usize, lw: &TorchLayer, x: &Tensor, plan: &StepPlan, arena: &mut KvArena) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = (plan.batch, plan.t_max);
        let (nh, nkv, hd) = (cfg.num_attention_heads as i64, cfg.num_key_value_heads as i64, cfg.head_dim as i64);
        let eps = cfg.rms_norm_eps;
        let xn = rms_norm(x, &lw.input_norm, eps, self.kind)?;
        let qkv = xn.f_linear(&lw.qkv, lw.qkv_bias.as_ref()).map_err(tch_err)?;
        let parts = qkv.f_split_with_sizes([nh * hd, nkv * hd, nkv * hd], -1).map_err(tch_err)?;
        let [q, k, v] = <[Tensor; 3]>::try_from(parts).map_err(|_| Error::Internal("qkv split".into()))?;
        let mut q = q.f_view([b, t, nh, hd]).map_err(tch_err)?;
        let mut k = k.f_view([b, t, nkv, hd]).map_err(tch_err)?;
        let v = v.f_view([b, t, nkv, hd]).map_err(tch_err)?;
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            q = rms_norm(&q, qn, eps, self.kind)?;
            k = rms_norm(&k, kn, eps, self.kind)?;
        }
        let q = rope(&q, &plan.cos, &plan.sin, hd)?;
        let k = rope(&k, &plan.cos, &plan.sin, hd)?;

        // New keys/values in grid order [b * t, nkv, hd].
        let k = k.f_reshape([b * t, nkv, hd]).map_err(tch_err)?;
        let v = v.f_reshape([b * t, nkv, hd]).map_err(tch_err)?;
        let n_rep = nh / nkv;
        let mask_of = |g: &GroupPlan| -> Result<Tensor> {
            let mask = g
                .masks
                .iter()
                .find(|(w, _)| *w == cfg.layer_windows[li])
                .map(|(_, m)| m)
                .ok_or_else(|| Error::Internal("no attention mask for a layer window".into()))?;
            // Tiled to match the folded query heads below.
            if n_rep > 1 { mask.f_repeat([1, 1, n_rep, 1]).map_err(tch_err) } else { Ok(mask.shallow_clone()) }
        };
        let mut outs = Vec::with_capacity(plan.groups.len());
        for g in &plan.groups {
            let (ka, va) = arena.layer_mut(g.bucket, li)?;
            // Store the group's real tokens' keys/values at (row, position): x[rows, :, pos] = new.
            let real = |m: &Tensor| -> Result<Tensor> {
                match &g.write_src {
                    Some(idx) => m.f_index_select(0, idx).map_err(tch_err),
                    None => Ok(m.shallow_clone()),
                }
            };
            let idx = [Some(&g.write_rows), None, Some(&g.write_pos)];
            // index_put_ writes in place; the tensor it returns is the arena itself.
            let _ = ka.f_index_put_(&idx, &real(&k)?, false).map_err(tch_err)?;
            let _ = va.f_index_put_(&idx, &real(&v)?, false).map_err(tch_err)?;

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

            // Grouped-query attention without repeating keys: the n_rep query heads that share a
            // kv head are folded into that head's query rows (transformers' repeat_kv maps head h
            // to kv head h / n_rep, i.e. heads are kv-major), and the mask is tiled to match.
            let qg = match &g.members {
                Some(m) => q.f_index_select(0, m).map_err(tch_err)?,
                None => q.shallow_clone(),
            };
            let qg = qg.f_transpose(1, 2).and_then(|q| q.f_reshape([g.len, nkv, n_rep * t, hd])).map_err(tch_err)?;
            let mask = mask_of(g)?;
            let out = Tensor::f_scaled_dot_product_attention(&qg, &kc, &vc, Some(&mask), 0.0, false, None, false)
                .and_then(|o| o.f_reshape([g.len, nh, t, hd]))
                .and_then(|o| o.f_transpose(1, 2))
                .and_then(|o| o.f_reshape([g.len, t, nh * hd]))
                .map_err(tch_err)?;
            outs.push(out);
        }
        let out = match outs.len() {
            1 => outs.pop().ok_or_else(|| Error::Internal("no attention output".into()))?,
            _ => Tensor::f_cat(&outs, 0).map_err(tch_err)?,
        };
        let out = match &plan.unperm {
            Some(at) => out.f_index_select(0, at).map_err(tch_err)?,
            None => out,
        };
        out.f_linear(&lw.o, lw.o_bias.as_ref()).map_err(tch_err)
    }

    fn mlp(&self, lw: &TorchLayer, x: &Tensor) -> Result<Tensor> {
        let xn = rms_norm(x, &lw.post_norm, self.cfg.rms_norm_eps, self.kind)?;
        let gu = xn.f_linear(&lw.gate_up, lw.gate_up_bias.as_ref()).map_err(tch_err)?;
        let inter = self.cfg.intermediate_size as i64;
        let g = gu.f_narrow(-1, 0, inter).and_then(|g| g.f_silu()).map_err(tch_err)?;
        let u = gu.f_narrow(-1, inter, inter).map_err(tch_err)?;
        g.f_mul(&u).and_then(|a| a.f_linear(&lw.down, lw.down_bias.as_ref())).map_err(tch_err)
    }
}
