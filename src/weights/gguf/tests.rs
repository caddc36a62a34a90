//! Reader and adapter tests on small GGUF files written here. Dequantization parity with the gguf
//! Python package is tested in tests/test_gguf.py.

use super::*;
use crate::weights::TensorSource;

/// Minimal GGUF v3 writer: metadata as (key, type, payload bytes); tensors as (name, dims, type, bytes).
fn write_gguf(kv: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, ty, payload) in kv {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(payload);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, _, data) in tensors {
        b.extend_from_slice(data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

fn s(v: &str) -> Vec<u8> {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(v.as_bytes());
    b
}
fn u32v(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
fn f32v(v: f32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
fn str_array(items: &[&str]) -> Vec<u8> {
    let mut b = 8u32.to_le_bytes().to_vec();
    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        b.extend_from_slice(&s(i));
    }
    b
}
fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("kvgen-gguf-{}-{name}.gguf", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A 2-layer llama file, hidden 8, 2 heads of 4, 1 kv head, ffn 16, vocab 5, all F32.
fn tiny_llama() -> (Vec<u8>, Vec<f32>) {
    let kv = vec![
        ("general.architecture", 8, s("llama")),
        ("general.name", 8, s("tiny")),
        ("llama.block_count", 4, u32v(2)),
        ("llama.context_length", 4, u32v(64)),
        ("llama.embedding_length", 4, u32v(8)),
        ("llama.feed_forward_length", 4, u32v(16)),
        ("llama.attention.head_count", 4, u32v(2)),
        ("llama.attention.head_count_kv", 4, u32v(1)),
        ("llama.rope.freq_base", 6, f32v(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", 6, f32v(1e-5)),
        ("tokenizer.ggml.model", 8, s("gpt2")),
        (
            "tokenizer.ggml.tokens",
            9,
            str_array(&["a", "b", "ab", "<|endoftext|>", "\u{120}", "\u{120}a"]),
        ),
        ("tokenizer.ggml.merges", 9, str_array(&["a b", "\u{120} a"])),
        ("tokenizer.ggml.eos_token_id", 4, u32v(3)),
    ];
    let q: Vec<f32> = (0..64).map(|x| x as f32).collect();
    let mut tensors = vec![("token_embd.weight", vec![8, 6], 0u32, f32_bytes(&[0.5; 48]))];
    let names: Vec<String> = (0..2)
        .flat_map(|i| {
            [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ]
            .iter()
            .map(move |n| format!("blk.{i}.{n}.weight"))
        })
        .collect();
    let leaked: Vec<&'static str> = names
        .into_iter()
        .map(|n| &*Box::leak(n.into_boxed_str()))
        .collect();
    for n in leaked {
        let dims: Vec<u64> = match n.rsplit('.').nth(1).unwrap_or("") {
            "attn_norm" | "ffn_norm" => vec![8],
            "attn_q" | "attn_output" => vec![8, 8],
            "attn_k" | "attn_v" => vec![8, 4],
            "ffn_gate" | "ffn_up" => vec![8, 16],
            _ => vec![16, 8],
        };
        let count: u64 = dims.iter().product();
        let data = if n.ends_with("attn_q.weight") {
            f32_bytes(&q)
        } else {
            f32_bytes(&vec![0.25; count as usize])
        };
        tensors.push((n, dims, 0, data));
    }
    tensors.push(("output_norm.weight", vec![8], 0, f32_bytes(&[1.0; 8])));
    (write_gguf(&kv, &tensors), q)
}

#[test]
fn reads_metadata_tensors_and_config() {
    let (bytes, q) = tiny_llama();
    let p = tmp("tiny", &bytes);
    let src = GgufSource::open(&p).unwrap();
    assert_eq!(src.file.version, 3);
    assert_eq!(
        src.file.get("llama.block_count").and_then(Value::as_u64),
        Some(2)
    );
    assert_eq!(
        src.file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len()),
        Some(6)
    );
    let cfg = src.config_json().unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["vocab_size"], 6);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["num_key_value_heads"], 1);
    let mc = crate::config::ModelConfig::from_json(cfg).unwrap();
    assert_eq!(
        (mc.head_dim, mc.num_hidden_layers, mc.vocab_size),
        (4, 2, 6)
    );
    // HF shape is GGUF dims reversed; Q rows come back un-permuted.
    let t = src.get("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(t.shape, vec![8, 8]);
    let v = t.data.to_f32_vec();
    let expect = names::reverse_permute(&q, 8, 8, 2).unwrap();
    assert_eq!(v, expect);
    assert_ne!(v, q);
    assert!(src.contains("model.embed_tokens.weight"));
    assert!(!src.contains("lm_head.weight"));
    let w = crate::weights::llama::load(&src, &mc, crate::tensor::DType::F32, &mut |_, _| {}).unwrap();
    assert!(w.lm_head.is_none());
    let tok = crate::tokenizer::Tokenizer::from_gguf(&src.file).unwrap();
    assert_eq!(tok.encode("ab a", false).unwrap(), vec![2, 5]);
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    let _ = std::fs::remove_file(&p);
}

#[test]
fn truncated_and_corrupt_files_error_without_panic() {
    let (bytes, _) = tiny_llama();
    // Every cut inside the header and the tensor data must give a BadModelFile naming the file.
    let p = tmp("cut", &[]);
    for cut in (0..bytes.len() - 1).step_by(7) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match GgufFile::open(&p) {
            Err(Error::BadModelFile { path, message }) => {
                assert_eq!(path, p);
                assert!(!message.is_empty());
            }
            Err(other) => panic!("cut {cut}: unexpected error {other}"),
            Ok(_) => panic!("cut {cut}: a truncated file parsed"),
        }
    }
    let mut bad = bytes.clone();
    bad[0] = b'X';
    std::fs::write(&p, &bad).unwrap();
    assert!(GgufFile::open(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("not a GGUF file"));
    let mut bad = bytes.clone();
    bad[4] = 1; // version 1
    std::fs::write(&p, &bad).unwrap();
    assert!(GgufFile::open(&p)
        .err()
        .unwrap()
        .to_string()
        .contains("version 1"));
    let mut bad = bytes.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // absurd tensor count
    std::fs::write(&p, &bad).unwrap();
    assert!(GgufFile::open(&p).is_err());
    let _ = std::fs::remove_file(&p);
}

#[test]
fn unsupported_type_is_a_clear_error() {
    let kv = vec![("general.architecture", 8, s("llama"))];
    // Q2_K (type 10): 84 bytes per 256 values.
    let tensors = vec![("token_embd.weight", vec![256, 1], 10u32, vec![0u8; 84])];
    let p = tmp("q2k", &write_gguf(&kv, &tensors));
    let src = GgufSource::open(&p).unwrap();
    let err = src
        .get("model.embed_tokens.weight")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("Q2_K") && err.contains("token_embd.weight"),
        "{err}"
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn dequantizes_q8_0_and_q4_1_blocks() {
    use half::f16;
    let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let y = quant::dequantize(GgmlType::Q8_0, &b, 32).unwrap();
    assert_eq!(y[0], -8.0);
    assert_eq!(y[31], 7.5);
    let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
    b.extend(f16::from_f32(-1.0).to_le_bytes());
    b.extend((0..16).map(|i| (i as u8) | ((15 - i as u8) << 4)));
    let y = quant::dequantize(GgmlType::Q4_1, &b, 32).unwrap();
    assert_eq!((y[0], y[1], y[16], y[31]), (-1.0, 1.0, 29.0, -1.0));
    assert!(quant::dequantize(GgmlType::Q4_1, &b[..10], 32).is_none());
}
