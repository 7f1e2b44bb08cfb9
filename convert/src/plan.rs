//! The conversion plan: for every GGUF tensor, in file order, its name, ggml dims, type
//! and the pieces of checkpoint tensors it is made of, with every shape checked against
//! the config.
//!
//! A GGUF tensor's bytes are its source's row-major bytes (spec section 8), so stacking the
//! 32 experts of a layer is concatenating their [out, in] matrices, and taking the gate
//! half of a stacked `gate_up_proj` [E, 2H, D] is taking rows e*2H .. e*2H+H of each expert.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use mxr_models::names::{self, blk};
use mxr_models::{Config, LayerKind};
use mxr_quant::QType;

use crate::policy::{tensor_type, TypePlan};
use crate::safetensors::TensorRef;
use crate::ConvertError;

/// Rows `[row_start, row_start + n_rows)` of one checkpoint tensor.
#[derive(Clone, Debug)]
pub struct Piece {
    pub src: TensorRef,
    pub row_start: u64,
    pub n_rows: u64,
}

/// One output tensor.
#[derive(Clone, Debug)]
pub struct OutTensor {
    pub name: String,
    /// ggml order (innermost first).
    pub dims: Vec<u64>,
    pub qtype: QType,
    pub pieces: Vec<Piece>,
}

impl OutTensor {
    /// Elements per row (ggml ne0).
    pub fn row_len(&self) -> u64 {
        self.dims[0]
    }

    /// Bytes read from the checkpoint for this tensor.
    pub fn input_bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.n_rows * p.src.row_len() * p.src.dtype.size() as u64).sum()
    }
}

/// The plan and what the checkpoint held that it does not use.
pub struct Plan {
    pub tensors: Vec<OutTensor>,
    /// Checkpoint tensors the plan does not use (reported as warnings).
    pub unused: Vec<String>,
}

struct Builder<'a> {
    dir: &'a Path,
    cfg: &'a Config,
    all: &'a HashMap<String, TensorRef>,
    used: HashSet<String>,
    types: TypePlan,
    out: Vec<OutTensor>,
}

impl Builder<'_> {
    /// The checkpoint tensor `name`, which must have shape `shape` (PyTorch order).
    fn take(&mut self, name: &str, shape: &[u64], why: &str) -> Result<TensorRef, ConvertError> {
        let t = self
            .all
            .get(name)
            .ok_or_else(|| ConvertError::Checkpoint { dir: self.dir.to_path_buf(), reason: format!("has no tensor `{name}` ({why})") })?;
        if t.shape != shape {
            return Err(ConvertError::BadTensor {
                path: t.file.path.clone(),
                tensor: name.to_string(),
                reason: format!("has shape {:?}, expected {shape:?} for the config ({why})", t.shape),
            });
        }
        self.used.insert(name.to_string());
        Ok(t.clone())
    }

    fn exists(&self, name: &str) -> bool {
        self.all.contains_key(name)
    }

    /// Adds an output tensor of ggml `dims` made of `pieces`.
    fn push(&mut self, name: String, dims: Vec<u64>, pieces: Vec<Piece>) {
        let qtype = tensor_type(&name, &dims, &self.types);
        self.out.push(OutTensor { name, dims, qtype, pieces });
    }

    /// A whole checkpoint tensor as one output tensor.
    fn whole(&mut self, out: String, src: &str, shape: &[u64], why: &str) -> Result<(), ConvertError> {
        let t = self.take(src, shape, why)?;
        let dims: Vec<u64> = shape.iter().rev().copied().collect();
        let n_rows = t.n_rows();
        self.push(out, dims, vec![Piece { src: t, row_start: 0, n_rows }]);
        Ok(())
    }
}

/// Builds the plan for `cfg` over the checkpoint tensors `all` found in `dir`.
pub fn plan(dir: &Path, cfg: &Config, all: &HashMap<String, TensorRef>, types: TypePlan) -> Result<Plan, ConvertError> {
    let mut b = Builder { dir, cfg, all, used: HashSet::new(), types, out: Vec::new() };
    let (dim, vocab) = (cfg.dim as u64, cfg.vocab_size as u64);
    b.whole(names::TOKEN_EMBD.into(), "model.embed_tokens.weight", &[vocab, dim], "embeddings")?;
    for i in 0..cfg.n_layers {
        layer(&mut b, i)?;
    }
    b.whole(names::OUTPUT_NORM.into(), "model.norm.weight", &[dim], "final norm")?;
    if b.exists("lm_head.weight") || !cfg.tie_word_embeddings {
        b.whole(names::OUTPUT.into(), "lm_head.weight", &[vocab, dim], "lm_head")?;
    }
    let unused = unused(&b)?;
    Ok(Plan { tensors: b.out, unused })
}

fn layer(b: &mut Builder, i: usize) -> Result<(), ConvertError> {
    let cfg = b.cfg;
    let (dim, attn, kv) = (cfg.dim as u64, cfg.attn_dim() as u64, cfg.kv_dim() as u64);
    let p = format!("model.layers.{i}.");
    let kind = cfg.layers[i];
    let why = match kind {
        LayerKind::Lightning => format!("layer {i}, lightning attention"),
        LayerKind::Softmax => format!("layer {i}, softmax attention"),
    };
    b.whole(names::blk(i, blk::ATTN_NORM), &format!("{p}input_layernorm.weight"), &[dim], &why)?;
    match kind {
        LayerKind::Lightning => {
            b.whole(names::blk(i, blk::ATTN_QKV), &format!("{p}self_attn.qkv_proj.weight"), &[3 * attn, dim], &why)?;
            b.whole(names::blk(i, blk::ATTN_GATE), &format!("{p}self_attn.output_gate.weight"), &[attn, dim], &why)?;
            b.whole(names::blk(i, blk::ATTN_NORM_2), &format!("{p}self_attn.norm.weight"), &[attn], &why)?;
            b.whole(names::blk(i, blk::ATTN_OUTPUT), &format!("{p}self_attn.out_proj.weight"), &[dim, attn], &why)?;
        }
        LayerKind::Softmax => {
            b.whole(names::blk(i, blk::ATTN_Q), &format!("{p}self_attn.q_proj.weight"), &[attn, dim], &why)?;
            b.whole(names::blk(i, blk::ATTN_K), &format!("{p}self_attn.k_proj.weight"), &[kv, dim], &why)?;
            b.whole(names::blk(i, blk::ATTN_V), &format!("{p}self_attn.v_proj.weight"), &[kv, dim], &why)?;
            b.whole(names::blk(i, blk::ATTN_OUTPUT), &format!("{p}self_attn.o_proj.weight"), &[dim, attn], &why)?;
        }
    }
    b.whole(names::blk(i, blk::FFN_NORM), &format!("{p}post_attention_layernorm.weight"), &[dim], &why)?;
    moe(b, i, &p)
}

fn moe(b: &mut Builder, i: usize, p: &str) -> Result<(), ConvertError> {
    let cfg = b.cfg;
    let (dim, h, e) = (cfg.dim as u64, cfg.hidden_dim as u64, cfg.n_experts as u64);
    let why = format!("layer {i}, MoE with {e} experts of width {h}");
    let router = [format!("{p}block_sparse_moe.gate.weight"), format!("{p}mlp.gate.weight")];
    let router = router.iter().find(|n| b.exists(n)).unwrap_or(&router[0]).clone();
    b.whole(names::blk(i, blk::FFN_GATE_INP), &router, &[e, dim], &why)?;
    let (gate_dims, down_dims) = (vec![dim, h, e], vec![h, dim, e]);
    let stacked = [format!("{p}mlp.experts.gate_up_proj"), format!("{p}mlp.experts.gate_up_proj.weight")];
    if let Some(gu) = stacked.iter().find(|n| b.exists(n)).cloned() {
        // Native transformers v5 layout: gate_up_proj [E, 2H, D] (gate rows first), down_proj [E, D, H].
        let t = b.take(&gu, &[e, 2 * h, dim], &why)?;
        let half = |offset: u64| (0..e).map(|x| Piece { src: t.clone(), row_start: x * 2 * h + offset, n_rows: h }).collect();
        b.push(names::blk(i, blk::FFN_GATE_EXPS), gate_dims.clone(), half(0));
        b.push(names::blk(i, blk::FFN_UP_EXPS), gate_dims, half(h));
        let down = if b.exists(&format!("{p}mlp.experts.down_proj")) {
            format!("{p}mlp.experts.down_proj")
        } else {
            format!("{p}mlp.experts.down_proj.weight")
        };
        let t = b.take(&down, &[e, dim, h], &why)?;
        b.push(names::blk(i, blk::FFN_DOWN_EXPS), down_dims, vec![Piece { src: t, row_start: 0, n_rows: e * dim }]);
        return Ok(());
    }
    // MiniMax's on-disk layout: one w1 (gate), w3 (up), w2 (down) per expert.
    let mut per_expert = |w: &str, shape: &[u64]| -> Result<Vec<Piece>, ConvertError> {
        (0..e)
            .map(|x| {
                let t = b.take(&format!("{p}block_sparse_moe.experts.{x}.{w}.weight"), shape, &why)?;
                let n_rows = t.n_rows();
                Ok(Piece { src: t, row_start: 0, n_rows })
            })
            .collect()
    };
    let gate = per_expert("w1", &[h, dim])?;
    let up = per_expert("w3", &[h, dim])?;
    let down = per_expert("w2", &[dim, h])?;
    b.push(names::blk(i, blk::FFN_GATE_EXPS), gate_dims.clone(), gate);
    b.push(names::blk(i, blk::FFN_UP_EXPS), gate_dims, up);
    b.push(names::blk(i, blk::FFN_DOWN_EXPS), down_dims, down);
    Ok(())
}

/// Unused checkpoint tensors; an error when they show that config and weights disagree
/// (layers or experts beyond the config's counts).
fn unused(b: &Builder) -> Result<Vec<String>, ConvertError> {
    let mut left: Vec<String> = b.all.keys().filter(|n| !b.used.contains(*n)).cloned().collect();
    left.sort();
    for name in &left {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let layer: Option<usize> = rest.split('.').next().and_then(|s| s.parse().ok());
            if let Some(l) = layer.filter(|&l| l >= b.cfg.n_layers) {
                return Err(ConvertError::Checkpoint {
                    dir: b.dir.to_path_buf(),
                    reason: format!("has tensor `{name}` for layer {l}, but config.json says {} layers", b.cfg.n_layers),
                });
            }
            if let Some(x) = rest.split(".experts.").nth(1).and_then(|s| s.split('.').next()).and_then(|s| s.parse::<usize>().ok()) {
                if x >= b.cfg.n_experts {
                    return Err(ConvertError::Checkpoint {
                        dir: b.dir.to_path_buf(),
                        reason: format!("has tensor `{name}` for expert {x}, but config.json says {} experts", b.cfg.n_experts),
                    });
                }
            }
        }
    }
    Ok(left)
}
