//! The precision policy of the mission: matrices int8/int4 (experts may differ from
//! attention); always full precision: norms and every 1-D tensor (F32), the router
//! `ffn_gate_inp` (F32), token embeddings and lm_head (BF16, or F32/F16 when the plan's
//! weight type asks for it). llama.cpp's converter and llama-quantize keep the same
//! tensors unquantized (spec section 8).
//!
//! A block type needs the row length (ggml ne0) to be a multiple of its block; where it is
//! not (tiny test models), the tensor falls back to the closest type that fits:
//! Q4_K/Q6_K -> Q8_0 -> F16 (F16 fits every length).

use mxr_models::names::{self, blk};
use mxr_quant::QType;

/// The types a conversion asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypePlan {
    /// Attention matrices (and experts unless `experts` differs).
    pub weights: QType,
    /// Expert matrices (`ffn_{gate,up,down}_exps`).
    pub experts: QType,
}

impl TypePlan {
    pub fn uniform(q: QType) -> TypePlan {
        TypePlan { weights: q, experts: q }
    }
}

/// The type a GGUF tensor is stored in, given its name, ggml dims and the plan.
pub fn tensor_type(name: &str, dims: &[u64], plan: &TypePlan) -> QType {
    let suffix = names::parse_blk(name).map_or(name, |(_, s)| s);
    let wanted = if dims.len() <= 1 || suffix.ends_with("_norm.weight") || suffix == "norm.weight" || suffix == blk::FFN_GATE_INP {
        QType::F32
    } else if name == names::TOKEN_EMBD || name == names::OUTPUT {
        match plan.weights {
            QType::F32 | QType::F16 => plan.weights,
            _ => QType::BF16,
        }
    } else if [blk::FFN_GATE_EXPS, blk::FFN_UP_EXPS, blk::FFN_DOWN_EXPS].contains(&suffix) {
        plan.experts
    } else {
        plan.weights
    };
    fit_row(wanted, dims.first().copied().unwrap_or(1))
}

/// `q`, or the nearest type whose block divides a row of `ne0` elements.
pub fn fit_row(q: QType, ne0: u64) -> QType {
    let fallbacks: &[QType] = match q {
        QType::Q4K | QType::Q6K => &[QType::Q8_0, QType::F16],
        QType::Q8_0 | QType::Q4_0 => &[QType::F16],
        _ => &[],
    };
    std::iter::once(q).chain(fallbacks.iter().copied()).find(|t| ne0.is_multiple_of(t.block_size() as u64)).unwrap_or(QType::F16)
}
