//! `mxr synth`: random-weight checkpoints in MiniMax's exact on-disk format — remote-code
//! config.json, bf16 safetensors shards with model.safetensors.index.json, per-expert
//! w1/w2/w3 names, a small trained byte-level BPE tokenizer.json and a tokenizer_config.json
//! with the Text-01 chat template — for any configuration, up to the real model's size.
//!
//! Weights are uniform with std 0.02 (HF's initializer_range), norms near 1. Embedding rows
//! past the tokenizer are all zero, as in the real checkpoint (so conversion finds
//! suppress_tokens). With a Zipf router every token embedding shares a direction u and
//! router row e leans along u by -s ln(1 + rank_e) / (0.45 sqrt(dim)) over noise of std
//! 1/sqrt(dim), so router logits are a per-expert bias -s ln(1 + rank) plus about one unit
//! of per-token spread: popularity falls off with rank (ranks permuted per layer). The
//! measured skew at layer 0 is checked by tests/tests/synth_router.rs.
//!
//! Generation is parallel and deterministic: every chunk of every tensor has its own seed.

pub mod bpe;
mod safetensors_out;

use std::path::{Path, PathBuf};

use mxr_models::{Config, LayerKind};
use serde_json::json;

use crate::ConvertError;
use safetensors_out::{plan_shards, write_shard, Fill, SynthTensor};

/// How experts are chosen by the synthetic router.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Router {
    Uniform,
    /// Zipf-like popularity with exponent s.
    Zipf(f64),
}

#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub config: Config,
    pub seed: u64,
    /// Largest shard, bytes (MiniMax ships ~5 GB shards).
    pub shard_bytes: u64,
    pub router: Router,
    /// BPE vocabulary trained from the built-in corpus (bytes + merges), before the
    /// special tokens.
    pub tokenizer_vocab: usize,
    pub threads: usize,
}

/// Special tokens of MiniMax's tokenizer, added after the BPE vocabulary.
pub const SPECIAL_TOKENS: [&str; 4] = ["<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>", "<begin_of_document>"];

/// MiniMax-Text-01's chat template (spec section 7): list-of-parts content, headers with
/// `<beginning_of_sentence>`, turns ended by `<end_of_sentence>`.
pub const TEXT01_CHAT_TEMPLATE: &str = include_str!("text01_chat_template.jinja");

/// What was written.
pub struct SynthReport {
    pub dir: PathBuf,
    pub shards: usize,
    pub bytes: u64,
    pub tensors: usize,
}

/// A toy configuration for tests and demos: 2 layers (lightning, softmax), dim 256, 4 heads
/// of 64 (rotary 32), 2 kv heads, 4 experts of width 512, vocab 2048.
pub fn tiny_config() -> Config {
    let mut c = mxr_models::config::minimax_text_01();
    (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.rotary_dim, c.hidden_dim) = (256, 4, 2, 64, 32, 512);
    (c.n_experts, c.vocab_size, c.context_length) = (4, 2048, 4096);
    c.n_layers = 2;
    c.layers = vec![LayerKind::Lightning, LayerKind::Softmax];
    c
}

/// HF tensor names and shapes of `cfg` in checkpoint order (remote-code names).
pub fn hf_tensors(cfg: &Config) -> Vec<(String, Vec<u64>)> {
    let (d, a, kv, h) = (cfg.dim as u64, cfg.attn_dim() as u64, cfg.kv_dim() as u64, cfg.hidden_dim as u64);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size as u64, d])];
    for (i, kind) in cfg.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        let mut add = |n: &str, s: Vec<u64>| t.push((format!("{p}{n}"), s));
        add("input_layernorm.weight", vec![d]);
        match kind {
            LayerKind::Lightning => {
                add("self_attn.qkv_proj.weight", vec![3 * a, d]);
                add("self_attn.output_gate.weight", vec![a, d]);
                add("self_attn.norm.weight", vec![a]);
                add("self_attn.out_proj.weight", vec![d, a]);
            }
            LayerKind::Softmax => {
                add("self_attn.q_proj.weight", vec![a, d]);
                add("self_attn.k_proj.weight", vec![kv, d]);
                add("self_attn.v_proj.weight", vec![kv, d]);
                add("self_attn.o_proj.weight", vec![d, a]);
            }
        }
        add("post_attention_layernorm.weight", vec![d]);
        add("block_sparse_moe.gate.weight", vec![cfg.n_experts as u64, d]);
        for e in 0..cfg.n_experts {
            add(&format!("block_sparse_moe.experts.{e}.w1.weight"), vec![h, d]);
            add(&format!("block_sparse_moe.experts.{e}.w3.weight"), vec![h, d]);
            add(&format!("block_sparse_moe.experts.{e}.w2.weight"), vec![d, h]);
        }
    }
    t.push(("model.norm.weight".into(), vec![d]));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".into(), vec![cfg.vocab_size as u64, d]));
    }
    t
}

/// The remote-code config.json of `cfg`.
pub fn remote_config_json(cfg: &Config) -> serde_json::Value {
    let attn: Vec<u8> = cfg.layers.iter().map(|k| (*k == LayerKind::Softmax) as u8).collect();
    json!({
        "architectures": ["MiniMaxText01ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config",
                     "AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM"},
        "model_type": "minimax_text_01",
        "attn_type_list": attn,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rotary_dim": cfg.rotary_dim,
        "rope_theta": cfg.rope_theta,
        "intermediate_size": cfg.hidden_dim,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.n_experts_used,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_eps,
        "postnorm": true,
        "layernorm_full_attention_alpha": cfg.residual_softmax.alpha,
        "layernorm_full_attention_beta": cfg.residual_softmax.beta,
        "layernorm_linear_attention_alpha": cfg.residual_lightning.alpha,
        "layernorm_linear_attention_beta": cfg.residual_lightning.beta,
        "layernorm_mlp_alpha": cfg.residual_mlp.alpha,
        "layernorm_mlp_beta": cfg.residual_mlp.beta,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "max_position_embeddings": cfg.context_length,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": null,
        "eos_token_id": null,
        "torch_dtype": "bfloat16",
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), ConvertError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ConvertError::BadFile { path: path.into(), reason: e.to_string() })?;
    std::fs::write(path, text + "\n").map_err(|e| ConvertError::io(path, e))
}

/// Writes a synthetic checkpoint into `dir` (which must not exist) through `dir.tmp-PID`.
pub fn synth(dir: &Path, opts: &SynthOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<SynthReport, ConvertError> {
    let cfg = &opts.config;
    cfg.validate("synth configuration")?;
    if dir.exists() {
        return Err(ConvertError::BadFile { path: dir.into(), reason: "already exists; synth writes a new directory".into() });
    }
    let tmp = PathBuf::from(format!("{}.tmp-{}", dir.display(), std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| ConvertError::io(&tmp, e))?;
    let result = write_all(&tmp, opts, progress);
    match result {
        Ok(mut report) => {
            std::fs::rename(&tmp, dir).map_err(|e| ConvertError::io(dir, e))?;
            report.dir = dir.to_path_buf();
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_all(dir: &Path, opts: &SynthOptions, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<SynthReport, ConvertError> {
    let cfg = &opts.config;
    let n_special = SPECIAL_TOKENS.len();
    let bpe_size = opts.tokenizer_vocab.min(cfg.vocab_size.saturating_sub(n_special)).max(256);
    if bpe_size + n_special > cfg.vocab_size {
        return Err(ConvertError::BadFile {
            path: dir.into(),
            reason: format!("vocab size {} is too small for a byte-level tokenizer (needs {})", cfg.vocab_size, 256 + n_special),
        });
    }
    let (vocab, merges) = bpe::train(include_str!("corpus.txt"), bpe_size);
    let tokenizer_rows = (vocab.len() + n_special) as u64;
    write_json(&dir.join("tokenizer.json"), &bpe::tokenizer_json(&vocab, &merges, &SPECIAL_TOKENS))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": false, "clean_up_tokenization_spaces": false,
                "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[2],
                "model_max_length": cfg.context_length, "chat_template": TEXT01_CHAT_TEMPLATE}),
    )?;
    write_json(&dir.join("config.json"), &remote_config_json(cfg))?;

    let tensors: Vec<SynthTensor> = hf_tensors(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let fill = fill_for(&name, &shape, cfg, opts.router, tokenizer_rows);
            SynthTensor { name, shape, fill, seed: opts.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) }
        })
        .collect();
    let shards = plan_shards(&tensors, opts.shard_bytes);
    let total: u64 = tensors.iter().map(SynthTensor::n_bytes).sum();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0u64;
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        for t in shard {
            weight_map.insert(tensors[*t].name.clone(), json!(file));
        }
        write_shard(&dir.join(&file), shard.iter().map(|&t| &tensors[t]), opts, &mut |b| {
            done += b;
            progress(done, total)
        })?;
    }
    write_json(&dir.join("model.safetensors.index.json"), &json!({"metadata": {"total_size": total}, "weight_map": weight_map}))?;
    Ok(SynthReport { dir: dir.into(), shards: n, bytes: total, tensors: tensors.len() })
}

/// How one tensor is filled.
fn fill_for(name: &str, shape: &[u64], cfg: &Config, router: Router, tokenizer_rows: u64) -> Fill {
    let zipf = match router {
        Router::Zipf(s) => Some(s),
        Router::Uniform => None,
    };
    if shape.len() == 1 {
        Fill::NearOne
    } else if name == "model.embed_tokens.weight" {
        Fill::Embedding { live_rows: tokenizer_rows, shared_direction: zipf.is_some() }
    } else if let (true, Some(s)) = (name.ends_with("block_sparse_moe.gate.weight"), zipf) {
        let layer: u64 = name.split('.').nth(2).and_then(|x| x.parse().ok()).unwrap_or(0);
        Fill::ZipfRouter { s, layer, dim: cfg.dim as u64 }
    } else {
        Fill::Uniform
    }
}
