//! Rotary position embeddings, computed exactly as transformers' `ROPE_INIT_FUNCTIONS` (5.x).

use crate::config::{ModelConfig, RopeScaling};

pub struct Rope {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    /// Frequencies for sequences within max_position_embeddings (all types but dynamic are static).
    base_inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut rope = Rope {
            head_dim: cfg.head_dim,
            theta: cfg.rope_theta,
            scaling: cfg.rope_scaling.clone(),
            max_position_embeddings: cfg.max_position_embeddings,
            base_inv_freq: Vec::new(),
        };
        rope.base_inv_freq = rope.compute_inv_freq(rope.theta);
        rope
    }

    /// Gemma 3's rope of the sliding layers: its own theta, no scaling (transformers merges
    /// `rope_scaling` into the full-attention parameters only).
    pub fn local(cfg: &ModelConfig, theta: f64) -> Self {
        let mut rope = Rope {
            head_dim: cfg.head_dim,
            theta,
            scaling: RopeScaling::Default,
            max_position_embeddings: cfg.max_position_embeddings,
            base_inv_freq: Vec::new(),
        };
        rope.base_inv_freq = rope.compute_inv_freq(rope.theta);
        rope
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    fn default_inv_freq(&self, base: f64) -> Vec<f32> {
        let dim = self.head_dim;
        // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in float32.
        // Computed in f32 like torch (the Python float base is cast to the tensor's dtype).
        let base = base as f32;
        (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32)).collect()
    }

    fn compute_inv_freq(&self, base: f64) -> Vec<f32> {
        let inv = self.default_inv_freq(base);
        match self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => inv,
            RopeScaling::Linear { factor } => inv.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                inv.iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Written as transformers writes it: ~(wavelen < high) * ~(wavelen > low).
                        #[allow(clippy::neg_cmp_op_on_partial_ord)]
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }

    /// Frequencies for a forward call whose largest position is `seq_len - 1`. Only dynamic NTK
    /// scaling depends on it: like transformers, beyond max_position_embeddings the base grows.
    pub fn inv_freq_for(&self, seq_len: usize) -> std::borrow::Cow<'_, [f32]> {
        match self.scaling {
            RopeScaling::Dynamic { factor } if seq_len > self.max_position_embeddings => {
                // transformers evaluates this on float32 tensors (seq_len is a tensor there).
                let dim = self.head_dim as f32;
                let factor = factor as f32;
                let ratio = factor * seq_len as f32 / self.max_position_embeddings as f32 - (factor - 1.0);
                let base = self.theta as f32 * ratio.powf(dim / (dim - 2.0));
                std::borrow::Cow::Owned(self.default_inv_freq(base as f64))
            }
            _ => std::borrow::Cow::Borrowed(&self.base_inv_freq),
        }
    }

    /// cos and sin tables (head_dim per position, rows in the order given) for a forward call
    /// whose longest sequence is `seq_len` (see `inv_freq_for`).
    pub fn tables(&self, positions: impl ExactSizeIterator<Item = usize>, seq_len: usize) -> (Vec<f32>, Vec<f32>) {
        let hd = self.head_dim;
        let inv_freq = self.inv_freq_for(seq_len);
        let n = positions.len();
        let (mut cos, mut sin) = (vec![0f32; n * hd], vec![0f32; n * hd]);
        for (i, p) in positions.enumerate() {
            Self::cos_sin(&inv_freq, p, &mut cos[i * hd..(i + 1) * hd], &mut sin[i * hd..(i + 1) * hd]);
        }
        (cos, sin)
    }

    /// cos and sin (head_dim each, HF layout cat(freqs, freqs)) for one position.
    pub fn cos_sin(inv_freq: &[f32], position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let half = inv_freq.len();
        for (i, &f) in inv_freq.iter().enumerate() {
            let angle = f * position as f32;
            let (s, c) = angle.sin_cos();
            cos[i] = c;
            cos[i + half] = c;
            sin[i] = s;
            sin[i + half] = s;
        }
    }
}
