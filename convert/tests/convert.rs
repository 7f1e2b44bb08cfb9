//! End-to-end conversion of synthetic checkpoints: metadata, tensor placement and bytes,
//! the precision policy, both expert layouts, and sharding.

mod common;

use common::*;
use mxr_convert::safetensors::open_checkpoint;
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_models::Config;
use mxr_quant::gguf::GgufFile;
use mxr_quant::reference::quantize_to_vec;
use mxr_quant::QType;

fn run(dir: &std::path::Path, out: &std::path::Path, types: TypePlan) -> mxr_convert::ConvertReport {
    let mut opts = ConvertOptions::new(types);
    opts.threads = 3;
    opts.chunk_bytes = 10_000; // many chunks per tensor: exercises reordering
    convert(dir, out, &opts, &|_| {}).unwrap()
}

/// The f32 values of rows [r0, r0+n) of a checkpoint tensor.
fn source_rows(dir: &std::path::Path, name: &str, r0: u64, n: u64) -> Vec<f32> {
    let all = open_checkpoint(dir).unwrap();
    let t = &all[name];
    let mut raw = Vec::new();
    t.read_rows(r0, n, &mut raw).unwrap();
    let mut x = Vec::new();
    t.dtype.to_f32(&raw, &mut x);
    x
}

#[test]
fn converted_file_has_config_policy_and_exact_bytes() {
    let tmp = tempdir("basic");
    let dir = tiny_checkpoint(&tmp, "tiny", tiny(), 3_000_000); // several shards
    assert!(files(&dir).iter().filter(|f| f.ends_with(".safetensors")).count() > 1, "sharded");
    let out = tmp.join("tiny.gguf");
    let report = run(&dir, &out, TypePlan { weights: QType::Q8_0, experts: QType::Q4K });
    let f = GgufFile::open(&out).unwrap();
    let h = f.header();
    assert_eq!(Config::from_gguf(h).unwrap(), tiny());
    assert_eq!(report.tensors, h.tensors().len());
    assert_eq!(std::fs::metadata(&out).unwrap().len(), report.output_bytes);

    let ty = |n: &str| h.tensor(n).unwrap().qtype().unwrap();
    assert_eq!((ty("token_embd.weight"), ty("output.weight")), (QType::BF16, QType::BF16));
    assert_eq!((ty("blk.0.attn_qkv.weight"), ty("blk.1.attn_q.weight")), (QType::Q8_0, QType::Q8_0));
    assert_eq!((ty("blk.0.ffn_gate_exps.weight"), ty("blk.1.ffn_down_exps.weight")), (QType::Q4K, QType::Q4K));
    assert_eq!(
        (ty("blk.0.ffn_gate_inp.weight"), ty("blk.0.attn_norm_2.weight"), ty("output_norm.weight")),
        (QType::F32, QType::F32, QType::F32)
    );
    assert_eq!(h.tensor("blk.1.ffn_down_exps.weight").unwrap().dims, vec![512, 256, 4]);

    // Bytes: expert 2's up projection of layer 1 sits at slice 2 of ffn_up_exps.
    let c = tiny();
    let up = f.tensor("blk.1.ffn_up_exps.weight").unwrap();
    let per_expert = up.data.len() / c.n_experts;
    let x = source_rows(&dir, "model.layers.1.block_sparse_moe.experts.2.w3.weight", 0, c.hidden_dim as u64);
    assert!(up.data[2 * per_expert..3 * per_expert] == quantize_to_vec(QType::Q4K, &x).unwrap()[..], "stacked expert bytes");
    let qkv = f.tensor("blk.0.attn_qkv.weight").unwrap();
    let x = source_rows(&dir, "model.layers.0.self_attn.qkv_proj.weight", 0, 3 * c.attn_dim() as u64);
    assert!(qkv.data == &quantize_to_vec(QType::Q8_0, &x).unwrap()[..], "qkv bytes");
    let embd = f.tensor("token_embd.weight").unwrap();
    let x = source_rows(&dir, "model.embed_tokens.weight", 0, c.vocab_size as u64);
    assert!(embd.data == &quantize_to_vec(QType::BF16, &x).unwrap()[..], "bf16 embeddings are the source bits");

    // Tokenizer: zero rows past the tokenizer are suppressed; HF json embedded verbatim.
    let suppress = h.get_array("tokenizer.ggml.suppress_tokens").unwrap().unwrap();
    assert_eq!(suppress.len(), report.suppressed_tokens);
    assert!(report.suppressed_tokens > 0 && report.suppressed_tokens < c.vocab_size);
    let hf = std::fs::read_to_string(dir.join("tokenizer.json")).unwrap();
    assert_eq!(h.get_str("tokenizer.huggingface.json").unwrap(), Some(hf.as_str()));
    assert!(h.get_str("tokenizer.chat_template").unwrap().unwrap().contains("<beginning_of_sentence>user name=user"));
    assert_eq!(h.get_array("tokenizer.ggml.tokens").unwrap().unwrap().len(), c.vocab_size);
    assert_eq!(files(&tmp), vec!["tiny", "tiny.gguf"], "no temp files left");
}

#[test]
fn stacked_native_layout_converts_to_the_same_tensors() {
    let tmp = tempdir("native");
    let c = tiny();
    let dir = tiny_checkpoint(&tmp, "per-expert", c.clone(), u64::MAX);
    // Rewrite as native transformers v5: native config.json, stacked experts, mlp.gate.
    let native = tmp.join("native");
    std::fs::create_dir(&native).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), native.join(f)).unwrap();
    }
    let all = open_checkpoint(&dir).unwrap();
    let raw = |name: &str| {
        let t = &all[name];
        let mut b = Vec::new();
        t.read_rows(0, t.n_rows(), &mut b).unwrap();
        b
    };
    let (e, h, d) = (c.n_experts as u64, c.hidden_dim as u64, c.dim as u64);
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for name in names {
        if name.contains(".experts.") {
            continue;
        }
        let t = &all[name];
        tensors.push((name.replace("block_sparse_moe.gate", "mlp.gate"), "BF16", t.shape.clone(), raw(name)));
    }
    for l in 0..c.n_layers {
        let p = format!("model.layers.{l}.");
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for x in 0..e {
            gate_up.extend(raw(&format!("{p}block_sparse_moe.experts.{x}.w1.weight")));
            gate_up.extend(raw(&format!("{p}block_sparse_moe.experts.{x}.w3.weight")));
            down.extend(raw(&format!("{p}block_sparse_moe.experts.{x}.w2.weight")));
        }
        tensors.push((format!("{p}mlp.experts.gate_up_proj"), "BF16", vec![e, 2 * h, d], gate_up));
        tensors.push((format!("{p}mlp.experts.down_proj"), "BF16", vec![e, d, h], down));
    }
    write_safetensors(&native.join("model.safetensors"), &tensors);
    let layer_types: Vec<&str> =
        c.layers.iter().map(|k| if *k == mxr_models::LayerKind::Lightning { "linear_attention" } else { "full_attention" }).collect();
    let cfg = serde_json::json!({"model_type": "minimax", "layer_types": layer_types, "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta,
        "partial_rotary_factor": c.rotary_dim as f64 / c.head_dim as f64}, "intermediate_size": c.hidden_dim,
        "num_local_experts": c.n_experts, "num_experts_per_tok": c.n_experts_used, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.context_length,
        "full_attn_alpha_factor": c.residual_softmax.alpha, "linear_attn_alpha_factor": c.residual_lightning.alpha,
        "mlp_alpha_factor": c.residual_mlp.alpha});
    std::fs::write(native.join("config.json"), cfg.to_string()).unwrap();

    let types = TypePlan { weights: QType::Q8_0, experts: QType::Q6K };
    let (a, b) = (tmp.join("a.gguf"), tmp.join("b.gguf"));
    run(&dir, &a, types);
    run(&native, &b, types);
    let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
    assert_eq!(Config::from_gguf(fa.header()).unwrap(), Config::from_gguf(fb.header()).unwrap());
    assert_eq!(fa.header().tensors().len(), fb.header().tensors().len());
    for ta in fa.tensors() {
        let tb = fb.tensor(&ta.info.name).unwrap();
        assert_eq!((ta.info.dims.clone(), ta.info.type_info), (tb.info.dims.clone(), tb.info.type_info), "{}", ta.info.name);
        assert!(ta.data == tb.data, "{} bytes differ between layouts", ta.info.name);
    }
}

#[test]
fn f32_and_f16_checkpoints_convert_like_bf16() {
    let tmp = tempdir("dtypes");
    let dir = tiny_checkpoint(&tmp, "bf16", tiny(), u64::MAX);
    let all = open_checkpoint(&dir).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for (dtype, tag) in [("F32", "f32"), ("F16", "f16")] {
        let out_dir = tmp.join(tag);
        std::fs::create_dir(&out_dir).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(dir.join(f), out_dir.join(f)).unwrap();
        }
        let tensors: Vec<_> = names
            .iter()
            .map(|name| {
                let t = &all[*name];
                let mut raw = Vec::new();
                t.read_rows(0, t.n_rows(), &mut raw).unwrap();
                let mut x = Vec::new();
                t.dtype.to_f32(&raw, &mut x);
                let bytes = match dtype {
                    "F32" => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    _ => quantize_to_vec(QType::F16, &x).unwrap(),
                };
                ((*name).clone(), dtype, t.shape.clone(), bytes)
            })
            .collect();
        write_safetensors(&out_dir.join("model.safetensors"), &tensors);
        let types = TypePlan { weights: QType::Q8_0, experts: QType::Q4K };
        let (a, b) = (tmp.join(format!("bf16-{tag}.gguf")), tmp.join(format!("{tag}.gguf")));
        run(&dir, &a, types);
        run(&out_dir, &b, types);
        let (fa, fb) = (GgufFile::open(&a).unwrap(), GgufFile::open(&b).unwrap());
        if dtype == "F32" {
            for ta in fa.tensors() {
                // bf16 values are exact in f32: the same floats go in, the same bytes come out.
                assert!(ta.data == fb.tensor(&ta.info.name).unwrap().data, "{} from F32 differs from the bf16 source", ta.info.name);
            }
        } else {
            // f16 flushes the tiniest bf16 values to subnormals, so compare with the f16 values.
            let src = &tensors.iter().find(|t| t.0 == "model.embed_tokens.weight").unwrap().3;
            let x: Vec<f32> = src.chunks_exact(2).map(|b| mxr_quant::convert::f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect();
            assert!(fb.tensor("token_embd.weight").unwrap().data == &quantize_to_vec(QType::BF16, &x).unwrap()[..]);
            assert_eq!(fa.header().tensors().len(), fb.header().tensors().len());
        }
    }
}
