//! Softmax attention (spec section 5): GQA (query head h reads kv head h / (n_heads /
//! n_kv_heads)), RoPE NeoX rotate-half on the first rotary_dim dims of q and k (pairs
//! (i, i + rotary_dim/2), inv_freq_i = theta^(-2i/rotary_dim), angles in f64), scores
//! q·k / sqrt(head_dim), causal softmax, and a KV cache of post-RoPE keys.

use mxr_kernels::cpu::{for_each_mut, Threads};
use mxr_kernels::KernelError;

use super::ops::{interleave_heads, softmax, useful_threads};
use crate::Config;

/// Keys and values of one softmax layer, [len, kv_dim] each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Rotates the first `rotary_dim` dims of every `head_dim`-wide head of each row of `x`
/// ([n_tokens, width]); row t is at position `pos0 + t`.
pub fn rope(x: &mut [f32], width: usize, head_dim: usize, rotary_dim: usize, theta: f64, pos0: usize) {
    let half = rotary_dim / 2;
    let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-((2 * i) as f64) / rotary_dim as f64)).collect();
    for (t, row) in x.chunks_exact_mut(width).enumerate() {
        let p = (pos0 + t) as f64;
        let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq.iter().map(|f| ((p * f).cos() as f32, (p * f).sin() as f32)).unzip();
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Attention of `n_tokens` new queries at positions `pos0..` over the cache (which already
/// holds their keys and values). q: [n_tokens, n_heads * hd]; returns [n_tokens, n_heads * hd].
pub fn attend(q: &[f32], n_tokens: usize, c: &Config, cache: &KvCache, pos0: usize, threads: Threads) -> Result<Vec<f32>, KernelError> {
    let (n_heads, n_kv_heads, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let group = n_heads / n_kv_heads;
    let kv_dim = n_kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut per_head: Vec<Vec<f32>> = vec![Vec::new(); n_heads];
    // Per head: every query against its causal prefix, 2 hd multiply-adds per key.
    let useful = useful_threads(n_heads, n_tokens * (pos0 + n_tokens) * 2 * hd);
    for_each_mut(&mut per_head, threads, useful, |h, out| {
        let g = h / group;
        let mut o = vec![0f32; n_tokens * hd];
        for t in 0..n_tokens {
            let qt = &q[(t * n_heads + h) * hd..(t * n_heads + h + 1) * hd];
            let len = pos0 + t + 1; // causal: keys 0..=pos
            let mut scores: Vec<f32> = (0..len)
                .map(|j| qt.iter().zip(&cache.k[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd]).map(|(a, b)| a * b).sum::<f32>() * scale)
                .collect();
            softmax(&mut scores);
            let ot = &mut o[t * hd..(t + 1) * hd];
            for (j, w) in scores.iter().enumerate() {
                for (x, &v) in ot.iter_mut().zip(&cache.v[j * kv_dim + g * hd..j * kv_dim + (g + 1) * hd]) {
                    *x += w * v;
                }
            }
        }
        *out = o;
    })?;
    Ok(interleave_heads(&per_head, n_tokens, hd))
}
