//! How a step's sequences map onto the torch backend's tensors: the [batch, longest new run] grid
//! (shorter runs padded at the end; their keys are never written and their outputs never read),
//! the KV buckets each sequence's cache lives in, and the index, rope and mask tensors every layer
//! of the family forward (`ops::TorchOps`) reads.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use super::cache::KvArena;
use super::tch_err;
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
pub struct GroupPlan {
    pub bucket: usize,
    pub len: i64,
    pub span: i64,
    pub first_row: Option<i64>,
    /// The group's rows, when not consecutive.
    pub rows: Option<Tensor>,
    /// Step indices of the group's sequences (None: the group is the whole step, in order).
    pub members: Option<Tensor>,
    /// (row, position) of each of the group's real new tokens, and its index in the flattened
    /// grid (None: the group is the whole grid, in order, without padding).
    pub write_rows: Tensor,
    pub write_pos: Tensor,
    pub write_src: Option<Tensor>,
    /// Attention masks [len, 1, t_max, span], one per distinct window.
    pub masks: Vec<(Option<usize>, Tensor)>,
}

/// Host-built index and mask tensors for one step, uploaded once and shared by every layer.
pub struct StepPlan {
    layout: StepLayout,
    pub batch: i64,
    pub t_max: i64,
    pub tokens: Tensor,
    pub cos: Tensor,
    pub sin: Tensor,
    /// cos/sin of the model's second rope (Gemma 3's sliding layers: rotary index 1), if any.
    pub local: Option<(Tensor, Tensor)>,
    pub groups: Vec<GroupPlan>,
    /// Where each sequence's attention output sits in the groups' concatenated outputs (None
    /// when in order).
    pub unperm: Option<Tensor>,
    /// Grid indices whose logits are returned.
    pub out_idx: Tensor,
}

fn up_i64(v: &[i64], device: Device) -> Result<Tensor> {
    Tensor::f_from_slice(v).and_then(|t| t.f_to_device(device)).map_err(tch_err)
}

fn up_usize(v: &[usize], device: Device) -> Result<Tensor> {
    up_i64(&v.iter().map(|&x| x as i64).collect::<Vec<_>>(), device)
}

impl StepPlan {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: &ModelConfig,
        kind: Kind,
        rope: &Rope,
        local_rope: Option<&Rope>,
        grouping: &Grouping,
        seqs: &[SeqInput],
        all_positions: bool,
        device: Device,
    ) -> Result<StepPlan> {
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
        let (cos, sin) = rope.tables(positions.iter().copied(), needed);
        let local = local_rope.map(|r| r.tables(positions.iter().copied(), needed));
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
            local: match &local {
                Some((c, s)) => Some((trig(c)?, trig(s)?)),
                None => None,
            },
            groups,
            unperm,
            out_idx: up_i64(&out_idx, device)?,
        })
    }

    /// Every tensor of the plan, in a fixed order (equal layouts give equal lists of shapes).
    fn buffers(&mut self) -> Vec<&mut Tensor> {
        let mut out = vec![&mut self.tokens, &mut self.cos, &mut self.sin, &mut self.out_idx];
        if let Some((c, s)) = &mut self.local {
            out.extend([c, s]);
        }
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
