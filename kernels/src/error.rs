//! The kernels crate's error type.

use mxr_quant::QType;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {what} has {actual} elements, expected {expected}")]
    Length { op: &'static str, what: &'static str, expected: usize, actual: usize },
    #[error("{op}: {n} is not a whole number of {qtype} blocks ({block} elements)")]
    PartialBlock { op: &'static str, qtype: QType, n: usize, block: usize },
    #[error("no {what} for {qtype}")]
    Unsupported { what: &'static str, qtype: QType },
    #[error("ggml disagrees with mxr about {qtype}: {detail}")]
    TableMismatch { qtype: QType, detail: String },
    #[error("matrix: {0}")]
    Matrix(#[from] mxr_quant::matrix::MatrixError),
    #[error("could not start worker threads: {0}")]
    Threads(String),
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("NVRTC could not compile kernels/cuda/{source_name}.cu for {arch}:\n{detail}")]
    Compile { source_name: &'static str, arch: &'static str, detail: String },
    #[error("out of GPU memory: {what} of {bytes} bytes")]
    OutOfMemory { what: String, bytes: usize },
    #[error("{0}")]
    Shape(String),
}
