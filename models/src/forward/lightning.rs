//! Lightning attention: linear attention with a per-head decaying state (spec section 4).
//!
//! Per head h of layer l, with decay λ = exp(-s), s = s_h * f_l:
//!   S_t = λ S_{t-1} + k_tᵀ v_t,   o_t = q_t S_t        (S: head_dim x head_dim, f32)
//! computed blockwise (block of m tokens, incoming state S):
//!   o_i = e^{-s(i+1)} q_i S + Σ_{j<=i} e^{-s(i-j)} (q_i·k_j) v_j
//!   S  <- e^{-s m} S + Σ_j e^{-s(m-1-j)} k_jᵀ v_j
//! which equals the recurrence for any block size; decode is a block of one token.
//!
//! Slopes: s_h = b^(h+1) with b = 2^(-8/n_heads) (ALiBi; for a power-of-two head count this
//! is also MiniMax's own formula, and it is transformers' and llama.cpp's for any count);
//! f_l = 1 - l/(L-1) + 1e-5 (1 + 1e-5 for a single layer).

use mxr_kernels::cpu::{for_each_mut, Threads};
use mxr_kernels::KernelError;

use super::ops::{interleave_heads, useful_threads};

/// Tokens per block of the blocked prefill.
pub const BLOCK: usize = 64;

/// Per-head decay rates s of layer `layer` of `n_layers`.
pub fn slopes(n_heads: usize, layer: usize, n_layers: usize) -> Vec<f64> {
    let base = 2f64.powf(-8.0 / n_heads as f64);
    let factor = if n_layers > 1 { 1.0 - layer as f64 / (n_layers - 1) as f64 + 1e-5 } else { 1.0 + 1e-5 };
    (0..n_heads).map(|h| base.powi(h as i32 + 1) * factor).collect()
}

/// Runs the recurrence over `n_tokens` tokens for every head.
/// qkv: [n_tokens, n_heads * 3 * hd] after SiLU, per head [q | k | v];
/// state: [n_heads, hd, hd] (updated); returns o: [n_tokens, n_heads * hd].
pub fn attend(
    qkv: &[f32],
    n_tokens: usize,
    hd: usize,
    slopes: &[f64],
    state: &mut [f32],
    block: usize,
    threads: Threads,
) -> Result<Vec<f32>, KernelError> {
    let n_heads = slopes.len();
    let mut per_head: Vec<Vec<f32>> = vec![Vec::new(); n_heads];
    // Per head and token: the inter term and the state update, 2 hd² multiply-adds.
    let useful = useful_threads(n_heads, n_tokens * 2 * hd * hd);
    let mut heads: Vec<(&mut [f32], &mut Vec<f32>)> = state.chunks_mut(hd * hd).zip(per_head.iter_mut()).collect();
    for_each_mut(&mut heads, threads, useful, |h, (st, out)| **out = head(qkv, n_tokens, n_heads, hd, h, slopes[h], st, block))?;
    Ok(interleave_heads(&per_head, n_tokens, hd))
}

/// One head over all tokens: returns [n_tokens, hd].
#[allow(clippy::too_many_arguments)]
fn head(qkv: &[f32], n_tokens: usize, n_heads: usize, hd: usize, h: usize, s: f64, state: &mut [f32], block: usize) -> Vec<f32> {
    let stride = n_heads * 3 * hd;
    let q = |t: usize| &qkv[t * stride + h * 3 * hd..t * stride + h * 3 * hd + hd];
    let k = |t: usize| &qkv[t * stride + h * 3 * hd + hd..t * stride + h * 3 * hd + 2 * hd];
    let v = |t: usize| &qkv[t * stride + h * 3 * hd + 2 * hd..t * stride + h * 3 * hd + 3 * hd];
    let decay = |n: usize| (-s * n as f64).exp() as f32;
    let mut out = vec![0f32; n_tokens * hd];
    let block = block.max(1);
    let mut b0 = 0;
    while b0 < n_tokens {
        let m = block.min(n_tokens - b0);
        for i in 0..m {
            let (qi, o) = (q(b0 + i), &mut out[(b0 + i) * hd..(b0 + i + 1) * hd]);
            // inter: e^{-s(i+1)} q_i S
            let di = decay(i + 1);
            for (a, &qa) in qi.iter().enumerate() {
                let w = qa * di;
                for (oj, &sj) in o.iter_mut().zip(&state[a * hd..(a + 1) * hd]) {
                    *oj += w * sj;
                }
            }
            // intra: Σ_{j<=i} e^{-s(i-j)} (q_i·k_j) v_j
            for j in 0..=i {
                let dot: f32 = qi.iter().zip(k(b0 + j)).map(|(a, b)| a * b).sum();
                let w = dot * decay(i - j);
                for (oj, &vj) in o.iter_mut().zip(v(b0 + j)) {
                    *oj += w * vj;
                }
            }
        }
        // S <- e^{-s m} S + Σ_j e^{-s(m-1-j)} k_jᵀ v_j
        let dm = decay(m);
        state.iter_mut().for_each(|x| *x *= dm);
        for j in 0..m {
            let (kj, vj, dj) = (k(b0 + j), v(b0 + j), decay(m - 1 - j));
            for (a, &ka) in kj.iter().enumerate() {
                let w = ka * dj;
                for (sj, &vb) in state[a * hd..(a + 1) * hd].iter_mut().zip(vj) {
                    *sj += w * vb;
                }
            }
        }
        b0 += m;
    }
    out
}
