//! Small elementwise and row ops of the forward pass, f32 throughout (statistics in f64).

use mxr_kernels::cpu::{matmul, Threads};
use mxr_quant::QMatrix;

use crate::ModelError;

/// y = x · Wᵀ for every row of x: x [n_tokens, w.cols] -> [n_tokens, w.rows].
pub fn linear(w: &QMatrix, x: &[f32], n_tokens: usize, threads: Threads) -> Result<Vec<f32>, ModelError> {
    let mut y = vec![0f32; n_tokens * w.rows];
    matmul(w, x, n_tokens, &mut y, threads)?;
    Ok(y)
}

/// RMSNorm of each row of `x` (width `w.len()`), in place: x * rsqrt(mean(x²) + eps) * w.
pub fn rmsnorm(x: &mut [f32], w: &[f32], eps: f64) {
    for row in x.chunks_exact_mut(w.len()) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / w.len() as f64;
        let r = (1.0 / (ms + eps).sqrt()) as f32;
        for (v, &g) in row.iter_mut().zip(w) {
            *v = *v * r * g;
        }
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax of `x` in place (max subtracted; sum in f64).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// out = alpha * a + beta * b, elementwise, into `a`.
pub fn residual(a: &mut [f32], b: &[f32], alpha: f64, beta: f64) {
    let (alpha, beta) = (alpha as f32, beta as f32);
    for (x, &y) in a.iter_mut().zip(b) {
        *x = *x * alpha + y * beta;
    }
}

/// How many threads `n` items of `work_each` multiply-adds pay for (about 2^17
/// multiply-adds per thread).
pub fn useful_threads(n: usize, work_each: usize) -> usize {
    (n.saturating_mul(work_each) >> 17).max(1)
}

/// Per-head outputs ([n_tokens, hd] each) -> [n_tokens, n_heads * hd], head-major per token.
pub fn interleave_heads(per_head: &[Vec<f32>], n_tokens: usize, hd: usize) -> Vec<f32> {
    let n_heads = per_head.len();
    let mut o = vec![0f32; n_tokens * n_heads * hd];
    for (h, out) in per_head.iter().enumerate() {
        for t in 0..n_tokens {
            o[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd].copy_from_slice(&out[t * hd..(t + 1) * hd]);
        }
    }
    o
}
