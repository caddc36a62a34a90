//! The generation settings that decide which logits processors run (transformers' field names).

use serde::Deserialize;

/// Settings for `processors::build`, already merged (user kwargs, generation_config, defaults) by
/// the caller. Neutral values mean "processor not built", as in transformers'
/// `_get_logits_processor`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ProcessorConfig {
    pub repetition_penalty: Option<f32>,
    pub no_repeat_ngram_size: Option<usize>,
    pub bad_words_ids: Option<Vec<Vec<i64>>>,
    /// [[token ids], bias] pairs, transformers' list form of `sequence_bias`.
    pub sequence_bias: Option<Vec<(Vec<i64>, f32)>>,
    pub min_length: Option<usize>,
    pub min_new_tokens: Option<usize>,
    pub eos_token_id: Vec<i64>,
    pub forced_bos_token_id: Option<i64>,
    pub forced_eos_token_id: Option<Vec<i64>>,
    /// transformers' final max_length (padded prompt + new tokens), used by forced_eos.
    pub max_length: Option<usize>,
    pub remove_invalid_values: bool,
    /// (start, factor): start counts new tokens, as transformers adds the prompt length.
    pub exponential_decay_length_penalty: Option<(usize, f32)>,
    pub suppress_tokens: Option<Vec<i64>>,
    pub begin_suppress_tokens: Option<Vec<i64>>,
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub epsilon_cutoff: Option<f32>,
    pub eta_cutoff: Option<f32>,
    pub renormalize_logits: bool,
    /// Padded prompt width (transformers' `input_ids_seq_length`).
    pub prompt_length: usize,
    /// Tokens top-k / top-p / typical always keep: 1, or len(eos ids) + 1 for beam sampling (as
    /// transformers sets it). 0 means 1.
    pub min_tokens_to_keep: usize,
}
