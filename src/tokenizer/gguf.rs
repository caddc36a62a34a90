//! A tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, built the way transformers 5.x's
//! `convert_gguf_tokenizer` builds it (integrations/gguf/gguf_tokenizer_mapping.py): byte-level BPE
//! (`gpt2`, as `GPT2Tokenizer`) or SentencePiece BPE (`llama`, as `LlamaTokenizer`), control tokens
//! as special added tokens, user-defined ones as plain added tokens, the split regex named by
//! `tokenizer.ggml.pre`, and the special tokens / add_bos / chat template as tokenizer_config.
//! We assemble tokenizer.json and let the `tokenizers` crate parse it, so the pipeline is the same
//! object transformers serializes.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value as Json};

use super::Tokenizer;
use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, Layout, Value};

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// transformers' `GGUF_PRE_TOKENIZER_SPLITS` (qwen35 omitted: its regex is not in kvgen yet).
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte -> printable character table.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

struct Meta<'a> {
    file: &'a GgufFile,
}

impl<'a> Meta<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.file.get(&format!("tokenizer.{k}"))
    }
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::bad_file(&self.file.path, msg.into())
    }
    fn strings(&self, k: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.bad(format!("tokenizer.{k} is not an array")))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .ok_or_else(|| self.bad(format!("tokenizer.{k} holds a non-string")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// Per-token numbers (`tokenizer.{k}`): an array as long as the token list, every item a number.
    fn numbers<T>(&self, k: &str, n_tokens: usize, read: fn(&Value) -> Option<T>) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let arr = v.as_array().ok_or_else(|| self.bad(format!("tokenizer.{k} is not an array")))?;
        self.check_len(k, arr.len(), Some(n_tokens))?;
        arr.iter()
            .map(|x| read(x).ok_or_else(|| self.bad(format!("tokenizer.{k} holds {x:?}, not a number"))))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// A tokenizer array's length: within the vocabulary bound and, when `want` is given, equal to
    /// the token list's.
    fn check_len(&self, k: &str, len: usize, want: Option<usize>) -> Result<()> {
        let limit = crate::config::limits::MAX_VOCAB;
        if len as u64 > limit {
            return Err(self.bad(format!(
                "tokenizer.{k} has {len} entries, above kvgen's vocabulary limit of {limit} (Gemma 3 has 262144); the file is corrupt"
            )));
        }
        match want {
            Some(n) if n != len => Err(self.bad(format!(
                "tokenizer.{k} has {len} entries but tokenizer.ggml.tokens has {n}; they must match one to one (the file is corrupt)"
            ))),
            _ => Ok(()),
        }
    }
    fn id(&self, k: &str) -> Option<usize> {
        self.get(k).and_then(Value::as_u64).map(|v| v as usize)
    }
}

/// The parts that differ between byte-level and SentencePiece vocabularies.
struct Pipeline {
    /// Tokens as the BPE model spells them.
    vocab: Vec<String>,
    merges: Vec<(String, String)>,
    normalizer: Json,
    pre_tok: Json,
    decoder: Json,
    /// The BPE model's unk token (GemmaTokenizer sets one; the others leave it unset).
    unk: Json,
    /// Special tokens the transformers builder class adds by default.
    defaults: &'static [&'static str],
    byte_level: bool,
    spm: bool,
}

/// The `tokenizers` pipeline plus the tokenizer_config-like object (special tokens, add_bos_token,
/// chat_template) for a GGUF file.
pub fn build_parts(file: &GgufFile) -> Result<(tokenizers::Tokenizer, Json)> {
    let m = Meta { file };
    let model = m
        .get("ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| m.bad("GGUF has no tokenizer (tokenizer.ggml.model missing)"))?;
    let tokens = m
        .strings("ggml.tokens")?
        .ok_or_else(|| m.bad("GGUF lacks tokenizer.ggml.tokens"))?;
    m.check_len("ggml.tokens", tokens.len(), None)?;
    let types: Vec<i64> = m.numbers("ggml.token_type", tokens.len(), Value::as_i64)?.unwrap_or_default();
    let merges_meta = m.strings("ggml.merges")?;
    if let Some(mg) = &merges_meta {
        m.check_len("ggml.merges", mg.len(), None)?;
    }
    let pre = m.get("ggml.pre").and_then(Value::as_str);

    let mut config = Map::new();
    if let Some(t) = m.get("chat_template").and_then(Value::as_str) {
        config.insert("chat_template".into(), json!(t));
    }
    let mut add_bos = m.get("ggml.add_bos_token").and_then(Value::as_bool);
    let add_eos = m.get("ggml.add_eos_token").and_then(Value::as_bool);
    if model == "llama" && add_bos.is_none() {
        // Older files have no flag; llama.cpp adds BOS to a sentencepiece vocabulary by default.
        add_bos = Some(true);
    }
    if let Some(b) = add_bos {
        config.insert("add_bos_token".into(), json!(b));
    }
    if let Some(b) = add_eos {
        config.insert("add_eos_token".into(), json!(b));
    }
    for (name, key) in [
        ("bos_token", "ggml.bos_token_id"),
        ("eos_token", "ggml.eos_token_id"),
        ("unk_token", "ggml.unknown_token_id"),
        ("pad_token", "ggml.padding_token_id"),
    ] {
        let tok = match m.id(key) {
            Some(id) => Json::String(
                tokens
                    .get(id)
                    .ok_or_else(|| {
                        m.bad(format!(
                            "tokenizer.{key} = {id} is outside the {} tokens",
                            tokens.len()
                        ))
                    })?
                    .to_string(),
            ),
            None => Json::Null,
        };
        config.insert(name.into(), tok);
    }

    // transformers builds Gemma files' sentencepiece vocabularies with GemmaTokenizer (its
    // GGUF_SENTENCEPIECE_BUILDERS), other "llama" files with LlamaTokenizer.
    let gemma = file.architecture().is_ok_and(|a| Layout::of_arch(a) == Layout::Gemma);
    let Pipeline { vocab, merges, normalizer, pre_tok, decoder, unk, defaults, byte_level, spm } = match model {
            "gpt2" => {
                let spell = bytes_to_unicode();
                let alphabet: HashSet<char> = spell.iter().copied().collect();
                let vocab: Vec<String> = tokens
                    .iter()
                    .map(|t| {
                        if t.chars().all(|c| alphabet.contains(&c)) {
                            t.to_string()
                        } else {
                            t.bytes().map(|b| spell[b as usize]).collect()
                        }
                    })
                    .collect();
                let merges = split_merges(&m, merges_meta.as_deref())?.unwrap_or_default();
                let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
                let pre_tok = match pre.and_then(split_regex) {
                    Some(re) => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
                    ]}),
                    None => byte_level,
                };
                let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
                Pipeline {
                    vocab,
                    merges,
                    normalizer: Json::Null,
                    pre_tok,
                    decoder,
                    unk: Json::Null,
                    defaults: &["<|endoftext|>"],
                    byte_level: true,
                    spm: false,
                }
            }
            "llama" if gemma => {
                // Gemma files store a token of 2+ spaces as spaces, GemmaTokenizer looks it up as "▁"s;
                // their scores do not follow the merge order, the file order does (transformers'
                // `gemma_tokenizer`).
                let vocab: Vec<String> = tokens
                    .iter()
                    .map(|t| if t.contains(' ') && t.trim().is_empty() { "\u{2581}".repeat(t.chars().count()) } else { t.to_string() })
                    .collect();
                let merges = match split_merges(&m, merges_meta.as_deref())? {
                    Some(mg) => mg,
                    None => {
                        let spelled: Vec<&str> = vocab.iter().map(String::as_str).collect();
                        let file_order: Vec<f64> = (0..vocab.len()).map(|i| -(i as f64)).collect();
                        generated_merges(&m, &spelled, &file_order)?
                    }
                };
                Pipeline {
                    vocab,
                    merges,
                    normalizer: json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
                    pre_tok: json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
                    decoder: json!({"type": "Sequence", "decoders": [
                        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                        {"type": "ByteFallback"},
                        {"type": "Fuse"}
                    ]}),
                    unk: json!("<unk>"),
                    defaults: &["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"],
                    byte_level: false,
                    spm: true,
                }
            }
            "llama" => {
                let vocab: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
                let merges = match split_merges(&m, merges_meta.as_deref())? {
                    Some(mg) => mg,
                    None => {
                        let scores = m.numbers("ggml.scores", tokens.len(), Value::as_f64)?.ok_or_else(|| {
                            m.bad("sentencepiece GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
                        })?;
                        generated_merges(&m, &tokens, &scores)?
                    }
                };
                let pre_tok = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
                let decoder = json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}
                ]});
                Pipeline {
                    vocab,
                    merges,
                    normalizer: Json::Null,
                    pre_tok,
                    decoder,
                    unk: Json::Null,
                    defaults: &["<s>", "</s>", "<unk>"],
                    byte_level: false,
                    spm: true,
                }
            }
            other => {
                return Err(Error::bad_file(
                    &file.path,
                    format!("GGUF tokenizer model {other:?} is not supported; kvgen reads \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece)"),
                ))
            }
        };

    // Later duplicates win, as in a Python dict comprehension.
    let mut vocab_map = Map::new();
    for (i, t) in vocab.iter().enumerate() {
        vocab_map.insert(t.clone(), json!(i));
    }
    let merges_json: Vec<Json> = merges.iter().map(|(a, b)| json!([a, b])).collect();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tok,
        "post_processor": null,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": if spm { Json::Null } else { json!("") },
            "end_of_word_suffix": if spm { Json::Null } else { json!("") },
            "fuse_unk": spm,
            "byte_fallback": spm,
            "ignore_merges": false,
            "vocab": Json::Object(vocab_map),
            "merges": merges_json,
        }
    });
    let mut inner = tokenizers::Tokenizer::from_bytes(
        serde_json::to_vec(&tj).map_err(|e| Error::Internal(e.to_string()))?,
    )
    .map_err(|e| {
        m.bad(format!(
            "cannot build the tokenizer from tokenizer.ggml.*: {e}"
        ))
    })?;

    // The builder class's own default special tokens (GPT2Tokenizer / LlamaTokenizer __init__).
    let special = |t: &str| tokenizers::AddedToken::from(t.to_string(), true).normalized(false);
    let defaults: Vec<tokenizers::AddedToken> = defaults.iter().map(|t| special(t)).collect();
    inner.add_special_tokens(&defaults);
    // CONTROL tokens; in a byte-level vocabulary one spelled outside the byte alphabet is a
    // llama.cpp mislabel that transformers skips.
    let alphabet: Option<HashSet<char>> =
        byte_level.then(|| bytes_to_unicode().iter().copied().collect());
    let control: Vec<tokenizers::AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(t, &ty)| {
            ty == CONTROL
                && alphabet
                    .as_ref()
                    .map_or(true, |a| t.chars().all(|c| a.contains(&c)))
        })
        .map(|(t, _)| special(t))
        .collect();
    if !control.is_empty() {
        inner.add_special_tokens(&control);
    }
    let user: Vec<tokenizers::AddedToken> = tokens
        .iter()
        .zip(types.iter())
        .filter(|(t, &ty)| ty == USER_DEFINED && inner.token_to_id(t).is_some())
        .map(|(t, _)| tokenizers::AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    if !user.is_empty() {
        inner.add_tokens(&user);
    }

    // transformers' update_post_processor: BOS/EOS per add_bos_token / add_eos_token.
    let tok_of = |k: &str| config.get(k).and_then(Json::as_str).map(str::to_string);
    let (bos, eos) = (tok_of("bos_token"), tok_of("eos_token"));
    let use_bos = add_bos.unwrap_or(false) && bos.is_some();
    let use_eos = add_eos.unwrap_or(false) && eos.is_some();
    let mut specials = Map::new();
    let part = |seq: &str, type_id: u32| -> Vec<Json> {
        let mut out = Vec::new();
        if use_bos {
            out.push(json!({"SpecialToken": {"id": bos.as_deref().unwrap_or_default(), "type_id": type_id}}));
        }
        out.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if use_eos {
            out.push(json!({"SpecialToken": {"id": eos.as_deref().unwrap_or_default(), "type_id": type_id}}));
        }
        out
    };
    let single = part("A", 0);
    let pair: Vec<Json> = part("A", 0).into_iter().chain(part("B", 1)).collect();
    for (on, t) in [(use_bos, &bos), (use_eos, &eos)] {
        if let (true, Some(t)) = (on, t) {
            let id = inner
                .token_to_id(t)
                .ok_or_else(|| m.bad(format!("special token {t:?} has no id")))?;
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
    }
    let pp: tokenizers::processors::PostProcessorWrapper =
        serde_json::from_value(json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}))
            .map_err(|e| Error::Internal(format!("post-processor: {e}")))?;
    inner.with_post_processor(Some(pp));
    Ok((inner, Json::Object(config)))
}

/// Sentencepiece merges rebuilt from the vocabulary, ranked by `scores` (see `generate_merges`).
fn generated_merges(m: &Meta, tokens: &[&str], scores: &[f64]) -> Result<Vec<(String, String)>> {
    generate_merges(tokens, scores, MAX_GENERATED_MERGES).ok_or_else(|| {
        m.bad(format!(
            "the sentencepiece vocabulary yields more than {MAX_GENERATED_MERGES} merges (real ones: a few \
             million at most); the file is corrupt"
        ))
    })
}

/// `tokenizer.ggml.merges` ("a b" strings) as pairs; None when the file has none.
fn split_merges(m: &Meta, merges: Option<&[&str]>) -> Result<Option<Vec<(String, String)>>> {
    let Some(merges) = merges else {
        return Ok(None);
    };
    merges
        .iter()
        .map(|s| {
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    m.bad(format!(
                        "tokenizer.ggml.merges entry {s:?} is not \"left right\""
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two
/// tokens, best score first (ties: shorter left, then shorter right, then file order). None when
/// there would be more than `limit`.
/// Sentencepiece merges generated from scores may not exceed this (each is ~40 bytes while sorted).
const MAX_GENERATED_MERGES: usize = 1 << 26;

pub fn generate_merges(tokens: &[&str], scores: &[f64], limit: usize) -> Option<Vec<(String, String)>> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if ids.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, scores.get(i).copied().unwrap_or(0.0));
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let s = score[t];
        let mut local: Vec<(&str, &str)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .collect();
        local.sort_by_key(|(l, r)| (ids[l], ids[r]));
        if merges.len() + local.len() > limit || merges.try_reserve(local.len()).is_err() {
            return None;
        }
        merges.extend(local.into_iter().map(|(l, r)| (l, r, s)));
    }
    // Python's sorted(..., reverse=True) is stable: equal keys keep their order.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.0.partial_cmp(&ka.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    Some(
        merges
            .into_iter()
            .map(|(l, r, _)| (l.to_string(), r.to_string()))
            .collect(),
    )
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes (ids equal transformers'
    /// `AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
        let (inner, config) = build_parts(file)?;
        let mut t = Tokenizer::from_tokenizer(inner, &config).map_err(|e| match e {
            Error::Tokenizer(msg) | Error::InvalidInput(msg) => Error::bad_file(&file.path, msg),
            other => other,
        })?;
        t.source = Some(file.path.clone());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], '\u{120}');
        assert_eq!(t[b'\n' as usize], '\u{10a}');
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t.iter().collect::<HashSet<_>>().len(), 256);
    }

    #[test]
    fn merges_from_scores() {
        let toks = ["a", "b", "ab", "c", "abc", "bc"];
        let scores = [0.0, 0.0, -1.0, 0.0, -3.0, -2.0];
        let m = generate_merges(&toks, &scores, 100).unwrap_or_default();
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(
            pairs,
            vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        );
    }
}
