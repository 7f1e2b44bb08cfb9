//! mxr-kernels: compute. `cpu` wraps ggml's CPU kernels (through llama-cpp-sys-2's bindgen
//! bindings) behind safe, shape-checked functions; a CUDA backend joins it later.
//!
//! All `unsafe` of the CPU path lives in [`cpu::ggml`]: every FFI call is wrapped in a small
//! safe function that checks lengths first.

#![deny(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod cpu;
pub mod cuda;
mod error;

pub use error::KernelError;
