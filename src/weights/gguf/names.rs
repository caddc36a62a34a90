//! llama.cpp tensor names <-> the HF names `weights::llama::load` asks for.

/// Which name table a file's architecture uses: Gemma's four norms per layer are named apart
/// from Llama's two (`ffn_norm` is Llama's post_attention_layernorm but Gemma's pre-MLP norm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Llama,
    Gemma,
}

impl Layout {
    pub fn of_arch(arch: &str) -> Layout {
        if arch.starts_with("gemma") {
            Layout::Gemma
        } else {
            Layout::Llama
        }
    }
}

/// `(hf_suffix, gguf_suffix)` inside a layer: `model.layers.N.{hf}` <-> `blk.N.{gguf}`.
const LAYER: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate_proj.bias", "ffn_gate.bias"),
    ("mlp.up_proj.bias", "ffn_up.bias"),
    ("mlp.down_proj.bias", "ffn_down.bias"),
];

/// The layer norms after attention and around the MLP, per layout (llama.cpp's gemma2/gemma3
/// converters: post_attention_norm, ffn_norm = pre_feedforward_layernorm, post_ffw_norm).
const LLAMA_NORMS: &[(&str, &str)] = &[("post_attention_layernorm.weight", "ffn_norm.weight")];
const GEMMA_NORMS: &[(&str, &str)] = &[
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
];

const GLOBAL: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Which rows a llama.cpp converter permuted (Q and K of llama-arch files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permuted {
    No,
    Query,
    Key,
}

/// The GGUF name for an HF name, and whether its rows carry llama.cpp's Q/K permutation
/// (the caller decides whether the architecture applies it).
pub fn gguf_name(hf: &str, layout: Layout) -> Option<(String, Permuted)> {
    if let Some((_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some((g.to_string(), Permuted::No));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, suffix) = rest.split_once('.')?;
    let layer: usize = idx.parse().ok()?;
    let norms = match layout {
        Layout::Llama => LLAMA_NORMS,
        Layout::Gemma => GEMMA_NORMS,
    };
    let (_, g) = LAYER.iter().chain(norms).find(|(h, _)| *h == suffix)?;
    let perm = match *g {
        "attn_q.weight" | "attn_q.bias" => Permuted::Query,
        "attn_k.weight" | "attn_k.bias" => Permuted::Key,
        _ => Permuted::No,
    };
    Some((format!("blk.{layer}.{g}"), perm))
}

/// `reverse_permute_into` a new buffer (tests).
#[cfg(test)]
pub fn reverse_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    let mut out = vec![0f32; w.len()];
    reverse_permute_into(w, rows, cols, n_head, &mut out)?;
    Some(out)
}

/// Undoes llama.cpp's `permute(w, n_head)` on the leading (row) axis: `rows` rows of `cols`
/// values each, grouped per head as (2, dim/2) -> (dim/2, 2) interleaved; as transformers'
/// `LlamaTensorProcessor._reverse_permute_weights` (reshape(n_head, dim, 2, ...).swapaxes(1, 2)).
/// Writes into a caller's buffer of `w.len()` values (loaders reserve it fallibly).
pub fn reverse_permute_into(w: &[f32], rows: usize, cols: usize, n_head: usize, out: &mut [f32]) -> Option<()> {
    let heads2 = n_head.checked_mul(2).filter(|&x| x != 0)?;
    if rows % heads2 != 0 || rows.checked_mul(cols) != Some(w.len()) || out.len() != w.len() {
        return None;
    }
    let dim = rows / n_head / 2;
    for h in 0..n_head {
        for a in 0..2 {
            for b in 0..dim {
                let dst = h * 2 * dim + a * dim + b;
                let src = h * 2 * dim + b * 2 + a;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight", Layout::Llama),
            Some(("blk.12.attn_q.weight".into(), Permuted::Query))
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight", Layout::Llama),
            Some(("blk.0.ffn_down.weight".into(), Permuted::No))
        );
        assert_eq!(
            gguf_name("lm_head.weight", Layout::Llama),
            Some(("output.weight".into(), Permuted::No))
        );
        assert_eq!(gguf_name("model.layers.x.mlp.down_proj.weight", Layout::Llama), None);
        let norm = |hf: &str, layout| gguf_name(&format!("model.layers.3.{hf}"), layout).map(|(g, _)| g);
        assert_eq!(norm("post_attention_layernorm.weight", Layout::Llama).as_deref(), Some("blk.3.ffn_norm.weight"));
        assert_eq!(norm("post_attention_layernorm.weight", Layout::Gemma).as_deref(), Some("blk.3.post_attention_norm.weight"));
        assert_eq!(norm("pre_feedforward_layernorm.weight", Layout::Gemma).as_deref(), Some("blk.3.ffn_norm.weight"));
        assert_eq!(norm("post_feedforward_layernorm.weight", Layout::Gemma).as_deref(), Some("blk.3.post_ffw_norm.weight"));
        assert_eq!(norm("pre_feedforward_layernorm.weight", Layout::Llama), None);
    }

    #[test]
    fn reverse_permute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, dim, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, dim, cols) = (3usize, 4usize, 2usize);
        let rows = n_head * 2 * dim;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut gg = vec![0f32; hf.len()];
        for h in 0..n_head {
            for a in 0..2 {
                for b in 0..dim {
                    let src = h * 2 * dim + a * dim + b; // hf row (h, a, b)
                    let dst = h * 2 * dim + b * 2 + a; // permuted row (h, b, a)
                    gg[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(reverse_permute(&gg, rows, cols, n_head).unwrap(), hf);
    }
}
