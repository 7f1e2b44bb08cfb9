//! The MiniMax-01 forward pass on the CPU (spec section 3), over ggml's kernels for the
//! matrix products:
//!
//!   h1 = RMSNorm_in(x);  a = Attn(h1);  y = α_attn h1 + β_attn a
//!   h2 = RMSNorm_post(y); m = MoE(h2);  x' = α_mlp h2 + β_mlp m
//!
//! then the final norm and lm_head. A [`Session`] carries the lightning states and the
//! softmax layers' KV caches between calls, so a conversation is never re-read.

pub mod attention;
pub mod lightning;
pub mod moe;
pub mod ops;
pub mod session_file;

use mxr_kernels::cpu::Threads;

use crate::model::{Attention, Model};
use crate::{Config, LayerKind, ModelError};
use attention::KvCache;
use ops::{linear, residual, rmsnorm, sigmoid, silu};

/// Per-sequence state: the tokens seen, lightning states [n_heads, hd, hd] and KV caches.
#[derive(Clone, Debug)]
pub struct Session {
    pub pos: usize,
    /// Every token evaluated so far (`pos` of them).
    pub tokens: Vec<u32>,
    pub lightning: Vec<Vec<f32>>,
    pub kv: Vec<KvCache>,
    /// How often each expert was chosen, per layer: [n_layers][n_experts] (routing statistics).
    pub expert_counts: Vec<Vec<u64>>,
}

impl Session {
    pub fn new(c: &Config) -> Session {
        let state = |k: &LayerKind| if *k == LayerKind::Lightning { vec![0f32; c.n_heads * c.head_dim * c.head_dim] } else { Vec::new() };
        Session {
            pos: 0,
            tokens: Vec::new(),
            lightning: c.layers.iter().map(state).collect(),
            kv: vec![KvCache::default(); c.n_layers],
            expert_counts: vec![vec![0; c.n_experts]; c.n_layers],
        }
    }
}

/// Which logits a forward call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// [n_tokens, vocab]
    All,
    /// [vocab] of the last token
    Last,
}

/// Runs `tokens` through the model after what `session` has seen; returns logits.
pub fn forward(model: &Model, session: &mut Session, tokens: &[u32], which: Logits, threads: Threads) -> Result<Vec<f32>, ModelError> {
    forward_seqs(model, &mut [(session, tokens)], which, threads)
}

/// One decode step of several sequences at once: `tokens[i]` after what `sessions[i]` has
/// seen. The products read each weight once for all of them; attention stays each
/// sequence's own. Logits [sequences, vocab]: row i is what `forward` gives sequence i
/// alone, bit for bit (every product computes each row as it would alone).
pub fn decode_many(model: &Model, sessions: &mut [&mut Session], tokens: &[u32], threads: Threads) -> Result<Vec<f32>, ModelError> {
    if sessions.len() != tokens.len() {
        return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), sessions.len())));
    }
    let mut seqs: Vec<(&mut Session, &[u32])> = sessions.iter_mut().zip(tokens.chunks(1)).map(|(s, t)| (&mut **s, t)).collect();
    forward_seqs(model, &mut seqs, Logits::Last, threads)
}

/// The forward pass over the rows of several sequences, each `(session, tokens)`, stacked
/// in that order; logits of every row (`All`) or of each sequence's last row (`Last`).
fn forward_seqs(model: &Model, seqs: &mut [(&mut Session, &[u32])], which: Logits, threads: Threads) -> Result<Vec<f32>, ModelError> {
    let c = &model.config;
    let d = c.dim;
    if seqs.is_empty() || seqs.iter().any(|(_, t)| t.is_empty()) {
        return Err(ModelError::Input("no tokens to evaluate".into()));
    }
    let all: Vec<u32> = seqs.iter().flat_map(|(_, t)| t.iter().copied()).collect();
    if let Some(&bad) = all.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::Input(format!("token id {bad} is outside the vocabulary of {}", c.vocab_size)));
    }
    let n = all.len();
    // each sequence's rows
    let spans: Vec<std::ops::Range<usize>> = seqs
        .iter()
        .scan(0, |at, (_, t)| {
            *at += t.len();
            Some(*at - t.len()..*at)
        })
        .collect();
    let mut x = vec![0f32; n * d];
    for (t, &id) in all.iter().enumerate() {
        model.embed(id, &mut x[t * d..(t + 1) * d]);
    }
    // the sequence each row belongs to (routing counts)
    let owner: Vec<usize> = spans.iter().enumerate().flat_map(|(i, r)| r.clone().map(move |_| i)).collect();
    for (l, layer) in model.layers.iter().enumerate() {
        rmsnorm(&mut x, &layer.attn_norm, c.rms_eps);
        let (a, r) = match &layer.attn {
            Attention::Lightning { qkv, gate, norm, out } => {
                let mut p = linear(&model.matrix(qkv), &x, n, threads)?;
                p.iter_mut().for_each(|v| *v = silu(*v));
                let slopes = lightning::slopes(c.n_heads, l, c.n_layers);
                let w = p.len() / n;
                let mut o = Vec::with_capacity(n * c.attn_dim());
                for ((session, _), rows) in seqs.iter_mut().zip(&spans) {
                    let ps = &p[rows.start * w..rows.end * w];
                    o.extend(lightning::attend(ps, rows.len(), c.head_dim, &slopes, &mut session.lightning[l], lightning::BLOCK, threads)?);
                }
                rmsnorm(&mut o, norm, c.lightning_norm_eps);
                let g = linear(&model.matrix(gate), &x, n, threads)?;
                o.iter_mut().zip(&g).for_each(|(v, &gv)| *v *= sigmoid(gv));
                (linear(&model.matrix(out), &o, n, threads)?, c.residual_lightning)
            }
            Attention::Softmax { q, k, v, out } => {
                let (a_dim, kv_dim) = (c.attn_dim(), c.kv_dim());
                let mut qs = linear(&model.matrix(q), &x, n, threads)?;
                let mut ks = linear(&model.matrix(k), &x, n, threads)?;
                let vs = linear(&model.matrix(v), &x, n, threads)?;
                let mut o = Vec::with_capacity(n * a_dim);
                for ((session, _), rows) in seqs.iter_mut().zip(&spans) {
                    let (qr, kr) = (&mut qs[rows.start * a_dim..rows.end * a_dim], &mut ks[rows.start * kv_dim..rows.end * kv_dim]);
                    attention::rope(qr, a_dim, c.head_dim, c.rotary_dim, c.rope_theta, session.pos);
                    attention::rope(kr, kv_dim, c.head_dim, c.rotary_dim, c.rope_theta, session.pos);
                    let cache = &mut session.kv[l];
                    cache.k.extend_from_slice(kr);
                    cache.v.extend_from_slice(&vs[rows.start * kv_dim..rows.end * kv_dim]);
                    o.extend(attention::attend(qr, rows.len(), c, cache, session.pos, threads)?);
                }
                (linear(&model.matrix(out), &o, n, threads)?, c.residual_softmax)
            }
        };
        residual(&mut x, &a, r.alpha, r.beta);
        rmsnorm(&mut x, &layer.ffn_norm, c.rms_eps);
        let m = moe::moe(model, layer, &x, n, &mut |t, e| seqs[owner[t]].0.expert_counts[l][e] += 1, threads)?;
        residual(&mut x, &m, c.residual_mlp.alpha, c.residual_mlp.beta);
    }
    for ((session, tokens), _) in seqs.iter_mut().zip(&spans) {
        session.pos += tokens.len();
        session.tokens.extend_from_slice(tokens);
    }
    let mut rows = match which {
        Logits::All => x,
        Logits::Last => spans.iter().flat_map(|r| x[(r.end - 1) * d..r.end * d].iter().copied()).collect(),
    };
    rmsnorm(&mut rows, &model.output_norm, c.rms_eps);
    let m = rows.len() / d;
    linear(&model.matrix(&model.output), &rows, m, threads)
}
