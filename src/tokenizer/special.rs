//! Special-token settings read from `tokenizer_config.json` / `special_tokens_map.json`, with the
//! precedence transformers 5.x applies.

use serde_json::Value;

/// HF's `SPECIAL_TOKENS_ATTRIBUTES`, in HF's order (this order defines `all_special_ids`).
pub const NAMED_SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One token as written in the config files: a string or an `AddedToken` dict.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub special: bool,
}

impl TokenSpec {
    /// A special token given as a plain string (HF: `AddedToken(s, special=True)`, normalized=False).
    pub fn special(content: impl Into<String>) -> Self {
        TokenSpec {
            content: content.into(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    /// Parse a string or `{"content": ..., "lstrip": ..., ...}`. `default_special` is used when the
    /// dict has no `special` field. Returns `Ok(None)` for JSON null.
    pub fn parse(v: &Value, default_special: bool) -> Result<Option<Self>, String> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(TokenSpec {
                special: default_special,
                ..TokenSpec::special(s.clone())
            })),
            Value::Object(m) => {
                let content = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .ok_or_else(|| format!("token object without a string \"content\": {v}"))?
                    .to_string();
                let flag = |k: &str, d: bool| m.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
                let special = flag("special", default_special);
                Ok(Some(TokenSpec {
                    content,
                    single_word: flag("single_word", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    normalized: flag("normalized", !special),
                    special,
                }))
            }
            other => Err(format!(
                "a token must be a string or an object with \"content\", got {other}"
            )),
        }
    }

    pub fn to_added_token(&self) -> tokenizers::AddedToken {
        tokenizers::AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// The named special tokens plus the extra ones (`extra_special_tokens` /
/// `additional_special_tokens`), and model-specific named ones (a dict `extra_special_tokens`).
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// (attribute name, token), in HF's attribute order, model-specific names last.
    pub named: Vec<(String, TokenSpec)>,
    /// Extra special tokens (no attribute name), in file order, deduplicated.
    pub extra: Vec<TokenSpec>,
}

impl SpecialTokens {
    pub fn get(&self, name: &str) -> Option<&TokenSpec> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn set(&mut self, name: &str, tok: Option<TokenSpec>) {
        let pos = self.named.iter().position(|(n, _)| n == name);
        match (pos, tok) {
            (Some(i), Some(t)) => self.named[i].1 = t,
            (Some(i), None) => {
                self.named.remove(i);
            }
            (None, Some(t)) => {
                // keep HF's attribute order for the standard names
                let rank = |n: &str| NAMED_SPECIAL_TOKENS.iter().position(|x| *x == n).unwrap_or(usize::MAX);
                let r = rank(name);
                let at = self
                    .named
                    .iter()
                    .position(|(n, _)| rank(n) > r)
                    .unwrap_or(self.named.len());
                self.named.insert(at, (name.to_string(), t));
            }
            (None, None) => {}
        }
    }

    fn push_extra(&mut self, t: TokenSpec) {
        if !self.extra.iter().any(|e| e.content == t.content) {
            self.extra.push(t);
        }
    }

    /// HF's `all_special_tokens`: named (in order) then extra, unique by content.
    pub fn all_tokens(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, t) in &self.named {
            if !out.contains(&t.content) {
                out.push(t.content.clone());
            }
        }
        for t in &self.extra {
            if !out.contains(&t.content) {
                out.push(t.content.clone());
            }
        }
        out
    }

    /// Read the special-token fields of a tokenizer_config-like object, then (only when the config
    /// has no `added_tokens_decoder`, as in transformers) let `special_tokens_map` override them.
    pub fn from_configs(config: &Value, special_tokens_map: Option<&Value>) -> Result<Self, String> {
        let mut st = SpecialTokens::default();
        st.apply(config, false)?;
        if let Some(map) = special_tokens_map {
            if config.get("added_tokens_decoder").is_none() {
                st.apply(map, true)?;
            }
        }
        Ok(st)
    }

    fn apply(&mut self, obj: &Value, is_map_file: bool) -> Result<(), String> {
        let Some(m) = obj.as_object() else { return Ok(()) };
        for name in NAMED_SPECIAL_TOKENS {
            if let Some(v) = m.get(name) {
                if is_map_file && v.is_null() {
                    continue;
                }
                let t = TokenSpec::parse(v, true).map_err(|e| format!("{name}: {e}"))?;
                let t = t.map(|t| TokenSpec { special: true, ..t });
                self.set(name, t);
            }
        }
        // extra tokens: v5 "extra_special_tokens" (list, or dict of model-specific names),
        // v4 "additional_special_tokens" (used when there is no extra_special_tokens)
        let empty_list = |v: &Value| v.as_array().is_some_and(|a| a.is_empty());
        let extra = match m.get("extra_special_tokens") {
            // an empty v5 list next to a v4 list: the v4 list wins
            Some(v) if v.is_null() || (empty_list(v) && m.contains_key("additional_special_tokens")) => {
                m.get("additional_special_tokens")
            }
            Some(v) => Some(v),
            None => m.get("additional_special_tokens"),
        };
        match extra {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                if !is_map_file {
                    self.extra.clear();
                }
                for (i, it) in items.iter().enumerate() {
                    if let Some(t) =
                        TokenSpec::parse(it, true).map_err(|e| format!("extra_special_tokens[{i}]: {e}"))?
                    {
                        self.push_extra(TokenSpec { special: true, ..t });
                    }
                }
            }
            Some(Value::Object(named)) => {
                for (k, v) in named {
                    if let Some(t) = TokenSpec::parse(v, true).map_err(|e| format!("extra_special_tokens.{k}: {e}"))? {
                        self.set(k, Some(TokenSpec { special: true, ..t }));
                    }
                }
            }
            Some(other) => return Err(format!("extra_special_tokens must be a list or an object, got {other}")),
        }
        Ok(())
    }
}

/// `added_tokens_decoder` of tokenizer_config.json: `{"<id>": {content, lstrip, ...}}`, sorted by id.
pub fn parse_added_tokens_decoder(config: &Value) -> Result<Vec<(u32, TokenSpec)>, String> {
    let mut out = Vec::new();
    if let Some(Value::Object(m)) = config.get("added_tokens_decoder") {
        for (k, v) in m {
            let id: u32 = k
                .trim()
                .parse()
                .map_err(|_| format!("added_tokens_decoder key {k:?} is not a token id"))?;
            if let Some(t) = TokenSpec::parse(v, false).map_err(|e| format!("added_tokens_decoder[{k}]: {e}"))? {
                out.push((id, t));
            }
        }
    }
    out.sort_by_key(|(id, _)| *id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parse_forms() {
        let cfg = json!({
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false, "__type": "AddedToken"},
            "pad_token": null,
            "additional_special_tokens": ["<a>", {"content": "<b>"}],
        });
        let st = SpecialTokens::from_configs(&cfg, None).unwrap();
        assert_eq!(st.get("bos_token").unwrap().content, "<s>");
        assert_eq!(st.get("eos_token").unwrap().content, "</s>");
        assert!(st.get("pad_token").is_none());
        assert_eq!(st.all_tokens(), vec!["<s>", "</s>", "<a>", "<b>"]);
        let map = json!({"pad_token": "<pad>", "unk_token": {"content": "<unk>"}});
        let st = SpecialTokens::from_configs(&cfg, Some(&map)).unwrap();
        assert_eq!(st.all_tokens(), vec!["<s>", "</s>", "<unk>", "<pad>", "<a>", "<b>"]);
        assert!(TokenSpec::parse(&json!(3), true).is_err());
    }
}
