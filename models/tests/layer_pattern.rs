//! The layer pattern from GGUF metadata: explicit per-layer flags, llama.cpp's interval
//! rule, and bad metadata.

use mxr_models::layers::{pattern_from_interval, PatternSummary};
use mxr_models::names::{arch_key, arch_keys, blk, parse_blk};
use mxr_models::{layer_pattern, LayerKind};
use mxr_quant::gguf::{Array, Builder, Header, Value};

fn header(kvs: Vec<(String, Value)>) -> Header {
    let mut b = Builder::new();
    for (k, v) in kvs {
        b.set(k, v).unwrap();
    }
    Header::parse(&b.write_to(Vec::new()).unwrap().finish().unwrap()).unwrap()
}

#[test]
fn real_model_rule_gives_softmax_at_7_15_and_79() {
    let p = pattern_from_interval(80, 8);
    let softmax: Vec<usize> = p.iter().enumerate().filter(|(_, k)| **k == LayerKind::Softmax).map(|(i, _)| i).collect();
    assert_eq!(softmax, (0..10).map(|j| 8 * j + 7).collect::<Vec<_>>());
    assert_eq!(PatternSummary(&p).to_string(), "(LLLLLLLS)x10");
    let h = header(vec![(arch_key(arch_keys::BLOCK_COUNT), Value::U32(80))]);
    assert_eq!(layer_pattern(&h).unwrap(), p, "interval defaults to 8");
}

#[test]
fn explicit_flags_override_the_rule() {
    // S2x32-style slice: lightning then softmax, which the (i+1) % 8 rule cannot express.
    let h = header(vec![
        (arch_key(arch_keys::BLOCK_COUNT), Value::U32(2)),
        (arch_key(arch_keys::RECURRENT_LAYERS), Value::Array(Array::Bool(vec![true, false]))),
    ]);
    assert_eq!(layer_pattern(&h).unwrap(), vec![LayerKind::Lightning, LayerKind::Softmax]);
    assert_eq!(PatternSummary(&layer_pattern(&h).unwrap()).to_string(), "LS");
}

#[test]
fn bad_pattern_metadata_is_an_error() {
    let wrong_len = header(vec![
        (arch_key(arch_keys::BLOCK_COUNT), Value::U32(3)),
        (arch_key(arch_keys::RECURRENT_LAYERS), Value::Array(Array::Bool(vec![true, false]))),
    ]);
    assert!(layer_pattern(&wrong_len).unwrap_err().to_string().contains("expected 3 bools, found 2"));
    assert!(layer_pattern(&header(vec![])).unwrap_err().to_string().contains("missing"));
    let string_count = header(vec![(arch_key(arch_keys::BLOCK_COUNT), Value::String("80".into()))]);
    assert!(layer_pattern(&string_count).is_err());
}

#[test]
fn block_names_round_trip() {
    assert_eq!(blk(12, "attn_qkv.weight"), "blk.12.attn_qkv.weight");
    assert_eq!(parse_blk("blk.12.attn_qkv.weight"), Some((12, "attn_qkv.weight")));
    assert_eq!(parse_blk("token_embd.weight"), None);
    assert_eq!(parse_blk("blk.x.attn_q.weight"), None);
}
