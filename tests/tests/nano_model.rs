//! The bundled nano model (nano/checkpoint, trained by tests/reference/train_nano.py): mxr's
//! F32 perplexity on the held-out val.txt equals the training script's validation loss of
//! the saved bf16 weights (same tokens, same windows of 256) within 0.5%.

use mxr_convert::{convert, ConvertOptions, TypePlan};
use mxr_e2e::{repo_root, temp_path};
use mxr_kernels::cpu::Threads;
use mxr_models::forward::{forward, Logits};
use mxr_models::{Model, Session};
use mxr_quant::QType;

#[test]
fn f32_perplexity_equals_the_training_validation_loss() {
    let ckpt = repo_root().join("nano/checkpoint");
    let log: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("train_log.json")).unwrap()).unwrap();
    let (want, ctx) = (log["val_loss_bf16"].as_f64().unwrap(), log["ctx"].as_u64().unwrap() as usize);
    let gguf = temp_path("nano", "f32.gguf");
    convert(&ckpt, &gguf, &ConvertOptions::new(TypePlan::uniform(QType::F32)), &|_| {}).unwrap();
    let m = Model::open(&gguf).unwrap();
    let val = repo_root().join("../shared/data/open_shakespeare/val.txt");
    let text = std::fs::read_to_string(&val).unwrap_or_else(|e| panic!("{}: {e}", val.display()));
    let ids = mxr_e2e::tokenize(&ckpt.join("tokenizer.json"), &text);
    let (mut nll, mut count) = (0f64, 0usize);
    for w in ids.chunks_exact(ctx) {
        let logits = forward(&m, &mut Session::new(&m.config), w, Logits::All, Threads::all()).unwrap();
        let vocab = m.config.vocab_size;
        for t in 0..ctx - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
            nll += lse - row[w[t + 1] as usize] as f64;
            count += 1;
        }
    }
    let got = nll / count as f64;
    eprintln!("mxr F32 mean NLL {got:.6} vs training {want:.6} ({count} predictions)");
    assert_eq!(count as u64, log["val_predictions"].as_u64().unwrap(), "same windows");
    assert!((got - want).abs() / want <= 0.005, "mxr {got} vs training {want}");
}
