//! Chat templates rendered the way transformers renders them (`render_jinja_template`), with
//! minijinja instead of Jinja2.
//!
//! Matches HF's environment: `trim_blocks` and `lstrip_blocks` on, loop controls, no
//! auto-escaping, a `tojson` filter with Python `json.dumps` semantics (`ensure_ascii=False`,
//! `indent`, `separators`, `sort_keys`), the globals `raise_exception(msg)` and
//! `strftime_now(fmt)`, and Python string/dict/list methods through minijinja-contrib's pycompat.
//! `none`/`true`/`false` print as Python does (`None`, `True`, `False`). The HF-only
//! `{% generation %}...{% endgeneration %}` block is accepted and rendered transparently.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};

use crate::error::{Error, Result};

/// Name HF uses for the template picked when no name is given.
pub const DEFAULT_TEMPLATE: &str = "default";

/// The chat templates of a tokenizer: one unnamed (stored as `"default"`) or several named ones.
#[derive(Debug, Clone, Default)]
pub struct ChatTemplates {
    templates: BTreeMap<String, String>,
}

impl ChatTemplates {
    pub fn new() -> Self {
        Self::default()
    }

    /// From `tokenizer_config.json["chat_template"]`: a string, or a list of `{name, template}`.
    pub fn from_config_value(value: &serde_json::Value) -> std::result::Result<Self, String> {
        let mut out = Self::new();
        match value {
            serde_json::Value::Null => {}
            serde_json::Value::String(s) => {
                out.templates.insert(DEFAULT_TEMPLATE.to_string(), s.clone());
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let name = item.get("name").and_then(|v| v.as_str());
                    let template = item.get("template").and_then(|v| v.as_str());
                    match (name, template) {
                        (Some(n), Some(t)) => {
                            out.templates.insert(n.to_string(), t.to_string());
                        }
                        _ => {
                            return Err(format!(
                                "chat_template[{i}] must be an object with string fields \"name\" and \"template\""
                            ))
                        }
                    }
                }
            }
            serde_json::Value::Object(map) => {
                // Not written by HF, but accept {name: template}.
                for (k, v) in map {
                    match v.as_str() {
                        Some(t) => {
                            out.templates.insert(k.clone(), t.to_string());
                        }
                        None => return Err(format!("chat_template[{k:?}] must be a string")),
                    }
                }
            }
            other => {
                return Err(format!(
                    "chat_template must be a string or a list of {{name, template}} objects, got {other}"
                ))
            }
        }
        Ok(out)
    }

    pub fn insert(&mut self, name: impl Into<String>, template: impl Into<String>) {
        self.templates.insert(name.into(), template.into());
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn names(&self) -> Vec<String> {
        self.templates.keys().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.templates.get(name).map(|s| s.as_str())
    }

    pub fn map(&self) -> &BTreeMap<String, String> {
        &self.templates
    }

    /// HF's `get_chat_template`: with several templates, `"tool_use"` when tools are given and it
    /// exists, else `"default"`; with a single template, that one.
    pub fn select(&self, name: Option<&str>, has_tools: bool) -> Result<&str> {
        if let Some(n) = name {
            return self.get(n).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "no chat template named {n:?}; this tokenizer has: {:?}",
                    self.names()
                ))
            });
        }
        if self.templates.is_empty() {
            return Err(Error::Tokenizer(
                "cannot apply a chat template: this tokenizer has no chat_template (tokenizer_config.json \
                 \"chat_template\" or chat_template.jinja) and none was passed"
                    .to_string(),
            ));
        }
        if self.templates.len() == 1 {
            if let Some(t) = self.templates.values().next() {
                return Ok(t.as_str());
            }
        }
        if has_tools {
            if let Some(t) = self.get("tool_use") {
                return Ok(t);
            }
        }
        self.get(DEFAULT_TEMPLATE).ok_or_else(|| {
            Error::Tokenizer(format!(
                "this tokenizer has several chat templates and none is named \"default\"; pass one of {:?}",
                self.names()
            ))
        })
    }
}

/// Replace HF's `{% generation %}` / `{% endgeneration %}` tags (an HF Jinja extension) with an
/// always-true `if` block, keeping the whitespace-control markers so output is unchanged.
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let bytes = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let mut last = 0;
    while i + 1 < bytes.len() {
        if bytes[i] == b'{' && bytes[i + 1] == b'%' {
            let mut j = i + 2;
            let mut open_mark = "";
            if j < bytes.len() && (bytes[j] == b'-' || bytes[j] == b'+') {
                open_mark = if bytes[j] == b'-' { "-" } else { "+" };
                j += 1;
            }
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            let rest = &src[j..];
            let (word, repl) = if rest.starts_with("endgeneration") {
                ("endgeneration", "endif")
            } else if rest.starts_with("generation") {
                ("generation", "if true")
            } else {
                i += 1;
                continue;
            };
            let mut k = j + word.len();
            // the keyword must end here
            if k < bytes.len() && (bytes[k].is_ascii_alphanumeric() || bytes[k] == b'_') {
                i += 1;
                continue;
            }
            while k < bytes.len() && bytes[k].is_ascii_whitespace() {
                k += 1;
            }
            let mut close_mark = "";
            if k < bytes.len() && (bytes[k] == b'-' || bytes[k] == b'+') {
                close_mark = if bytes[k] == b'-' { "-" } else { "+" };
                k += 1;
            }
            if src[k..].starts_with("%}") {
                out.push_str(&src[last..i]);
                let _ = write!(out, "{{%{open_mark} {repl} {close_mark}%}}");
                i = k + 2;
                last = i;
                continue;
            }
        }
        i += 1;
    }
    out.push_str(&src[last..]);
    out
}

/// Python `repr(float)` as `json.dumps` writes it.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // shortest round-trip digits and exponent
    let e = format!("{:e}", f); // e.g. "-1.2345e-7"
    let (mant, exp) = match e.split_once('e') {
        Some((m, x)) => (m, x.parse::<i32>().unwrap_or(0)),
        None => return format!("{f:?}"),
    };
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        // positional
        let n = digits.len() as i32;
        let s = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{}{}.0", digits, "0".repeat((int_len - n) as usize))
            } else {
                format!("{}.{}", &digits[..int_len as usize], &digits[int_len as usize..])
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let es = if exp < 0 {
            format!("-{:02}", -exp)
        } else {
            format!("+{:02}", exp)
        };
        format!("{sign}{m}e{es}")
    }
}

fn json_escape_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", u);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn json_key(v: &Value) -> std::result::Result<String, minijinja::Error> {
    match v.kind() {
        ValueKind::String => Ok(v.as_str().unwrap_or_default().to_string()),
        ValueKind::Bool => Ok(if v.is_true() { "true".into() } else { "false".into() }),
        ValueKind::None | ValueKind::Undefined => Ok("null".into()),
        ValueKind::Number => {
            if let Ok(i) = i128::try_from(v.clone()) {
                Ok(i.to_string())
            } else if let Ok(f) = f64::try_from(v.clone()) {
                Ok(py_float(f))
            } else {
                Ok(v.to_string())
            }
        }
        _ => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {}", v.kind()),
        )),
    }
}

fn write_json(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, lvl: usize| {
        if let Some(ind) = &opts.indent {
            out.push('\n');
            for _ in 0..lvl {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                match i128::try_from(v.clone()) {
                    Ok(i) => {
                        let _ = write!(out, "{i}");
                    }
                    Err(_) => out.push_str(&v.to_string()),
                }
            } else {
                match f64::try_from(v.clone()) {
                    Ok(f) => out.push_str(&py_float(f)),
                    Err(_) => out.push_str(&v.to_string()),
                }
            }
        }
        ValueKind::String => json_escape_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Bytes => {
            let s = String::from_utf8_lossy(v.as_bytes().unwrap_or_default()).into_owned();
            json_escape_str(&s, opts.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, level + 1);
                write_json(item, opts, level + 1, out)?;
            }
            newline(out, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                pairs.push((json_key(&key)?, val));
            }
            if opts.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, val)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, level + 1);
                json_escape_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_json(val, opts, level + 1, out)?;
            }
            newline(out, level);
            out.push('}');
        }
        _ => json_escape_str(&v.to_string(), opts.ensure_ascii, out),
    }
    Ok(())
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson_filter(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent_v: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent_v {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(n.max(0) as usize))
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !(s.is_none() || s.is_undefined()) => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            if parts.len() != 2 {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a (item_separator, key_separator) pair",
                ));
            }
            (parts[0].to_string(), parts[1].to_string())
        }
        _ => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Marks an error the template raised itself (`raise_exception`): the template refuses the
/// conversation (Gemma's "System role not supported", "Conversation roles must alternate ..."),
/// which is the caller's to fix, not a fault of the template or of kvgen.
#[derive(Debug)]
struct RaisedByTemplate;

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the chat template")
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg).with_source(RaisedByTemplate))
}

fn raised_by_template(err: &minijinja::Error) -> bool {
    let mut src = std::error::Error::source(err);
    while let Some(s) = src {
        if s.is::<RaisedByTemplate>() {
            return true;
        }
        src = s.source();
    }
    false
}

// ---- strftime_now (UTC; no tz database in the crate) ----

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python `datetime.now().strftime(fmt)` for the common directives, in UTC.
pub fn strftime_utc(fmt: &str, unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Mon=0)
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + if is_leap && m > 2 { 1 } else { 0 };
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
        match spec {
            'Y' => {
                let _ = write!(out, "{y:04}");
            }
            'y' => {
                let _ = write!(out, "{:02}", y.rem_euclid(100));
            }
            'm' => {
                let _ = write!(out, "{m:02}");
            }
            'd' => {
                let _ = write!(out, "{d:02}");
            }
            '-' => match chars.next() {
                Some('d') => {
                    let _ = write!(out, "{d}");
                }
                Some('m') => {
                    let _ = write!(out, "{m}");
                }
                Some('H') => {
                    let _ = write!(out, "{hh}");
                }
                Some('I') => {
                    let _ = write!(out, "{h12}");
                }
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            'e' => {
                let _ = write!(out, "{d:>2}");
            }
            'H' => {
                let _ = write!(out, "{hh:02}");
            }
            'I' => {
                let _ = write!(out, "{h12:02}");
            }
            'M' => {
                let _ = write!(out, "{mm:02}");
            }
            'S' => {
                let _ = write!(out, "{ss:02}");
            }
            'p' => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(MONTHS[(m - 1) as usize]),
            'b' | 'h' => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            'A' => out.push_str(DAYS[weekday]),
            'a' => out.push_str(&DAYS[weekday][..3]),
            'j' => {
                let _ = write!(out, "{yday:03}");
            }
            'F' => {
                let _ = write!(out, "{y:04}-{m:02}-{d:02}");
            }
            'T' => {
                let _ = write!(out, "{hh:02}:{mm:02}:{ss:02}");
            }
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            o => {
                out.push('%');
                out.push(o);
            }
        }
    }
    out
}

fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&fmt, secs)
}

/// Python `repr(str)`.
fn py_repr_str(s: &str, out: &mut String) {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(q);
}

/// Python `repr()` of a template value (how Jinja2 prints lists and dicts).
fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::String => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Number if !v.is_integer() => match f64::try_from(v.clone()) {
            Ok(f) if f.is_nan() => out.push_str("nan"),
            Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "inf" } else { "-inf" }),
            Ok(f) => out.push_str(&py_float(f)),
            Err(_) => out.push_str(&v.to_string()),
        },
        ValueKind::Seq => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    match v.get_item(&key) {
                        Ok(val) => py_repr(&val, out),
                        Err(_) => out.push_str("None"),
                    }
                }
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Print values as Jinja2 (Python) does: `None`, `True`, `False`, lists and dicts as Python
/// reprs; undefined prints nothing.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out
            .write_str("None")
            .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string())),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string())),
        ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            py_repr(value, &mut s);
            out.write_str(&s)
                .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// A minijinja environment configured like transformers' chat-template environment.
pub fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn format_template_error(err: &minijinja::Error) -> String {
    let mut msg = String::new();
    match err.kind() {
        ErrorKind::InvalidOperation if err.detail().is_some() && err.name().is_some() => {
            // raise_exception(...) and similar: the template's own message first
            let _ = write!(msg, "{}", err.detail().unwrap_or_default());
        }
        _ => {
            let _ = write!(msg, "{err}");
        }
    }
    if let Some(line) = err.line() {
        let _ = write!(msg, " (chat template line {line})");
    }
    let mut src = std::error::Error::source(err);
    while let Some(s) = src {
        if !s.is::<RaisedByTemplate>() {
            let _ = write!(msg, ": {s}");
        }
        src = s.source();
    }
    msg
}

/// Render `template` with the given context (a JSON object: messages, add_generation_prompt,
/// special tokens, tools, ... ). Template errors become `Error::Tokenizer` with the message.
pub fn render(template: &str, context: &serde_json::Map<String, serde_json::Value>) -> Result<String> {
    let env = hf_environment();
    let src = rewrite_generation_tags(template);
    let tmpl = env
        .template_from_str(&src)
        .map_err(|e| Error::Tokenizer(format!("chat template does not parse: {}", format_template_error(&e))))?;
    let ctx = Value::from_serialize(context);
    tmpl.render(ctx).map_err(|e| {
        let msg = format_template_error(&e);
        Error::Tokenizer(if raised_by_template(&e) {
            format!(
                "the model's chat template rejects these messages: {msg}; change the conversation to what the \
                 template accepts (the roles it allows, their order, the content types)"
            )
        } else {
            format!("chat template failed: {msg}")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_raised_error_says_the_messages_do_not_fit() {
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), serde_json::json!([{"role": "system", "content": "x"}]));
        let t = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        match render(t, &ctx) {
            Err(Error::Tokenizer(m)) => {
                assert!(m.contains("rejects these messages: System role not supported (chat template line 1)"), "{m}");
                assert!(!m.contains("raised by the chat template"), "{m}");
            }
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
        match render("{{ 1 + 'a' }}", &ctx) {
            Err(Error::Tokenizer(m)) => assert!(m.starts_with("chat template failed: "), "{m}"),
            other => panic!("expected a tokenizer error, got {other:?}"),
        }
    }

    #[test]
    fn floats_like_python() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(123.456), "123.456");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(-2.5e-7), "-2.5e-07");
        assert_eq!(py_float(1234567890123456.0), "1234567890123456.0");
    }

    #[test]
    fn generation_tags() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%}b{% endgeneration %}c"),
            "a{%- if true -%}b{% endif %}c"
        );
        assert_eq!(
            rewrite_generation_tags("{% if generation_x %}"),
            "{% if generation_x %}"
        );
    }

    #[test]
    fn strftime() {
        // 2024-02-29 13:05:09 UTC = 1709211909
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %A %b %d %j", 1_709_211_909),
            "2024-02-29 13:05:09 Thursday Feb 29 060"
        );
        assert_eq!(strftime_utc("%d %B %Y", 0), "01 January 1970");
    }

    #[test]
    fn render_basic() {
        let mut ctx = serde_json::Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": "hi", "z": 1, "a": 2}]),
        );
        ctx.insert("add_generation_prompt".into(), serde_json::json!(true));
        let out = render(
            "{% for m in messages %}{{ m.role }}:{{ m.content|tojson }}{{ m|tojson }}\n{% endfor %}{{ none }}{{ true }}{{ x }}",
            &ctx,
        )
        .unwrap();
        assert_eq!(
            out,
            "user:\"hi\"{\"role\": \"user\", \"content\": \"hi\", \"z\": 1, \"a\": 2}\nNoneTrue"
        );
        let err = render("{{ raise_exception('bad role') }}", &ctx).unwrap_err();
        assert!(err.to_string().contains("bad role"), "{err}");
    }
}
