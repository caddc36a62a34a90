//! The Llama-family forward (Llama, Mistral, Qwen2, Qwen3) in libtorch ops, written once: the
//! architectures differ only in which optional weights exist (biases, q/k norms, tied head) and in
//! the config (head_dim, rope scaling, sliding windows). Numerics follow transformers: RMSNorm in
//! f32 then cast, rope with cos/sin cast to the compute dtype, attention in the compute dtype.
//!
//! A step's sequences are laid out as a [batch, longest new run] grid; shorter runs are padded at
//! the end, their keys are never written and their outputs never read.

use tch::{Device, Kind, Tensor};

use super::cache::KvArena;
use super::tch_err;
use super::weights::{TorchLayer, TorchWeights};
use crate::backend::{check_token, SeqInput};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::rope::Rope;

/// Host-built index and mask tensors for one step, uploaded once and shared by every layer.
pub struct StepPlan {
    batch: i64,
    t_max: i64,
    /// Cache positions attended to: 0..span.
    span: i64,
    tokens: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// Arena rows of the batch: Some(first) when consecutive (a view), else an index tensor.
    first_row: Option<i64>,
    rows: Tensor,
    /// (row, position) of every real new token, and its index in the flattened grid (None when
    /// the grid has no padding).
    write_rows: Tensor,
    write_pos: Tensor,
    write_src: Option<Tensor>,
    /// Grid indices whose logits are returned.
    out_idx: Tensor,
    /// Attention masks [batch, 1, t_max, span], one per distinct window.
    masks: Vec<(Option<usize>, Tensor)>,
}

fn up_i64(v: &[i64], device: Device) -> Result<Tensor> {
    Tensor::f_from_slice(v).and_then(|t| t.f_to_device(device)).map_err(tch_err)
}

impl StepPlan {
    pub fn new(
        model: &TorchModel,
        rope: &Rope,
        arena: &KvArena,
        seqs: &[SeqInput],
        all_positions: bool,
        device: Device,
        fixed_span: Option<usize>,
    ) -> Result<StepPlan> {
        let (cfg, kind) = (&model.cfg, model.kind);
        let hd = cfg.head_dim;
        let b = seqs.len();
        let t_max = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let needed = seqs.iter().map(|s| s.start_pos + s.tokens.len()).max().unwrap_or(0);
        // A recorded graph attends over a fixed span (the cache capacity), masked beyond each
        // sequence's end; rope frequencies still follow the real length.
        let span = fixed_span.unwrap_or(needed).max(needed);
        let mut tokens = vec![0i64; b * t_max];
        let mut positions = vec![0usize; b * t_max];
        let (mut write_rows, mut write_pos, mut write_src, mut out_idx) = (vec![], vec![], vec![], vec![]);
        for (si, s) in seqs.iter().enumerate() {
            let cap = arena.capacity_of(s.slot).ok_or_else(|| {
                Error::Internal(format!("slot {} is not allocated in the torch backend", s.slot))
            })?;
            if s.tokens.is_empty() || s.start_pos + s.tokens.len() > cap {
                return Err(Error::Internal(format!(
                    "slot {}: {} new tokens at position {} do not fit its KV cache of {cap}",
                    s.slot,
                    s.tokens.len(),
                    s.start_pos
                )));
            }
            for t in 0..t_max {
                let g = si * t_max + t;
                // Padding queries sit on the sequence's last real position, so they see only real keys.
                let t_real = t.min(s.tokens.len() - 1);
                positions[g] = s.start_pos + t_real;
                if t < s.tokens.len() {
                    let id = s.tokens[t];
                    check_token(id, si, s.start_pos + t, cfg.vocab_size)?;
                    tokens[g] = id as i64;
                    write_rows.push(s.slot as i64);
                    write_pos.push((s.start_pos + t) as i64);
                    write_src.push(g as i64);
                    if all_positions {
                        out_idx.push(g as i64);
                    }
                }
            }
            if !all_positions {
                out_idx.push((si * t_max + s.tokens.len() - 1) as i64);
            }
        }

        // cos/sin on the host with the shared rope code (f32, as transformers computes them), cast
        // to the compute dtype on the device as transformers casts them.
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

        let mut masks = Vec::new();
        for &w in &cfg.layer_windows {
            if masks.iter().any(|(mw, _)| *mw == w) {
                continue;
            }
            // transformers' causal (and sliding_window: j > p - w) mask, per query position.
            let mut m = vec![0u8; b * t_max * span];
            for (g, &p) in positions.iter().enumerate() {
                let lo = w.map_or(0, |w| (p + 1).saturating_sub(w));
                m[g * span + lo..g * span + p + 1].iter_mut().for_each(|x| *x = 1);
            }
            let t = Tensor::f_from_data_size(&m, &[b as i64, 1, t_max as i64, span as i64], Kind::Bool)
                .and_then(|t| t.f_to_device(device))
                .map_err(tch_err)?;
            masks.push((w, t));
        }

        let slots: Vec<i64> = seqs.iter().map(|s| s.slot as i64).collect();
        let consecutive = slots.windows(2).all(|p| p[1] == p[0] + 1);
        let padded = write_src.len() != b * t_max;
        Ok(StepPlan {
            batch: b as i64,
            t_max: t_max as i64,
            span: span as i64,
            tokens: up_i64(&tokens, device)?,
            cos: trig(&cos)?,
            sin: trig(&sin)?,
            first_row: if consecutive { slots.first().copied() } else { None },
            rows: up_i64(&slots, device)?,
            write_rows: up_i64(&write_rows, device)?,
            write_pos: up_i64(&write_pos, device)?,
            write_src: if padded { Some(up_i64(&write_src, device)?) } else { None },
            out_idx: up_i64(&out_idx, device)?,
            masks,
        })
    }
}

impl StepPlan {
    pub fn first_row(&self) -> Option<i64> {
        self.first_row
    }

    /// Copies another plan's values (same shapes; built on the host) into this plan's device
    /// buffers: how a recorded graph gets each step's inputs.
    pub fn fill_from(&mut self, host: &StepPlan) -> Result<()> {
        let same = self.batch == host.batch
            && self.t_max == host.t_max
            && self.span == host.span
            && self.first_row == host.first_row
            && self.write_src.is_none()
            && host.write_src.is_none()
            && self.masks.len() == host.masks.len();
        if !same {
            return Err(Error::Internal("a recorded decode step was replayed with another shape".into()));
        }
        let pairs = [
            (&mut self.tokens, &host.tokens),
            (&mut self.cos, &host.cos),
            (&mut self.sin, &host.sin),
            (&mut self.rows, &host.rows),
            (&mut self.write_rows, &host.write_rows),
            (&mut self.write_pos, &host.write_pos),
            (&mut self.out_idx, &host.out_idx),
        ];
        for (dst, src) in pairs {
            dst.f_copy_(src).map_err(tch_err)?;
        }
        for ((_, dst), (_, src)) in self.masks.iter_mut().zip(&host.masks) {
            dst.f_copy_(src).map_err(tch_err)?;
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
        let (b, t, span) = (plan.batch, plan.t_max, plan.span);
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

        // Store the real tokens' keys/values at (row, position): x[rows, :, pos] = new.
        let real = |m: Tensor| -> Result<Tensor> {
            let m = m.f_reshape([b * t, nkv, hd]).map_err(tch_err)?;
            match &plan.write_src {
                Some(idx) => m.f_index_select(0, idx).map_err(tch_err),
                None => Ok(m),
            }
        };
        let idx = [Some(&plan.write_rows), None, Some(&plan.write_pos)];
        // index_put_ writes in place; the tensor it returns is the arena itself.
        let _ = arena.k[li].f_index_put_(&idx, &real(k)?, false).map_err(tch_err)?;
        let _ = arena.v[li].f_index_put_(&idx, &real(v)?, false).map_err(tch_err)?;

        // The batch's caches [b, nkv, span, hd]: a view when its rows are consecutive.
        let view = |a: &Tensor| -> Result<Tensor> {
            let rows = match plan.first_row {
                Some(r0) => a.f_narrow(0, r0, b),
                None => a.f_index_select(0, &plan.rows),
            };
            rows.and_then(|r| r.f_narrow(2, 0, span)).map_err(tch_err)
        };
        let (kc, vc) = (view(&arena.k[li])?, view(&arena.v[li])?);

        // Grouped-query attention without repeating keys: the n_rep query heads that share a kv
        // head are folded into that head's query rows (transformers' repeat_kv maps head h to kv
        // head h / n_rep, i.e. heads are kv-major), and the mask is tiled to match.
        let n_rep = nh / nkv;
        let q = q.f_transpose(1, 2).and_then(|q| q.f_reshape([b, nkv, n_rep * t, hd])).map_err(tch_err)?;
        let mask = plan
            .masks
            .iter()
            .find(|(w, _)| *w == cfg.layer_windows[li])
            .map(|(_, m)| m)
            .ok_or_else(|| Error::Internal("no attention mask for a layer window".into()))?;
        let mask = if n_rep > 1 { mask.f_repeat([1, 1, n_rep, 1]).map_err(tch_err)? } else { mask.shallow_clone() };
        let out = Tensor::f_scaled_dot_product_attention(&q, &kc, &vc, Some(&mask), 0.0, false, None, false)
            .map_err(tch_err)?;
        let out = out
            .f_reshape([b, nh, t, hd])
            .and_then(|o| o.f_transpose(1, 2))
            .and_then(|o| o.f_reshape([b, t, nh * hd]))
            .map_err(tch_err)?;
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
