//! Tensor parallelism as a plan of the model: which part of every weight each of N ranks holds.
//! Any backend that runs the ranks (the CPU backend's rank threads, Neuron's two NeuronCores)
//! executes the same plan; the forward's two `all_reduce` ops per layer are where ranks meet.
//!
//! - q/k/v and gate/up: split by output rows. Rank r owns query heads [r*Hq/N, (r+1)*Hq/N) and the
//!   KV heads those query heads use; with fewer KV heads than ranks each rank holds a copy of the
//!   one its query heads share (as transformers-neuronx and NxDI replicate them).
//! - o_proj and down_proj: split by input columns; their partial sums are all-reduced. A bias is
//!   rank 0's (the others hold zeros), so it counts once in the sum.
//! - norms and the embedding: replicated. lm_head: split by vocabulary rows (a tied head is rows of
//!   the replicated embedding, not a copy); the host concatenates the logits in rank order.
//! - Quantized (GGUF) matrices: a row is its own run of whole blocks, so row splits keep the blocks
//!   as stored, the vocabulary split of a quantized embedding/lm_head included. A column split
//!   keeps them when it falls on block boundaries, else that shard is dequantized to f32.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::host::{HostHead, HostLinear, HostPart, HostWeights};
use crate::model::llama::{Layer, LayerWeights, LlamaWeights};
use crate::model::ops::RankShape;
use crate::tensor::Matrix;

/// Ranks beyond this are refused (far more than any CPU socket count or NeuronCore group).
pub const MAX_TP_DEGREE: usize = 64;

pub struct TpPlan {
    pub shapes: Vec<RankShape>,
    /// Per rank, the first (global) KV head it holds.
    kv_first: Vec<usize>,
}

impl TpPlan {
    /// The plan for `ranks` ranks, or `InvalidInputError` naming the head counts and the valid degrees.
    pub fn new(cfg: &ModelConfig, ranks: usize) -> Result<TpPlan> {
        let (nh, nkv, inter, vocab) =
            (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size);
        if ranks == 0 || ranks > MAX_TP_DEGREE {
            return Err(Error::invalid(format!(
                "tp_degree={ranks} is out of range; use an integer from 1 to {MAX_TP_DEGREE} that divides the \
                 model's heads (valid for this model: {})",
                valid_degrees(cfg)
            )));
        }
        if !divides(cfg, ranks) {
            return Err(Error::invalid(format!(
                "tp_degree={ranks} does not split this model: num_attention_heads={nh}, num_key_value_heads={nkv} \
                 and intermediate_size={inter} must divide by it (or it by num_key_value_heads); valid tp_degree \
                 values for this model: {}",
                valid_degrees(cfg)
            )));
        }
        let heads = nh / ranks;
        let group = nh / nkv;
        let kv_heads = if nkv >= ranks { nkv / ranks } else { 1 };
        let chunk = vocab.div_ceil(ranks);
        let shapes = (0..ranks)
            .map(|r| RankShape {
                rank: r,
                ranks,
                heads,
                kv_heads,
                intermediate: inter / ranks,
                vocab: (r * chunk).min(vocab)..((r + 1) * chunk).min(vocab),
            })
            .collect();
        let kv_first = (0..ranks).map(|r| r * heads / group).collect();
        Ok(TpPlan { shapes, kv_first })
    }

    pub fn ranks(&self) -> usize {
        self.shapes.len()
    }

    /// Every rank's weights. One rank takes the checkpoint as it is; more ranks take row windows
    /// (no copy) and column copies of it.
    pub fn shard(&self, cfg: &ModelConfig, w: LlamaWeights) -> Result<Vec<HostWeights>> {
        self.shard_ranks(cfg, w, 0..self.ranks())
    }

    /// The weights of the ranks in `which` only (an exporter that records rank 0's graphs needs
    /// no other rank's copies).
    pub fn shard_ranks(&self, cfg: &ModelConfig, w: LlamaWeights, which: Range<usize>) -> Result<Vec<HostWeights>> {
        if which.start >= which.end || which.end > self.ranks() {
            return Err(Error::Internal(format!("ranks {which:?} of {}", self.ranks())));
        }
        if self.ranks() == 1 {
            let head = match w.lm_head {
                Some(m) => HostHead::Own(HostLinear::one(m, None)),
                None => HostHead::Tied(0..cfg.vocab_size),
            };
            let layers = w.layers.into_iter().map(whole_layer).collect();
            return Ok(vec![HostWeights { embed: w.embed, layers, norm: w.norm, head }]);
        }
        let embed = w.embed.into_shared();
        let lm_head = w.lm_head.map(Matrix::into_shared);
        let mut ranks: Vec<HostWeights> = Vec::with_capacity(which.len());
        for s in &self.shapes[which.clone()] {
            let head = match &lm_head {
                Some(m) => HostHead::Own(HostLinear::one(rows(m, s.vocab.clone())?, None)),
                None => HostHead::Tied(s.vocab.clone()),
            };
            ranks.push(HostWeights {
                embed: rows(&embed, 0..embed.rows)?,
                layers: Vec::with_capacity(w.layers.len()),
                norm: w.norm.clone(),
                head,
            });
        }
        for l in w.layers {
            let l = shared_layer(l);
            for (r, out) in which.clone().zip(ranks.iter_mut()) {
                out.layers.push(self.layer_shard(cfg, &l, r)?);
            }
        }
        Ok(ranks)
    }

    fn layer_shard(&self, cfg: &ModelConfig, l: &LayerWeights, r: usize) -> Result<Layer<crate::model::host::Host>> {
        let s = &self.shapes[r];
        let hd = cfg.head_dim;
        let q_rows = r * s.heads * hd..(r + 1) * s.heads * hd;
        let kv_rows = self.kv_first[r] * hd..(self.kv_first[r] + s.kv_heads) * hd;
        let mlp_rows = r * s.intermediate..(r + 1) * s.intermediate;
        let row_part = |m: &Matrix, b: &Option<Vec<f32>>, range: &Range<usize>| -> Result<HostPart> {
            Ok(HostPart { w: rows(m, range.clone())?, bias: b.as_ref().map(|b| b[range.clone()].to_vec()) })
        };
        // Row-parallel outputs are summed over ranks: the bias is rank 0's; the other ranks add
        // zeros, so every rank runs the same ops (one graph for all ranks on Neuron).
        let col_part = |m: &Matrix, b: &Option<Vec<f32>>, range: &Range<usize>| -> Result<HostPart> {
            let bias = b.as_ref().map(|b| if r == 0 { b.clone() } else { vec![0.0; b.len()] });
            Ok(HostPart { w: m.column_copy(range.clone())?, bias })
        };
        Ok(Layer {
            input_norm: l.input_norm.clone(),
            qkv: HostLinear {
                parts: vec![
                    row_part(&l.q, &l.q_bias, &q_rows)?,
                    row_part(&l.k, &l.k_bias, &kv_rows)?,
                    row_part(&l.v, &l.v_bias, &kv_rows)?,
                ],
            },
            qk_norm: l.q_norm.clone().zip(l.k_norm.clone()),
            o: HostLinear { parts: vec![col_part(&l.o, &l.o_bias, &q_rows)?] },
            post_norm: l.post_norm.clone(),
            sandwich: l.attn_out_norm.clone().zip(l.mlp_out_norm.clone()),
            gate_up: HostLinear {
                parts: vec![row_part(&l.gate, &l.gate_bias, &mlp_rows)?, row_part(&l.up, &l.up_bias, &mlp_rows)?],
            },
            down: HostLinear { parts: vec![col_part(&l.down, &l.down_bias, &mlp_rows)?] },
        })
    }
}

/// The shape of the unsharded model (one rank).
pub fn whole_shape(cfg: &ModelConfig) -> RankShape {
    RankShape {
        rank: 0,
        ranks: 1,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        intermediate: cfg.intermediate_size,
        vocab: 0..cfg.vocab_size,
    }
}

fn divides(cfg: &ModelConfig, n: usize) -> bool {
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    n >= 1
        && nh % n == 0
        && cfg.intermediate_size % n == 0
        && nkv > 0
        && (nkv % n == 0 || n % nkv == 0)
        && cfg.vocab_size >= n
}

fn valid_degrees(cfg: &ModelConfig) -> String {
    (1..=MAX_TP_DEGREE.min(cfg.num_attention_heads)).filter(|&n| divides(cfg, n)).map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

fn rows(m: &Matrix, range: Range<usize>) -> Result<Matrix> {
    m.row_window(range.clone())
        .ok_or_else(|| Error::Internal(format!("rows {range:?} of a {}-row weight are not a window", m.rows)))
}

fn whole_layer(l: LayerWeights) -> Layer<crate::model::host::Host> {
    Layer {
        input_norm: l.input_norm,
        qkv: HostLinear {
            parts: vec![
                HostPart { w: l.q, bias: l.q_bias },
                HostPart { w: l.k, bias: l.k_bias },
                HostPart { w: l.v, bias: l.v_bias },
            ],
        },
        qk_norm: l.q_norm.zip(l.k_norm),
        o: HostLinear::one(l.o, l.o_bias),
        post_norm: l.post_norm,
        sandwich: l.attn_out_norm.zip(l.mlp_out_norm),
        gate_up: HostLinear { parts: vec![HostPart { w: l.gate, bias: l.gate_bias }, HostPart { w: l.up, bias: l.up_bias }] },
        down: HostLinear::one(l.down, l.down_bias),
    }
}

/// The layer with its row-split matrices in shareable storage (their shards are windows).
fn shared_layer(l: LayerWeights) -> LayerWeights {
    LayerWeights {
        q: l.q.into_shared(),
        k: l.k.into_shared(),
        v: l.v.into_shared(),
        gate: l.gate.into_shared(),
        up: l.up.into_shared(),
        ..l
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tensor::{Buf, Data};

    pub(crate) fn config(heads: usize, kv_heads: usize, tied: bool) -> ModelConfig {
        ModelConfig::from_json(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 4,
            "vocab_size": 10, "tie_word_embeddings": tied, "attention_bias": true,
        }))
        .unwrap()
    }

    /// A matrix whose element (r, c) is r * 1000 + c + salt, so every shard names its origin.
    fn m(rows: usize, cols: usize, salt: f32) -> Matrix {
        let v = (0..rows * cols).map(|i| ((i / cols) * 1000 + i % cols) as f32 + salt).collect();
        Matrix { rows, cols, data: Data::F32(Buf::Owned(v)) }
    }

    pub(crate) fn weights(cfg: &ModelConfig) -> LlamaWeights {
        let (h, q, kv, i) = (16, cfg.num_attention_heads * 4, cfg.num_key_value_heads * 4, 24);
        let bias = |n: usize| Some((0..n).map(|x| x as f32).collect::<Vec<_>>());
        LlamaWeights {
            embed: m(10, h, 0.5),
            layers: vec![LayerWeights {
                input_norm: vec![1.0; h],
                q: m(q, h, 0.1),
                k: m(kv, h, 0.2),
                v: m(kv, h, 0.3),
                o: m(h, q, 0.4),
                q_bias: bias(q),
                k_bias: bias(kv),
                v_bias: bias(kv),
                o_bias: bias(h),
                q_norm: None,
                k_norm: None,
                post_norm: vec![1.0; h],
                attn_out_norm: None,
                mlp_out_norm: None,
                gate: m(i, h, 0.6),
                up: m(i, h, 0.7),
                down: m(h, i, 0.8),
                gate_bias: None,
                up_bias: None,
                down_bias: None,
            }],
            norm: vec![1.0; h],
            lm_head: (!cfg.tie_word_embeddings).then(|| m(10, h, 0.9)),
        }
    }

    fn first(m: &Matrix) -> f32 {
        m.data.to_f32_vec()[0]
    }

    #[test]
    fn degrees_that_do_not_divide_the_heads_are_refused_naming_the_valid_ones() {
        let cfg = config(4, 2, false);
        for ok in [1, 2, 4] {
            assert!(TpPlan::new(&cfg, ok).is_ok(), "{ok}");
        }
        for bad in [0, 3, 5, 8, 65] {
            let msg = TpPlan::new(&cfg, bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(&format!("tp_degree={bad}")) && msg.contains("1, 2, 4"), "{msg}");
        }
        let msg = TpPlan::new(&cfg, 3).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("num_attention_heads=4") && msg.contains("num_key_value_heads=2"), "{msg}");
        // 6 query / 3 kv heads: 2 does not divide 3 kv heads and 3 is not a multiple of 2.
        assert!(TpPlan::new(&config(6, 3, false), 2).is_err());
    }

    #[test]
    fn ranks_hold_their_heads_rows_and_columns() {
        let cfg = config(4, 2, false);
        let plan = TpPlan::new(&cfg, 2).unwrap();
        let shards = plan.shard(&cfg, weights(&cfg)).unwrap();
        for (r, w) in shards.iter().enumerate() {
            let l = &w.layers[0];
            let [q, k, v] = &l.qkv.parts[..] else { panic!() };
            // Query heads 2r..2r+2 (rows 8r..), kv head r (rows 4r..), with their biases.
            assert_eq!((q.w.rows, first(&q.w)), (8, (8 * r * 1000) as f32 + 0.1));
            assert_eq!((k.w.rows, first(&k.w)), (4, (4 * r * 1000) as f32 + 0.2));
            assert_eq!((v.w.rows, first(&v.w)), (4, (4 * r * 1000) as f32 + 0.3));
            assert_eq!(q.bias.as_ref().unwrap()[0], (8 * r) as f32);
            // o: columns of those heads; its bias on rank 0 only (zeros elsewhere).
            let o = &l.o.parts[0];
            assert_eq!((o.w.rows, o.w.cols, first(&o.w)), (16, 8, (8 * r) as f32 + 0.4));
            assert_eq!(o.bias.as_ref().unwrap().iter().sum::<f32>(), if r == 0 { 120.0 } else { 0.0 });
            let down = &l.down.parts[0];
            assert_eq!((down.w.cols, first(&down.w)), (12, (12 * r) as f32 + 0.8));
            assert_eq!(l.gate_up.parts[1].w.rows, 12);
            // Replicated embedding; vocab rows 5r.. of the head.
            assert_eq!(w.embed.rows, 10);
            let HostHead::Own(head) = &w.head else { panic!() };
            assert_eq!((head.parts[0].w.rows, first(&head.parts[0].w)), (5, (5 * r * 1000) as f32 + 0.9));
        }
        assert_eq!(plan.shapes[1].vocab, 5..10);
    }

    #[test]
    fn gemma_norms_are_replicated_on_every_rank() {
        // q/k norms act per head (head_dim wide) and the sandwich norms on the all-reduced hidden
        // state: every rank needs the whole vector, never a shard of it.
        let cfg = config(4, 2, true);
        let mut w = weights(&cfg);
        let v = |n: usize, salt: f32| (0..n).map(|i| i as f32 + salt).collect::<Vec<_>>();
        let l = &mut w.layers[0];
        (l.q_norm, l.k_norm) = (Some(v(4, 0.1)), Some(v(4, 0.2)));
        (l.attn_out_norm, l.mlp_out_norm) = (Some(v(16, 0.3)), Some(v(16, 0.4)));
        let plan = TpPlan::new(&cfg, 2).unwrap();
        for s in plan.shard(&cfg, w).unwrap() {
            let l = &s.layers[0];
            assert_eq!(l.qk_norm, Some((v(4, 0.1), v(4, 0.2))));
            assert_eq!(l.sandwich, Some((v(16, 0.3), v(16, 0.4))));
            assert_eq!((l.input_norm.len(), l.post_norm.len(), s.norm.len()), (16, 16, 16));
        }
    }

    #[test]
    fn fewer_kv_heads_than_ranks_replicate_the_shared_head() {
        // 4 query heads, 1 kv head (MQA), 4 ranks: every rank holds kv head 0.
        let cfg = config(4, 1, true);
        let plan = TpPlan::new(&cfg, 4).unwrap();
        let shards = plan.shard(&cfg, weights(&cfg)).unwrap();
        for (r, w) in shards.iter().enumerate() {
            let [q, k, _] = &w.layers[0].qkv.parts[..] else { panic!() };
            assert_eq!(first(&q.w), (4 * r * 1000) as f32 + 0.1);
            assert_eq!((k.w.rows, first(&k.w)), (4, 0.2));
            assert!(matches!(&w.head, HostHead::Tied(rows) if rows.len() == if r < 3 { 3 } else { 1 }));
        }
        assert!(plan.shapes.iter().all(|s| s.kv_heads == 1 && s.heads == 1));
    }

    #[test]
    fn a_column_split_inside_a_quant_block_dequantizes_the_shard() {
        use crate::tensor::GgmlType;
        // Q8_0: 32 values per block of 34 bytes (f16 scale + 32 i8).
        let (rows, cols) = (2, 64);
        let mut bytes = Vec::new();
        for b in 0..rows * cols / 32 {
            bytes.extend_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
            bytes.extend((0..32).map(|i| (i + b) as i8 as u8));
        }
        let q = Matrix { rows, cols, data: Data::Quant { kind: GgmlType::Q8_0, bytes: Buf::Owned(bytes) } };
        let all = q.data.to_f32_vec();
        let aligned = q.column_copy(32..64).unwrap();
        assert!(aligned.data.is_quantized());
        let inside = q.column_copy(16..48).unwrap();
        assert!(!inside.data.is_quantized());
        for (m, from) in [(aligned, 32), (inside, 16)] {
            let got = m.data.to_f32_vec();
            for r in 0..rows {
                assert_eq!(&got[r * 32..(r + 1) * 32], &all[r * cols + from..r * cols + from + 32]);
            }
        }
    }
}
