//! `kvgen._kvgen.Tokenizer`: the native tokenizer. The HF-compatible surface (`__call__`,
//! padding, tensors, BatchEncoding) lives in `python/kvgen/tokenizer.py`, which wraps this class.

use std::path::Path;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyModule};

use crate::error::Error;
use crate::python::errors::to_py;
use crate::tokenizer::{Side, Tokenizer};

#[pyclass(name = "Tokenizer", module = "kvgen._kvgen", frozen)]
pub struct PyTokenizer {
    pub inner: Arc<Tokenizer>,
}

impl PyTokenizer {
    pub fn new(inner: Arc<Tokenizer>) -> Self {
        PyTokenizer { inner }
    }
}

fn parse_side(side: Option<&str>, default: Side) -> PyResult<Side> {
    match side {
        None => Ok(default),
        Some(s) => Side::parse(s).map_err(to_py),
    }
}

fn parse_json_object(what: &str, s: Option<&str>) -> PyResult<serde_json::Map<String, serde_json::Value>> {
    match s {
        None => Ok(serde_json::Map::new()),
        Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(serde_json::Value::Null) => Ok(serde_json::Map::new()),
            Ok(other) => Err(to_py(Error::invalid(format!(
                "{what} must be a JSON object, got {other}"
            )))),
            Err(e) => Err(to_py(Error::invalid(format!("{what} is not valid JSON: {e}")))),
        },
    }
}

#[pymethods]
impl PyTokenizer {
    /// Load tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat templates)
    /// from a directory.
    #[staticmethod]
    fn from_dir(py: Python<'_>, path: &str) -> PyResult<Self> {
        let p = path.to_string();
        let tok = py.detach(move || Tokenizer::from_dir(Path::new(&p))).map_err(to_py)?;
        Ok(PyTokenizer { inner: Arc::new(tok) })
    }

    /// Encode one text to ids. With `max_length`, truncate to that many ids (special tokens
    /// included) from `truncation_side` (default: the tokenizer's).
    #[pyo3(signature = (text, add_special_tokens = true, max_length = None, truncation_side = None))]
    fn encode(
        &self,
        py: Python<'_>,
        text: &str,
        add_special_tokens: bool,
        max_length: Option<usize>,
        truncation_side: Option<&str>,
    ) -> PyResult<Vec<u32>> {
        let side = parse_side(truncation_side, self.inner.truncation_side())?;
        let tok = &self.inner;
        let text = text.to_string();
        py.detach(|| match max_length {
            Some(n) => tok.encode_truncated(&text, add_special_tokens, n, side),
            None => tok.encode(&text, add_special_tokens),
        })
        .map_err(to_py)
    }

    /// Encode a list of texts (GIL released, parallel). No padding.
    #[pyo3(signature = (texts, add_special_tokens = true, max_length = None, truncation_side = None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        add_special_tokens: bool,
        max_length: Option<usize>,
        truncation_side: Option<&str>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let side = parse_side(truncation_side, self.inner.truncation_side())?;
        let tok = &self.inner;
        py.detach(|| match max_length {
            Some(n) => tok.encode_batch_truncated(&texts, add_special_tokens, n, side),
            None => tok.encode_batch(&texts, add_special_tokens),
        })
        .map_err(to_py)
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        let tok = &self.inner;
        py.detach(|| tok.decode(&ids, skip_special_tokens)).map_err(to_py)
    }

    #[pyo3(signature = (batch, skip_special_tokens = false))]
    fn decode_batch(&self, py: Python<'_>, batch: Vec<Vec<u32>>, skip_special_tokens: bool) -> PyResult<Vec<String>> {
        let tok = &self.inner;
        py.detach(|| tok.decode_batch(&batch, skip_special_tokens))
            .map_err(to_py)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Render the chat template. `messages_json`: JSON list of message dicts; `kwargs_json`: JSON
    /// object of extra template variables (tools, documents, chat_template override, ...).
    #[pyo3(signature = (messages_json, add_generation_prompt = false, kwargs_json = None))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages_json: &str,
        add_generation_prompt: bool,
        kwargs_json: Option<&str>,
    ) -> PyResult<String> {
        let messages: serde_json::Value = serde_json::from_str(messages_json)
            .map_err(|e| to_py(Error::invalid(format!("messages are not valid JSON: {e}"))))?;
        let extra = parse_json_object("chat template kwargs", kwargs_json)?;
        let tok = &self.inner;
        py.detach(|| tok.apply_chat_template(messages, add_generation_prompt, extra))
            .map_err(to_py)
    }

    /// Full vocabulary size including added tokens (HF `len(tokenizer)`).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// Base vocabulary without added tokens (HF `tokenizer.vocab_size`).
    #[getter]
    fn base_vocab_size(&self) -> usize {
        self.inner.base_vocab_size()
    }

    fn __len__(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn bos_token(&self) -> Option<String> {
        self.inner.bos_token().map(str::to_string)
    }
    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.inner.eos_token().map(str::to_string)
    }
    #[getter]
    fn pad_token(&self) -> Option<String> {
        self.inner.pad_token().map(str::to_string)
    }
    #[getter]
    fn unk_token(&self) -> Option<String> {
        self.inner.unk_token().map(str::to_string)
    }
    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id()
    }
    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id()
    }
    #[getter]
    fn pad_token_id(&self) -> Option<u32> {
        self.inner.pad_token_id()
    }
    #[getter]
    fn unk_token_id(&self) -> Option<u32> {
        self.inner.unk_token_id()
    }

    /// Named special tokens, e.g. {"bos_token": "<s>", ...} (HF `special_tokens_map`).
    #[getter]
    fn special_tokens_map<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.special_tokens_map() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    #[getter]
    fn extra_special_tokens(&self) -> Vec<String> {
        self.inner.extra_special_tokens()
    }

    #[getter]
    fn all_special_tokens(&self) -> Vec<String> {
        self.inner.all_special_tokens()
    }

    #[getter]
    fn all_special_ids(&self) -> Vec<u32> {
        self.inner.all_special_ids()
    }

    /// Added tokens as (id, content, special), sorted by id.
    fn added_tokens(&self) -> Vec<(u32, String, bool)> {
        self.inner.added_tokens()
    }

    #[getter]
    fn num_special_tokens_to_add(&self) -> usize {
        self.inner.num_special_tokens_to_add()
    }

    #[getter]
    fn padding_side(&self) -> &'static str {
        self.inner.padding_side().as_str()
    }

    #[getter]
    fn truncation_side(&self) -> &'static str {
        self.inner.truncation_side().as_str()
    }

    #[getter]
    fn model_max_length(&self) -> Option<u64> {
        self.inner.model_max_length()
    }

    #[getter]
    fn add_bos_token(&self) -> Option<bool> {
        self.inner.add_bos_token()
    }

    #[getter]
    fn add_eos_token(&self) -> Option<bool> {
        self.inner.add_eos_token()
    }

    /// The default chat template source, or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(str::to_string)
    }

    /// All chat templates by name ({"default": ...} for a single template).
    #[getter]
    fn chat_templates<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.chat_templates().map() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    #[getter]
    fn source(&self) -> Option<String> {
        self.inner.source().map(|p| p.display().to_string())
    }

    fn __repr__(&self) -> String {
        format!(
            "kvgen._kvgen.Tokenizer(source={:?}, vocab_size={}, bos_token={:?}, eos_token={:?}, pad_token={:?})",
            self.inner.source().map(|p| p.display().to_string()),
            self.inner.vocab_size(),
            self.inner.bos_token(),
            self.inner.eos_token(),
            self.inner.pad_token()
        )
    }
}

/// Add the `Tokenizer` class to the native module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()
}
