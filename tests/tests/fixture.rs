//! The committed tiny MiniMax-01 fixture equals what the generator writes (the writer is
//! deterministic). Regenerate with `MXR_UPDATE_FIXTURES=1 cargo test -p mxr-e2e --test fixture`.

use mxr_e2e::fixture::{tensor_list, write_fixture, FIXTURE};
use mxr_e2e::{repo_root, temp_path};
use mxr_models::{layer_pattern, LayerKind};
use mxr_quant::gguf::GgufFile;
use mxr_quant::QType;

#[test]
fn committed_fixture_is_up_to_date() {
    let committed = repo_root().join(FIXTURE);
    if std::env::var_os("MXR_UPDATE_FIXTURES").is_some() {
        write_fixture(&committed).unwrap();
    }
    let fresh = temp_path("fixture", "tiny.gguf");
    write_fixture(&fresh).unwrap();
    let (a, b) = (std::fs::read(&committed).expect("fixture file missing"), std::fs::read(&fresh).unwrap());
    assert!(a == b, "{FIXTURE} is stale: rerun with MXR_UPDATE_FIXTURES=1");
}

#[test]
fn fixture_has_the_minimax_layout_and_precision_policy() {
    let f = GgufFile::open(repo_root().join(FIXTURE)).unwrap();
    let h = f.header();
    assert_eq!(layer_pattern(h).unwrap(), vec![LayerKind::Lightning, LayerKind::Softmax]);
    assert_eq!(h.tensors().len(), tensor_list().len());
    let ty = |n: &str| h.tensor(n).unwrap().qtype().unwrap();
    assert_eq!(ty("token_embd.weight"), QType::BF16);
    assert_eq!(ty("output.weight"), QType::BF16);
    assert_eq!(ty("blk.0.attn_qkv.weight"), QType::Q8_0);
    assert_eq!(ty("blk.1.ffn_down_exps.weight"), QType::Q8_0);
    assert_eq!(ty("blk.1.ffn_gate_inp.weight"), QType::F32);
    assert_eq!(ty("blk.0.attn_norm_2.weight"), QType::F32);
}
