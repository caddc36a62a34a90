//! The one error type of kvgen. `src/python/errors.rs` maps each variant to a Python exception.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input (ids, shapes, generation parameters). Message names value, limit and fix.
    #[error("{0}")]
    InvalidInput(String),

    /// A token id outside the embedding matrix (the vocabulary is its row count, which a tokenizer
    /// can exceed: Gemma 3's `<image_soft_token>` is one past the 1B model's embedding).
    #[error("token id {id} at row {row}, position {position} is out of range: the model's vocabulary has {vocab_size} ids (0..={max}), the rows of its embedding; remove that id from the prompt (a tokenizer can have tokens past the embedding, such as Gemma 3's <image_soft_token>) or use the tokenizer that belongs to this model", max = vocab_size.saturating_sub(1))]
    TokenOutOfRange { id: i64, row: usize, position: usize, vocab_size: usize },

    /// Prompt plus requested tokens do not fit the context.
    #[error("{0}")]
    ContextOverflow(String),

    /// A file or directory that does not exist.
    #[error("{message}")]
    NotFound { path: PathBuf, message: String },

    /// A model file that exists but cannot be understood.
    #[error("{path}: {message}")]
    BadModelFile { path: PathBuf, message: String },

    /// The architecture in config.json is not one kvgen implements.
    #[error("architecture {found:?} is not supported; kvgen supports: {supported}")]
    UnsupportedArchitecture { found: String, supported: String },

    /// NaN/Inf logits reached the sampler.
    #[error("{0}")]
    Numerical(String),

    /// A backend that is not built in or cannot start.
    #[error("{0}")]
    BackendUnavailable(String),

    /// A fault inside a backend's runtime (libtorch: out of device memory, a failed kernel).
    #[error("backend error: {0}")]
    Backend(String),

    /// Tokenizer failures (encode/decode/chat template).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The user interrupted (Ctrl-C); carried up so Python raises KeyboardInterrupt.
    #[error("interrupted")]
    Interrupted,

    /// The caller cancelled the request (a dropped handle, a cancelled asyncio task, a closed
    /// stream or a disconnected HTTP client); its cache slots are already free.
    #[error("the generation request was cancelled")]
    Cancelled,

    /// An error raised by a Python callback (streamer), carried through unchanged.
    #[error("callback failed: {0}")]
    Callback(String),

    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// Memory that could not be reserved (a KV cache, a buffer sized by the request or the model
    /// file): the message names how much was asked for and how to ask for less.
    #[error("{0}")]
    OutOfMemory(String),

    /// The service is at a configured bound (its admission queue is full): try again later.
    #[error("{0}")]
    Overloaded(String),

    /// A kvgen bug: an invariant that should hold did not.
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadModelFile { path: path.into(), message: msg.into() }
    }
    pub fn out_of_memory(msg: impl Into<String>) -> Self {
        Error::OutOfMemory(msg.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Runs `work`, turning a panic into `Error::Internal("{what}: {panic message}")`: the one place a
/// panic payload becomes an error (the scheduler's guards, the Python boundary).
pub fn catch_panic<T>(what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|payload| Err(Error::Internal(format!("{what}: {}", panic_message(payload.as_ref())))))
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}
