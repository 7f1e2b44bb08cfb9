//! The MoE block (spec section 6): router softmax in f32, top-k, renormalised weights, and
//! per expert E(x) = W2 (silu(W1 x) * (W3 x)); tokens are grouped by expert so each expert
//! runs one matrix product over its tokens.

use mxr_kernels::cpu::Threads;

use super::ops::{linear, softmax};
use crate::experts::HostExperts;
use crate::model::{Layer, Model};
use crate::ModelError;

/// (expert, weight) pairs of one token: the top `k` of softmax(logits), renormalised.
/// Ties go to the lower expert index.
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut p = logits.to_vec();
    softmax(&mut p);
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let top: Vec<(usize, f32)> = order.into_iter().take(k).map(|e| (e, p[e])).collect();
    let sum: f32 = top.iter().map(|(_, w)| w).sum();
    top.into_iter().map(|(e, w)| (e, w / sum)).collect()
}

/// m = Σ_k w_k E_k(x) for every row of x ([n_tokens, dim]).
/// `count(t, e)` is called for every token t routed to expert e.
pub fn moe(
    model: &Model,
    layer: &Layer,
    x: &[f32],
    n_tokens: usize,
    count: &mut dyn FnMut(usize, usize),
    threads: Threads,
) -> Result<Vec<f32>, ModelError> {
    let c = &model.config;
    let (d, h) = (c.dim, c.hidden_dim);
    let experts = HostExperts::of(model, layer);
    let logits = linear(&model.matrix(&layer.router), x, n_tokens, threads)?;
    let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); c.n_experts];
    for t in 0..n_tokens {
        for (e, w) in route(&logits[t * c.n_experts..(t + 1) * c.n_experts], c.n_experts_used) {
            by_expert[e].push((t, w));
            count(t, e);
        }
    }
    let mut out = vec![0f32; n_tokens * d];
    for (e, tokens) in by_expert.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        let n = tokens.len();
        let xs: Vec<f32> = tokens.iter().flat_map(|&(t, _)| x[t * d..(t + 1) * d].iter().copied()).collect();
        // gate, up, SiLU and down in one parallel region (the values of three products)
        let mut down = vec![0f32; n * d];
        experts.ffn(e, 0..h, &xs, n, &mut down, threads)?;
        for (i, &(t, w)) in tokens.iter().enumerate() {
            for (o, &y) in out[t * d..(t + 1) * d].iter_mut().zip(&down[i * d..(i + 1) * d]) {
                *o += w * y;
            }
        }
    }
    Ok(out)
}
