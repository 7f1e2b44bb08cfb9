//! CPU compute over ggml's kernels: [`ggml`] is the FFI boundary (quantize, dequantize,
//! activation quantize, vec_dot), [`matmul`] the parallel matrix-vector / matrix-matrix
//! products built on it (their worker threads in [`pool`]), [`ffn`] an expert's whole
//! SwiGLU feed-forward.

pub mod ffn;
#[allow(unsafe_code)]
pub mod ggml;
pub mod matmul;
mod pool;

pub use ffn::swiglu_ffn;
pub use ggml::DotKernel;
pub use matmul::{matmul, matmul_cols, matvec, Threads};
pub use pool::for_each_mut;
