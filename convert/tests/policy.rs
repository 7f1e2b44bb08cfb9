//! The precision policy: what stays full precision, what follows --type / --expert-type.

use mxr_convert::{policy::fit_row, tensor_type, TypePlan};
use mxr_quant::QType;

const MATRIX: &[u64] = &[6144, 8192];
const EXPERTS: &[u64] = &[6144, 9216, 32];

#[test]
fn norms_router_and_vectors_stay_f32() {
    let plan = TypePlan { weights: QType::Q4K, experts: QType::Q4K };
    for name in ["blk.3.attn_norm.weight", "blk.3.ffn_norm.weight", "blk.3.attn_norm_2.weight", "output_norm.weight"] {
        assert_eq!(tensor_type(name, &[6144], &plan), QType::F32, "{name}");
    }
    assert_eq!(tensor_type("blk.0.ffn_gate_inp.weight", &[6144, 32], &plan), QType::F32, "router");
    assert_eq!(tensor_type("blk.0.anything_1d", &[8192], &plan), QType::F32, "any 1-D tensor");
}

#[test]
fn embeddings_and_lm_head_are_bf16_unless_f32_or_f16_is_asked() {
    for (asked, want) in [
        (QType::Q8_0, QType::BF16),
        (QType::Q4K, QType::BF16),
        (QType::F32, QType::F32),
        (QType::F16, QType::F16),
        (QType::BF16, QType::BF16),
    ] {
        let plan = TypePlan::uniform(asked);
        assert_eq!(tensor_type("token_embd.weight", &[6144, 200064], &plan), want);
        assert_eq!(tensor_type("output.weight", &[6144, 200064], &plan), want);
    }
}

#[test]
fn experts_follow_expert_type_and_attention_follows_type() {
    let plan = TypePlan { weights: QType::Q8_0, experts: QType::Q4K };
    assert_eq!(tensor_type("blk.1.ffn_gate_exps.weight", EXPERTS, &plan), QType::Q4K);
    assert_eq!(tensor_type("blk.1.ffn_up_exps.weight", EXPERTS, &plan), QType::Q4K);
    assert_eq!(tensor_type("blk.1.ffn_down_exps.weight", &[9216, 6144, 32], &plan), QType::Q4K);
    assert_eq!(tensor_type("blk.1.attn_qkv.weight", &[6144, 24576], &plan), QType::Q8_0);
    assert_eq!(tensor_type("blk.7.attn_q.weight", MATRIX, &plan), QType::Q8_0);
}

#[test]
fn rows_that_do_not_fit_a_block_fall_back() {
    assert_eq!(fit_row(QType::Q4K, 6144), QType::Q4K);
    assert_eq!(fit_row(QType::Q4K, 96), QType::Q8_0, "96 = 3 x 32, not a multiple of 256");
    assert_eq!(fit_row(QType::Q6K, 100), QType::F16);
    assert_eq!(fit_row(QType::Q8_0, 48), QType::F16);
    assert_eq!(fit_row(QType::BF16, 7), QType::BF16);
    let plan = TypePlan::uniform(QType::Q4K);
    assert_eq!(tensor_type("blk.0.attn_q.weight", &[64, 64], &plan), QType::Q8_0);
}
