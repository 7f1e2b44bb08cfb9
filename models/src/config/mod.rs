//! [`Config`]: the hyper-parameters of a MiniMax-01 model, validated once, read from an HF
//! `config.json` (both formats, [`hf`]) or from GGUF metadata ([`gguf`]).

pub mod gguf;
pub mod hf;

use crate::layers::LayerKind;
use crate::ModelError;

/// alpha and beta of one residual site: `out = alpha * normed_input + beta * branch`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Residual {
    pub alpha: f64,
    pub beta: f64,
}

/// MiniMax-01 hyper-parameters (glossary in the crate docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// RoPE (NeoX rotate-half) covers dims 0..rotary_dim of each softmax-attention head.
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// Expert FFN width.
    pub hidden_dim: usize,
    pub n_experts: usize,
    pub n_experts_used: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    /// Epsilon of the input, post-attention and final RMSNorms.
    pub rms_eps: f64,
    /// Epsilon of the lightning output RMSNorm (1e-6 in MiniMax's code; llama.cpp uses rms_eps).
    pub lightning_norm_eps: f64,
    pub layers: Vec<LayerKind>,
    pub residual_softmax: Residual,
    pub residual_lightning: Residual,
    pub residual_mlp: Residual,
    pub tie_word_embeddings: bool,
}

/// Values of MiniMax-Text-01 (spec section 1.1).
pub fn minimax_text_01() -> Config {
    let alpha = (2.0f64 * 80.0).powf(0.25);
    let r = Residual { alpha, beta: 1.0 };
    Config {
        dim: 6144,
        n_layers: 80,
        n_heads: 64,
        n_kv_heads: 8,
        head_dim: 128,
        rotary_dim: 64,
        rope_theta: 1e7,
        hidden_dim: 9216,
        n_experts: 32,
        n_experts_used: 2,
        vocab_size: 200_064,
        context_length: 10_240_000,
        rms_eps: 1e-5,
        lightning_norm_eps: 1e-6,
        layers: crate::layers::pattern_from_interval(80, 8),
        residual_softmax: r,
        residual_lightning: r,
        residual_mlp: r,
        tie_word_embeddings: false,
    }
}

impl Config {
    /// Checks the values are a model mxr can run; `source` names where they came from.
    pub fn validate(&self, source: &str) -> Result<(), ModelError> {
        let bad = |reason: String| Err(ModelError::BadConfig { origin: source.to_string(), reason });
        let positive = [
            ("hidden size", self.dim),
            ("layer count", self.n_layers),
            ("attention heads", self.n_heads),
            ("kv heads", self.n_kv_heads),
            ("head dim", self.head_dim),
            ("intermediate size", self.hidden_dim),
            ("expert count", self.n_experts),
            ("experts per token", self.n_experts_used),
            ("vocab size", self.vocab_size),
        ];
        for (what, v) in positive {
            if v == 0 {
                return bad(format!("{what} is 0"));
            }
            if v > 1 << 24 {
                return bad(format!("{what} {v} is implausibly large"));
            }
        }
        if self.n_layers > 4096 {
            return bad(format!("{} layers is implausibly many", self.n_layers));
        }
        if self.layers.len() != self.n_layers {
            return bad(format!("layer pattern has {} entries for {} layers", self.layers.len(), self.n_layers));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("{} attention heads are not a multiple of {} kv heads", self.n_heads, self.n_kv_heads));
        }
        if self.rotary_dim > self.head_dim || !self.rotary_dim.is_multiple_of(2) {
            return bad(format!("rotary dim {} must be even and at most head dim {}", self.rotary_dim, self.head_dim));
        }
        if self.n_experts_used > self.n_experts {
            return bad(format!("{} experts per token of only {}", self.n_experts_used, self.n_experts));
        }
        for (what, v) in [("rms eps", self.rms_eps), ("lightning norm eps", self.lightning_norm_eps), ("rope theta", self.rope_theta)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("{what} {v} must be positive"));
            }
        }
        for (what, r) in [("softmax", self.residual_softmax), ("lightning", self.residual_lightning), ("mlp", self.residual_mlp)] {
            if !(r.alpha.is_finite() && r.beta.is_finite()) {
                return bad(format!("{what} residual alpha/beta must be finite"));
            }
        }
        Ok(())
    }

    /// Width of all attention heads together (n_heads * head_dim; 8192 for Text-01).
    pub fn attn_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the softmax layers' K (and V) projection.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Whether llama.cpp's single `residual_scale` (alpha, with beta 1) expresses the model.
    pub fn llama_cpp_residual_exact(&self) -> bool {
        let a = self.residual_mlp.alpha;
        [self.residual_softmax, self.residual_lightning, self.residual_mlp].iter().all(|r| r.alpha == a && r.beta == 1.0)
    }
}
