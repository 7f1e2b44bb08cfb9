//! [`Config`] <-> GGUF metadata. llama.cpp's `minimax-01` keys carry what they can; mxr's
//! own keys (docs/format.md) carry the rest exactly:
//! - `mxr.residual.{full_attention,lightning,mlp}.{alpha,beta}` (f64): llama.cpp has one
//!   `residual_scale` (alpha, beta implied 1) for all three sites;
//! - `mxr.lightning.norm_epsilon` (f64): llama.cpp uses the global RMS epsilon there.
//!
//! Reading a file without the `mxr.*` keys (llama.cpp's converter wrote it) falls back to
//! llama.cpp's meaning of its keys.

use mxr_quant::gguf::{keys, Array, Builder, FormatError, Header, Value};

use super::{Config, Residual};
use crate::layers::{layer_pattern, LayerKind};
use crate::names::{self, arch_key, arch_keys};
use crate::ModelError;

pub const KEY_LIGHTNING_NORM_EPS: &str = "mxr.lightning.norm_epsilon";

/// The `mxr.residual.<site>.<alpha|beta>` key.
pub fn residual_key(site: &str, which: &str) -> String {
    format!("mxr.residual.{site}.{which}")
}

const SITES: [&str; 3] = ["full_attention", "lightning", "mlp"];

/// A numeric key as f64. An f32 value is read as the shortest decimal that rounds to it
/// (what the writer meant: 1e-5 stays 1e-5, not 9.99999974e-6).
fn number(h: &Header, key: &str) -> Result<Option<f64>, ModelError> {
    match h.get(key) {
        Some(Value::F32(x)) => Ok(format!("{x}").parse::<f64>().ok()),
        _ => Ok(h.get_f64(key)?),
    }
}

impl Config {
    fn residual_sites(&self) -> [Residual; 3] {
        [self.residual_softmax, self.residual_lightning, self.residual_mlp]
    }

    /// Writes the architecture metadata (llama.cpp's keys and mxr's) into `b`.
    pub fn write_gguf(&self, b: &mut Builder) -> Result<(), FormatError> {
        let u32v = |v: usize| Value::U32(u32::try_from(v).unwrap_or(u32::MAX));
        b.set(keys::GENERAL_ARCHITECTURE, Value::String(names::ARCH.into()))?;
        let entries = [
            (arch_keys::CONTEXT_LENGTH, u32v(self.context_length)),
            (arch_keys::EMBEDDING_LENGTH, u32v(self.dim)),
            (arch_keys::BLOCK_COUNT, u32v(self.n_layers)),
            (arch_keys::FEED_FORWARD_LENGTH, u32v(self.hidden_dim)),
            (arch_keys::HEAD_COUNT, u32v(self.n_heads)),
            (arch_keys::HEAD_COUNT_KV, u32v(self.n_kv_heads)),
            (arch_keys::KEY_LENGTH, u32v(self.head_dim)),
            (arch_keys::VALUE_LENGTH, u32v(self.head_dim)),
            (arch_keys::ROPE_DIMENSION_COUNT, u32v(self.rotary_dim)),
            (arch_keys::ROPE_FREQ_BASE, Value::F32(self.rope_theta as f32)),
            (arch_keys::RMS_EPS, Value::F32(self.rms_eps as f32)),
            (arch_keys::EXPERT_COUNT, u32v(self.n_experts)),
            (arch_keys::EXPERT_USED_COUNT, u32v(self.n_experts_used)),
            (arch_keys::VOCAB_SIZE, u32v(self.vocab_size)),
            // llama.cpp: one alpha for all sites, betas 1. Exact values follow in mxr.* keys.
            (arch_keys::RESIDUAL_SCALE, Value::F32(self.residual_mlp.alpha as f32)),
            (arch_keys::RECURRENT_LAYERS, Value::Array(Array::Bool(self.layers.iter().map(|k| *k == LayerKind::Lightning).collect()))),
        ];
        for (k, v) in entries {
            b.set(arch_key(k), v)?;
        }
        for (site, r) in SITES.iter().zip(self.residual_sites()) {
            b.set(residual_key(site, "alpha"), Value::F64(r.alpha))?;
            b.set(residual_key(site, "beta"), Value::F64(r.beta))?;
        }
        b.set(KEY_LIGHTNING_NORM_EPS, Value::F64(self.lightning_norm_eps))?;
        Ok(())
    }

    /// Reads and validates the config of a MiniMax-01 GGUF file.
    pub fn from_gguf(h: &Header) -> Result<Config, ModelError> {
        let arch = h.get_str(keys::GENERAL_ARCHITECTURE)?.unwrap_or("");
        if arch != names::ARCH {
            return Err(ModelError::BadMetadata {
                key: keys::GENERAL_ARCHITECTURE.into(),
                reason: format!("is `{arch}`, expected `{}`", names::ARCH),
            });
        }
        let need = |suffix: &str| -> Result<usize, ModelError> {
            let key = arch_key(suffix);
            let v = h.get_u64(&key)?.ok_or_else(|| ModelError::BadMetadata { key: key.clone(), reason: "missing".into() })?;
            usize::try_from(v).map_err(|_| ModelError::BadMetadata { key, reason: format!("{v} is too large") })
        };
        let opt_f64 = |key: &str| number(h, key);
        let head_dim = need(arch_keys::KEY_LENGTH)?;
        let rms_eps = opt_f64(&arch_key(arch_keys::RMS_EPS))?.unwrap_or(1e-5);
        let scale = opt_f64(&arch_key(arch_keys::RESIDUAL_SCALE))?.unwrap_or(1.0);
        let site = |name: &str| -> Result<Residual, ModelError> {
            Ok(Residual {
                alpha: opt_f64(&residual_key(name, "alpha"))?.unwrap_or(scale),
                beta: opt_f64(&residual_key(name, "beta"))?.unwrap_or(1.0),
            })
        };
        let vocab_size = match h.tensor(names::TOKEN_EMBD) {
            Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
            _ => need(arch_keys::VOCAB_SIZE)?,
        };
        let cfg = Config {
            dim: need(arch_keys::EMBEDDING_LENGTH)?,
            n_layers: need(arch_keys::BLOCK_COUNT)?,
            n_heads: need(arch_keys::HEAD_COUNT)?,
            n_kv_heads: need(arch_keys::HEAD_COUNT_KV)?,
            head_dim,
            rotary_dim: h.get_u64(&arch_key(arch_keys::ROPE_DIMENSION_COUNT))?.map_or(head_dim, |v| v as usize),
            rope_theta: opt_f64(&arch_key(arch_keys::ROPE_FREQ_BASE))?.unwrap_or(1e4),
            hidden_dim: need(arch_keys::FEED_FORWARD_LENGTH)?,
            n_experts: need(arch_keys::EXPERT_COUNT)?,
            n_experts_used: need(arch_keys::EXPERT_USED_COUNT)?,
            vocab_size,
            context_length: need(arch_keys::CONTEXT_LENGTH)?,
            rms_eps,
            lightning_norm_eps: opt_f64(KEY_LIGHTNING_NORM_EPS)?.unwrap_or(rms_eps),
            layers: layer_pattern(h)?,
            residual_softmax: site(SITES[0])?,
            residual_lightning: site(SITES[1])?,
            residual_mlp: site(SITES[2])?,
            tie_word_embeddings: h.tensor(names::OUTPUT).is_none(),
        };
        cfg.validate("gguf metadata")?;
        Ok(cfg)
    }
}
