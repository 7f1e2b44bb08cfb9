//! Plain-Rust reference math: the slow, obviously-correct twin of every fast path.
//! Quantizers and dequantizers are bit-exact ports of ggml's portable reference code;
//! dots accumulate in f64.

mod dequantize;
mod dot;
mod kquant_search;
mod quantize;
pub mod stats;

pub use dequantize::{dequantize, dequantize_to_vec};
pub use dot::{matvec_f64, matvec_quantized, vec_dot};
pub use kquant_search::nearest_int;
pub use quantize::{
    quantize, quantize_block_q4_0, quantize_block_q4k, quantize_block_q6k, quantize_block_q8_0, quantize_block_q8k, quantize_to_vec,
};
