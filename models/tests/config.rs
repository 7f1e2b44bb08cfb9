//! Config from both config.json formats and through GGUF metadata.

use mxr_models::config::{gguf::residual_key, hf::from_hf_json, minimax_text_01};
use mxr_models::names::{arch_key, arch_keys};
use mxr_models::{Config, LayerKind};
use mxr_quant::gguf::{Builder, Header, Value};

/// MiniMax-Text-01's remote-code config.json (values from the M1 config, spec 1.1).
fn remote_text01() -> String {
    let attn: Vec<String> = (0..80).map(|i| if (i + 1) % 8 == 0 { "1".into() } else { "0".into() }).collect();
    format!(
        r#"{{"architectures": ["MiniMaxText01ForCausalLM"], "model_type": "minimax_text_01",
        "attn_type_list": [{}], "hidden_size": 6144, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "rotary_dim": 64,
        "rope_theta": 10000000, "intermediate_size": 9216, "num_local_experts": 32,
        "num_experts_per_tok": 2, "vocab_size": 200064, "hidden_act": "silu", "rms_norm_eps": 1e-05,
        "postnorm": true, "layernorm_full_attention_alpha": 3.5565588200778455,
        "layernorm_full_attention_beta": 1.0, "layernorm_linear_attention_alpha": 3.5565588200778455,
        "layernorm_linear_attention_beta": 1.0, "layernorm_mlp_alpha": 3.5565588200778455,
        "layernorm_mlp_beta": 1.0, "shared_intermediate_size": 0, "shared_moe_mode": "sigmoid",
        "max_position_embeddings": 10240000, "tie_word_embeddings": false, "bos_token_id": null,
        "eos_token_id": null, "torch_dtype": "bfloat16"}}"#,
        attn.join(", ")
    )
}

fn native_text01() -> String {
    let types: Vec<&str> = (0..80).map(|i| if (i + 1) % 8 == 0 { "\"full_attention\"" } else { "\"linear_attention\"" }).collect();
    format!(
        r#"{{"model_type": "minimax", "layer_types": [{}], "hidden_size": 6144, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "rope_parameters": {{"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.5}},
        "intermediate_size": 9216, "num_local_experts": 32, "num_experts_per_tok": 2, "vocab_size": 200064,
        "rms_norm_eps": 1e-05, "full_attn_alpha_factor": 3.5565588200778455, "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": 3.5565588200778455, "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": 3.5565588200778455, "mlp_beta_factor": 1.0, "max_position_embeddings": 10240000}}"#,
        types.join(", ")
    )
}

#[test]
fn both_formats_give_minimax_text_01() {
    let want = minimax_text_01();
    assert_eq!(from_hf_json(&remote_text01(), "remote").unwrap(), want);
    assert_eq!(from_hf_json(&native_text01(), "native").unwrap(), want);
    assert_eq!(want.attn_dim(), 8192);
    assert!(want.llama_cpp_residual_exact());
}

#[test]
fn odd_configs_parse_faithfully() {
    let text = remote_text01()
        .replace("\"num_hidden_layers\": 80", "\"num_hidden_layers\": 3")
        .replace(&format!("[{}]", (0..80).map(|i| if (i + 1) % 8 == 0 { "1" } else { "0" }).collect::<Vec<_>>().join(", ")), "[1, 0, 1]")
        .replace("\"layernorm_mlp_alpha\": 3.5565588200778455", "\"layernorm_mlp_alpha\": 2.5")
        .replace("\"layernorm_linear_attention_beta\": 1.0", "\"layernorm_linear_attention_beta\": 0.75");
    let c = from_hf_json(&text, "odd").unwrap();
    assert_eq!(c.layers, vec![LayerKind::Softmax, LayerKind::Lightning, LayerKind::Softmax]);
    assert_eq!((c.residual_mlp.alpha, c.residual_lightning.beta), (2.5, 0.75));
    assert!(!c.llama_cpp_residual_exact());
}

#[test]
fn dangerous_or_broken_configs_are_errors() {
    let cases = [
        (remote_text01().replace("\"postnorm\": true", "\"postnorm\": false"), "pre-norm"),
        (remote_text01().replace("\"shared_intermediate_size\": 0", "\"shared_intermediate_size\": 1024"), "shared experts"),
        (remote_text01().replace("\"model_type\": \"minimax_text_01\"", "\"model_type\": \"llama\""), "not a MiniMax-01 model"),
        (remote_text01().replace("\"attn_type_list\": [0", "\"attn_type_list\": [2"), "attn_type_list[0] is 2"),
        (remote_text01().replace("\"num_hidden_layers\": 80", "\"num_hidden_layers\": 81"), "81 layers"),
        (remote_text01().replace("\"rotary_dim\": 64", "\"rotary_dim\": 63"), "rotary dim 63"),
        (remote_text01().replace("\"hidden_size\": 6144,", ""), "`hidden_size` is missing"),
        (remote_text01().replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 7"), "not a multiple of 7"),
        (remote_text01().replace("\"vocab_size\": 200064", "\"vocab_size\": \"big\""), "`vocab_size` is \"big\""),
        (native_text01().replace("\"layer_types\"", "\"no_layer_types\""), "silently alternate"),
        (native_text01().replace("\"partial_rotary_factor\": 0.5", "\"partial_rotary_factor\": 0.3"), "partial_rotary_factor"),
        ("{ not json".to_string(), "not valid JSON"),
    ];
    for (text, needle) in cases {
        let e = from_hf_json(&text, "config.json").unwrap_err().to_string();
        assert!(e.starts_with("config.json: ") && e.contains(needle), "{needle}: {e}");
    }
}

fn header_of(c: &Config, strip_mxr: bool) -> Header {
    let mut b = Builder::new();
    c.write_gguf(&mut b).unwrap();
    let mut plain = Builder::new();
    for (k, v) in b.metadata() {
        if !(strip_mxr && k.starts_with("mxr.")) {
            plain.set(k.clone(), v.clone()).unwrap();
        }
    }
    Header::parse(&plain.write_to(Vec::new()).unwrap().finish().unwrap()).unwrap()
}

#[test]
fn gguf_metadata_round_trips_exactly() {
    let mut c = minimax_text_01();
    c.residual_lightning.beta = 0.5;
    c.residual_softmax.alpha = 1.25;
    c.tie_word_embeddings = true; // a file without output.weight
    let h = header_of(&c, false);
    assert_eq!(Config::from_gguf(&h).unwrap(), c);
    assert_eq!(h.get(&residual_key("lightning", "beta")), Some(&Value::F64(0.5)));
}

#[test]
fn files_without_mxr_keys_read_with_llama_cpp_meaning() {
    let c = minimax_text_01();
    let h = header_of(&c, true);
    let read = Config::from_gguf(&h).unwrap();
    assert_eq!(read.lightning_norm_eps, 1e-5, "llama.cpp uses the global rms eps for attn_norm_2");
    assert_eq!(read.residual_mlp.alpha, 3.556_558_8, "residual_scale is an f32: its shortest decimal");
    assert_eq!(read.residual_lightning.beta, 1.0);
    assert_eq!(read.layers, c.layers);
    let mut b = Builder::new();
    b.set("general.architecture", Value::String("llama".into())).unwrap();
    b.set(arch_key(arch_keys::BLOCK_COUNT), Value::U32(2)).unwrap();
    let other = Header::parse(&b.write_to(Vec::new()).unwrap().finish().unwrap()).unwrap();
    assert!(Config::from_gguf(&other).unwrap_err().to_string().contains("expected `minimax-01`"));
}
