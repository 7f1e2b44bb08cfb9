//! mxr-models: the MiniMax-01 model family as mxr sees it.
//!
//! Glossary (used everywhere in mxr): `dim` (hidden size, 6144), `n_layers` (80), `n_heads`
//! (64, both attention kinds), `n_kv_heads` (8, softmax layers), `head_dim` (128),
//! `rotary_dim` (64), `n_experts` (32), `n_experts_used` (2), `hidden_dim` (expert FFN
//! width, 9216), `vocab_size` (200064). `lightning_*` names the linear-attention block.
//!
//! So far: [`Config`] (from HF config.json in both formats, or GGUF metadata),
//! [`LayerKind`] and the layer pattern ([`layers`]), and the GGUF names ([`names`]).
//! Weights and the forward pass follow.

#![forbid(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod config;
pub mod engine;
pub mod experts;
pub mod finite;
pub mod forward;
pub mod gpu;
pub mod layer_split;
pub mod layers;
pub mod model;
pub mod names;
pub mod offload_cost;
pub mod placement;

pub use config::{Config, Residual};
pub use finite::LogitsOut;
pub use forward::Session;
pub use layers::{layer_pattern, LayerKind};
pub use model::Model;

/// Errors of model description and loading.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] mxr_quant::gguf::FormatError),
    #[error("metadata key `{key}`: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("{origin}: {reason}")]
    BadConfig { origin: String, reason: String },
    #[error("the model file has no tensor `{0}`")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<u64>, actual: Vec<u64> },
    #[error("tensor `{name}` has type {found}, which mxr does not compute with")]
    TensorType { name: String, found: String },
    #[error(transparent)]
    Kernel(#[from] mxr_kernels::KernelError),
    #[error("{0}")]
    Input(String),
}
