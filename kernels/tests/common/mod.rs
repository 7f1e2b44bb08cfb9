//! Helpers of the GPU kernel tests (gpu_kernels.rs, gpu_matvec.rs): the GPU, the CHECK
//! line each check prints, the weight types and shapes they cover, and random inputs.
// each test binary uses some of them
#![allow(dead_code)]

use mxr_kernels::cuda::Gpu;
use mxr_quant::reference::{dequantize_to_vec, quantize_to_vec, stats::Rng};
use mxr_quant::QType;

pub fn gpu() -> Gpu {
    Gpu::open(0).expect("these tests need a GPU")
}

pub fn check(kernel: &str, case: &str, nmse: f64, budget: f64) {
    let ok = nmse <= budget && nmse.is_finite();
    println!("CHECK {kernel} | {case} | nmse {nmse:.2e} | {budget:.0e} | {}", if ok { "ok" } else { "FAIL" });
    assert!(ok, "{kernel} {case}: nmse {nmse:e} over {budget:e}");
}

pub const TYPES: [QType; 7] = [QType::Q8_0, QType::Q4K, QType::Q6K, QType::Q4_0, QType::BF16, QType::F16, QType::F32];

/// (rows, cols) per type: a single row, rows that fill no block of warps, long rows,
/// and (for the float types) rows that are not a multiple of the 16-byte load.
pub fn shapes(q: QType) -> Vec<(usize, usize)> {
    let b = q.block_size().max(32);
    let mut v = vec![(1, b), (65, 3 * b), (513, b), (7, 24 * b), (6, 2 * b)];
    if q.block_size() == 1 {
        v.push((9, 17));
        v.push((33, 6));
    }
    v
}

pub fn quantized(q: QType, n: usize, seed: u64) -> Vec<u8> {
    quantize_to_vec(q, &Rng::new(seed).normals(n, 0.5)).unwrap()
}

/// The input as the kernel sees it: f32 for float weights, else rounded through Q8_0.
pub fn as_kernel_input(q: QType, x: &[f32]) -> Vec<f32> {
    if matches!(q, QType::F32 | QType::F16 | QType::BF16) {
        return x.to_vec();
    }
    dequantize_to_vec(QType::Q8_0, &quantize_to_vec(QType::Q8_0, x).unwrap(), x.len()).unwrap()
}
