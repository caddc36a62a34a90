//! The tokenizer layer: HF `tokenizer.json` through the `tokenizers` crate, plus the
//! `tokenizer_config.json` settings (special tokens, added tokens, chat templates, padding side)
//! interpreted the way transformers 5.x's fast tokenizer (`TokenizersBackend`) does, so ids, text
//! and chat prompts equal `AutoTokenizer.from_pretrained(dir)` for the same files.

pub mod chat_template;
pub mod gguf;
pub mod special;

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
pub use chat_template::ChatTemplates;
pub use special::{SpecialTokens, TokenSpec, NAMED_SPECIAL_TOKENS};

/// HF's `VERY_LARGE_INTEGER` (`int(1e30)`), the `model_max_length` when none is configured; here
/// as `None`.
pub type MaxLength = Option<u64>;

/// Which end padding / truncation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    pub fn parse(s: &str) -> Result<Side> {
        match s {
            "left" => Ok(Side::Left),
            "right" => Ok(Side::Right),
            other => Err(Error::invalid(format!(
                "side must be \"left\" or \"right\", got {other:?}"
            ))),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Side::Left => "left",
            Side::Right => "right",
        }
    }
}

/// A loaded tokenizer. Immutable after loading; share it with `Arc`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_templates: ChatTemplates,
    padding_side: Side,
    truncation_side: Side,
    model_max_length: MaxLength,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: bool,
    source: Option<PathBuf>,
    /// (with added tokens, without): `tokenizers` rebuilds the whole vocabulary map to count it,
    /// and streaming asks for it per token; the tokenizer never changes after loading.
    vocab_sizes: (usize, usize),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token())
            .field("eos_token", &self.eos_token())
            .field("pad_token", &self.pad_token())
            .field("padding_side", &self.padding_side)
            .field("chat_templates", &self.chat_templates.names())
            .finish()
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_text_opt(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

/// transformers' `clean_up_tokenization` (only applied to non-BPE models, as transformers 5 does).
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

impl Tokenizer {
    /// Load `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json`,
    /// `chat_template.jinja` and `additional_chat_templates/*.jinja` (optional) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                message: format!("tokenizer directory {} does not exist", dir.display()),
            });
        }
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::NotFound {
                path: tok_path.clone(),
                message: format!(
                    "{} not found: kvgen needs a fast-tokenizer file (tokenizer.json); save one with \
                     transformers' tokenizer.save_pretrained(dir)",
                    tok_path.display()
                ),
            });
        }
        let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::bad_file(&tok_path, format!("cannot load tokenizer: {e}")))?;

        let cfg_path = dir.join("tokenizer_config.json");
        let config = read_json_opt(&cfg_path)?.unwrap_or_else(|| Value::Object(Map::new()));
        if !config.is_object() {
            return Err(Error::bad_file(&cfg_path, "expected a JSON object"));
        }
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_json_opt(&map_path)?;

        // chat_template.jinja / additional_chat_templates/*.jinja take priority over the config
        let mut file_templates = ChatTemplates::new();
        if let Some(t) = read_text_opt(&dir.join("chat_template.jinja"))? {
            file_templates.insert(chat_template::DEFAULT_TEMPLATE, t);
        }
        let extra_dir = dir.join("additional_chat_templates");
        if extra_dir.is_dir() {
            let rd = std::fs::read_dir(&extra_dir).map_err(|e| Error::io(&extra_dir, e))?;
            let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            paths.sort();
            for p in paths {
                if p.extension().and_then(|e| e.to_str()) == Some("jinja") {
                    if let (Some(stem), Some(text)) = (
                        p.file_stem().and_then(|s| s.to_str()).map(str::to_string),
                        read_text_opt(&p)?,
                    ) {
                        file_templates.insert(stem, text);
                    }
                }
            }
        }
        let file_templates = if file_templates.is_empty() {
            None
        } else {
            Some(file_templates)
        };

        let mut t = Self::build(inner, &config, special_map.as_ref(), file_templates).map_err(|e| match e {
            Error::Tokenizer(m) | Error::InvalidInput(m) => Error::bad_file(&cfg_path, m),
            other => other,
        })?;
        t.source = Some(dir.to_path_buf());
        Ok(t)
    }

    /// Build from an already constructed `tokenizers::Tokenizer` and a tokenizer_config-like JSON
    /// object (the GGUF loader uses this).
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, config: &Value) -> Result<Tokenizer> {
        Self::build(inner, config, None, None)
    }

    fn build(
        mut inner: tokenizers::Tokenizer,
        config: &Value,
        special_map: Option<&Value>,
        file_templates: Option<ChatTemplates>,
    ) -> Result<Tokenizer> {
        let special = SpecialTokens::from_configs(config, special_map).map_err(Error::Tokenizer)?;
        let added_decoder = special::parse_added_tokens_decoder(config).map_err(Error::Tokenizer)?;

        // transformers: call-time padding/truncation only; the file's settings are not applied
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err("cannot disable truncation", e))?;

        // Tokens of added_tokens_decoder missing from tokenizer.json, then named / extra special
        // tokens that are not yet added tokens (transformers' TokenizersBackend.__init__).
        let mut existing: std::collections::HashSet<String> = inner
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .collect();
        let mut to_add: Vec<tokenizers::AddedToken> = Vec::new();
        for (_, spec) in &added_decoder {
            if !existing.contains(&spec.content) {
                existing.insert(spec.content.clone());
                to_add.push(spec.to_added_token());
            }
        }
        for (_, spec) in &special.named {
            if !existing.contains(&spec.content) {
                existing.insert(spec.content.clone());
                to_add.push(spec.to_added_token());
            }
        }
        for spec in &special.extra {
            if !existing.contains(&spec.content) {
                existing.insert(spec.content.clone());
                to_add.push(spec.to_added_token());
            }
        }
        if !to_add.is_empty() {
            inner.add_tokens(&to_add);
        }

        let chat_templates = match file_templates {
            Some(t) => t,
            None => match config.get("chat_template") {
                Some(v) => {
                    ChatTemplates::from_config_value(v).map_err(|e| Error::Tokenizer(format!("chat_template: {e}")))?
                }
                None => ChatTemplates::new(),
            },
        };
        let side = |key: &str| -> Result<Side> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(Side::Right),
                Some(Value::String(s)) => Side::parse(s).map_err(|e| Error::Tokenizer(format!("{key}: {e}"))),
                Some(other) => Err(Error::Tokenizer(format!(
                    "{key} must be \"left\" or \"right\", got {other}"
                ))),
            }
        };
        let padding_side = side("padding_side")?;
        let truncation_side = side("truncation_side")?;
        let model_max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|v| *v > 0.0 && *v < 1e18)
            .map(|v| v as u64);
        let flag = |k: &str| config.get(k).and_then(|v| v.as_bool());
        let vocab_sizes = (inner.get_vocab_size(true), inner.get_vocab_size(false));
        Ok(Tokenizer {
            vocab_sizes,
            inner,
            special,
            chat_templates,
            padding_side,
            truncation_side,
            model_max_length,
            add_bos_token: flag("add_bos_token"),
            add_eos_token: flag("add_eos_token"),
            clean_up_tokenization_spaces: flag("clean_up_tokenization_spaces").unwrap_or(false),
            source: None,
        })
    }

    // ---------------------------------------------------------------- encode / decode

    /// Encode one text. `add_special_tokens` applies the tokenizer.json post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode failed", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode several texts (in parallel). No padding.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        let encs = self
            .inner
            .encode_batch(inputs, add_special_tokens)
            .map_err(|e| tok_err("encode failed", e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Encode with truncation to at most `max_length` ids (special tokens included, as HF
    /// `truncation=True, max_length=...` does), dropping from `side`.
    pub fn encode_truncated(
        &self,
        text: &str,
        add_special_tokens: bool,
        max_length: usize,
        side: Side,
    ) -> Result<Vec<u32>> {
        let mut enc = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err("encode failed", e))?;
        let n_special = if add_special_tokens {
            self.num_special_tokens_to_add()
        } else {
            0
        };
        if n_special > max_length {
            return Err(Error::invalid(format!(
                "max_length={max_length} is smaller than the {n_special} special tokens this tokenizer adds; \
                 raise max_length or pass add_special_tokens=False"
            )));
        }
        let dir = match side {
            Side::Left => tokenizers::TruncationDirection::Left,
            Side::Right => tokenizers::TruncationDirection::Right,
        };
        enc.truncate(max_length - n_special, 0, dir);
        let enc = self
            .inner
            .post_process(enc, None, add_special_tokens)
            .map_err(|e| tok_err("encode failed", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Batch version of [`encode_truncated`](Self::encode_truncated).
    pub fn encode_batch_truncated<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        add_special_tokens: bool,
        max_length: usize,
        side: Side,
    ) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| self.encode_truncated(t.as_ref(), add_special_tokens, max_length, side))
            .collect()
    }

    /// How many special tokens the post-processor adds to a single sequence.
    pub fn num_special_tokens_to_add(&self) -> usize {
        use tokenizers::PostProcessor;
        self.inner
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0)
    }

    /// Decode ids to text. Ids outside the vocabulary are skipped (as transformers does).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let text = self
            .inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode failed", e))?;
        if self.clean_up_tokenization_spaces && !self.is_bpe() {
            Ok(clean_up_tokenization(&text))
        } else {
            Ok(text)
        }
    }

    pub fn decode_batch(&self, batch: &[Vec<u32>], skip_special_tokens: bool) -> Result<Vec<String>> {
        batch.iter().map(|ids| self.decode(ids, skip_special_tokens)).collect()
    }

    fn is_bpe(&self) -> bool {
        matches!(self.inner.get_model(), tokenizers::models::ModelWrapper::BPE(_))
    }

    // ---------------------------------------------------------------- vocabulary

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Full vocabulary size including added tokens (HF `len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_sizes.0
    }

    /// Base vocabulary size without added tokens (HF `tokenizer.vocab_size`).
    pub fn base_vocab_size(&self) -> usize {
        self.vocab_sizes.1
    }

    /// The largest id any token has, plus one (>= `vocab_size()` when ids have gaps).
    pub fn id_upper_bound(&self) -> usize {
        let max_added = self
            .inner
            .get_added_tokens_decoder()
            .keys()
            .copied()
            .max()
            .map(|m| m as usize + 1);
        max_added.unwrap_or(0).max(self.base_vocab_size())
    }

    /// All added tokens `(id, content, special)`, sorted by id.
    pub fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        let mut v: Vec<(u32, String, bool)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content, t.special))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    // ---------------------------------------------------------------- special tokens

    /// A named special token (`"bos_token"`, `"eos_token"`, `"unk_token"`, `"pad_token"`, ... or a
    /// model-specific name).
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special.get(name).map(|t| t.content.as_str())
    }

    pub fn special_token_id(&self, name: &str) -> Option<u32> {
        self.special_token(name).and_then(|t| self.token_to_id(t))
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_token("bos_token")
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.special_token("eos_token")
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.special_token("pad_token")
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.special_token("unk_token")
    }
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_token_id("bos_token")
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_token_id("eos_token")
    }
    pub fn pad_token_id(&self) -> Option<u32> {
        self.special_token_id("pad_token")
    }
    pub fn unk_token_id(&self) -> Option<u32> {
        self.special_token_id("unk_token")
    }

    /// HF `special_tokens_map`: named special tokens as `(name, token)` in HF's order.
    pub fn special_tokens_map(&self) -> Vec<(String, String)> {
        self.special
            .named
            .iter()
            .map(|(n, t)| (n.clone(), t.content.clone()))
            .collect()
    }

    /// Extra special tokens (`extra_special_tokens` / `additional_special_tokens`).
    pub fn extra_special_tokens(&self) -> Vec<String> {
        self.special.extra.iter().map(|t| t.content.clone()).collect()
    }

    /// HF `all_special_tokens`: named then extra, unique.
    pub fn all_special_tokens(&self) -> Vec<String> {
        self.special.all_tokens()
    }

    /// HF `all_special_ids` (tokens without an id map to the unk id, or are left out without one).
    pub fn all_special_ids(&self) -> Vec<u32> {
        self.all_special_tokens()
            .iter()
            .filter_map(|t| self.token_to_id(t).or_else(|| self.unk_token_id()))
            .collect()
    }

    // ---------------------------------------------------------------- settings

    pub fn padding_side(&self) -> Side {
        self.padding_side
    }
    pub fn truncation_side(&self) -> Side {
        self.truncation_side
    }
    /// `model_max_length` from tokenizer_config.json (None when absent or HF's "very large" value).
    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length
    }
    /// `add_bos_token` as written in tokenizer_config.json. Informational: with a tokenizer.json
    /// transformers 5 ignores it and uses the tokenizer.json post-processor, and so does kvgen.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.add_bos_token
    }
    pub fn add_eos_token(&self) -> Option<bool> {
        self.add_eos_token
    }
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    // ---------------------------------------------------------------- chat templates

    pub fn chat_templates(&self) -> &ChatTemplates {
        &self.chat_templates
    }

    /// The template `apply_chat_template` uses by default (HF `get_chat_template()`), if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_templates.select(None, false).ok()
    }

    /// Render the tokenizer's chat template (HF `apply_chat_template(..., tokenize=False)`).
    /// `extra` holds further template variables (`tools`, `documents`, `enable_thinking`, ...);
    /// a `"chat_template"` entry, if present, names one of the tokenizer's templates or is a
    /// template source itself (HF's `chat_template=` argument).
    pub fn apply_chat_template(
        &self,
        messages: Value,
        add_generation_prompt: bool,
        extra: Map<String, Value>,
    ) -> Result<String> {
        let mut extra = extra;
        let override_tmpl = match extra.remove("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => return Err(Error::invalid(format!("chat_template must be a string, got {other}"))),
        };
        let has_tools = extra.get("tools").is_some_and(|t| !t.is_null());
        let template: &str = match &override_tmpl {
            Some(s) => match self.chat_templates.get(s) {
                Some(named) => named,
                None => s.as_str(),
            },
            None => self.chat_templates.select(None, has_tools)?,
        };
        self.render_chat_template(template, messages, add_generation_prompt, extra)
    }

    /// Render an explicit template source with HF's context (special tokens, `messages`, `tools`,
    /// `documents`, `add_generation_prompt`, then `extra`).
    pub fn render_chat_template(
        &self,
        template: &str,
        messages: Value,
        add_generation_prompt: bool,
        extra: Map<String, Value>,
    ) -> Result<String> {
        let messages = normalize_messages(messages)?;
        let mut ctx = Map::new();
        for (name, tok) in self.special_tokens_map() {
            ctx.insert(name, Value::String(tok));
        }
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        for (k, v) in extra {
            ctx.insert(k, v);
        }
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        chat_template::render(template, &ctx)
    }
}

/// HF's message normalisation: messages must be objects; keys whose value is null are dropped;
/// `reasoning_content` / `thinking` / `reasoning` are aliased.
fn normalize_messages(messages: Value) -> Result<Value> {
    let Value::Array(list) = messages else {
        return Err(Error::invalid(format!(
            "messages must be a list of {{\"role\": ..., \"content\": ...}} dicts, got {}",
            short_json(&messages)
        )));
    };
    if list.is_empty() {
        return Err(Error::invalid(
            "cannot apply a chat template to an empty conversation; provide at least one message",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(map) = m else {
            return Err(Error::invalid(format!(
                "messages[{i}] must be a dict with \"role\" and \"content\", got {}",
                short_json(&m)
            )));
        };
        let mut map: Map<String, Value> = map.into_iter().filter(|(_, v)| !v.is_null()).collect();
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| map.get(*k).cloned());
        if let Some(r) = reasoning {
            // {"thinking": r, **message, "reasoning_content": r}
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), r.clone());
            for (k, v) in map {
                aliased.insert(k, v);
            }
            aliased.insert("reasoning_content".into(), r);
            map = aliased;
        }
        out.push(Value::Object(map));
    }
    Ok(Value::Array(out))
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let t: String = s.chars().take(80).collect();
        format!("{t}...")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_is_not_found() {
        let e = Tokenizer::from_dir(Path::new("/nonexistent/kvgen-tok")).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e:?}");
    }

    #[test]
    fn missing_tokenizer_json_is_not_found() {
        let dir = std::env::temp_dir().join(format!("kvgen-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Tokenizer::from_dir(&dir).unwrap_err();
        match e {
            Error::NotFound { path, message } => {
                assert!(path.ends_with("tokenizer.json"));
                assert!(message.contains("tokenizer.json"));
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn normalize() {
        let m = normalize_messages(serde_json::json!([{"role": "user", "content": "x", "tool_calls": null}])).unwrap();
        assert_eq!(m, serde_json::json!([{"role": "user", "content": "x"}]));
        assert!(normalize_messages(serde_json::json!([])).is_err());
        assert!(normalize_messages(serde_json::json!(["x"])).is_err());
    }
}
