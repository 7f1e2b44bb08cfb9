//! `mxr ppl`: perplexity of a text, in non-overlapping windows of `--ctx` tokens each read
//! from a fresh session; every window predicts its tokens 1..ctx-1 (so the figure equals the
//! training script's validation loss on the same tokens). With `--kl-base` a second model's
//! distributions are the reference: mean KL(base || model) and top-1 agreement.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use mxr_models::forward::Logits;

use crate::run_cmd::{load, ModelArgs};

#[derive(Args)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score.
    #[arg(short, long)]
    pub file: PathBuf,
    /// Window length in tokens.
    #[arg(long = "ctx", default_value_t = 512)]
    pub window: usize,
    /// Reference model for KL divergence and top-1 agreement (same tokenizer).
    #[arg(long)]
    pub kl_base: Option<PathBuf>,
    /// Score at most this many windows (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_windows: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// log-softmax of one row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&v| v as f64 - lse).collect()
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |b, (i, v)| if *v > row[b] { i } else { b })
}

pub fn run(a: PplArgs) -> Result<()> {
    if a.window < 2 {
        bail!("--ctx must be at least 2 tokens");
    }
    let l = load(&a.model)?;
    let base = match &a.kl_base {
        Some(p) => Some(load(&ModelArgs { model: Some(p.clone()), ..a.model.clone() })?),
        None => None,
    };
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let ids = l.tokenizer.encode(&text)?;
    let mut n_windows = ids.len() / a.window;
    if a.max_windows > 0 {
        n_windows = n_windows.min(a.max_windows);
    }
    if n_windows == 0 {
        bail!("{} has {} tokens, fewer than one window of {}", a.file.display(), ids.len(), a.window);
    }
    let vocab = l.model.config.vocab_size;
    if let Some(b) = &base {
        if b.model.config.vocab_size != vocab {
            bail!("--kl-base has a vocabulary of {}, the model {}", b.model.config.vocab_size, vocab);
        }
    }
    let started = Instant::now();
    let (mut nll, mut kl, mut agree, mut count) = (0f64, 0f64, 0usize, 0usize);
    for w in 0..n_windows {
        let toks = &ids[w * a.window..(w + 1) * a.window];
        let logits = l.forward(&mut l.new_state()?, toks, Logits::All)?;
        let base_logits = match &base {
            Some(b) => Some(b.forward(&mut b.new_state()?, toks, Logits::All)?),
            None => None,
        };
        for t in 0..a.window - 1 {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let lp = log_softmax(row);
            nll -= lp[toks[t + 1] as usize];
            if let Some(bl) = &base_logits {
                let brow = &bl[t * vocab..(t + 1) * vocab];
                let blp = log_softmax(brow);
                kl += blp.iter().zip(&lp).map(|(&b, &m)| b.exp() * (b - m)).sum::<f64>();
                agree += (argmax(brow) == argmax(row)) as usize;
            }
            count += 1;
        }
        if !a.json {
            eprint!("\r[{}/{}] ppl {:.4}", w + 1, n_windows, (nll / count as f64).exp());
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let tokens = n_windows * a.window;
    let (mean, ppl) = (nll / count as f64, (nll / count as f64).exp());
    if a.json {
        let mut j = serde_json::json!({"file": a.file.display().to_string(), "ctx": a.window, "windows": n_windows,
            "predictions": count, "mean_nll": mean, "ppl": ppl, "tokens_per_second": tokens as f64 / secs});
        if base.is_some() {
            j["kl_mean"] = serde_json::json!(kl / count as f64);
            j["top1_agreement"] = serde_json::json!(agree as f64 / count as f64);
        }
        println!("{j}");
    } else {
        eprintln!();
        println!(
            "perplexity {ppl:.4} (mean NLL {mean:.6}) over {n_windows} windows of {} tokens, {count} predictions, {:.1} tokens/s",
            a.window,
            tokens as f64 / secs
        );
        if base.is_some() {
            println!("vs base: mean KL {:.6}, top-1 agreement {:.2}%", kl / count as f64, 100.0 * agree as f64 / count as f64);
        }
    }
    Ok(())
}
