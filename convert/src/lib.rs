//! mxr-convert: HF safetensors checkpoint -> GGUF.
//!
//! - [`safetensors`]: shards and the index, validated, read with positioned reads;
//! - [`plan`]: which checkpoint tensors make which GGUF tensor, shapes checked;
//! - [`policy`]: the precision policy (which GGUF tensor gets which type);
//! - [`tokenizer`]: tokenizer.json / tokenizer_config.json -> GGUF tokenizer keys;
//! - [`run`]: the streaming, parallel conversion into a temp file renamed on success;
//! - [`synth`]: random-weight checkpoints in MiniMax's on-disk format, any size.

#![forbid(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod error;
pub mod plan;
pub mod policy;
pub mod run;
pub mod safetensors;
pub mod synth;
pub mod tokenizer;

pub use error::ConvertError;
pub use policy::{tensor_type, TypePlan};
pub use run::{convert, ConvertOptions, ConvertReport};
