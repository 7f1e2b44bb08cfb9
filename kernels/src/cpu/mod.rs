//! CPU compute over ggml's kernels: [`ggml`] is the FFI boundary (quantize, dequantize,
//! activation quantize, vec_dot), [`matmul`] the parallel matrix-vector / matrix-matrix
//! products built on it, [`ffn`] an expert's whole SwiGLU feed-forward in one parallel region.

pub mod ffn;
#[allow(unsafe_code)]
pub mod ggml;
pub mod matmul;

pub use ffn::swiglu_ffn;
pub use ggml::DotKernel;
pub use matmul::{matmul, matmul_cols, matvec, Threads};
