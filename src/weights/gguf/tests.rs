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

type Kv = Vec<(&'static str, u32, Vec<u8>)>;

/// A 2-layer llama file, hidden 8, 2 heads of 4, 1 kv head, ffn 16, vocab 5, all F32.
fn tiny_llama() -> (Vec<u8>, Vec<f32>) {
    tiny_llama_with(|_| {})
}

/// `tiny_llama` with its metadata edited first (see `set`).
fn tiny_llama_with(edit: impl FnOnce(&mut Kv)) -> (Vec<u8>, Vec<f32>) {
    let mut kv: Kv = vec![
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
    edit(&mut kv);
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

// ------------------------------------------------------------------ malformed headers and metadata

/// Replaces (or adds) one metadata entry.
fn set(kv: &mut Kv, key: &'static str, ty: u32, payload: Vec<u8>) {
    kv.retain(|(k, _, _)| *k != key);
    kv.push((key, ty, payload));
}
fn u64v(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
/// An array header: element type, then count (the items follow, or do not).
fn array_head(ty: u32, n: u64) -> Vec<u8> {
    let mut b = ty.to_le_bytes().to_vec();
    b.extend_from_slice(&n.to_le_bytes());
    b
}

/// The BadModelFile message of opening `bytes` (with the given header budget), or a panic
/// saying what happened instead.
fn open_err(name: &str, bytes: &[u8], budget: usize) -> String {
    let p = tmp(name, bytes);
    let r = GgufFile::open_with_budget(&p, budget);
    let _ = std::fs::remove_file(&p);
    match r {
        Err(Error::BadModelFile { message, .. }) => message,
        Err(other) => panic!("{name}: expected BadModelFile, got {other:?}"),
        Ok(_) => panic!("{name}: parsed"),
    }
}

const BIG: usize = 1 << 30;

#[test]
fn huge_counts_and_lengths_are_errors() {
    let meta = |payload: Vec<u8>, ty: u32| write_gguf(&[("general.architecture", 8, s("llama")), ("x", ty, payload)], &[]);
    // Array counts the remaining bytes cannot hold, for flat and nested item types.
    for (ty, n) in [(0u32, u64::MAX), (0, 1 << 40), (8, 1 << 20), (9, 1 << 20), (12, 1 << 20)] {
        let m = open_err("array-count", &meta(array_head(ty, n), 9), BIG);
        assert!(m.contains(&n.to_string()) && m.contains("remaining"), "{m}");
    }
    // A string length beyond the file.
    let m = open_err("string-len", &meta(u64v(1 << 62), 8), BIG);
    assert!(m.contains(&(1u64 << 62).to_string()), "{m}");
    // Key length beyond the file.
    let mut b = write_gguf(&[("general.architecture", 8, s("llama"))], &[]);
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_err("key-len", &b, BIG).contains("metadata key #0"));
    // tensor_count / metadata_kv_count beyond the file, and above the count limit.
    for (at, what) in [(8usize, "tensor_count"), (16, "metadata_kv_count")] {
        for n in [u64::MAX, 1 << 40, 1 << 21] {
            let mut b = write_gguf(&[("general.architecture", 8, s("llama"))], &[]);
            b[at..at + 8].copy_from_slice(&n.to_le_bytes());
            let m = open_err(what, &b, BIG);
            assert!(m.contains(what), "{what} = {n}: {m}");
        }
    }
}

#[test]
fn nested_arrays_count_their_headers_and_depth() {
    // 100 nested arrays claim 100 x 12 bytes; the 1000 bytes that follow can hold 8-byte items
    // (the old bound) but not 12-byte ones.
    let mut payload = array_head(9, 100);
    payload.extend(vec![0u8; 1000]);
    let b = write_gguf(&[("x", 9, payload)], &[]);
    assert!(open_err("nested-count", &b, BIG).contains("at least 12 bytes"));
    // Arrays four deep.
    let mut payload = Vec::new();
    for _ in 0..4 {
        payload.extend(array_head(9, 1));
    }
    payload.extend(array_head(4, 0));
    let b = write_gguf(&[("x", 9, payload)], &[]);
    assert!(open_err("nested-deep", &b, BIG).contains("nested"));
    // Three deep is fine.
    let mut payload = Vec::new();
    for _ in 0..2 {
        payload.extend(array_head(9, 1));
    }
    payload.extend(array_head(4, 1));
    payload.extend(u32v(7));
    let p = tmp("nested-ok", &write_gguf(&[("x", 9, payload)], &[]));
    let f = GgufFile::open(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    assert_eq!(f.get("x"), Some(&Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::U32(7)])])])));
}

#[test]
fn metadata_memory_is_bounded() {
    // 100k u8 items are 100 kB on disk and 3.2 MB as values: over a 1 MB budget.
    let mut payload = array_head(0, 100_000);
    payload.extend(vec![1u8; 100_000]);
    let b = write_gguf(&[("x", 9, payload)], &[]);
    let m = open_err("budget", &b, 1 << 20);
    assert!(m.contains("in memory") && m.contains("`x`"), "{m}");
    // The same file within the real budget parses.
    let p = tmp("budget-ok", &b);
    assert_eq!(GgufFile::open(&p).unwrap().get("x").and_then(Value::as_array).map(<[Value]>::len), Some(100_000));
    let _ = std::fs::remove_file(&p);
}

#[test]
fn bad_tensor_infos_are_errors() {
    let kv = [("general.architecture", 8u32, s("llama"))];
    let one = |dims: Vec<u64>, ty: u32, data: Vec<u8>| write_gguf(&kv, &[("t", dims, ty, data)]);
    // Element count overflowing u64.
    let m = open_err("dims-overflow", &one(vec![1 << 32, 1 << 32, 1 << 32], 0, vec![0; 32]), BIG);
    assert!(m.contains("overflows"), "{m}");
    // A huge but representable size: past the end of the file.
    let m = open_err("dims-huge", &one(vec![1 << 30, 1 << 30], 0, vec![0; 32]), BIG);
    assert!(m.contains("runs past the end"), "{m}");
    // n_dims 0 and 5.
    for nd in [0u32, 5, u32::MAX] {
        let mut b = one(vec![8], 0, vec![0; 32]);
        // After magic, version, counts, the kv (8+20 key, 4 type, 8+5 value) and the name (8+1).
        let at = 24 + (8 + 20) + 4 + (8 + 5) + (8 + 1);
        b[at..at + 4].copy_from_slice(&nd.to_le_bytes());
        let m = open_err("n-dims", &b, BIG);
        assert!(m.contains("dimensions"), "{nd}: {m}");
    }
    // Offset past the end (aligned) and unaligned.
    let mut b = one(vec![8], 0, vec![0; 32]);
    let at = 24 + (8 + 20) + 4 + (8 + 5) + (8 + 1) + 4 + 8 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err("offset", &b, BIG).contains("runs past the end"));
    b[at..at + 8].copy_from_slice(&3u64.to_le_bytes());
    assert!(open_err("offset-unaligned", &b, BIG).contains("aligned"));
}

/// The error of loading a tiny llama whose metadata `edit` changed, as the engine does:
/// open, config, weights, tokenizer.
fn load_err(name: &str, edit: impl FnOnce(&mut Kv)) -> Error {
    let (bytes, _) = tiny_llama_with(edit);
    let p = tmp(name, &bytes);
    let r = (|| {
        let src = GgufSource::open(&p)?;
        let cfg = model_config(&src.file, src.config_json()?)?;
        crate::weights::llama::load(&src, &cfg, crate::tensor::DType::F32, &mut |_, _| {})?;
        crate::tokenizer::Tokenizer::from_gguf(&src.file)
    })();
    let _ = std::fs::remove_file(&p);
    match r {
        Err(e) => e,
        Ok(_) => panic!("{name}: loaded"),
    }
}

fn bad_message(e: Error) -> String {
    match e {
        Error::BadModelFile { message, .. } => message,
        other => panic!("expected BadModelFile, got {other:?}"),
    }
}

#[test]
fn huge_hyperparameters_are_bounded_by_the_config() {
    for (key, ty, payload, field) in [
        ("llama.block_count", 10u32, u64v(1_000_000_000_000), "num_hidden_layers"),
        ("llama.embedding_length", 10, u64v(1 << 40), "hidden_size"),
        ("llama.feed_forward_length", 10, u64v(u64::MAX), "intermediate_size"),
        ("llama.attention.head_count", 4, u32v(0), "num_attention_heads"),
        ("llama.context_length", 10, u64v(1 << 50), "max_position_embeddings"),
        ("llama.attention.key_length", 4, u32v(1 << 30), "head_dim"),
    ] {
        let m = bad_message(load_err(key, |kv| set(kv, key, ty, payload)));
        assert!(m.contains(field) && m.contains(key) && m.contains("re-convert"), "{key}: {m}");
    }
    // A negative count is not "absent".
    let m = bad_message(load_err("neg", |kv| set(kv, "llama.block_count", 5, (-1i32).to_le_bytes().to_vec())));
    assert!(m.contains("llama.block_count") && m.contains("non-negative"), "{m}");
}

#[test]
fn tokenizer_arrays_must_agree() {
    let m = bad_message(load_err("types", |kv| {
        let mut p = array_head(5, 2);
        p.extend([1i32, 1].iter().flat_map(|x| x.to_le_bytes()));
        set(kv, "tokenizer.ggml.token_type", 9, p)
    }));
    assert!(m.contains("token_type has 2 entries") && m.contains("has 6"), "{m}");
    let m = bad_message(load_err("scores", |kv| {
        set(kv, "tokenizer.ggml.model", 8, s("llama"));
        kv.retain(|(k, _, _)| *k != "tokenizer.ggml.merges");
        let mut p = array_head(6, 7);
        p.extend(f32_bytes(&[0.0; 7]));
        set(kv, "tokenizer.ggml.scores", 9, p)
    }));
    assert!(m.contains("scores has 7 entries"), "{m}");
    let m = bad_message(load_err("types-not-int", |kv| set(kv, "tokenizer.ggml.token_type", 9, str_array(&["a"; 6]))));
    assert!(m.contains("not a number"), "{m}");
}
