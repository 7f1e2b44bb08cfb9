//! Which layers are lightning (linear) attention and which softmax attention.
//!
//! A GGUF file states the pattern as `minimax-01.attention.recurrent_layers` (one bool per
//! layer, true = lightning), or leaves it to llama.cpp's rule: with interval n
//! (`minimax-01.full_attention_interval`, default 8) layer i is softmax iff (i+1) % n == 0.
//! For MiniMax-Text-01 both give 7 lightning layers then 1 softmax, ten times.

use std::fmt;

use mxr_quant::gguf::{Array, Header};

use crate::names::{arch_key, arch_keys};
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Lightning attention: linear attention with a per-head decaying 128x128 state.
    Lightning,
    /// Softmax attention with GQA, partial RoPE and a KV cache.
    Softmax,
}

impl LayerKind {
    /// One-letter code used in pattern strings: `L` or `S`.
    pub fn code(self) -> char {
        match self {
            LayerKind::Lightning => 'L',
            LayerKind::Softmax => 'S',
        }
    }
}

/// llama.cpp's default rule: softmax every `interval`-th layer.
pub fn pattern_from_interval(n_layers: usize, interval: usize) -> Vec<LayerKind> {
    (0..n_layers).map(|i| if interval > 0 && (i + 1) % interval == 0 { LayerKind::Softmax } else { LayerKind::Lightning }).collect()
}

/// The layer pattern a MiniMax-01 GGUF header states (see the module doc).
pub fn layer_pattern(h: &Header) -> Result<Vec<LayerKind>, ModelError> {
    let count_key = arch_key(arch_keys::BLOCK_COUNT);
    let n_layers = h.get_u64(&count_key)?.ok_or_else(|| ModelError::BadMetadata { key: count_key.clone(), reason: "missing".into() })?;
    let n_layers = usize::try_from(n_layers)
        .ok()
        .filter(|&n| n <= 1 << 16)
        .ok_or_else(|| ModelError::BadMetadata { key: count_key, reason: format!("{n_layers} layers is not a plausible model") })?;
    let key = arch_key(arch_keys::RECURRENT_LAYERS);
    match h.get_array(&key)? {
        Some(Array::Bool(flags)) if flags.len() == n_layers => {
            Ok(flags.iter().map(|&r| if r { LayerKind::Lightning } else { LayerKind::Softmax }).collect())
        }
        Some(a) => Err(ModelError::BadMetadata {
            key,
            reason: format!("expected {n_layers} bools, found {} of type {}", a.len(), a.elem_type().name()),
        }),
        None => {
            let key = arch_key(arch_keys::FULL_ATTENTION_INTERVAL);
            let interval = h.get_u64(&key)?.unwrap_or(8);
            Ok(pattern_from_interval(n_layers, interval as usize))
        }
    }
}

/// Compact form of a pattern: runs collapsed, e.g. `(LLLLLLLS)x10` or `LS`.
pub struct PatternSummary<'a>(pub &'a [LayerKind]);

impl fmt::Display for PatternSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: String = self.0.iter().map(|k| k.code()).collect();
        // Smallest period p that tiles the whole pattern at least twice.
        for p in 1..=s.len() / 2 {
            if s.len().is_multiple_of(p) && s.as_bytes().chunks(p).all(|c| c == &s.as_bytes()[..p]) {
                return write!(f, "({})x{}", &s[..p], s.len() / p);
            }
        }
        f.write_str(&s)
    }
}
