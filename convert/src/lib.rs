//! mxr-convert: HF safetensors checkpoint -> GGUF. So far the precision policy
//! ([`policy`]): which GGUF tensor gets which type. The checkpoint reader, the streaming
//! converter and `synth` follow.

#![forbid(unsafe_code)]

pub mod policy;

pub use policy::{tensor_type, TypePlan};
