//! mxr-quant: the file format and number formats everything else stands on.
//!
//! - [`gguf`]: GGUF v3 reader (mmap, zero-copy tensor views, strict validation with caps)
//!   and streaming writer (temp file + rename).
//! - [`qtype`]: ggml's type table and mxr's compute types ([`QType`]).
//! - [`blocks`]: ggml's quantized block layouts as `#[repr(C)]` structs.
//! - [`reference`]: plain-Rust quantize / dequantize / dot, bit-exact to ggml's portable
//!   reference code, plus the comparison helpers the tests of every crate use.
//! - [`matrix`]: a validated view of a quantized matrix.
//!
//! No GPU, no C: this crate builds anywhere Rust does. Its only `unsafe` is the one mmap
//! call of the reader.

#![deny(unsafe_code)]
// No panic reachable from input (issue 9): errors, not unwrap/expect/panic, outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod blocks;
pub mod convert;
pub mod gguf;
pub mod matrix;
pub mod qtype;
pub mod reference;

pub use matrix::QMatrix;
pub use qtype::{QType, TypeInfo};
