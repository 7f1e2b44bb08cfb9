//! `mxr synth --router zipf:S` makes expert popularity skewed (and uniform routing is not):
//! counted by the forward pass's routing statistics on a converted synthetic checkpoint.

use mxr_convert::synth::{synth, tiny_config, Router, SynthOptions};
use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_e2e::tempdir;
use mxr_kernels::cpu::Threads;
use mxr_models::forward::{forward, Logits};
use mxr_models::{Model, Session};
use mxr_quant::reference::stats::Rng;
use mxr_quant::QType;

/// Layer-0 expert counts over 512 random tokens.
fn layer0_counts(router: Router) -> Vec<u64> {
    let dir = tempdir("zipf");
    let mut cfg = tiny_config();
    cfg.n_experts = 8;
    let ckpt = dir.join("ckpt");
    let opts = SynthOptions { config: cfg, seed: 3, shard_bytes: u64::MAX, router, tokenizer_vocab: 400, threads: 2 };
    synth(&ckpt, &opts, &|_, _| {}).unwrap();
    let gguf = dir.join("m.gguf");
    convert(&ckpt, &gguf, &ConvertOptions::new(TypePlan::uniform(QType::F32)), &|_| {}).unwrap();
    let m = Model::open(&gguf).unwrap();
    let mut rng = Rng::new(9);
    let tokens: Vec<u32> = (0..512).map(|_| (rng.next_u64() % 400) as u32).collect();
    let mut s = Session::new(&m.config);
    forward(&m, &mut s, &tokens, Logits::Last, Threads(2)).unwrap();
    s.expert_counts[0].clone()
}

#[test]
fn zipf_router_skews_expert_popularity() {
    let zipf = layer0_counts(Router::Zipf(1.2));
    let uniform = layer0_counts(Router::Uniform);
    eprintln!("layer 0 expert counts: zipf {zipf:?}, uniform {uniform:?}");
    assert_eq!(zipf.iter().sum::<u64>(), 1024, "2 experts x 512 tokens");
    // At layer 0 the rank of expert e is e: expert 0 is the most popular, 7 the least.
    assert!(zipf[0] > 3 * zipf[7].max(1), "{zipf:?}");
    let (max, min) = (*uniform.iter().max().unwrap(), *uniform.iter().min().unwrap());
    assert!(max < 3 * min.max(1), "uniform routing stays balanced: {uniform:?}");
}
